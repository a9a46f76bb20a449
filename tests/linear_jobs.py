"""Rank function of the linear-probe tests, for ``multirank.run_ranks`` (pickled by module name).

One job per test file: a 2-rank start costs most of a test's time.
"""
import torch

from lgp_ds import dist
from lgp_ds.eval.linear import evaluate_heads, feature_batches, linear_probe, train_heads


def linear_job(train_x, train_y, test_x, test_y, kwargs: dict) -> dict:
    """On this rank: the heads :func:`train_heads` trains on the cached features (state dict),
    their test scores (this rank's contiguous share of the test set), the result dict of
    :func:`linear_probe`, and the error a batch the ranks cannot share raises."""
    batch, seed, lrs, epochs = kwargs["batch_size"], kwargs["seed"], kwargs["lrs"], kwargs["epochs"]
    heads = train_heads(feature_batches(train_x, train_y, batch, seed), dim=train_x.shape[1],
                        num_classes=int(train_y.max()) + 1, blrs=lrs, epochs=epochs,
                        steps_per_epoch=len(train_x) // batch, batch_size=batch,
                        warmup_epochs=1, seed=seed)
    share = torch.tensor_split(torch.arange(len(test_x)), dist.get_world_size())[dist.get_rank()]
    top1, loss, total = evaluate_heads(heads, [(test_x[share], test_y[share])])
    result = linear_probe(train_x, train_y, test_x, test_y, blrs=lrs, epochs=epochs,
                          batch_size=batch, seed=seed)
    try:
        linear_probe(train_x, train_y, test_x, test_y, blrs=lrs, epochs=1,
                     batch_size=batch - 1)
        error = None
    except ValueError as e:
        error = str(e)
    return {"state": {k: v.clone() for k, v in heads.state_dict().items()}, "top1": top1,
            "loss": loss, "total": total, "result": result, "error": error}

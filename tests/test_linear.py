"""Linear probe (lgp_ds.eval.linear) on synthetic features: accuracy on separable and on shuffled
labels, one SGD step against a hand computation, heads that train independently, LR selection
that never looks at the test set, the on-the-fly mode, and 2 real ranks against one process."""
import math

import pytest
import torch
import torch.nn.functional as F

import linear_jobs
from lgp_ds.eval.linear import (LinearHeads, feature_batches, linear_probe,
                                linear_probe_on_the_fly, stratified_split, train_heads)
from multirank import run_ranks

LRS = [0.03, 0.3, 3.0]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these matrices are tiny, and with 2 threads on a 2-core machine that
    other processes also load, OpenMP's waiting made a 100-step probe 35x slower (0.3 s -> 11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(classes=100, dim=32, train_per_class=30, test_per_class=20, sep=1.5, seed=0):
    """(train_x [N, D], train_y [N], test_x [M, D], test_y [M]): one Gaussian cluster (std 1 per
    dimension) per class around a random centre (std ``sep``), the same centres for both sets.

    At sep 1.5 in 32 dimensions (100 classes, seed 0) a centre's nearest neighbour is 7 to 10
    std away (8.7 on average): linearly separable up to the rare point 3.5 std out towards a
    neighbour. Classes are balanced in both sets."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * sep

    def draw(n):
        y = torch.arange(classes).repeat_interleave(n)
        return centres[y] + torch.randn(len(y), dim, generator=g), y

    return (*draw(train_per_class), *draw(test_per_class))


def test_separable_features_near_perfect_and_shuffled_labels_at_chance():
    train_x, train_y, test_x, test_y = _clusters()
    good = linear_probe(train_x, train_y, test_x, test_y, blrs=LRS, epochs=10, batch_size=256)
    assert good["top1"] >= 95.0, good
    assert good["num_train"] == 2700 and good["epochs"] == 10  # 10% of 3000 held out
    assert set(good["per_lr"]) == set(LRS)

    shuffled_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))]
    bad = linear_probe(train_x, shuffled_y, test_x, test_y, blrs=LRS, epochs=10,
                       batch_size=256)
    # Chance is 1/C = 1%, but the spread is not the binomial over 2000 test images: a linear head
    # maps a tight cluster wholesale to one label (with shuffled labels, the cluster's most
    # frequent one), so top-1 moves in steps of a whole class, K/C with K ~ Binomial(C, 1/C)
    # clusters that land on their own label (1/C in expectation by the labels' symmetry, the
    # test set being balanced). Hence 100 classes: with 10, one lucky cluster is +10 points and
    # 3 of 10 (30%) has probability 7%. Here P(K >= 5) = 0.3%, while any leak of the labels
    # would show as tens of points. (Over seeds 0-9 of this set, the worst head: 0.55% to 2.2%.)
    for lr, scores in bad["per_lr"].items():
        assert scores["top1"] < 5.0, (lr, bad)


def test_one_step_is_sgd_at_the_batch_scaled_lr_on_batchnormed_features():
    """Hand-computed reference: BN without affine over the batch (biased variance, eps 1e-6),
    then CE's gradient (softmax - onehot) / B, one SGD step at base LR * B / 256 (the cosine
    factor is 1 at step 0; momentum adds nothing on a first step)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=g) * 3 + 1, torch.randint(5, (64,), generator=g)
    heads = train_heads(lambda epoch: [(x, y)], dim=8, num_classes=5, blrs=[0.5, 2.0],
                        epochs=1, steps_per_epoch=1, batch_size=64, seed=7)
    w0 = LinearHeads(8, 5, 1, seed=7).linears[0].weight.detach().double()
    xd = x.double()
    z = (xd - xd.mean(0)) / torch.sqrt(xd.var(0, unbiased=False) + 1e-6)
    dlogits = (torch.softmax(z @ w0.T, dim=1) - F.one_hot(y, 5)) / 64  # bias 0 at the start
    for lin, lr in zip(heads.linears, [0.5, 2.0]):
        step = lr * 64 / 256
        assert torch.allclose(lin.weight.double(), w0 - step * dlogits.T @ z, atol=1e-6)
        assert torch.allclose(lin.bias.double(), -step * dlogits.sum(0), atol=1e-6)
    assert heads.bn.weight is None and not heads.training  # no affine; handed back in eval mode


def test_heads_trained_together_equal_heads_trained_alone():
    train_x, train_y, _, _ = _clusters(classes=10, train_per_class=50)
    common = dict(dim=32, num_classes=10, epochs=3, steps_per_epoch=len(train_x) // 64,
                  batch_size=64, warmup_epochs=1, seed=5)
    together = train_heads(feature_batches(train_x, train_y, 64, seed=5), blrs=LRS, **common)
    for h, lr in enumerate(LRS):
        alone = train_heads(feature_batches(train_x, train_y, 64, seed=5), blrs=[lr],
                            **common)
        # A head's parameters reach only its own CE term of the summed loss, and it sees the
        # same batches, BN output and LR: the same arithmetic as alone, so the same weights up
        # to fp32 rounding (in practice bit for bit; 1e-6 against weights of order 0.1-1).
        for got, want in zip(together.linears[h].parameters(), alone.linears[0].parameters()):
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (lr, (got - want).abs().max())
    assert not torch.allclose(together.linears[0].weight, together.linears[2].weight)


def test_lr_is_chosen_on_the_holdout_never_on_the_test_set():
    train_x, train_y, test_x, test_y = _clusters(classes=10, train_per_class=60, sep=0.7)
    lrs = [1e-4, 0.01, 0.3, 3.0]  # from barely trained to trained: holdout scores differ
    args = dict(blrs=lrs, epochs=5, batch_size=64, seed=2)
    fair = linear_probe(train_x, train_y, test_x, test_y, **args)
    # Relabel the test set (every label moved to the next class): every test score changes ...
    moved_y = (test_y + 1) % 10
    moved = linear_probe(train_x, train_y, test_x, moved_y, **args)
    assert all(moved["per_lr"][lr]["top1"] != fair["per_lr"][lr]["top1"] for lr in lrs)
    # ... but not the choice, nor any holdout number: the choice is a function of the holdout.
    assert moved["lr"] == fair["lr"]
    for lr in lrs:
        for key in ("holdout_top1", "holdout_loss"):
            assert moved["per_lr"][lr][key] == fair["per_lr"][lr][key]
    best = max(lrs, key=lambda lr: (fair["per_lr"][lr]["holdout_top1"],
                                    -fair["per_lr"][lr]["holdout_loss"]))
    assert fair["lr"] == best and fair["top1"] == fair["per_lr"][best]["top1"]
    assert len({fair["per_lr"][lr]["holdout_top1"] for lr in lrs}) > 1  # a real choice

    # The official sweep's rule (optimistic): the best head on the test set, no holdout.
    peek = linear_probe(train_x, train_y, test_x, moved_y, holdout=0, select_on="test", **args)
    assert peek["top1"] == max(s["top1"] for s in peek["per_lr"].values())
    assert peek["num_train"] == len(train_x) and peek["per_lr"][lrs[0]]["holdout_top1"] is None


def test_holdout_split_is_class_stratified_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)
    keep, held = stratified_split(y, 0.1, seed=4)
    assert torch.bincount(y[held], minlength=4).tolist() == [5, 3, 2, 0]
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(len(y)))
    assert torch.equal(held, stratified_split(y, 0.1, seed=4)[1])
    assert not torch.equal(held, stratified_split(y, 0.1, seed=5)[1])


def test_on_the_fly_mode_equals_cached_features():
    """The on-the-fly mode with an encoder whose frozen (eval-mode) output is its input gives
    the cached-features result: the same loop, batches and split; the encoder is put in eval
    mode (its dropout would otherwise change every feature)."""
    train_x, train_y, test_x, test_y = _clusters(classes=10, train_per_class=40)
    args = dict(blrs=LRS, epochs=3, batch_size=64, seed=1)
    cached = linear_probe(train_x, train_y, test_x, test_y, **args)

    encoder = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Flatten())
    images = train_x.view(-1, 4, 8)  # "images" [N, 4, 8]; the encoder flattens them to [N, 32]
    keep, held = stratified_split(train_y, 0.1, seed=1)
    fly = linear_probe_on_the_fly(
        encoder, feature_batches(images[keep], train_y[keep], 64, seed=1),
        lambda: [(images[held], train_y[held])], lambda: [(test_x.view(-1, 4, 8), test_y)],
        dim=32, num_classes=10, steps_per_epoch=len(keep) // 64, **args)
    assert not encoder.training
    assert fly["lr"] == cached["lr"] and fly["per_lr"] == cached["per_lr"]
    assert fly["num_train"] == (len(keep) // 64) * 64


def test_bad_arguments_are_refused():
    train_x, train_y, test_x, test_y = _clusters(classes=10, train_per_class=20)
    with pytest.raises(ValueError, match="select_on='holdout' needs held-out training images"):
        linear_probe(train_x, train_y, test_x, test_y, holdout=0)
    with pytest.raises(ValueError, match="distinct positive"):
        linear_probe(train_x, train_y, test_x, test_y, blrs=[0.1, 0.1])
    with pytest.raises(ValueError, match="180 training images, fewer than one batch of 256"):
        linear_probe(train_x, train_y, test_x, test_y)
    with pytest.raises(ValueError, match="epoch 0 gave 2 batches on rank 0, expected"):
        train_heads(lambda epoch: [(train_x[:64], train_y[:64])] * 2, dim=32, num_classes=10,
                    blrs=[1.0], epochs=1, steps_per_epoch=3, batch_size=64)


def test_two_ranks_equal_one_process_on_the_same_global_batches():
    train_x, train_y, test_x, test_y = _clusters(classes=10, train_per_class=64, sep=0.7)
    test_x, test_y = test_x[:-1], test_y[:-1]  # 199 test images: unequal shares of 100 and 99
    kwargs = dict(batch_size=128, seed=3, lrs=LRS, epochs=3)
    ranks = run_ranks(linear_jobs.linear_job, train_x, train_y, test_x, test_y, kwargs)
    single = linear_jobs.linear_job(train_x, train_y, test_x, test_y, kwargs)  # no process group

    for k, v in ranks[0]["state"].items():  # every rank ends with the same heads, bit for bit
        assert torch.equal(v, ranks[1]["state"][k]), k
    # Against one process on the same global batches: BN statistics and gradients summed in
    # another order (per rank, then across ranks), fp32 rounding ~1e-7 relative per step, over
    # 18 steps of weights of order 1: 1e-5 is loose for that and tight for any real difference
    # (a wrong batch, LR or BN statistic moves the weights by 1e-3 or more).
    for k, v in single["state"].items():
        assert torch.allclose(ranks[0]["state"][k], v, rtol=0, atol=1e-5), k
    for r in ranks:
        assert r["total"] == single["total"] == 199  # every test image counted once
        # Accuracies from weights 1e-5 apart: a prediction flips only on a near-exact tie.
        assert torch.equal(r["top1"], single["top1"])
        assert torch.allclose(r["loss"], single["loss"], atol=1e-5)
        assert r["result"]["lr"] == single["result"]["lr"]
        for lr in LRS:
            got, want = r["result"]["per_lr"][lr], single["result"]["per_lr"][lr]
            assert got["top1"] == want["top1"] and got["holdout_top1"] == want["holdout_top1"]
            assert math.isclose(got["holdout_loss"], want["holdout_loss"], abs_tol=1e-5)
        assert r["error"] == ("linear probe: the global batch size 127 must be a positive "
                              "multiple of the world size 2, so that every rank takes an equal "
                              "slice of every batch")
    assert single["error"] is None  # one process takes any batch size

"""Linear probe on frozen features, as MAE and MoCo v3 measure it, with an LR sweep in one pass.

The classifier is MAE's: BatchNorm1d without affine (eps 1e-6), then Linear (weight
trunc_normal std 0.01, bias 0), trained with SGD (momentum 0.9, weight decay 0 by default) and
a per-step cosine schedule with optional linear warmup; the LR is given per 256 images and
scaled by the global batch, as MoCo v3 / MAE / the official grafting sweep do.

Many heads, one pass. The official grafting code (main_lincls_sweep.py) trains one classifier per
LR on the same features; here :class:`LinearHeads` holds H heads that see the same batches, and
one SGD optimizer has one param group per head, so each head keeps its own LR. The loss is the
sum of the heads' cross-entropies: a head's parameters appear in its own term only, so its
gradient, and so its trajectory, is that of training it alone (tests/test_linear.py checks it).

Choosing the LR without peeking. The official sweep reports the head that is best on the test
(validation) set, which is optimistic: the reported number is a max over H noisy estimates on
the same images. By default (``select_on="holdout"``) a class-stratified fraction of the training
set (``holdout``, 0.1) is held out, every head trains on the rest, the head with the best holdout
top-1 (ties: lower holdout loss) is chosen, and ITS test top-1 is reported; every head's test
top-1 is reported as well. ``select_on="test"`` (with ``holdout=0``: the official behaviour)
chooses on the test set and is documented as optimistic.

No retraining after the choice: the chosen head is reported as trained on the (1 - holdout)
part. Retraining on the whole training set would double the cost of the probe (on the fly, that
is a second 90-epoch pass of the encoder over ImageNet) for what 10% more images give a linear
head on a large set (little), and the number reported would then come from a run whose holdout
score was never measured. The result says how many images the heads trained on
(``num_train``).

Two input modes share one training loop, :func:`train_heads`, which trains on ``batches(epoch)``
yielding this rank's (features [b, D], labels [b]):
- :func:`linear_probe`: cached features (train_x [N, D], ...), shuffled mini-batches from a
  seeded generator;
- :func:`linear_probe_on_the_fly`: a frozen encoder (images -> [b, D]) applied to augmented
  batches (MoCo v3 trains its linear probe on RandomResizedCrop + flip views).

Several ranks (torch.distributed, gloo or NCCL): each rank takes its slice of every global
batch; BN statistics cover the global batch (:class:`CrossRankBatchNorm1d`); gradients are
averaged over ranks before each step, so every rank ends with the same heads, equal to those of
one process on the same global batches; test and holdout images are split across ranks and the
correct counts summed. Without a process group it runs as one process.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lgp_ds import dist
from lgp_ds.engine.schedules import lr_factor
from lgp_ds.models.heads import CrossRankBatchNorm1d

# The official grafting sweep's LRs per 256 images: {1, 3, 5, 7, 9} x 10^-5 .. 10^1 (35 heads).
# (It also sweeps weight decay {0, 1e-6}; here one weight decay for all heads, 0 by default.)
# Written as decimal literals ("3e-05"), not products (3 * 1e-5 = 3.0000000000000004e-05), so
# the result's per_lr keys read as the sweep's values.
SWEEP_BLRS = tuple(float(f"{base}e{exp}") for exp in range(-5, 2) for base in (1, 3, 5, 7, 9))

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> (x, y) batches


def _derived_seed(seed: int, *keys: int) -> int:
    """A generator seed for one use of ``seed`` (head init, holdout split, an epoch's shuffle).

    Every use gets its own stream, unrelated to ``torch.manual_seed(seed)``'s: with one integer
    seeding both synthetic data and the head, torch.randn's centres and trunc_normal_'s weights
    come from the same uniform draws, and the untrained head already classifies the data.
    """
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class LinearHeads(nn.Module):
    """H independent linear classifiers on BatchNorm'd features.

    x [N, D] -> logits [H, N, C]. The BN has no affine parameters, so its output is the same for
    every head: one BN serves all H (exactly what H separate BNs would compute, running statistics
    included). Every head starts from the same weights (drawn from ``seed``): heads differ only
    by their LR, and a head trained alone with the same seed starts where it starts here.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, seed: int = 0):
        super().__init__()
        self.bn = CrossRankBatchNorm1d(dim, affine=False, eps=1e-6)  # MAE's linear-probe BN
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        weight = torch.empty(num_classes, dim)
        # MAE: trunc_normal_(std=0.01); the bounds +-2 are absolute, i.e. 200 std: no truncation.
        init = torch.Generator().manual_seed(_derived_seed(seed, 0))
        nn.init.trunc_normal_(weight, std=0.01, generator=init)
        with torch.no_grad():
            for lin in self.linears:
                lin.weight.copy_(weight)
                lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, D] -> [H, N, C]
        # The features are frozen and the BN has no parameters: nothing upstream of the linear
        # layers needs a gradient, and skipping it saves the BN's backward all-reduces.
        with torch.no_grad():
            z = self.bn(x.float())
        return torch.stack([lin(z) for lin in self.linears])


def local_batch_size(batch_size: int) -> int:
    """This rank's share of a global batch; refuses a batch the ranks cannot share equally."""
    world = dist.get_world_size()
    if batch_size <= 0 or batch_size % world:
        raise ValueError(f"linear probe: the global batch size {batch_size} must be a positive "
                         f"multiple of the world size {world}, so that every rank takes an equal "
                         f"slice of every batch")
    return batch_size // world


def _all_reduce_mean_grads(module: nn.Module) -> None:
    """Average the parameter gradients over ranks (one flat all-reduce instead of 2H small ones).

    Each rank's loss is its local-batch mean, and the local batches are equal in size, so the
    mean over ranks is the gradient of the global-batch mean: what one process would compute.
    """
    world = dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce_sum(flat).div_(world)
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def train_heads(batches: Batches, *, dim: int, num_classes: int, blrs: Sequence[float],
                epochs: int, steps_per_epoch: int, batch_size: int, warmup_epochs: float = 0,
                momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                device: torch.device | str | None = None,
                on_step: Callable[[int, int], None] | None = None) -> LinearHeads:
    """Train one head per base LR (``blrs``, per 256 images) on ``batches(epoch)``; returns the
    heads [H = len(blrs)] in eval mode.

    ``batches(epoch)`` yields this rank's (features [batch_size / world, D], labels [b]) of each
    global batch of ``batch_size`` rows, at least ``steps_per_epoch`` of them (the rest of an
    epoch is not read; every rank must take the same number of steps). Head h's peak LR is
    ``blrs[h] * batch_size / 256``; the schedule is a linear warmup over ``warmup_epochs``
    then a half cosine to 0 over ``epochs * steps_per_epoch`` steps. ``on_step(step, total)`` is
    called after every step (progress display).
    """
    local = local_batch_size(batch_size)
    if steps_per_epoch <= 0 or epochs <= 0:
        raise ValueError(f"linear probe: no step to take (epochs={epochs}, "
                         f"steps_per_epoch={steps_per_epoch})")
    heads = LinearHeads(dim, num_classes, len(blrs), seed).to(device)
    groups = [{"params": list(lin.parameters()), "lr": 0.0, "peak_lr": lr * batch_size / 256}
              for lin, lr in zip(heads.linears, blrs)]
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    step = 0
    heads.train()
    for epoch in range(epochs):
        taken = 0
        for x, y in itertools.islice(batches(epoch), steps_per_epoch):
            if x.shape[0] != local:
                raise ValueError(f"linear probe: a batch of {x.shape[0]} rows on rank "
                                 f"{dist.get_rank()}, expected {local} (batch_size {batch_size} "
                                 f"over {dist.get_world_size()} ranks)")
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor(step, total,
                                                           round(warmup_epochs * steps_per_epoch))
            logits = heads(x)  # [H, b, C]
            # Sum over heads of each head's mean CE over the local batch: head h's parameters
            # only reach its own term, so each head gets the gradient it would get alone.
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(logits.device).repeat(len(groups)),
                                   reduction="sum") / local
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            _all_reduce_mean_grads(heads)
            optimizer.step()
            step, taken = step + 1, taken + 1
            if on_step is not None:
                on_step(step, total)
        if taken != steps_per_epoch:
            raise ValueError(f"linear probe: epoch {epoch} gave {taken} batches on rank "
                             f"{dist.get_rank()}, expected steps_per_epoch={steps_per_epoch}")
    return heads.eval()


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(top-1 % [H], mean CE [H], number of images) of every head over all ranks' ``batches``.

    ``batches`` yields this rank's share of the evaluation set (features [b, D], labels [b]),
    every image on exactly one rank; the counts are summed over ranks, so every rank returns
    the same numbers. A rank may have no batch at all.
    """
    heads.eval()  # BN on its running statistics
    device = heads.linears[0].weight.device
    sums = torch.zeros(2, len(heads.linears) + 1, dtype=torch.float64, device=device)
    for x, y in batches:
        logits = heads(x.to(device))  # [H, b, C]
        y = y.to(device)
        sums[0, :-1] += (logits.argmax(-1) == y).sum(1)
        sums[1, :-1] += F.cross_entropy(logits.transpose(1, 2), y.expand(len(logits), -1),
                                        reduction="none").sum(1)  # [H]
        sums[0, -1] += len(y)
    sums = dist.all_reduce_sum(sums).cpu()  # float64: exact counts on every rank
    total = int(sums[0, -1])
    if total == 0:
        raise ValueError("linear probe: the evaluation set is empty")
    return 100.0 * sums[0, :-1] / total, sums[1, :-1] / total, total


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices, held-out indices) of labels [N], both sorted: round(fraction * n_c) images
    of every class c held out, drawn from ``seed``; the same on every rank."""
    labels = labels.cpu()
    g = torch.Generator().manual_seed(_derived_seed(seed, 1))
    held = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        held.append(idx[torch.randperm(len(idx), generator=g)[:round(fraction * len(idx))]])
    held = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().squeeze(1), held


def feature_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
                    rows: torch.Tensor | None = None) -> Batches:
    """``batches(epoch)`` over cached features x [N, D], labels [N] (or only their ``rows``
    [n], e.g. all but a holdout, without copying x): this rank's rows of each global batch of a
    seeded shuffle (the same permutation on every rank); the last incomplete batch is dropped
    (different rows each epoch), so every rank takes n // batch_size steps."""
    local = local_batch_size(batch_size)
    rank = dist.get_rank()
    rows = torch.arange(len(x)) if rows is None else rows.cpu()

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shuffle = torch.Generator().manual_seed(_derived_seed(seed, 2, epoch))
        order = rows[torch.randperm(len(rows), generator=shuffle)].to(x.device)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start + rank * local:start + (rank + 1) * local]
            yield x[idx], y[idx]
    return batches


def _rank_share(x: torch.Tensor, y: torch.Tensor, chunk: int, rows: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous share of an evaluation set x [M, D], y [M] (or of its ``rows``),
    ``chunk`` rows at a time: every row on exactly one rank."""
    rows = torch.arange(len(x)) if rows is None else rows.cpu()
    for part in torch.tensor_split(rows, dist.get_world_size())[dist.get_rank()].split(chunk):
        part = part.to(x.device)
        yield x[part], y[part]


def _check_lrs(blrs: Sequence[float], select_on: str, has_holdout: bool) -> list[float]:
    """The base LRs as floats, after refusing a sweep or a selection rule that cannot work."""
    lrs = [float(lr) for lr in blrs]
    if not lrs or min(lrs) <= 0 or len(set(lrs)) != len(lrs):
        raise ValueError(f"linear probe: blrs must be distinct positive numbers, got {lrs}")
    if select_on not in ("holdout", "test"):
        raise ValueError(f"linear probe: select_on must be 'holdout' or 'test', got {select_on!r}")
    if select_on == "holdout" and not has_holdout:
        raise ValueError("linear probe: select_on='holdout' needs held-out training images "
                         "(holdout > 0); select_on='test' chooses on the test set (optimistic)")
    return lrs


def _report(heads: LinearHeads, lrs: list[float], holdout_batches, test_batches,
            select_on: str, epochs: int, num_train: int) -> dict:
    """Score every head; choose one on the holdout (or the test set); the result dict."""
    top1, loss, _ = evaluate_heads(heads, test_batches)
    per_lr = {lr: {"holdout_top1": None, "holdout_loss": None, "top1": float(top1[h])}
              for h, lr in enumerate(lrs)}
    if holdout_batches is not None:
        hold_top1, hold_loss, _ = evaluate_heads(heads, holdout_batches)
        for h, lr in enumerate(lrs):
            per_lr[lr].update(holdout_top1=float(hold_top1[h]), holdout_loss=float(hold_loss[h]))
    score, tie = (hold_top1, hold_loss) if select_on == "holdout" else (top1, loss)
    best = max(range(len(lrs)), key=lambda h: (float(score[h]), -float(tie[h])))  # ties: lower CE
    return {"top1": float(top1[best]), "lr": lrs[best], "per_lr": per_lr, "epochs": epochs,
            "num_train": num_train, "select_on": select_on}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, *, blrs: Sequence[float] = SWEEP_BLRS,
                 epochs: int = 90, batch_size: int = 256, warmup_epochs: float = 0,
                 momentum: float = 0.9, weight_decay: float = 0.0, holdout: float = 0.1,
                 select_on: str = "holdout", seed: int = 0, num_classes: int | None = None,
                 eval_batch_size: int = 1024,
                 on_step: Callable[[int, int], None] | None = None) -> dict:
    """Linear probe sweep on cached features: train_x [N, D], train_y [N], test_x [M, D],
    test_y [M] (the same full tensors on every rank; training runs where train_x is).

    ``blrs``: one head per base LR (per 256 images; default the official grafting sweep's 35).
    Every rank must call it with the same arguments. Returns (the same on every rank)::

        {"top1": test top-1 (%) of the chosen head, "lr": its base LR (per 256 images),
         "per_lr": {base LR: {"holdout_top1", "holdout_loss", "top1"}} for every head
                   (holdout entries None without a holdout),
         "epochs": epochs, "num_train": images the heads trained on, "select_on": ...}
    """
    if not 0 <= holdout < 1:
        raise ValueError(f"linear probe: holdout={holdout} must be in [0, 1)")
    lrs = _check_lrs(blrs, select_on, holdout > 0)
    local_batch_size(batch_size)  # refuse before anything else
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    keep, holdout_batches = torch.arange(len(train_x)), None
    if holdout > 0:
        keep, held = stratified_split(train_y, holdout, seed)
        holdout_batches = _rank_share(train_x, train_y, eval_batch_size, rows=held)
    if len(keep) < batch_size:
        raise ValueError(f"linear probe: {len(keep)} training images, fewer than one batch "
                         f"of {batch_size}")
    heads = train_heads(feature_batches(train_x, train_y, batch_size, seed, rows=keep),
                        dim=train_x.shape[1], num_classes=num_classes, blrs=lrs,
                        epochs=epochs, steps_per_epoch=len(keep) // batch_size,
                        batch_size=batch_size, warmup_epochs=warmup_epochs, momentum=momentum,
                        weight_decay=weight_decay, seed=seed, device=train_x.device,
                        on_step=on_step)
    return _report(heads, lrs, holdout_batches, _rank_share(test_x, test_y, eval_batch_size),
                   select_on, epochs, len(keep))


def linear_probe_on_the_fly(encoder: Callable[[torch.Tensor], torch.Tensor],
                            train_batches: Batches,
                            holdout_batches: Callable[[], Iterable] | None,
                            test_batches: Callable[[], Iterable], *, dim: int, num_classes: int,
                            steps_per_epoch: int, blrs: Sequence[float] = SWEEP_BLRS,
                            epochs: int = 90, batch_size: int = 256, warmup_epochs: float = 0,
                            momentum: float = 0.9, weight_decay: float = 0.0,
                            select_on: str = "holdout", seed: int = 0,
                            device: torch.device | str | None = None,
                            on_step: Callable[[int, int], None] | None = None) -> dict:
    """Linear probe sweep on features computed on the fly by a frozen ``encoder``.

    ``encoder``: images [b, ...] -> features [b, dim] (an nn.Module is put in eval mode; it runs
    under no_grad). ``train_batches(epoch)`` yields this rank's (augmented images [b, ...],
    labels [b]) of each global batch, b = batch_size / world, at least ``steps_per_epoch`` times;
    ``holdout_batches()`` (None with ``select_on="test"``) and ``test_batches()`` yield this
    rank's share of the held-out training images and of the test set, each image on one rank
    (:func:`stratified_split` makes the holdout from the training labels). The caller keeps the
    held-out images out of ``train_batches``. Same result dict as :func:`linear_probe`;
    ``num_train`` is the images per epoch, ``steps_per_epoch * batch_size``.
    """
    lrs = _check_lrs(blrs, select_on, holdout_batches is not None)
    if isinstance(encoder, nn.Module):
        encoder.eval()  # frozen means frozen: no dropout, no BN statistics updates

    def features(pairs):
        for images, labels in pairs:
            with torch.no_grad():
                feats = encoder(images).float()
            # Yield outside no_grad: a generator suspended inside the block would leave grad
            # mode off in the training loop that consumes it.
            yield feats, labels

    heads = train_heads(lambda epoch: features(train_batches(epoch)), dim=dim,
                        num_classes=num_classes, blrs=lrs, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                        warmup_epochs=warmup_epochs, momentum=momentum,
                        weight_decay=weight_decay, seed=seed, device=device, on_step=on_step)
    held = features(holdout_batches()) if holdout_batches is not None else None
    return _report(heads, lrs, held, features(test_batches()), select_on, epochs,
                   steps_per_epoch * batch_size)

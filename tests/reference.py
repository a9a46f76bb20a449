"""Single-process references, written without lgp_ds's engine code.

They share only the model definition (a timm ViT with MoCo heads, built with plain BatchNorm,
which over the whole global batch computes what the cross-rank BatchNorm computes over the
ranks' slices) and re-derive everything else from the recipe's rules.
"""
import copy
import math
import re

import torch
import torch.nn.functional as F

from lgp_ds.models.moco import build_graft_model


def stage_of(name: str, depth: int, num_stages: int) -> int:
    """Official grafting rule: embeddings -> first stage, block i -> i // (depth/S), rest -> last."""
    m = re.match(r"base_encoder\.blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) // (depth // num_stages)
    if re.match(r"base_encoder\.(cls_token|pos_embed|patch_embed\.)", name):
        return 0
    return num_stages - 1


def no_weight_decay(name: str, p) -> bool:
    """Official grafting code: its no-weight-decay list is empty; 1-D parameters are exempt."""
    return p.ndim <= 1


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def momentum(step: int, total: int, m0: float) -> float:
    return 1 - 0.5 * (1 + math.cos(math.pi * step / total)) * (1 - m0)


def ctr(q, k, tau):
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * tau


def peak_lr(cfg, name: str, depth: int) -> float:
    return cfg.stage_blrs[stage_of(name, depth, cfg.num_stages)] * cfg.batch_size / 256


def queries(model, x1, x2):
    """q1, q2 as the official MoCo v3 code computes them: one pass per view, plain BatchNorm."""
    return model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))


def relu_margin(model, x1, x2) -> float:
    """Smallest |input| of any ReLU: below ~1e-5, fp32 rounding can flip the unit."""
    margins = []
    hooks = [m.register_forward_pre_hook(lambda m, i: margins.append(i[0].abs().min().item()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        queries(model, x1, x2)
    for h in hooks:
        h.remove()
    return min(margins)


def train(cfg, steps: int, make_batch, margin: float = 1e-4) -> dict:
    """Grafting steps on full global batches: AdamW per stage LR, EMA momentum encoder.

    ``make_batch(seed)`` gives a global batch; each step uses the first seed whose batch keeps
    every ReLU input at least ``margin`` from 0 (the runs under test round differently, and a
    unit that flips between them changes gradients by O(1), not by rounding). The batches used
    are returned, for the runs under test to use the same.
    """
    torch.manual_seed(cfg.seed)
    model = build_graft_model(cfg, cross_rank_bn=False)
    depth = len(model.base_encoder.blocks)
    mom = copy.deepcopy(model.base_encoder).requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p], "lr": 0.0, "weight_decay": 0.0 if no_weight_decay(n, p) else cfg.weight_decay}
         for n, p in named], betas=tuple(cfg.betas))
    steps_per_epoch = cfg.samples_per_epoch // cfg.batch_size
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    losses, batches = [], []
    for t in range(steps):
        seed = 1000 * t
        while relu_margin(model, *make_batch(seed)) < margin:
            seed += 1
        x1, x2 = make_batch(seed)
        batches.append((x1, x2))
        for group, (n, _) in zip(opt.param_groups, named):
            group["lr"] = peak_lr(cfg, n, depth) * lr_factor(t, total, warmup)
        q1, q2 = queries(model, x1, x2)
        with torch.no_grad():
            k1, k2 = mom(x1), mom(x2)
        loss = ctr(q1, k2, cfg.tau) + ctr(q2, k1, cfg.tau)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        m = momentum(t + 1, total, cfg.momentum)
        with torch.no_grad():
            for n, p in model.base_encoder.named_parameters():
                if p.requires_grad:
                    k = dict(mom.named_parameters())[n]
                    k.copy_(m * k + (1 - m) * p)
    return {"batches": batches, "losses": losses, "weights": {n: p.detach().clone() for n, p in named},
            "momentum": {n: p.detach().clone() for n, p in mom.named_parameters()}}


def initial_weights(cfg) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_graft_model(cfg, cross_rank_bn=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}

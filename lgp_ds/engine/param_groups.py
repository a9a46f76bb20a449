"""Stage-wise learning rates as DeepSpeed/torch optimizer param groups.

The official grafting rule: layer 0 = patch embedding, cls token, position embedding; layer i+1 =
block i; everything after the blocks (final norm, projector, predictor) = the last layer. Blocks
split into ``num_stages`` equal stages; the embeddings ride with the first stage and the rest
with the last. Frozen parameters join no group. As in the official code, only 1-D parameters
(biases, norm weights) are exempt from weight decay: the cls token decays (timm's
``no_weight_decay()`` would exempt it).
"""
import torch.nn as nn

from lgp_ds.models.vit import vit_layer_id


def stage_of(name: str, depth: int, num_stages: int, encoder_prefix: str = "base_encoder.") -> int:
    """0-based stage of the parameter ``name`` of a model whose ViT lives under ``encoder_prefix``."""
    if not name.startswith(encoder_prefix):
        return num_stages - 1
    layer = vit_layer_id(name[len(encoder_prefix):], depth)
    if layer == 0:
        return 0
    return min(layer - 1, depth - 1) // (depth // num_stages)


def _check_equal_stages(depth: int, num_stages: int) -> None:
    if depth % num_stages:
        raise ValueError(f"num_stages={num_stages} does not divide the model depth {depth} "
                         f"into equal stages")


def freeze_lower_stages(model: nn.Module, depth: int, num_stages: int, frozen_stages: int,
                        encoder_prefix: str = "base_encoder.") -> list[str]:
    """Stop the gradient of every encoder parameter in the lowest ``frozen_stages`` stages (the
    embeddings with the first); return their names. They then join no param group, so the
    optimizer, its weight decay and the momentum EMA never touch them."""
    _check_equal_stages(depth, num_stages)
    frozen = []
    for name, p in model.named_parameters():
        if (frozen_stages and name.startswith(encoder_prefix)
                and stage_of(name, depth, num_stages, encoder_prefix) < frozen_stages):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_param_groups(model: nn.Module, depth: int, stage_lrs, weight_decay: float,
                       encoder_prefix: str = "base_encoder.") -> list[dict]:
    """Param groups named ``stage{s}`` / ``stage{s}_no_wd`` (s from 1) with lr = ``stage_lrs[s-1]``.

    ``stage_lrs`` are absolute learning rates (already scaled by the batch size). Empty groups are
    left out.
    """
    _check_equal_stages(depth, len(stage_lrs))
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = stage_of(name, depth, len(stage_lrs), encoder_prefix)
        decay = p.ndim > 1
        key = f"stage{s + 1}" + ("" if decay else "_no_wd")
        group = groups.setdefault(key, {"name": key, "params": [], "lr": stage_lrs[s],
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return sorted(groups.values(), key=lambda g: g["name"])

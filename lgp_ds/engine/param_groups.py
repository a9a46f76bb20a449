"""Stage-wise learning rates (and MAE's layer-wise LR decay) as DeepSpeed/torch param groups.

The official grafting rule: layer 0 = patch embedding, cls token, position embedding; layer i+1 =
block i; everything after the blocks (final norm, projector, predictor, classifier) = the last
layer, ``depth + 1``. Blocks split into ``num_stages`` equal stages; the embeddings ride with the
first stage and the rest with the last. Frozen parameters join no group. As in the official
code, only 1-D parameters (biases, norm weights) are exempt from weight decay: the cls token
decays (timm's ``no_weight_decay()`` would exempt it).

Fine-tuning adds MAE's layer-wise LR decay (``layer_decay < 1``): each layer's LR is its stage's
times ``layer_decay ** (depth + 1 - layer)``, so the classifier keeps the full LR and the patch
embedding gets ``layer_decay ** (depth + 1)`` of it. The groups are then one per layer (and
weight decay or not) instead of one per stage; a LambdaLR multiplies every group's LR by the same
factor, so the ratios hold at every step. MAE's fine-tuning also exempts the names in its
``no_weight_decay`` list (cls token, position embedding) besides 1-D parameters.
"""
import torch.nn as nn

from lgp_ds.models.partitioned import full_shape
from lgp_ds.models.vit import vit_layer_id


def layer_of(name: str, depth: int, encoder_prefix: str = "base_encoder.") -> int:
    """Layer of the parameter ``name``: 0 embeddings, i + 1 block i, ``depth + 1`` the rest
    (parameters outside the encoder too)."""
    if not name.startswith(encoder_prefix):
        return depth + 1
    return vit_layer_id(name[len(encoder_prefix):], depth)


def stage_of(name: str, depth: int, num_stages: int, encoder_prefix: str = "base_encoder.") -> int:
    """0-based stage of the parameter ``name`` of a model whose ViT lives under ``encoder_prefix``."""
    layer = layer_of(name, depth, encoder_prefix)
    if layer == 0:
        return 0
    return min(layer - 1, depth - 1) // (depth // num_stages)


def layer_scale(layer: int, depth: int, layer_decay: float) -> float:
    """MAE's layer-wise LR decay: ``layer_decay ** (depth + 1 - layer)``."""
    return layer_decay ** (depth + 1 - layer)


def _check_equal_stages(depth: int, num_stages: int) -> None:
    if depth % num_stages:
        raise ValueError(f"num_stages={num_stages} does not divide the model depth {depth} "
                         f"into equal stages")


def _freeze(model: nn.Module, encoder_prefix: str, frozen) -> list[str]:
    """Stop the gradient of every encoder parameter whose name ``frozen(name)`` picks; their
    names."""
    names = []
    for name, p in model.named_parameters():
        if name.startswith(encoder_prefix) and frozen(name):
            p.requires_grad_(False)
            names.append(name)
    return names


def freeze_lower_stages(model: nn.Module, depth: int, num_stages: int, frozen_stages: int,
                        encoder_prefix: str = "base_encoder.") -> list[str]:
    """Stop the gradient of every encoder parameter in the lowest ``frozen_stages`` stages (the
    embeddings with the first); return their names. They then join no param group, so the
    optimizer, its weight decay and the momentum EMA never touch them."""
    _check_equal_stages(depth, num_stages)
    if not frozen_stages:
        return []
    return _freeze(model, encoder_prefix,
                   lambda n: stage_of(n, depth, num_stages, encoder_prefix) < frozen_stages)


def freeze_lower_blocks(model: nn.Module, depth: int, blocks: int,
                        encoder_prefix: str = "base_encoder.") -> list[str]:
    """Partial fine-tuning: freeze the embeddings and the first ``blocks`` blocks (layers 0 to
    ``blocks``) as :func:`freeze_lower_stages` does; return their names. The final norm and
    the head always train."""
    if not 0 <= blocks <= depth:
        raise ValueError(f"config key freeze_blocks={blocks} exceeds the model depth {depth}")
    if not blocks:
        return []
    return _freeze(model, encoder_prefix, lambda n: layer_of(n, depth, encoder_prefix) <= blocks)


def build_param_groups(model: nn.Module, depth: int, stage_lrs, weight_decay: float,
                       encoder_prefix: str = "base_encoder.", layer_decay: float = 1.0,
                       no_weight_decay=()) -> list[dict]:
    """Param groups with lr = ``stage_lrs[stage]`` (absolute, already scaled by the batch size).

    ``layer_decay == 1``: groups ``stage{s}`` / ``stage{s}_no_wd`` (s from 1), sorted by name.
    ``layer_decay < 1``: groups ``layer{l}`` / ``layer{l}_no_wd`` (l from 0 to depth + 1), each
    with lr = stage LR x :func:`layer_scale`, in layer order.
    Weight decay 0 for 1-D parameters and for the encoder parameters named in
    ``no_weight_decay`` (names inside the encoder, e.g. ``cls_token``). Empty groups are left out.
    """
    _check_equal_stages(depth, len(stage_lrs))
    exempt = {encoder_prefix + n for n in no_weight_decay}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = stage_of(name, depth, len(stage_lrs), encoder_prefix)
        decay = len(full_shape(p)) > 1 and name not in exempt
        suffix = "" if decay else "_no_wd"
        if layer_decay == 1:
            group_name = f"stage{s + 1}{suffix}"
            key, lr = (group_name,), stage_lrs[s]
        else:  # a layer lies in one stage: one LR per (layer, decay) group
            layer = layer_of(name, depth, encoder_prefix)
            key, group_name = (layer, not decay), f"layer{layer}" + suffix
            lr = stage_lrs[s] * layer_scale(layer, depth, layer_decay)
        group = groups.setdefault(key, {"name": group_name, "params": [], "lr": lr,
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]

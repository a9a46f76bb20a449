"""Reading a DeepSpeed checkpoint folder written by lgp_ds (any ZeRO stage and world size).

:func:`read_lgp_ds` consolidates it to the exact fp32 master weights, whichever optimizer holds
them: DeepSpeed's ZeRO 1-3 optimizers (through DeepSpeed's own zero_to_fp32), its BF16_Optimizer
(ZeRO 1 + bf16 + fp32 gradient accumulation), or ZeRO 0's masters in the model-states file.
Buffers come from the module copy, frozen parameters from the exact copies lgp_ds saves next to
them (the fp32 momentum encoder, or the client state's ``frozen`` values).

Before anything is consolidated, the tag folder must hold the files of every rank that wrote it
(its completion marker records how many). Every file is read through
:mod:`lgp_ds.checkpoint_file` with only DeepSpeed's plain record classes allowed: no code in a
checkpoint runs, and a damaged file is an error that names it.
"""
import contextlib
import io
import os
import re

import torch

from lgp_ds import checkpoint_file

from lgp_ds.models.vit import MAE_ONLY_PREFIXES

from .timm_model import timm_defaults
from .weights import Weights, strip_prefix


def _deepspeed_record_types() -> tuple:
    """DeepSpeed's plain record classes that its checkpoint files pickle (no code runs)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def _load_ds_file(path: str, mmap: bool | None = None):
    """A DeepSpeed checkpoint file through the safe loader, DeepSpeed's records allowed (mapped,
    not read: see :func:`lgp_ds.checkpoint_file.load`)."""
    with checkpoint_file.allowed_types(*_deepspeed_record_types()):
        return checkpoint_file.load(path, mmap)


def _model_states_file(folder: str) -> str | None:
    """Rank 0's model-states file of a DeepSpeed tag folder (its name differs under ZeRO 3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _tag_folder(path: str) -> str:
    """The complete tag folder that ``path`` names: itself, or the newest in a checkpoints
    folder (the rule ``resume=`` follows) or in a run folder's ``checkpoints/``."""
    from lgp_ds.engine.checkpoint import find_checkpoint
    from lgp_ds.engine.run_dir import CHECKPOINTS
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):  # a run's output_dir
        path = os.path.join(path, CHECKPOINTS)
    return os.path.join(*find_checkpoint(path, save_dir=path))


# The files DeepSpeed writes per rank: optimizer states under ZeRO 1-3 (bf16_ for its bf16
# optimizers), model states under ZeRO 3 (rank 0 alone writes mp_rank_00_model_states.pt below)
_RANK_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


def _check_rank_files(folder: str) -> None:
    """ValueError naming the missing files unless ``folder`` holds those of every rank.

    The completion marker records the world size that wrote the checkpoint; each kind of
    per-rank file in the folder must be there for every rank, and rank 0's model states too.
    """
    from lgp_ds.engine.checkpoint import read_marker
    world = read_marker(*os.path.split(folder))["world_size"]
    ranks = {}  # (prefix, kind): ranks that have that file
    for name in os.listdir(folder):
        if m := _RANK_FILE.match(name):
            ranks.setdefault((m.group(1) or "", m.group(3)), set()).add(int(m.group(2)))
    missing = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
               for (prefix, kind), have in sorted(ranks.items()) for r in range(world)
               if r not in have]
    if not _model_states_file(folder) and not any(kind == "model" for _, kind in ranks):
        missing.insert(0, "mp_rank_00_model_states.pt")
    if missing:
        raise ValueError(f"{folder}: written by {world} ranks, but their files "
                         f"{', '.join(missing)} are missing")


def read_lgp_ds(path: str) -> Weights:
    """Exact fp32 weights of an lgp_ds checkpoint of any method: masters, buffers, frozen
    parameters, momentum encoder, MAE decoder."""
    folder = _tag_folder(path)
    _check_rank_files(folder)
    states = _load_ds_file(_model_states_file(folder))
    if "config" not in states or "group_params" not in states:
        raise ValueError(f"{folder}: a DeepSpeed checkpoint, but not one written by lgp_ds (no "
                         f"config in it)")
    masters, notes = _fp32_masters(folder, states)
    buffers = {n: states["module"][n] for n in states["buffer_names"]}
    model = {**{n: v.float() if v.is_floating_point() else v for n, v in buffers.items()},
             **states.get("frozen", {}), **masters}
    decoder = {k: v for k, v in model.items() if k.startswith(MAE_ONLY_PREFIXES)} or None
    if any(k.startswith("base_encoder.") for k in model):  # MoCo, VICReg and MTL models
        base = strip_prefix(model, "base_encoder.")
    else:  # an MAE model: official MAE keys, the encoder's at the top level
        base = {k: v for k, v in model.items() if not k.startswith(MAE_ONLY_PREFIXES)}
    if "momentum" in states:
        base = _with_frozen(base, states, folder)
    cfg = states["config"]
    heads = cfg.get("num_heads") or timm_defaults(cfg["arch"])["num_heads"]
    return Weights(base, states.get("momentum"), strip_prefix(model, "predictor.") or None,
                   cfg["arch"], heads, notes, decoder, dict(cfg))


def _fp32_masters(folder: str, states: dict) -> tuple[dict, list[str]]:
    """({name: exact fp32 master} of the optimizer's parameters, notes), per optimizer kind."""
    optim = sorted(f for f in os.listdir(folder) if f.endswith("optim_states.pt"))
    if not optim:
        stage = (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
        if stage:
            raise ValueError(f"{folder}: written under ZeRO stage {stage}, but it holds none of "
                             f"the optimizer states files (*optim_states.pt, one per rank) that "
                             f"hold its fp32 master weights")
        return _stage0_masters(states, folder)
    # mapped, not read: only its keys are needed here, and zero_to_fp32 reads it again
    first = _load_ds_file(os.path.join(folder, optim[0]))["optimizer_state_dict"]
    if "zero_stage" in first:  # a ZeRO optimizer (bf16 ones too write bf16_zero_pp_rank_* files)
        return _zero_masters(folder, states), []
    return _bf16_optimizer_masters(folder, optim, states), []


def _zero_masters(folder: str, states: dict) -> dict:
    """ZeRO 1-3 (DeepSpeed's ZeRO optimizers): consolidated by DeepSpeed's own zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    original = torch.load

    def safe_load(f, *args, mmap=None, **kwargs):  # zero_to_fp32 unpickles with weights_only=False
        return _load_ds_file(f, mmap)

    torch.load = safe_load
    try:  # its progress prints and bars would mix with the converter's summary and errors
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(*os.path.split(folder))
    finally:
        torch.load = original
    return {n: sd[n] for shapes in states["param_shapes"] for n in shapes}


def _bf16_optimizer_masters(folder: str, files: list[str], states: dict) -> dict:
    """ZeRO 1 + bf16 + fp32 gradient accumulation (DeepSpeed's BF16_Optimizer).

    Each rank's file holds its equal slice of every group's flat fp32 buffer (parameters in
    ``param_shapes`` order, alignment padding at the end). zero_to_fp32 refuses these files
    (their state has no ``zero_stage``).
    """
    rank = re.compile(r"bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
    files = sorted((f for f in files if rank.match(f)), key=lambda f: int(rank.match(f).group(1)))
    parts = [_load_ds_file(os.path.join(folder, f))["optimizer_state_dict"] for f in files]
    count = max(parts[0]["partition_count"])
    if count != len(parts):
        raise ValueError(f"{folder}: {len(parts)} bf16 optimizer files for {count} ranks")
    out = {}
    for g, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        padding = sum(p["group_paddings"][g] for p in parts)
        out.update(_unflatten(flat, shapes, padding, f"{folder}: bf16 optimizer group {g}"))
    return out


def _stage0_masters(states: dict, folder: str) -> tuple[dict, list[str]]:
    """ZeRO 0: the masters are in the model-states file, named by the client's group_params.

    bf16/fp16 with torch AdamW (FP16_UnfusedOptimizer): ``fp32_groups``, one tensor per
    parameter; with FusedAdam (FP16_Optimizer): ``fp32_groups_flat``, one flat tensor per group.
    fp32 with a plain optimizer: the module's parameters are their own masters.
    """
    module, optim = states["module"], states.get("optimizer") or {}
    buffers = set(states["buffer_names"])
    params = {n: v for n, v in module.items() if n not in buffers}
    groups = optim.get("fp32_groups") or optim.get("fp32_groups_flat")
    names = states.get("group_params")
    if groups is None:
        return params, []
    if names is None:
        dtype = str(next(iter(params.values())).dtype).removeprefix("torch.")
        return {n: v.float() for n, v in params.items()}, [
            f"{folder} names none of its fp32 master weights (no group_params: written before "
            f"lgp_ds recorded them): the weights are the {dtype} module copy, not the exact "
            f"fp32 masters"]
    if len(groups) != len(names):
        raise ValueError(f"{folder}: {len(names)} groups in group_params but {len(groups)} fp32 "
                         f"master groups in the optimizer state")
    out = {}
    for g, (group, tensors) in enumerate(zip(names, groups)):
        shapes = {n: module[n].shape for n in group}
        where = f"{folder}: fp32 master group {g}"
        if torch.is_tensor(tensors):  # FP16_Optimizer: one flat tensor, no padding
            out.update(_unflatten(tensors, shapes, 0, where))
        elif [t.shape for t in tensors] == list(shapes.values()):
            out.update({n: t.float().clone() for n, t in zip(group, tensors)})
        else:
            raise ValueError(f"{where}: its tensors do not have the shapes of group_params {g}")
    return out, []


def _unflatten(flat: torch.Tensor, shapes: dict, padding: int, where: str) -> dict:
    """{name: tensor of shape} cut in order from ``flat``, which ends in ``padding`` elements."""
    sizes = [torch.Size(s).numel() for s in shapes.values()]
    if sum(sizes) + padding != flat.numel():
        raise ValueError(f"{where}: {flat.numel()} elements, but its parameters need "
                         f"{sum(sizes)} (+ {padding} padding)")
    pieces = flat[:sum(sizes)].float().split(sizes)
    return {n: t.reshape(s).clone() for (n, s), t in zip(shapes.items(), pieces)}


def _with_frozen(base: dict, states: dict, folder: str) -> dict:
    """The base encoder with its frozen parameters filled from the fp32 momentum encoder.

    DeepSpeed saves frozen parameters only for ZeRO >= 2, and then as the bf16/fp16 module copy.
    Frozen values never change, and the momentum encoder (fp32, built before DeepSpeed casts the
    model) holds them exactly.
    """
    momentum = states["momentum"]
    buffers = {n.removeprefix("base_encoder.") for n in states["buffer_names"]}
    frozen_ds = states.get("frozen_param_shapes")  # ZeRO >= 2: DeepSpeed's own frozen list
    extra = [k for k in base if k not in momentum]
    if extra:
        raise ValueError(f"{folder}: base encoder keys missing from the momentum encoder: "
                         f"{extra[:5]}")
    out = {}
    for k, v in momentum.items():
        if k in base:
            out[k] = base[k]
            continue
        if k in buffers or (frozen_ds is not None and f"base_encoder.{k}" not in frozen_ds):
            raise ValueError(f"{folder}: base_encoder.{k} is neither in the optimizer's master "
                             f"weights nor a frozen parameter")
        out[k] = v
    return out

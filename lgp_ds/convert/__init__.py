"""Checkpoint formats in and out, through one canonical form (:class:`Weights`).

In:  ``mae``    official MAE files: ``{'model': encoder}``, with or without ``decoder_*`` and
                ``mask_token``, ``args`` and optimizer state (also bare state dicts with
                decoder keys)
     ``moco``   official MoCo v3 and grafting-code files: ``{'arch', 'state_dict':
                module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}``
     ``timm``   a plain timm ViT state dict (``.pth`` or ``.safetensors``)
     ``lgp_ds`` a DeepSpeed checkpoint folder written by lgp_ds (any ZeRO stage and world size),
                consolidated to the exact fp32 master weights (:mod:`.deepspeed_ckpt`)
     ``mae``    ``{'model': encoder}`` for MAE's fine-tuning code (``init`` is the same file: an
                lgp_ds grafting initialisation)
     ``moco``   both encoders and the predictor in the official MoCo v3 / grafting layout

A state dict does not say which model it is for (the head count of attention is in no tensor
shape): :mod:`.timm_model` names the exact ``timm.create_model`` call, :func:`verify` loads the
output strictly into that model, and :func:`write` records the call in the output where the
format has room for it.

Every file is read through :mod:`lgp_ds.checkpoint_file`: no code in a checkpoint runs. Outputs
are written under a temporary name and renamed when complete.
"""
import json
import math
import os
from typing import NamedTuple

import torch
from timm.layers import resample_abs_pos_embed

from lgp_ds import checkpoint_file
from lgp_ds.atomic import write_file
from lgp_ds.models.moco import GraftModel
from lgp_ds.models.vit import MAE_ONLY_PREFIXES

from .deepspeed_ckpt import read_lgp_ds
from .timm_model import OFFICIAL_ARCHS, VIT_KEYS, ModelSpec, model_spec, timm_defaults
from .weights import Weights, strip_prefix

__all__ = ["EXPECTED", "FORMATS_IN", "FORMATS_OUT", "OFFICIAL_ARCHS", "Comparison", "ModelSpec",
           "Weights", "build_output", "compare", "convert", "detect", "load_strict", "model_spec",
           "output_encoder", "read", "resample_pos_embed", "verify", "write"]

FORMATS_IN = ("mae", "moco", "timm", "lgp_ds")
FORMATS_OUT = ("timm", "mae", "init", "moco")
EXPECTED = {
    "moco": "an official MoCo v3 / grafting file: {'state_dict': module.base_encoder.* ...}",
    "mae": "an official MAE file: {'model': ViT state dict} or a bare ViT state dict",
    "timm": "a bare timm ViT state dict of tensors (cls_token, pos_embed, "
            "patch_embed.proj.weight, blocks.*) without MAE decoder keys",
    "lgp_ds": "a DeepSpeed checkpoint folder written by lgp_ds",
}


# -- reading --------------------------------------------------------------------------------------
def _is_vit_state(obj) -> bool:
    return (isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values())
            and all(k in obj for k in VIT_KEYS))


def _layouts(obj) -> list[str]:
    """The input formats ``obj`` (a loaded file) fits, the most specific first."""
    if not isinstance(obj, dict):
        return []
    sd = obj.get("state_dict")
    if isinstance(sd, dict) and any(k.startswith(("module.base_encoder.", "base_encoder."))
                                    for k in sd):
        return ["moco"]
    if _is_vit_state(obj.get("model")):
        return ["mae"]
    if _is_vit_state(obj):
        return ["mae"] if any(k.startswith(MAE_ONLY_PREFIXES) for k in obj) else ["timm", "mae"]
    return []


def _found(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"a dict with keys {keys[:8]}{more}"
    return f"a {type(obj).__name__}"


def detect(path: str, obj=None) -> str:
    """The input format of ``path`` (see the module docstring); ValueError if unknown."""
    if os.path.isdir(path):
        return "lgp_ds"
    obj = checkpoint_file.load(path) if obj is None else obj
    fits = _layouts(obj)
    if not fits:
        raise ValueError(f"{path}: unknown checkpoint layout (found {_found(obj)})")
    return fits[0]


def _check_format(path: str, fmt: str, obj=None) -> None:
    """ValueError unless the file or folder ``path`` (loaded: ``obj``) has the layout ``fmt``."""
    if fmt not in FORMATS_IN:
        raise ValueError(f"--from {fmt}: not one of {FORMATS_IN}")
    is_dir = os.path.isdir(path)
    if fmt == "lgp_ds" and not is_dir:
        raise ValueError(f"{path}: --from lgp_ds expects {EXPECTED[fmt]}; found a file")
    if fmt != "lgp_ds" and is_dir:
        raise ValueError(f"{path}: --from {fmt} expects {EXPECTED[fmt]}; found a folder")
    if not is_dir and fmt not in _layouts(obj):
        raise ValueError(f"{path}: --from {fmt} expects {EXPECTED[fmt]}; found {_found(obj)}")


def _record_hint(name, kwargs) -> tuple[str | None, int | None]:
    """(arch, num_heads) from the model record this module writes into its outputs."""
    if not isinstance(name, str):
        return None, None
    kwargs = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
    return name, kwargs.get("num_heads") or timm_defaults(name)["num_heads"]


def read(path: str, fmt: str | None = None) -> Weights:
    """Any supported checkpoint as :class:`Weights` (``fmt`` forces the input format)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    obj = None if os.path.isdir(path) else checkpoint_file.load(path)
    if fmt is not None:
        _check_format(path, fmt, obj)
    fmt = fmt or detect(path, obj)
    if fmt == "lgp_ds":
        return read_lgp_ds(path)
    record = checkpoint_file.safetensors_metadata(path) if path.endswith(".safetensors") else obj
    arch, heads = _record_hint(record.get("timm_model"), record.get("timm_kwargs"))
    if fmt == "moco":
        sd = obj["state_dict"]
        sd = strip_prefix(sd, "module.") if any(k.startswith("module.") for k in sd) else sd
        return Weights(strip_prefix(sd, "base_encoder."),
                       strip_prefix(sd, "momentum_encoder.") or None,
                       strip_prefix(sd, "predictor.") or None, arch or obj.get("arch"), heads)
    if fmt == "mae":
        sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
        args = obj.get("args")  # MAE's training script saves its argparse.Namespace
        arch = arch or getattr(args, "model", None)
        decoder = {k: v for k, v in sd.items() if k.startswith(MAE_ONLY_PREFIXES)}
        return Weights({k: v for k, v in sd.items() if not k.startswith(MAE_ONLY_PREFIXES)},
                       arch=arch, num_heads=heads, decoder=decoder or None)
    return Weights(dict(obj), arch=arch, num_heads=heads)


# -- writing --------------------------------------------------------------------------------------
def resample_pos_embed(encoder: dict, img_size: int) -> dict:
    """Bicubic resampling of the position embedding to ``img_size`` (as MAE's fine-tuning does).

    ValueError unless ``img_size`` is a positive multiple of the patch size.
    """
    pe, patch = encoder["pos_embed"], encoder["patch_embed.proj.weight"].shape[-1]
    if img_size <= 0 or img_size % patch:
        raise ValueError(f"--img_size {img_size}: not a positive multiple of the patch size "
                         f"{patch}")
    prefix = 1 if "cls_token" in encoder else 0
    old = round((pe.shape[1] - prefix) ** 0.5)
    new = img_size // patch
    if new == old:
        return encoder
    out = dict(encoder)
    out["pos_embed"] = resample_abs_pos_embed(pe.float(), [new, new], [old, old],
                                              num_prefix_tokens=prefix, interpolation="bicubic",
                                              antialias=False).to(pe.dtype)
    return out


def _cast(sd: dict | None, dtype: torch.dtype | None) -> dict | None:
    if sd is None or dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def build_output(w: Weights, fmt: str, encoder: str = "base", dtype=None,
                 img_size: int | None = None) -> dict:
    """The object that ``fmt`` stores (a state dict, or a dict holding one)."""
    if fmt not in FORMATS_OUT:
        raise ValueError(f"--to {fmt}: not one of {FORMATS_OUT}")
    if fmt == "moco":
        if w.momentum is None or w.predictor is None:
            raise ValueError("--to moco needs both encoders and the predictor; the source has "
                             "only an encoder")
        parts = {"base_encoder": w.base, "momentum_encoder": w.momentum, "predictor": w.predictor}
        if img_size is not None:
            parts["base_encoder"] = resample_pos_embed(parts["base_encoder"], img_size)
            parts["momentum_encoder"] = resample_pos_embed(parts["momentum_encoder"], img_size)
        sd = {f"module.{p}.{k}": v for p, part in parts.items()
              for k, v in _cast(part, dtype).items()}
        return {"state_dict": sd, "arch": w.arch}
    sd = w.encoder(encoder)
    sd = _cast(sd if img_size is None else resample_pos_embed(sd, img_size), dtype)
    return {"model": sd} if fmt in ("mae", "init") else sd


def output_encoder(obj: dict, fmt: str) -> dict:
    """The (base) encoder state dict without projector inside an output of format ``fmt``."""
    if fmt == "moco":
        sd = strip_prefix(strip_prefix(obj["state_dict"], "module."), "base_encoder.")
    else:
        sd = obj["model"] if fmt in ("mae", "init") else obj
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def write(obj: dict, dst: str, force: bool = False, record: dict | None = None) -> None:
    """Save ``obj`` to ``dst`` (``.safetensors`` for a flat state dict) atomically.

    ``record`` (:meth:`ModelSpec.record`) goes into the safetensors metadata, or next to the
    state dict of a dict output; a flat ``.pth`` state dict has no room for it.
    """
    if os.path.isdir(dst):
        raise ValueError(f"{dst} is a directory: name the output file")
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists: pass --force to overwrite it")
    flat = all(torch.is_tensor(v) for v in obj.values())
    if dst.endswith(".safetensors") and not flat:
        raise ValueError(f"{dst}: safetensors holds a flat state dict: use --to timm")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)

    def write(tmp: str) -> None:
        if dst.endswith(".safetensors"):
            from safetensors.torch import save_file
            meta = {"format": "pt"}
            if record:
                meta.update(timm_model=record["timm_model"],
                            timm_kwargs=json.dumps(record["timm_kwargs"]))
            save_file({k: v.contiguous() for k, v in obj.items()}, tmp, metadata=meta)
        else:
            torch.save(obj if flat or not record else {**obj, **record}, tmp)
    write_file(dst, write)


def load_strict(module: torch.nn.Module, sd: dict, what: str) -> None:
    """``module.load_state_dict(sd)`` (strict) with a one-line error."""
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{what}: {' '.join(lines[1:3])[:400]}") from None


def verify(obj: dict, fmt: str, spec: ModelSpec) -> dict:
    """Load ``obj`` strictly into the model ``spec`` names; return what a user wants to see."""
    what = f"the weights do not load into {spec.call()}"
    if fmt == "moco":
        sd = strip_prefix(obj["state_dict"], "module.")
        base = strip_prefix(sd, "base_encoder.")
        dim, mlp = base["head.6.weight"].shape[0], base["head.0.weight"].shape[0]
        model = GraftModel(spec.create(), dim, mlp, cross_rank_bn=False)
        load_strict(model, {k: v for k, v in sd.items() if not k.startswith("momentum_encoder.")},
                     what)
        load_strict(model.base_encoder, strip_prefix(sd, "momentum_encoder."), what)
    else:
        sd = obj["model"] if fmt in ("mae", "init") else obj
        load_strict(spec.create(), sd, what)
    tensors = [sd[k] for k in sorted(sd)]
    return {"arch": spec.describe(), "params": sum(t.numel() for t in tensors),
            "dtype": str(tensors[0].dtype).removeprefix("torch."),
            "sha256": checkpoint_file.tensor_digest(sd), "timm_model": spec.name,
            "timm_kwargs": {"num_classes": 0, **spec.kwargs}, "notes": spec.notes}


def convert(src: str, dst: str, to: str = "timm", src_format: str | None = None,
            encoder: str = "base", dtype: torch.dtype | None = None, img_size: int | None = None,
            arch: str | None = None, num_heads: int | None = None, force: bool = False) -> dict:
    """Read ``src``, build the ``to`` output, verify it, write ``dst``; return the summary.

    ``arch``/``num_heads`` override what the source records (``--arch`` alone drops the source's
    head count); an ``arch`` that names no known model is refused. The summary holds ``call``:
    the ``timm.create_model`` expression that loads ``dst`` (for ``--to moco``: builds its
    encoder), and ``notes`` (plus the source's).
    """
    weights = read(src, src_format)
    obj = build_output(weights, to, encoder, dtype, img_size)
    heads = num_heads if num_heads is not None else (None if arch else weights.num_heads)
    spec = model_spec(output_encoder(obj, to), arch or weights.arch, heads,
                      arch_recorded=not arch)
    info = verify(obj, to, spec)
    write(obj, dst, force=force, record=spec.record())
    info["call"] = spec.call(None if to == "moco" else dst)
    info["notes"] = weights.notes + info["notes"]
    return info


class Comparison(NamedTuple):
    """What :func:`compare` found; the two checkpoints are equal within ``atol`` when
    ``differences`` is empty."""
    worst: float  # the largest |difference| over the tensors both have
    where: str  # its key ('' when all are equal)
    differences: list[str]  # keys or parts in only one, other shapes, values beyond atol
    not_compared: list[str]  # projector or predictor of one side, the other an encoder alone


def _difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| of two tensors of one shape (NaN against NaN is equal, against a number inf)."""
    if not x.numel():
        return 0.0
    x, y = x.double(), y.double()
    same = (x == y) | (x.isnan() & y.isnan())
    return (x - y).abs().nan_to_num(nan=math.inf).masked_fill(same, 0).max().item()


def compare(a: Weights, b: Weights, atol: float = 0.0) -> Comparison:
    """Tensor by tensor comparison of ``a`` and ``b`` (called A and B in the lines it returns).

    Every key of either is a difference unless both have it with the same shape and values
    within ``atol``. Except: the projector (``head.*`` of an encoder), the momentum encoder and
    the predictor that one side has and the other, an encoder alone (a timm or MAE file), cannot
    have are not compared (listed in ``not_compared``).
    """
    worst, where, differences, not_compared = 0.0, "", [], []
    alone = {"A": a.momentum is None and a.predictor is None,
             "B": b.momentum is None and b.predictor is None}
    for part in ("base", "momentum", "predictor"):
        x, y = getattr(a, part), getattr(b, part)
        if x is None or y is None:
            if x is not y:
                has, lacks = ("A", "B") if y is None else ("B", "A")
                (not_compared if alone[lacks] else differences).append(f"{part}: only in {has}")
            continue
        for has, lacks, sd, other in (("A", "B", x, y), ("B", "A", y, x)):
            only = sorted(set(sd) - set(other))
            head = [k for k in only if k.startswith("head.")] if alone[lacks] else []
            if head:
                not_compared.append(f"{part}.head.* ({len(head)} tensors): only in {has}")
            differences += [f"{part}.{k}: only in {has}" for k in only if k not in head]
        for k in sorted(set(x) & set(y)):
            if x[k].shape != y[k].shape:
                differences.append(f"{part}.{k}: shape {tuple(x[k].shape)} vs {tuple(y[k].shape)}")
                continue
            diff = _difference(x[k], y[k])
            if diff > atol:
                differences.append(f"{part}.{k}: differs by {diff:.3e}")
            if diff > worst:
                worst, where = diff, f"{part}.{k}"
    return Comparison(worst, where, differences, not_compared)

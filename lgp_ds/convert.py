"""Checkpoint formats in and out, through one canonical form (:class:`Weights`).

In:  ``mae``    official MAE files: ``{'model': encoder}``, with or without ``decoder_*`` and
                ``mask_token`` (also bare state dicts that carry decoder keys)
     ``moco``   official MoCo v3 and grafting-code files: ``{'state_dict': module.base_encoder.*,
                module.momentum_encoder.*, module.predictor.*}``
     ``timm``   a plain timm ViT state dict (``.pth`` or ``.safetensors``)
     ``lgp_ds`` a DeepSpeed checkpoint folder written by lgp_ds (any ZeRO stage and world size),
                consolidated to exact fp32 with DeepSpeed's own ZeRO utilities
Out: ``timm``   encoder state dict for ``timm.create_model(arch, num_classes=0, ...)``
     ``mae``    ``{'model': encoder}`` for MAE's fine-tuning code (``init`` is the same file: an
                lgp_ds grafting initialisation)
     ``moco``   both encoders and the predictor in the official MoCo v3 / grafting layout

Every file is read with ``torch.load(weights_only=True)`` or safetensors: no code in a
checkpoint runs. Outputs are written under a temporary name and renamed when complete.
"""
import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from lgp_ds.models.moco import MAE_ONLY_PREFIXES, GraftModel

FORMATS_IN = ("mae", "moco", "timm", "lgp_ds")
FORMATS_OUT = ("timm", "mae", "init", "moco")
_VIT_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")


@dataclass
class Weights:
    """A MoCo/grafting model or a bare encoder, with timm ViT keys.

    ``base``: encoder (``head.*`` = MoCo projector when present); ``momentum`` and ``predictor``
    where the source has them; ``arch``: timm architecture name when the source records one.
    """
    base: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] | None = None
    predictor: dict[str, torch.Tensor] | None = None
    arch: str | None = None

    def encoder(self, which: str = "base") -> dict[str, torch.Tensor]:
        """The ViT without its projector: ``which`` is ``base`` or ``momentum``."""
        sd = self.base if which == "base" else self.momentum
        if sd is None:
            raise ValueError(f"--encoder {which}: the source has no {which} encoder")
        return {k: v for k, v in sd.items() if not k.startswith("head.")}


def load_file(path: str) -> dict:
    """A checkpoint file as plain containers of tensors; never unpickles code."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors
        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused to load (only tensors and plain containers are "
                         f"accepted, no pickled code): {str(e).splitlines()[0][:300]}") from e


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _keys_hint(obj) -> str:
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    return f"found {keys}"


def detect(path: str, obj=None) -> str:
    """The input format of ``path`` (see the module docstring); ValueError if unknown."""
    if os.path.isdir(path):
        return "lgp_ds"
    obj = load_file(path) if obj is None else obj
    if isinstance(obj, dict):
        if isinstance(obj.get("state_dict"), dict) and any(
                k.startswith(("module.base_encoder.", "base_encoder.")) for k in obj["state_dict"]):
            return "moco"
        if isinstance(obj.get("model"), dict):
            return "mae"
        if all(torch.is_tensor(v) for v in obj.values()) and all(k in obj for k in _VIT_KEYS):
            return "mae" if any(k.startswith(MAE_ONLY_PREFIXES) for k in obj) else "timm"
    raise ValueError(f"{path}: unknown checkpoint layout ({_keys_hint(obj)})")


def read(path: str, fmt: str | None = None) -> Weights:
    """Any supported checkpoint as :class:`Weights` (``fmt`` forces the input format)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path) or fmt == "lgp_ds":
        return _read_lgp_ds(path)
    obj = load_file(path)
    fmt = fmt or detect(path, obj)
    if fmt == "moco":
        sd = obj["state_dict"]
        sd = _strip(sd, "module.") if any(k.startswith("module.") for k in sd) else sd
        return Weights(_strip(sd, "base_encoder."), _strip(sd, "momentum_encoder.") or None,
                       _strip(sd, "predictor.") or None, obj.get("arch"))
    if fmt == "mae":
        sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
        return Weights({k: v for k, v in sd.items() if not k.startswith(MAE_ONLY_PREFIXES)})
    if fmt == "timm":
        return Weights(dict(obj))
    raise ValueError(f"--from {fmt}: not one of {FORMATS_IN}")


@contextlib.contextmanager
def _weights_only_loads():
    """Make DeepSpeed's own checkpoint readers load with ``weights_only=True``.

    Its ZeRO utilities unpickle with ``weights_only=False``; here they run with the safe
    unpickler, which knows only tensors, plain containers and DeepSpeed's plain records (loss
    scaler, ZeRO stage, fragment addresses).
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum,
                                               fragment_address]):
            yield
    finally:
        torch.load = original


def _model_states_file(folder: str) -> str | None:
    """Rank 0's model-states file of a DeepSpeed tag folder (its name differs under ZeRO 3)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _read_lgp_ds(path: str) -> Weights:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from lgp_ds.engine import checkpoint
    path = os.path.abspath(path.rstrip("/"))
    if _model_states_file(path):
        save_dir, tag = os.path.dirname(path), os.path.basename(path)
    else:
        found = checkpoint.find_checkpoint("auto", path)
        if found is None:
            raise ValueError(f"{path}: no complete lgp_ds checkpoint in this folder")
        save_dir, tag = found
    if not checkpoint.is_complete(save_dir, tag):
        raise ValueError(f"{os.path.join(save_dir, tag)}: incomplete checkpoint (no "
                         f"{checkpoint.COMPLETE_MARKER} marker): the save did not finish")
    states = load_file(_model_states_file(os.path.join(save_dir, tag)))
    if "momentum" not in states or "config" not in states:
        raise ValueError(f"{os.path.join(save_dir, tag)}: a DeepSpeed checkpoint, but not one "
                         f"written by lgp_ds (no momentum encoder or config in it)")
    if any(f.endswith("optim_states.pt") for f in os.listdir(os.path.join(save_dir, tag))):
        with _weights_only_loads():
            model = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag)
    else:  # ZeRO 0: the module state is whole in the model file
        model = {k: v.float() for k, v in states["module"].items()}
    cfg = states["config"]
    custom = any(cfg.get(k) is not None for k in ("patch_size", "embed_dim", "depth", "num_heads"))
    return Weights(_strip(model, "base_encoder."), states["momentum"], _strip(model, "predictor."),
                   None if custom else cfg.get("arch"))


def resample_pos_embed(encoder: dict, img_size: int) -> dict:
    """Bicubic resampling of the position embedding to ``img_size`` (as MAE's fine-tuning does)."""
    pe, patch = encoder["pos_embed"], encoder["patch_embed.proj.weight"].shape[-1]
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
        if img_size:
            parts["base_encoder"] = resample_pos_embed(parts["base_encoder"], img_size)
            parts["momentum_encoder"] = resample_pos_embed(parts["momentum_encoder"], img_size)
        sd = {f"module.{p}.{k}": v for p, part in parts.items() for k, v in _cast(part, dtype).items()}
        return {"state_dict": sd, "arch": w.arch}
    sd = w.encoder(encoder)
    sd = _cast(resample_pos_embed(sd, img_size) if img_size else sd, dtype)
    return {"model": sd} if fmt in ("mae", "init") else sd


def write(obj: dict, dst: str, force: bool = False) -> None:
    """Save ``obj`` to ``dst`` (``.safetensors`` for a flat state dict) atomically."""
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists: pass --force to overwrite it")
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        if dst.endswith(".safetensors"):
            if not all(torch.is_tensor(v) for v in obj.values()):
                raise ValueError(f"{dst}: safetensors holds a flat state dict: use --to timm")
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in obj.items()}, tmp)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def vit_from_state(sd: dict, arch: str | None = None) -> VisionTransformer:
    """A headless ViT whose shapes are those of ``sd``.

    ``arch`` names the timm model to build; a name timm does not know (the official MoCo v3 files
    record their own, like ``vit_base``) falls back to the shapes.
    """
    import timm
    width = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    if arch and timm.is_model(arch):
        return timm.create_model(arch, pretrained=False, num_classes=0, img_size=grid * patch)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                             num_heads=max(1, width // 64), num_classes=0,
                             mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                             qkv_bias="blocks.0.attn.qkv.bias" in sd)


def verify(obj: dict, fmt: str, arch: str | None = None) -> dict:
    """Load ``obj`` strictly into the model it is for; return what a user wants to see."""
    if fmt == "moco":
        sd = _strip(obj["state_dict"], "module.")
        base = _strip(sd, "base_encoder.")
        encoder = vit_from_state(base, arch or obj.get("arch"))
        dim, mlp = base["head.6.weight"].shape[0], base["head.0.weight"].shape[0]
        model = GraftModel(encoder, dim, mlp, cross_rank_bn=False)
        model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("momentum_encoder.")})
        model.base_encoder.load_state_dict(_strip(sd, "momentum_encoder."))
        described = model
    else:
        sd = obj["model"] if fmt in ("mae", "init") else obj
        described = vit_from_state(sd, arch)
        described.load_state_dict(sd)  # strict
    tensors = [sd[k] for k in sorted(sd)]
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    vit = described.base_encoder if fmt == "moco" else described
    return {"arch": arch or f"ViT depth {len(vit.blocks)} width {vit.embed_dim} patch "
                            f"{vit.patch_embed.patch_size[0]} img {vit.patch_embed.img_size[0]}",
            "params": sum(t.numel() for t in tensors),
            "dtype": str(tensors[0].dtype).removeprefix("torch."),
            "sha256": digest.hexdigest()[:16]}


def compare(a: Weights, b: Weights) -> tuple[float, str, list[str]]:
    """(largest |difference|, where, keys in only one of them) over the parts both have."""
    worst, where, only = 0.0, "", []
    for part in ("base", "momentum", "predictor"):
        x, y = getattr(a, part), getattr(b, part)
        if x is None or y is None:
            continue
        only += [f"{part}.{k}" for k in sorted(set(x) ^ set(y))]
        for k in sorted(set(x) & set(y)):
            if x[k].shape != y[k].shape:
                only.append(f"{part}.{k} (shape {tuple(x[k].shape)} vs {tuple(y[k].shape)})")
                continue
            diff = (x[k].double() - y[k].double()).abs().max().item() if x[k].numel() else 0.0
            if diff > worst:
                worst, where = diff, f"{part}.{k}"
    return worst, where, only

"""Which timm model a ViT state dict is for.

A state dict does not say which model it is for: the head count of attention is in no tensor
shape, so ``vit_small_patch16_224`` (6 heads) loads MoCo v3's ``vit_small`` (12 heads) strictly
and computes other features. :func:`model_spec` therefore names the exact ``timm.create_model``
call from what the source records (lgp_ds config, MoCo ``arch``, MAE ``args.model``, the record
:mod:`lgp_ds.convert` writes into its outputs) and the shapes, and says when the head count is a
guess.
"""
import functools
import re
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

VIT_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight")

# The official MoCo v3 (vits.py) and grafting-code (models/vits.py) architectures that their
# files name in 'arch': (timm model, heads); None for the ones timm has no model for.
_CONV_STEM = ("MoCo v3's convolutional stem (4 x conv3x3-BN-ReLU + conv1x1, patch_embed.proj.0-12; "
              "11 blocks) has no timm equivalent: it cannot become a timm/MAE ViT")
OFFICIAL_ARCHS = {
    "vit_small": ("vit_small_patch16_224", 12),  # patch 16, width 384, depth 12
    "vit_base": ("vit_base_patch16_224", 12),  # patch 16, width 768, depth 12
    "vit_large": ("vit_large_patch16_224", 16),  # grafting code only: 1024, 24
    "vit_conv_small": None,
    "vit_conv_base": None,
}
_VIT_SMALL_NOTE = ("'vit_small' has 12 heads in MoCo v3's vits.py (used here) but 6 in the "
                   "grafting code's models/vits.py: for a file from the grafting code pass "
                   "--num_heads 6")
# Standard timm ViTs, for guessing the model of a state dict that names none.
_TIMM_FAMILY = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                "vit_large_patch16_224", "vit_huge_patch14_224", "vit_giant_patch14_224")
_SPEC_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")


@functools.lru_cache(maxsize=None)
def timm_defaults(name: str) -> dict:
    """The shapes and head count of timm's ``name`` (built on the meta device: no memory)."""
    import timm
    if not timm.is_model(name):
        raise ValueError(f"arch {name!r}: not a timm model")
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0)
    if not isinstance(m, VisionTransformer):
        raise ValueError(f"arch {name!r}: not a timm VisionTransformer")
    blk = m.blocks[0]
    return {"img_size": m.patch_embed.img_size[0], "patch_size": m.patch_embed.patch_size[0],
            "embed_dim": m.embed_dim, "depth": len(m.blocks), "num_heads": blk.attn.num_heads,
            "mlp_ratio": blk.mlp.fc1.out_features / m.embed_dim,
            "qkv_bias": blk.attn.qkv.bias is not None}


def _shape_spec(sd: dict) -> dict:
    """What the tensor shapes of a ViT state dict determine (all of ``_SPEC_KEYS`` but heads)."""
    if any(k.startswith("patch_embed.proj.0.") for k in sd):
        raise ValueError(f"the encoder has {_CONV_STEM}")
    missing = [k for k in (*VIT_KEYS, "blocks.0.mlp.fc1.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a ViT encoder: no {missing} (found {list(sd)[:8]})")
    width, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    return {"img_size": grid * patch, "patch_size": patch, "embed_dim": width,
            "depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
            "qkv_bias": "blocks.0.attn.qkv.bias" in sd}


def _timm_name(arch: str | None, recorded: bool) -> tuple[str | None, int | None, list[str]]:
    """(timm model, head count it implies, notes) for an architecture name.

    An unknown name is a note when the source ``recorded`` it, and a ValueError when the user
    gave it (a model that does not exist).
    """
    import timm
    if not arch:
        return None, None, []
    if arch in OFFICIAL_ARCHS:
        if OFFICIAL_ARCHS[arch] is None:
            raise ValueError(f"arch {arch!r}: {_CONV_STEM}")
        name, heads = OFFICIAL_ARCHS[arch]
        return name, heads, [_VIT_SMALL_NOTE] if arch == "vit_small" else []
    mae = re.fullmatch(r"(?:mae_)?(vit_[a-z]+_patch\d+)(?:_dec\w*)?", arch)  # MAE's args.model
    if mae and timm.is_model(f"{mae.group(1)}_224"):
        return f"{mae.group(1)}_224", None, []
    if timm.is_model(arch):
        return arch, None, []
    unknown = "neither a timm model nor an official MoCo v3 / MAE one"
    if not recorded:
        raise ValueError(f"--arch {arch!r}: {unknown}")
    return None, None, [f"the source names its architecture {arch!r}, which is {unknown}: the "
                        f"model is inferred from the shapes"]


@dataclass
class ModelSpec:
    """``timm.create_model(name, num_classes=0, **kwargs)`` builds the encoder; ``notes`` say
    what the weights leave open (a guessed head count)."""
    name: str
    kwargs: dict
    shape: dict  # every key of _SPEC_KEYS
    notes: list[str]

    def call(self, checkpoint_path: str | None = None) -> str:
        """The Python expression that builds the model (and loads ``checkpoint_path``)."""
        args = [repr(self.name), "num_classes=0"] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        if checkpoint_path:
            args.append(f"checkpoint_path={checkpoint_path!r}")
        return f"timm.create_model({', '.join(args)})"

    def create(self) -> VisionTransformer:
        import timm
        return timm.create_model(self.name, pretrained=False, num_classes=0, **self.kwargs)

    def describe(self) -> str:
        s = self.shape
        return (f"ViT patch {s['patch_size']}, width {s['embed_dim']}, depth {s['depth']}, "
                f"{s['num_heads']} heads, {s['img_size']} px input")

    def record(self) -> dict:
        """What outputs store so that reading them back gives the same model."""
        return {"timm_model": self.name, "timm_kwargs": dict(self.kwargs)}


def model_spec(sd: dict, arch: str | None = None, num_heads: int | None = None,
               arch_recorded: bool = False) -> ModelSpec:
    """The timm model for the encoder state dict ``sd``.

    ``arch``: architecture name given by the user or, with ``arch_recorded``, recorded by the
    source (timm, official MoCo v3 / grafting or MAE name; an unknown one is refused when given,
    a note when recorded); ``num_heads``: head count recorded or given. The shapes fix
    everything else; a head count that nothing records is a guess, and the notes say so.
    """
    name, arch_heads, notes = _timm_name(arch, arch_recorded)
    shape = _shape_spec(sd)
    if num_heads is not None:
        notes = [n for n in notes if n != _VIT_SMALL_NOTE]
    named = name is not None
    if not named:
        same = [n for n in _TIMM_FAMILY if timm_defaults(n)["embed_dim"] == shape["embed_dim"]]
        same.sort(key=lambda n: timm_defaults(n)["patch_size"] != shape["patch_size"])
        name = same[0] if same else "vit_base_patch16_224"
    base = timm_defaults(name)
    if num_heads is None and arch_heads is not None:
        num_heads = arch_heads
    if num_heads is None and named and base["embed_dim"] == shape["embed_dim"]:
        num_heads = base["num_heads"]
    if num_heads is None:
        same_width = base["embed_dim"] == shape["embed_dim"]
        num_heads = base["num_heads"] if same_width else max(1, shape["embed_dim"] // 64)
        source = f"that of {name}" if same_width else "width/64"
        notes.append(f"num_heads={num_heads} is a guess ({source}; no tensor shape records it): "
                     f"if the model was trained with another head count, convert again with "
                     f"--num_heads N (or --arch NAME)")
    if num_heads < 1 or shape["embed_dim"] % num_heads:
        raise ValueError(f"num_heads={num_heads}: not a positive divisor of the width "
                         f"{shape['embed_dim']}")
    shape["num_heads"] = num_heads
    kwargs = {k: shape[k] for k in _SPEC_KEYS if shape[k] != base[k]}
    return ModelSpec(name, kwargs, shape, notes)


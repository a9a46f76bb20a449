"""The experiment config: a YAML recipe plus ``key=value`` overrides, typed and validated once.

Every key is a field of :class:`Config` with its type; an unknown key or a value of the wrong
type is an error that names the key. The global batch size has one source of truth:
``batch_size`` here, which :func:`resolve_ds_config` writes into the DeepSpeed config (a DeepSpeed
config that states another batch size is refused).
"""
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")


@dataclass
class Config:
    # model: a timm ViT; None keeps the architecture's own value
    arch: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    fused_attn: bool = True
    grad_ckpt: bool = False
    sincos_pos_embed: bool = True
    frozen_patch_embed: bool = True
    proj_dim: int = 256
    mlp_dim: int = 4096
    # grafting
    init: str | None = None  # MIM (MAE) weights; None: plain MoCo v3 from random weights
    tau: float = 0.2
    momentum: float = 0.99  # m0 of the cosine momentum schedule
    num_stages: int = 3
    stage_blrs: list[float] = field(default_factory=lambda: [1.5e-5, 1.5e-5, 1.5e-4])
    anchor_weight: float = 0.0
    anchor_norm: str = "l2"
    anchor_blocks: int | None = None  # None: half the depth
    # optimisation
    batch_size: int | None = None  # global; None: taken from the DeepSpeed config
    optimizer: str = "adamw"  # adamw (torch, fused kernel on GPU) | fused_adam (DeepSpeed, GPU)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    epochs: int = 300
    warmup_epochs: int = 40
    max_steps: int | None = None  # stop early; schedules still span `epochs`
    # data
    data: list[str] | None = None  # WebDataset shard patterns; None: the embedded digits set
    samples_per_epoch: int | None = None  # None: the embedded set's size; required with data
    num_workers: int = 8
    shuffle_buffer: int = 5000
    crop_min: float = 0.08
    # run
    output_dir: str = "runs/graft"
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    resume: str | None = None  # "auto": newest complete checkpoint in output_dir; or a folder

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(key: str, value, hint):
    """Return ``value`` converted to ``hint`` or raise ValueError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            value = [value]  # a single value where a list is expected
        return [_check_type(key, v, item) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ValueError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(cfg: Config) -> None:
    checks = [
        ("anchor_norm", cfg.anchor_norm in ("l1", "l2"), "must be l1 or l2"),
        ("optimizer", cfg.optimizer in ("adamw", "fused_adam"), "must be adamw or fused_adam"),
        ("tau", cfg.tau > 0, "must be positive"),
        ("momentum", 0 <= cfg.momentum <= 1, "must lie in [0, 1]"),
        ("stage_blrs", len(cfg.stage_blrs) == cfg.num_stages,
         f"has {len(cfg.stage_blrs)} values but num_stages={cfg.num_stages}"),
        ("anchor_weight", cfg.anchor_weight == 0 or cfg.init is not None,
         "needs init= (the MIM weights to stay close to)"),
        ("samples_per_epoch", cfg.data is None or cfg.samples_per_epoch is not None,
         "must be given with data= (the number of training samples in the shards)"),
        ("betas", len(cfg.betas) == 2, "needs two values"),
        ("resume", cfg.resume in (None, "auto") or os.path.isdir(cfg.resume),
         "must be 'auto' or an existing checkpoint folder"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} {why}")
    for key in ("img_size", "epochs", "num_stages", "log_every", "save_every", "shuffle_buffer"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} must be positive")


def build_config(values: dict, source: str = "config") -> Config:
    """Config from a mapping; unknown keys and wrong types raise ValueError naming the key."""
    hints = typing.get_type_hints(Config)
    unknown = [k for k in values if k not in hints]
    if unknown:
        close = difflib.get_close_matches(unknown[0], hints, n=1)
        raise ValueError(f"{source}: unknown config key {unknown[0]!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    typed = {k: _check_type(f"{source}: {k}", v, hints[k]) for k, v in values.items()}
    cfg = Config(**typed)
    _validate(cfg)
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    """``["key=value", ...]`` -> {key: value}, the value read as YAML where it is YAML.

    A value that is not valid YAML (a shard pattern ``{a,b}.tar``) stays the string it is.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load_recipe(path: str) -> dict:
    """Mapping from a YAML recipe: a path, or the name of a bundled recipe (``vit_b_graft``)."""
    if not os.path.exists(path):
        bundled = os.path.join(RECIPES_DIR, path if path.endswith(".yaml") else path + ".yaml")
        if not os.path.exists(bundled):
            names = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))
            raise FileNotFoundError(f"recipe {path!r}: no such file and no bundled recipe of that "
                                    f"name (bundled: {', '.join(names)})")
        path = bundled
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys to values")
    return values


def load_config(recipe: str | None, overrides: list[str]) -> Config:
    """Recipe (default: the embedded-data demo) with ``key=value`` overrides applied."""
    recipe = recipe or "digits_demo"
    values = load_recipe(recipe)
    values.update(parse_overrides(overrides))
    return build_config(values, source=recipe)


# DeepSpeed keys that the recipe owns: stating them in the DeepSpeed config is refused.
_RECIPE_OWNED = {"optimizer": "optimizer / weight_decay / betas / stage_blrs",
                 "scheduler": "epochs / warmup_epochs (a per-iteration warmup-cosine schedule)"}


def resolve_ds_config(ds: dict, cfg: Config, world_size: int) -> dict:
    """Copy of the DeepSpeed config ``ds`` with the batch sizes filled in from ``cfg``.

    ``cfg.batch_size`` (global) is the one source of truth; when it is None it is taken from
    ``ds``. Any batch key of ``ds`` that disagrees, or a world size x gradient accumulation that
    does not divide the batch, raises ValueError naming the keys. Sets ``cfg.batch_size``.
    """
    for key, owner in _RECIPE_OWNED.items():
        if key in ds:
            raise ValueError(f"DeepSpeed config key {key!r}: lgp_ds builds it from the recipe "
                             f"({owner}); remove it from the DeepSpeed config")
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") != "none":
            raise ValueError(f"DeepSpeed config key zero_optimization.{key}: offloading is not "
                             f"supported (the momentum EMA and the MIM anchor read the fp32 "
                             f"master weights in place on the device)")
    ds = dict(ds)
    gas = ds.get("gradient_accumulation_steps", 1)
    micro = ds.get("train_micro_batch_size_per_gpu")
    total = ds.get("train_batch_size")
    if cfg.batch_size is None:
        cfg.batch_size = total if total is not None else (
            micro * world_size * gas if micro is not None else None)
        if cfg.batch_size is None:
            raise ValueError("batch_size is not set: give batch_size= in the recipe or an override")
    if total is not None and total != cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} disagrees with the DeepSpeed config's "
                         f"train_batch_size={total}; set it in one place only")
    if cfg.batch_size % (world_size * gas):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by world size {world_size} "
                         f"x gradient_accumulation_steps {gas}")
    if micro is not None and micro * world_size * gas != cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} disagrees with the DeepSpeed config's "
                         f"train_micro_batch_size_per_gpu={micro} x world size {world_size} x "
                         f"gradient_accumulation_steps {gas}")
    # DeepSpeed clips gradients at norm 1.0 unless told otherwise; MoCo v3 and MAE do not clip.
    ds.setdefault("gradient_clipping", 0.0)
    ds.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=gas,
              train_micro_batch_size_per_gpu=cfg.batch_size // (world_size * gas))
    return ds


def load_run_config(recipe: str | None, overrides: list[str], ds_config_path: str):
    """(Config, resolved DeepSpeed config) for an entry point, before any process group exists.

    The world size comes from the launcher's environment (1 without a launcher), so bad input
    fails alike on every rank before any rank starts work.
    """
    cfg = load_config(recipe, overrides)
    try:
        with open(ds_config_path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed_config {ds_config_path}: not valid JSON: {e}") from e
    return cfg, resolve_ds_config(ds, cfg, int(os.environ.get("WORLD_SIZE", 1)))

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
    max_corrupt_run: int = 100  # undecodable samples in a row that stop the run (fewer: skipped)
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
    if isinstance(value, dict):  # YAML reads an unquoted {a,b} as a mapping
        raise ValueError(f"{key}: expected {hint.__name__}, got the YAML mapping {value!r}; "
                         f"quote brace patterns: '{{a,b}}-{{0..9}}.tar'")
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
        ("samples_per_epoch", cfg.data is None or cfg.samples_per_epoch is not None,
         "must be given with data= (the number of training samples in the shards)"),
        ("betas", len(cfg.betas) == 2, "needs two values"),
        ("resume", cfg.resume in (None, "auto") or os.path.isdir(cfg.resume),
         "must be 'auto' or an existing checkpoint folder"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} {why}")
    positive = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "proj_dim", "mlp_dim",
                "epochs", "num_stages", "batch_size", "max_steps", "samples_per_epoch", "log_every",
                "save_every", "shuffle_buffer", "max_corrupt_run")
    for key in positive:  # None (where allowed) means "not set"
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} must be positive")
    for key in ("anchor_weight", "anchor_blocks", "weight_decay", "warmup_epochs", "num_workers"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} must not be negative")
    in_range = [("warmup_epochs", cfg.warmup_epochs <= cfg.epochs, f"exceeds epochs={cfg.epochs}"),
                ("crop_min", 0 < cfg.crop_min <= 1, "must lie in (0, 1]"),
                ("drop_path", 0 <= cfg.drop_path < 1, "must lie in [0, 1)"),
                ("betas", all(0 <= b < 1 for b in cfg.betas), "must lie in [0, 1)"),
                ("stage_blrs", all(b >= 0 for b in cfg.stage_blrs), "must not be negative")]
    for key, ok, why in in_range:
        if not ok:
            raise ValueError(f"config key {key}={getattr(cfg, key)!r} {why}")


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

    A value that is not valid YAML (a shard pattern ``{a,b}-{0..9}.tar``) stays the string it
    is, and so does one that YAML reads as a mapping (``{a.tar,b.tar}``): no key takes a mapping,
    so such a value can only be a brace pattern. A ``[...]`` value that is not a valid YAML list
    is an error: it is a list whose patterns need quotes.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            if value.strip().startswith("["):
                raise ValueError(
                    f"override {pair!r}: not a valid YAML list ({str(e).splitlines()[0]}); quote "
                    f"each item that holds braces or commas, e.g. "
                    f"{key}=\"['train-{{000..099}}.tar', 'extra.tar']\"") from None
            parsed = value
        out[key] = value if isinstance(parsed, dict) else parsed
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


# Keys a resumed run may change: where it writes and logs, how long it runs, where its input
# files are, and switches that leave the numbers alone (num_workers changes which worker reads
# which shard, so the stream after the resume is another, equally shuffled one). Every other
# key defines the run: a resume that changes one is refused.
MAY_CHANGE_ON_RESUME = frozenset({"output_dir", "max_steps", "log_every", "save_every",
                                  "init", "data", "num_workers", "max_corrupt_run", "grad_ckpt",
                                  "fused_attn"})


# DeepSpeed keys that the recipe owns: stating them in the DeepSpeed config is refused.
_RECIPE_OWNED = {"optimizer": "optimizer / weight_decay / betas / stage_blrs",
                 "scheduler": "epochs / warmup_epochs (a per-iteration warmup-cosine schedule)"}


def precision(ds: dict) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the model's dtype under the DeepSpeed config ``ds``."""
    if ds.get("bf16", ds.get("bfloat16", {})).get("enabled"):
        return "bf16"
    return "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"


def run_identity(cfg: Config, ds: dict, mim_digest: str | None = None) -> dict:
    """What defines a run, for a resume to compare: every config key but ``resume`` (how the run
    was started), the DeepSpeed settings that change the numbers or the data position
    (``deepspeed.*``) and, with the MIM anchor on, a digest of the MIM weights it pulls towards
    (``init_digest``: the ``init=`` path may move, its content may not)."""
    zero = ds.get("zero_optimization", {})
    config = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
    return {**config, "init_digest": mim_digest,
            "deepspeed.zero_stage": zero.get("stage", 0), "deepspeed.precision": precision(ds),
            "deepspeed.gradient_accumulation_steps": ds.get("gradient_accumulation_steps", 1),
            "deepspeed.gradient_clipping": ds.get("gradient_clipping", 0.0),
            "deepspeed.communication_data_type": ds.get("communication_data_type"),
            "deepspeed.grad_accum_dtype": ds.get("data_types", {}).get("grad_accum_dtype")}


def _anchor_precision(ds: dict, cfg: Config) -> dict:
    """``ds`` with fp32 gradient accumulation where the MIM anchor needs it.

    DeepSpeed keeps gradients in the model dtype by default. The anchor's gradient (weight 1e-5
    in the ViT-L recipe) added to a bf16 gradient of 1e-2 rounds away entirely, so under bf16/fp16
    the gradients must be held in fp32 (``data_types.grad_accum_dtype``): ZeRO 1 then runs
    DeepSpeed's BF16_Optimizer, ZeRO 2/3 keep fp32 gradient partitions. ZeRO 0 has no fp32
    gradient accumulation in low precision, so it is refused.
    """
    low = precision(ds)
    if cfg.anchor_weight == 0 or low == "fp32":
        return ds
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        raise ValueError(f"anchor_weight={cfg.anchor_weight} with ZeRO stage 0 in {low}: DeepSpeed "
                         f"keeps stage-0 gradients in {low}, which rounds the anchor's gradient "
                         f"away, and has no fp32 gradient accumulation for it; use ZeRO stage 1 or "
                         f"higher (e.g. ds_configs/zero1_{low}.json) or fp32")
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if accum not in (None, "fp32"):
        raise ValueError(f"DeepSpeed config key data_types.grad_accum_dtype={accum!r}: with "
                         f"anchor_weight={cfg.anchor_weight} gradients must be accumulated in fp32 "
                         f"(in {low} the anchor's gradient rounds away); remove the key or set fp32")
    return {**ds, "data_types": {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}}


def resolve_ds_config(ds: dict, cfg: Config, world_size: int) -> dict:
    """Copy of the DeepSpeed config ``ds`` with the batch sizes filled in from ``cfg``.

    ``cfg.batch_size`` (global) is the one source of truth; when it is None it is taken from
    ``ds``. Any batch key of ``ds`` that disagrees, or a world size x gradient accumulation that
    does not divide the batch, raises ValueError naming the keys. Sets ``cfg.batch_size``. Also
    switches on fp32 gradient accumulation where the MIM anchor needs it.
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
    ds = _anchor_precision(dict(ds), cfg)
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

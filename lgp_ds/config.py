"""The experiment config: a YAML recipe plus ``key=value`` overrides, typed and validated once.

Every key is a field of :class:`Config` (a pydantic model) with its type and range; an unknown
key, a value of the wrong type or out of range, or keys that contradict each other are an error
that names the key. The global batch size has one source of truth: ``batch_size`` here, which
:func:`resolve_ds_config` writes into the DeepSpeed config (a DeepSpeed config that states
another batch size is refused).
"""
import difflib
import importlib.util
import json
import os
import types
import typing
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from lgp_ds.dist import launched_world_size

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")

# The pre-training methods (lgp_ds.methods); each recipe names one.
METHODS = ("graft", "moco", "mae", "mtl", "mim2cl_frozen", "cl2mim", "graft_vicreg", "finetune")
# Methods whose init= weights are MIM weights that the anchor may pull the encoder towards.
ANCHORED_METHODS = ("graft", "graft_vicreg", "mim2cl_frozen")
# Methods that keep init='s lower stages frozen and train the upper ones with the other objective.
GRAFTED_METHODS = ("mim2cl_frozen", "cl2mim")

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Weight = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
Rate = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal[METHODS] = "graft"
    # model: a timm ViT; None keeps the architecture's own value
    arch: str = "vit_base_patch16_224"
    img_size: Positive = 224
    patch_size: Positive | None = None
    embed_dim: Positive | None = None
    depth: Positive | None = None
    num_heads: Positive | None = None
    drop_path: Rate = 0.0
    fused_attn: StrictBool = True
    # activation checkpointing: every block (true: the encoder's, and the MAE decoder's), none, or
    # the lowest N encoder blocks (only as many as memory needs: less recomputed in backward);
    # auto: the fewest N that the memory model (lgp_ds.scaling.memory) fits in the device's
    # memory for this run's ZeRO stage, world size and micro-batch (the grafting-step methods)
    grad_ckpt: StrictBool | NonNegative | Literal["auto"] = False
    # regional torch.compile of the transformer blocks (models.vit.compile_blocks) with this
    # backend; aot_eager traces the blocks without generating code (debugging, CPU tests)
    compile_blocks: StrictBool = False
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    sincos_pos_embed: StrictBool = True
    frozen_patch_embed: StrictBool = True
    proj_dim: Positive = 256  # MoCo projector/predictor output; VICReg expander output
    mlp_dim: Positive = 4096  # MoCo projector/predictor hidden width; VICReg expander hidden width
    # MAE (mae, cl2mim, mtl): decoder, masking and target
    decoder_embed_dim: Positive = 512
    decoder_depth: Positive = 8
    decoder_num_heads: Positive = 16
    mask_ratio: Rate = 0.75
    norm_pix_loss: StrictBool = True
    # starting weights and stages
    init: str | None = None  # weights to start from (see the method); None: random
    num_stages: Positive = 3
    stage_blrs: list[Weight] = [1.5e-5, 1.5e-5, 1.5e-4]  # per-256 base LR of each stage
    frozen_stages: NonNegative = 0  # lower stages (embeddings with the first) that do not train
    # contrastive (MoCo v3) and VICReg objectives
    tau: Annotated[float, Field(gt=0)] = 0.2
    momentum: Annotated[float, Field(ge=0, le=1)] = 0.99  # m0 of the cosine momentum schedule
    vicreg_sim: Weight = 25.0  # VICReg invariance, variance and covariance coefficients
    vicreg_var: Weight = 25.0
    vicreg_cov: Weight = 1.0
    cl_weight: Weight = 1.0  # mtl: loss = cl_weight * MoCo loss + mim_weight * MAE loss
    mim_weight: Weight = 1.0
    # distance to the MIM weights (graft, graft_vicreg, mim2cl_frozen)
    anchor_weight: Weight = 0.0
    anchor_norm: Literal["l1", "l2"] = "l2"
    anchor_blocks: NonNegative | None = None  # None: half the depth
    # optimisation
    batch_size: Positive | None = None  # global; None: taken from the DeepSpeed config
    optimizer: Literal["adamw", "fused_adam"] = "adamw"  # fused_adam: DeepSpeed's, GPU only
    weight_decay: Weight = 0.1
    betas: Annotated[list[Rate], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    epochs: Positive = 300
    warmup_epochs: NonNegative = 40
    max_steps: Positive | None = None  # stop early; schedules still span `epochs`
    # data
    data: list[str] | None = None  # WebDataset shard patterns; None: the embedded digits set
    # None: with data= the count in the shards' index.json (required without one; checked by
    # data.pipeline.samples_per_epoch, which reads it), else the embedded set's size
    samples_per_epoch: Positive | None = None
    num_workers: NonNegative = 8
    shuffle_buffer: Positive = 5000
    # every reader (rank x worker) draws shards from all of them with replacement, for runs with
    # more readers than shards; an epoch is still samples_per_epoch // batch_size steps of draws
    resampled_shards: StrictBool = False
    max_corrupt_run: Positive = 100  # undecodable samples in a row that stop the run
    crop_min: Fraction = 0.08  # smallest crop (area fraction) of the two contrastive views
    mae_crop_min: Fraction = 0.2  # smallest crop of the MAE view (mae, cl2mim, mtl)
    # where the views' augmentation runs: all in the DataLoader workers (torchvision), or only
    # the crops there (uint8, reduced JPEG decode) and the colour, blur and normalisation per
    # sample on the device, for GPU runs (lgp_ds.data.transforms): views of the same distribution
    augment_on: Literal["cpu", "device"] = "cpu"
    # what reads, decodes and crops the training images: webdataset (PIL in the DataLoader
    # workers) or NVIDIA DALI (nvJPEG on the GPU, its CPU decoder without one; num_workers is
    # then its thread count), for machines short of CPU cores (lgp_ds.data.dali): the same views
    # with augment_on=device; pip install -e ".[dali]"
    input_backend: Literal["webdataset", "dali"] = "webdataset"
    subset: str | None = None  # SimCLR-style file of image names: train on those samples only
    subset_fraction: Fraction | None = None  # embedded set: a class-balanced subset, seed 0
    # fine-tuning (method=finetune; FINETUNE_KEYS): off by default, the recipes set MAE's values
    num_classes: Positive = 1000
    pooling: Literal["cls", "avg"] = "avg"  # CLS token after the final norm, or MAE's mean+fc_norm
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 1.0  # LR x decay ** (depth + 1 - layer)
    freeze_blocks: NonNegative = 0  # partial fine-tuning: embeddings and the first k blocks frozen
    from_projector_layer: Annotated[int, Field(ge=0, le=2)] = 0  # init's projector units kept
    mixup: Weight = 0.0  # timm Mixup's mixup alpha (0: off)
    cutmix: Weight = 0.0  # timm Mixup's cutmix alpha (0: off)
    mixup_prob: Fraction = 1.0  # probability of mixing a batch
    mixup_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5  # cutmix instead of mixup
    smoothing: Rate = 0.0  # label smoothing
    auto_augment: str | None = None  # timm policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    re_prob: Rate = 0.0  # random erasing probability
    val_data: list[str] | None = None  # held-out shards for top-1; None: the embedded val split
    eval_every: Positive | None = None  # top-1 every N steps (always at the end)
    # online kNN monitor: every knn_every steps (and at the last), cosine kNN top-1 (%) of the
    # base encoder's class token from knn_train_data to knn_val_data (None: the embedded set's
    # train / held-out val split; both required with data=)
    knn_every: NonNegative = 0  # 0: off
    knn_k: Positive = 20
    knn_t: Annotated[float, Field(gt=0)] = 0.07
    knn_train_data: list[str] | None = None
    knn_val_data: list[str] | None = None
    # run
    output_dir: str = "runs/graft"
    seed: int = 0
    log_every: Positive = 10
    save_every: Positive = 1000
    resume: str | None = None  # "auto": newest complete checkpoint in output_dir; or a folder
    # faults (lgp_ds.engine.faults)
    keep_checkpoints: NonNegative = 0  # keep the newest k complete checkpoints; 0: keep all
    # optimizer steps in a row whose loss (or, bf16, gradient) is not finite: each is skipped,
    # one more stops the run
    max_nonfinite_steps: NonNegative = 10
    # seconds a collective may wait for the slowest rank before the run stops with an error; it
    # must cover the slowest checkpoint write and evaluation (rank 0 writes alone meanwhile)
    collective_timeout_s: Annotated[float, Field(gt=0)] = 1800.0

    def to_dict(self) -> dict:
        return self.model_dump()

    @model_validator(mode="before")
    @classmethod
    def _as_yaml_gives_them(cls, values):
        """What YAML makes of a user's intent: a single value where a list is expected is that
        list; an unquoted ``{a,b}`` pattern is a mapping (refused with how to quote it); and
        ``true`` is not a number (pydantic would take it as 1)."""
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if field is None or value is None:
                continue
            kinds = _kinds(field.annotation)
            if isinstance(value, dict):
                raise ValueError(f"config key {key}: got the YAML mapping {value!r}; quote brace "
                                 f"patterns: '{{a,b}}-{{0..9}}.tar'")
            if isinstance(value, bool) and bool not in kinds:
                expected = " or ".join(k.__name__ for k in kinds if k is not type(None))
                raise ValueError(f"config key {key}={value!r}: expected {expected}, not a boolean")
            if list in kinds and not isinstance(value, list):
                values[key] = [value]
        return values

    @model_validator(mode="after")
    def _consistent(self):
        checks = [
            ("anchor_weight", self.anchor_weight == 0 or self.method in ANCHORED_METHODS,
             f"pulls towards MIM weights, which only {', '.join(ANCHORED_METHODS)} start from"),
            ("init", self.init is not None or self.method not in GRAFTED_METHODS,
             f"must name the weights that method={self.method} grafts its upper stages onto"),
            ("frozen_stages", self.frozen_stages > 0 or self.method not in GRAFTED_METHODS,
             f"must be positive for method={self.method} (its lower stages stay as init= has "
             f"them)"),
            ("frozen_stages", self.frozen_stages < self.num_stages,
             f"must be below num_stages={self.num_stages} (the top stage trains)"),
            ("frozen_patch_embed", not (self.frozen_patch_embed and self.method in ("mae", "mtl")),
             f"would keep MAE's patch projection at its random start: method={self.method} "
             f"trains it (set frozen_patch_embed=false, as its recipes do)"),
            ("decoder_embed_dim", self.decoder_embed_dim % self.decoder_num_heads == 0,
             f"is not divisible by decoder_num_heads={self.decoder_num_heads}"),
            ("decoder_embed_dim", self.decoder_embed_dim % 4 == 0,
             "must be a multiple of 4 (its 2-D sin-cos position table)"),
            ("embed_dim", self.embed_dim is None or self.num_heads is None
             or self.embed_dim % self.num_heads == 0,
             f"is not divisible by num_heads={self.num_heads}"),
            ("stage_blrs", len(self.stage_blrs) == self.num_stages,
             f"has {len(self.stage_blrs)} values but num_stages={self.num_stages}"),
            ("warmup_epochs", self.warmup_epochs <= self.epochs, f"exceeds epochs={self.epochs}"),
            ("samples_per_epoch", self.samples_per_epoch is None
             or (self.subset is None and self.subset_fraction is None),
             "and a subset: an epoch is then the subset's size (leave samples_per_epoch unset)"),
            ("subset_fraction", self.subset_fraction is None or self.subset is None,
             "and subset= both name the subset: give one"),
            ("subset_fraction", self.subset_fraction is None or self.data is None,
             "draws from the embedded set's labels; with data= give a subset file (subset=)"),
            ("input_backend", self.input_backend == "webdataset" or self.method != "finetune",
             "applies to pre-training: method=finetune's timm transform (RandAugment, random "
             "erasing) runs on the CPU"),
            ("input_backend", self.input_backend == "webdataset" or self.augment_on == "device",
             "makes only the views' crops: set augment_on=device too, whose device part adds "
             "their colour, blur and normalisation"),
            ("input_backend", self.input_backend == "webdataset" or not (
                self.resampled_shards or self.subset or self.subset_fraction),
             "reads every sample of its own shards on each rank: resampled_shards, subset and "
             "subset_fraction need input_backend=webdataset"),
            ("input_backend", self.input_backend == "webdataset" or dali_installed(),
             "needs NVIDIA DALI: pip install -e \".[dali]\" (with CUDA 13: pip install "
             "nvidia-dali-cuda130)"),
            ("augment_on", self.augment_on == "cpu" or self.method != "finetune",
             "applies to pre-training: method=finetune's timm transform (RandAugment, random "
             "erasing) runs on the CPU"),
            ("val_data", self.method != "finetune" or self.data is None or self.val_data,
             "must name the held-out shards that method=finetune measures top-1 on, with data="),
            *((key, self.method == "finetune" or getattr(self, key) == default,
               "applies to method=finetune only") for key, default in FINETUNE_KEYS.items()),
            ("knn_every", self.knn_every == 0 or self.data is None
             or (self.knn_train_data is not None and self.knn_val_data is not None),
             f"with data= needs knn_train_data= and knn_val_data= (the labelled images the kNN "
             f"monitor votes with and those it classifies; given: {self.knn_train_data!r} and "
             f"{self.knn_val_data!r}): the embedded digits set stands in only without data="),
            ("grad_ckpt", self.grad_ckpt != "auto" or self.method in AUTO_CHECKPOINTING,
             f"sizes checkpointing with the grafting step's memory model, which covers methods "
             f"{', '.join(AUTO_CHECKPOINTING)}: give a number of blocks"),
            ("resume", self.resume in (None, "auto") or os.path.isdir(self.resume),
             "must be 'auto' or an existing checkpoint folder"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"config key {key}={getattr(self, key)!r} {why}")
        return self


# Methods whose model the memory model of grad_ckpt=auto counts (a MoCo-style grafting model)
AUTO_CHECKPOINTING = ("graft", "moco", "mim2cl_frozen")

# Keys that only fine-tuning reads, with their defaults: another method refuses other values.
FINETUNE_KEYS = {k: Config.model_fields[k].default for k in (
    "num_classes", "pooling", "layer_decay", "freeze_blocks", "from_projector_layer", "mixup",
    "cutmix", "mixup_prob", "mixup_switch_prob", "smoothing", "auto_augment", "re_prob",
    "val_data", "eval_every")}


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (``input_backend: dali``), without importing it."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # not even the ``nvidia`` namespace package
        return False


def _kinds(annotation) -> set:
    """The plain types an annotation admits: ``list[float] | None`` -> {list, NoneType}."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if typing.get_origin(annotation) is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is Literal:
        return {str}
    return {typing.get_origin(annotation) or annotation}


def _error_lines(error: ValidationError) -> str:
    """pydantic's errors as ``config key KEY=VALUE: what is wrong``, one per offending key."""
    lines = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # the validators above already name the key
            lines.append(message)
            continue
        key = e["loc"][0]
        where = "".join(f"[{i}]" for i in e["loc"][1:])
        lines.append(f"config key {key}{where}={e['input']!r}: {message}")
    return "; ".join(lines)


def build_config(values: dict, source: str | None = None) -> Config:
    """Config from a mapping; unknown keys and bad values raise ValueError naming the key (and
    the recipe ``source`` they come from)."""
    where = f"{source}: " if source else ""
    unknown = [k for k in values if k not in Config.model_fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], Config.model_fields, n=1)
        raise ValueError(f"{where}unknown config key {unknown[0]!r}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    try:
        return Config.model_validate(values)
    except ValidationError as e:
        raise ValueError(where + _error_lines(e)) from None


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


def load_recipe(path: str, _seen: tuple = ()) -> dict:
    """Mapping from a YAML recipe: a path, or the name of a bundled recipe (``vit_b_graft``).

    ``extends: NAME`` in a recipe starts from recipe NAME (a bundled name, or a path relative to
    the recipe's folder) and overrides its keys.
    """
    if not os.path.exists(path):
        bundled = os.path.join(RECIPES_DIR, path if path.endswith(".yaml") else path + ".yaml")
        if not os.path.exists(bundled):
            names = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))
            raise FileNotFoundError(f"recipe {path!r}: no such file and no bundled recipe of that "
                                    f"name (bundled: {', '.join(names)})")
        path = bundled
    if os.path.realpath(path) in _seen:
        raise ValueError(f"recipe {path}: 'extends' goes round in a circle")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys to values")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    near = os.path.join(os.path.dirname(path), str(parent))
    base = load_recipe(near if os.path.exists(near) else str(parent),
                       _seen + (os.path.realpath(path),))
    return {**base, **values}


def load_config(recipe: str | None, overrides: list[str]) -> Config:
    """Recipe (default: the embedded-data demo) with ``key=value`` overrides applied."""
    recipe = recipe or "digits_demo"
    values = load_recipe(recipe)
    values.update(parse_overrides(overrides))
    return build_config(values, source=recipe)


# Keys a resumed run may change: where it writes and logs, how long it runs, where its input
# files are, and switches that leave the numbers alone (num_workers changes which worker reads
# which shard, so the stream after the resume is another, equally shuffled one: the rest of the
# epoch comes from the head of its stream, see data.pipeline.TrainData.resume). Every other
# key defines the run: a resume that changes one is refused.
MAY_CHANGE_ON_RESUME = frozenset({"output_dir", "max_steps", "log_every", "save_every",
                                  "init", "data", "num_workers", "max_corrupt_run", "grad_ckpt",
                                  "fused_attn", "compile_blocks", "compile_backend", "val_data",
                                  "eval_every", "knn_every", "knn_k", "knn_t", "knn_train_data", "knn_val_data",
                                  "keep_checkpoints", "max_nonfinite_steps",
                                  "collective_timeout_s"})
# run_identity keys a resume on another world size may change besides: the accumulation (where
# the DeepSpeed config states another, so that world size x accumulation divides the global
# batch, which stays). The world size and micro-batch are no part of a run's identity.
MAY_CHANGE_WITH_WORLD_SIZE = frozenset({"deepspeed.gradient_accumulation_steps"})


# DeepSpeed keys that the recipe owns: stating them in the DeepSpeed config is refused.
_RECIPE_OWNED = {"optimizer": "optimizer / weight_decay / betas / stage_blrs",
                 "scheduler": "epochs / warmup_epochs (a per-iteration warmup-cosine schedule)"}


def _bf16_section(ds: dict) -> dict:
    """The DeepSpeed config's bf16 section (``bfloat16`` is DeepSpeed's older name for it)."""
    return ds.get("bf16", ds.get("bfloat16", {}))


def precision(ds: dict) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the model's dtype under the DeepSpeed config ``ds``."""
    if _bf16_section(ds).get("enabled"):
        return "bf16"
    return "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"


def run_identity(cfg: Config, ds: dict, init_digest: str | None = None,
                 epoch_samples: int | None = None) -> dict:
    """What defines a run, for a resume to compare: every config key but ``resume`` (how the run
    was started), the DeepSpeed settings that change the numbers or the data position
    (``deepspeed.*``) and a digest of the encoder weights ``init=`` gave it (``init_digest``:
    the path may move, its content may not: a run grafted from other MIM weights, or pulled
    towards them by the anchor, is another run) and the samples of an epoch as resolved
    (``epoch_samples``: with ``data=`` and no ``samples_per_epoch`` it comes from the shards'
    index, so other shards may change the epoch, hence the LR and momentum schedules)."""
    zero = ds.get("zero_optimization", {})
    config = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
    return {**config, "init_digest": init_digest, "epoch_samples": epoch_samples,
            "deepspeed.zero_stage": zero.get("stage", 0), "deepspeed.precision": precision(ds),
            "deepspeed.gradient_accumulation_steps": ds.get("gradient_accumulation_steps", 1),
            "deepspeed.gradient_clipping": ds.get("gradient_clipping", 0.0),
            "deepspeed.communication_data_type": ds.get("communication_data_type"),
            "deepspeed.grad_accum_dtype": ds.get("data_types", {}).get("grad_accum_dtype")}


def offloads_optimizer(ds: dict) -> bool:
    """Whether the DeepSpeed config ``ds`` keeps optimizer states and fp32 masters on the host
    (ZeRO-Offload), where DeepSpeed steps them with its own CPU Adam."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device",
                                                                            "none") != "none"


def _check_offload(zero: dict) -> None:
    """ZeRO-Offload as lgp_ds supports it: optimizer states and fp32 masters to the host memory
    (``cpu``) under ZeRO 1-3, parameters as well under ZeRO 3. The momentum EMA and the MIM
    anchor read every fp32 master of a rank where it lives, all in one place."""
    for key in ("cpu_offload", "cpu_offload_param"):  # DeepSpeed's deprecated spellings
        if key in zero:
            raise ValueError(f"DeepSpeed config key zero_optimization.{key} is deprecated; use "
                             f'zero_optimization.offload_optimizer / offload_param {{"device": '
                             f'"cpu"}}')
    stage = zero.get("stage", 0)
    needs = {"offload_optimizer": ((1, 2, 3), "stage 0 has no ZeRO-Offload"),
             "offload_param": ((3,), "stages 1 and 2 ignore it and keep the parameters on the "
                                     "device; offload_optimizer moves the fp32 masters and "
                                     "optimizer states")}
    for key, (stages, why) in needs.items():
        offload = zero.get(key, {})
        device = offload.get("device", "none")
        if device == "none":
            continue
        if device != "cpu":
            raise ValueError(f"DeepSpeed config key zero_optimization.{key}.device={device!r}: "
                             f"lgp_ds supports 'cpu' only (NVMe offload is neither supported nor "
                             f"tested: the momentum EMA and the MIM anchor read the fp32 master "
                             f"weights in memory)")
        if stage not in stages:
            raise ValueError(f"DeepSpeed config key zero_optimization.{key} with ZeRO stage "
                             f"{stage}: it needs stage {' or '.join(map(str, stages))} ({why})")
        for option, default in (("ratio", 1.0), ("super_offload", False)):
            if offload.get(option, default) != default:
                raise ValueError(f"DeepSpeed config key zero_optimization.{key}.{option}="
                                 f"{offload[option]!r}: not supported by lgp_ds (all of a rank's "
                                 f"fp32 masters must be on the host); remove it")


def _check_gradient_checks(ds: dict) -> None:
    """Who finds non-finite gradients (lgp_ds.engine.faults): turning DeepSpeed's ZeRO 1/2
    checks off (``compute_grad_norm``, ``bf16.check_grad_overflow``), as the shipped ZeRO 1/2
    configs do, hands the check to lgp_ds, which reads the gradient partitions on the device
    at the accumulation boundary: not under ZeRO 0 or 3, where DeepSpeed refuses
    ``compute_grad_norm``, nor with ``offload_optimizer``, where the gradients are on the host.
    lgp_ds steps (the check, the MIM anchor, the momentum EMA) at DeepSpeed's accumulation
    boundary, which ``managed_gradient_accumulation: false`` moves into ``engine.step()``."""
    if ds.get("managed_gradient_accumulation", True) is False:
        raise ValueError("DeepSpeed config key managed_gradient_accumulation=false: lgp_ds "
                         "adds the MIM anchor's gradient, checks the gradients and updates the "
                         "momentum encoder at DeepSpeed's accumulation boundary, which that "
                         "setting hides until engine.step(); remove it (gradient_accumulation_"
                         "steps sets the accumulation)")
    zero = ds.get("zero_optimization", {})
    stage, offload = zero.get("stage", 0), offloads_optimizer(ds)
    if zero.get("compute_grad_norm", True) is False:
        if stage not in (1, 2) or offload:
            where = f"ZeRO stage {stage}" if stage not in (1, 2) else "offload_optimizer"
            raise ValueError(f"DeepSpeed config key zero_optimization.compute_grad_norm=false "
                             f"with {where}: DeepSpeed computes the gradient norm there (it "
                             f"supports the key under ZeRO 1/2 on the device only); remove it")
        if ds.get("gradient_clipping", 0.0) > 0:
            raise ValueError(f"DeepSpeed config key gradient_clipping={ds['gradient_clipping']} "
                             f"with zero_optimization.compute_grad_norm=false: clipping needs "
                             f"the norm; remove one of them")
    if stage in (1, 2) and offload and _bf16_section(ds).get("check_grad_overflow") is False:
        raise ValueError("DeepSpeed config key bf16.check_grad_overflow=false with "
                         "offload_optimizer: no one would check the gradients for NaN or "
                         "infinity (lgp_ds checks them in DeepSpeed's stead on the device only); "
                         "remove the key")


def _anchor_precision(ds: dict, cfg: Config) -> dict:
    """``ds`` with fp32 gradient accumulation where the MIM anchor needs it.

    DeepSpeed keeps gradients in the model dtype by default. The anchor's gradient (weight 1e-5
    in the ViT-L recipe) added to a bf16 gradient of 1e-2 rounds away entirely, so under bf16/fp16
    the gradients must be held in fp32 (``data_types.grad_accum_dtype``): ZeRO 1 then runs
    DeepSpeed's BF16_Optimizer (its ZeRO 1 optimizer with offload_optimizer, which keeps fp32
    gradients on the host), ZeRO 2/3 keep fp32 gradient partitions. ZeRO 0 has no fp32
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


def _bf16_optimizer_norm(ds: dict) -> dict:
    """``ds`` without ``zero_optimization.compute_grad_norm`` where DeepSpeed runs its
    BF16_Optimizer (bf16 ZeRO 1 with fp32 gradient accumulation on the device, which the MIM
    anchor switches on): that optimizer always computes and checks the gradient norm, and
    refuses the key that the shipped ZeRO 1 config sets."""
    zero = ds.get("zero_optimization", {})
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if (precision(ds) == "bf16" and zero.get("stage", 0) == 1 and accum == "fp32"
            and not offloads_optimizer(ds) and "compute_grad_norm" in zero):
        ds = {**ds, "zero_optimization": {k: v for k, v in zero.items()
                                          if k != "compute_grad_norm"}}
    return ds


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
    _check_offload(ds.get("zero_optimization", {}))
    _check_gradient_checks(ds)
    if offloads_optimizer(ds) and cfg.optimizer != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer} with DeepSpeed config key "
                         f"zero_optimization.offload_optimizer: the host steps the fp32 masters "
                         f"with DeepSpeed's CPU AdamW; use optimizer=adamw")
    ds = _bf16_optimizer_norm(_anchor_precision(dict(ds), cfg))
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
    # The global batch wins on every world size (a resume on another included): the
    # micro-batch follows from it, and a stated one that no longer fits is refused.
    if cfg.batch_size % (world_size * gas):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by world size {world_size} "
                         f"x gradient_accumulation_steps {gas}; the global batch is kept on every "
                         f"world size: use one that divides it, or set gradient_accumulation_steps "
                         f"in the DeepSpeed config so that world size x accumulation does")
    if micro is not None and micro * world_size * gas != cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} disagrees with the DeepSpeed config's "
                         f"train_micro_batch_size_per_gpu={micro} x world size {world_size} x "
                         f"gradient_accumulation_steps {gas}; the global batch wins: remove "
                         f"train_micro_batch_size_per_gpu (it follows: "
                         f"{cfg.batch_size // (world_size * gas)} here), or set "
                         f"gradient_accumulation_steps so that they agree")
    per_rank = cfg.batch_size // (world_size * gas)
    if cfg.method == "finetune" and (cfg.mixup > 0 or cfg.cutmix > 0) and per_rank % 2:
        raise ValueError(f"mixup={cfg.mixup} / cutmix={cfg.cutmix}: timm's Mixup mixes each image "
                         f"with another of its rank's micro-batch, which must be even; it is "
                         f"batch_size={cfg.batch_size} / (world size {world_size} x "
                         f"gradient_accumulation_steps {gas}) = {per_rank}")
    # DeepSpeed clips gradients at norm 1.0 unless told otherwise; MoCo v3 and MAE do not clip.
    ds.setdefault("gradient_clipping", 0.0)
    ds.update(train_batch_size=cfg.batch_size, gradient_accumulation_steps=gas,
              train_micro_batch_size_per_gpu=per_rank)
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
    return cfg, resolve_ds_config(ds, cfg, launched_world_size())

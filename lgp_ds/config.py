"""The experiment config: a YAML recipe plus ``key=value`` overrides, typed and validated once.

Every key is a field of :class:`Config` (a pydantic model) with its type and range; an unknown
key, a value of the wrong type or out of range, or keys that contradict each other are an error
that names the key. The global batch size has one source of truth: ``batch_size`` here, which
:func:`lgp_ds.ds_config.resolve_ds_config` writes into the DeepSpeed config (a DeepSpeed config
that states another batch size is refused).
"""
import difflib
import importlib.util
import os
import types
import typing
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator


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

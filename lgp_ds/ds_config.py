"""The DeepSpeed config as lgp_ds runs it: checked against the experiment config and
completed from it, once, before any process group exists.

The recipe owns the optimizer, the schedule and the global batch (:func:`resolve_ds_config`
writes the batch keys; a DeepSpeed config that states another batch, an optimizer or a
scheduler is refused). Settings that lgp_ds cannot honour (NVMe offload, DeepSpeed's gradient
checks turned off where nobody would check) are refused up front with the key named, rather
than failing late inside DeepSpeed; what DeepSpeed itself would refuse or ignore is named too
(:mod:`lgp_ds.deepspeed_schema`). :func:`run_identity` says what of a run a resume must keep.
"""
import json

from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from lgp_ds import deepspeed_schema
from lgp_ds.config import Config, load_config
from lgp_ds.dist import launched_world_size

# run_identity keys a resume on another world size may change besides: the accumulation (where
# the DeepSpeed config states another, so that world size x accumulation divides the global
# batch, which stays). The world size and micro-batch are no part of a run's identity.
MAY_CHANGE_WITH_WORLD_SIZE = frozenset({"deepspeed.gradient_accumulation_steps"})


# DeepSpeed keys that the recipe owns: stating them in the DeepSpeed config is refused.
_RECIPE_OWNED = {"optimizer": "optimizer / weight_decay / betas / stage_blrs",
                 "scheduler": "epochs / warmup_epochs (a per-iteration warmup-cosine schedule)"}


def precision(ds: dict) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the model's dtype under the DeepSpeed config ``ds``
    (its sections read as DeepSpeed reads them: ``"enabled": "false"`` is off)."""
    bf16, fp16 = deepspeed_schema.bf16(ds).enabled, deepspeed_schema.fp16(ds).enabled
    if bf16 and fp16:
        raise ValueError("DeepSpeed config keys bf16.enabled and fp16.enabled are both true: "
                         "enable one of them")
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


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


def _check_stage(zero) -> None:
    """The ZeRO section a mapping, its stage an integer (DeepSpeed reads ``"3"`` as stage 3,
    lgp_ds's comparisons would not)."""
    if not isinstance(zero, dict):
        raise ValueError(f"DeepSpeed config key zero_optimization={zero!r}: give a mapping, e.g. "
                         f'{{"stage": 2}}')
    stage = zero.get("stage", 0)
    if type(stage) is not int or not 0 <= stage <= 3:
        raise ValueError(f"DeepSpeed config key zero_optimization.stage={stage!r}: give an "
                         f"integer from 0 to 3")


def _check_zero(zero: dict) -> None:
    """The ZeRO section as DeepSpeed reads it (its own model: a wrong key or value is named here,
    not late inside ``deepspeed.initialize``; aliases and ``"false"`` read as DeepSpeed reads
    them), without the settings whose effects lgp_ds cannot take: DeepSpeed's round-robin
    gradient order, and its own choice of the modules that ZeRO 3 gathers whole."""
    parsed = deepspeed_schema.parsed("zero_optimization", DeepSpeedZeroConfig, zero)
    if parsed.round_robin_gradients:
        raise ValueError("DeepSpeed config key zero_optimization.round_robin_gradients=true: not "
                         "supported by lgp_ds (DeepSpeed 0.19.8 then maps parameters to the wrong "
                         "places of the fp32 master partitions, which the MIM anchor and the "
                         "exact initial weights read); remove it")
    if parsed.stage == 3 and parsed.module_granularity_threshold > 0:
        raise ValueError(f"DeepSpeed config key zero_optimization.stage3_module_granularity_"
                         f"threshold={parsed.module_granularity_threshold}: lgp_ds chooses the "
                         f"modules that ZeRO 3 gathers whole itself (each transformer block whose "
                         f"backward allows it; DeepSpeed's choice takes in the whole model, whose "
                         f"backward then fails); remove it")


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
    if stage in (1, 2) and offload and not deepspeed_schema.bf16(ds).check_grad_overflow:
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
    deepspeed_schema.check_batch_keys(ds)
    _check_stage(ds.get("zero_optimization", {}))
    _check_offload(ds.get("zero_optimization", {}))
    if offloads_optimizer(ds) and cfg.optimizer != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer} with DeepSpeed config key "
                         f"zero_optimization.offload_optimizer: the host steps the fp32 masters "
                         f"with DeepSpeed's CPU AdamW; use optimizer=adamw")
    ds = _bf16_optimizer_norm(_anchor_precision(dict(ds), cfg))
    _check_gradient_checks(ds)  # as DeepSpeed will see them (the anchor may change who checks)
    _check_zero(ds.get("zero_optimization", {}))  # after lgp_ds's own, more telling refusals
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
    deepspeed_schema.check_reads(ds)  # last: lgp_ds's own refusals say more
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

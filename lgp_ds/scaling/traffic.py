"""The collectives of one optimizer step of the grafting step, per ZeRO stage, as lgp_ds and
DeepSpeed 0.19 issue them with the shipped bf16 configs (ds_configs/zero{1,2,3}_bf16.json; ZeRO 0
is ``"stage": 0`` with bf16).

One step on each rank (micro-batch ``batch``, two views, no gradient accumulation):

- cross-rank BatchNorm (:class:`lgp_ds.models.heads.CrossRankBatchNorm1d`): per BN layer and call,
  an all-reduce of [1 + C] (count and sums) and one of [C] (centred squares), fp32; the same two
  again in backward. The engine runs its 5 BNs (projector 3, predictor 2) once per view with
  backward, the momentum encoder its projector's 3 once per view without.
- the contrastive keys: ``contrastive_loss`` all-gathers k [batch, key_dim] in fp32 (it
  normalises in fp32 before gathering), once for each of the two loss terms.
- gradients of the trained parameters, bf16 (DeepSpeed reduces in the model dtype, also where
  it accumulates them in fp32): ZeRO 0 an all-reduce after backward; ZeRO 1 and 2 an all-reduce
  too, not a reduce-scatter (DeepSpeed's ``use_multi_rank_bucket_allreduce``, on by default,
  all-reduces each bucket and each rank keeps its partition), during backward (``overlap_comm``,
  which the shipped configs set, reduces from the gradient hooks) but for ZeRO 1 with the MIM
  anchor: its fp32 gradients make it DeepSpeed's BF16_Optimizer, which all-reduces after
  backward; ZeRO 3 a reduce-scatter during backward. "During backward" holds for whole buckets
  only: DeepSpeed reduces a bucket when ``reduce_bucket_size`` elements of gradients fill it,
  and the last one, full or not, after the last gradient, when the backward has ended; a model
  whose trained parameters fit one bucket (ViT-B's, under 2e8) reduces none during backward.
- parameters, bf16: ZeRO 1/2 all-gather the updated trained parameters after the step, one call
  per flat param group. ZeRO 3 gathers every tensor over ``stage3_param_persistence_threshold``
  elements where it is used: in the forward pass, which takes both views at once
  (:func:`lgp_ds.models.heads.apply_to_views`), in the backward pass (trained tensors only: the
  frozen patch projection has no backward), and with activation checkpointing again for the
  recomputed forward; the persistent small tensors are all-gathered after the step instead, one call
  per tensor (``_allgather_params_coalesced``). Counted per use, this is an upper bound: DeepSpeed
  keeps a gathered tensor whose next use lies within ``stage3_max_reuse_distance`` elements (1e9 by
  default, as the shipped config leaves it) or that it prefetched for that use, down to one gather
  per step (a tiny model on 2 CPU ranks: one forward pass), at the price of holding the gathered
  tensors.
- the momentum encoder (:mod:`lgp_ds.engine.momentum`): ZeRO 0 holds whole masters, no traffic.
  ZeRO 1/2 (:mod:`lgp_ds.engine.sharded_ema`): each rank updates the fp32 EMA of its share of
  the optimizer's flat groups from its fp32 masters; one bf16 all-gather per group that holds a
  Linear or Conv2d weight of the encoder (the whole group, predictor included) and one fp32
  all-reduce of the encoder's other trained tensors rebuild the compute copy on every rank
  (fp32 all-gathers of the groups would send twice the bytes). ZeRO 3: the momentum encoder's
  forward (both views at once) all-gathers all of it (:mod:`lgp_ds.engine.partitioned_forward`):
  the Linear and Conv2d weights in bf16, a call for those outside the blocks and one per block,
  the rest (norms, biases, tokens) in one fp32 call; its EMA needs no communication.
- the MIM anchor (recipes with ``anchor_weight`` > 0) under ZeRO 1-3: one fp64 all-reduce of
  the anchored tensors' partial norms.

A few scalar all-reduces per step (the fault flags, lgp_ds's or DeepSpeed's gradient check,
DeepSpeed's norm) are left out.

Collective algorithms assumed: ring all-reduce sends 2(n-1)/n x size per rank, reduce-scatter
and all-gather (n-1)/n x size, where size is the whole tensor (all ranks' data). On 2 CPU ranks
the collectives a tiny model's step issues match these counts (tests/test_scaling.py).
"""
import math
from dataclasses import dataclass

from .counts import ModelCounts

# Bytes per element
BF16, FP32, FP64 = 2, 4, 8
BYTES = {"bf16": BF16, "fp32": FP32}
# The shipped configs' values (ds_configs/zero*_bf16.json)
REDUCE_BUCKET = 200_000_000  # reduce_bucket_size (elements); allgather_bucket_size is the same
PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold
PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size (also DeepSpeed's default)
VIEWS = 2
PASSES = 1  # both views through each encoder in one pass (lgp_ds.models.heads.apply_to_views)
PARAM_GROUPS = 6  # a weight-decay and a no-decay group per stage, 3 stages (ZeRO 1/2 flat groups)

# Compute that a collective may run under (a share of the step's compute; see timing.py)
BACKWARD, ENGINE, MOMENTUM = "backward", "engine forward and backward", "momentum forward"


@dataclass(frozen=True)
class Comm:
    """One kind of collective in a step: ``calls`` of them, ``size`` bytes in all (the whole
    result, summed over the calls), the ``overlappable`` share of it hidden at best under the
    ``window`` compute (None: on the critical path)."""
    term: str
    op: str  # "all-reduce", "all-gather" or "reduce-scatter"
    dtype: str
    size: float
    calls: int
    window: str | None = None
    overlappable: float = 1.0


@dataclass(frozen=True)
class Setup:
    """A ZeRO stage."""
    stage: int

    @property
    def label(self) -> str:
        return f"ZeRO {self.stage}"


SETUPS = (Setup(0), Setup(1), Setup(2), Setup(3))


def refused(m: ModelCounts, setup: Setup) -> str | None:
    """Why lgp_ds refuses ``setup`` for model ``m`` in bf16; None where it runs it."""
    if setup.stage == 0 and m.fp32_grads:
        return "the MIM anchor needs fp32 gradients, which ZeRO 0 in bf16 does not keep"
    return None


def send_factor(op: str, n: int) -> float:
    """Bytes each rank sends per byte of the collective's (whole) result, ring algorithms."""
    if op == "all-reduce":
        return 2 * (n - 1) / n
    if op in ("all-gather", "reduce-scatter"):
        return (n - 1) / n
    raise ValueError(f"unknown collective {op!r}")


def bytes_per_rank(c: Comm, n: int) -> float:
    return send_factor(c.op, n) * c.size


def _buckets(elements: float, bucket: int = REDUCE_BUCKET) -> int:
    """Calls of a collective that DeepSpeed issues bucket by bucket (latency only)."""
    return max(1, math.ceil(elements / bucket))


def _gathers(elements: float) -> int:
    """ZeRO 3's all-gathers of a pass over ``elements``: the first module's tensors, fetched as
    it is called, then the modules after it a prefetch bucket at a time (latency only)."""
    return 1 + _buckets(elements, PREFETCH_BUCKET)


def _gradient_reduction(term: str, op: str, trained: int, during_backward: bool) -> Comm:
    """The reduction of the bf16 gradients of ``trained`` elements, bucket by bucket; where
    DeepSpeed runs it from the gradient hooks, only the buckets that fill before the last
    gradient, all but the last, can overlap the backward."""
    buckets = _buckets(trained)
    return Comm(term, op, "bf16", BF16 * trained, buckets, BACKWARD if during_backward else None,
                (buckets - 1) * REDUCE_BUCKET / trained if during_backward else 0.0)


def step_comms(m: ModelCounts, setup: Setup, n: int, batch: float,
               persistence_threshold: int = PERSISTENCE_THRESHOLD) -> list[Comm]:
    """The collectives of one step of model ``m`` on ``n`` ranks with ``batch`` images per rank
    (ZeRO 3: the engine's ``stage3_param_persistence_threshold``)."""
    stage, trained, big = setup.stage, m.engine.trained, persistence_threshold
    bn_engine = sum(2 * c + 1 for c in m.engine_bn)  # one view's elements in a call's two
    bn_momentum = sum(2 * c + 1 for c in m.momentum_bn)
    comms = [
        Comm("BatchNorm syncs", "all-reduce", "fp32",  # each call: both views' statistics
             FP32 * VIEWS * (2 * bn_engine + bn_momentum),
             PASSES * 2 * (2 * len(m.engine_bn) + len(m.momentum_bn))),
        Comm("contrastive key all-gather", "all-gather", "fp32",
             FP32 * VIEWS * n * batch * m.key_dim, VIEWS),
    ]
    if stage < 3:
        after_backward = stage == 0 or (stage == 1 and m.fp32_grads)  # (BF16_Optimizer)
        comms.append(_gradient_reduction("gradient all-reduce", "all-reduce", trained,
                                         not after_backward))
    else:
        comms.append(_gradient_reduction("gradient reduce-scatter", "reduce-scatter", trained,
                                         True))
    if stage in (1, 2):
        comms.append(Comm("parameter all-gather after the step", "all-gather", "bf16",
                          BF16 * trained, PARAM_GROUPS))
        comms += [Comm("momentum update, compute copy", "all-gather", "bf16",
                       BF16 * sum(m.ema_groups), len(m.ema_groups)),
                  Comm("momentum update, fp32 tensors", "all-reduce", "fp32", FP32 * m.ema_fp32,
                       1)]
    if stage == 3:
        backward = m.engine.over(big, trained_only=True)
        recomputed = m.recompute * backward  # the checkpointed blocks' forward, again
        calls = PASSES * sum(_gathers(elements)
                             for elements in (m.engine.over(big), backward, recomputed) if elements)
        comms += [
            Comm("parameter all-gathers in forward and backward", "all-gather", "bf16",
                 BF16 * PASSES * (m.engine.over(big) + backward + recomputed), calls, ENGINE),
            Comm("persistent parameter all-gather after the step", "all-gather", "bf16",
                 BF16 * (m.engine.total - m.engine.over(big)), m.engine.persistent(big)),
        ]
        comms += [Comm(f"momentum encoder all-gathers in its forward, {dtype}", "all-gather",
                       dtype, BYTES[dtype] * PASSES * elements, PASSES * calls, MOMENTUM)
                  for dtype, calls, elements in m.momentum_gathers]
    if stage > 0 and m.anchored_tensors:
        comms.append(Comm("MIM anchor partial norms", "all-reduce", "fp64",
                          FP64 * m.anchored_tensors, 1))
    return comms

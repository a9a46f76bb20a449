"""Step time on n GPUs: the measured single-GPU step plus the step's collectives on a network.

Network (:class:`Network`): nodes of ``gpus_per_node`` GPUs joined by NVLink (``nvlink_gbs`` per
GPU and direction), nodes joined by ``nics_per_node`` NICs of ``nic_gbs`` each. A collective of
size S over n GPUs in N nodes of g runs in two levels, as NCCL's rings do in effect (only the
hops between nodes cross a NIC, and a node's rings share its NICs):

    reduce-scatter or all-gather:  (g-1)/g x S over NVLink  +  (N-1)/N x S/g over the NIC share
    all-reduce:                    twice each

where each GPU's NIC share is nic_gbs x nics_per_node / g, plus ``latency_us`` x (1 + log2 N) per
call. Link rates are peak: NCCL reaches some 70-90% of them, so communication times are
optimistic by that much.

Compute (:class:`Compute`): a step on one GPU is its images' work, at the FLOP rate of a
measured step, plus AdamW's step over the trained parameters, memory-bound at the GPU's HBM
bandwidth; ZeRO 1-3 run 1/n of the optimizer step on each of n GPUs. The images' work divides by
FLOPs into the engine's forward (two views), its backward (twice the forward, three times with
activation checkpointing), and the momentum encoder's forward.

Overlap, two bounds: *no overlap* puts every collective on the critical path; *full overlap* hides
the gradient reduction under the backward where DeepSpeed runs it from the gradient hooks (ZeRO 2
and 3, ZeRO 1 without the MIM anchor) but for its last bucket, which DeepSpeed reduces after the
last gradient (all of it where the trained parameters fit one bucket), ZeRO 3's parameter gathers
under the engine's forward and backward (what the backward leaves) and the momentum encoder's
gathers under its forward, each up to the length of that compute. The rest is serial in every case:
the BatchNorm syncs and the key all-gather are needed by the very next operation, ZeRO 0 (and ZeRO 1
as the BF16_Optimizer) reduces gradients after backward, ZeRO 1/2 gather parameters after the step,
and the momentum update follows the step.
"""
import math
from dataclasses import dataclass

from .counts import ModelCounts
from .traffic import BACKWARD, ENGINE, MOMENTUM, Comm, Setup, step_comms


@dataclass(frozen=True)
class Network:
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0  # NVLink 4 (H100/H200 SXM): 18 links x 25 GB/s each way
    nic_gbs: float = 50.0  # 400 Gb/s
    nics_per_node: int = 8  # one per GPU, as DGX/HGX H100 and H200 nodes have
    latency_us: float = 10.0

    def shape(self, n: int) -> tuple[int, int]:
        """(GPUs per node, nodes) of a job of ``n`` GPUs: one partial node or whole nodes."""
        if n < 1 or (n > self.gpus_per_node and n % self.gpus_per_node):
            raise ValueError(f"{n} GPUs: give at most {self.gpus_per_node} or a multiple of it")
        g = min(n, self.gpus_per_node)
        return g, n // g

    def seconds(self, c: Comm, n: int) -> float:
        """Time of the collectives ``c`` on ``n`` GPUs (0 on one)."""
        if n == 1:
            return 0.0
        g, nodes = self.shape(n)
        phases = 2 if c.op == "all-reduce" else 1
        nic_share = self.nic_gbs * self.nics_per_node / g
        bandwidth = ((g - 1) / g * c.size / self.nvlink_gbs
                     + (nodes - 1) / nodes * c.size / g / nic_share) / 1e9
        return phases * bandwidth + c.calls * self.latency_us * 1e-6 * (1 + math.log2(nodes))


# AdamW's step per trained parameter, bytes read and written: the fp32 master, m and v (each read
# and written), the bf16 gradient read and written as fp32, the fp32 gradient read again, the
# bf16 parameter written
OPTIMIZER_STEP_BYTES = 36


@dataclass(frozen=True)
class Compute:
    """One GPU's compute: ``flop_rate`` FLOP/s on the images' work, ``hbm_gbs`` GB/s of memory
    bandwidth for the optimizer step."""
    flop_rate: float
    hbm_gbs: float

    @classmethod
    def measured(cls, m: ModelCounts, img_per_s: float, batch: int, hbm_gbs: float) -> "Compute":
        """From ``img_per_s`` measured for model ``m`` with ``batch`` images per step; a step
        no longer than the optimizer step alone leaves no time for the images: ValueError."""
        optimizer = cls(1.0, hbm_gbs).optimizer_step(m)
        step = batch / img_per_s
        if step <= optimizer:
            raise ValueError(
                f"a measured {img_per_s:g} img/s at {batch} images per step is a step of "
                f"{1e3 * step:.2f} ms, no longer than {m.name}'s optimizer step alone "
                f"({1e3 * optimizer:.2f} ms at {hbm_gbs:g} GB/s): give the rate of a whole step "
                f"as tools/bench.py measures it (--img_per_s, --zero3_img_per_s)")
        return cls(m.executed_flops * batch / (step - optimizer), hbm_gbs)

    def optimizer_step(self, m: ModelCounts) -> float:
        return OPTIMIZER_STEP_BYTES * m.engine.trained / (self.hbm_gbs * 1e9)

    def step(self, m: ModelCounts, batch: float, optimizer_share: float = 1.0) -> float:
        """Seconds of a step of ``batch`` images, ``optimizer_share`` of the optimizer step."""
        return batch * m.executed_flops / self.flop_rate + optimizer_share * self.optimizer_step(m)


@dataclass(frozen=True)
class Prediction:
    """One step on n GPUs: ``compute`` (s), each term's collective time (s), how much of that
    overlap can hide at best (s), and the same set-up's single-GPU throughput ``reference``
    (img/s at the measured batch) that efficiency compares against."""
    batch: float
    reference: float
    compute: float
    comm: dict[str, float]
    hideable: float

    @property
    def no_overlap(self) -> float:
        return self.compute + sum(self.comm.values())

    @property
    def full_overlap(self) -> float:
        return self.no_overlap - self.hideable

    def img_per_s(self, overlap: bool) -> float:
        """Images per second per GPU."""
        return self.batch / (self.full_overlap if overlap else self.no_overlap)

    def efficiency(self, overlap: bool) -> float:
        """Throughput per GPU against one GPU running the same set-up at the measured batch."""
        return self.img_per_s(overlap) / self.reference

    def largest(self) -> str:
        return max(self.comm, key=self.comm.get)


def compute_windows(m: ModelCounts, seconds: float) -> dict[str, float]:
    """The images' compute time split by FLOPs into the windows collectives may hide under."""
    forward = m.forward_flops
    backward = (2 + m.recompute) * forward
    total = forward + backward + m.momentum_flops
    return {BACKWARD: seconds * backward / total,
            ENGINE: seconds * (forward + backward) / total,
            MOMENTUM: seconds * m.momentum_flops / total}


def predict(m: ModelCounts, setup: Setup, n: int, batch: float, compute: Compute,
            reference_batch: int, net: Network) -> Prediction:
    """The step of ``m`` under ``setup`` on ``n`` GPUs, ``batch`` images each."""
    images = compute.step(m, batch, optimizer_share=0.0)
    seconds = images + compute.optimizer_step(m) / (n if setup.stage > 0 else 1)
    comms = step_comms(m, setup, n, batch)
    comm = {c.term: net.seconds(c, n) for c in comms}
    windows = compute_windows(m, images)
    busy = {w: sum(c.overlappable * comm[c.term] for c in comms if c.window == w)
            for w in windows}
    # The gradient reduction takes its share of the backward first; ZeRO 3's gathers may use
    # the rest of the engine's forward and backward.
    hidden_backward = min(busy[BACKWARD], windows[BACKWARD])
    hideable = (hidden_backward + min(busy[ENGINE], windows[ENGINE] - hidden_backward)
                + min(busy[MOMENTUM], windows[MOMENTUM]))
    reference = reference_batch / compute.step(m, reference_batch)
    return Prediction(batch, reference, seconds, comm, hideable)

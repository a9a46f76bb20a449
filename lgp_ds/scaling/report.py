"""The scaling report in Markdown: per-step traffic, memory, predicted step and the ZeRO stage to
pick for the grafting step of ViT-B/16 to ViT-g/14 (``tools/bench.py --scaling`` prints it)."""
import dataclasses
from dataclasses import dataclass, field

from .counts import ARCHS, ModelCounts, count_model
from .memory import MEMORY_RESERVE_GB, fewest_checkpointed, memory
from .timing import Compute, Network, Prediction, predict
from .traffic import SETUPS, Setup, bytes_per_rank, refused, step_comms

REFERENCE_MODEL = "ViT-L/16"
# The measured single-GPU steps the report starts from (REFERENCE.md, one H200, ViT-L/16, two
# views, batch 128): DeepSpeed bf16 with ZeRO 2 (FusedAdam), and with ZeRO 3, whose per-module
# gathering hooks halve the speed even on one GPU. ZeRO 0 and 1 are taken to run as ZeRO 2.
MEASURED_IMG_PER_S = 364.0
MEASURED_ZERO3_IMG_PER_S = 173.0
MEASURED_BATCH = 128
H200_HBM_GBS = 4800.0


@dataclass(frozen=True)
class Inputs:
    img_per_s: float = MEASURED_IMG_PER_S  # ViT-L/16 on one GPU, ZeRO 0-2, ``batch`` images
    zero3_img_per_s: float = MEASURED_ZERO3_IMG_PER_S
    gpus: tuple[int, ...] = (8, 64, 512)
    batch: int = MEASURED_BATCH  # per GPU: measured with, and predicted for
    hbm_gbs: float = H200_HBM_GBS  # of the GPU measured (its optimizer step)
    gpu_memory_gb: float = 80.0
    net: Network = field(default_factory=Network)


class ModelScaling:
    """One size's counts with its single-GPU throughput and predictions under ``inputs``."""

    def __init__(self, counts: ModelCounts, reference: ModelCounts, inputs: Inputs):
        self.m, self.inputs = counts, inputs
        self.compute = {stage: Compute.measured(reference, inputs.zero3_img_per_s if stage == 3
                                                else inputs.img_per_s, inputs.batch, inputs.hbm_gbs)
                        for stage in range(4)}
        # one GPU, the measured batch
        self.img_per_s = {stage: inputs.batch / c.step(counts, inputs.batch)
                          for stage, c in self.compute.items()}

    def label(self, setup: Setup) -> str:
        """The set-up's name; one that lgp_ds refuses with this recipe (ZeRO 0 with the MIM
        anchor, in bf16) runs only with the anchor off."""
        return setup.label + (", anchor_weight=0" if refused(self.m, setup) else "")

    def batch(self, n: int, global_batch: bool) -> float:
        """Images per GPU on ``n`` GPUs: the inputs' batch, or the recipe's global batch split."""
        return self.m.global_batch / n if global_batch else self.inputs.batch

    def predict(self, setup: Setup, n: int, batch: float) -> Prediction:
        return predict(self.m, setup, n, batch, self.compute[setup.stage], self.inputs.batch,
                       self.inputs.net)

    def memory_gb(self, setup: Setup, n: int, batch: float) -> float:
        return sum(memory(self.m, setup, n, batch).values()) / 1e9

    def fits(self, setup: Setup, n: int, batch: float) -> bool:
        return self.memory_gb(setup, n, batch) <= self.inputs.gpu_memory_gb - MEMORY_RESERVE_GB

    def ranked(self, n: int, batch: float) -> list[tuple[Setup, Prediction]]:
        """The set-ups that fit, fastest first by the no-overlap bound (images/s per GPU); of
        set-ups that run alike (ZeRO 1 and 2 without gradient accumulation), the smaller, then
        the higher stage first (ZeRO 2 keeps gradients partitioned under accumulation too)."""
        fitting = [(s, self.predict(s, n, batch)) for s in SETUPS if self.fits(s, n, batch)]
        return sorted(fitting, key=lambda sp: (-round(sp[1].img_per_s(False), 6),
                                               round(self.memory_gb(sp[0], n, batch), 3),
                                               -sp[0].stage))


def _gpus(*counts: int) -> str:
    """'8, 64 GPUs', '1 GPU'."""
    return f"{', '.join(map(str, counts))} GPU{'' if counts == (1,) else 's'}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in [header, align] + rows]


def _mb(x: float) -> str:
    return f"{x / 1e6:,.0f}" if x >= 1e6 else f"{x / 1e6:.2f}"


def _efficiency(p: Prediction) -> str:
    low, high = 100 * p.efficiency(False), 100 * p.efficiency(True)
    span = f"{low:.1f}%" if high - low < 0.05 else f"{low:.1f}-{high:.1f}%"
    return f"{span}, {p.img_per_s(False):.0f} img/s"


def _largest(preds: list[Prediction]) -> str:
    names = [p.largest() for p in preds]
    return " -> ".join(dict.fromkeys(names))  # in order of GPU count, each once


def _inputs_section(inputs: Inputs, reference: ModelScaling) -> list[str]:
    net, compute = inputs.net, reference.compute
    nic = net.nic_gbs * net.nics_per_node / net.gpus_per_node
    return [
        "Inputs (options of `tools/bench.py --scaling`, see its `--help`):",
        f"- compute: one GPU runs {REFERENCE_MODEL}'s step at {inputs.img_per_s:g} img/s with "
        f"ZeRO 0-2 and {inputs.zero3_img_per_s:g} with ZeRO 3, {inputs.batch} images per step; "
        f"without its optimizer step (AdamW, memory-bound at {inputs.hbm_gbs:g} GB/s) that is "
        f"{compute[0].flop_rate / 1e12:.0f} and {compute[3].flop_rate / 1e12:.0f} TFLOP/s, at "
        f"which the other sizes run too. {inputs.batch} images per GPU and step unless said.",
        f"- network: {net.gpus_per_node} GPUs per node on NVLink at {net.nvlink_gbs:g} GB/s per "
        f"GPU and direction; {net.nics_per_node} NIC(s) of {net.nic_gbs:g} GB/s "
        f"({net.nic_gbs * 8:g} Gb/s) per node, {nic:g} GB/s per GPU; {net.latency_us:g} us "
        f"per collective x (1 + log2 nodes); peak rates.",
        f"- memory: {inputs.gpu_memory_gb:g} GB per GPU, {MEMORY_RESERVE_GB:g} GB of it kept for "
        f"what is not counted.",
        f"- efficiency: images/s per GPU against one GPU running the same set-up with "
        f"{inputs.batch} images (over 100%: ZeRO 1-3 split the optimizer step, or a larger "
        f"batch spreads it); a range runs from no overlap to full overlap of the collectives "
        f"that can overlap compute. img/s: per GPU, no overlap.",
    ]


def _models_section(models: list[ModelScaling], inputs: Inputs) -> list[str]:
    rows = []
    for model in models:
        m, speed = model.m, model.img_per_s
        rows.append([m.name, m.recipe,
                     f"{m.engine.total / 1e6:,.0f} ({m.engine.trained / 1e6:,.0f})",
                     f"{m.momentum.total / 1e6:,.0f}", str(m.tokens),
                     f"{m.ckpt_blocks} of {m.depth}", f"{m.train_flops / 1e12:.3f}",
                     f"{speed[0]:.0f} / {speed[3]:.0f}",
                     f"{inputs.batch / speed[0] * 1e3:.0f} / {inputs.batch / speed[3] * 1e3:.0f}"])
    return ["### The models", ""] + _table(
        ["model", "recipe", "engine params, M (trained)", "momentum encoder, M", "tokens per view",
         "checkpointed blocks", "TFLOP per image", "img/s per GPU, ZeRO 0-2 / 3",
         f"step of {inputs.batch}, ms, ZeRO 0-2 / 3"], rows)


def _traffic_section(models: list[ModelScaling], inputs: Inputs) -> list[str]:
    n = max(inputs.gpus)
    columns = [Setup(0), Setup(2), Setup(3)]
    rows = []
    for model in models:
        per_setup = [{c.term: c for c in step_comms(model.m, s, n, inputs.batch)} for s in columns]
        terms = list(dict.fromkeys(t for comms in per_setup for t in comms))
        for term in terms:
            kind = next(c for c in (comms.get(term) for comms in per_setup) if c is not None)
            rows.append([model.m.name, term, f"{kind.op}, {kind.dtype}"]
                        + [_mb(bytes_per_rank(comms[term], n)) if term in comms else "-"
                           for comms in per_setup])
        rows.append([model.m.name, "**total**", ""]
                    + [f"**{_mb(sum(bytes_per_rank(c, n) for c in comms.values()))}**"
                       for comms in per_setup])
    anchored = ", ".join(m.m.name for m in models if refused(m.m, Setup(0)))
    return [f"### Traffic per GPU and step, MB sent, on {_gpus(n)}", "",
            "ZeRO 1 sends what ZeRO 2 sends. Every term but the key all-gather is within "
            "(n-1)/n of its value at any n; the key all-gather grows with n. ZeRO 3's parameter "
            "gathers are counted per use (an upper bound, see docs/scaling.md). ZeRO 0 of the "
            f"recipes with the MIM anchor ({anchored}): with the anchor off.", ""] + _table(
        ["model", "term", "collective", "ZeRO 0", "ZeRO 1, 2", "ZeRO 3"], rows)


def _memory_section(models: list[ModelScaling], inputs: Inputs) -> list[str]:
    low, high = min(inputs.gpus), max(inputs.gpus)
    rows = []
    for model in models:
        for s in SETUPS:
            parts = memory(model.m, s, low, inputs.batch)
            rows.append([model.m.name, model.label(s)] + [f"{v / 1e9:.1f}" for v in parts.values()]
                        + [f"{model.memory_gb(s, low, inputs.batch):.1f}",
                           f"{model.memory_gb(s, high, inputs.batch):.1f}"])
    return [f"### Memory per GPU, GB, batch {inputs.batch}", ""] + _table(
        ["model", "set-up", f"params ({_gpus(low)})", "grads", "optimizer", "momentum",
         "activations", f"total, {_gpus(low)}", f"total, {_gpus(high)}"], rows)


def _checkpointing_cell(model: ModelScaling, setup: Setup, n: int, batch: float) -> str:
    budget = (model.inputs.gpu_memory_gb - MEMORY_RESERVE_GB) * 1e9
    blocks = fewest_checkpointed(model.m, setup, n, batch, budget)
    if blocks is None:
        return "does not fit"
    fewest = dataclasses.replace(model.m, ckpt_blocks=blocks)
    every = dataclasses.replace(model.m, ckpt_blocks=model.m.depth)
    saved = 1 - fewest.executed_flops / every.executed_flops
    gb = sum(memory(fewest, setup, n, batch).values()) / 1e9
    return f"{blocks} of {model.m.depth}: {gb:.0f} GB, {100 * saved:.0f}% fewer FLOPs"


def _checkpointing_section(models: list[ModelScaling], inputs: Inputs) -> list[str]:
    """The fewest checkpointed blocks that fit per model and set-up (the ViT-L, H and g recipes
    checkpoint every block, ViT-B's none)."""
    low = min(inputs.gpus)
    cases = [(Setup(2), low, inputs.batch), (Setup(3), low, inputs.batch), (Setup(3), 1, 32)]
    rows = [[model.m.name] + [_checkpointing_cell(model, *case) for case in cases]
            for model in models]
    return ["### Activation checkpointing: the fewest blocks that fit", "",
            f"`grad_ckpt: N` checkpoints the lowest N blocks; `true`, as the ViT-L, H and g "
            f"recipes set it, all of them. Per cell: the fewest that fit in "
            f"{inputs.gpu_memory_gb:g} GB less {MEMORY_RESERVE_GB:g}, the memory then, and the "
            f"FLOPs each image needs fewer than with every block checkpointed.", ""] + _table(
        ["model", f"ZeRO 2, {_gpus(low)}, {inputs.batch} images each",
         f"ZeRO 3, {_gpus(low)}, {inputs.batch} images each", "ZeRO 3, 1 GPU, 32 images"], rows)


def _prediction_section(models: list[ModelScaling], inputs: Inputs, global_batch: bool,
                        title: str) -> list[str]:
    """Predicted efficiency per set-up and GPU count."""
    rows = []
    for model in models:
        for s in SETUPS:
            preds = [model.predict(s, n, model.batch(n, global_batch)) for n in inputs.gpus]
            rows.append([model.m.name, model.label(s)] + [_efficiency(p) for p in preds]
                        + [_largest(preds)])
    return [title, ""] + _table(["model", "set-up"] + [_gpus(n) for n in inputs.gpus]
                                + ["largest collective term"], rows)


def _recommendation(model: ModelScaling, n: int, batch: float) -> str:
    """The fastest set-up that lgp_ds runs today with the recipe, by the no-overlap bound, and
    those that may beat it: with overlap, or without the anchor."""
    ranked = model.ranked(n, batch)
    today = [(s, p) for s, p in ranked if not refused(model.m, s)]
    if not today:
        return "none fits"
    best, p = today[0]
    cell = f"{best.label}: {p.img_per_s(False):.0f} img/s ({100 * p.efficiency(False):.1f}%)"
    best_yet = p.img_per_s(False)  # listed: faster than this, with overlap or without
    for s, q in ranked:  # fastest first without overlap: a slower one must overlap better
        if q.img_per_s(True) > best_yet * (1 + 1e-9):
            bound = "" if q.full_overlap == q.no_overlap else "up to "
            cell += f"; {model.label(s)} {bound}{q.img_per_s(True):.0f}"
            best_yet = q.img_per_s(True)
    return cell


def _recommendation_section(models: list[ModelScaling], inputs: Inputs,
                            global_batch: bool) -> list[str]:
    rows = [[model.m.name] + [_recommendation(model, n, model.batch(n, global_batch))
                              for n in inputs.gpus] for model in models]
    return _table(["model"] + [_gpus(n) for n in inputs.gpus], rows)


def report(inputs: Inputs = Inputs()) -> str:
    """The whole report for ``inputs``."""
    counts = {name: count_model(name) for name in ARCHS}
    models = [ModelScaling(m, counts[REFERENCE_MODEL], inputs) for m in counts.values()]
    reference = models[list(counts).index(REFERENCE_MODEL)]
    batches = ", ".join(f"{m.m.name} {m.m.global_batch}" for m in models)
    lines = [f"## The grafting step on {_gpus(*inputs.gpus)}, on paper", ""]
    lines += _inputs_section(inputs, reference) + [""]
    lines += _models_section(models, inputs) + [""]
    lines += _traffic_section(models, inputs) + [""]
    lines += _memory_section(models, inputs) + [""]
    lines += _checkpointing_section(models, inputs) + [""]
    lines += _prediction_section(
        models, inputs, False, f"### Predicted scaling, {inputs.batch} images per GPU") + [""]
    lines += [f"### ZeRO stage to pick, {inputs.batch} images per GPU", "",
              "The fastest by the no-overlap bound (img/s per GPU, efficiency in brackets) of "
              "the set-ups that fit and that lgp_ds runs with the recipe today; after it, those "
              "that could be faster: with full overlap, or with the "
              "recipe's MIM anchor off (lgp_ds refuses ZeRO 0 in bf16 with the anchor).", ""]
    lines += _recommendation_section(models, inputs, False) + [""]
    lines += _prediction_section(
        models, inputs, True, f"### Predicted scaling at a fixed global batch ({batches}), split "
        f"over the GPUs") + [""]
    lines += ["### ZeRO stage to pick at that global batch", ""]
    lines += _recommendation_section(models, inputs, True)
    return "\n".join(lines)


def _gpu_counts(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def add_arguments(parser) -> None:
    """The command-line options of the report (``tools/bench.py --scaling``)."""
    g = parser.add_argument_group("--scaling: the grafting step on many GPUs, on paper (no GPU "
                                  "needed; prints Markdown)")
    g.add_argument("--scaling", action="store_true", help="print the scaling report")
    g.add_argument("--img_per_s", type=float, default=MEASURED_IMG_PER_S,
                   help=f"{REFERENCE_MODEL}'s step on one GPU with ZeRO 0-2, images/s at "
                        f"--batch_per_gpu, measured as its recipe runs it, every block under "
                        f"activation checkpointing (tools/bench.py --config vit_l_graft; "
                        f"default: REFERENCE.md's H200 figure)")
    g.add_argument("--zero3_img_per_s", type=float, default=MEASURED_ZERO3_IMG_PER_S,
                   help="the same with ZeRO 3")
    g.add_argument("--gpus", type=_gpu_counts, default=Inputs.gpus,
                   help="GPU counts, comma-separated (default 8,64,512)")
    g.add_argument("--batch_per_gpu", type=int, default=MEASURED_BATCH,
                   help="images per GPU and step, measured and predicted")
    g.add_argument("--nics_per_node", type=int, default=Network.nics_per_node,
                   help="400 Gb/s NICs per node of 8 GPUs (default: one per GPU)")


def inputs_from_args(args) -> Inputs:
    """:class:`Inputs` from the options of :func:`add_arguments`; ValueError if they are wrong."""
    net = Network(nics_per_node=args.nics_per_node)
    for n in args.gpus:
        net.shape(n)
    if min(args.img_per_s, args.zero3_img_per_s, args.batch_per_gpu, args.nics_per_node) <= 0:
        raise ValueError("--img_per_s, --zero3_img_per_s, --batch_per_gpu and --nics_per_node "
                         "must be positive")
    return Inputs(img_per_s=args.img_per_s, zero3_img_per_s=args.zero3_img_per_s,
                  gpus=args.gpus, batch=args.batch_per_gpu, net=net)

"""The grafting step on many GPUs, on paper: per-step communication of each ZeRO stage counted
from the models lgp_ds builds, memory per GPU, and the step time predicted from a measured
single-GPU step and a network model (docs/scaling.md; ``tools/bench.py --scaling``).

    counts.py   the models' parameters, BatchNorm layers, tokens and FLOPs (meta device)
    traffic.py  the collectives of one step per ZeRO stage, as lgp_ds and DeepSpeed issue them
    memory.py   what each rank holds per ZeRO stage
    timing.py   the network and compute model: step time and efficiency, two overlap bounds
    report.py   the Markdown report and its command-line options
"""
from .report import Inputs, add_arguments, inputs_from_args, report

__all__ = ["Inputs", "add_arguments", "inputs_from_args", "report"]

"""Per-iteration schedules: LR factor (linear warmup, then half-cosine to 0) and MoCo momentum.

Both are functions of the optimizer step, so every param group is multiplied by the same factor
and the stage LR ratios hold at every step.
"""
from fvcore.common.param_scheduler import CosineParamScheduler, LinearParamScheduler

_WARMUP = LinearParamScheduler(0.0, 1.0)
_DECAY = CosineParamScheduler(1.0, 0.0)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier in [0, 1] of every group's peak LR at optimizer step ``step``."""
    if step < warmup_steps:
        return _WARMUP(step / warmup_steps)
    if total_steps <= warmup_steps:
        return 1.0
    return _DECAY(min(1.0, (step - warmup_steps) / (total_steps - warmup_steps)))


def momentum_at(step: int, total_steps: int, m0: float) -> float:
    """MoCo v3: m = 1 - 0.5 * (1 + cos(pi * step / total)) * (1 - m0), rising from m0 to 1."""
    return CosineParamScheduler(m0, 1.0)(min(1.0, step / max(1, total_steps)))

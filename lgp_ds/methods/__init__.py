"""The pre-training methods of the paper, each a small :class:`Method` for the one trainer.

    graft          step ii: MoCo v3 from MIM weights, stage-wise LRs (+ MIM anchor)
    moco           MoCo v3 from random weights
    mae            step i: MAE
    mtl            MoCo v3 + MAE losses summed on one encoder
    mim2cl_frozen  MIM->CL grafting with the lower stages frozen
    cl2mim         CL->MIM grafting: MoCo v3 weights, lower stages frozen, MAE on top
    graft_vicreg   the grafting step with VICReg's loss (no momentum encoder)
    finetune       supervised (or 10% semi-supervised, or partial) fine-tuning on labels
"""
from lgp_ds.config import METHODS

from .base import Method
from .finetune import Finetune
from .mae import MAE
from .moco import MoCo
from .mtl import MTL
from .vicreg import GraftVICReg

_CLASSES = {"graft": MoCo, "moco": MoCo, "mim2cl_frozen": MoCo, "mae": MAE, "cl2mim": MAE,
            "mtl": MTL, "graft_vicreg": GraftVICReg, "finetune": Finetune}
assert set(_CLASSES) == set(METHODS)


def build_method(cfg) -> Method:
    """The :class:`Method` that ``cfg.method`` names (the config has validated the name)."""
    return _CLASSES[cfg.method](cfg)


__all__ = ["Method", "build_method"]

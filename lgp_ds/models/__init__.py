from .heads import CrossRankBatchNorm1d, build_mlp
from .moco import GraftModel, build_graft_model, load_mim_weights
from .vit import create_vit, vit_layer_id

__all__ = ["CrossRankBatchNorm1d", "build_mlp", "GraftModel", "build_graft_model", "load_mim_weights",
           "create_vit", "vit_layer_id"]

from .heads import CrossRankBatchNorm1d, build_mlp
from .moco import GraftModel, build_graft_model
from .vit import create_vit, load_weights, vit_from_config, vit_layer_id

__all__ = ["CrossRankBatchNorm1d", "build_mlp", "GraftModel", "build_graft_model", "create_vit",
           "load_weights", "vit_from_config", "vit_layer_id"]

"""Rank functions for tests/test_construct.py: models built partitioned (deepspeed.zero.Init)."""
from jobs import ds_config, tiny_config
from lgp_ds import dist
from lgp_ds.engine.construct import build_model
from lgp_ds.engine.init_weights import read_init
from lgp_ds.methods import build_method
from lgp_ds.models.partitioned import whole_copies
from method_jobs import METHODS


def built_job(names, init):
    """Per method name: every parameter of the model built under ZeRO-3 bf16's zero.Init (gathered
    whole), the numel this rank held of the model, and the model's numel; for "graft" also the
    model with the ``init`` weights loaded into its partitions."""
    out = {}
    for name in names:
        cfg = tiny_config(**{k: v for k, v in METHODS[name].items() if k != "init"})
        method = build_method(cfg)
        model = build_model(method, cfg, ds_config(cfg, 3, True))
        if name == "graft":
            method.load_init(model, read_init(init))
        out[name] = {"weights": whole_copies(dict(model.named_parameters())),
                     "dtypes": {p.ds_tensor.dtype for p in model.parameters()},
                     "held": sum(p.ds_tensor.numel() for p in model.parameters()),
                     "numel": sum(p.ds_numel for p in model.parameters()),
                     "rank": dist.get_rank()}
    return out

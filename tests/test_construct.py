"""Models built partitioned under ZeRO-3 (deepspeed.zero.Init) on 2 real ranks: each rank holds
half of every tensor, and gathered they are the models built whole in one process, bit for bit."""
import pytest
import torch

import jobs
from lgp_ds.engine.construct import build_model
from lgp_ds.methods import build_method
from method_jobs import METHODS
from multirank import run_ranks

NAMES = ["graft", "mae", "mtl", "graft_vicreg"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    init = tmp_path_factory.mktemp("init") / "mae_encoder.pth"
    cfg = jobs.tiny_config()
    encoder = build_model(build_method(cfg), cfg).base_encoder  # any encoder of the tiny shape
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)  # weights no construction gives
    torch.save({"model": encoder.state_dict()}, init)
    return run_ranks(jobs_entry, NAMES, str(init)), encoder.state_dict()


def jobs_entry(names, init):
    import construct_jobs
    return construct_jobs.built_job(names, init)


@pytest.mark.parametrize("name", NAMES)
def test_partitioned_model_is_the_whole_model_split(built, name):
    ranks, _ = built
    cfg = jobs.tiny_config(**{k: v for k, v in METHODS[name].items() if k != "init"})
    whole = dict(build_model(build_method(cfg), cfg).named_parameters())
    for got in (r[name] for r in ranks):
        # built in fp32 (the trainer keeps its exact values as the masters, then casts)
        assert got["dtypes"] == {torch.float32}
        # each rank holds its half (padded to divide evenly), never the whole
        assert got["held"] <= got["numel"] / 2 + 2 * len(whole)
        assert got["weights"].keys() == whole.keys()
        for n, p in whole.items():
            if name == "graft" and n.startswith("base_encoder.") and not n.startswith(
                    "base_encoder.head."):
                continue  # replaced by the init= weights, checked below
            assert torch.equal(got["weights"][n], p.detach()), n


def test_init_weights_load_into_partitions(built):
    ranks, state = built
    for r in ranks:
        for k, v in state.items():
            if not k.startswith("head."):
                assert torch.equal(r["graft"]["weights"][f"base_encoder.{k}"], v), k

"""Every method of the paper trains on the one trainer: 2 real ranks, embedded data, ZeRO 1-3.

One run of each method (tests/method_jobs.py): MAE under ZeRO 3 writes the checkpoint folder
that graft, mim2cl_frozen and graft_vicreg start from (init=<run folder>), MoCo the one cl2mim
starts from; the others run under ZeRO 2. Checked: finite losses, weights that change exactly
where the method trains (and stay bit-identical where it freezes), in the base and the momentum
encoder, and the same on both ranks.
"""
import math
import os

import pytest
import torch

import method_jobs
from lgp_ds.models.vit import MAE_ONLY_PREFIXES
from multirank import run_ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("methods")
    return run_ranks(method_jobs.methods_job, str(out_dir)), out_dir


@pytest.mark.parametrize("name", list(method_jobs.METHODS))
def test_method_trains_its_weights_and_only_those(runs, name):
    per_rank, _ = runs
    got = per_rank[0][name]
    assert [r["step"] for r in got["records"]] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in got["records"])
    frozen = set(got["frozen"])
    for key, before in got["before"].items():
        after = got["after"][key]
        if key in frozen:
            assert torch.equal(after, before), f"{key} is frozen but changed"
        else:
            assert not torch.equal(after, before), f"{key} trains but did not change"
        assert torch.equal(after, per_rank[1][name]["after"][key]), f"{key} differs across ranks"
    if got["momentum_before"] is None:
        assert name in ("mae", "cl2mim", "graft_vicreg")
        return
    for key, before in got["momentum_before"].items():
        after = got["momentum_after"][key]
        if f"base_encoder.{key}" in frozen:
            assert torch.equal(after, before), f"momentum {key} follows a frozen parameter"
        elif not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert not torch.equal(after, before), f"momentum {key} did not move"
        assert torch.equal(after, per_rank[1][name]["momentum_after"][key])


def test_methods_log_their_loss_terms(runs):
    per_rank, _ = runs
    mtl = per_rank[0]["mtl"]["records"][-1]
    assert math.isclose(mtl["loss"], mtl["loss_cl"] + 0.5 * mtl["loss_mim"], rel_tol=1e-5)
    vicreg = per_rank[0]["graft_vicreg"]["records"][-1]
    assert {"invariance", "variance", "covariance"} <= set(vicreg)
    assert "momentum" in per_rank[0]["graft"]["records"][-1]
    assert "momentum" not in per_rank[0]["mae"]["records"][-1]
    assert set(per_rank[0]["mim2cl_frozen"]["records"][-1]["lr"]) == {"stage3", "stage3_no_wd"}


def test_grafting_starts_from_the_lgp_ds_mae_checkpoint_folder(runs):
    """MAE under ZeRO 3 on 2 ranks -> init=<its run folder> -> graft's encoders hold exactly the
    MAE encoder's fp32 weights (masters and momentum encoder)."""
    per_rank, _ = runs
    mae = per_rank[0]["mae"]
    mae_fp32 = {**mae["masters"], **mae["exact_frozen"]}
    encoder = {k: v for k, v in mae_fp32.items() if not k.startswith(MAE_ONLY_PREFIXES)}
    start = per_rank[0]["graft_start"]
    assert set(encoder) == {k for k in start["momentum"] if not k.startswith("head.")}
    for key, want in encoder.items():
        assert torch.equal(start["momentum"][key], want), key
        master = start["masters"].get(f"base_encoder.{key}")  # frozen ones have none
        assert master is None or torch.equal(master, want), key


@pytest.fixture(scope="module")
def bf16_runs(runs, tmp_path_factory):
    _, out_dir = runs
    return run_ranks(method_jobs.bf16_job, str(tmp_path_factory.mktemp("bf16")),
                     os.path.join(out_dir, "mae"))


@pytest.mark.parametrize("stage", [1, 2])
def test_mae_trains_in_bf16_under_zero_1_and_2(bf16_runs, stage):
    got = bf16_runs[0][("mae", stage)]
    assert all(math.isfinite(r["loss"]) for r in got["records"])
    assert got["frozen"] == ["pos_embed", "decoder_pos_embed"]
    assert set(got["masters"]) == set(got["before"]) - set(got["frozen"])
    for key, before in got["masters_before"].items():  # updates below bf16's resolution count
        assert not torch.equal(got["masters"][key], before), key
    for key in got["frozen"]:
        assert torch.equal(got["after"][key], got["before"][key]), key
    for key, after in got["after"].items():
        assert torch.equal(after, bf16_runs[1][("mae", stage)]["after"][key]), key


def test_frozen_stages_stay_bit_identical_under_zero_1_2_3(bf16_runs):
    per_rank = bf16_runs
    for stage in (1, 2, 3):
        got = per_rank[0][("mim2cl_frozen", stage)]
        frozen = set(got["frozen"])
        assert {"base_encoder.blocks.0.attn.qkv.weight", "base_encoder.blocks.1.mlp.fc2.bias",
                "base_encoder.cls_token"} <= frozen
        assert not any(k.startswith("base_encoder.blocks.2.") for k in frozen)
        for rank in (0, 1):
            run = per_rank[rank][("mim2cl_frozen", stage)]
            for key in frozen:
                assert torch.equal(run["after"][key], run["before"][key]), (stage, key)
                mkey = key.removeprefix("base_encoder.")
                assert torch.equal(run["momentum_after"][mkey], run["momentum_before"][mkey])
            assert not torch.equal(run["after"]["base_encoder.blocks.2.attn.qkv.weight"],
                                   run["before"]["base_encoder.blocks.2.attn.qkv.weight"])

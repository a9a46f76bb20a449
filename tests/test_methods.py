"""Every method of the paper trains on the one trainer: 2 real ranks, embedded data, ZeRO 1-3.

One run of each method (tests/method_jobs.py): MAE under ZeRO 3 writes the checkpoint folder
that graft, mim2cl_frozen and graft_vicreg start from (init=<run folder>), MoCo the one cl2mim
starts from; the others run under ZeRO 2. Checked: finite losses, weights that change exactly
where the method trains (and stay bit-identical where it freezes), in the base and the momentum
encoder, and the same on both ranks.
"""
import copy
import math
import os
import re

import pytest
import torch
import yaml

import method_jobs
from jobs import tiny_config
from lgp_ds.engine.init_weights import read_init
from lgp_ds.engine.momentum import MomentumEncoder
from lgp_ds.methods import build_method
from lgp_ds.models.vit import MAE_ONLY_PREFIXES
from multirank import run_ranks, run_ranks_each


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


def test_auto_checkpointing_is_resolved_into_the_run_folders_config(runs):
    """grad_ckpt=auto (graft's keys here) becomes a number of blocks before the model is built,
    and the run folder's config says which: the tiny model fits without any."""
    _, out_dir = runs
    with open(os.path.join(out_dir, "graft", "config.yaml")) as f:
        assert yaml.safe_load(f)["grad_ckpt"] == 0


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
def later_runs(runs, tmp_path_factory):
    """(bf16 runs, MAE's per-rank losses of mask_job), one start of the ranks."""
    _, out_dir = runs
    bf16, masks = run_ranks_each([
        (method_jobs.bf16_job, (str(tmp_path_factory.mktemp("bf16")),
                                os.path.join(out_dir, "mae"))),
        (method_jobs.mask_job, (str(tmp_path_factory.mktemp("masks")),))])
    return bf16, masks


def test_grafting_refuses_init_weights_trained_by_the_other_objective(runs, tmp_path):
    """Where the source says what trained its weights (an lgp_ds run its method, an official
    MoCo v3 file its momentum encoder, an MAE model its decoder), a grafting method refuses the
    wrong kind; an encoder alone says nothing and is taken."""
    _, out_dir = runs
    _official_moco_v3_file(tmp_path / "moco.pth.tar")
    _, mae_model = _single_process("mae")
    torch.save({"model": mae_model.state_dict()}, tmp_path / "mae_full.pth")
    for method, init, holds, source, wants in [
            ("mim2cl_frozen", out_dir / "moco", "contrastive", "an lgp_ds run of method=moco",
             "MIM"),
            ("graft", out_dir / "mtl", r"MIM and contrastive \(jointly trained\)",
             "an lgp_ds run of method=mtl", "MIM"),
            ("graft_vicreg", tmp_path / "moco.pth.tar", "contrastive", "a MoCo v3 model", "MIM"),
            ("cl2mim", out_dir / "mae", "MIM", "an lgp_ds run of method=mae", "contrastive"),
            ("cl2mim", out_dir / "mim2cl_frozen", "grafted",
             "an lgp_ds run of method=mim2cl_frozen", "contrastive"),
            ("cl2mim", tmp_path / "mae_full.pth", "MIM", "an MAE model", "contrastive")]:
        with pytest.raises(ValueError, match=f"^init={re.escape(str(init))} holds {holds} "
                                             f"weights \\({source}.*\\), but method={method} "
                                             f"grafts onto {wants} weights: give"):
            read_init(str(init), method=method)
    encoder = {k: v for k, v in mae_model.state_dict().items()
               if not k.startswith(MAE_ONLY_PREFIXES)}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    for method in ("graft", "cl2mim"):
        read_init(str(tmp_path / "encoder.pth"), method=method)


@pytest.fixture(scope="module")
def bf16_runs(later_runs):
    return later_runs[0]


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


def test_mtl_trains_under_zero3(bf16_runs):
    """MTL runs each encoder block twice per backward (the MoCo views, then the MAE view), which
    rules out ZeRO 3's gathering of a block at a time: it trains with a gather per submodule."""
    runs = [bf16_runs[rank][("mtl", 3)] for rank in (0, 1)]
    assert all(math.isfinite(r["loss"]) for r in runs[0]["records"])
    for key, before in runs[0]["masters_before"].items():
        assert not torch.equal(runs[0]["masters"][key], before), key
    for key, after in runs[0]["after"].items():
        assert torch.equal(after, runs[1]["after"][key]), key


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


def _single_process(name, **extra):
    """(method, model) of ``name`` with the tiny keys of method_jobs, on this process."""
    cfg = tiny_config(**{**method_jobs.METHODS[name], **extra})
    method = build_method(cfg)
    return method, method.build_model()


def test_mtl_loss_is_the_weighted_sum_of_the_moco_and_mae_losses():
    """MTL on three views equals cl_weight x (MoCo v3 alone on views 1, 2) + mim_weight x (MAE
    alone on view 3), each computed by its own method on a model holding the same weights."""
    torch.manual_seed(0)
    mtl, model = _single_process("mtl", cl_weight=0.7, mim_weight=1.3)
    momentum = MomentumEncoder(copy.deepcopy(model.base_encoder), {}, torch.float32)
    with torch.no_grad():  # a momentum encoder away from the base encoder
        for p in momentum.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x1, x2, x3 = (torch.randn(8, 3, 16, 16) for _ in range(3))
    torch.manual_seed(5)  # the MAE mask's noise
    loss, terms = mtl.loss(model, (x1, x2, x3), momentum)

    moco, graft_model = _single_process("moco", frozen_patch_embed=False)
    graft_model.load_state_dict({k: v for k, v in model.state_dict().items()
                                 if k.startswith(("base_encoder.", "predictor."))})
    cl, _ = moco.loss(graft_model, (x1, x2), momentum)
    mae, mae_model = _single_process("mae")
    encoder = {k.removeprefix("base_encoder."): v for k, v in model.state_dict().items()
               if k.startswith("base_encoder.") and not k.startswith("base_encoder.head.")}
    mae_model.load_state_dict({**encoder, **{k: v for k, v in model.state_dict().items()
                                             if k.startswith(MAE_ONLY_PREFIXES)}})
    torch.manual_seed(5)
    mim, _ = mae.loss(mae_model, (x3,), None)
    assert cl.item() > 1 and mim.item() > 0.1
    # the same operations in another order (fp32): rounding only
    assert torch.allclose(terms["loss_cl"], cl, rtol=1e-6)
    assert torch.allclose(terms["loss_mim"], mim, rtol=1e-6)
    assert torch.allclose(loss, 0.7 * cl + 1.3 * mim, rtol=1e-6)


def _official_moco_v3_file(path) -> torch.nn.Module:
    """Write a tiny MoCo model as an official MoCo v3 / grafting-code checkpoint (module.
    base_encoder.* ...) to ``path``; the model."""
    _, moco_model = _single_process("moco")
    sd = {f"module.{k}": v for k, v in moco_model.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v
               for k, v in moco_model.base_encoder.state_dict().items()})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, path)
    return moco_model


def test_cl2mim_starts_from_an_official_moco_v3_file(tmp_path):
    """An official MoCo v3 / grafting-code checkpoint: cl2mim's encoder gets its base encoder
    exactly, the projector is dropped, the decoder stays fresh."""
    torch.manual_seed(1)
    path = str(tmp_path / "moco.pth.tar")
    moco_model = _official_moco_v3_file(path)
    torch.manual_seed(2)
    method, model = _single_process("cl2mim", init=path)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    method.load_init(model, read_init(path))
    for key, value in model.state_dict().items():
        if key.startswith(MAE_ONLY_PREFIXES):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, moco_model.base_encoder.state_dict()[key]), key


def test_mae_masks_differ_across_ranks_and_steps(later_runs):
    """The mask noise comes from an RNG seeded per (seed, micro-batch, rank): not the same masks
    on every rank (the model's seed is), nor the same at every step."""
    per_rank = later_runs[1]
    for losses in per_rank:
        assert len(set(losses)) == 3, losses
    assert all(a != b for a, b in zip(*per_rank)), per_rank

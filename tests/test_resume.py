"""Resuming: the same run bit for bit, one metrics record per step, and every way a resume can
be wrong refused with the reason (2 ranks, real data pipeline)."""
import json
import re

import pytest
import torch

import jobs
from lgp_ds.config import build_config
from lgp_ds.ds_config import resolve_ds_config, run_identity
from lgp_ds.engine import checkpoint
from lgp_ds.methods import build_method
from multirank import run_ranks
from tarfiles import make_shards


# MTL: three views, MAE's random masks, a momentum encoder and a decoder; with a DataLoader worker
# the main process draws nothing for the data, so the masks come from the trainer's RNG alone
MTL = dict(method="mtl", frozen_patch_embed=False, num_stages=1, stage_blrs=[1e-2],
           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, num_workers=1)


# (zero stage, bf16, config keys, jobs.OPTIONS key): ZeRO-Offload's masters, Adam state and
# (offload_param) parameter partitions live on the host, and come back from the checkpoint there
CASES = [(2, True, {}, ""), (3, False, {}, ""), (2, False, MTL, ""), (3, True, {}, "offload_param")]


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_shards(tmp, [10] * 4, corrupt={(s, j) for s in range(4) for j in (1, 5)})
    return run_ranks(jobs.resume_jobs, CASES, data, str(tmp)), tmp


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=["zero2-bf16", "zero3-fp32", "mtl-zero2-fp32", "zero3-bf16-offload"])
def test_resume_continues_exactly(resumed_runs, case):
    ranks, tmp = resumed_runs
    out = [rank[case] for rank in ranks]
    for rank in out:
        straight, first, resumed = rank["straight"], rank["first"], rank["resumed"]
        assert (first["step"], resumed["step"], straight["step"]) == (3, 4, 4)
        assert resumed["epoch"] == straight["epoch"] == 1  # 3 steps per epoch: crossed one
        for key in ("weights", "momentum"):
            for name, value in straight[key].items():
                # same data order, same arithmetic: bit-identical
                assert torch.equal(resumed[key][name], value), (key, name)
        assert not all(torch.equal(first["weights"][k], v) for k, v in straight["weights"].items())
    # One record per step, the resumed steps equal to the uninterrupted run's; the corrupt-sample
    # count is global (not rank 0's count reloaded on every rank)
    metrics = out[0]["metrics"]
    same = ("step", "epoch", "loss", "lr", "momentum", "corrupt_samples")
    assert [{k: r[k] for k in same} for r in metrics["split"]] == \
        [{k: r[k] for k in same} for r in metrics["straight"]]
    assert metrics["straight"][-1]["corrupt_samples"] > 0
    ckpts = tmp / str(case) / "split" / "checkpoints"
    assert checkpoint.find_checkpoint("auto", str(ckpts)) == (str(ckpts), "step00000004")
    # The momentum encoder's weights are written once, by rank 0: under ZeRO 3 every rank writes
    # a model-states file, the others' hold its buffers alone
    files = sorted((ckpts / "step00000004").glob("*model_states.pt"))
    saved = [torch.load(f, map_location="cpu", weights_only=False)["momentum"] for f in files]
    assert len(saved) == (2 if CASES[case][0] == 3 else 1)
    assert saved[0].keys() == out[0]["straight"]["momentum"].keys()
    cfg = jobs.tiny_config(**CASES[case][2])
    buffers = {n for n, _ in build_method(cfg).build_model().base_encoder.named_buffers()}
    for other in saved[1:]:
        assert buffers and other.keys() == buffers


def test_rank_0_chooses_the_checkpoint_for_every_rank(tmp_path):
    both = run_ranks(jobs.resume_choice_jobs, str(tmp_path))
    assert [rank[False] for rank in both] == [(4, None), (4, None)]  # rank 1 alone: step 2
    for step, error in (rank[True] for rank in both):  # every rank fails with the reason; none
        # hangs in the load
        assert step is None
        assert "rank 0 chose" in error and "step00000004" in error
        assert re.search(r"rank 1: \S+step00000004 lacks zero_pp_rank_1_\S+, which its save "
                         r"wrote and rank 1 reads", error)


def test_a_checkpoint_damaged_since_its_save_is_named_not_read(tmp_path):
    """Overwritten in place, DeepSpeed's failure to read it is named on every rank; truncated,
    it is named before DeepSpeed reads anything."""
    for overwritten, truncated in run_ranks(jobs.damaged_resume_job, str(tmp_path)):
        assert re.search(r"rank \d could not read checkpoint \S+step00000002 \(.+\); its files "
                         r"have the sizes its save recorded", overwritten), overwritten
        assert re.search(r"mp_rank_00_model_states.pt has 1000 bytes, but its save wrote \d+: it "
                         r"was damaged or replaced since", truncated), truncated


def test_overwriting_a_checkpoint_unmarks_it_first(tmp_path):
    """A run resumed from step 2 saves step 4 again; a crash halfway must not leave the old
    marker on a mix of old and new shards, and a save over an incomplete folder keeps none of
    its files."""
    ckpts = str(tmp_path / "checkpoints")
    assert run_ranks(jobs.resave_crash_job, str(tmp_path)) == [
        ((ckpts, "step00000002"), False, True)] * 2


def _run(gas=1, digest=None, samples=1347, **config) -> dict:
    """What a run with ``config`` (batch 8) on 1 rank and ``gas`` accumulation steps is, with
    ``samples`` an epoch."""
    cfg = build_config({"batch_size": 8, **config})
    ds = resolve_ds_config({"gradient_accumulation_steps": gas}, cfg, 1)
    return run_identity(cfg, ds, digest, samples)


def _marker(save_dir, tag, world_size=1, **run):
    folder = save_dir / tag
    folder.mkdir(parents=True)
    record = {"step": 5, "world_size": world_size, "run": _run(**run)}
    (folder / checkpoint.COMPLETE_MARKER).write_text(json.dumps(record) + "\n")


def test_which_checkpoint_resume_names(tmp_path):
    save_dir = tmp_path / "checkpoints"
    (save_dir / "step00000010").mkdir(parents=True)  # files written, marker missing: a crash
    _marker(save_dir, "step00000005")
    (save_dir / "latest").write_text("step00000010")
    found = (str(save_dir), "step00000005")
    assert checkpoint.find_checkpoint("auto", str(save_dir)) == found
    assert checkpoint.find_checkpoint(str(save_dir), "elsewhere") == found  # the folder of tags
    assert checkpoint.find_checkpoint(str(save_dir / "step00000005"), "elsewhere") == found
    with pytest.raises(ValueError, match="step00000010: incomplete checkpoint"):
        checkpoint.find_checkpoint(str(save_dir / "step00000010"), str(save_dir))
    with pytest.raises(ValueError, match="neither a complete lgp_ds checkpoint nor a folder"):
        checkpoint.find_checkpoint(str(tmp_path), str(save_dir))
    assert checkpoint.find_checkpoint("auto", str(tmp_path / "none")) is None


def test_resume_that_would_change_the_run_is_refused(tmp_path):
    # another world size is no refusal: test_elastic.py
    _marker(tmp_path, "step00000006", epochs=100, digest="ab12")
    refused = {  # each would continue with another LR, data position or anchor target
        "batch_size=8 -> 16": _run(batch_size=16, epochs=100, digest="ab12"),
        "deepspeed.gradient_accumulation_steps=1 -> 2": _run(gas=2, epochs=100, digest="ab12"),
        "init_digest='ab12' -> 'cd34'": _run(epochs=100, digest="cd34", init="moved.pth"),
        # other shards (data= may change) whose index gives another epoch: another schedule
        "epoch_samples=1347 -> 2000": _run(epochs=100, digest="ab12", samples=2000)}
    for change, run in refused.items():
        with pytest.raises(ValueError, match=rf"\({re.escape(change)}\).*Resume with the "
                                             r"checkpoint's values, or start a fresh run"):
            checkpoint.check_resumable(str(tmp_path), "step00000006", run)
    allowed = _run(epochs=100, max_steps=50, digest="ab12", init="moved.pth")
    assert checkpoint.check_resumable(str(tmp_path), "step00000006", allowed) == [
        "init: None -> 'moved.pth'", "max_steps: None -> 50"]
    # a run saved when only the anchor's weights were digested (None without the anchor)
    _marker(tmp_path, "step00000007", epochs=100, init="mae.pth")
    assert checkpoint.check_resumable(str(tmp_path), "step00000007", _run(
        epochs=100, digest="ab12", init="mae.pth")) == ["init_digest: None -> 'ab12'"]
    (tmp_path / "step00000006" / checkpoint.COMPLETE_MARKER).write_text("{torn")
    with pytest.raises(ValueError, match="not a completion record written by lgp_ds"):
        checkpoint.check_resumable(str(tmp_path), "step00000006", allowed)


def test_a_resume_runs_the_evaluations_its_last_step_did_not_finish(tmp_path):
    # saved before evaluating, the last step's checkpoint is complete when its evaluation
    # fails; the resumed run evaluates that step and logs it, rather than ending with no result
    first, second = run_ranks(jobs.evaluation_after_resume_job, str(tmp_path / "run"))
    assert first == second
    assert first["failed"] == "evaluation failed" and first["resumed_step"] == 2
    assert first["records"] == [{"step": 2, "epoch": 1, "knn": 42.0}]  # 2 steps an epoch
    assert first["logged_steps"] == [1, 2]


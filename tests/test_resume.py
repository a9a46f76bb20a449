"""Resuming: the same run bit for bit, one metrics record per step, and every way a resume can
be wrong refused with the reason (2 ranks, real data pipeline)."""
import json

import pytest
import torch

import jobs
from lgp_ds.config import build_config
from lgp_ds.engine import checkpoint
from multirank import run_ranks
from tarfiles import make_shards


@pytest.mark.parametrize("stage,bf16", [(2, True), (3, False)], ids=["zero2-bf16", "zero3-fp32"])
def test_resume_continues_exactly(tmp_path, stage, bf16):
    data = make_shards(tmp_path, [10] * 4, corrupt={(s, j) for s in range(4) for j in (1, 5)})
    out = run_ranks(jobs.resume_job, stage, bf16, data, str(tmp_path))
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
    ckpts = tmp_path / "split" / "checkpoints"
    assert checkpoint.find_checkpoint("auto", str(ckpts)) == (str(ckpts), "step00000004")


def test_rank_0_chooses_the_checkpoint_for_every_rank(tmp_path):
    out = run_ranks(jobs.resume_choice_job, str(tmp_path / "a"), False)
    assert out == [(4, None), (4, None)]  # rank 1 alone would have picked step 2
    out = run_ranks(jobs.resume_choice_job, str(tmp_path / "b"), True)
    for step, error in out:  # every rank fails with the reason; none hangs in the load
        assert step is None
        assert "rank 0 chose" in error and "step00000004" in error
        assert "rank 1: " in error and "holds no ZeRO shard of rank 1" in error


def _marker(save_dir, tag, world_size=1, **config):
    folder = save_dir / tag
    folder.mkdir(parents=True)
    record = {"step": 5, "world_size": world_size,
              "config": build_config({"batch_size": 8, **config}).to_dict()}
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
    with pytest.raises(ValueError, match="step00000010: not a complete lgp_ds checkpoint"):
        checkpoint.find_checkpoint(str(save_dir / "step00000010"), str(save_dir))
    with pytest.raises(ValueError, match="neither a complete lgp_ds checkpoint nor a folder"):
        checkpoint.find_checkpoint(str(tmp_path), str(save_dir))
    assert checkpoint.find_checkpoint("auto", str(tmp_path / "none")) is None


def test_resume_that_would_change_the_run_is_refused(tmp_path):
    _marker(tmp_path, "step00000005", world_size=2)
    current = build_config({"batch_size": 8}).to_dict()
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        checkpoint.check_resumable(str(tmp_path), "step00000005", current)
    _marker(tmp_path, "step00000006", epochs=100)
    changed = build_config({"batch_size": 16, "epochs": 100, "max_steps": 50,
                            "log_every": 1}).to_dict()
    with pytest.raises(ValueError, match=r"\(batch_size=8 -> 16\).*Resume with the checkpoint's "
                                         r"values, or start a fresh run in a new output_dir"):
        checkpoint.check_resumable(str(tmp_path), "step00000006", changed)
    allowed = build_config({"batch_size": 8, "epochs": 100, "max_steps": 50}).to_dict()
    assert checkpoint.check_resumable(str(tmp_path), "step00000006", allowed) == [
        "max_steps: None -> 50"]

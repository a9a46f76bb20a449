"""2N steps straight == N steps, resume=auto, N more steps (2 ranks, real data pipeline)."""

import pytest
import torch

import jobs
from multirank import run_ranks
from lgp_ds.engine import checkpoint


@pytest.mark.parametrize("stage,bf16", [(2, True), (3, False)], ids=["zero2-bf16", "zero3-fp32"])
def test_resume_continues_exactly(tmp_path, stage, bf16):
    out = run_ranks(jobs.resume_job, stage, bf16, str(tmp_path))
    for rank in out:
        straight, first, resumed = rank["straight"], rank["first"], rank["resumed"]
        assert (first["step"], resumed["step"], straight["step"]) == (2, 4, 4)
        assert resumed["epoch"] == straight["epoch"] == 1  # 3 steps per epoch: crossed one
        for key in ("weights", "momentum"):
            for name, value in straight[key].items():
                # same data order, same arithmetic: bit-identical
                assert torch.equal(resumed[key][name], value), (key, name)
        assert not all(torch.equal(first["weights"][k], v) for k, v in straight["weights"].items())
    ckpts = tmp_path / "split" / "checkpoints"
    assert checkpoint.find_checkpoint("auto", str(ckpts)) == (str(ckpts), "step00000004")
    assert checkpoint.is_complete(str(ckpts), "step00000002")


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    save_dir = tmp_path / "checkpoints"
    (save_dir / "step00000010").mkdir(parents=True)  # files written, marker missing: a crash
    (save_dir / "step00000005").mkdir()
    (save_dir / "step00000005" / checkpoint.COMPLETE_MARKER).write_text(
        '{"step": 5, "world_size": 2}\n')
    (save_dir / "latest").write_text("step00000010")
    assert checkpoint.find_checkpoint("auto", str(save_dir)) == (str(save_dir), "step00000005")
    with pytest.raises(ValueError, match="not a complete"):
        checkpoint.find_checkpoint(str(save_dir / "step00000010"), str(save_dir))
    assert checkpoint.find_checkpoint("auto", str(tmp_path / "none")) is None
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        checkpoint.load(None, str(save_dir), "step00000005")  # refused before DeepSpeed is asked

"""Resuming on another world size: a run saved by 2 ranks continues on 1 and on 4 with the
same fp32 masters, Adam state, momentum encoder, step, schedules and epoch position; the batch
rule (the global batch is kept) and what cannot be kept are stated."""
import math
import shutil

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

import elastic_jobs
import jobs
from lgp_ds.config import build_config
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine import checkpoint, universal
from lgp_ds.engine.schedules import lr_factor, momentum_at
from multirank import run_ranks
from test_resume import _marker, _run

# (ZeRO stage, bf16) resumed on each world size: ZeRO 2 bf16 and ZeRO 3 fp32 on both (each
# resume is timed: 4 ranks share 2 cores in CI, so the 4-rank run takes one)
CASES = {1: [(2, True), (3, False)], 4: [(2, True)]}


def test_a_run_saved_by_2_ranks_continues_on_1_and_on_4(tmp_path):
    two, one, four = (str(tmp_path / name) for name in ("two", "one", "four"))
    saved = run_ranks(elastic_jobs.save_job, CASES[1], two)[0]
    resumed = {1: run_ranks(elastic_jobs.resume_job, CASES[1], two, one, world=1)[0]}
    # the 2-rank run's folder, resumed in place (resume=auto) on 4 ranks: the universal form of
    # its checkpoint, converted for the 1-rank resume, is reused
    shutil.copytree(two, four)
    resumed[4] = run_ranks(elastic_jobs.resume_job, CASES[4], "auto", four, world=4)[0]
    cfg = jobs.tiny_config(**elastic_jobs.RUN)
    steps_per_epoch = cfg.samples_per_epoch // cfg.batch_size
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    for case in CASES[1]:
        before = saved[case]
        ckpts = f"{two}/z{case[0]}{case[1]}/checkpoints"
        assert universal.is_converted(ckpts, "step00000002")
        # the saved masters as DeepSpeed's own offline reader assembles them from the shards
        on_disk = get_fp32_state_dict_from_zero_checkpoint(ckpts, "step00000002")
        for world, result in resumed.items():
            if case not in result:
                continue
            loaded = result[case]["loaded"]
            for name, value in before["weights"].items():
                assert torch.equal(loaded["weights"][name], value), (case, world, name)
                assert torch.equal(on_disk[name].reshape(-1), value.reshape(-1)), (case, name)
                for key in ("exp_avg", "exp_avg_sq"):
                    assert not loaded[key][name].isnan().any(), (case, world, key, name)
                    assert torch.equal(loaded[key][name], before[key][name]), (case, world, key)
            for name, value in before["momentum"].items():
                assert torch.equal(loaded["momentum"][name], value), (case, world, name)
            assert loaded["adam_steps"] == before["adam_steps"] == {2.0}
            # each group's LR for step 3 and its weight decay, as the uninterrupted run had them
            assert loaded["groups"] == before["groups"], (case, world)
            assert loaded["position"] == before["position"] == (2, 0, 2)  # mid-epoch 0
            records = result[case]["records"]
            assert [r["step"] for r in records] == [3, 4]
            for r in records:
                assert math.isfinite(r["loss"]), (case, world, r)
                # the schedules continue: the LR after step s is step s + 1's
                peaks = {n: blr * cfg.batch_size / 256 for n, blr in zip(
                    ("stage1", "stage2", "stage3"), cfg.stage_blrs)}
                for group, lr in r["lr"].items():
                    expected = peaks[group.removesuffix("_no_wd")] * lr_factor(
                        r["step"], total, warmup)
                    assert lr == pytest.approx(expected, rel=1e-12), (case, world, group)
                assert r["momentum"] == pytest.approx(momentum_at(r["step"], total, cfg.momentum),
                                                      rel=1e-12)
            assert result[case]["end"] == (4, 1, 1)  # epoch 0 ended after its 3rd step


def test_the_batch_rule_on_another_world_size(tmp_path):
    _marker(tmp_path, "step00000005", world_size=2, gas=2)
    # the global batch is kept: the micro-batch (or the accumulation) changes, with a word
    assert checkpoint.check_resumable(str(tmp_path), "step00000005", _run(gas=2)) == [
        "world size 2 -> 1: global batch 8 kept, micro-batch 2 -> 4, accumulation 2"]
    assert checkpoint.check_resumable(str(tmp_path), "step00000005", _run(gas=1)) == [
        "world size 2 -> 1: global batch 8 kept, micro-batch 2 -> 8, accumulation 2 -> 1"]
    with pytest.raises(ValueError, match=r"\(batch_size=8 -> 16\)"):
        checkpoint.check_resumable(str(tmp_path), "step00000005", _run(batch_size=16, gas=2))
    # where the global batch cannot be kept, the run is refused before it starts, saying why
    with pytest.raises(ValueError, match="not divisible by world size 3 x gradient_accumulation"
                                         "_steps 1; the global batch is kept on every world size"):
        resolve_ds_config({}, build_config({"batch_size": 8}), 3)
    with pytest.raises(ValueError, match=r"the global batch wins: remove train_micro_batch_size_"
                                         r"per_gpu \(it follows: 2 here\)"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 4}, build_config({"batch_size": 8}), 4)
    # on the same world size the accumulation is part of the run
    _marker(tmp_path, "step00000006", gas=2)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2 -> 1"):
        checkpoint.check_resumable(str(tmp_path), "step00000006", _run(gas=1))

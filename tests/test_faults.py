"""Faults a cluster run meets, injected into real 2-rank runs of the deepspeed launcher
(tests/fault_jobs.py): a rank that dies or hangs, non-finite losses, SIGTERM, and checkpoint
retention."""
import json
import os
import subprocess
import threading
import time

import pytest
import torch

from lgp_ds.engine import checkpoint
from lgp_ds.engine.schedules import lr_factor
from multirank import free_port
from test_launch import ROOT, TINY

# 16 images a step over 2 ranks, an optimizer step a micro-batch, 10 steps an epoch (the LR
# warms up over the first 10); the digits demo set
ARGS = TINY + ["log_every=1", "num_workers=0", "samples_per_epoch=160", "epochs=2",
               "warmup_epochs=1"]


def _start(tmp_path, out, args, faults=None, dump=None, ds_config="ds_configs/cpu_demo.json"):
    """tests/fault_jobs.py through the deepspeed launcher on 2 ranks; the running process.
    ``faults``: {kind: "RANK:STEPS"} (see fault_jobs)."""
    port = free_port()
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"), MASTER_PORT=str(port),
               **{f"LGP_DS_FAULT_{k}": v for k, v in (faults or {}).items()},
               **({"LGP_DS_DUMP": str(dump)} if dump else {}))
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "tests/fault_jobs.py",
           "--deepspeed_config", str(ds_config), "--output_dir", str(out)] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc) -> str:
    return proc.communicate(timeout=300)[0]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tags(out) -> dict[str, bool]:
    """{tag: complete} of the run's checkpoints."""
    ckpts = out / "checkpoints"
    return {p.name: checkpoint.is_complete(str(ckpts), p.name)
            for p in ckpts.iterdir() if p.name.startswith("step")}


def test_dead_and_hung_ranks_and_nonfinite_steps(tmp_path):
    """A rank that hangs: the other fails in its next collective after collective_timeout_s and
    the job ends non-zero long before the hang would. A rank killed while writing a checkpoint:
    the job ends at once, non-zero; resume=auto ignores that incomplete checkpoint and continues
    from the last complete one. Non-finite losses (on one rank only): the step is skipped on
    both (weights and LR untouched), counted, and past max_nonfinite_steps in a row the run
    stops with the reason and writes no checkpoint."""
    hung_out, hung_dump = tmp_path / "hung", tmp_path / "hung_dump"
    hung_dump.mkdir()
    hung = _start(tmp_path, hung_out, ARGS + ["max_steps=4", "collective_timeout_s=8"],
                  faults={"HANG": "1:2"}, dump=hung_dump)
    hung_end = {}  # when the job ended, while the other runs go on
    waiter = threading.Thread(target=lambda: hung_end.update(log=_finish(hung), at=time.time()))
    waiter.start()

    # ZeRO 0 in fp32: no one checks the gradients (under ZeRO 1/2 DeepSpeed or lgp_ds would),
    # so the loss check alone skips the step
    ds_config = tmp_path / "zero0.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 0},
                                     "steps_per_print": 10 ** 9}))
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    args = ARGS + ["max_steps=12", "save_every=2", "max_nonfinite_steps=2"]
    log = _finish(_start(tmp_path, out, args, faults={"NAN": "1:3", "KILL": "1:4"}, dump=dump,
                         ds_config=ds_config))
    assert "exits with return code = -9" in log, log[-3000:]
    assert "error on rank 0: collective" in log and "failed on rank 0" in log, log[-3000:]
    assert _tags(out) == {"step00000002": True, "step00000004": False}
    weights = [dict(line.split() for line in (dump / f"weights{r}.txt").read_text().splitlines())
               for r in range(2)]
    assert weights[0] == weights[1] and list(weights[0]) == ["1", "2", "3", "4"]
    assert weights[0]["3"] == weights[0]["2"] != weights[0]["4"]  # step 3 skipped on both ranks
    assert [(r["step"], r["skipped_steps"], r["nonfinite_steps"]) for r in _records(out)] == [
        (1, 0, 0), (2, 0, 0), (3, 1, 1)]

    log = _finish(_start(tmp_path, out, args + ["resume=auto"], faults={"NAN": "0:3,5,6,7,9"},
                         ds_config=ds_config))
    assert f"resumed from {out / 'checkpoints' / 'step00000002'} at step 2" in log, log[-3000:]
    assert "error on rank 0: step 7: 3 optimizer steps in a row had a non-finite loss" in log
    assert "exits with return code = 1" in log
    # step 4 rewritten complete; step 6 (inside the non-finite run) and later never written
    assert _tags(out) == {"step00000002": True, "step00000004": True}
    records = _records(out)
    assert [(r["step"], r["skipped_steps"], r["nonfinite_steps"]) for r in records] == [
        (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 1, 1), (5, 2, 2), (6, 3, 3)]
    # The LR schedule stands still on a skipped step: step 4 applies the LR step 3 would have.
    lrs = [r["lr"]["stage3"] for r in records]
    assert lrs[2] == lrs[1] != lrs[3]
    assert abs(lrs[3] / lrs[1] - lr_factor(3, 20, 10) / lr_factor(2, 20, 10)) < 1e-12

    waiter.join()
    assert hung.returncode != 0
    assert "Timed out" in hung_end["log"] and "collective_timeout_s=8" in hung_end["log"], \
        hung_end["log"][-3000:]
    # bound: the timeout, then the hung rank's stop grace (2 x 8 s) or the launcher's 30 s; the
    # hang itself lasts 300 s (the slack is for a machine busy with other tests)
    assert (hung_dump / "hang_began").exists(), hung_end["log"][-3000:]  # failed in the hang
    hang_began = float((hung_dump / "hang_began").read_text())
    assert hung_end["at"] - hang_began < 8 + 30 + 30, hung_end["at"] - hang_began
    assert not list(hung_out.glob("checkpoints/step*"))



def test_sigterm_saves_and_resume_continues_the_same_run(tmp_path):
    """SIGTERM to the launcher (as scancel or SLURM pre-emption send it) during step 3: both
    ranks stop at the same step with a complete checkpoint, and resume=auto then ends where an
    uninterrupted run ends, bit for bit; keep_checkpoints=2 keeps the newest two. With a
    DataLoader worker per rank: the launcher signals it too, and it must not take its rank down."""
    args = [a for a in ARGS if a != "num_workers=0"] + [
        "num_workers=1", "max_steps=6", "save_every=2", "keep_checkpoints=2"]
    straight = _start(tmp_path, tmp_path / "straight", args)
    out = tmp_path / "run"
    log = _finish(_start(tmp_path, out, args, faults={"TERM": "0:3"}))
    stopped = int(log.split("stopped at step ")[1].split()[0]) if "stopped at" in log else None
    assert stopped in (3, 4), log[-3000:]
    assert "got SIGTERM" in log and "Traceback" not in log
    assert checkpoint.newest_complete(str(out / "checkpoints"))[1] == f"step{stopped:08d}"
    log = _finish(_start(tmp_path, out, args + ["resume=auto"]))
    assert f"at step {stopped}," in log and "step 6/6" in log, log[-3000:]
    _finish(straight)
    assert _tags(out) == _tags(tmp_path / "straight") == {"step00000004": True,
                                                          "step00000006": True}
    same = ("step", "epoch", "loss", "lr", "momentum", "skipped_steps", "nonfinite_steps")
    assert [{k: r[k] for k in same} for r in _records(out)] == [
        {k: r[k] for k in same} for r in _records(tmp_path / "straight")]
    final = [torch.load(run / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
             for run in (out, tmp_path / "straight")]
    for key in ("module", "momentum"):  # weights and momentum encoder, bit-identical
        assert final[0][key].keys() == final[1][key].keys()
        for name, value in final[1][key].items():
            assert torch.equal(final[0][key][name], value), (key, name)

def test_retention_keeps_the_newest_complete_checkpoints(tmp_path):
    """prune keeps the k newest complete checkpoints up to the one just written, removes older
    ones and incomplete leftovers, and leaves checkpoints of later steps alone."""
    for step, complete in ((1, True), (2, True), (3, False), (4, True), (5, True), (7, True)):
        folder = tmp_path / f"step{step:08d}"
        folder.mkdir()
        (folder / "mp_rank_00_model_states.pt").write_text("")
        if complete:
            (folder / checkpoint.COMPLETE_MARKER).write_text("{}")
    assert checkpoint.prune(str(tmp_path), "step00000005", keep=2) == [
        "step00000003", "step00000002", "step00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step00000004", "step00000005", "step00000007"]
    assert checkpoint.prune(str(tmp_path), "step00000005", keep=1) == ["step00000004"]
    with pytest.raises(ValueError, match="complete"):
        checkpoint.prune(str(tmp_path), "step00000006", keep=1)


# (ds_configs/ file, extra DeepSpeed keys, anchor weight, poisoned step) -> whether lgp_ds
# checks the gradients
GRADIENT_CHECKS = [
    (("zero2_bf16.json", {}, 0.0, 2), True),  # bf16 gradient partitions
    (("zero2_bf16.json", {}, 1e-3, 2), True),  # fp32 ones (the anchor's accumulation), anchored
    (("zero1_bf16.json", {}, 0.0, 2), True),
    (("zero1_bf16.json", {}, 1e-3, 2), False),  # DeepSpeed's BF16_Optimizer checks its norm
    (("cpu_demo.json", {}, 0.0, 2), True),  # fp32
    (("zero2_bf16.json", {"bf16": {"enabled": True, "check_grad_overflow": True}}, 0.0, 2),
     False),
    (("cpu_demo.json", {"zero_optimization": {"stage": 0}}, 0.0, 2), True),  # the torch optimizer
    # the first step skipped: DeepSpeed links its optimizer state at the next one
    (("zero2_bf16.json", {}, 0.0, 1), True),
]


def test_nonfinite_gradients_skip_the_step_on_every_rank(tmp_path):
    """A NaN gradient behind a finite loss on one rank (step 2 of 3): the step is skipped on
    both ranks (no weight, momentum or LR change), counted, and the next step trains. The
    shipped bf16 ZeRO 1/2 configs turn DeepSpeed's per-tensor checks off, so lgp_ds's own check
    is what catches it there; with DeepSpeed's check on (or its BF16_Optimizer) the outcome is
    the same."""
    from lgp_ds.models.vit import create_vit
    from multirank import run_ranks

    import jobs
    cfg = jobs.tiny_config()
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    torch.save({"model": encoder.state_dict()}, tmp_path / "mim.pth")
    cases = [case for case, _ in GRADIENT_CHECKS]
    ranks = run_ranks(jobs.nonfinite_gradient_job, cases, str(tmp_path / "mim.pth"),
                      str(tmp_path))
    def agreed(result):  # what must be the same on every rank (each has its own loss)
        return {i: [{k: v for k, v in s.items() if k != "loss"} for s in r["steps"]]
                for i, r in result.items()}
    assert agreed(ranks[0]) == agreed(ranks[1]), "the ranks disagree"
    for i, (case, lgp_ds_checks) in enumerate(GRADIENT_CHECKS):
        result, poisoned = ranks[0][i], case[3]
        assert result["checks_gradients"] == lgp_ds_checks, case
        steps = result["steps"]
        assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps), (case, steps)
        trained = [step != poisoned for step in (1, 2, 3)]
        assert [s["changed"] for s in steps] == trained, (case, steps)
        assert [s["momentum_changed"] for s in steps] == trained, (case, steps)
        assert [(s["skipped"], s["nonfinite"]) for s in steps] == [
            (int(step >= poisoned),) * 2 for step in (1, 2, 3)], case
        lrs = [result["lr"]] + [s["lr"] for s in steps]
        assert lrs[poisoned] == lrs[poisoned - 1], (case, lrs)  # the schedule stood still
        # the skip leaves the LR scheduler's hook on optimizer.step() (torch warns without it)
        assert not any("optimizer.step()" in w for w in result["warnings"]), result["warnings"]
    # DeepSpeed links its optimizer state to the parameters (of its first group) at the first
    # applied step, skipped ones before it or not
    for rank in ranks:
        assert rank[len(GRADIENT_CHECKS) - 1]["linked"] == rank[0]["linked"] > 0

"""The README's main job, launched as users launch it (deepspeed launcher, 2 CPU ranks), with
few steps: four pre-training runs, five encoders evaluated, one table."""
import json
import math
import os
import subprocess

from entry_points import PreloadedPython
from multirank import free_port

from lgp_ds.eval.report import PROTOCOLS, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["random init", "mae", "moco", "mim2cl_frozen", "graft"]


def _compare(tmp_path, *args, python=None):
    """launch/compare.py through the deepspeed launcher on 2 ranks, or with ``python`` (one
    process, for input refused before training)."""
    port = free_port()
    cmd = ["launch/compare.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
           "--output_dir", str(tmp_path / "compare"), *args]
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"), MASTER_PORT=str(port))
    if python:
        return python.run(cmd, cwd=ROOT, env=env, timeout=900)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port)] + cmd
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_the_comparison_runs_end_to_end_and_fills_every_cell(tmp_path):
    fast = ["max_steps=3", "log_every=3", "--linear_epochs", "3"]
    proc = _compare(tmp_path, *fast)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "compare"
    for i, run in enumerate(["mae", "graft", "moco", "mim2cl_frozen"]):
        assert f"== run {i + 1}/4: {run} " in proc.stdout  # progress: which run
        assert (out / run / "checkpoints" / "step00000003" / "lgp_ds_complete").exists()
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ROWS
    for row in results.values():
        assert set(row) == set(PROTOCOLS)
        for protocol in row.values():
            assert math.isfinite(protocol["top1"]) and 0 <= protocol["top1"] <= 100
    # the labelled images each protocol used: every train image, or a balanced tenth of them
    assert {r["knn"]["labels"] for r in results.values()} == {1347}
    assert {r["logreg"]["labels"] for r in results.values()} == {130}
    subset = (out / "subset.txt").read_text().split()
    assert len(subset) == len(set(subset)) == 130
    table = (out / "results.md").read_text()
    assert table == markdown(results, table.splitlines()[0]) and table in proc.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no pre-training image is held out, none of the held-out ones was trained on
    assert "450 held-out images" in table

    # A second run into the folder, one step longer, continues what it can: mae and moco resume
    # at step 3; graft and mim2cl_frozen, grafted from the 3-step MAE, are set aside and train
    # again from the 4-step one. The random encoder's cached features give its row unchanged.
    again = _compare(tmp_path, "max_steps=4", "log_every=1", "--linear_epochs", "3")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for run in ["mae", "moco"]:
        assert f"resumed from {out / run / 'checkpoints' / 'step00000003'} at step 3" in again.stdout
    for run in ["graft", "mim2cl_frozen"]:
        assert f"{out / run}: its checkpoints started from other weights" in again.stdout
        assert (out / f"{run}.old" / "checkpoints" / "step00000003").exists()
        steps = [d for d in os.listdir(out / run / "checkpoints") if d.startswith("step")]
        assert steps == ["step00000004"]
    assert again.stdout.count("step 1/4 ") == 2  # graft and mim2cl_frozen from step 0
    rerun = json.loads((out / "results.json").read_text())["results"]
    assert rerun["random init"] == results["random init"]
    results = rerun

    # launch/evaluate.py on one of those runs, with that subset file: the same numbers through
    # the user's evaluation entry (features extracted anew into its own folder)
    port = free_port()
    proc = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/evaluate.py",
         str(out / "graft"), "--output_dir", str(tmp_path / "eval"), "--protocols", "knn,logreg",
         "--subset", str(out / "subset.txt")],
        cwd=ROOT, env=dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"),
                           MASTER_PORT=str(port)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (evaluated,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"].values()
    assert evaluated == {p: results["graft"][p] for p in ("knn", "logreg")}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    # two processes, the imports of compare.py paid once
    with PreloadedPython("lgp_ds.comparison") as python:
        proc = _compare(tmp_path, "--fraction", "2", python=python)
        assert proc.returncode == 2
        assert "error: --fraction 2.0: must lie in (0, 1]" in proc.stderr
        proc = _compare(tmp_path, "tau=-1", python=python)
    assert proc.returncode == 2 and "config key tau=-1" in proc.stderr
    assert not (tmp_path / "compare").exists()

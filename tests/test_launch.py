"""The user's entry point, launched as users launch it: the deepspeed launcher, 2 CPU ranks."""
import json
import os
import subprocess

import pytest
import webdataset as wds
import yaml

from entry_points import PreloadedPython
from multirank import free_port
from tarfiles import png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["img_size=16", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "proj_dim=16",
        "mlp_dim=32", "batch_size=16", "num_workers=1", "log_every=2", "save_every=3",
        "max_steps=4"]
GRAFT = ["launch/graft.py", "--deepspeed_config", "ds_configs/cpu_demo.json"]


@pytest.fixture(scope="module")
def python():
    """Plain ``python`` for the runs of one process (graft.py and finetune.py both run
    lgp_ds.launch): each run still its own process, their ~5 s of imports paid once."""
    with PreloadedPython("lgp_ds.launch") as python:
        yield python


def _launch(tmp_path, args, python=None):
    """launch/graft.py on the cpu_demo config through the deepspeed launcher on 2 ranks, or with
    ``python`` (one process); the finished process."""
    port = free_port()
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"), MASTER_PORT=str(port))
    if python:
        return python.run(GRAFT + args, cwd=ROOT, env=env, timeout=600)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port)] + GRAFT + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_deepspeed_launcher_runs_the_embedded_default(tmp_path, python):
    out = tmp_path / "run"
    proc = _launch(tmp_path, ["--output_dir", str(out)] + TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 4/4" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "epoch", "loss", "lr", "momentum", "anchor", "img_per_s",
                "skipped_steps"} <= set(r)
        assert set(r["lr"]) == {f"stage{s}{x}" for s in (1, 2, 3) for x in ("", "_no_wd")}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["batch_size"] == 16 and cfg["max_steps"] == 4
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"
    assert {p.name for p in ckpts.iterdir() if p.name.startswith("step")} == {
        "step00000003", "step00000004"}
    assert (ckpts / "step00000004" / "lgp_ds_complete").exists()

    # What a user does next with that folder. Each mistake is one error line, and nothing of the
    # run is touched.
    (ckpts / "step00000009").mkdir()  # a save that never finished
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    files = {name: (out / name).read_text() for name in ("config.yaml", "ds_config.json",
                                                        "metrics.jsonl")}
    for extra, message in (
            ([], f"output_dir={out} already holds a run (metrics.jsonl, checkpoints/): continue "
                 f"it with resume=auto, or give a new output_dir"),
            ([f"resume={ckpts / 'step00000009'}"], "incomplete checkpoint"),
            ([f"resume={tmp_path / 'other' / 'checkpoints'}"],
             "is another run's checkpoint: continuing it here would mix the two runs' records")):
        proc = _launch(tmp_path, ["--output_dir", str(out)] + TINY + extra, python)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    # on 2 ranks: rank 0 refuses the checkpoint, and every rank must stop with its one line
    proc = _launch(tmp_path, ["--output_dir", str(out), "resume=auto"] + TINY + ["batch_size=32"])
    assert proc.returncode != 0 and "batch_size=16 -> 32" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {name: (out / name).read_text() for name in files} == files
    # resume= the checkpoints folder (its newest complete checkpoint), overrides on both sides of
    # an option
    proc = _launch(tmp_path, TINY + ["--output_dir", str(out), f"resume={ckpts}", "max_steps=5"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {ckpts / 'step00000004'} at step 4" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]


def test_bad_input_exits_with_the_reason(tmp_path, python):
    base = GRAFT + ["--output_dir", str(tmp_path)]
    for extra, env, message in (
            (["learning_rate=1"], {}, "unknown config key 'learning_rate'"),
            (["batch_size=250"], {"WORLD_SIZE": "4"}, "not divisible by world size 4"),
            (["data=/no/such-{0..3}.tar", "samples_per_epoch=9", "batch_size=8"], {},
             "4 shard(s) missing, e.g. ['/no/such-0.tar'"),
            (["anchor_weight=1e-5"], {}, "anchor_weight=1e-05 needs init="),
            (["anchor_weight=1e-5", "init=mim.pth", "anchor_blocks=7"], {},
             "anchor_blocks=7 exceeds the model depth 6"),
            (["--output_dir", __file__], {}, f"output_dir={__file__}: cannot create it")):
        proc = python.run(base + extra, cwd=ROOT, timeout=300,
                          env=dict(os.environ, MASTER_PORT=str(free_port()), **env))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]


def test_missing_held_out_shards_stop_fine_tuning_before_it_trains(tmp_path, python):
    # found when the trainer is built, not at the first evaluation after steps were spent (the
    # recipe's init=runs/digits_graft left out: no such run in a fresh checkout)
    proc = python.run(
        ["launch/finetune.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
         "--output_dir", str(tmp_path / "run"), "val_data=/no/val-{0..1}.tar", "init=null"],
        cwd=ROOT, timeout=300,
        env=dict(os.environ, MASTER_PORT=str(free_port()), LGP_DS_CACHE=str(tmp_path / "c")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data pattern '/no/val-{0..1}.tar': 2 shard(s) missing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
    # held-out data that fails only when evaluated (no labels): the step's checkpoint is saved
    # before the evaluation, so the failure loses no training
    with wds.TarWriter(str(tmp_path / "val.tar")) as sink:
        sink.write({"__key__": "v0", "png": png(0)})
    proc = python.run(
        ["launch/finetune.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
         "--output_dir", str(tmp_path / "run"), f"val_data={tmp_path / 'val.tar'}",
         "max_steps=2", "save_every=2", "eval_every=2", "init=null"], cwd=ROOT, timeout=300,
        env=dict(os.environ, MASTER_PORT=str(free_port()), LGP_DS_CACHE=str(tmp_path / "c")))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "sample 'v0' in " in proc.stderr and "has no integer class label" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step00000002" / "lgp_ds_complete").exists()


def test_data_without_images_stops_with_one_error_line(tmp_path, python):
    """Samples a DataLoader worker can never decode: the run stops, naming shard and keys."""
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"t-{shard}.tar")) as sink:
            for j in range(8):
                sink.write({"__key__": f"{shard}-{j}", "txt": b"no image", "cls": b"0"})
    proc = _launch(tmp_path, ["--output_dir", str(tmp_path / "run"), f"data={tmp_path}/t-{{0,1}}.tar",
                              "samples_per_epoch=16", "max_corrupt_run=5"] + TINY, python)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error on rank 0: 5 samples in a row could not be used"), last
    assert "has no image (keys found: ['cls', 'txt']" in last and "t-0.tar" in last, last


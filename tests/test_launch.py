"""The user's entry point, launched as users launch it: the deepspeed launcher, 2 CPU ranks."""
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["img_size=16", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "proj_dim=16",
        "mlp_dim=32", "batch_size=16", "num_workers=1", "log_every=2", "save_every=3",
        "max_steps=4"]


def test_deepspeed_launcher_runs_the_embedded_default(tmp_path):
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", "29533", "launch/graft.py",
           "--deepspeed_config", "ds_configs/cpu_demo.json", "--output_dir", str(out)] + TINY
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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


def test_bad_input_exits_with_the_reason(tmp_path):
    base = [sys.executable, "launch/graft.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
            "--output_dir", str(tmp_path)]
    for extra, env, message in (
            (["learning_rate=1"], {}, "unknown config key 'learning_rate'"),
            (["batch_size=250"], {"WORLD_SIZE": "4"}, "not divisible by world size 4"),
            (["data=/no/such-{0..3}.tar", "samples_per_epoch=9", "batch_size=8"], {},
             "4 shard(s) missing, e.g. ['/no/such-0.tar'")):
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, **env))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]


def test_two_nodes_with_a_hostfile(tmp_path):
    """A 2-node world on one machine: one launcher per node, as on a cluster without ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    out = tmp_path / "run"
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen(
        ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
         "--master_addr", "127.0.0.1", "--master_port", "29547", "launch/graft.py",
         "--deepspeed_config", "ds_configs/cpu_demo.json", "--output_dir", str(out)] + TINY,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (1, 0)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[1][-3000:] + logs[0][-3000:]
    ds_config = json.loads((out / "ds_config.json").read_text())
    assert ds_config["train_micro_batch_size_per_gpu"] == 8  # 16 over a world of 2
    assert (out / "checkpoints" / "step00000004" / "lgp_ds_complete").exists()

"""Running on a cluster, simulated on this machine: one deepspeed launcher per "node" without ssh,
as launch/slurm_graft.sh starts them, and the metrics that DeepSpeed's monitors receive."""
import csv
import importlib.util
import json
import os
import subprocess

import pytest
import torch

from lgp_ds.engine.monitoring import MONITOR_PACKAGES, check_monitor_packages, monitor_events
from multirank import free_port
from tarfiles import numbered_shards
from test_launch import ROOT, TINY

SHARDS, SHARD_SIZE, EPOCHS = 4, 8, 2


def test_two_nodes_read_each_shard_once_and_agree(tmp_path):
    """Two launchers, one per node (``--no_ssh --node_rank``), a world of 2 ranks: both end with
    the weights and momentum encoder that the checkpoint holds, every sample (so every shard) was
    trained on exactly once per epoch across the nodes, and the CSV monitor got every metric."""
    data = numbered_shards(tmp_path, [SHARD_SIZE] * SHARDS)  # sample i has label i
    ds_config = json.loads(open(os.path.join(ROOT, "ds_configs", "cpu_demo.json")).read())
    ds_config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"),
                                "job_name": "graft"}
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    out, dump, port = tmp_path / "run", tmp_path / "dump", free_port()
    dump.mkdir()
    # 32 samples, 16 a step: 2 steps an epoch, each rank reading 2 of the 4 shards. A shuffle
    # buffer of 1: a larger one, filled from the reader's endless cycle over its shards, mixes
    # the head of its next pass into the epoch's last samples.
    args = TINY + [f"data={data}", f"samples_per_epoch={SHARDS * SHARD_SIZE}",
                   f"epochs={EPOCHS}", "max_steps=null", "num_workers=0", "shuffle_buffer=1",
                   "log_every=1", "save_every=2"]
    env = dict(os.environ, LGP_DS_DUMP=str(dump))
    procs = [subprocess.Popen(
        ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node}",
         "--num_nodes=2", "--num_gpus=1", "--master_addr=127.0.0.1", f"--master_port={port}",
         "tests/cluster_jobs.py", "--deepspeed_config", str(tmp_path / "ds.json"),
         "--output_dir", str(out)] + args,
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (1, 0)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[1][-3000:] + logs[0][-3000:]
    assert "step 4/4" in logs[1]  # node 0 logs

    assert json.loads((out / "ds_config.json").read_text())[
        "train_micro_batch_size_per_gpu"] == 8  # 16 over a world of 2
    last = out / "checkpoints" / "step00000004"
    assert (last / "lgp_ds_complete").exists()
    saved = torch.load(last / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2
        # ZeRO 2 on gloo: the weights are all-gathered and the EMA all-reduced, so bit-equal
        assert rank["weights"].keys() == saved["module"].keys()
        for name, value in saved["module"].items():
            assert torch.equal(rank["weights"][name], value), name
        assert rank["momentum"].keys() == saved["momentum"].keys()
        for name, value in saved["momentum"].items():
            assert torch.equal(rank["momentum"][name], value), name
    for epoch in range(EPOCHS):
        seen = ranks[0]["labels"][epoch] + ranks[1]["labels"][epoch]
        assert sorted(seen) == list(range(SHARDS * SHARD_SIZE)), epoch
        # each rank's shards whole: a shard is never split between the nodes
        for rank in ranks:
            assert len({label // SHARD_SIZE for label in rank["labels"][epoch]}) == 2

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["peak_mem_gib"] > 0 for r in records)
    # Each number of each record as DeepSpeed's CSV monitor names it: Train_<key>.csv, a dict's
    # entries Train_<key>_<entry>.csv; its rows (samples trained on, value) in the order logged,
    # exactly. The samples are the x of DeepSpeed's own events: 16 a step.
    expected = {}
    for r in records:
        for key, value in r.items():
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            for entry, v in entries:
                name = f"Train_{key}" + (f"_{entry}" if entry else "")
                expected.setdefault(name, [["step", entry or key]]).append([16 * r["step"], v])
    folder = tmp_path / "csv" / "graft"
    with open(folder / "Train_Samples_lr.csv") as f:  # written by DeepSpeed's engine each step
        assert [int(row[0]) for row in list(csv.reader(f))[1:]] == [16, 32, 48, 64]
    for name, rows in expected.items():
        with open(folder / f"{name}.csv") as f:
            written = list(csv.reader(f))
        assert written[0] == rows[0], name
        assert [[int(s), float(v)] for s, v in written[1:]] == rows[1:], name
    assert {"Train_loss", "Train_lr_stage3", "Train_momentum", "Train_peak_mem_gib"} <= set(
        expected)


def test_monitor_events_name_training_and_evaluation_values():
    record = {"step": 7, "epoch": 1, "loss": 0.5, "lr": {"stage1": 1e-4, "stage3": 1e-3},
              "skipped_steps": 0, "note": "text", "knn": 61.5}
    assert monitor_events(record, 224, evaluated={"knn": 61.5}) == [
        ("Train/step", 7, 224), ("Train/epoch", 1, 224), ("Train/loss", 0.5, 224),
        ("Train/lr/stage1", 1e-4, 224), ("Train/lr/stage3", 1e-3, 224),
        ("Train/skipped_steps", 0, 224), ("Eval/knn", 61.5, 224)]


@pytest.mark.parametrize("section", sorted(MONITOR_PACKAGES))
def test_a_monitor_without_its_package_is_refused(section):
    package = MONITOR_PACKAGES[section]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ValueError, match=f"section '{section}' is enabled but the package "
                                         f"'{package}' is not installed: pip install {package}"):
        check_monitor_packages({section: {"enabled": True}, "csv_monitor": {"enabled": True}})
    check_monitor_packages({section: {"enabled": False}})

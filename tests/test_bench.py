"""tools/bench.py runs the real trainer and the official-style baseline and reports throughput
(no speed is asserted here)."""
import json
import os
import re
import subprocess
import sys

import pytest

from lgp_ds.benchmark.measure import busy_us, host_waits
from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["img_size=16", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "proj_dim=16",
        "mlp_dim=32", "batch_size=8", "num_workers=0"]


def test_bench_reports_step_and_data_throughput(tmp_path):
    base = [sys.executable, "tools/bench.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
            "--steps", "2", "--warmup", "1"]
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path), MASTER_PORT=str(free_port()))
    out, prof = tmp_path / "bench.json", tmp_path / "prof"
    step = subprocess.run(base + TINY + ["--json", str(out), "--profile", str(prof)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert step.returncode == 0, step.stderr[-3000:]
    assert re.search(r"batch 8/rank x 1 rank\(s\) on cpu; bf16 matmul peak [\d.]+ TFLOP/s "
                     r"\(measured\)", step.stdout), step.stdout
    record = json.loads(out.read_text())
    assert (record["device"], record["ranks"], record["batch_per_rank"]) == ("cpu", 1, 8)
    ours, reference = record["rows"]
    assert ours["name"].startswith("lgp_ds (ZeRO 2, fp32") and reference["name"].startswith(
        "official style")
    for r in (ours, reference):  # the printed table holds what the JSON holds
        assert f"| {r['name']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} |" in step.stdout
        assert r["img_per_s"] * r["ms_per_step"] == pytest.approx(8 * 1e3)
        assert r["mfu_percent"] == pytest.approx(
            100 * r["tflops_per_device"] / record["bf16_matmul_peak_tflops"])
        assert r["tflops_per_device"] == pytest.approx(
            record["flops_per_image"] * r["img_per_s"] / 1e12)
        assert r["peak_memory_gib"] > 0
    # --profile: a trace of the profiled steps, the report, and its figures in the JSON
    trace = json.loads((prof / "trace_rank0.json").read_text())
    assert {"lgp_ds step 0", "lgp_ds step 2"} <= {e.get("name") for e in trace["traceEvents"]}
    assert ("profile of lgp_ds's step: 3 steps after 1 under torch.profiler; the top 15 ops by "
            "self CPU time (all steps); trace " + str(prof / "trace_rank0.json")) in step.stdout
    assert re.search(r"per step: wall [\d.]+ ms \(device busy time and host-device "
                     r"synchronisations are counted on a GPU only\)", step.stdout), step.stdout
    profile = record["profile"]
    assert profile["wall_ms"] > 0 and profile["trace"] == str(prof / "trace_rank0.json")
    assert (profile["steps"], profile["device_busy_ms"], profile["syncs"]) == (3, None, None)
    data = subprocess.run(base + TINY + ["--data_only", "--images", "16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert data.returncode == 0, data.stderr[-3000:]
    assert "16 photo-like 500x375 JPEGs" in data.stdout, data.stdout
    for views in ("MoCo v3, 2 views", "MAE, 1 view"):
        assert re.search(rf"\| {views} \| torchvision \(CPU\) \| [\d.]+ \| [\d.]+ \| 1.00x \|\n"
                         rf"\| {views} \| crops \(CPU\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|\n"
                         rf"\| {views} \| \+ the rest \(cpu\) \| [\d.]+ \| \| \|",
                         data.stdout), data.stdout


def test_bench_runs_the_vit_l_recipe_as_shipped(tmp_path):
    """The README's command: the ViT-L recipe has the MIM anchor and no init= (shrunk here)."""
    cmd = [sys.executable, "tools/bench.py", "--deepspeed_config", "ds_configs/zero1_bf16.json",
           "--config", "vit_l_graft", "--steps", "2", "--warmup", "1", "--no_reference"
           ] + TINY + ["anchor_blocks=2"]
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path), MASTER_PORT=str(free_port()),
               TMPDIR=str(tmp_path))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vit_large_patch16_224 16px batch 8/rank x 1 rank(s) on cpu" in proc.stdout, proc.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lgp_ds_bench")] == []


def test_bench_runs_every_kind_of_method(tmp_path):
    """MAE (one view, masked encoder), MTL (three views, momentum encoder and decoder; uint8 crops
    that the step augments on the device) and fine-tuning (labels), shrunk from their ViT-B
    recipes (the init= stand-in a grafting recipe needs: the ViT-L test above)."""
    decoder = ["decoder_embed_dim=16", "decoder_depth=1", "decoder_num_heads=2"]
    for recipe, extra in (("vit_b_mae", []), ("vit_b_mtl", ["augment_on=device"]),
                          ("vit_b_finetune", [])):
        cmd = [sys.executable, "tools/bench.py", "--deepspeed_config", "ds_configs/cpu_demo.json",
               "--config", recipe, "--steps", "1", "--warmup", "1"] + TINY + decoder + extra
        env = dict(os.environ, LGP_DS_CACHE=str(tmp_path), MASTER_PORT=str(free_port()),
                   TMPDIR=str(tmp_path))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        method = recipe.removeprefix("vit_b_")
        assert f"{method} vit_base_patch16_224 16px batch 8/rank x 1 rank(s) on cpu" in proc.stdout
        assert re.search(r"\| official style \(.*\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+% \| "
                         r"[\d.]+ GiB \| 1.00x \|", proc.stdout), proc.stdout


def test_profile_counts_device_busy_time_and_host_waits():
    """--profile's GPU figures, on a made-up trace: overlapping device intervals count once, and
    only the host's waits inside the steps count (a cudaMemcpyAsync to pageable host memory, not
    one to pinned memory nor one to the device)."""
    def x(cat, name, ts, dur, corr=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {} if corr is None else {"correlation": corr}}
    events = [x("kernel", "gemm", 0, 10), x("kernel", "gemm", 5, 10),  # 0-15
              x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 20, 2, corr=7),
              x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 30, 1, corr=8),
              x("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 35, 1, corr=9),
              x("gpu_memset", "Memset (Device)", 40, 3), x("gpu_user_annotation", "s", 0, 50),
              x("user_annotation", "lgp_ds step 0", 0, 100),
              x("cuda_runtime", "cudaMemcpyAsync", 18, 1, corr=7),
              x("cuda_runtime", "cudaMemcpyAsync", 28, 1, corr=8),
              x("cuda_runtime", "cudaMemcpyAsync", 33, 1, corr=9),
              x("cuda_runtime", "cudaStreamSynchronize", 19, 3),
              x("cuda_runtime", "cudaLaunchKernel", 1, 1),
              x("cuda_runtime", "cudaDeviceSynchronize", 150, 1)]  # after the step
    assert busy_us(events) == 15 + 2 + 1 + 1 + 3
    assert host_waits(events) == {"cudaMemcpyAsync DtoH": 1, "cudaStreamSynchronize": 1}

"""tools/bench.py runs the real trainer and the official-style baseline and reports throughput
(no speed is asserted here)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch.utils.flop_counter import FlopCounterMode

from lgp_ds.benchmark.flops import flops_per_image
from lgp_ds.benchmark.measure import busy_us, host_waits
from lgp_ds.benchmark.reference import OfficialStyleStep
from lgp_ds.benchmark.step import synthetic_batch, write_stand_in
from lgp_ds.config import load_config
from lgp_ds.engine.param_groups import freeze_lower_stages
from lgp_ds.methods import build_method
from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["img_size=16", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "proj_dim=16",
        "mlp_dim=32", "batch_size=8", "num_workers=0"]

DECODER = ["decoder_embed_dim=16", "decoder_depth=1", "decoder_num_heads=2"]


def _frozen_stage_config(recipe: str, tmp_path):
    """``recipe`` shrunk to 6 blocks (2 or 3 stages), from a stand-in init=."""
    keys = TINY + DECODER + ["depth=6"]
    graft = load_config("vit_b_graft", keys)
    write_stand_in(build_method(graft), graft, str(tmp_path / "init.pth"))
    return load_config(recipe, keys + [f"init={tmp_path / 'init.pth'}"])


@pytest.mark.parametrize("recipe", ["vit_b_mim2cl_frozen", "vit_b_cl2mim"])
def test_official_style_step_freezes_the_lower_stages_as_the_trainer_does(recipe, tmp_path):
    """The baseline trains what lgp_ds's step trains (frozen_stages=1 of 2): not the embeddings
    nor the lower stage's three blocks, which get no gradient and are not in its optimizer."""
    cfg = _frozen_stage_config(recipe, tmp_path)
    reference = OfficialStyleStep(cfg, "cpu", accumulation=2)  # one call: gradients kept
    prefix = reference.method.encoder_prefix
    lower = (f"{prefix}cls_token", f"{prefix}pos_embed", f"{prefix}patch_embed.",
             f"{prefix}blocks.0.", f"{prefix}blocks.1.", f"{prefix}blocks.2.",
             "decoder_pos_embed")
    frozen = {n for n, p in reference.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in reference.model.named_parameters() if n.startswith(lower)}
    optimized = {id(p) for g in reference.optimizer.param_groups for p in g["params"]}
    assert all(p.requires_grad for p in reference.model.parameters() if id(p) in optimized)
    views, labels = synthetic_batch(reference.method, cfg, 8, "cpu")
    reference.step(reference.method.device_views(tuple(views)), labels)
    for n, p in reference.model.named_parameters():
        assert (p.grad is None) == (n in frozen), n


@pytest.mark.parametrize("recipe", ["vit_b_graft", "vit_b_mim2cl_frozen"])
def test_flops_count_the_backward_of_what_trains(recipe, tmp_path):
    """flops_per_image equals what torch's FLOP counter counts of a forward and backward of the
    model as the Trainer freezes it, plus the momentum encoder's forward of both views: no
    backward through mim2cl_frozen's lower stage, nor through graft's frozen patch projection."""
    cfg = _frozen_stage_config(recipe, tmp_path)
    method = build_method(cfg)
    torch.manual_seed(cfg.seed)
    model = method.build_model()
    freeze_lower_stages(model, 6, cfg.num_stages, cfg.frozen_stages, method.encoder_prefix)
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    views = tuple(torch.randn(2, 3, 16, 16) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        sum(o.float().sum() for o in model(*views)).backward()
        with torch.no_grad():
            for view in views:
                model.base_encoder(view)
    # the counter counts 2 FLOPs per multiply-add, of a batch of 2, and no norms (fvcore does:
    # 3% at this width); counting mim2cl_frozen's whole backward would be a third more
    assert flops_per_image(method, cfg) == pytest.approx(counter.get_total_flops() / 2, rel=0.05)


def _bench(args: list[str], tmp_path, ds_config: str = "cpu_demo.json") -> subprocess.Popen:
    """tools/bench.py with ``args`` under ``ds_configs/<ds_config>``, started; its cache and
    temporary folders in ``tmp_path``."""
    cmd = [sys.executable, "tools/bench.py", "--deepspeed_config", f"ds_configs/{ds_config}"]
    env = dict(os.environ, LGP_DS_CACHE=str(tmp_path), MASTER_PORT=str(free_port()),
               TMPDIR=str(tmp_path))
    return subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run_bench(args: list[str], tmp_path, ds_config: str = "cpu_demo.json"):
    """:func:`_bench` to its end: (exit status, stdout, stderr)."""
    proc = _bench(args, tmp_path, ds_config)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_bench_reports_step_and_data_throughput(tmp_path):
    base = ["--steps", "2", "--warmup", "1"] + TINY
    out, prof = tmp_path / "new" / "bench.json", tmp_path / "prof"  # --json's folder is made
    status, stdout, stderr = _run_bench(base + ["--json", str(out), "--profile", str(prof)],
                                        tmp_path)
    assert status == 0, stderr[-3000:]
    assert re.search(r"batch 8/rank x 1 rank\(s\) on cpu; bf16 matmul peak [\d.]+ TFLOP/s "
                     r"\(measured\)", stdout), stdout
    record = json.loads(out.read_text())
    assert (record["device"], record["ranks"], record["batch_per_rank"]) == ("cpu", 1, 8)
    ours, reference = record["rows"]
    assert ours["name"].startswith("lgp_ds (ZeRO 2, fp32") and reference["name"].startswith(
        "official style")
    for r in (ours, reference):  # the printed table holds what the JSON holds
        assert f"| {r['name']} | {r['img_per_s']:.1f} | {r['ms_per_step']:.1f} |" in stdout
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
            "self CPU time (all steps); trace " + str(prof / "trace_rank0.json")) in stdout
    assert re.search(r"per step: wall [\d.]+ ms \(device busy time and host-device "
                     r"synchronisations are counted on a GPU only\)", stdout), stdout
    profile = record["profile"]
    assert profile["wall_ms"] > 0 and profile["trace"] == str(prof / "trace_rank0.json")
    assert (profile["steps"], profile["device_busy_ms"], profile["syncs"]) == (3, None, None)
    status, data, stderr = _run_bench(base + ["--data_only", "--images", "16", "--json", str(out)],
                                      tmp_path)
    assert status == 0, stderr[-3000:]
    assert "16 photo-like 500x375 JPEGs" in data, data
    record = json.loads(out.read_text())  # the table's rows
    assert record["data_only"] and record["device"] == "cpu"
    for r in record["rows"]:
        assert f"| {r['views']} | {r['made_by']} | {r['img_per_s']:.1f} |" in data
    for views in ("MoCo v3, 2 views", "MAE, 1 view"):
        assert re.search(rf"\| {views} \| torchvision \(CPU\) \| [\d.]+ \| [\d.]+ \| 1.00x \|\n"
                         rf"\| {views} \| crops \(CPU\) \| [\d.]+ \| [\d.]+ \| [\d.]+x \|\n"
                         rf"\| {views} \| \+ the rest \(cpu\) \| [\d.]+ \| \| \|",
                         data), data


def test_bench_runs_the_vit_l_recipe_as_shipped(tmp_path):
    """The README's command: the ViT-L recipe has the MIM anchor and no init= (shrunk here)."""
    status, stdout, stderr = _run_bench(
        ["--config", "vit_l_graft", "--steps", "2", "--warmup", "1", "--no_reference"] + TINY
        + ["anchor_blocks=2"], tmp_path, "zero1_bf16.json")
    assert status == 0, stderr[-3000:]
    assert "vit_large_patch16_224 16px batch 8/rank x 1 rank(s) on cpu" in stdout, stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("lgp_ds_bench")] == []


def test_bench_runs_every_kind_of_method(tmp_path):
    """MAE (one view, masked encoder), MTL (three views, momentum encoder and decoder; uint8 crops
    that the step augments on the device) and fine-tuning (labels), shrunk from their ViT-B
    recipes (the init= stand-in a grafting recipe needs: the ViT-L test above)."""
    for recipe, extra in (("vit_b_mae", []), ("vit_b_mtl", ["augment_on=device"]),
                          ("vit_b_finetune", [])):
        status, stdout, stderr = _run_bench(["--config", recipe, "--steps", "1", "--warmup", "1"]
                                            + TINY + DECODER + extra, tmp_path)
        assert status == 0, stderr[-3000:]
        method = recipe.removeprefix("vit_b_")
        assert f"{method} vit_base_patch16_224 16px batch 8/rank x 1 rank(s) on cpu" in stdout
        assert re.search(r"\| official style \(.*\) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+% \| "
                         r"[\d.]+ GiB \| 1.00x \|", stdout), stdout


def test_bench_refuses_bad_arguments_before_building_a_model(tmp_path):
    """Wrong counts and combinations stop at the command line; a config that the model refuses
    stops with the same one-line error in the official-style baseline as in the Trainer."""
    for args, message in (
            (["--steps", "0"], "argument --steps: 0 is below 1"),
            (["--data_only", "--profile", "p"], "--profile profiles the training step, which "
                                                "--data_only leaves out: give one"),
            (["--config", "vit_b_mim2cl_frozen", "--steps", "1", "--warmup", "0"],  # 2 stages
             "error on rank 0: num_stages=2 does not divide the model depth 3 into equal "
             "stages\n")):
        status, _, err = _run_bench(args + TINY, tmp_path)
        assert status == 2 and message in err, err[-3000:]
        assert "Traceback" not in err


def test_bench_removes_its_temporary_folder_on_sigterm(tmp_path):
    """bench_matrix.sh's timeout sends SIGTERM: the folder with the stand-in init= goes."""
    proc = _bench(["--config", "vit_l_graft", "--steps", "100000", "--no_reference"] + TINY
                  + ["anchor_blocks=2"], tmp_path)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("lgp_ds_bench_*/init_stand_in.pth")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert list(tmp_path.glob("lgp_ds_bench_*")) == []


def test_bench_matrix_leaves_no_earlier_figures_and_refuses_an_only_that_runs_nothing(tmp_path):
    """A row's JSON and log from an earlier call go before the row runs (here: not started, no
    budget left); an ONLY that is no regular expression, or that matches no row, is an error."""
    def matrix(only: str):
        env = dict(os.environ, OUT=str(tmp_path), BUDGET_S="30", ONLY=only)
        return subprocess.run(["bash", "tools/bench_matrix.sh"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    for name in ("vit_g_graft_zero3.json", "vit_g_graft_zero3.log"):
        (tmp_path / name).write_text("an earlier call's")
    proc = matrix("vit_g_graft_zero3")
    assert proc.returncode == 0 and "vit_g_graft_zero3: not started" in proc.stdout, proc.stderr
    assert not list(tmp_path.glob("vit_g_graft_zero3.*"))
    for only, message in (("(", "ONLY=( is not a valid regular expression"),
                          ("vit_b", "ONLY=vit_b matches no row; the rows: vit_l_graft_zero2 ")):
        proc = matrix(only)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


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

"""lgp_ds.scaling: traffic counted from the models (and checked against the collectives that
DeepSpeed and lgp_ds issue on 2 CPU ranks), memory, the time model's limits, the CLI report."""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from timm.models.vision_transformer import Block

import jobs
from multirank import run_ranks
from scaling_jobs import step_collectives_job
from lgp_ds.config import load_config
from lgp_ds.methods import build_method
from lgp_ds.models.heads import CrossRankBatchNorm1d
from lgp_ds.scaling.counts import ARCHS, count_config, count_model
from lgp_ds.scaling.memory import (MEMORY_RESERVE_GB, activation_bytes, auto_checkpointing,
                                   fewest_checkpointed, memory)
from lgp_ds.scaling.report import (Inputs, ModelScaling, add_arguments, inputs_from_args,
                                   report)
from lgp_ds.scaling.timing import Network
from lgp_ds.scaling.traffic import (PERSISTENCE_THRESHOLD, PREFETCH_BUCKET, REDUCE_BUCKET, SETUPS,
                                    VIEWS, Setup, bytes_per_rank, send_factor, step_comms)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": ("bfloat16", 2), "fp32": ("float32", 4), "fp64": ("float64", 8)}


def _shipped(name: str) -> dict:
    with open(os.path.join(ROOT, "ds_configs", name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny():
    """The tiny config's counts and the same model built on the CPU."""
    cfg = jobs.tiny_config()
    torch.manual_seed(0)
    return count_config(cfg), build_method(cfg).build_model()


@pytest.fixture(scope="module")
def sizes():
    return {name: count_model(name) for name in ARCHS}


def test_counts_equal_the_model_built_on_the_cpu(tiny):
    counts, model = tiny
    params = list(model.parameters())
    assert counts.engine.total == sum(p.numel() for p in params)
    assert counts.engine.trained == sum(p.numel() for p in params if p.requires_grad)
    assert counts.engine.over(100) == sum(p.numel() for p in params if p.numel() > 100)
    assert counts.momentum.total == sum(p.numel() for p in model.base_encoder.parameters())
    assert list(counts.engine_bn) == [m.num_features for m in model.modules()
                                      if isinstance(m, CrossRankBatchNorm1d)]
    assert list(counts.momentum_bn) == [m.num_features for m in model.base_encoder.modules()
                                        if isinstance(m, CrossRankBatchNorm1d)]
    assert counts.tokens == model.base_encoder.pos_embed.shape[1]
    # bf16 parameters of the engine: 2 bytes each, on every rank below ZeRO 3
    assert memory(counts, Setup(2), 8, 4)["params"] == 2 * sum(p.numel() for p in params)


def test_vit_sizes_and_flops(sizes):
    """Encoder sizes as published (ViT-g/14: 1.0B), ViT-L's FLOPs as REFERENCE.md counts them."""
    heads = sizes["ViT-B/16"].engine.total - 86.6e6  # projector and predictor: the same for all
    for name, encoder in (("ViT-B/16", 86.6e6), ("ViT-L/16", 304.3e6), ("ViT-H/14", 632.0e6),
                          ("ViT-g/14", 1011.0e6)):
        assert sizes[name].engine.total - heads == pytest.approx(encoder, rel=0.01), name
    assert sizes["ViT-L/16"].train_flops == pytest.approx(0.99e12, rel=0.01)
    assert sizes["ViT-L/16"].ckpt_blocks == 24 and sizes["ViT-B/16"].ckpt_blocks == 0


def test_fewest_checkpointed_blocks_is_the_first_count_that_fits(sizes):
    """grad_ckpt: N on the lowest blocks: each block checkpointed keeps its bf16 input (2 bytes
    per token and width) instead of its activations; the top block, rebuilt first while nothing
    is freed yet, changes nothing. The fewest that fit is the first count whose memory is in
    budget."""
    m = sizes["ViT-g/14"]

    def total(blocks):
        return sum(memory(dataclasses.replace(m, ckpt_blocks=blocks), Setup(2), 8, 128).values())
    block = activation_bytes(dataclasses.replace(m, ckpt_blocks=0), 128) / m.depth
    block_input = VIEWS * 128 * 2 * m.tokens * m.width
    for blocks in range(1, m.depth):
        assert total(blocks - 1) - total(blocks) == pytest.approx(block - block_input)
    assert total(m.depth) == total(m.depth - 1)
    for blocks in (0, 7, m.depth - 2):
        assert fewest_checkpointed(m, Setup(2), 8, 128, total(blocks)) == blocks
        assert fewest_checkpointed(m, Setup(2), 8, 128, total(blocks) - 1) == blocks + 1
    assert fewest_checkpointed(m, Setup(2), 8, 128, total(m.depth - 1) - 1) is None
    cfg = jobs.tiny_config().model_copy(update={"grad_ckpt": 2})
    assert count_config(cfg).ckpt_blocks == 2  # as the built model checkpoints


def test_auto_checkpointing_is_the_fewest_that_fit_the_device_less_the_reserve(sizes):
    """grad_ckpt: auto picks what the checkpointing table of docs/scaling.md gives for the run's
    stage, ranks and micro-batch in the device's memory less the reserve, and refuses a
    micro-batch that nothing fits."""
    cfg = load_config("vit_g_graft", ["grad_ckpt=auto"])
    m = sizes["ViT-g/14"]
    reserve = MEMORY_RESERVE_GB * 1e9
    for setup, n, batch in ((Setup(2), 8, 128), (Setup(3), 8, 256), (Setup(3), 1, 32)):
        for blocks in (0, 9, m.depth - 2):
            need = sum(memory(dataclasses.replace(m, ckpt_blocks=blocks), setup, n,
                              batch).values())
            assert auto_checkpointing(cfg, setup.stage, n, batch, need + reserve) == blocks
            assert auto_checkpointing(cfg, setup.stage, n, batch, need + reserve - 1) == blocks + 1
    with pytest.raises(ValueError, match="grad_ckpt=auto: 32 images per rank do not fit even "
                                         "with every block checkpointed"):
        auto_checkpointing(cfg, 2, 1, 32, 35e9)  # ViT-g under ZeRO 2 on one GPU: 27 GB


def test_activations_are_what_a_block_saves_for_backward(sizes):
    """The memory model's activations of a block equal what autograd saves in a timm block of
    ViT-L/16 in bf16 with fused attention (as on a GPU: q, k, v, the output and its logsumexp;
    parameters left out), but for the fp32 per-token statistics the model leaves out
    (LayerNorm's mean and rstd, attention's logsumexp: 0.3% at this width)."""
    m = sizes["ViT-L/16"]
    block = Block(m.width, 16, mlp_ratio=m.mlp_width / m.width, qkv_bias=True).bfloat16()
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randn(1, m.tokens, m.width, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    model = activation_bytes(dataclasses.replace(m, ckpt_blocks=0), 1) / (VIEWS * m.depth)
    assert model <= sum(saved.values()) <= 1.005 * model


def test_shipped_configs_give_the_constants():
    zero3 = _shipped("zero3_bf16.json")["zero_optimization"]
    assert zero3["stage3_param_persistence_threshold"] == PERSISTENCE_THRESHOLD
    assert zero3["stage3_prefetch_bucket_size"] == PREFETCH_BUCKET
    for name in ("zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json"):
        assert _shipped(name)["zero_optimization"]["reduce_bucket_size"] == REDUCE_BUCKET


def test_collectives_move_nothing_on_one_gpu(sizes):
    for n in (2, 8, 512):
        assert send_factor("all-reduce", n) == 2 * (n - 1) / n
        assert send_factor("all-gather", n) == send_factor("reduce-scatter", n) == (n - 1) / n
    net = Network()
    for m in sizes.values():
        model = ModelScaling(m, sizes["ViT-L/16"], Inputs())
        for setup in SETUPS:
            for c in step_comms(m, setup, 1, 128):
                assert bytes_per_rank(c, 1) == 0 and net.seconds(c, 1) == 0
            p = model.predict(setup, 1, 128)
            assert p.efficiency(False) == pytest.approx(1) == p.efficiency(True)


def test_key_gather_and_zero3_gathers(tiny):
    counts, model = tiny
    n, batch = 64, 32
    comms = {c.term: c for c in step_comms(counts, Setup(3), n, batch, persistence_threshold=0)}
    keys = comms["contrastive key all-gather"]
    assert keys.size == 2 * n * batch * counts.key_dim * 4  # two gathers of [n * batch, D] fp32
    assert bytes_per_rank(keys, n) == (n - 1) / n * keys.size
    # ZeRO 3 without persistent tensors: the forward pass (both views at once) gathers every
    # parameter, the backward pass the trained ones (the tiny config has no activation
    # checkpointing); the momentum encoder's one forward all of it: Linear and Conv2d weights
    # in bf16, a call for those outside the blocks and one per block; the rest in one fp32 call
    params = list(model.parameters())
    forward = sum(p.numel() for p in params)
    backward = sum(p.numel() for p in params if p.requires_grad)
    assert comms["parameter all-gathers in forward and backward"].size == \
        2 * (forward + backward)
    assert comms["persistent parameter all-gather after the step"].size == 0
    encoder = model.base_encoder
    weights = sum(m.weight.numel() for m in encoder.modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    units = 1 + len(encoder.blocks)
    bf16, fp32 = (comms[f"momentum encoder all-gathers in its forward, {t}"] for t in ("bf16",
                                                                                       "fp32"))
    assert (bf16.size, bf16.calls) == (2 * weights, units)
    assert (fp32.size, fp32.calls) == (4 * (sum(p.numel() for p in encoder.parameters())
                                            - weights), 1)


def test_more_gpus_lower_efficiency(sizes):
    for m in sizes.values():
        model = ModelScaling(m, sizes["ViT-L/16"], Inputs())
        for setup in SETUPS:
            preds = [model.predict(setup, n, 128) for n in (1, 2, 8, 64, 512)]
            worst = [p.efficiency(False) for p in preds]
            assert worst == sorted(worst, reverse=True), (m.name, setup)
            assert all(p.efficiency(True) >= p.efficiency(False) for p in preds)
        # fewer NICs between nodes: slower across nodes, the same within one
        slow = ModelScaling(m, sizes["ViT-L/16"], Inputs(net=Network(nics_per_node=1)))
        for n, slower in ((8, False), (64, True)):
            assert (slow.predict(Setup(0), n, 128).no_overlap
                    > model.predict(Setup(0), n, 128).no_overlap) == slower


def test_full_overlap_hides_the_gradient_buckets_that_fill_before_the_backward_ends(sizes):
    """DeepSpeed reduces a gradient bucket as it fills and the last one after the last
    gradient: ViT-B's trained parameters fit one bucket, so its full-overlap bound hides none of
    ZeRO 2's gradient all-reduce (nor of ZeRO 3's reduce-scatter); ViT-g's hides all but the
    last of its buckets."""
    for name, buckets in (("ViT-B/16", 1), ("ViT-g/14", 6)):
        m = sizes[name]
        assert math.ceil(m.engine.trained / REDUCE_BUCKET) == buckets
        model = ModelScaling(m, sizes["ViT-L/16"], Inputs())
        p = model.predict(Setup(2), 64, 128)
        assert p.no_overlap - p.full_overlap == pytest.approx(
            p.comm["gradient all-reduce"] * (buckets - 1) * REDUCE_BUCKET / m.engine.trained)
    reduce_scatter = next(c for c in step_comms(sizes["ViT-B/16"], Setup(3), 64, 128)
                          if c.term == "gradient reduce-scatter")
    assert reduce_scatter.overlappable == 0


def test_memory_shrinks_with_the_stage(sizes):
    for m in sizes.values():
        totals = [sum(memory(m, Setup(stage), 64, 128).values()) for stage in range(4)]
        assert totals == sorted(totals, reverse=True), m.name
    # fp32 masters, Adam's moments and the step's fp32 gradients, whole or one 64th; with the
    # MIM anchor (ViT-L's recipe) the fp32 gradients are kept anyway and counted as gradients
    plain, anchored = sizes["ViT-B/16"], sizes["ViT-L/16"]
    assert not plain.fp32_grads and anchored.fp32_grads
    assert memory(plain, Setup(0), 64, 128)["optimizer"] == 16 * plain.engine.trained
    assert memory(plain, Setup(2), 64, 128)["optimizer"] == 16 * plain.engine.trained / 64
    assert memory(anchored, Setup(2), 64, 128)["optimizer"] == 12 * anchored.engine.trained / 64
    assert memory(anchored, Setup(1), 64, 128)["grads"] == 6 * anchored.engine.trained


def _totals(calls) -> dict:
    """{(op, dtype): [calls, elements]} of (op, dtype, elements, issuer) calls."""
    totals = {}
    for op, dtype, elements, _ in calls:
        total = totals.setdefault((op, dtype), [0, 0])
        total[0] += 1
        total[1] += elements
    return totals


def test_counts_match_the_collectives_of_a_step_on_two_ranks(tiny, tmp_path):
    """The tiny model's steady-state step under ZeRO 0-3 (shipped bf16 configs; ZeRO 3 with a
    persistence threshold small enough to gather its tensors), and under ZeRO 1 and 2 with the
    MIM anchor (fp32 gradient accumulation: ZeRO 1 runs DeepSpeed's BF16_Optimizer): every
    collective's calls and elements by (op, dtype) equal the count (ZeRO 1/2's parameter
    all-gather a call per flat param group, ZeRO 3's persistent tensors' a call per tensor), but
    ZeRO 3's parameter gathers in forward and backward, which DeepSpeed's reuse and prefetching
    bring below the per-use count, to no fewer than one forward pass."""
    counts, model = tiny
    mim = tmp_path / "mim.pth"
    torch.save({"model": {k: v for k, v in model.base_encoder.state_dict().items()
                          if not k.startswith("head.")}}, mim)
    anchor = dict(init=str(mim), anchor_weight=1e-5, anchor_blocks=2)
    threshold = 100
    zero3 = _shipped("zero3_bf16.json")
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    cases = [("0", {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, {}),
             ("1", _shipped("zero1_bf16.json"), {}), ("2", _shipped("zero2_bf16.json"), {}),
             ("3", zero3, {}), ("1 anchor", _shipped("zero1_bf16.json"), anchor),
             ("2 anchor", _shipped("zero2_bf16.json"), anchor)]
    got = run_ranks(step_collectives_job, cases, str(tmp_path))[0]
    batch = jobs.tiny_config().batch_size // 2
    for name, _, keys in cases:
        m = count_config(jobs.tiny_config(**keys))
        assert m.fp32_grads == bool(keys)
        calls = got[name]
        comms = step_comms(m, Setup(int(name[0])), 2, batch, persistence_threshold=threshold)
        if name == "3":  # the engine's gathers of the tensors over the threshold, apart
            used = next(c for c in comms if c.term.startswith("parameter all-gathers in"))
            comms.remove(used)
            gathers = [c for c in calls if c[:2] == ("all-gather", "bfloat16")
                       and c[2] > threshold and c[3] == "deepspeed"]
            calls = [c for c in calls if c not in gathers]
            gather_calls, elements = _totals(gathers)[("all-gather", "bfloat16")]
            # one forward pass: the first module's tensors, then one prefetch bucket
            assert 2 <= gather_calls <= used.calls, (gather_calls, used.calls)
            assert m.engine.over(threshold) <= elements <= used.size / 2, (elements, used.size)
        want = {}
        for c in comms:
            dtype, size = DTYPES[c.dtype]
            total = want.setdefault((c.op, dtype), [0, 0])
            total[0] += c.calls
            total[1] += c.size / size
        assert _totals(calls) == want, name


def test_cli_prints_the_report():
    proc = subprocess.run([sys.executable, "tools/bench.py", "--scaling", "--gpus", "8,16",
                           "--img_per_s", "300", "--nics_per_node", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "## The grafting step on 8, 16 GPUs, on paper\n" in out  # after DeepSpeed's log line
    assert "one GPU runs ViT-L/16's step at 300 img/s" in out
    assert "1 NIC(s) of 50 GB/s (400 Gb/s) per node, 6.25 GB/s per GPU" in out
    for section in ("### The models", "### Traffic per GPU and step, MB sent, on 16 GPUs",
                    "### Memory per GPU", "### Predicted scaling, 128 images per GPU",
                    "### ZeRO stage to pick"):
        assert section in out
    for name in ARCHS:
        assert f"| {name} | ZeRO 3 |" in out


def test_cli_refuses_gpu_counts_across_partial_nodes():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="12 GPUs: give at most 8 or a multiple of it"):
        inputs_from_args(parser.parse_args(["--scaling", "--gpus", "8,12"]))


def test_a_measured_step_shorter_than_the_optimizer_step_is_refused(sizes):
    """The images' FLOP rate comes from the measured step less the optimizer's: a rate whose
    step is shorter would give a negative one."""
    with pytest.raises(ValueError, match=r"a measured 100000 img/s at 128 images per step is a "
                                         r"step of 1.28 ms, no longer than ViT-L/16's optimizer "
                                         r"step alone \(2.45 ms at 4800 GB/s\)"):
        ModelScaling(sizes["ViT-B/16"], sizes["ViT-L/16"], Inputs(img_per_s=100000))


def test_report_on_one_gpu():
    text = report(Inputs(gpus=(1,)))
    assert text.startswith("## The grafting step on 1 GPU, on paper\n")
    assert "| model | set-up | 1 GPU | largest collective term |" in text
    assert "1 GPUs" not in text

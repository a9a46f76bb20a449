"""The paper's analyses (lgp_ds.analysis, tools/analyze.py): known answers of each computation,
and every command end to end on the embedded data, the gradient conflict also on 2 ranks."""
import importlib.util
import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention

from lgp_ds import convert
from lgp_ds.analysis.attention_distance import (attention_weights, mean_attention_distance,
                                                 uniform_distance)
from lgp_ds.analysis.commands import named_paths
from lgp_ds.analysis.grad_conflict import gradient_cosines
from lgp_ds.analysis.vic import pool_and_normalise, vic_statistics
from lgp_ds.data.builtin import digits_shards
from lgp_ds.models.vit import create_vit
from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "analyze.py")
# The heads of the tiny MTL model around the tiny checkpoint (none of them is in it)
HEADS = ["proj_dim=16", "mlp_dim=32", "decoder_embed_dim=16", "decoder_depth=1",
         "decoder_num_heads=2"]
GRAD = ["--recipe", "digits_mtl", "--batch_size", "4", "--batches", "2"]


# -- gradient conflict ---------------------------------------------------------------------------
def test_gradient_cosines_known_answers():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(4, 3), nn.Linear(3, 2)])
    x = torch.randn(5, 4)
    ones = torch.ones(2, dtype=torch.float64)
    loss = blocks[1](torch.tanh(blocks[0](x))).square().sum()
    assert torch.allclose(gradient_cosines(loss, loss, blocks), ones)
    loss = blocks[1](torch.tanh(blocks[0](x))).square().sum()  # the graph was freed
    assert torch.allclose(gradient_cosines(loss, -loss, blocks), -ones)
    # linear in the parameters: the gradients are the coefficient vectors a and b themselves
    a, b = torch.randn(2, 12 + 3), torch.randn(2, 6 + 2)
    flat = [torch.cat([p.flatten() for p in blk.parameters()]) for blk in blocks]
    loss_a = flat[0] @ a[0] + flat[1] @ b[0]
    loss_b = flat[0] @ a[1] + flat[1] @ b[1]
    expected = torch.stack([torch.cosine_similarity(a[0], a[1], 0),
                            torch.cosine_similarity(b[0], b[1], 0)]).double()
    assert torch.allclose(gradient_cosines(loss_a, loss_b, blocks), expected, atol=1e-6)


# -- attention distance --------------------------------------------------------------------------
def test_mean_attention_distance_of_hand_built_maps():
    """A 2x2 grid of 4 px patches after one class token. Head 0 looks from each patch at the
    diagonally opposite one (4*sqrt(2) px), head 1 half at the class token and half at the
    patch beside it in its row (4 px once renormalised), head 2 at itself (0 px)."""
    t = 5
    attn = torch.zeros(1, 3, t, t)
    opposite, beside = [4, 3, 2, 1], [2, 1, 4, 3]  # token index (1 + patch) of each query patch
    for q in range(4):
        attn[0, 0, 1 + q, opposite[q]] = 1
        attn[0, 1, 1 + q, 0] = attn[0, 1, 1 + q, beside[q]] = 0.5
        attn[0, 2, 1 + q, 1 + q] = 1
    attn[0, :, 0, :] = 1 / t  # the class token's own query: left out
    got = mean_attention_distance(attn, (2, 2), 4, num_prefix_tokens=1)
    assert torch.allclose(got, torch.tensor([4 * math.sqrt(2), 4.0, 0.0], dtype=torch.float64))
    # every key alike: from each patch 0, 4, 4 and 4*sqrt(2) px
    uniform = mean_attention_distance(torch.full((2, 1, t, t), 1 / t), (2, 2), 4)
    assert uniform.item() == pytest.approx(2 + math.sqrt(2))
    assert uniform_distance((2, 2), 4) == pytest.approx(2 + math.sqrt(2))


def test_recomputed_attention_weights_give_timms_fused_output():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 5, 16)
    weights = attention_weights(attn, x)  # [3, 2, 5, 5]
    v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    assert torch.allclose(out, attn(x), atol=1e-5)  # timm's own (fused) forward


# -- VIC -----------------------------------------------------------------------------------------
def test_vic_statistics_known_answers():
    z1 = torch.tensor([[1., -1.], [-1., 1.], [1., -1.], [-1., 1.]])  # columns anti-correlated
    stats = vic_statistics(z1, z1 + 0.5)
    # std over 4 samples (unbiased) sqrt(4/3); covariance matrix [[4/3, -4/3], [-4/3, 4/3]]:
    # off-diagonal squares 2 * 16/9, / D = 2; the views differ by 0.5 everywhere
    assert stats["variance"] == pytest.approx(math.sqrt(4 / 3))
    assert stats["covariance"] == pytest.approx(16 / 9)
    assert stats["invariance"] == pytest.approx(0.25)
    collapsed = vic_statistics(torch.ones(4, 3), torch.ones(4, 3))
    assert collapsed == {"variance": 0.0, "invariance": 0.0, "covariance": 0.0}


def test_pool_and_normalise_leaves_out_the_class_token_and_layer_norms():
    tokens = torch.tensor([[[100., 100., 100.], [1., 2., 3.], [3., 4., 5.]]])  # cls, 2 patches
    z = pool_and_normalise(tokens, num_prefix_tokens=1)  # mean (2, 3, 4) -> LayerNorm
    expected = torch.tensor([[-1., 0., 1.]]) * math.sqrt(3 / 2)
    assert torch.allclose(z, expected, atol=1e-5)


# -- the commands on the embedded data -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny ViT (16 px, 2x2 patches of 8, 3 blocks, 2 heads) as a timm file that
    records its model: no projector, predictor, decoder or momentum encoder."""
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=3,
                     num_heads=2)
    sd = vit.state_dict()
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    convert.write(sd, path, record=convert.model_spec(sd, num_heads=2).record())
    return path


def _analyze(args: list[str]) -> None:
    """tools/analyze.py in this process (one rank, no process group: as ``python`` runs it)."""
    from lgp_ds.analysis.commands import COMMANDS
    spec = importlib.util.spec_from_file_location("analyze_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    parsed = tool.parser().parse_args(args)
    COMMANDS[parsed.command](parsed)


def _outputs(out, name: str) -> dict:
    assert os.path.getsize(out / f"{name}.png") > 1000
    with open(out / f"{name}.json") as f:
        return json.load(f)


def test_every_command_writes_json_and_png_and_two_ranks_match_one(tiny_checkpoint, tmp_path):
    port = free_port()
    two = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(port), TOOL, "grad_conflict",
         "--ckpt", f"tiny={tiny_checkpoint}", "--out", str(tmp_path / "two")] + GRAD + HEADS,
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, MASTER_PORT=str(port)))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "projector: not in the checkpoint, freshly initialised" in two.stdout
    _analyze(["grad_conflict", "--ckpt", f"tiny={tiny_checkpoint}", "--out",
              str(tmp_path / "one")] + GRAD + HEADS)
    single = _outputs(tmp_path / "one", "analysis_grad_conflict")["checkpoints"]["tiny"]
    double = _outputs(tmp_path / "two", "analysis_grad_conflict")["checkpoints"]["tiny"]
    assert len(single["cosine"]) == 2 and len(single["cosine"][0]) == 3  # batches x blocks
    assert torch.allclose(torch.tensor(double["cosine"]), torch.tensor(single["cosine"]),
                          atol=1e-5)
    assert any("decoder" in n and "freshly initialised" in n for n in single["notes"])
    two_ckpts = ["--ckpt", f"a={tiny_checkpoint}", "--ckpt", f"b={tiny_checkpoint}"]
    for command, more in (("attention_distance", two_ckpts + ["--batch_size", "16"]),
                          ("vic", two_ckpts + ["--batch_size", "16"]),
                          ("tsne", ["--ckpt", tiny_checkpoint, "--classes", "0,1,2",
                                    "--per_class", "10"])):
        _analyze([command, "--out", str(tmp_path)] + more)
        record = _outputs(tmp_path, f"analysis_{command}")
        assert record["analysis"] == command
        if command == "attention_distance":  # [block][head] of each checkpoint
            assert [len(b) for b in record["distance"]["b"]] == [2, 2, 2]
            embedded = record["distance"]
    labels = record["checkpoints"]["tiny.safetensors"]["labels"]
    assert sorted(labels) == [0] * 10 + [1] * 10 + [2] * 10
    # the same shards named with --data: the same images, the same numbers
    val_shards = digits_shards(size=16, split="val")[0]
    _analyze(["attention_distance", "--out", str(tmp_path / "data"), "--data", val_shards,
              "--batch_size", "16"] + two_ckpts)
    assert _outputs(tmp_path / "data", "analysis_attention_distance")["distance"] == embedded


def test_bad_input_is_named(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth: no such file or folder"):
        _analyze(["vic", "--ckpt", f"x={tmp_path / 'missing.pth'}"])
    no_blocks = str(tmp_path / "no_blocks.pth")
    sd = convert.read(tiny_checkpoint).base
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.")}, no_blocks)
    with pytest.raises(ValueError, match="no_blocks.pth: the checkpoint has no transformer blocks"):
        _analyze(["grad_conflict", "--ckpt", no_blocks])
    with pytest.raises(ValueError, match=r"no_blocks.pth: not a ViT encoder: no \['blocks"):
        _analyze(["attention_distance", "--ckpt", no_blocks])
    with pytest.raises(ValueError, match=r"--classes \[11\]: no image of that class"):
        _analyze(["tsne", "--ckpt", tiny_checkpoint, "--classes", "1,11"])


def test_checkpoints_are_named_without_splitting_paths(tmp_path):
    run = tmp_path / "blr=1.5e-4"
    run.mkdir()
    assert named_paths([f"mae={tmp_path}", str(run), "runs/a=b/checkpoints"]) == {
        "mae": str(tmp_path), "blr=1.5e-4": str(run), "checkpoints": "runs/a=b/checkpoints"}
    with pytest.raises(ValueError, match="given twice"):
        named_paths(["a=x", "a=y"])

"""tools/convert_ckpt.py: official layouts, DeepSpeed checkpoints, round trips, refusals."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import jobs
from lgp_ds import convert
from lgp_ds.models.moco import build_graft_model
from multirank import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_ckpt  # noqa: E402

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2)


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY, **kw})


@pytest.fixture(scope="module")
def graft():
    """A MoCo/grafting model with distinct base and momentum encoders."""
    torch.manual_seed(0)
    model = build_graft_model(jobs.tiny_config(), cross_rank_bn=False)
    momentum = copy.deepcopy(model.base_encoder)
    with torch.no_grad():
        for p in momentum.parameters():
            p.add_(0.01)
    return model, momentum


def encoder_of(sd):
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def official_files(tmp_path, graft) -> dict:
    model, momentum = graft
    enc = encoder_of(model.base_encoder.state_dict())
    mae_full = {**enc, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.ones(8, 32),
                "decoder_pos_embed": torch.zeros(1, 5, 8)}
    moco = {"epoch": 3, "arch": "vit_tiny", "optimizer": {"state": {}, "param_groups": []},
            "state_dict": {**{f"module.{k}": v for k, v in model.state_dict().items()},
                           **{f"module.momentum_encoder.{k}": v
                              for k, v in momentum.state_dict().items()}}}
    files = {"mae_full.pth": {"model": mae_full}, "mae_encoder.pth": {"model": enc},
             "mae_bare_full.pth": mae_full, "moco_v3.pth.tar": moco, "timm.pth": enc}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in enc.items()}, str(tmp_path / "timm.safetensors"))
    return {"base": enc, "momentum": encoder_of(momentum.state_dict())}


@pytest.mark.parametrize("name,fmt,which", [
    ("mae_full.pth", "mae", "base"), ("mae_encoder.pth", "mae", "base"),
    ("mae_bare_full.pth", "mae", "base"), ("moco_v3.pth.tar", "moco", "base"),
    ("moco_v3.pth.tar", "moco", "momentum"), ("timm.pth", "timm", "base"),
    ("timm.safetensors", "timm", "base")])
def test_official_layouts_convert_to_timm_exactly(tmp_path, graft, name, fmt, which):
    want = official_files(tmp_path, graft)[which]
    src = str(tmp_path / name)
    assert convert.detect(src) == fmt
    dst = tmp_path / "out.safetensors"
    assert convert_ckpt.main([src, str(dst), "--encoder", which]) == 0
    vit = tiny_vit(checkpoint_path=str(dst))  # timm loads it strictly
    got = vit.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_timm_to_init_to_timm_round_trip_is_exact(tmp_path, graft):
    want = official_files(tmp_path, graft)["base"]
    assert convert_ckpt.main([str(tmp_path / "timm.pth"), str(tmp_path / "init.pth"),
                              "--to", "init"]) == 0
    init = torch.load(tmp_path / "init.pth", weights_only=True)
    assert set(init) == {"model"}
    assert convert_ckpt.main([str(tmp_path / "init.pth"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    assert convert_ckpt.main(["--check", str(tmp_path / "timm.pth"), str(tmp_path / "back.pth")]) == 0


def test_moco_round_trip_keeps_both_encoders_and_predictor(tmp_path, graft):
    official_files(tmp_path, graft)
    src, dst = str(tmp_path / "moco_v3.pth.tar"), str(tmp_path / "again.pth")
    assert convert_ckpt.main([src, dst, "--to", "moco"]) == 0
    a, b = convert.read(src), convert.read(dst)
    assert convert.compare(a, b) == (0.0, "", [])
    assert b.momentum is not None and b.predictor is not None


def test_position_embedding_is_resampled_on_request(tmp_path, graft):
    official_files(tmp_path, graft)
    dst = tmp_path / "big.pth"
    assert convert_ckpt.main([str(tmp_path / "mae_full.pth"), str(dst), "--img_size", "32"]) == 0
    vit = tiny_vit(img_size=32, checkpoint_path=str(dst))
    assert vit.pos_embed.shape == (1, 1 + 16, 32)


def test_refusals(tmp_path, graft, capsys):
    official_files(tmp_path, graft)
    torch.save({"model": {"w": torch.zeros(2)}, "hook": print}, tmp_path / "evil.pth")
    assert convert_ckpt.main([str(tmp_path / "evil.pth"), str(tmp_path / "o.pth")]) == 2
    assert "refused to load" in capsys.readouterr().err
    torch.save({"weights": {"layer.w": torch.zeros(2)}}, tmp_path / "odd.pth")
    assert convert_ckpt.main([str(tmp_path / "odd.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "unknown checkpoint layout" in err and "['weights']" in err
    (tmp_path / "taken.pth").write_bytes(b"keep me")
    assert convert_ckpt.main([str(tmp_path / "timm.pth"), str(tmp_path / "taken.pth")]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert (tmp_path / "taken.pth").read_bytes() == b"keep me"
    assert convert_ckpt.main([str(tmp_path / "timm.pth"), str(tmp_path / "taken.pth"), "--force"]) == 0
    assert convert_ckpt.main([str(tmp_path / "timm.pth"), str(tmp_path / "m.pth"), "--to", "moco"]) == 2
    assert "needs both encoders" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no partial outputs left


CASES = [(1, False), (2, True), (3, False)]


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory):
    return run_ranks(jobs.save_job, CASES, str(tmp_path_factory.mktemp("saved")))


@pytest.mark.parametrize("stage,bf16", CASES, ids=["zero1-fp32", "zero2-bf16", "zero3-fp32"])
def test_deepspeed_checkpoint_converts_to_exact_fp32_masters(zero_checkpoints, tmp_path, stage, bf16):
    saved = zero_checkpoints[0][(stage, bf16)]
    weights = convert.read(saved["checkpoints"])
    for name, want in saved["weights"].items():
        part, key = name.split(".", 1)
        got = (weights.base if part == "base_encoder" else weights.predictor)[key]
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    for key, want in saved["momentum"].items():
        assert torch.equal(weights.momentum[key], want), key
    dst = tmp_path / "enc.pth"
    assert convert_ckpt.main([saved["checkpoints"], str(dst), "--to", "mae", "--encoder",
                              "momentum"]) == 0


def test_incomplete_deepspeed_checkpoint_is_refused(zero_checkpoints, tmp_path):
    src = zero_checkpoints[0][(1, False)]["checkpoints"]
    tag = sorted(f for f in os.listdir(src) if f.startswith("step"))[-1]
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", os.path.join(src, tag), str(broken)], check=True)
    os.remove(broken / "lgp_ds_complete")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        convert.read(str(broken))

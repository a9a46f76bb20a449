"""tools/convert_ckpt.py: official layouts, DeepSpeed checkpoints, round trips, refusals."""
import argparse
import copy
import json
import os
import re
import shutil
import sys
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import jobs
from lgp_ds import convert
from lgp_ds.models.moco import GraftModel, build_graft_model
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
    assert set(init) == {"model", "timm_model", "timm_kwargs"}  # MAE layout + the model record
    assert convert_ckpt.main([str(tmp_path / "init.pth"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    assert convert_ckpt.main(["--check", str(tmp_path / "timm.pth"), str(tmp_path / "back.pth")]) == 0


def test_moco_round_trip_keeps_both_encoders_and_predictor(tmp_path, graft):
    official_files(tmp_path, graft)
    src, dst = str(tmp_path / "moco_v3.pth.tar"), str(tmp_path / "again.pth")
    assert convert_ckpt.main([src, dst, "--to", "moco"]) == 0
    a, b = convert.read(src), convert.read(dst)
    assert convert.compare(a, b) == convert.Comparison(0.0, "", [], [])
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


def printed_call(out: str) -> str:
    """The ``timm.create_model(...)`` expression in the converter's summary."""
    calls = re.findall(r"^(?:load it with|its encoder is built by): (timm\.create_model\(.*\))$",
                       out, re.M)
    assert len(calls) == 1, out
    return calls[0]


def run_printed_call(out: str) -> VisionTransformer:
    """Build (and load) the model exactly as the summary tells the user to."""
    return eval(printed_call(out), {"timm": timm})  # our own printed line, nothing else


def features(vit, seed=0, n=3):
    x = torch.randn(n, 3, vit.patch_embed.img_size[0], vit.patch_embed.img_size[1],
                    generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vit.eval()(x)


def test_mae_training_checkpoint_with_args_converts(tmp_path, graft, capsys):
    """MAE's main_pretrain.py saves args (argparse.Namespace), optimizer, epoch and scaler."""
    model, _ = graft
    enc = encoder_of(model.base_encoder.state_dict())
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
                              norm_pix_loss=True, blr=1.5e-4, lr=None, output_dir="./out")
    torch.save({"model": {**enc, "mask_token": torch.zeros(1, 1, 32)},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                "epoch": 799, "scaler": {"scale": 65536.0, "_growth_tracker": 0}, "args": args},
               tmp_path / "checkpoint-799.pth")
    dst = tmp_path / "enc.pth"
    assert convert_ckpt.main([str(tmp_path / "checkpoint-799.pth"), str(dst)]) == 0
    back = torch.load(dst, weights_only=True)
    assert set(back) == set(enc) and all(torch.equal(back[k], enc[k]) for k in enc)
    # its args.model names MAE's ViT-B, which these weights (width 32) are not: said so
    out = capsys.readouterr().out
    assert "num_heads=1 is a guess" in out and "--num_heads N" in out
    assert convert_ckpt.main([str(tmp_path / "checkpoint-799.pth"), str(dst), "--force",
                              "--num_heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out
    trained = copy.deepcopy(model.base_encoder)
    trained.head = torch.nn.Identity()
    assert torch.allclose(features(run_printed_call(out)), features(trained), atol=1e-6)


def test_zip_files_are_mapped_and_legacy_files_read(tmp_path, graft):
    """Files in torch.save's zip format are mapped, not read (the ranks of a node share one copy
    in the page cache, an MAE file's optimizer state is never read); legacy ones are read.
    (Linux: /proc/self/maps lists the mapped files.)"""
    enc = encoder_of(graft[0].base_encoder.state_dict())
    for legacy in (False, True):
        path = tmp_path / f"mae-{legacy}.pth"
        torch.save({"model": enc}, path, _use_new_zipfile_serialization=not legacy)
        got = convert.read(str(path)).encoder()
        assert all(torch.equal(got[k], enc[k]) for k in enc)
        with open("/proc/self/maps") as maps:  # Linux: the files mapped into this process
            assert (str(path) in maps.read()) != legacy
        del got


@pytest.mark.parametrize("mae_model,timm_name,heads", [
    ("mae_vit_base_patch16", "vit_base_patch16_224", 12),
    ("mae_vit_large_patch16", "vit_large_patch16_224", 16),
    ("mae_vit_huge_patch14", "vit_huge_patch14_224", 16)])
def test_mae_args_model_names_the_timm_model(mae_model, timm_name, heads):
    """MAE's models_mae: ViT-B 12 heads, ViT-L 16, ViT-H/14 16 (shapes on the meta device)."""
    with torch.device("meta"):
        sd = timm.create_model(timm_name, num_classes=0).state_dict()
    spec = convert.model_spec(sd, mae_model)
    assert (spec.name, spec.kwargs, spec.notes) == (timm_name, {}, [])
    assert spec.shape["num_heads"] == heads


def test_files_holding_code_are_refused_with_one_line(tmp_path, capsys):
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(model="x"),
                "hook": print}, tmp_path / "evil.pth")
    assert convert_ckpt.main([str(tmp_path / "evil.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "refused to load" in err and "print" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert convert_ckpt.main([str(tmp_path / "junk.pth"), str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable checkpoint" in err


@pytest.mark.parametrize("fmt,other", [("moco", "mae_full.pth"), ("mae", "moco_v3.pth.tar"),
                                       ("timm", "mae_full.pth"), ("timm", "moco_v3.pth.tar"),
                                       ("lgp_ds", "timm.pth"), ("mae", "a_folder")])
def test_forced_format_on_another_layout_is_one_error_line(tmp_path, graft, capsys, fmt, other):
    official_files(tmp_path, graft)
    (tmp_path / "a_folder").mkdir()
    assert convert_ckpt.main([str(tmp_path / other), str(tmp_path / "o.pth"), "--from", fmt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert f"--from {fmt} expects {convert.EXPECTED[fmt]}; found " in err
    assert not (tmp_path / "o.pth").exists()


def moco_v3_vit_small_file(path):
    """An official MoCo v3 checkpoint of its vit_small: timm's ViT with 12 heads (vits.py)."""
    torch.manual_seed(1)
    vit = VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=12, num_classes=0)
    model = GraftModel(vit, dim=16, mlp_dim=32, cross_rank_bn=False)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd.update({k.replace("module.base_encoder.", "module.momentum_encoder."): v
               for k, v in sd.items() if k.startswith("module.base_encoder.")})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd}, path)
    model.base_encoder.head = torch.nn.Identity()
    return model.base_encoder


def test_official_vit_small_converts_to_a_twelve_head_timm_model(tmp_path, capsys):
    official = moco_v3_vit_small_file(tmp_path / "vit-s-300ep.pth.tar")
    dst = tmp_path / "vit_s.safetensors"
    assert convert_ckpt.main([str(tmp_path / "vit-s-300ep.pth.tar"), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "12 heads" in out and "grafting code" in out  # its other vit_small (6 heads) named
    built = run_printed_call(out)
    assert built.blocks[0].attn.num_heads == 12
    want = features(official)
    assert torch.allclose(features(built), want, atol=1e-5)
    with safe_open(str(dst), framework="pt") as f:  # the file itself says how to build it
        meta = f.metadata()
    assert meta["timm_model"] == "vit_small_patch16_224"
    assert json.loads(meta["timm_kwargs"]) == {"num_heads": 12}
    six = timm.create_model("vit_small_patch16_224", num_classes=0, checkpoint_path=str(dst))
    assert not torch.allclose(features(six), want, atol=1e-3)  # loads strictly, computes otherwise
    # a file from the grafting code (its vit_small has 6 heads): --num_heads says so
    spec = convert.model_spec(official.state_dict(), "vit_small", num_heads=6)
    assert (spec.name, spec.kwargs, spec.notes) == ("vit_small_patch16_224", {}, [])


@pytest.mark.parametrize("arch", ["vit_conv_small", "vit_conv_base", None])
def test_convolutional_stem_is_refused_with_the_reason(tmp_path, capsys, arch):
    """MoCo v3's vit_conv_* (its ConvStem: patch_embed.proj.0-12) has no timm model."""
    stem = {"module.base_encoder.patch_embed.proj.0.weight": torch.zeros(4, 3, 3, 3),
            "module.base_encoder.patch_embed.proj.12.weight": torch.zeros(32, 32, 1, 1),
            "module.base_encoder.cls_token": torch.zeros(1, 1, 32)}
    torch.save({"arch": arch, "state_dict": stem}, tmp_path / "conv.pth.tar")
    for to in ("timm", "mae"):
        assert convert_ckpt.main([str(tmp_path / "conv.pth.tar"), str(tmp_path / "o.pth"),
                                  "--to", to]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "convolutional stem" in err, err
        assert "no timm equivalent" in err and (arch is None or arch in err)


# (zero stage, bf16, option): every stage, fp32 and bf16; ZeRO 1 + bf16 + fp32 accumulation is
# DeepSpeed's BF16_Optimizer (what lgp_ds sets when the MIM anchor is on). ZeRO 0 + bf16 with
# FusedAdam (a GPU kernel), whose masters are flat (FP16_Optimizer): tests/gpu_checks.py
CASES = [(0, False, ""), (0, True, ""), (1, False, ""), (1, True, ""),
         (1, True, "fp32accum"), (2, True, ""), (3, False, ""), (3, True, "")]
CASE_IDS = [f"zero{s}-{'bf16' if b else 'fp32'}" + (f"-{opt}" if opt else "") for s, b, opt in CASES]
OPTIMIZERS = {(0, False, ""): "AdamW", (0, True, ""): "FP16_UnfusedOptimizer",
              (1, True, "fp32accum"): "BF16_Optimizer"}


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory):
    return run_ranks(jobs.checkpoint_job, CASES, str(tmp_path_factory.mktemp("saved")))


@pytest.fixture(scope="module")
def initial_encoder():
    """The trainer's base encoder before any step (same seed): frozen values never change."""
    cfg = jobs.tiny_config()
    torch.manual_seed(cfg.seed)
    return build_graft_model(cfg, cross_rank_bn=False).base_encoder


def expected_encoders(saved, initial) -> dict:
    """The fp32 encoders a checkpoint holds: trainable masters, frozen initial values, momentum."""
    frozen = {n: p.detach() for n, p in initial.named_parameters() if not p.requires_grad}
    assert {"pos_embed", "patch_embed.proj.weight"} <= set(frozen)  # the tiny config freezes them
    base = {k.removeprefix("base_encoder."): v for k, v in saved["weights"].items()
            if k.startswith("base_encoder.")}
    return {"base": encoder_of({**base, **frozen}), "momentum": encoder_of(saved["momentum"])}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deepspeed_checkpoint_converts_to_exact_fp32_masters(zero_checkpoints, initial_encoder,
                                                             tmp_path, capsys, case):
    saved = zero_checkpoints[0][case]
    assert saved["optimizer"] == OPTIMIZERS.get(case, saved["optimizer"])
    weights = convert.read(saved["checkpoints"])
    for name, want in saved["weights"].items():
        part, key = name.split(".", 1)
        got = (weights.base if part == "base_encoder" else weights.predictor)[key]
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    for key, want in saved["momentum"].items():
        assert torch.equal(weights.momentum[key], want), key
    expected = expected_encoders(saved, initial_encoder)
    for which, want in expected.items():
        dst = tmp_path / f"{which}.safetensors"
        assert convert_ckpt.main([saved["checkpoints"], str(dst), "--encoder", which]) == 0
        got = run_printed_call(capsys.readouterr().out).state_dict()  # loaded strictly by timm
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), (which, k)


def test_custom_vit_summary_builds_the_trained_model(zero_checkpoints, initial_encoder, tmp_path,
                                                     capsys):
    """img 16, patch 8, width 32, depth 3, 2 heads on top of arch vit_tiny_patch16_224."""
    saved = zero_checkpoints[0][(1, False, "")]
    want = expected_encoders(saved, initial_encoder)["base"]
    trained = build_graft_model(jobs.tiny_config(), cross_rank_bn=False).base_encoder
    trained.head = torch.nn.Identity()
    trained.load_state_dict(want)
    for dst in (tmp_path / "enc.safetensors", tmp_path / "enc.pth", tmp_path / "ft.pth"):
        to = "mae" if dst.name == "ft.pth" else "timm"
        assert convert_ckpt.main([saved["checkpoints"], str(dst), "--to", to]) == 0
        out = capsys.readouterr().out
        assert "patch 8, width 32, depth 3, 2 heads, 16 px input" in out and "note:" not in out
        vit = run_printed_call(out)
        assert vit.patch_embed.img_size == (16, 16) and vit.blocks[0].attn.num_heads == 2
        assert torch.allclose(features(vit), features(trained), atol=1e-6)
    info = convert.convert(saved["checkpoints"], str(tmp_path / "api.pth"))
    vit = timm.create_model(info["timm_model"], **info["timm_kwargs"],
                            checkpoint_path=str(tmp_path / "api.pth"))
    assert torch.allclose(features(vit), features(trained), atol=1e-6)
    # the record in the output keeps the model through a second conversion and --to moco
    assert convert_ckpt.main([str(tmp_path / "enc.safetensors"), str(tmp_path / "again.pth")]) == 0
    assert "2 heads, 16 px input" in capsys.readouterr().out
    assert convert_ckpt.main([saved["checkpoints"], str(tmp_path / "full.pth.tar"), "--to",
                              "moco"]) == 0
    assert "2 heads" in capsys.readouterr().out
    assert convert_ckpt.main([str(tmp_path / "full.pth.tar"), str(tmp_path / "back.pth")]) == 0
    assert torch.allclose(features(run_printed_call(capsys.readouterr().out)), features(trained),
                          atol=1e-6)


def tag_copy(zero_checkpoints, case, dst) -> str:
    """A copy of the newest tag folder of the fixture's checkpoint ``case``, to damage."""
    src = zero_checkpoints[0][case]["checkpoints"]
    tag = sorted(f for f in os.listdir(src) if f.startswith("step"))[-1]
    shutil.copytree(os.path.join(src, tag), dst)
    return str(dst)


def test_incomplete_deepspeed_checkpoint_is_refused(zero_checkpoints, tmp_path):
    broken = tag_copy(zero_checkpoints, (1, False, ""), tmp_path / "broken")
    os.remove(os.path.join(broken, "lgp_ds_complete"))
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        convert.read(broken)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("case,remove", [
    ((3, False, ""), ["zero_pp_rank_1_mp_rank_00_model_states.pt"]),
    ((3, True, ""), ["zero_pp_rank_0_mp_rank_00_model_states.pt"]),
    ((1, False, ""), ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    ((1, True, "fp32accum"), ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    ((2, True, ""), ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])])
def test_deepspeed_checkpoint_missing_rank_files_are_named(zero_checkpoints, tmp_path, capsys,
                                                           case, remove):
    broken = tag_copy(zero_checkpoints, case, tmp_path / "step00000002")
    for name in remove:
        os.remove(os.path.join(broken, name))
    assert convert_ckpt.main([broken, str(tmp_path / "o.pth")]) == 2
    err = one_error_line(capsys)
    if len(remove) == 1:
        assert f"written by 2 ranks, but their files {remove[0]} are missing" in err, err
    else:  # no optimizer file at all (not the masters: the bf16 module copy would be taken)
        assert "ZeRO stage 2, but it holds none of the optimizer states files" in err, err
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.parametrize("case,damaged", [
    ((3, False, ""), "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ((2, True, ""), "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ((3, True, ""), "zero_pp_rank_1_mp_rank_00_model_states.pt"),
    ((1, True, "fp32accum"), "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")])
def test_deepspeed_checkpoint_unreadable_file_is_named(zero_checkpoints, tmp_path, capsys, case,
                                                       damaged):
    broken = tag_copy(zero_checkpoints, case, tmp_path / "step00000002")
    path = os.path.join(broken, damaged)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # truncated, as by a full disk or an interrupted copy
    assert convert_ckpt.main([broken, str(tmp_path / "o.pth")]) == 2
    err = one_error_line(capsys)
    assert f"{path}: not a readable checkpoint file" in err, err


def test_check_exit_status_means_equal_within_atol(zero_checkpoints, tmp_path, capsys):
    src = zero_checkpoints[0][(1, False, "")]["checkpoints"]
    enc = str(tmp_path / "enc.pth")
    assert convert_ckpt.main([src, enc]) == 0
    capsys.readouterr()
    assert convert_ckpt.main(["--check", src, src]) == 0
    # its own timm conversion: the projector, momentum encoder and predictor are not compared
    assert convert_ckpt.main(["--check", src, enc]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^not compared .*base\.head\.\* \(\d+ tensors\)", out, re.M), out
    assert "momentum" in out and "predictor" in out
    sd = torch.load(enc, weights_only=True)
    sd["blocks.0.norm1.weight"] = sd["blocks.0.norm1.weight"] + 1e-3
    torch.save(sd, tmp_path / "changed.pth")
    changed = str(tmp_path / "changed.pth")
    assert convert_ckpt.main(["--check", src, changed]) == 1
    assert "base.blocks.0.norm1.weight" in capsys.readouterr().out
    assert convert_ckpt.main(["--check", src, changed, "--atol", "1e-2"]) == 0
    del sd["blocks.0.norm1.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    assert convert_ckpt.main(["--check", enc, str(tmp_path / "missing.pth"), "--atol", "1"]) == 1
    assert "base.blocks.0.norm1.bias: only in A" in capsys.readouterr().out
    # two runs (fp32 and bf16 training): different values, the same keys
    other = zero_checkpoints[0][(1, True, "")]["checkpoints"]
    assert convert_ckpt.main(["--check", src, other]) == 1


def test_damaged_files_are_one_error_line(tmp_path, capsys):
    """Whatever torch.load raises on a damaged file (KeyError, IndexError, struct.error,
    AssertionError ...) becomes the one ValueError naming the file."""
    obj = {"model": {"cls_token": torch.zeros(1, 1, 8), "w": torch.zeros(20, 20)}}
    torch.save(obj, tmp_path / "zip.pth")
    torch.save(obj, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    path = str(tmp_path / "damaged.pth")
    damaged = []
    for name in ("zip.pth", "legacy.pth"):
        data = (tmp_path / name).read_bytes()
        damaged += [data[:n] for n in range(len(data))]
        damaged += [data[:i] + bytes([43 if data[i] != 43 else 52]) + data[i + 1:]
                    for i in range(len(data))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the unknown pickle protocols
        for data in damaged:
            with open(path, "wb") as f:
                f.write(data)
            try:
                convert.checkpoint_file.load(path)
            except ValueError as e:
                assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
    with open(path, "wb") as f:
        f.write((tmp_path / "legacy.pth").read_bytes()[:28])  # struct.error
    assert convert_ckpt.main([path, str(tmp_path / "o.pth")]) == 2
    assert "not a readable checkpoint file" in one_error_line(capsys)


def test_impossible_options_are_refused(tmp_path, graft, capsys):
    official_files(tmp_path, graft)
    src, dst = str(tmp_path / "timm.pth"), str(tmp_path / "o.pth")
    for option, words in ((["--num_heads", "0"], "num_heads=0"),
                          (["--num_heads", "-2"], "num_heads=-2"),  # divides the width 32
                          (["--img_size", "0"], "--img_size 0"),
                          (["--img_size", "20"], "--img_size 20"),  # patch 8
                          (["--arch", "vit_nonexistent"], "--arch 'vit_nonexistent'")):
        assert convert_ckpt.main([src, dst, *option]) == 2, option
        assert words in one_error_line(capsys)
        assert not os.path.exists(dst)
    (tmp_path / "a_dir").mkdir()
    assert convert_ckpt.main([src, str(tmp_path / "a_dir"), "--force"]) == 2
    assert "is a directory" in one_error_line(capsys)
    assert convert_ckpt.main([src, str(tmp_path / "timm.pth" / "sub" / "o.pth")]) == 2
    one_error_line(capsys)  # an OSError (NotADirectoryError) too

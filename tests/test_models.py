"""The ViT factory switches and loading init= weights (MAE/timm layouts) into the graft model."""
import argparse

import pytest
import torch

import jobs
from lgp_ds.engine.init_weights import read_init
from lgp_ds.models.moco import build_graft_model
from lgp_ds.models.vit import checkpointed_blocks, create_vit, load_weights, set_checkpointing


def _mae_checkpoint(cfg) -> dict:
    """An MAE pre-training checkpoint for cfg's encoder: encoder keys plus decoder and mask token."""
    torch.manual_seed(123)
    enc = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                     embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    state = dict(enc.state_dict())
    state.update({"mask_token": torch.zeros(1, 1, cfg.embed_dim),
                  "decoder_embed.weight": torch.zeros(8, cfg.embed_dim),
                  "decoder_pred.weight": torch.zeros(12, 8)})
    return state


@pytest.mark.parametrize("wrap", [True, False], ids=["model-key", "bare"])
def test_mae_checkpoint_loads_into_base_encoder(tmp_path, wrap):
    cfg = jobs.tiny_config()
    state = _mae_checkpoint(cfg)
    torch.save({"model": state} if wrap else state, tmp_path / "mae.pth")
    model = build_graft_model(cfg, cross_rank_bn=False)
    head_before = model.base_encoder.head[0].weight.clone()
    load_weights(model.base_encoder, read_init(str(tmp_path / "mae.pth")).encoder(), "mae.pth")
    for k, v in model.base_encoder.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, state[k]), k
    assert torch.equal(model.base_encoder.head[0].weight, head_before)  # projector stays random


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = jobs.tiny_config()
    wider = _mae_checkpoint(jobs.tiny_config(embed_dim=64))
    model = build_graft_model(cfg, cross_rank_bn=False)
    with pytest.raises(ValueError, match=r"shape mismatch \['cls_token \(1, 1, 64\) != \(1, 1, 32\)"):
        load_weights(model.base_encoder, wider, "wide.pth")
    deeper = _mae_checkpoint(jobs.tiny_config(depth=4))
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.3.norm1.weight'"):
        load_weights(model.base_encoder, deeper, "deep.pth")
    partial = {k: v for k, v in _mae_checkpoint(cfg).items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.norm1.weight'"):
        load_weights(model.base_encoder, partial, "partial.pth")


def test_non_tensor_pickles_are_not_executed(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"^init=.*evil\.pth: refused to load: .*'object'"):
        read_init(str(tmp_path / "evil.pth"))
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"^init=.*code\.pth: refused to load: .*'print'"):
        read_init(str(tmp_path / "code.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_init(str(tmp_path / "missing.pth"))


def test_mae_training_checkpoint_with_args_loads(tmp_path):
    """MAE's main_pretrain.py saves ``args`` (argparse.Namespace) next to model/optimizer/epoch."""
    cfg = jobs.tiny_config()
    state = _mae_checkpoint(cfg)
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
                              norm_pix_loss=True, blr=1.5e-4, lr=None, output_dir="./out")
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": args}, tmp_path / "checkpoint-799.pth")
    got = read_init(str(tmp_path / "checkpoint-799.pth")).encoder()
    want = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_vit_switches():
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2,
                     num_heads=2, fused_attn=False, grad_ckpt=True, sincos_pos_embed=True,
                     frozen_patch_embed=True)
    assert not vit.blocks[0].attn.fused_attn and checkpointed_blocks(vit) == 2
    assert not vit.pos_embed.requires_grad and not vit.patch_embed.proj.weight.requires_grad
    assert torch.all(vit.pos_embed[0, 0] == 0) and vit.pos_embed[0, 1:].abs().max() <= 1
    x = torch.randn(2, 3, 32, 32)
    out = vit(x)
    out.sum().backward()  # activation checkpointing runs forward and backward
    assert out.shape == (2, 64) and vit.blocks[0].mlp.fc1.weight.grad is not None
    set_checkpointing(vit, 1)  # the lowest block only
    assert checkpointed_blocks(vit) == 1 and not vit.grad_checkpointing
    runs = []
    for blk in vit.blocks:
        blk.register_forward_pre_hook(lambda m, *a: runs.append(m))
    vit(x).sum().backward()
    assert runs == [*vit.blocks, vit.blocks[0]]  # block 0 runs again in backward
    with pytest.raises(ValueError, match=r"grad_ckpt=3 must lie in \[0, 2\], the model's depth"):
        set_checkpointing(vit, 3)
    set_checkpointing(vit, False)
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    assert torch.allclose(vit(x), out, atol=1e-5)  # SDPA == explicit softmax attention

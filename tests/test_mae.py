"""MAE (step i): masking, encoder/decoder, norm-pix loss and state dict keys against references
written here from facebookresearch/mae's models_mae.py, on one process and under ZeRO-3 on 2 ranks.

The references share only the model's weights and its timm Block modules with the code under
test; patch embedding, position embedding tables, masking, unshuffling, patchify and the loss are
re-derived per sample in float64.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mae_jobs
from lgp_ds.config import build_config
from lgp_ds.models.mae import (build_mae_model, decoder_checkpointed, encode_visible,
                               random_masking)
from lgp_ds.models.vit import create_vit
from lgp_ds.objectives import mae_loss
from mae_jobs import ENCODER, GRAD_CKPT, tiny_mae
from multirank import run_ranks

P, L = 4, 16  # the tiny model's patch size and patch count (16 px images)


# ---- independent references ----------------------------------------------------------------

def _official_pos_embed(embed_dim, grid_size):
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), verbatim
    in numpy."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def _patches(imgs, p):
    """[N, L, p*p*3]: patch (i, j) in row-major order, its pixels as (row, column, channel)."""
    n, _, h, w = imgs.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(imgs[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1)
                        .reshape(n, -1))
    return torch.stack(rows, dim=1)


def _reference(model, imgs, noise, mask_ratio=0.75, norm_pix=True):
    """MAE's forward in float64 on a copy of ``model``'s weights, sample by sample.

    Returns (loss, pred [N, L, p*p*3], mask [N, L], kept [N, Lv] patch ids in ascending noise)."""
    m = copy.deepcopy(model).double()
    imgs = imgs.double()
    n = imgs.shape[0]
    lv = max(1, round(L * (1 - mask_ratio)))
    w, b = m.patch_embed.proj.weight, m.patch_embed.proj.bias
    tokens = torch.einsum("nlk,dk->nld", _patches(imgs, P),  # conv of stride p = linear on patches
                          w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)) + b
    tokens = tokens + m.pos_embed[0, 1:]
    preds, masks, kept = [], [], []
    for s in range(n):
        order = sorted(range(L), key=lambda i: noise[s, i].item())
        keep = order[:lv]
        mask = torch.ones(L, dtype=torch.float64)
        mask[keep] = 0
        x = torch.cat([m.cls_token[0] + m.pos_embed[0, :1], tokens[s, keep]])[None]
        for blk in m.blocks:
            x = blk(x)
        x = F.layer_norm(x, x.shape[-1:], m.norm.weight, m.norm.bias, eps=1e-6)
        y = x[0] @ m.decoder_embed.weight.T + m.decoder_embed.bias  # [1 + lv, Dd]
        full = m.mask_token[0].expand(L, -1).clone()
        full[keep] = y[1:]
        x = (torch.cat([y[:1], full]) + m.decoder_pos_embed[0])[None]
        for blk in m.decoder_blocks:
            x = blk(x)
        x = F.layer_norm(x, x.shape[-1:], m.decoder_norm.weight, m.decoder_norm.bias, eps=1e-6)
        preds.append((x[0] @ m.decoder_pred.weight.T + m.decoder_pred.bias)[1:])
        masks.append(mask)
        kept.append(keep)
    pred, mask = torch.stack(preds), torch.stack(masks)
    target = _patches(imgs, P)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask, torch.tensor(kept)


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    # pixels with a per-image offset and scale, as normalised photos have
    imgs = torch.randn(n, 3, 16, 16, generator=g) * 1.5 + torch.randn(n, 1, 1, 1, generator=g)
    return imgs, torch.rand(n, L, generator=g)


def _official_keys(depth, decoder_depth):
    """models_mae.MaskedAutoencoderViT's state dict keys, in its order: the module's own
    parameters, then its submodules in the order __init__ registers them."""
    block = [f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for t in ("weight", "bias")]
    return (["cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
             "patch_embed.proj.weight", "patch_embed.proj.bias"]
            + [f"blocks.{i}.{k}" for i in range(depth) for k in block]
            + ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"]
            + [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block]
            + ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
               "decoder_pred.bias"])


def _official_shapes(d, dd, depth, decoder_depth, p, length):
    """The shape of each official key for encoder width d, decoder width dd, mlp_ratio 4."""
    def block(w):
        return {"norm1.weight": [w], "norm1.bias": [w], "attn.qkv.weight": [3 * w, w],
                "attn.qkv.bias": [3 * w], "attn.proj.weight": [w, w], "attn.proj.bias": [w],
                "norm2.weight": [w], "norm2.bias": [w], "mlp.fc1.weight": [4 * w, w],
                "mlp.fc1.bias": [4 * w], "mlp.fc2.weight": [w, 4 * w], "mlp.fc2.bias": [w]}
    shapes = {"cls_token": [1, 1, d], "pos_embed": [1, length + 1, d], "mask_token": [1, 1, dd],
              "decoder_pos_embed": [1, length + 1, dd], "patch_embed.proj.weight": [d, 3, p, p],
              "patch_embed.proj.bias": [d], "norm.weight": [d], "norm.bias": [d],
              "decoder_embed.weight": [dd, d], "decoder_embed.bias": [dd],
              "decoder_norm.weight": [dd], "decoder_norm.bias": [dd],
              "decoder_pred.weight": [p * p * 3, dd], "decoder_pred.bias": [p * p * 3]}
    shapes.update({f"blocks.{i}.{k}": s for i in range(depth) for k, s in block(d).items()})
    shapes.update({f"decoder_blocks.{i}.{k}": s for i in range(decoder_depth)
                   for k, s in block(dd).items()})
    return shapes


# ---- masking ---------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [4, 10, 16, 49, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.6, 0.75, 0.9, 0.95])
def test_masking_keeps_round_of_the_visible_share_smallest_noise_first(length, ratio):
    g = torch.Generator().manual_seed(length)
    n, d = 3, 2
    x = torch.arange(n * length, dtype=torch.float32).reshape(n, length, 1).expand(n, length, d)
    noise = torch.rand(n, length, generator=g)
    lv = max(1, round(length * (1 - ratio)))
    visible, mask, ids_restore = random_masking(x, ratio, noise)
    assert visible.shape == (n, lv, d) and mask.shape == (n, length)
    assert ids_restore.shape == (n, length)
    for s in range(n):
        order = sorted(range(length), key=lambda i: noise[s, i].item())
        # the kept patches are the lv of smallest noise, in ascending noise (MAE's order)
        assert visible[s, :, 0].tolist() == [s * length + i for i in order[:lv]]
        assert mask[s].tolist() == [0.0 if i in order[:lv] else 1.0 for i in range(length)]
        # ids_restore puts [kept, removed] (ascending noise) back into patch order
        shuffled = torch.tensor(order)
        assert torch.equal(shuffled[ids_restore[s]], torch.arange(length))
    assert (mask.sum(1) == length - lv).all()


def test_masking_draws_noise_per_sample_when_none_is_given():
    torch.manual_seed(0)
    x = torch.randn(8, 49, 4)
    visible, mask, _ = random_masking(x, 0.75)
    assert visible.shape == (8, 12, 4) and (mask.sum(1) == 37).all()
    assert len({tuple(row.tolist()) for row in mask}) == 8  # every sample its own mask
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.75, torch.rand(8, 48))


def test_encode_visible_on_a_timm_vit_without_masking_is_its_forward_features():
    """The shared-encoder path (a plain timm ViT, as a multi-task model uses it): with ratio 0
    and increasing noise nothing moves, so the latent is timm's own forward_features."""
    torch.manual_seed(0)
    for ckpt in (False, True):
        vit = create_vit(**ENCODER, grad_ckpt=ckpt)
        imgs, _ = _batch(1)
        in_order = torch.arange(L).repeat(4, 1).float()
        latent, mask, ids_restore = encode_visible(vit, imgs, 0.0, in_order)
        assert mask.sum() == 0 and torch.equal(ids_restore, torch.arange(L).repeat(4, 1))
        torch.testing.assert_close(latent, vit.forward_features(imgs), rtol=0, atol=1e-6)


# ---- the model against the reference -----------------------------------------------------

# Tolerance: the model runs in fp32, the reference in float64 from the same weights. fp32
# rounding (6e-8 relative per operation) through ~10 layers of 32-wide sums gave differences of
# 7e-7 on pred (values up to 2) and 1e-7 relative on the loss; 2e-5 leaves room for other
# BLAS/SDPA summation orders, while a masking, unshuffle, pos-embed or target slip moves pred or
# loss by > 1e-2 (a biased variance in the target: 1.4e-2 relative on the loss).
ATOL = 2e-5


@pytest.mark.parametrize("norm_pix", [True, False])
def test_forward_equals_the_reference(norm_pix):
    model = tiny_mae(0, norm_pix_loss=norm_pix)
    imgs, noise = _batch(2)
    loss, pred, mask = model(imgs, noise)
    want_loss, want_pred, want_mask, _ = _reference(model, imgs, noise, norm_pix=norm_pix)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert torch.equal(mask, want_mask.float())
    torch.testing.assert_close(pred, want_pred.float(), rtol=0, atol=ATOL)
    assert abs(loss.item() - want_loss.item()) <= ATOL * want_loss.item()


def test_pos_embeds_and_init_are_mae_s():
    model = tiny_mae(0)
    assert torch.allclose(model.pos_embed[0], _official_pos_embed(32, 4), rtol=0, atol=1e-7)
    assert torch.allclose(model.decoder_pos_embed[0], _official_pos_embed(16, 4), rtol=0, atol=1e-7)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "pos_embed" not in n)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 4 + 2  # 4 in each block, decoder_embed, decoder_pred
    for m in linears:  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out)); zero bias
        bound = (6 / sum(m.weight.shape)) ** 0.5
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    w = model.patch_embed.proj.weight.flatten(1)
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5
    for t in (model.cls_token, model.mask_token):
        assert 0.005 < t.std() < 0.05


def test_mae_loss_is_fp32_on_bf16_inputs():
    imgs, _ = _batch(3)
    pred = torch.randn(4, L, P * P * 3).bfloat16().requires_grad_(True)
    mask = (torch.rand(4, L) < 0.75).bfloat16()
    loss = mae_loss(pred, imgs.bfloat16(), mask, P)
    assert loss.dtype == torch.float32
    assert loss.item() == mae_loss(pred.detach().float(), imgs.bfloat16().float(), mask.float(),
                                   P).item()
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16
    model = tiny_mae(0).bfloat16()
    loss, pred, mask = model(imgs, torch.rand(4, L))
    assert loss.dtype == torch.float32 and pred.dtype == torch.bfloat16


# ---- state dict: the official layout ------------------------------------------------------

def test_state_dict_keys_are_the_official_mae_keys(tmp_path):
    model = tiny_mae(0)
    sd = model.state_dict()
    assert list(sd) == _official_keys(2, 1)
    shapes = _official_shapes(32, 16, 2, 1, P, L)
    assert {k: list(v.shape) for k, v in sd.items()} == shapes
    # an official full MAE checkpoint ({'model': sd}, as main_pretrain.py saves) loads strictly
    g = torch.Generator().manual_seed(5)
    official = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    torch.save({"model": official, "epoch": 3}, tmp_path / "checkpoint-3.pth")
    model.load_state_dict(torch.load(tmp_path / "checkpoint-3.pth", weights_only=True)["model"],
                          strict=True)
    assert all(torch.equal(v, official[k]) for k, v in model.state_dict().items())
    # its encoder part is a timm ViT's state dict (what MAE's fine-tuning code loads)
    encoder = {k for k in shapes if not k.startswith(("decoder_", "mask_token"))}
    timm_keys = {k for k in create_vit(**ENCODER).state_dict()
                 if not k.startswith(("head", "fc_norm"))}
    assert encoder == timm_keys


def test_build_from_config_passes_every_key():
    cfg = build_config(dict(
        method="mae", arch="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32,
        depth=3, num_heads=2, fused_attn=False, grad_ckpt=True, decoder_embed_dim=16,
        decoder_depth=2, decoder_num_heads=4, mask_ratio=0.6, norm_pix_loss=False,
        frozen_patch_embed=False))
    model = build_mae_model(cfg)
    assert list(model.state_dict()) == _official_keys(3, 2)
    assert model.pos_embed.shape == (1, 5, 32) and model.decoder_pred.out_features == 8 * 8 * 3
    assert model.decoder_blocks[0].attn.num_heads == 4 and model.blocks[0].attn.num_heads == 2
    assert decoder_checkpointed(model) and model.mask_ratio == 0.6 and not model.norm_pix_loss
    assert not any(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])
    assert model.patch_embed.proj.weight.requires_grad and not model.pos_embed.requires_grad
    _, _, mask = model(torch.randn(2, 3, 16, 16))
    assert (mask.sum(1) == 4 - round(4 * 0.4)).all()


# ---- activation checkpointing --------------------------------------------------------------

@pytest.mark.parametrize("ckpt", [1, 2, True])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(ckpt):
    """Checkpointed blocks (the lowest encoder block; both, as many as the depth; every encoder
    and decoder block) run again in backward and give the same loss and gradients as keeping
    every activation."""
    imgs, noise = _batch(4)
    results = {}
    for grad_ckpt in (False, ckpt):
        model = tiny_mae(0, grad_ckpt=grad_ckpt)
        runs = []
        for blk in [*model.blocks, *model.decoder_blocks]:
            blk.register_forward_pre_hook(lambda m, *a, runs=runs: runs.append(m))
        loss, _, _ = model(imgs, noise)
        loss.backward()
        results[grad_ckpt] = (loss, {n: p.grad for n, p in model.named_parameters()
                                     if p.requires_grad})
        # checkpointed blocks run again in backward (pre-hooks: torch's non-reentrant recompute
        # stops once the saved tensors are rebuilt, before a forward hook would fire)
        blocks = [*model.blocks, *model.decoder_blocks]
        want = blocks if grad_ckpt is True else list(model.blocks)[:grad_ckpt]
        assert runs[:len(blocks)] == blocks  # the forward
        recomputed = runs[len(blocks):]
        assert len(recomputed) == len(want) and {id(m) for m in recomputed} == {id(m) for m in want}
    (loss0, g0), (loss1, g1) = results[False], results[ckpt]
    assert loss0.item() == loss1.item()
    assert g0.keys() == g1.keys()
    for k in g0:  # the recomputation repeats the same fp32 operations
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-9, msg=k)


# ---- DeepSpeed ZeRO-3 on 2 ranks ---------------------------------------------------------

def test_zero3_two_ranks_equal_the_reference_on_each_half():
    imgs, noise = _batch(6, n=8)
    out = run_ranks(mae_jobs.zero3_job, imgs, noise, 0)
    model = tiny_mae(0)  # the ranks' weights: the same seed
    halves = []
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)
        want_loss, want_pred, want_mask, _ = _reference(model, imgs[rows], noise[rows])
        halves.append(want_loss)
        for ckpt in GRAD_CKPT:
            got = out[rank][str(ckpt)]
            assert got["partitioned"]  # the weights really were ZeRO-3 partitions
            assert torch.equal(got["mask"], want_mask.float())
            torch.testing.assert_close(got["pred"], want_pred.float(), rtol=0, atol=ATOL)
            assert abs(got["loss"].item() - want_loss.item()) <= ATOL * want_loss.item()
    # the engine's gradient is the mean over the ranks of their losses' gradients
    ref = tiny_mae(0)
    loss0, _, _ = ref(imgs[:4], noise[:4])
    loss1, _, _ = ref(imgs[4:], noise[4:])
    ((loss0 + loss1) / 2).backward()
    for ckpt in GRAD_CKPT:
        for rank in range(2):
            grads = out[rank][str(ckpt)]["grads"]
            assert grads.keys() == {n for n, p in ref.named_parameters() if p.requires_grad}
            for n, p in ref.named_parameters():
                if p.requires_grad:  # fp32 sums over 2 ranks in another order: ~1e-7 relative
                    torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)

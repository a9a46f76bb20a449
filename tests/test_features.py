"""Frozen features (issue 8 items 1, 7 and the kNN monitor of 5).

- Official-layout MoCo v3 ``vit_small`` / ``vit_base`` files (12 heads, built here) give the
  features of the model they were saved from through every reader: load_encoder, the converter
  then timm, and the trainer's init= (which refuses them for a model of another head count);
  a 6-head model with the same (strictly loading) weights computes other features.
- Pooling and projector layers against formulas written here.
- extract_features on 2 ranks holding unequal numbers of images (one rank none): every image
  once, in dataset order, equal to one process; the cache is read back without extracting.
- The kNN monitor under ZeRO 3 (every parameter partitioned, ranks with unequal batches): the
  value it logs is the one computed here from the checkpoint's features, the checkpoint's
  encoder computes what the engine's module did, and the losses and weights equal those of the
  same run without the monitor; MAE under ZeRO 3 in bf16 logs one too.
"""
import copy
import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from timm.models.vision_transformer import VisionTransformer

import feature_jobs
import jobs
from lgp_ds import convert
from lgp_ds.config import build_config
from lgp_ds.data.transforms import eval_transform
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine.trainer import Trainer
from lgp_ds.eval.features import cached_features, extract_features, load_encoder
from lgp_ds.eval.knn import knn_accuracy
from lgp_ds.methods import build_method
from lgp_ds.models.moco import GraftModel
from multirank import run_ranks
from tarfiles import make_shards

OFFICIAL = {"vit_small": ("vit_small_patch16_224", 384), "vit_base": ("vit_base_patch16_224", 768)}


def official_moco_file(path, arch: str) -> dict:
    """An official MoCo v3 checkpoint of ``arch`` as its vits.py builds it (12 heads; depth 1
    and 32 px images to stay small: the readers take depth and size from the shapes), with
    random weights whose attention is far from uniform, a projector with BN statistics of its
    own, and a momentum encoder that differs. Returns the models it was saved from."""
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=OFFICIAL[arch][1], depth=1,
                            num_heads=12, num_classes=0)
    model = GraftModel(vit, dim=16, mlp_dim=32, cross_rank_bn=False)
    momentum = copy.deepcopy(model.base_encoder)
    with torch.no_grad():
        for m in (model.base_encoder, momentum):
            m.blocks[0].attn.qkv.weight.mul_(20)  # peaked attention: heads matter
        for p in momentum.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn_like(buf))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand_like(buf) + 0.5)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()})
    torch.save({"epoch": 300, "arch": arch, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return {"model": model.eval(), "momentum": momentum.eval()}


def images(n=4, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cls_token(vit, x):
    """Class token after the final norm, the projector left out."""
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


@torch.no_grad()
def mae_global_pool(vit, x):
    """MAE's models_vit.py with global_pool: mean of the patch tokens of the last block's
    output (before any norm), then LayerNorm, here with the trained final norm's weights."""
    tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    norm = vit.norm
    return F.layer_norm(tokens[:, 1:].mean(1), norm.normalized_shape, norm.weight, norm.bias,
                        norm.eps)


@torch.no_grad()
def six_heads(vit, x):
    """The same weights in timm's own architecture of that name (6 heads): a strict load."""
    name = OFFICIAL["vit_small" if vit.embed_dim == 384 else "vit_base"][0]
    six = timm.create_model(name, num_classes=0, img_size=32, depth=1, num_heads=6)
    six.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
    return cls_token(six.eval(), x)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    return {arch: (str(folder / f"{arch}.pth.tar"), official_moco_file(folder / f"{arch}.pth.tar",
                                                                       arch))
            for arch in OFFICIAL}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    sets = {}
    for name, sizes in (("uneven", [5, 3, 4]), ("val", [2, 1, 2]), ("one", [3])):
        (folder / name).mkdir()
        sets[name] = make_shards(folder / name, sizes)
    (folder / "corrupt").mkdir()
    sets["corrupt"] = make_shards(folder / "corrupt", [2, 2], corrupt={(1, 0)})
    return sets


@pytest.fixture(scope="module")
def tiny_moco(tmp_path_factory):
    """A small MoCo v3 file (timm ViT, patch 8, 16 px) for the extraction tests."""
    torch.manual_seed(2)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8,
                            embed_dim=32, depth=2, num_heads=1)  # the count read for it
    model = GraftModel(vit, dim=8, mlp_dim=16, cross_rank_bn=False)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth.tar"
    torch.save({"arch": "vit_tiny_patch16_224",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, official, shards, tiny_moco):
    """Every 2-rank job in one world (see feature_jobs)."""
    out = tmp_path_factory.mktemp("ranks")
    files = {arch: (OFFICIAL[arch][0], path) for arch, (path, _) in official.items()}
    per_rank = run_ranks(feature_jobs.all_jobs,
                         (tiny_moco, shards["uneven"], shards["one"], str(out / "cache"),
                          shards["corrupt"]),
                         (files, str(out / "init"), images()),
                         (str(out / "runs"), shards["uneven"], shards["val"],
                          images(size=16)))
    return per_rank, out


# -- item 7: official head counts through every reader -------------------------------------------
@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_official_file_gives_its_features_through_load_encoder(official, arch):
    path, saved = official[arch]
    x = images()
    want = cls_token(saved["model"].base_encoder, x)
    assert not torch.allclose(six_heads(saved["model"].base_encoder, x), want, atol=1e-3)
    encoder = load_encoder(path)
    assert "12 heads" in encoder.description and encoder.vit.blocks[0].attn.num_heads == 12
    torch.testing.assert_close(encoder(x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_encoder(path, which="momentum")(x),
                               cls_token(saved["momentum"], x), rtol=0, atol=1e-6)
    six = load_encoder(path, num_heads=6)  # what a 6-head reading would give: not the same
    assert not torch.allclose(six(x), want, atol=1e-3)


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_official_file_gives_its_features_through_the_converter(official, arch, tmp_path):
    path, saved = official[arch]
    x = images()
    want = cls_token(saved["model"].base_encoder, x)
    dst = str(tmp_path / "out.safetensors")
    info = convert.convert(path, dst)
    with safe_open(dst, framework="pt") as f:
        meta = f.metadata()
    vit = timm.create_model(meta["timm_model"], num_classes=0, checkpoint_path=dst,
                            **json.loads(meta["timm_kwargs"]))
    assert vit.blocks[0].attn.num_heads == 12 and "12 heads" in info["arch"]
    torch.testing.assert_close(cls_token(vit.eval(), x), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_encoder(dst)(x), want, rtol=0, atol=1e-6)  # its record


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_trainer_refuses_an_official_file_for_another_head_count(official, arch, tmp_path):
    """vit_small: the config's default (timm's 6 heads); vit_base: 6 heads asked for. The
    refusal comes before any engine is built (no process group needed)."""
    path, _ = official[arch]
    heads = None if arch == "vit_small" else 6
    cfg = build_config({**jobs.TINY, "arch": OFFICIAL[arch][0], "img_size": 32,
                        "patch_size": None, "embed_dim": None, "depth": 1, "num_heads": heads,
                        "method": "moco", "num_stages": 1, "stage_blrs": [1e-2], "init": path,
                        "output_dir": str(tmp_path / "run")})
    ds = resolve_ds_config({"zero_optimization": {"stage": 0}}, cfg, 1)
    with pytest.raises(ValueError, match=r"trained with 12 attention heads .* the config builds "
                                         r"6 \(config key num_heads\)"):
        Trainer(cfg, ds, build_method(cfg), with_data=False)


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_trainer_starts_from_an_official_file_with_its_head_count(ranks, official, arch):
    _, saved = official[arch]
    want = cls_token(saved["model"].base_encoder, images())
    for rank in ranks[0]:
        torch.testing.assert_close(rank["init"][arch], want, rtol=0, atol=1e-6)


# -- item 1: pooling, projector layers, refusals ---------------------------------------------------
def test_mean_pooling_is_maes_global_pool_and_projector_layers_follow_the_saved_head(official):
    path, saved = official["vit_small"]
    x = images()
    vit, head = saved["model"].base_encoder, saved["model"].base_encoder.head
    torch.testing.assert_close(load_encoder(path, pooling="mean")(x), mae_global_pool(vit, x),
                               rtol=0, atol=1e-5)
    cls = cls_token(vit, x)
    with torch.no_grad():
        one = F.relu(F.batch_norm(cls @ head[0].weight.T, head[1].running_mean,
                                  head[1].running_var, head[1].weight, head[1].bias, eps=1e-5))
        two = head[3:6](one)  # eval-mode BN: saved running statistics
    encoder = load_encoder(path, projector_layers=1)
    assert "projector layers 1-1 (32 wide)" in encoder.description
    torch.testing.assert_close(encoder(x), one, rtol=0, atol=1e-5)
    torch.testing.assert_close(load_encoder(path, projector_layers=2)(x), two, rtol=0, atol=1e-5)
    encoder.train()  # stays frozen: BN keeps using the saved statistics
    torch.testing.assert_close(encoder(x), one, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"has 2 \(Linear -> BN -> ReLU\) layer\(s\) before its "
                                         r"output layer; use 1 to 2"):
        load_encoder(path, projector_layers=3)


def test_encoder_without_projector_or_momentum_is_refused(official, tmp_path):
    path, saved = official["vit_base"]
    timm_file = str(tmp_path / "enc.safetensors")
    convert.convert(path, timm_file)
    with pytest.raises(ValueError, match="has no projector"):
        load_encoder(timm_file, projector_layers=1)
    with pytest.raises(ValueError, match="no momentum encoder"):
        load_encoder(timm_file, which="momentum")
    with pytest.raises(ValueError, match="pooling='max'"):
        load_encoder(timm_file, pooling="max")


# -- item 1: distributed extraction and the cache --------------------------------------------------
def single_process(path, urls, **kwargs):
    return extract_features(load_encoder(path, **kwargs), urls, eval_transform(16), 2)


@pytest.mark.parametrize("name,kwargs", [("cls", {}), ("mean", {"pooling": "mean"}),
                                         ("proj1", {"projector_layers": 1})])
def test_two_ranks_give_every_image_once_in_order_as_one_process(ranks, shards, tiny_moco, name,
                                                                 kwargs):
    """Rank 0 reads shards 0 and 2 (9 images, 5 batches of 2), rank 1 shard 1 (3 images, 2
    batches). The ranks' batches hold other images than one process's: CPU matmul kernels may
    round a row differently with another batch composition, so rows agree to 1e-6, not bits."""
    want, want_labels = single_process(tiny_moco, shards["uneven"], **kwargs)
    assert want.shape[0] == 12 and want_labels.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    for rank in ranks[0]:
        got, labels = rank["extraction"][name]
        assert got.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len({tuple(r) for r in want.tolist()}) == 12  # distinct images, no duplicated row


def test_a_rank_without_shards_still_gets_all_features(ranks, shards, tiny_moco):
    want, want_labels = single_process(tiny_moco, shards["one"])
    for rank in ranks[0]:
        got, labels = rank["extraction"]["one_shard"]
        assert torch.equal(labels, want_labels) and got.shape == (3, 32)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_rank_that_cannot_read_its_shards_stops_every_rank(ranks):
    """Rank 1's shard holds a corrupt sample: it raises the error naming it, rank 0 (which would
    otherwise wait for it in a collective) says another rank failed."""
    per_rank, _ = ranks
    assert per_rank[1]["extraction"]["corrupt"].startswith("DataError: sample '1-0'")
    assert "another rank failed reading its data" in per_rank[0]["extraction"]["corrupt"]


def test_cached_features_are_read_back(ranks, shards, tiny_moco, tmp_path):
    per_rank, out = ranks
    for rank in per_rank:  # the second call ran with extraction disabled: it read the file
        first, second = rank["extraction"]["cached_first"], rank["extraction"]["cached_second"]
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len([f for f in os.listdir(out / "cache") if f.endswith(".pt")]) == 1
    # in one process: other pooling, other data or other transform -> other files
    encoder = load_encoder(tiny_moco)
    cache = str(tmp_path / "cache")
    cached_features(cache, encoder, shards["uneven"], eval_transform(16), 4)
    cached_features(cache, load_encoder(tiny_moco, pooling="mean"), shards["uneven"],
                    eval_transform(16), 4)
    cached_features(cache, encoder, shards["one"], eval_transform(16), 4)
    cached_features(cache, encoder, shards["uneven"], eval_transform(16, crop_ratio=1.0), 4)
    assert len([f for f in os.listdir(cache) if f.endswith(".pt")]) == 4
    assert not [f for f in os.listdir(cache) if f.startswith(".")]  # no temporary left


# -- item 5: the kNN monitor -----------------------------------------------------------------------
def test_knn_monitor_logs_the_checkpoints_knn_and_leaves_training_alone(ranks, shards):
    per_rank, out = ranks
    monitor, plain = per_rank[0]["monitor"]["monitor"], per_rank[0]["monitor"]["plain"]
    assert [r["step"] for r in monitor["metrics"]] == [1, 2]
    assert all("knn" in r for r in monitor["metrics"])
    assert not any("knn" in r for r in plain["metrics"])
    # the monitor changes nothing in training: same losses, weights, momentum encoder
    assert [r["loss"] for r in monitor["metrics"]] == [r["loss"] for r in plain["metrics"]]
    for key, value in plain["masters"].items():
        assert torch.equal(monitor["masters"][key], value), key
    for key, value in plain["momentum"].items():
        assert torch.equal(monitor["momentum"][key], value), key
    # the ZeRO-3 checkpoint (2 ranks) gives, through load_encoder, the engine module's features
    run = str(out / "runs" / "monitor")
    encoder = load_encoder(run)
    for rank in per_rank:
        torch.testing.assert_close(encoder(images(size=16)),
                                   rank["monitor"]["monitor"]["features"], rtol=0, atol=1e-6)
    # kNN from the checkpoint's features, computed here: the value logged at its step (2).
    # Features agree to ~1e-7 (other batch compositions), far from flipping a neighbour or vote.
    train, train_labels = extract_features(encoder, shards["uneven"], eval_transform(16), 5)
    val, val_labels = extract_features(encoder, shards["val"], eval_transform(16), 5)
    want = knn_accuracy(train, train_labels, val, val_labels, k=3, temperature=0.07)
    assert monitor["metrics"][-1]["knn"] == pytest.approx(want, abs=1e-4)


def test_knn_monitor_runs_for_mae_in_bf16_on_the_embedded_split(ranks):
    per_rank, _ = ranks
    records = per_rank[0]["monitor"]["mae"]["metrics"]
    assert [r["step"] for r in records] == [1, 2]
    assert "knn" not in records[0] and 0 <= records[1]["knn"] <= 100
    # the evaluation's time is left out of the throughput window, not the step's: the rate of
    # the evaluated step is of the order of the first (~1e4 times it when the window was ~0 s)
    assert records[1]["img_per_s"] < 100 * records[0]["img_per_s"]


def test_knn_config_keys(tmp_path):
    with pytest.raises(ValueError, match="knn_every=5 with data= needs knn_train_data= and "
                                         "knn_val_data="):
        build_config({"knn_every": 5, "data": ["x-{0..3}.tar"], "samples_per_epoch": 10,
                      "knn_train_data": ["t.tar"]})
    cfg = build_config({"knn_every": 5, "knn_train_data": "t-{0..3}.tar"})
    assert cfg.knn_train_data == ["t-{0..3}.tar"] and cfg.knn_val_data is None

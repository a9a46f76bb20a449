"""Fine-tuning (method=finetune) on the one trainer: MAE's layer-wise LR decay and weight-decay
rule against a reference written here, labels reaching the loss, the first projector unit from
the checkpoint, partial fine-tuning, the label-subset filter, bad input, and 2 real ranks
(ZeRO 1 fp32, ZeRO 2 fp32, ZeRO 3 bf16) that train and measure top-1 on the held-out digits."""
import math
import re

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

import finetune_jobs
from jobs import tiny_config
from lgp_ds.config import build_config
from lgp_ds.data.pipeline import TrainData, samples_per_epoch
from lgp_ds.data.shards import DataError, expand_shards, train_batches
from lgp_ds.data.transforms import Views
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine.trainer import read_init
from lgp_ds.data.subsets import write_subset
from lgp_ds.methods import build_method
from lgp_ds.models.moco import build_graft_model
from multirank import run_ranks
from tarfiles import png

DEPTH = 3


def _method(**keys):
    cfg = tiny_config(**{**finetune_jobs.FINETUNE, **keys})
    return cfg, build_method(cfg)


# -- the reference rules, written from MAE's util/lr_decay.py ------------------------------------
def mae_layer_id(name: str, depth: int) -> int:
    """MAE's get_layer_id_for_vit on a name inside the ViT: cls_token, pos_embed, patch_embed.*
    -> 0; blocks.i.* -> i + 1; everything else (norms, head) -> depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def mae_no_weight_decay(name: str, p) -> bool:
    """MAE's fine-tuning: 1-D parameters and the ViT's no_weight_decay list."""
    return p.ndim == 1 or name in ("pos_embed", "cls_token", "dist_token")


def _official_moco_file(path, **keys) -> dict:
    """An official MoCo v3 checkpoint (module.base_encoder.*, projector as its head) of the tiny
    ViT; returns the base encoder's state dict."""
    torch.manual_seed(7)
    model = build_graft_model(tiny_config(**keys), cross_rank_bn=False)
    with torch.no_grad():  # BN statistics as a trained projector has them
        model.base_encoder.head[1].running_mean.normal_()
        model.base_encoder.head[1].running_var.uniform_(0.5, 2.0)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 300, "state_dict": sd}, path)  # no arch: its head count is the config's
    return model.base_encoder.state_dict()


# -- single process -------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [dict(pooling="avg"), dict(pooling="cls", from_projector_layer=1),
                                  dict(num_stages=3, stage_blrs=[1.0, 2.0, 4.0], freeze_blocks=1)])
def test_layer_decay_gives_every_parameter_maes_scale_and_weight_decay(keys):
    cfg, method = _method(layer_decay=0.65, depth=DEPTH, **keys)
    model = method.build_model()
    lrs = [blr * 10 for blr in cfg.stage_blrs]
    groups = method.param_groups(model, DEPTH, lrs)
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    members = [id(p) for g in groups for p in g["params"]]
    assert sorted(members) == sorted(trainable)  # every trainable parameter in exactly one group
    per_stage = DEPTH // cfg.num_stages
    for g in groups:
        for p in g["params"]:
            name, _ = trainable[id(p)]
            inner = name.removeprefix("base_encoder.")
            layer = mae_layer_id(inner, DEPTH)
            stage = 0 if layer == 0 else min(layer - 1, DEPTH - 1) // per_stage
            want = lrs[stage] * 0.65 ** (DEPTH + 1 - layer)
            assert math.isclose(g["lr"], want, rel_tol=1e-12), (name, g["lr"], want)
            assert g["weight_decay"] == (0.0 if mae_no_weight_decay(inner, p) else 0.05), name
            assert g["name"] == f"layer{layer}" + ("_no_wd" if mae_no_weight_decay(inner, p) else "")
    names = {trainable[i][0] for i in members}
    assert "base_encoder.cls_token" in names or keys.get("freeze_blocks")
    head = {n for n in names if n.startswith("base_encoder.head.")}
    assert len(head) == (2 if "from_projector_layer" not in keys else 5)  # + Linear, BN w, BN b
    if keys.get("pooling", "avg") == "avg":
        assert {"base_encoder.fc_norm.weight", "base_encoder.fc_norm.bias"} <= names
        assert not any(n.startswith("base_encoder.norm.") for n in names)


def test_freeze_blocks_freezes_the_embeddings_and_the_first_blocks():
    _, method = _method(depth=DEPTH, freeze_blocks=2)
    model = method.build_model()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    want = {n for n, _ in model.named_parameters()
            if mae_layer_id(n.removeprefix("base_encoder."), DEPTH) <= 2}
    assert frozen == want and "base_encoder.blocks.1.mlp.fc2.bias" in frozen
    with pytest.raises(ValueError, match="freeze_blocks=4 exceeds the model depth 3"):
        _method(depth=DEPTH, freeze_blocks=4)[1].build_model()


def test_labels_reach_the_loss_as_cross_entropy_smoothed_or_mixed():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    _, plain = _method()
    model = plain.build_model()
    with torch.no_grad():
        model.base_encoder.head[-1].weight.normal_()  # logits away from uniform
        logits = model(x)
    loss, _ = plain.loss(model, (x,), None, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y), rtol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, y.roll(1)), rtol=1e-3)
    _, smooth = _method(smoothing=0.2)
    logp = logits.log_softmax(1)
    want = (0.8 * -logp.gather(1, y[:, None]).squeeze(1) - 0.2 * logp.mean(1)).mean()
    assert torch.allclose(smooth.loss(model, (x,), None, y)[0], want, rtol=1e-6)
    with pytest.raises(ValueError, match="trains on labels"):
        plain.loss(model, (x,), None, None)
    with pytest.raises(DataError, match=r"label -1 is outside 0..9"):
        plain.check_labels(torch.full((8,), -1))

    _, mixed = _method(mixup=0.8, cutmix=1.0, smoothing=0.1)
    x0 = x.clone()
    torch.manual_seed(3)  # the trainer's forward RNG: Mixup draws from it
    a = mixed.loss(model, (x,), None, y)[0]
    torch.manual_seed(3)
    assert torch.equal(mixed.loss(model, (x,), None, y)[0], a)  # reproducible
    torch.manual_seed(3)
    assert not torch.allclose(mixed.loss(model, (x,), None, y.roll(1))[0], a)
    assert torch.equal(x, x0)  # the caller's batch is not mixed in place
    with pytest.raises(ValueError, match="even batch per rank, got 7"):
        mixed.loss(model, (x[:7],), None, y[:7])


def test_from_projector_layer_keeps_the_checkpoints_first_projector_unit(tmp_path):
    path = str(tmp_path / "moco.pth.tar")
    saved = _official_moco_file(path)
    cfg, method = _method(init=path, from_projector_layer=1, pooling="cls")
    torch.manual_seed(1)
    model = method.build_model()
    fresh_classifier = model.base_encoder.head[3].weight.clone()
    method.load_init(model, read_init(path))
    got = model.base_encoder.state_dict()
    for key in ("head.0.weight", "head.1.weight", "head.1.bias", "head.1.running_mean",
                "head.1.running_var", "blocks.2.mlp.fc1.weight", "norm.weight", "pos_embed"):
        assert torch.equal(got[key], saved[key]), key
    assert got["head.0.weight"].shape == (cfg.mlp_dim, 32)
    assert torch.equal(got["head.3.weight"], fresh_classifier)  # the classifier starts fresh
    assert got["head.3.weight"].std() < 1e-4 and not got["head.3.bias"].any()

    encoder_only = tmp_path / "mae.pth"  # an MAE-style file: an encoder without projector
    torch.save({"model": {k: v for k, v in saved.items() if not k.startswith("head.")}},
               encoder_only)
    _, method = _method(init=str(encoder_only), from_projector_layer=1)
    with pytest.raises(ValueError, match=r"from_projector_layer=1: .*mae.pth holds no projector"):
        method.load_init(method.build_model(), read_init(str(encoder_only)))
    _, method = _method(init=path, from_projector_layer=1, mlp_dim=48)
    with pytest.raises(ValueError, match=r"does not fit .* mlp_dim=48.*shape mismatch"):
        method.load_init(method.build_model(), read_init(path))


def _keyed_shards(folder, shards=4, per_shard=12) -> list[str]:
    """Shards whose samples carry their own number as label, keys ``img{n:04d}``."""
    for s in range(shards):
        with wds.TarWriter(str(folder / f"k-{s}.tar")) as sink:
            for j in range(per_shard):
                n = s * per_shard + j
                sink.write({"__key__": f"img{n:04d}", "png": png(n), "cls": str(n).encode()})
    return expand_shards([str(folder / f"k-{{0..{shards - 1}}}.tar")])


def test_subset_filter_reads_only_the_subset(tmp_path):
    urls = _keyed_shards(tmp_path)
    subset = [f"img{n:04d}.JPEG" for n in range(0, 48, 5)]  # SimCLR-style names, 10 images
    path = str(tmp_path / "10percent.txt")
    write_subset(path, subset)
    cfg = build_config({"method": "finetune", "img_size": 16, "num_workers": 0,
                        "data": [str(tmp_path / "k-{0..3}.tar")], "val_data": urls[:1],
                        "subset": path, "batch_size": 4})
    assert samples_per_epoch(cfg) == 10
    data = TrainData(cfg, batch_per_rank=4, transform=Views(lambda img: torch.zeros(1)))
    seen = [int(n) for epoch in range(3) for _, labels, _ in data.batches(epoch, 5)
            for n in labels]
    assert set(seen) == set(range(0, 48, 5))  # every subset image, and only those
    for rank in (0, 1):  # each rank reads its own shards' subset images only
        got = {int(n) for _, labels, _ in train_batches(
            urls, Views(lambda img: torch.zeros(1)), 2, 4, rank, 2, 0, seed=0, epoch=0,
            subset=data.subset)
            for n in labels}
        assert got and got <= set(range(0, 48, 5))
    nothing = frozenset({"not-there"})
    with pytest.raises(DataError, match=r"no samples of the subset \(its names, e.g. "
                                        r"\['not-there'\]"):
        list(train_batches(urls, Views(lambda img: torch.zeros(1)), 2, 1, 0, 1, 0, seed=0,
                           epoch=0, subset=nothing))


def test_subset_fraction_of_the_embedded_set_is_balanced_and_fixed():
    cfg = build_config({"method": "finetune", "subset_fraction": 0.1})
    from lgp_ds.data.pipeline import subset_names
    names = subset_names(cfg)
    assert len(names) == samples_per_epoch(cfg) == 130 and names == subset_names(cfg)
    assert all(re.fullmatch(r"\d{6}", n) for n in names)


def test_evaluation_labels_the_images_fine_tuning_trains_on(tmp_path):
    # the comparison's 10% logistic regression and subset_fraction=0.1 fine-tuning: one subset,
    # however many shards the set was read from
    from torchvision.transforms import ToTensor
    from lgp_ds.data.builtin import digits_shards, embedded_subset
    from lgp_ds.data.ordered import ordered_batches
    from lgp_ds.eval.protocols import EvalSettings, Split, labelled_subset
    for shards in (3, 8):
        urls = expand_shards([digits_shards(8, shards, root=str(tmp_path))[0]])
        batches = list(ordered_batches(urls, ToTensor(), 512, 0, 1, with_keys=True))
        labels = torch.cat([b[2] for b in batches])
        keys = [k for b in batches for k in b[3]]
        train = Split(torch.zeros(len(keys), 1), labels, keys)
        assert sorted(labelled_subset(train, EvalSettings(fraction=0.1))) == embedded_subset(0.1)


@pytest.mark.parametrize("values, message", [
    ({"mixupp": 0.8}, "unknown config key 'mixupp' (did you mean 'mixup'?)"),
    ({"method": "graft", "mixup": 0.8}, "config key mixup=0.8 applies to method=finetune only"),
    ({"method": "moco", "layer_decay": 0.7}, "layer_decay=0.7 applies to method=finetune only"),
    ({"method": "finetune", "data": ["a.tar"], "samples_per_epoch": 9},
     "config key val_data=None must name the held-out shards"),
    ({"method": "finetune", "subset": "a.txt", "subset_fraction": 0.1},
     "subset_fraction=0.1 and subset= both name the subset"),
    ({"method": "finetune", "subset": "a.txt", "samples_per_epoch": 9},
     "samples_per_epoch=9 and a subset: an epoch is then the subset's size"),
    ({"method": "finetune", "from_projector_layer": 3}, "from_projector_layer=3: Input should be"),
    ({"method": "finetune", "pooling": "max"}, "config key pooling='max': Input should be"),
])
def test_bad_finetune_config_is_refused_naming_the_key(values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_config(values)


def test_mixup_refuses_an_odd_batch_per_rank():
    cfg = build_config({"method": "finetune", "mixup": 0.8, "batch_size": 6})
    with pytest.raises(ValueError, match=r"micro-batch, which must be even; it is batch_size=6 / "
                                         r"\(world size 2 x gradient_accumulation_steps 1\) = 3"):
        resolve_ds_config({}, cfg, world_size=2)
    cfg = build_config({"method": "finetune", "mixup": 0.0, "batch_size": 6})
    assert resolve_ds_config({}, cfg, world_size=2)["train_micro_batch_size_per_gpu"] == 3


# -- 2 real ranks -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("finetune")
    init = str(out_dir / "moco.pth.tar")
    saved = _official_moco_file(init)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    return run_ranks(finetune_jobs.finetune_job, str(out_dir), init, x, y), saved, x, y


def test_labels_reach_the_loss_on_each_rank_and_lrs_keep_their_scales(runs):
    per_rank, _, x, y = runs
    cfg, method = _method(layer_decay=0.5)
    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    model = method.build_model()
    with torch.no_grad():
        for rank, half in enumerate((slice(0, 4), slice(4, 8))):
            want = F.cross_entropy(model(x[half]), y[half]).item()
            got = per_rank[rank]["labels"]["loss"]
            assert math.isclose(got, want, rel_tol=1e-5), (rank, got, want)
        # The classifier starts near zero, so the loss is near log(10) whatever the labels; its
        # bias's gradient, mean(softmax - one_hot(labels)) over the global batch, is not, and
        # Adam's first step moves it by -lr * sign(gradient).
        grad = (model(x).softmax(1) - F.one_hot(y, 10)).mean(0)
    labels = per_rank[0]["labels"]
    base = 2e-3 * labels["batch_size"] / 256
    assert grad.abs().min() > 1e-3
    assert torch.allclose(labels["bias"], -base * grad.sign(), rtol=1e-4, atol=0)
    assert torch.equal(per_rank[1]["labels"]["bias"], labels["bias"])
    params = dict(model.named_parameters())
    for group, names in labels["groups"].items():
        for name in names:  # the optimizer DeepSpeed built holds MAE's scale for every parameter
            layer = mae_layer_id(name.removeprefix("base_encoder."), DEPTH)
            assert math.isclose(labels["lrs"][group], base * 0.5 ** (DEPTH + 1 - layer),
                                rel_tol=1e-12), name
            assert (group.endswith("_no_wd")
                    == mae_no_weight_decay(name.removeprefix("base_encoder."), params[name]))


def test_finetuning_on_the_digits_beats_chance_under_zero2(runs):
    per_rank, *_ = runs
    records = per_rank[0]["train"]["records"]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    evaluated = [r for r in records if "val_top1" in r]
    assert [r["step"] for r in evaluated] == [30, 60]
    assert all(r["val_images"] == 450 for r in evaluated)  # the whole held-out split, once
    assert evaluated[-1]["val_top1"] > 30, evaluated  # chance: 10%; 53% when written
    assert records[-1]["loss"] < records[0]["loss"]
    for mine, other in zip(records, per_rank[1]["train"]["records"]):  # means over ranks
        assert {**mine, "img_per_s": 0} == {**other, "img_per_s": 0}


def test_semi_supervised_partial_finetuning_under_zero3_bf16(runs):
    per_rank, saved, *_ = runs
    got = per_rank[0]["semi"]
    assert got["steps_per_epoch"] == 130 // 8  # an epoch is the 10% subset
    (last,) = [r for r in got["records"] if "val_top1" in r]
    assert last["step"] == 3 and last["val_images"] == 450 and 0 <= last["val_top1"] <= 100
    correct, count = got["uneven"]
    assert count == 13 and 0 <= correct <= 13 and per_rank[1]["semi"]["uneven"] == (correct, count)
    assert got["training"]  # back in training mode after evaluating
    for key in ("head.0.weight", "head.1.weight", "head.1.bias"):  # exact, though the model is bf16
        assert torch.equal(got["masters_before"][f"base_encoder.{key}"], saved[key]), key
    frozen = set(got["frozen"])
    assert {"base_encoder.cls_token", "base_encoder.pos_embed",
            "base_encoder.patch_embed.proj.weight", "base_encoder.blocks.0.attn.qkv.weight"
            } <= frozen and not any(".blocks.1." in n or ".head." in n for n in frozen)
    for rank in (0, 1):
        run = per_rank[rank]["semi"]
        for key, before in run["before"].items():
            if key in frozen:
                assert torch.equal(run["after"][key], before), key
        for key, before in run["masters_before"].items():
            assert not torch.equal(run["masters"][key], before), key
        for key in run["after"]:
            assert torch.equal(run["after"][key], per_rank[0]["semi"]["after"][key]), key

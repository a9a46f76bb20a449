"""GPU-only checks, run by test_gpu.py in a fresh process with DeepSpeed's CUDA accelerator.

fp16 with DeepSpeed's loss scaler and FusedAdam under ZeRO 2 (an overflow step is skipped,
counted, and leaves the momentum encoder alone), FusedAdam's flat fp32 masters under bf16 ZeRO 0
(exact start, the EMA, the checkpoint's conversion), bf16 under ZeRO 3 (blocks gathered whole
against per submodule, and against ZeRO 2), models built partitioned
on the GPU (zero.Init) equal to the whole builds, the MIM anchor under fp16
ZeRO 2 (fp32 gradient accumulation), ZeRO-Offload under ZeRO 2 and 3 (host masters, the momentum
EMA and the anchor across host and GPU), every method that needs no init= under fp16 ZeRO 2,
fine-tuning under fp16 with its top-1, the evaluation protocols on the GPU over NCCL,
input_backend=dali's nvJPEG decode and training on its views, SDPA (flash) attention
against the explicit softmax on the GPU, and the scaling report's activation memory against the
GPU's (grad_ckpt=N). Prints one line per check; exits non-zero on failure.
"""
import os
import sys

import torch

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29541")
sys.path.insert(0, os.path.dirname(__file__))

import deepspeed  # noqa: E402

import lgp_ds  # noqa: E402

import jobs  # noqa: E402
from lgp_ds.benchmark.step import synthetic_batch  # noqa: E402
from lgp_ds.ds_config import resolve_ds_config  # noqa: E402
import lgp_ds.engine.trainer as trainer_module  # noqa: E402
from lgp_ds.engine.construct import gather_blocks_whole  # noqa: E402
from lgp_ds.engine.trainer import Trainer  # noqa: E402
from lgp_ds.methods import build_method  # noqa: E402
from lgp_ds.models.vit import create_vit  # noqa: E402


def trainer(out, stage, precision, **overrides):
    cfg = jobs.tiny_config(output_dir=out, batch_size=16, **overrides)
    ds = {"zero_optimization": {"stage": stage}, precision: {"enabled": True},
          "steps_per_print": 10 ** 9}
    if precision == "fp16":  # a 2^32 loss scale overflows fp16 gradients: the first step is skipped
        ds["fp16"].update(initial_scale_power=32, hysteresis=1)
    return Trainer(cfg, resolve_ds_config(ds, cfg, 1), build_method(cfg))


def check_fp16_fused_adam(out):
    t = trainer(os.path.join(out, "fp16"), 2, "fp16", optimizer="fused_adam", warmup_epochs=0)
    x1, x2 = jobs.global_batch(0, t.cfg)
    params = lambda: {k: v.clone() for k, v in t.momentum.module.named_parameters()}  # noqa: E731
    before = params()
    t.train_step(x1, x2)
    assert t.engine.skipped_steps == 1, "the overflowing first step was not skipped"
    assert all(torch.equal(before[k], v) for k, v in params().items()), \
        "momentum encoder moved on a skipped step"
    for _ in range(40):  # the scaler halves until steps apply
        t.train_step(x1, x2)
    assert t.applied_steps() > 0, "no step was ever applied"
    assert any(not torch.equal(before[k], v) for k, v in params().items())
    assert all(v.dtype == torch.float32 for v in params().values())
    print(f"fp16 zero2 FusedAdam: overflow skipped and counted, momentum unchanged "
          f"({t.engine.skipped_steps} skipped, {t.applied_steps()} applied)", flush=True)


def check_fused_adam_flat_masters(out):
    """bf16 ZeRO 0 with FusedAdam: DeepSpeed's FP16_Optimizer keeps the fp32 masters in one flat
    tensor per group. The encoder starts at the exact init= weights there, the momentum EMA reads
    them (exactly m * itself + (1 - m) * masters after each step) and a checkpoint converts to
    them exactly."""
    from lgp_ds.convert import read
    mim = os.path.join(out, "flat_mim.pth")
    cfg = jobs.tiny_config()
    g = torch.Generator().manual_seed(3)
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g)  # values bf16 cannot hold
             for k, v in encoder.state_dict().items()}
    torch.save({"model": state}, mim)
    t = trainer(os.path.join(out, "flat"), 0, "bf16", optimizer="fused_adam", init=mim,
                warmup_epochs=0)
    assert type(t.engine.optimizer).__name__ == "FP16_Optimizer", type(t.engine.optimizer)
    masters = jobs.full_master_weights(t.engine)
    for name, value in masters.items():
        key = name.removeprefix("base_encoder.")
        if name.startswith("base_encoder.") and key in state and not key.startswith("head."):
            assert torch.equal(value, state[key]), f"{name} does not start at init="
    for step in range(3):
        before = t.momentum.state_dict()
        m = t.train_step(*jobs.global_batch(step, t.cfg))["momentum"]
        after, masters = t.momentum.state_dict(), jobs.full_master_weights(t.engine)
        for name, q in masters.items():
            if name.startswith("base_encoder."):
                key = name.removeprefix("base_encoder.")
                assert (after[key] - (m * before[key] + (1 - m) * q)).abs().max() <= 1e-6, name
    t.save()
    base = read(t.ckpt_dir).base
    for name, q in masters.items():
        if name.startswith("base_encoder."):
            assert torch.equal(base[name.removeprefix("base_encoder.")], q), \
                f"{name}: the checkpoint does not hold the masters"
    print("bf16 zero0 FusedAdam (FP16_Optimizer, flat masters): exact start, EMA from the "
          "masters, checkpoint converts to them exactly", flush=True)


def check_bf16_zero3(out):
    """ZeRO 3 with its blocks gathered whole (DeepSpeed's leaf modules, whose gradients are
    reduced from backward hooks, on the device's streams) trains what ZeRO 3 with a gather per
    submodule trains from the same start on the same batches: the same arithmetic (on the CPU
    the updates' cosine is 0.999999), where a gradient lost or reduced twice shows as O(1); and
    what ZeRO 2 trains, to bf16's rounding of the steps (on the CPU: cosine 0.994)."""
    updates = {}
    for name, stage, whole in (("zero2", 2, True), ("zero3", 3, True), ("zero3_per_submodule", 3,
                                                                        False)):
        if not whole:
            trainer_module.gather_blocks_whole = lambda model: None
        t = trainer(os.path.join(out, f"bf16_{name}"), stage, "bf16", warmup_epochs=0)
        trainer_module.gather_blocks_whole = gather_blocks_whole
        start = jobs.full_master_weights(t.engine)
        losses = [t.train_step(*jobs.global_batch(step, t.cfg))["loss"].item() for step in range(4)]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        after = jobs.full_master_weights(t.engine)
        updates[name] = torch.cat([(after[k] - start[k]).flatten() for k in sorted(start)])
    leaves = torch.cosine_similarity(updates["zero3"], updates["zero3_per_submodule"], dim=0)
    stages = torch.cosine_similarity(updates["zero3"], updates["zero2"], dim=0)
    assert leaves > 0.999 and stages > 0.95, (leaves.item(), stages.item())
    print(f"bf16 zero3: 4 steps' updates, blocks gathered whole against per submodule: cosine "
          f"{leaves:.6f}; against zero2: {stages:.4f}", flush=True)


def check_zero3_construction():
    """Built partitioned on the GPU under ZeRO 3 (zero.Init), the models are, gathered, the ones
    built whole (as ZeRO 0-2 runs start): their initialisation draws from the host's generator
    wherever the parameters live, and no buffer is left on the host."""
    from lgp_ds.engine.construct import build_model
    from lgp_ds.models.partitioned import whole_copies
    for method in ("graft", "mae"):
        cfg = jobs.tiny_config(method=method, decoder_embed_dim=16, decoder_depth=1,
                               decoder_num_heads=2, frozen_patch_embed=method != "mae")
        whole = dict(build_model(build_method(cfg), cfg).named_parameters())
        ds = resolve_ds_config({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
                               cfg, 1)
        model = build_model(build_method(cfg), cfg, ds)
        differ = [n for n, p in whole_copies(dict(model.named_parameters())).items()
                  if not torch.equal(p, whole[n].detach())]
        assert not differ, f"{method}: built partitioned differs from whole in {differ[:5]}"
        assert {b.device.type for b in model.buffers()} <= {"cuda"}, "a buffer on the host"
    print("zero3 construction on the GPU: graft and mae models equal the whole builds", flush=True)


def check_anchor(out, precision="fp16"):
    """The shipped ZeRO 2 config with the MIM anchor: fp32 gradient accumulation is switched on,
    the masters start at the MIM weights, and the anchor grows once steps apply."""
    cfg = jobs.tiny_config(batch_size=16, warmup_epochs=0)
    mim = os.path.join(out, "mim.pth")
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    torch.save({"model": encoder.state_dict()}, mim)
    cfg = jobs.tiny_config(output_dir=os.path.join(out, f"{precision}_anchor"), batch_size=16,
                           warmup_epochs=0, init=mim, anchor_weight=1e-4, anchor_blocks=2)
    ds = jobs.shipped_ds_config(cfg, f"zero2_{precision}.json")
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}, ds.get("data_types")
    t = Trainer(cfg, ds, build_method(cfg))
    anchors = []
    for step in range(12):  # the first steps may overflow at the initial loss scale
        x1, x2 = jobs.global_batch(step, cfg)
        anchors.append(float(t.train_step(x1, x2)["anchor"]))
    assert anchors[0] == 0.0 and t.applied_steps() > 1 and anchors[-1] > 0, anchors
    print(f"{precision} zero2 anchor: fp32 gradient accumulation, anchor {anchors[0]} -> "
          f"{anchors[-1]:.3g} over {t.applied_steps()} applied steps", flush=True)


def synchronising_calls(step) -> tuple[list[str], int]:
    """Run ``step()`` under CUDA's sync debug mode: ("file:line" of each call in lgp_ds that made
    the host wait for the device, how many others did: DeepSpeed's, the test's). A wait is
    lgp_ds's when the innermost frame outside torch and DeepSpeed's accelerator (which lgp_ds
    may call to synchronise) is in the lgp_ds package. Autograd runs the backward pass on this
    thread, so that waits in lgp_ds's backward functions show their frames too."""
    import traceback
    import warnings
    package = os.path.dirname(os.path.abspath(lgp_ds.__file__)) + os.sep
    passed_through = (os.path.dirname(torch.__file__) + os.sep,
                      os.path.join(os.path.dirname(deepspeed.__file__), "accelerator") + os.sep,
                      warnings.__file__)
    ours, others = [], 0

    def record(message, category, filename, lineno, file=None, line=None):
        nonlocal others
        if "synchronizing CUDA operation" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not f.filename.startswith(passed_through)]
        where = frames[-1] if frames else None
        if where is not None and where.filename.startswith(package):
            ours.append(f"{os.path.relpath(where.filename, os.path.dirname(package[:-1]))}:"
                        f"{where.lineno}")
        else:
            others += 1

    with warnings.catch_warnings(), torch.autograd.set_multithreading_enabled(False):
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return ours, others


def check_no_host_sync(out):
    """A training step (forward, backward, the fault check, the anchor, DeepSpeed's step, the
    momentum EMA) makes the host wait for the device nowhere in lgp_ds's code: the device stays
    busy while the host queues the next work (issue 10). Grafting with the MIM anchor under the
    shipped bf16 ZeRO 2 and 3 configs, and MAE under ZeRO 2, on one rank (whose collectives
    return early: the NCCL all-reduces are not covered). The fault check's waits, on events (for
    the loss flags once the backward pass is queued; under the shipped ZeRO 1/2 configs for the
    gradient check's flag at the end of the backward pass, where DeepSpeed's overlap_comm
    synchronises the device anyway), are by design and not reported by the sync debug mode."""
    cfg = jobs.tiny_config(batch_size=16)
    mim = os.path.join(out, "mim_sync.pth")
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    torch.save({"model": encoder.state_dict()}, mim)
    setups = [("graft", "zero2_bf16.json", dict(init=mim, anchor_weight=1e-4, anchor_blocks=2)),
              ("graft", "zero3_bf16.json", dict(init=mim, anchor_weight=1e-4, anchor_blocks=2)),
              ("mae", "zero2_bf16.json", dict(method="mae", decoder_embed_dim=16,
                                              decoder_depth=1, decoder_num_heads=2))]
    report = []
    for method, shipped, keys in setups:
        cfg = jobs.tiny_config(output_dir=os.path.join(out, f"sync_{method}_{shipped}"),
                               batch_size=16, warmup_epochs=0, **keys)
        t = Trainer(cfg, jobs.shipped_ds_config(cfg, shipped), build_method(cfg))
        views, _ = synthetic_batch(t.method, cfg, cfg.batch_size, t.device)
        for _ in range(2):  # first steps allocate and build
            t.train_step(*views)
        ours, others = synchronising_calls(lambda: t.train_step(*views))
        assert not ours, f"{method} {shipped}: lgp_ds waits for the device at {ours}"
        report.append(f"{method} {shipped} ({others} elsewhere)")
    print(f"no host synchronisation in lgp_ds's step: {', '.join(report)}", flush=True)


def check_offload(out):
    """ZeRO-Offload under ZeRO 2 and 3 in bf16, with the momentum encoder and the MIM anchor: the
    fp32 masters (and the gradients DeepSpeed's CPU Adam steps with) on the host, the models on
    the GPU; losses finite, the anchor grows, and after every step the momentum encoder is
    exactly m * itself before + (1 - m) * the host masters (a stale copy of the masters, or an
    EMA of the wrong partition, is off by about (1 - m) * lr)."""
    mim = os.path.join(out, "offload_mim.pth")
    cfg = jobs.tiny_config()
    encoder = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    torch.save({"model": encoder.state_dict()}, mim)
    for stage in (2, 3):
        cfg = jobs.tiny_config(output_dir=os.path.join(out, f"offload{stage}"), batch_size=16,
                               warmup_epochs=0, init=mim, anchor_weight=1e-4, anchor_blocks=2)
        ds = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
              "bf16": {"enabled": True}, "steps_per_print": 10 ** 9}
        t = Trainer(cfg, resolve_ds_config(ds, cfg, 1), build_method(cfg))
        assert type(t.engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
        assert {s.weight.device.type for s in t.slices} == {"cpu"}, "masters not on the host"
        assert {k.device.type for k in t.momentum.params.values()} == {"cuda"}
        losses, anchors = [], []
        for step in range(4):
            before = t.momentum.state_dict()
            result = t.train_step(*jobs.global_batch(step, cfg))
            after, m = t.momentum.state_dict(), result["momentum"]
            for name, q in jobs.full_master_weights(t.engine).items():
                key = name.removeprefix("base_encoder.")
                if name.startswith("base_encoder."):
                    gap = (after[key] - (m * before[key] + (1 - m) * q)).abs().max().item()
                    assert gap <= 1e-6, (stage, step, name, gap)
            losses.append(result["loss"].item())
            anchors.append(float(result["anchor"]))
        assert t.applied_steps() == 4 and all(torch.isfinite(torch.tensor(losses))), losses
        assert anchors[0] == 0.0 and anchors[-1] > 0, anchors
        print(f"bf16 zero{stage} offload_optimizer: masters on the host, momentum EMA exact, "
              f"losses {losses}, anchor {anchors[0]} -> {anchors[-1]:.3g}", flush=True)


def check_methods_fp16(out):
    """Every method that starts without init= trains under fp16 ZeRO 2: once the loss scale has
    settled, applied steps give finite losses."""
    from PIL import Image
    for method in ("mae", "moco", "mtl", "graft_vicreg"):
        keys = {"frozen_patch_embed": False, "decoder_embed_dim": 16, "decoder_depth": 1,
                "decoder_num_heads": 2} if method in ("mae", "mtl") else {}
        t = trainer(os.path.join(out, f"fp16_{method}"), 2, "fp16", method=method,
                    warmup_epochs=0, num_stages=1, stage_blrs=[1e-3], **keys)
        views = len(t.method.transform()(Image.new("RGB", (16, 16))))
        losses = []
        for step in range(40):
            x = jobs.global_batch(step, t.cfg)[0]
            losses.append(t.train_step(*[x] * views)["loss"].item())
        applied = t.applied_steps()
        assert applied > 0 and all(torch.isfinite(torch.tensor(losses[-5:]))), (method, losses)
        print(f"fp16 zero2 {method}: {applied} applied steps, last loss {losses[-1]:.4f}",
              flush=True)


def check_finetune_fp16(out):
    """Fine-tuning (labels, layer decay, Mixup) under fp16 ZeRO 2 and its top-1 over NCCL."""
    t = trainer(os.path.join(out, "fp16_finetune"), 2, "fp16", method="finetune",
                num_classes=10, num_stages=1, stage_blrs=[1e-3], warmup_epochs=0, mixup=0.8,
                layer_decay=0.75)
    t.method.prepare_data()
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        x = jobs.global_batch(step, t.cfg)[0]
        loss = t.train_step(x, labels=torch.randint(0, 10, (x.shape[0],), generator=g))["loss"]
    assert t.applied_steps() > 0 and torch.isfinite(loss), loss
    top1 = t.method.evaluate(t)
    assert 0 <= top1["val_top1"] <= 100 and top1["val_images"] == 450, top1
    print(f"fp16 zero2 finetune: {t.applied_steps()} applied steps, val top-1 "
          f"{top1['val_top1']:.1f} on {top1['val_images']} images", flush=True)


def check_evaluation(out):
    """Frozen features on the GPU, gathered over NCCL, and kNN, logistic regression and the
    linear probe's heads (all-reduced gradients) on the GPU."""
    from lgp_ds.data.pipeline import embedded_shards
    from lgp_ds.eval.features import FrozenEncoder
    from lgp_ds.eval.protocols import EvalSettings, evaluate_encoders
    cfg = jobs.tiny_config()
    vit = create_vit(cfg.arch, img_size=cfg.img_size, patch_size=cfg.patch_size,
                     embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    key = {"weights": "gpu-check", "model": "tiny", "which": "base", "pooling": "cls",
           "projector_layers": 0}
    encoder = FrozenEncoder(vit, None, "tiny random ViT", key)
    settings = EvalSettings(img_size=cfg.img_size, linear_epochs=2, batch_size=128)
    urls = [embedded_shards(cfg.img_size, split) for split in ("train", "val")]
    results = evaluate_encoders({"tiny": encoder}, *urls, settings, os.path.join(out, "eval"))
    top1 = {p: r["top1"] for p, r in results["tiny"].items()}
    assert set(top1) == {"knn", "logreg", "linear"} and all(0 <= v <= 100 for v in top1.values())
    print(f"evaluation on the GPU: {top1}", flush=True)


def check_pinned_batches(out):
    """The training stream and the evaluation's ordered one hand their batches over in pinned
    host memory, so that the copies to the GPU are asynchronous (from pageable memory the
    training thread would stage each batch itself)."""
    import torchvision.transforms.functional as TF
    from lgp_ds.data.ordered import ordered_batches
    from lgp_ds.data.pipeline import build_train_data, embedded_shards
    cfg = jobs.tiny_config(output_dir=os.path.join(out, "pinned"))
    data = build_train_data(cfg, cfg.batch_size, build_method(cfg))
    *views, labels, skipped = next(iter(data.batches(0, 1)))
    assert all(t.is_pinned() for t in (*views, labels)), "training batches are not pinned"
    urls = embedded_shards(cfg.img_size, "val")
    index, images, labels = next(iter(ordered_batches(urls, TF.to_tensor, 8, 0, 1)))
    assert images.is_pinned(), "evaluation batches are not pinned"
    print("training and evaluation batches arrive pinned", flush=True)


def check_dali(out):
    """input_backend=dali on the GPU: DALI's "mixed" decoder (nvJPEG) hands uint8 views to
    torch on the GPU; seeded alike, the CPU pipeline reads the same samples and draws the same
    boxes and flips (DALI draws them on the host for either), so the views differ by the
    decoders and resize kernels only; then 2 steps (2 epochs) of MoCo v3 train on them."""
    try:
        from lgp_ds.data.dali import DaliTrainData
    except ImportError:
        print('input_backend=dali: skipped, NVIDIA DALI is not installed '
              '(pip install -e ".[dali]")', flush=True)
        return
    from lgp_ds.data.photos import write_photo_shards
    from lgp_ds.data.transforms import moco_views
    folder = os.path.join(out, "photos")
    os.makedirs(folder)
    pattern = write_photo_shards(folder, 64, 4)  # 500x375 JPEGs: nvJPEG decodes them
    keys = dict(data=[pattern], input_backend="dali", augment_on="device")
    cfg = jobs.tiny_config(img_size=64, shuffle_buffer=64, num_workers=4, **keys)
    crops = [v.crop for v in moco_views(64)]
    gpu = list(DaliTrainData(cfg, 32, crops).batches(0, 2))
    cpu = list(DaliTrainData(cfg, 32, crops, device=torch.device("cpu")).batches(0, 2))
    gaps = []
    for g, c in zip(gpu, cpu):
        assert [(v.device.type, v.dtype, tuple(v.shape)) for v in g[:2]] == \
            [("cuda", torch.uint8, (32, 3, 64, 64))] * 2, [(v.device, v.dtype, v.shape) for v in g]
        assert torch.equal(g[2], c[2]), "the GPU and CPU pipelines read other samples"
        gaps += [(x.cpu().float() - y.float()).abs().mean((1, 2, 3)) for x, y in zip(g[:2], c[:2])]
    gap = torch.cat(gaps).median().item()
    assert gap <= 4, (f"GPU views differ from the CPU pipeline's, seeded alike, by a median "
                      f"{gap:.1f} levels: the decoders and resize kernels differ by a few; tens "
                      f"mean other boxes or flips")
    t = trainer(os.path.join(out, "dali"), 2, "bf16", method="moco", num_stages=1,
                stage_blrs=[1e-3], warmup_epochs=0, max_steps=2, **keys)
    losses = [r["loss"] for r in t.fit()]
    assert t.data.device.type == "cuda", t.data.device
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    print(f"input_backend=dali on the GPU (nvJPEG): views {gap:.2f} levels from the CPU "
          f"pipeline's (median); 2 steps of MoCo v3, losses {losses}", flush=True)


def check_flash_attention():
    vit = create_vit("vit_base_patch16_224", fused_attn=False).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        slow = vit(x).float()
        for blk in vit.blocks:
            blk.attn.fused_attn = True
        fast = vit(x).float()
    err = ((fast - slow).norm() / slow.norm()).item()
    assert err < 2e-2, err  # bf16 rounding of two different kernels
    print(f"SDPA vs explicit attention (bf16): relative error {err:.2e}", flush=True)


def check_activation_memory():
    """What checkpointing the lowest N blocks frees on the GPU, against the memory model
    (lgp_ds/scaling/memory.py, measured on the CPU from autograd's saved tensors): each block
    checkpointed frees its activations but its bf16 input; the top block, rebuilt first, frees
    nothing more."""
    from dataclasses import replace

    from lgp_ds.models.vit import set_checkpointing
    from lgp_ds.scaling.counts import count_model
    from lgp_ds.scaling.memory import activation_bytes
    from lgp_ds.scaling.traffic import VIEWS
    depth, batch = 4, 32
    m = count_model("ViT-L/16")
    block = activation_bytes(replace(m, ckpt_blocks=0), batch) / (VIEWS * m.depth)
    block_input = 2 * batch * m.tokens * m.width
    vit = create_vit("vit_large_patch16_224", depth=depth).cuda().bfloat16()
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    vit(x).float().sum().backward()  # one-time allocations (workspaces) and the gradients: in
    peaks = []                       # the base below, out of the activations' peaks
    for blocks in range(depth + 1):
        set_checkpointing(vit, blocks)
        vit.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        vit(x).float().sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    freed = [peaks[n - 1] - peaks[n] for n in range(1, depth + 1)]
    print(f"activation memory, ViT-L blocks, batch {batch}: peak {[p / 2**20 for p in peaks]} "
          f"MiB for 0..{depth} checkpointed blocks; the model's block {block / 2**20:.0f} MiB, "
          f"its input {block_input / 2**20:.0f} MiB", flush=True)
    for n in freed[:-1]:
        assert abs(n - (block - block_input)) <= 0.1 * block, (freed, block, block_input)
    assert freed[-1] <= 0.1 * block, (freed, block)


if __name__ == "__main__":
    deepspeed.init_distributed()  # NCCL
    check_fp16_fused_adam(sys.argv[1])
    check_fused_adam_flat_masters(sys.argv[1])
    check_bf16_zero3(sys.argv[1])
    check_zero3_construction()
    check_anchor(sys.argv[1])
    check_no_host_sync(sys.argv[1])
    check_offload(sys.argv[1])
    check_methods_fp16(sys.argv[1])
    check_finetune_fp16(sys.argv[1])
    check_evaluation(sys.argv[1])
    check_pinned_batches(sys.argv[1])
    check_dali(sys.argv[1])
    check_flash_attention()
    check_activation_memory()

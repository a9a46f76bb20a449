"""Functions that run on each of the real ranks started by ``multirank.run_ranks``.

They use lgp_ds as a user would and return plain tensors; the tests compare them with
single-process references computed independently in ``reference.py``.
"""
import contextlib
import copy
import json
import os
import shutil
import warnings

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from lgp_ds import dist
from lgp_ds.config import build_config
from lgp_ds.ds_config import resolve_ds_config
from lgp_ds.engine import checkpoint
from lgp_ds.engine.trainer import Trainer
from lgp_ds.methods import build_method
from lgp_ds.models.heads import apply_to_views
from lgp_ds.objectives import moco_loss

TINY = dict(arch="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=3,
            num_heads=2, proj_dim=16, mlp_dim=32, batch_size=8, epochs=3, warmup_epochs=1,
            samples_per_epoch=16, num_workers=0, shuffle_buffer=64, stage_blrs=[1e-2, 2e-2, 4e-2],
            momentum=0.9, weight_decay=0.05, log_every=1, save_every=1000)


def tiny_config(**overrides):
    return build_config({**TINY, **overrides}, source="test")


# Offloaded masters stepped by torch's AdamW on the host: the same buffers (the host fp32
# partitions and their .grad) that DeepSpeed's CPU Adam steps by default, without its C++ build
# (a minute of the suite); tests/gpu_checks.py runs the CPU Adam
HOST_ADAM = {"zero_force_ds_cpu_optimizer": False}

# Variants of a (zero stage, precision) set-up: (config keys, DeepSpeed config keys)
OPTIONS = {"": ({}, {}),
           "fp32reduce": ({}, {"communication_data_type": "fp32"}),
           "fp32accum": ({}, {"data_types": {"grad_accum_dtype": "fp32"}}),
           # regional compile, traced without code generation (inductor needs minutes on a CPU)
           "compiled": ({"compile_blocks": True, "compile_backend": "aot_eager"}, {}),
           # ZeRO-Offload: fp32 masters, gradients and Adam on the host
           "offload": ({}, {**HOST_ADAM,
                            "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
           # ZeRO 3: the parameter partitions (the momentum encoder's too) on the host as well
           "offload_param": ({}, {**HOST_ADAM,
                                  "zero_optimization": {"offload_optimizer": {"device": "cpu"},
                                                        "offload_param": {"device": "cpu"}}})}


def ds_config(cfg, stage: int, bf16: bool, option: str = "") -> dict:
    extra = OPTIONS[option][1]
    # ZeRO 3 partitions every tensor, as it does a ViT-L's weights: the tiny model's are all
    # below DeepSpeed's default persistence threshold (1e5), which would keep them whole
    zero3 = {"stage3_param_persistence_threshold": 0} if stage == 3 else {}
    ds = {"bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9, **extra,
          "zero_optimization": {"stage": stage, **zero3, **extra.get("zero_optimization", {})}}
    return resolve_ds_config(ds, cfg, dist.get_world_size())


def build_trainer(stage: int, bf16: bool, option: str = "", **overrides) -> Trainer:
    """Trainer for the tiny config with ``overrides`` under (stage, bf16, option)."""
    cfg = tiny_config(**OPTIONS[option][0], **overrides)
    return Trainer(cfg, ds_config(cfg, stage, bf16, option), build_method(cfg))


def global_batch(seed: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of two views [B, 3, H, W], the same on every rank and reference."""
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def local(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def full_master_weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of the trainable parameters, through DeepSpeed's own API."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() > 0:
        return {n: safe_get_full_fp32_param(p).cpu().clone() for n, p in named}
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups_flat"):  # FusedAdam's FP16_Optimizer: one flat tensor a group
        fp32 = [flat.split([lp.numel() for lp in lps])
                for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)]
    elif hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer: a tensor a parameter
        fp32 = opt.fp32_groups
    else:  # plain optimizer: the parameters are the masters
        return {n: p.detach().cpu().clone() for n, p in named}
    master_of = {id(lp): hp.view_as(lp) for lps, hps in zip(opt.fp16_groups, fp32)
                 for lp, hp in zip(lps, hps)}
    return {n: master_of[id(p)].detach().cpu().clone() for n, p in named}


def momentum_partition_numel(trainer) -> int:
    """fp32 elements of the momentum encoder's EMA that this rank holds."""
    momentum = trainer.momentum
    if momentum.partitioned is not None:
        return sum(t.numel() for t in momentum.partitioned.parts.values())
    if momentum.sharded is not None:  # its shares, and the parameters in no group (frozen)
        grouped = {name for g in momentum.sharded.groups for name, _, _ in g.members}
        return (sum(g.part.numel() for g in momentum.sharded.groups)
                + sum(p.numel() for n, p in momentum.params.items() if n not in grouped))
    return sum(t.numel() for t in momentum.params.values())


def momentum_keys_exact(trainer, views) -> bool:
    """Collective. Whether the momentum encoder's keys of ``views`` (this rank's) equal, bit for
    bit, those of a copy of it holding its whole fp32 weights (gathered by ``state_dict``) under
    the same autocast: as its gathers in the compute dtype (ZeRO 1-3) promise."""
    momentum = trainer.momentum
    state = momentum.state_dict()
    whole = copy.deepcopy(momentum.module)
    for m in whole.modules():  # the partitioned encoder's gathering hooks came along
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    device = get_accelerator().current_device_name()
    for name, p in whole.named_parameters():
        p.data = state[name].to(device)
    keys = momentum(*views)
    autocast = (torch.autocast(get_accelerator().device_name(), dtype=momentum.compute_dtype)
                if momentum.compute_dtype != torch.float32 else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        want = apply_to_views(whole, whole, views)
    return all(torch.equal(k, w) for k, w in zip(keys, want))


def train_job(configs, batches, out_dir):
    """For each (zero stage, bf16, option): one grafting step per global batch of ``batches``."""
    results = {}
    for stage, bf16, option in configs:
        trainer = build_trainer(stage, bf16, option,
                                output_dir=os.path.join(out_dir, f"z{stage}{bf16}{option}"))
        lrs, losses = [], []
        for x1, x2 in batches:
            lrs.append({g["name"]: g["lr"] for g in trainer.engine.optimizer.param_groups})
            losses.append(trainer.train_step(local(x1), local(x2))["loss"].float().item())
        results[(stage, bf16, option)] = {
            "weights": full_master_weights(trainer.engine),
            "momentum": trainer.momentum.state_dict(),
            "momentum_numel": momentum_partition_numel(trainer),
            "lrs": lrs, "losses": losses,
            # the step counts of the torch optimizer's state (Adam's bias correction reads it)
            "optimizer_steps": sorted({int(state["step"]) for state
                                       in trainer.engine.basic_optimizer.state.values()}),
            "block_class": type(trainer.engine.module.base_encoder.blocks[0]).__name__,
            "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        }
        if stage > 0:
            x1, x2 = batches[0]
            results[(stage, bf16, option)]["momentum_keys_exact"] = momentum_keys_exact(
                trainer, (local(x1), local(x2)))
    return results


def anchor_job(cases, mim_path, out_dir):
    """Per (zero stage, norm, bf16, option): one step away from the MIM weights, then the
    anchor's value and gradient on their own (the loss is multiplied by 0)."""
    results = {}
    for case in cases:
        stage, norm, bf16, option = case
        cfg = tiny_config(output_dir=os.path.join(out_dir, "".join(map(str, case))), init=mim_path,
                          anchor_weight=0.5, anchor_norm=norm, anchor_blocks=2, warmup_epochs=0)
        trainer = Trainer(cfg, ds_config(cfg, stage, bf16, option), build_method(cfg))
        x1, x2 = global_batch(0, cfg)
        trainer.train_step(local(x1), local(x2))
        weights = full_master_weights(trainer.engine)
        engine = trainer.engine
        q1, q2 = engine(local(x1).to(trainer.dtype), local(x2).to(trainer.dtype))
        engine.backward((q1.sum() + q2.sum()) * 0.0)  # zero gradients, reduced as usual
        value = float(trainer.anchor.add_gradient(trainer.slices))
        grads = {n: safe_get_full_grad(p).cpu().clone()
                 for n, p in engine.module.named_parameters() if p.requires_grad}
        reference_numel = sum(v.numel() for v in trainer.anchor.reference.values())
        results[case] = {"weights": weights, "value": value, "grads": grads,
                         "reference_numel": reference_numel}
    return results


def contrastive_job(q1, q2, k1, k2, tau):
    loss = moco_loss(local(q1), local(q2), local(k1), local(k2), tau)
    return loss.item()


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def resume_job(stage, bf16, data, out_dir, keys=None, option=""):
    """4 steps straight vs 3 steps whose last checkpoint (step 3) never completed, then
    resume=auto from step 2 and 2 more steps; on the real data pipeline with corrupt samples.
    ``keys``: the method's config keys (default: graft); ``option``: of OPTIONS. 3 steps per
    epoch."""
    common = dict(samples_per_epoch=24, save_every=2, seed=3, data=[data], **(keys or {}))

    def run(name, max_steps, resume=None):
        cfg = tiny_config(output_dir=os.path.join(out_dir, name), max_steps=max_steps,
                          resume=resume, **common)
        trainer = Trainer(cfg, ds_config(cfg, stage, bf16, option), build_method(cfg))
        trainer.fit()
        return trainer

    straight = run("straight", 4)
    first = run("split", 3)
    if dist.is_main():  # interrupted while saving step 3: its marker never got written
        os.remove(os.path.join(out_dir, "split", "checkpoints", "step00000003", "lgp_ds_complete"))
    deepspeed.comm.barrier()
    second = run("split", 4, resume="auto")
    out = {name: {"weights": full_master_weights(t.engine), "momentum": t.momentum.state_dict(),
                  "step": t.step, "epoch": t.epoch}
           for name, t in (("straight", straight), ("first", first), ("resumed", second))}
    out["metrics"] = {name: read_metrics(os.path.join(out_dir, name))
                      for name in ("straight", "split")}
    return out


def resume_jobs(cases, data, out_dir):
    """:func:`resume_job` per (stage, bf16, keys, option) of ``cases``, in out_dir/<index>: one
    process start for all."""
    return [resume_job(stage, bf16, data, os.path.join(out_dir, str(i)), keys, option)
            for i, (stage, bf16, keys, option) in enumerate(cases)]


def resume_choice_jobs(out_dir):
    """:func:`resume_choice_job` without and with rank 1's shard dropped: {drop: result}."""
    return {drop: resume_choice_job(os.path.join(out_dir, str(drop)), drop)
            for drop in (False, True)}


def damaged_resume_job(out_dir):
    """A checkpoint damaged after its save: its model-states file overwritten in place (same
    size), then truncated; resume from each. Returns the two errors (None: it resumed)."""
    cfg = tiny_config(output_dir=out_dir, max_steps=2, save_every=2)
    Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg)).fit()
    states = os.path.join(out_dir, "checkpoints", "step00000002", "mp_rank_00_model_states.pt")
    errors = []
    for damage in ("overwrite", "truncate"):
        deepspeed.comm.barrier()
        if dist.is_main():
            with open(states, "r+b") as f:
                f.write(b"\0" * 64) if damage == "overwrite" else f.truncate(1000)
        deepspeed.comm.barrier()
        cfg = tiny_config(output_dir=out_dir, max_steps=3, resume="auto")
        try:
            Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg))
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def resume_choice_job(out_dir, drop_rank1_shard):
    """Ranks whose storage disagrees: rank 0's output folder holds checkpoints 2 and 4, rank 1's
    only 2 (node-local disks, a stale cache). Resume with each rank pointed at its own folder;
    with ``drop_rank1_shard`` the chosen checkpoint lacks rank 1's ZeRO shard.

    Returns (step resumed at, None) or (None, the error message)."""
    shared = os.path.join(out_dir, "rank0")
    cfg = tiny_config(output_dir=shared, max_steps=4, save_every=2)
    Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg)).fit()
    if dist.is_main():
        stale = os.path.join(out_dir, "rank1", "checkpoints")
        os.makedirs(stale)
        shutil.copytree(os.path.join(shared, "checkpoints", "step00000002"),
                        os.path.join(stale, "step00000002"))
        if drop_rank1_shard:
            tag = os.path.join(shared, "checkpoints", "step00000004")
            for f in os.listdir(tag):
                if f.startswith("zero_pp_rank_1_"):
                    os.remove(os.path.join(tag, f))
    deepspeed.comm.barrier()
    mine = os.path.join(out_dir, f"rank{dist.get_rank()}")
    cfg = tiny_config(output_dir=mine, max_steps=5, save_every=2, resume="auto")
    try:
        return Trainer(cfg, ds_config(cfg, 2, False), build_method(cfg)).step, None
    except ValueError as e:
        return None, str(e)


def batchnorm_job(x, grad_out, weight, bias):
    """CrossRankBatchNorm1d on this rank's rows of ``x`` [N, C]: output, input gradient, the
    affine gradients (summed over ranks, as DeepSpeed's reduction would) and running stats."""
    from lgp_ds.models.heads import CrossRankBatchNorm1d
    bn = CrossRankBatchNorm1d(x.shape[1])
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xl = local(x).clone().requires_grad_(True)
    y = bn(xl)
    y.backward(local(grad_out))
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    deepspeed.comm.all_reduce(grads)
    return {"y": y.detach(), "dx": xl.grad, "daffine": grads, "running_mean": bn.running_mean,
            "running_var": bn.running_var}


def shipped_ds_config(cfg, name: str, **extra) -> dict:
    """A DeepSpeed config from ds_configs/ as users get it, plus ``extra`` keys, resolved."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs", name)
    with open(path) as f:
        ds = json.load(f)
    return resolve_ds_config({**ds, **extra}, cfg, dist.get_world_size())


def _full(engine, read) -> dict[str, torch.Tensor]:
    return {n: read(p).float().cpu().clone()
            for n, p in engine.module.named_parameters() if p.requires_grad}


def local_optimizer_state(trainer, key: str) -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (start, values) of optimizer state ``key`` for this rank's master slices.

    Read straight from the torch optimizer's state of the flat fp32 tensor each master slice lives
    in (DeepSpeed's safe_get_full_optimizer_state links the state of the first param group only
    when ZeRO 1/2 step lazily initialise it).
    """
    basic = trainer.engine.optimizer.optimizer
    flats = [p for g in basic.param_groups for p in g["params"]]
    # ZeRO 3 hands its flat partitions to the torch optimizer only during the step
    flats += getattr(trainer.engine.optimizer, "fp32_partitioned_groups_flat", [])
    out = {}
    for s in trainer.slices:
        ptr = s.weight.data_ptr()
        flat = next(f for f in flats
                    if f.data_ptr() <= ptr < f.data_ptr() + f.numel() * f.element_size())
        offset = (ptr - flat.data_ptr()) // flat.element_size()
        out[s.name] = (s.start, basic.state[flat][key].view(-1)[offset:offset + s.numel].clone())
    return out


def anchor_precision_job(stage, anchor_weight, persistence, offload, mim_path, out_dir):
    """The shipped ``zero{stage}_bf16.json`` (overlap_comm on; ZeRO 0: the ZeRO 1 file with stage
    0; ``persistence``: another stage3_param_persistence_threshold; ``offload``: with
    offload_optimizer to the host) with gradient accumulation 2
    and ``init=``: the state after construction, the anchor at steps 0 and 1 (LR 0 at step 0), and
    at step 2 the gradient DeepSpeed holds before the anchor adds its own, the masters it is
    computed from, and this rank's slices of Adam's first moment before and after the step (from
    which the gradient the optimizer applied follows exactly)."""
    cfg = tiny_config(output_dir=os.path.join(out_dir, f"z{stage}"), init=mim_path,
                      anchor_weight=anchor_weight, anchor_norm="l1", anchor_blocks=2)
    name = f"zero{max(stage, 1)}_bf16.json"  # no zero0 file is shipped
    shipped = shipped_ds_config(cfg, name)
    zero, bf16 = shipped["zero_optimization"], shipped["bf16"]
    zero.update(stage=stage, **({} if persistence is None else
                                {"stage3_param_persistence_threshold": persistence}),
                **({"offload_optimizer": {"device": "cpu"}} if offload else {}))
    if stage == 0 or offload:  # DeepSpeed checks the gradients there, lgp_ds cannot
        zero.pop("compute_grad_norm", None)
        bf16.pop("check_grad_overflow", None)
    trainer = Trainer(cfg, shipped_ds_config(cfg, name, gradient_accumulation_steps=2,
                                             zero_optimization=zero, bf16=bf16,
                                             **(HOST_ADAM if offload else {})),
                      build_method(cfg))
    engine = trainer.engine
    out = {"masters": full_master_weights(engine), "momentum": trainer.momentum.state_dict(),
           "optimizer": type(engine.optimizer).__name__}
    if trainer.anchor is None:
        return out

    def step(seed):
        x1, x2 = global_batch(seed, cfg)
        half = x1.shape[0] // 2  # two micro-batches of the global batch
        for m in range(2):
            result = trainer.train_step(local(x1[m * half:(m + 1) * half]),
                                        local(x2[m * half:(m + 1) * half]))
        return float(result["anchor"])

    out["anchor"] = [step(0), step(1)]
    add_gradient = trainer.anchor.add_gradient

    def recorded(slices, grad_scale=1.0):  # the anchor's own call, observed from outside
        out["grad_before"] = _full(engine, safe_get_full_grad)
        out["masters_before"] = full_master_weights(engine)
        out["exp_avg_before"] = local_optimizer_state(trainer, "exp_avg")
        return add_gradient(slices, grad_scale)

    trainer.anchor.add_gradient = recorded
    step(2)
    out["exp_avg_after"] = local_optimizer_state(trainer, "exp_avg")
    out["betas"] = cfg.betas
    return out


def anchor_precision_jobs(cases, mim_path, out_dir):
    """:func:`anchor_precision_job` per case (its arguments before ``mim_path``), one process
    start for all."""
    return {case: anchor_precision_job(*case, mim_path,
                                       os.path.join(out_dir, "-".join(map(str, case))))
            for case in cases}


def checkpoint_job(cases, out_dir):
    """Per (zero stage, bf16, option): two steps and a checkpoint, with the exact fp32 masters
    it holds and the optimizer DeepSpeed chose."""
    results = {}
    for stage, bf16, option in cases:
        trainer = build_trainer(stage, bf16, option, warmup_epochs=0,
                                output_dir=os.path.join(out_dir, f"z{stage}{bf16}{option}"))
        for seed in range(2):
            x1, x2 = global_batch(seed, trainer.cfg)
            trainer.train_step(local(x1), local(x2))
        trainer.step = trainer.engine.global_steps
        trainer.save()
        results[(stage, bf16, option)] = {
            "weights": full_master_weights(trainer.engine),
            "momentum": trainer.momentum.state_dict(), "checkpoints": trainer.ckpt_dir,
            "optimizer": type(trainer.engine.optimizer).__name__}
    return results


def resave_crash_job(out_dir):
    """Steps 1-4 (checkpoints 2 and 4), a resume from 2, then a crash as step 4 is saved again
    (fault injected where DeepSpeed starts writing): where resume=auto would continue."""
    ckpts = os.path.join(out_dir, "checkpoints")
    build_trainer(2, False, output_dir=out_dir, max_steps=4, save_every=2).fit()
    trainer = build_trainer(2, False, output_dir=out_dir, max_steps=4, save_every=2,
                            resume=os.path.join(ckpts, "step00000002"))

    def lost_node(*args, **kwargs):
        raise RuntimeError("node lost while saving")

    trainer.engine.save_checkpoint = lost_node
    trainer.step = 4
    try:
        trainer.save()
    except RuntimeError:
        pass
    found = checkpoint.find_checkpoint("auto", ckpts)
    # What a crash of a larger world leaves: an incomplete step 4 with a shard of a rank this
    # world lacks. Saving step 4 for real must not keep it (it would break a later conversion).
    stale = os.path.join(ckpts, "step00000004", "zero_pp_rank_7_mp_rank_00_optim_states.pt")
    if dist.is_main():
        os.makedirs(os.path.dirname(stale), exist_ok=True)
        open(stale, "w").close()
    dist.barrier()
    del trainer.engine.save_checkpoint  # DeepSpeed's own again
    trainer.save()
    return found, os.path.exists(stale), checkpoint.is_complete(ckpts, "step00000004")


class _Evaluation:
    """An evaluator due at the last step only, failing when ``fail``."""
    every = 0

    def __init__(self, fail: bool):
        self.fail = fail

    def __call__(self, trainer) -> dict:
        if self.fail:
            raise RuntimeError("evaluation failed")
        return {"knn": 42.0}


def evaluation_after_resume_job(out_dir):
    cfg = tiny_config(output_dir=out_dir, max_steps=2, resume="auto")
    trainer = Trainer(cfg, ds_config(cfg, 0, False), build_method(cfg),
                      evaluators=[_Evaluation(fail=True)])
    try:
        trainer.fit()
    except RuntimeError as e:
        failed = str(e)
    trainer = Trainer(cfg, ds_config(cfg, 0, False), build_method(cfg),
                      evaluators=[_Evaluation(fail=False)])
    records = trainer.fit()
    dist.barrier()  # rank 0 writes metrics.jsonl
    return {"failed": failed, "resumed_step": trainer.step, "records": records,
            "logged_steps": [r["step"] for r in read_metrics(out_dir)]}


def nonfinite_gradient_job(cases, mim_path, out_dir):
    """For each (DeepSpeed config of ds_configs/, its extra keys, anchor weight, poisoned step):
    three grafting steps; in the poisoned one (1-based) rank 1's loss gains a term whose value
    is 0 and whose gradient is NaN (on the first trainable tensor), so that only a check of the
    gradients can tell. Per case: whether lgp_ds checked the gradients itself, the LR before
    the first step, and per step the loss, whether it changed the full master weights and the
    momentum encoder, the skipped and non-finite step counts and the LR after it; the warnings
    the steps raised; where DeepSpeed links its optimizer state to the parameters (ZeRO 1/2),
    how many of this rank's parameters got a linked state."""
    results = {}
    for i, (name, extra, anchor_weight, poisoned_step) in enumerate(cases):
        cfg = tiny_config(output_dir=os.path.join(out_dir, f"case{i}"), init=mim_path,
                          anchor_weight=anchor_weight, anchor_blocks=2, warmup_epochs=0)
        trainer = Trainer(cfg, shipped_ds_config(cfg, name, **extra), build_method(cfg))
        weight = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
        loss = trainer.method.loss

        def poisoned(*args, _step=poisoned_step, **kwargs):
            value, terms = loss(*args, **kwargs)
            if trainer.engine.global_steps + 1 == _step and dist.get_rank() == 1:
                value = value + 0 * (weight - weight.detach()).abs().sqrt().sum()
            return value, terms
        trainer.method.loss = poisoned
        before, record = full_master_weights(trainer.engine), []
        lr = trainer.engine.optimizer.param_groups[-1]["lr"]
        # the EMA's weights (BatchNorm running statistics follow every forward pass)
        momentum_before = {n: p.clone() for n, p in trainer.momentum.params.items()}
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            for step in range(3):
                x1, x2 = global_batch(step, cfg)
                out = trainer.train_step(local(x1), local(x2))
                after = full_master_weights(trainer.engine)
                momentum = {n: p.clone() for n, p in trainer.momentum.params.items()}
                record.append({
                    "loss": out["loss"].float().item(),
                    "changed": any(not torch.equal(after[n], before[n]) for n in after),
                    "momentum_changed": any(not torch.equal(momentum[n], momentum_before[n])
                                            for n in momentum),
                    "skipped": trainer.engine.skipped_steps,
                    "nonfinite": trainer.faults.nonfinite_steps,
                    "lr": trainer.engine.optimizer.param_groups[-1]["lr"]})
                before, momentum_before = after, momentum
        mapped = [p._hp_mapping for p in trainer.engine.module.parameters()
                  if getattr(p, "_hp_mapping", None) is not None]
        results[i] = {"checks_gradients": trainer.checks_gradients, "lr": lr, "steps": record,
                      "warnings": [str(w.message) for w in raised],
                      "linked": sum(bool(m.optim_fragment) for m in mapped) if mapped else None}
    return results

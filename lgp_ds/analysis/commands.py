"""The analyses end to end, as ``tools/analyze.py`` runs them: read the checkpoints and the
data, compute on every rank, write ``NAME.json`` and ``NAME.png`` on rank 0.

Every function is collective: with several ranks (``deepspeed tools/analyze.py ...``) each rank
takes its share of the images and the results are reduced across ranks; with one process
(``python tools/analyze.py ...``) the same numbers come out.
"""
import os
import time

import numpy as np
import torch

from lgp_ds import convert, dist
from lgp_ds.config import load_recipe, parse_overrides
from lgp_ds.data.pipeline import shards_or_embedded
from lgp_ds.data.transforms import Views, eval_transform, mae_views, moco_views, torchvision_view
from lgp_ds.eval.features import extract_features, load_encoder

from . import attention_distance, grad_conflict, output, tsne, vic
from .images import rank_batches


def named_paths(specs: list[str]) -> dict[str, str]:
    """``["NAME=PATH", "PATH", ...]`` -> {name: path}; a bare path is named by its base name. A
    name has no ``/`` and an existing path is never split: ``runs/blr=1.5e-4`` is a path."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or os.path.exists(spec):
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise ValueError(f"--ckpt {spec!r}: expected NAME=PATH or PATH")
        if name in out:
            raise ValueError(f"--ckpt {spec!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def _check_batch(batch_size: int, batches: int) -> None:
    world = dist.get_world_size()
    if batch_size < world or batches < 1:
        raise ValueError(f"--batch_size {batch_size} --batches {batches}: need at least one "
                         f"batch of at least one image per rank ({world} ranks)")


def _encoders(ckpts: dict[str, str]) -> dict:
    """{name: frozen timm ViT on this rank's device} of every checkpoint (the class token after
    the final norm; see :func:`lgp_ds.eval.features.load_encoder`)."""
    encoders = {}
    for name, path in ckpts.items():
        try:
            encoders[name] = load_encoder(path).to(_device())
        except ValueError as e:
            raise ValueError(e if path in str(e) else f"{path}: {e}") from None
    return encoders


def _img_size(vit) -> int:
    return vit.patch_embed.img_size[0]


def _settings(args, **more) -> dict:
    """What the record's numbers depend on besides the checkpoints."""
    return {"data": args.data or f"embedded digits, {args.split} split", "seed": args.seed,
            "world_size": dist.get_world_size(), **more}


def _batches(args) -> dict:
    return {"batch_size": args.batch_size, "batches": args.batches}


def run_grad_conflict(args) -> dict:
    """Figure 1 for each checkpoint: cosines [batches, depth], medians and their line."""
    _check_batch(args.batch_size, args.batches)
    if args.batch_size % dist.get_world_size():
        raise ValueError(f"--batch_size {args.batch_size}: must split evenly over the "
                         f"{dist.get_world_size()} ranks (MoCo's keys and MAE's masked patches)")
    overrides = parse_overrides(args.overrides)
    record, fig_rows = {"analysis": "grad_conflict", "checkpoints": {}}, []
    for name, path in named_paths(args.ckpt).items():
        weights = convert.read(path)
        own = weights.config is not None
        values = weights.config if own else load_recipe(args.recipe)
        model, momentum, cfg, notes = grad_conflict.build_mtl(
            weights, {**values, **overrides}, args.seed, path)
        notes.append(f"heads and losses sized and set by {'the run' if own else args.recipe}'s "
                     f"config" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        model, momentum = model.to(_device()), momentum.to(_device())
        for note in notes:
            dist.print_main(f"{name}: {note}")
        size = _img_size(model.base_encoder)
        urls = shards_or_embedded(args.data, size, args.split, 0)
        views = Views(*(torchvision_view(size, v) for v in
                        moco_views(size, cfg.crop_min) + mae_views(cfg.mae_crop_min)))
        start, rows = time.time(), []
        for positions, batch, _ in rank_batches(urls, args.batch_size, args.batches, views,
                                                args.seed):
            rows.append(grad_conflict.batch_cosines(model, momentum, positions, batch, cfg,
                                                    args.seed).numpy())
        cosines = np.stack(rows)
        fit = grad_conflict.summary(cosines)
        dist.print_main(f"{name}: median cosine per block "
                        f"{' '.join(f'{m:+.3f}' for m in fit['median'])}; slope "
                        f"{fit['slope']:+.4f} per block ({time.time() - start:.0f} s)")
        record["checkpoints"][name] = {
            "path": path, "notes": notes, "cosine": cosines.tolist(), **fit,
            "losses": {k: getattr(cfg, k) for k in grad_conflict.LOSS_KEYS}}
        fig_rows.append((name, cosines, fit))
    record["settings"] = _settings(args, **_batches(args))
    fig, axes = output.figure(len(fig_rows))
    for ax, row in zip(axes, fig_rows):
        grad_conflict.plot(ax, *row)
    return output.write(args.out, args.name or "analysis_grad_conflict", record, fig)


def run_attention_distance(args) -> dict:
    """Figure 7: [depth, heads] mean attention distances of each checkpoint."""
    _check_batch(args.batch_size, args.batches)
    encoders = _encoders(named_paths(args.ckpt))
    distances = {}
    for name, enc in encoders.items():
        size = _img_size(enc.vit)
        urls = shards_or_embedded(args.data, size, args.split, 0)
        batches = rank_batches(urls, args.batch_size, args.batches, eval_transform(size),
                               args.seed)
        distances[name] = attention_distance.attention_distances(enc.vit, batches).tolist()
        dist.print_main(f"{name}: mean attention distance per block (pixels) "
                        f"{' '.join(f'{np.mean(d):.1f}' for d in distances[name])}")
    pe = enc.vit.patch_embed  # the last checkpoint's grid: the reference line
    patch = pe.patch_size[0]
    uniform = attention_distance.uniform_distance(tuple(pe.grid_size), patch)
    record = {"analysis": "attention_distance", "unit": "pixels of the input image",
              "distance": distances,  # {name: [block][head]}
              "uniform_attention": uniform,
              "checkpoints": {n: enc.description for n, enc in encoders.items()},
              "settings": _settings(args, **_batches(args))}
    fig, (ax,) = output.figure(1, width=6.0)
    attention_distance.plot(ax, distances, patch, uniform)
    return output.write(args.out, args.name or "analysis_attention_distance", record, fig)


def run_vic(args) -> dict:
    """Figure 6: per block, variance, invariance and covariance of each checkpoint."""
    _check_batch(args.batch_size, args.batches)
    if args.batch_size < 2:
        raise ValueError("--batch_size: the variance needs at least 2 images per batch")
    encoders = _encoders(named_paths(args.ckpt))
    stats = {}
    for name, enc in encoders.items():
        size = _img_size(enc.vit)
        urls = shards_or_embedded(args.data, size, args.split, 0)
        views = Views(*(torchvision_view(size, v) for v in moco_views(size, args.crop_min)))
        stats[name] = vic.block_vic(enc.vit, rank_batches(urls, args.batch_size, args.batches,
                                                          views, args.seed))
        dist.print_main(f"{name}: " + "; ".join(
            f"{term} " + " ".join(f"{b[term]:.3f}" for b in stats[name]) for term in vic.TERMS))
    record = {"analysis": "vic", "blocks": stats,
              "checkpoints": {n: enc.description for n, enc in encoders.items()},
              "settings": _settings(args, **_batches(args), crop_min=args.crop_min)}
    fig, axes = output.figure(3, width=3.6)
    vic.plot(axes, stats)
    return output.write(args.out, args.name or "analysis_vic", record, fig)


def run_tsne(args) -> dict:
    """Figure 3: t-SNE of each checkpoint's frozen features of the chosen classes."""
    classes = None if args.classes is None else [int(c) for c in args.classes.split(",")]
    encoders = _encoders(named_paths(args.ckpt))
    embeddings, record = {}, {"analysis": "tsne", "checkpoints": {}}
    for name, enc in encoders.items():
        size = _img_size(enc.vit)
        urls = shards_or_embedded(args.data, size, args.split, 0)
        feats, labels = extract_features(enc, urls, eval_transform(size), args.batch_size)
        feats, labels = tsne.choose(feats, labels, classes, args.per_class)
        if dist.is_main():  # scikit-learn on one process
            points = tsne.embed(feats, args.seed, args.perplexity)
            embeddings[name] = (points, labels.numpy())
            record["checkpoints"][name] = {"description": enc.description,
                                           "points": points.round(3).tolist(),
                                           "labels": labels.tolist()}
    record["settings"] = _settings(args, classes=classes, per_class=args.per_class,
                                   perplexity=args.perplexity, batch_size=args.batch_size)
    fig, axes = output.figure(len(encoders), width=3.6, height=3.4)
    if dist.is_main():
        tsne.plot(axes, embeddings)
    return output.write(args.out, args.name or "analysis_tsne", record, fig)


COMMANDS = {"grad_conflict": run_grad_conflict, "attention_distance": run_attention_distance,
            "vic": run_vic, "tsne": run_tsne}

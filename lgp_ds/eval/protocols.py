"""The frozen-feature protocols on labelled training images and held-out images, for any number
of encoders: kNN with every training label, L2 logistic regression on a labelled subset (a
SimCLR-style file, or a class-balanced fraction drawn from a seed), and the linear probe with
every training label.

Features come from :func:`lgp_ds.eval.features.cached_features` (every rank encodes its own
shards, results in dataset order, cached per encoder and data); kNN and the linear probe run on
every rank (the probe's batches split across ranks), the logistic regression (scikit-learn) on
rank 0. Results: {encoder: {protocol: {"top1": %, "labels": labelled images used, "test_images": held-out
images scored, ...}}}.
"""
import os
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from deepspeed.accelerator import get_accelerator

from lgp_ds import dist
from lgp_ds.data.index import check_same_classes
from lgp_ds.data.shards import image_name
from lgp_ds.data.subsets import balanced_subset, read_subset, write_subset
from lgp_ds.data.transforms import eval_transform

from .features import cached_features
from .fewshot import check_subset, logistic_regression
from .knn import knn_accuracy
from .linear import SWEEP_BLRS, linear_probe
from .report import held_out, write_results

PROTOCOLS = ("knn", "logreg", "linear")


@dataclass
class EvalSettings:
    protocols: tuple[str, ...] = PROTOCOLS
    fraction: float = 0.1  # labelled share of the training images for logistic regression
    subset: str | None = None  # or a SimCLR-style subset file (1percent.txt) instead
    knn_k: int = 20
    knn_t: float = 0.07
    linear_epochs: int = 90
    linear_blrs: tuple[float, ...] = SWEEP_BLRS  # the official grafting code's sweep
    linear_batch_size: int = 256
    img_size: int = 224
    batch_size: int = 256  # feature extraction, per rank
    num_workers: int = 0
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the first setting that means nothing."""
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"--protocols {','.join(self.protocols)}: choose from "
                             f"{','.join(PROTOCOLS)}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction {self.fraction}: must lie in (0, 1]")
        for name in ("knn_k", "linear_epochs", "linear_batch_size", "img_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be positive")
        if self.knn_t <= 0:
            raise ValueError(f"--knn_t {self.knn_t}: must be positive")
        if self.subset is not None and not os.path.isfile(self.subset):
            raise FileNotFoundError(f"--subset {self.subset}: no such file")


class Split(NamedTuple):
    """One set's frozen features [N, D], labels [N] and sample keys, in dataset order."""
    features: torch.Tensor
    labels: torch.Tensor
    keys: list[str]


def labelled_subset(train: Split, settings: EvalSettings) -> list[str]:
    """The sample keys of the labelled subset, in dataset order: those the subset file names
    (matched on :func:`image_name`, as training matches them: ``n01440764_10026.JPEG`` names
    the sample ``n01440764_10026``; a name the training set lacks is refused, and so is a file
    for a set where two samples share a name, e.g. ``cat/0001`` and ``dog/0001``), or a
    class-balanced ``fraction`` of the keys drawn with ``seed``. Computed alike on every rank,
    which all refuse (ValueError) a subset too small for the logistic regression's penalty
    sweep."""
    if settings.subset is not None:
        names = [image_name(k) for k in train.keys]
        first = {}
        for key, name in zip(train.keys, names):
            if first.setdefault(name, key) != key:
                raise ValueError(f"--subset {settings.subset}: subset files name images by base "
                                 f"name, but the samples {first[name]!r} and {key!r} share the "
                                 f"name {name!r}: one line would label both")
        chosen = set(image_name(n) for n in read_subset(settings.subset, available=names))
    else:
        names = train.keys
        chosen = set(balanced_subset(names, train.labels.tolist(), settings.fraction,
                                     settings.seed))
    picked = [i for i, n in enumerate(names) if n in chosen]
    try:
        check_subset(train.labels[picked].numpy())
    except ValueError as e:
        given = (f"--subset {settings.subset}" if settings.subset is not None
                 else f"--fraction {settings.fraction:g}")
        raise ValueError(f"{given}: {e}; label more images") from None
    return [train.keys[i] for i in picked]


def evaluate_features(train: Split, val: Split, settings: EvalSettings, subset: set[str],
                      device=None) -> dict:
    """Collective: the protocols on one encoder's features; {protocol: result} (rank 0 alone
    has the logistic regression's). kNN and the linear probe run on ``device`` (default the
    accelerator's: the probe's gradient all-reduce needs it under NCCL)."""
    device = device or get_accelerator().current_device_name()
    on_device = [t.to(device) for t in (train.features, train.labels, val.features, val.labels)]
    out = {}
    if "knn" in settings.protocols:
        out["knn"] = {"top1": knn_accuracy(*on_device, settings.knn_k, settings.knn_t),
                      "labels": len(train.labels), "k": settings.knn_k, "t": settings.knn_t}
    if "logreg" in settings.protocols and dist.is_main():  # scikit-learn, one process
        chosen = torch.tensor([k in subset for k in train.keys])
        lr = logistic_regression(train.features[chosen], train.labels[chosen], val.features,
                                 val.labels, seed=settings.seed)
        out["logreg"] = {"top1": lr["top1"], "labels": int(chosen.sum()), "C": lr["C"]}
    if "linear" in settings.protocols:
        # every training label is used: 90% train the heads, 10% choose the LR
        linear = linear_probe(*on_device, blrs=settings.linear_blrs, epochs=settings.linear_epochs,
                              batch_size=settings.linear_batch_size, seed=settings.seed)
        out["linear"] = {"top1": linear["top1"], "labels": len(train.labels),
                         "blr": linear["lr"], "epochs": linear["epochs"]}
    for result in out.values():
        result["test_images"] = len(val.labels)
    return out


def evaluate_encoders(encoders: dict, train_urls: list[str], val_urls: list[str],
                      settings: EvalSettings, output_dir: str) -> dict:
    """Collective: every encoder (name -> :class:`FrozenEncoder`, on the CPU) through the
    protocols; the results. Each encoder is on the accelerator only while it encodes. Features
    are cached in ``output_dir/features``; the labelled subset is written to ``output_dir`` as
    a SimCLR-style file."""
    check_same_classes(train_urls, val_urls)  # before hours of encoding, on every rank alike
    transform = eval_transform(settings.img_size)
    cache = os.path.join(output_dir, "features")
    device = get_accelerator().current_device_name()
    results, subset = {}, None
    for name, encoder in encoders.items():
        began = time.time()
        encoder.to(device)
        train, val = (Split(*cached_features(cache, encoder, urls, transform, settings.batch_size,
                                             settings.num_workers, with_keys=True))
                      for urls in (train_urls, val_urls))
        encoder.to("cpu")
        if subset is None and "logreg" in settings.protocols:
            names = labelled_subset(train, settings)
            subset = set(names)
            if dist.is_main():
                write_subset(os.path.join(output_dir, "subset.txt"), names)
        results[name] = evaluate_features(train, val, settings, subset, device)
        dist.print_main(f"== evaluated {name} in {time.time() - began:.0f} s: " + ", ".join(
            f"{k} {r['top1']:.1f}" for k, r in results[name].items()))
    return results


def settings_record(settings: EvalSettings) -> dict:
    """The settings as JSON-ready values, for results.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def publish(results: dict, settings: EvalSettings, output_dir: str, what: str = "") -> None:
    """Collective: rank 0 writes the table (results.md, .json with the settings, .png) into
    ``output_dir`` and prints it; titled "``what``: top-1 (%) on N held-out images"."""
    if dist.is_main():
        title = (f"{what + ': ' if what else ''}top-1 (%) on {held_out(results)} held-out "
                 f"images, frozen features")
        os.makedirs(output_dir, exist_ok=True)
        paths = write_results(results, output_dir, title, {"settings": settings_record(settings)})
        with open(paths["md"]) as f:
            print(f.read() + "\nwritten: " + ", ".join(paths.values()), flush=True)
    dist.barrier()

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

from lgp_ds import dist
from lgp_ds.data.subsets import balanced_subset, read_subset, write_subset
from lgp_ds.data.transforms import eval_transform

from .features import cached_features
from .fewshot import logistic_regression
from .knn import knn_accuracy
from .linear import SWEEP_BLRS, linear_probe

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
    """The sample keys of the labelled subset, in dataset order: the file's names (refused if
    the training set lacks one), or a class-balanced ``fraction`` drawn with ``seed``."""
    if settings.subset is not None:
        return read_subset(settings.subset, available=train.keys)
    return balanced_subset(train.keys, train.labels.tolist(), settings.fraction, settings.seed)


def evaluate_features(train: Split, val: Split, settings: EvalSettings, subset: set[str]) -> dict:
    """Collective: the protocols on one encoder's features; {protocol: result} (rank 0 alone
    has the logistic regression's)."""
    out = {}
    if "knn" in settings.protocols:
        out["knn"] = {"top1": knn_accuracy(train.features, train.labels, val.features,
                                           val.labels, settings.knn_k, settings.knn_t),
                      "labels": len(train.labels), "k": settings.knn_k, "t": settings.knn_t}
    if "logreg" in settings.protocols and dist.is_main():  # scikit-learn, one process
        chosen = torch.tensor([k in subset for k in train.keys])
        lr = logistic_regression(train.features[chosen], train.labels[chosen], val.features,
                                 val.labels, seed=settings.seed)
        out["logreg"] = {"top1": lr["top1"], "labels": int(chosen.sum()), "C": lr["C"]}
    if "linear" in settings.protocols:
        # every training label is used: 90% train the heads, 10% choose the LR
        linear = linear_probe(train.features, train.labels, val.features, val.labels,
                              blrs=settings.linear_blrs, epochs=settings.linear_epochs,
                              batch_size=settings.linear_batch_size, seed=settings.seed)
        out["linear"] = {"top1": linear["top1"], "labels": len(train.labels),
                         "blr": linear["lr"], "epochs": linear["epochs"]}
    for result in out.values():
        result["test_images"] = len(val.labels)
    return out


def evaluate_encoders(encoders: dict, train_urls: list[str], val_urls: list[str],
                      settings: EvalSettings, output_dir: str) -> dict:
    """Collective: every encoder (name -> :class:`FrozenEncoder`) through the protocols; the
    results. Features are cached in ``output_dir/features``; the labelled subset is written to
    ``output_dir`` as a SimCLR-style file."""
    transform = eval_transform(settings.img_size)
    cache = os.path.join(output_dir, "features")
    results, subset = {}, None
    for name, encoder in encoders.items():
        began = time.time()
        train, val = (Split(*cached_features(cache, encoder, urls, transform, settings.batch_size,
                                             settings.num_workers, with_keys=True))
                      for urls in (train_urls, val_urls))
        if subset is None and "logreg" in settings.protocols:
            names = labelled_subset(train, settings)
            subset = set(names)
            if dist.is_main():
                write_subset(os.path.join(output_dir, "subset.txt"), names)
        results[name] = evaluate_features(train, val, settings, subset)
        dist.print_main(f"== evaluated {name} in {time.time() - began:.0f} s: " + ", ".join(
            f"{k} {r['top1']:.1f}" for k, r in results[name].items()))
    return results


def settings_record(settings: EvalSettings) -> dict:
    """The settings as JSON-ready values, for results.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}

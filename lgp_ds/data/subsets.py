"""Labelled subsets for few-shot evaluation, as SimCLR's ``1percent.txt`` / ``10percent.txt``.

A subset file holds one image name a line (the WebDataset sample key, or ImageNet's file name).
:func:`balanced_subset` draws a class-balanced subset of a fraction from a seed; the same seed
gives the same file.
"""
import os
import random
from collections import defaultdict

from lgp_ds.atomic import write_text

from .shards import image_name


def read_subset(path: str, available=None) -> list[str]:
    """The image names in a subset file, in file order.

    Names are compared as :func:`image_name` gives them (``n01440764_10026.JPEG`` and the
    sample key ``train/n01440764_10026`` are one image). A name given twice is refused; with
    ``available`` (the names the data set has), so is a name the data set lacks: a subset file
    of another data set would otherwise select nothing.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset file {path}: no such file")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    seen, twice = set(), []
    for n in names:
        if image_name(n) in seen:
            twice.append(n)
        seen.add(image_name(n))
    if twice:
        raise ValueError(f"subset file {path}: {len(twice)} name(s) given twice, e.g. {twice[:3]}")
    if available is not None:
        available = {image_name(a) for a in available}
        missing = [n for n in names if image_name(n) not in available]
        if missing:
            raise ValueError(f"subset file {path}: {len(missing)} of its {len(names)} names are not "
                             f"in the data set, e.g. {missing[:3]}")
    return names


def balanced_subset(names: list[str], labels: list[int], fraction: float, seed: int = 0
                    ) -> list[str]:
    """The same number of images from every class, round(fraction * len(names) / classes)
    (at least 1), drawn with ``seed``; in the order of ``names``.

    The draw depends on the names and labels only, not on their order (each class's names are
    sorted before drawing), so the same images are chosen however the set is sharded and read.
    ValueError names a class with fewer images than that.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names but {len(labels)} labels")
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    per_class = max(1, round(fraction * len(names) / len(by_class)))
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=names.__getitem__)
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} images, fewer than the "
                             f"{per_class} a balanced {fraction:g} subset takes from each class")
        chosen += rng.sample(members, per_class)
    return [names[i] for i in sorted(chosen)]


def write_subset(path: str, names: list[str]) -> None:
    """Write ``names`` one a line, through a temporary file (never half a subset)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, "".join(n + "\n" for n in names))

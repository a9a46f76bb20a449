"""Labelled images to make shards of: an ImageNet-style folder tree, a file list, or ImageNet's
validation layout.

Class indices are positions in a class list: the sorted class names (ImageNet's synsets sorted
are torchvision's ImageFolder order), or a list given as a file of one name a line (the
``classes.txt`` beside another shard set), so that a val set's indices agree with its train set's.

- folder tree ``ROOT/CLASS/.../NAME.EXT``: the class is the folder under ROOT; every folder there
  is a class, even an empty one (as ImageFolder counts them).
- file list, one ``PATH LABEL`` a line (PATH relative to the list's folder, may hold spaces):
  LABEL is a class name; when every label is an integer, they are the class indices themselves
  (Caffe-style ``train.txt``), numbering the given class list or ``0 .. max``.
- validation layout: a flat folder of images (``ILSVRC2012_val_00000001.JPEG`` ...) and labels,
  either one class name a line in sorted file-name order (e.g. TensorFlow's
  ``imagenet_2012_validation_synset_labels.txt``) or Kaggle's ``LOC_val_solution.csv``
  (``ImageId,PredictionString``: the first word of the string is the class). Integer lines are
  refused: the devkit's ground truth counts from 1 in the devkit's own class order.
"""
import csv
import os
from collections import Counter
from dataclasses import dataclass

from .shards import IMAGE_KEYS, image_name


@dataclass
class Source:
    kind: str  # "folder", "list" or "val"
    root: str  # absolute; image paths are relative to it
    labels: str | None  # the list or label file (absolute), None for a folder tree
    images: list[tuple[str, int]]  # (path relative to root, class index), sorted by path
    classes: list[str]  # class names in index order
    skipped: list[str]  # files passed over as they are not images (paths relative to root)

    def describe(self) -> dict:
        """What identifies the source, for the plan and the index."""
        return {"kind": self.kind, "root": self.root, "labels": self.labels}


def extension(path: str) -> str:
    """The file's extension in lower case, without the dot: the image's key in its sample."""
    return os.path.splitext(path)[1][1:].lower()


def is_image(path: str) -> bool:
    """Whether the file's extension is one the shard reader takes as an image."""
    return extension(path) in IMAGE_KEYS


def read_classes(path: str) -> list[str]:
    """Class names from a file of one name a line (index = line number from 0; blank lines
    ignored); a name given twice is refused."""
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise ValueError(f"class list {path}: {len(twice)} name(s) given twice, e.g. {twice[:3]}")
    if not names:
        raise ValueError(f"class list {path}: no class names")
    return names


def _indices(labels: list[str], where: list[str], classes: list[str] | None
             ) -> tuple[list[int], list[str]]:
    """(index of each label, the class list): positions in ``classes``, or without it in the
    sorted labels. ValueError names labels that a given list lacks, and where (``where[i]``)
    they are given."""
    classes = classes or sorted(set(labels))
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = [f"{w}: {label!r}" for w, label in zip(where, labels) if label not in lookup]
    if unknown:
        raise ValueError(f"{len(unknown)} label(s) not in the given class list of "
                         f"{len(classes)}, e.g. {'; '.join(unknown[:3])}")
    return [lookup[label] for label in labels], classes


def _sorted_source(kind, root, labels_file, paths, labelled, skipped) -> Source:
    """The Source of ``paths`` with ``labelled`` = (their class indices, class list)."""
    if not paths:
        raise FileNotFoundError(f"{labels_file or root}: no images (extensions "
                                f"{', '.join(IMAGE_KEYS)}, any case)")
    indices, classes = labelled
    return Source(kind, root, labels_file, sorted(zip(paths, indices)), classes, sorted(skipped))


def folder_source(root: str, classes: list[str] | None = None) -> Source:
    """The images under ``root/CLASS/`` (at any depth below CLASS), labelled by CLASS."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels, skipped = [], [], [e.name for e in os.scandir(root) if not e.is_dir()]
    for name in folders:
        for dirpath, _, files in os.walk(os.path.join(root, name)):
            for file in files:
                rel = os.path.relpath(os.path.join(dirpath, file), root)
                if is_image(file):
                    paths.append(rel)
                    labels.append(name)
                else:
                    skipped.append(rel)
    return _sorted_source("folder", root, None, paths,
                          _indices(labels, paths, classes or folders), skipped)


def list_source(path: str, classes: list[str] | None = None) -> Source:
    """The images of a ``PATH LABEL`` list (see the module); files listed twice, missing files
    and non-image paths are refused naming their lines."""
    path = os.path.abspath(path)
    root = os.path.dirname(path)
    paths, labels, where = [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path} line {n}: {line.strip()!r} is not 'PATH LABEL'")
            paths.append(os.path.relpath(os.path.join(root, parts[0]), root))
            labels.append(parts[1])
            where.append(f"{path} line {n}")
    lines = {}  # path -> where it is listed; './a.jpg' and 'a.jpg' are one file
    for w, p in zip(where, paths):
        lines.setdefault(p, []).append(w)
    twice = [f"{p} ({', '.join(ws)})" for p, ws in lines.items() if len(ws) > 1]
    if twice:
        raise ValueError(f"{len(twice)} file(s) listed more than once (each line would make a "
                         f"sample of it), e.g. {'; '.join(twice[:3])}")
    bad = [f"{w}: {p}" for w, p in zip(where, paths) if not is_image(p)]
    if bad:
        raise ValueError(f"{len(bad)} listed file(s) are not images (extensions "
                         f"{', '.join(IMAGE_KEYS)}), e.g. {'; '.join(bad[:3])}")
    missing = [f"{w}: {p}" for w, p in zip(where, paths)
               if not os.path.isfile(os.path.join(root, p))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed file(s) missing (paths are relative to "
                                f"{root}), e.g. {'; '.join(missing[:3])}")
    if labels and all(label.isdigit() for label in labels):  # the class indices themselves
        indices = [int(label) for label in labels]
        classes = classes or [str(i) for i in range(max(indices) + 1)]
        beyond = [f"{w}: {i}" for w, i in zip(where, indices) if i >= len(classes)]
        if beyond:
            raise ValueError(f"{len(beyond)} class index(es) beyond the {len(classes)} classes "
                             f"given, e.g. {'; '.join(beyond[:3])}")
        return _sorted_source("list", root, path, paths, (indices, classes), [])
    return _sorted_source("list", root, path, paths, _indices(labels, where, classes), [])


def _val_labels(labels_path: str, files: list[str]) -> tuple[list[str], list[str]]:
    """(class name of each of ``files``, where each is given) from a label file (see module)."""
    with open(labels_path) as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    if lines and lines[0][1].startswith("ImageId"):  # Kaggle's LOC_val_solution.csv
        given = {}
        for n, row in enumerate(csv.reader(text for _, text in lines[1:]), 2):
            if len(row) != 2 or not row[1].split():
                raise ValueError(f"{labels_path} line {n}: {row} is not 'ImageId,CLASS ...'")
            given[row[0]] = (row[1].split()[0], f"{labels_path} line {n}")
        ids = [image_name(f) for f in files]
        unlabelled = [f for f, i in zip(files, ids) if i not in given]
        absent = sorted(set(given) - set(ids))
        if unlabelled or absent:
            raise ValueError(f"{labels_path}: {len(unlabelled)} image(s) without a label (e.g. "
                             f"{unlabelled[:3]}) and {len(absent)} label(s) of images not in the "
                             f"folder (e.g. {absent[:3]})")
        return [given[i][0] for i in ids], [given[i][1] for i in ids]
    if lines and all(text.isdigit() for _, text in lines):
        raise ValueError(f"{labels_path}: integer labels are ambiguous (the devkit's "
                         f"ILSVRC2012_validation_ground_truth.txt counts from 1 in the devkit's "
                         f"class order, not the sorted synsets): give one synset a line, in "
                         f"sorted file-name order, or Kaggle's LOC_val_solution.csv")
    if len(lines) != len(files):
        raise ValueError(f"{labels_path}: {len(lines)} labels for {len(files)} images: one class "
                         f"a line, in sorted file-name order")
    return [text for _, text in lines], [f"{labels_path} line {n}" for n, _ in lines]


def val_source(folder: str, labels_path: str, classes: list[str] | None = None) -> Source:
    """The images in the flat ``folder``, labelled from ``labels_path`` (see the module)."""
    folder, labels_path = os.path.abspath(folder), os.path.abspath(labels_path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    entries = sorted(e.name for e in os.scandir(folder) if e.is_file())
    files = [e for e in entries if is_image(e)]
    names, where = _val_labels(labels_path, files)
    return _sorted_source("val", folder, labels_path, files, _indices(names, where, classes),
                          [e for e in entries if not is_image(e)])

"""Make WebDataset shards, with the index that gives training its epoch size, from labelled images.

    python tools/make_shards.py folder ROOT OUT          # ImageNet train: ROOT/<wnid>/*.JPEG
    python tools/make_shards.py list LIST OUT            # lines 'PATH LABEL'
    python tools/make_shards.py val FOLDER LABELS OUT (--classes FILE | --own_classes)
                                                         # ImageNet val: flat folder + labels
        [--classes FILE] [--prefix NAME] [--seed N] [--max_count N] [--max_size BYTES]
        [--workers N]

LABEL (list) is a class name, or, when every label is an integer, the class index itself. LABELS
(val) is one class name a line in sorted file-name order, or Kaggle's LOC_val_solution.csv.
Class indices follow the sorted class names, or --classes (e.g. the train set's classes.txt, so
that val's indices agree with train's; a label not in it is refused). val requires --classes, or
--own_classes to number its own sorted labels: val's labels alone may lack train's classes and
number the others differently.

OUT gets PREFIX-000000.tar ... (samples KEY.jpeg with the file's bytes and KEY.cls with the class
index; KEY the file name without extension), classes.txt, plan.json and, once every shard is
complete, index.json. Interrupted, the same command continues where it stopped, writing again
the shards it finds damaged; other arguments or changed source files are refused, and so is a
folder that another run is writing. Images PIL cannot decode are left out and listed.
Errors exit 2.
"""
import argparse
import os
import sys

from lgp_ds.data.sources import folder_source, list_source, read_classes, val_source
from lgp_ds.data.writer import make_shards

MAX_LISTED = 20  # unreadable or passed-over files printed


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--classes", help="class list, one name a line (default: the sorted "
                                          "class names of the source)")
    common.add_argument("--prefix", help="shard file names PREFIX-000000.tar (default: train, "
                                         "or val for the val layout)")
    common.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    common.add_argument("--max_count", type=int, default=1000,
                        help="samples per shard at most (default 1000)")
    common.add_argument("--max_size", type=float, default=1e9,
                        help="bytes per shard at most, about (default 1e9)")
    common.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes writing shards (default: one per CPU)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sources = p.add_subparsers(dest="source", required=True)
    folder = sources.add_parser("folder", parents=[common], help="ROOT/CLASS/*.JPEG")
    folder.add_argument("root")
    listed = sources.add_parser("list", parents=[common], help="a file of 'PATH LABEL' lines")
    listed.add_argument("list")
    val = sources.add_parser("val", parents=[common], help="a flat folder and a label file")
    val.add_argument("folder")
    val.add_argument("labels")
    val.add_argument("--own_classes", action="store_true",
                     help="number the sorted labels of LABELS rather than a train set's "
                          "--classes (their indices differ unless LABELS has every class)")
    for parser in (folder, listed, val):
        parser.add_argument("out", help="output folder")
    args = p.parse_args(argv)
    for key in ("max_count", "max_size", "workers"):
        if not getattr(args, key) >= 1:
            p.error(f"--{key} {getattr(args, key)}: must be 1 or more")
    if args.source == "val" and not args.classes and not args.own_classes:
        p.error("val: give --classes TRAIN_OUT/classes.txt (the train set's class list, so that "
                "val's class indices agree with train's), or --own_classes to number the sorted "
                "labels of LABELS on their own")
    if args.source == "val" and args.classes and args.own_classes:
        p.error("val: --classes and --own_classes exclude each other")
    args.prefix = args.prefix or ("val" if args.source == "val" else "train")
    return args


def _listed(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "".join(f"\n  {item}" for item in items[:MAX_LISTED]) + more


def read_source(args: argparse.Namespace):
    classes = read_classes(args.classes) if args.classes else None
    if args.source == "folder":
        return folder_source(args.root, classes)
    if args.source == "list":
        return list_source(args.list, classes)
    return val_source(args.folder, args.labels, classes)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source = read_source(args)
        if source.skipped:
            print(f"passed over {len(source.skipped)} file(s) in {source.root} that are not "
                  f"images:{_listed(source.skipped)}")
        index = make_shards(source, args.out, args.prefix, args.seed, args.max_count,
                            int(args.max_size), args.workers)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(index["shards"])
    print(f"{args.out}: {index['total']} samples of {len(index['classes'])} classes in {n} "
          f"shard(s), with index.json and classes.txt")
    if index["unreadable"]:
        print(f"{len(index['unreadable'])} unreadable image(s) left out (listed in index.json):"
              f"{_listed(index['unreadable'])}")
    first = os.path.join(args.out, args.prefix)
    print(f"read them with: data='{first}-{{000000..{n - 1:06d}}}.tar'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

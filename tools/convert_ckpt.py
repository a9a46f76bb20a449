"""Convert checkpoints between official MAE / MoCo v3 / grafting files, timm and lgp_ds.

    python tools/convert_ckpt.py SRC DST [--to timm|mae|init|moco] [--from mae|moco|timm|lgp_ds]
        [--encoder base|momentum] [--arch NAME] [--num_heads N] [--dtype fp32|bf16|fp16]
        [--img_size N] [--force]
    python tools/convert_ckpt.py --check A B [--atol X]

SRC is detected automatically (a folder is an lgp_ds DeepSpeed checkpoint: a tag folder, or the
checkpoints folder, whose newest complete checkpoint is taken). DST's format defaults to timm
(``.pth`` or ``.safetensors``). The result is loaded back strictly into the model it is for, and
the summary prints the exact ``timm.create_model(...)`` call that builds that model: the head
count of a ViT is in no weight shape, so a model built otherwise may load and compute other
features.

--check compares A and B (any formats) tensor by tensor and exits 0 only when every tensor both
have is equal within --atol (default 0: exact) and no key is in one alone, 1 otherwise. The
projector, momentum encoder and predictor of a full checkpoint are not compared with a file
that holds an encoder alone (a timm or MAE file): the output says so. Errors exit 2.
"""
import argparse
import sys

import torch

from lgp_ds.convert import FORMATS_IN, FORMATS_OUT, compare, convert, read

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_LINES = 20  # differences listed by --check


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=FORMATS_OUT, default="timm")
    p.add_argument("--from", dest="src_format", choices=FORMATS_IN)
    p.add_argument("--encoder", choices=("base", "momentum"), default="base",
                   help="which encoder becomes the timm/MAE model (default: base)")
    p.add_argument("--arch", help="architecture of the weights: a timm name, or an official MoCo "
                                  "v3 (vit_small, vit_base) or MAE name; an unknown one is refused "
                                  "(default: what the source records, else inferred from the "
                                  "shapes)")
    p.add_argument("--num_heads", type=int, help="attention heads (default: what the source or "
                                                 "--arch records; else a guess, said so)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--img_size", type=int, help="resample the position embedding to this size "
                                                "(a multiple of the patch size)")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.add_argument("--check", action="store_true", help="compare SRC and DST tensor by tensor")
    p.add_argument("--atol", type=float, default=0.0,
                   help="--check: largest |difference| still equal (default 0: exact)")
    args = p.parse_args(argv)
    if not args.atol >= 0:
        p.error(f"--atol {args.atol}: must be 0 or more")
    return args


def check(src: str, dst: str, atol: float) -> int:
    """Print how A (``src``) and B (``dst``) differ; 0 if equal within ``atol``, else 1."""
    result = compare(read(src), read(dst), atol)
    print(f"A = {src}, B = {dst}")
    print(f"largest difference {result.worst:.3e}"
          + (f" at {result.where}" if result.where else ""))
    for line in result.not_compared:
        print(f"not compared (the other holds an encoder alone): {line}")
    n = len(result.differences)
    for line in result.differences[:MAX_LINES]:
        print(f"difference: {line}")
    if n > MAX_LINES:
        print(f"... and {n - MAX_LINES} more differences")
    print(f"{f'{n} differences' if n else 'equal'} (atol {atol:g})")
    return 1 if n else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            return check(args.src, args.dst, args.atol)
        info = convert(args.src, args.dst, args.to, args.src_format, args.encoder,
                       DTYPES.get(args.dtype), args.img_size, args.arch, args.num_heads, args.force)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.to}): {info['arch']}; {info['params']:,} parameters, "
          f"{info['dtype']}, sha256 {info['sha256']}")
    print(("its encoder is built by: " if args.to == "moco" else "load it with: ") + info["call"])
    for note in info["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert checkpoints between official MAE / MoCo v3 / grafting files, timm and lgp_ds.

    python tools/convert_ckpt.py SRC DST [--to timm|mae|init|moco] [--from mae|moco|timm|lgp_ds]
        [--encoder base|momentum] [--arch NAME] [--num_heads N] [--dtype fp32|bf16|fp16]
        [--img_size N] [--force]
    python tools/convert_ckpt.py --check A B

SRC is detected automatically (a folder is an lgp_ds DeepSpeed checkpoint: a tag folder, or the
checkpoints folder, whose newest complete checkpoint is taken). DST's format defaults to timm
(``.pth`` or ``.safetensors``). The result is loaded back strictly into the model it is for, and
the summary prints the exact ``timm.create_model(...)`` call that builds that model: the head
count of a ViT is in no weight shape, so a model built otherwise may load and compute other
features.
"""
import argparse
import sys

import torch

from lgp_ds.convert import FORMATS_IN, FORMATS_OUT, compare, convert, read

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=FORMATS_OUT, default="timm")
    p.add_argument("--from", dest="src_format", choices=FORMATS_IN)
    p.add_argument("--encoder", choices=("base", "momentum"), default="base",
                   help="which encoder becomes the timm/MAE model (default: base)")
    p.add_argument("--arch", help="architecture of the weights: a timm name, or an official MoCo "
                                  "v3 (vit_small, vit_base) or MAE name (default: what the source "
                                  "records, else inferred from the shapes)")
    p.add_argument("--num_heads", type=int, help="attention heads (default: what the source or "
                                                 "--arch records; else a guess, said so)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--img_size", type=int, help="resample the position embedding to this size")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.add_argument("--check", action="store_true", help="compare SRC and DST tensor by tensor")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            worst, where, only = compare(read(args.src), read(args.dst))
            print(f"largest difference {worst:.3e}" + (f" at {where}" if where else ""))
            for key in only:
                print(f"only in one: {key}")
            return 1 if only else 0
        info = convert(args.src, args.dst, args.to, args.src_format, args.encoder,
                       DTYPES.get(args.dtype), args.img_size, args.arch, args.num_heads, args.force)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
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

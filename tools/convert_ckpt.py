"""Convert checkpoints between official MAE / MoCo v3 / grafting files, timm and lgp_ds.

    python tools/convert_ckpt.py SRC DST [--to timm|mae|init|moco] [--from mae|moco|timm|lgp_ds]
        [--encoder base|momentum] [--arch NAME] [--dtype fp32|bf16|fp16] [--img_size N] [--force]
    python tools/convert_ckpt.py --check A B

SRC is detected automatically (a folder is an lgp_ds DeepSpeed checkpoint: a tag folder, or the
checkpoints folder, whose newest complete checkpoint is taken). DST's format defaults to timm
(``.pth`` or ``.safetensors``). The result is loaded back strictly and summarised.
"""
import argparse
import sys

import torch

from lgp_ds.convert import FORMATS_IN, FORMATS_OUT, build_output, compare, read, verify, write

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=FORMATS_OUT, default="timm")
    p.add_argument("--from", dest="src_format", choices=FORMATS_IN)
    p.add_argument("--encoder", choices=("base", "momentum"), default="base",
                   help="which encoder becomes the timm/MAE model (default: base)")
    p.add_argument("--arch", help="timm architecture to verify against (default: from the source "
                                  "or inferred from the shapes)")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--img_size", type=int, help="resample the position embedding to this size")
    p.add_argument("--force", action="store_true", help="overwrite DST")
    p.add_argument("--check", action="store_true", help="compare SRC and DST tensor by tensor")
    args = p.parse_args(argv)
    try:
        if args.check:
            worst, where, only = compare(read(args.src), read(args.dst))
            print(f"largest difference {worst:.3e}" + (f" at {where}" if where else ""))
            for key in only:
                print(f"only in one: {key}")
            return 1 if only else 0
        weights = read(args.src, args.src_format)
        obj = build_output(weights, args.to, args.encoder, DTYPES.get(args.dtype), args.img_size)
        info = verify(obj, args.to, args.arch or weights.arch)
        write(obj, args.dst, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({args.to}): {info['arch']}, {info['params']:,} parameters, "
          f"{info['dtype']}, sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

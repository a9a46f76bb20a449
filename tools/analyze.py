"""The paper's analyses of pre-trained ViTs, each writing OUT/NAME.json and OUT/NAME.png.

    python tools/analyze.py grad_conflict --ckpt mtl=runs/digits_mtl --out docs/
    deepspeed --num_gpus N tools/analyze.py grad_conflict --ckpt PATH [key=value ...]
    python tools/analyze.py attention_distance --ckpt mae=PATH --ckpt graft=PATH
    python tools/analyze.py vic --ckpt mae=PATH --ckpt moco=PATH
    python tools/analyze.py tsne --ckpt mae=PATH --ckpt graft=PATH --classes 0,1,2

Checkpoints (``--ckpt [NAME=]PATH``, repeatable): an lgp_ds run folder or checkpoint, an official
MAE or MoCo v3 file, or a timm state dict. Data: ``--data`` shards, or the embedded digits set.
Several ranks (``deepspeed``) split every batch and give the numbers one process gives.
"""
import argparse

from lgp_ds.analysis.commands import COMMANDS
from lgp_ds.cli import errors_as_one_line
from lgp_ds.data.shards import DataError
from lgp_ds.dist import init_process_group

ABOUT = {
    "grad_conflict": "Figure 1: cosine between the MIM and CL gradients of each block",
    "attention_distance": "Figure 7: mean attention distance per head and block",
    "vic": "Figure 6: variance, invariance, covariance of each block's output",
    "tsne": "Figure 3: t-SNE of frozen features, coloured by class",
}
# (batch size, batches, split): the gradient on training images, the rest on held-out ones
DEFAULTS = {"grad_conflict": (64, 8, "train"), "attention_distance": (128, 2, "val"),
            "vic": (256, 1, "val"), "tsne": (256, 1, "val")}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    sub = top.add_subparsers(dest="command", required=True)
    for command, about in ABOUT.items():
        batch_size, batches, split = DEFAULTS[command]
        p = sub.add_parser(command, help=about, description=about)
        p.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH")
        p.add_argument("--data", action="append", metavar="PATTERN",
                       help="shard pattern, repeatable (default: the embedded set)")
        p.add_argument("--split", default=split, choices=("train", "val"),
                       help="split of the embedded set")
        p.add_argument("--batch_size", type=int, default=batch_size, help="global batch")
        p.add_argument("--out", default="runs/analysis")
        p.add_argument("--name", help=f"output file name (default analysis_{command})")
        p.add_argument("--seed", type=int, default=0)
        if command != "tsne":
            p.add_argument("--batches", type=int, default=batches)
    g = sub.choices["grad_conflict"]
    g.add_argument("--recipe", default="vit_b_mtl", help="config of the heads and losses for "
                   "a checkpoint that is no lgp_ds run (an lgp_ds run's own config is used)")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides "
                   "(mask_ratio, tau, proj_dim, ...)")
    sub.choices["vic"].add_argument("--crop_min", type=float, default=0.08,
                                    help="smallest crop of the two MoCo views")
    t = sub.choices["tsne"]
    t.add_argument("--classes", help="comma-separated class labels (default: all)")
    t.add_argument("--per_class", type=int, default=None, help="images per class (default: all)")
    t.add_argument("--perplexity", type=float, default=30.0)
    return top


def main() -> None:
    args = parser().parse_args()
    init_process_group()
    with errors_as_one_line((ValueError, FileNotFoundError, DataError)):
        COMMANDS[args.command](args)


if __name__ == "__main__":
    main()

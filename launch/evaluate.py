"""Evaluate pre-trained encoders on frozen features: kNN, logistic regression on a labelled
subset (the paper's 1% protocol) and the linear probe, top-1 on held-out images.

    deepspeed --num_gpus 8 launch/evaluate.py runs/vit_b_graft mae_pretrain_vit_base.pth \
        --train_data '/data/imagenet/train-{000000..001023}.tar' \
        --val_data '/data/imagenet/val-{000000..000063}.tar' --subset 1percent.txt \
        --img_size 224 --output_dir runs/eval_vit_b

Any checkpoint the converter reads (lgp_ds run folders of any ZeRO stage and world size, timm
files, official MAE / MoCo v3 / grafting files), built as the model it was trained as. Every
rank encodes its own shards; features are cached in OUTPUT_DIR/features. Without data options
the embedded digits set's train and held-out splits are used. Writes results.md, results.json,
results.png and the labelled subset (subset.txt) into OUTPUT_DIR.
"""
import argparse

from lgp_ds import dist
from lgp_ds.cli import BAD_INPUT, add_eval_arguments, errors_as_one_line, eval_settings
from lgp_ds.data.pipeline import shards_or_embedded
from lgp_ds.data.shards import DataError
from lgp_ds.eval.features import POOLING, WHICH, load_encoder
from lgp_ds.eval.protocols import evaluate_encoders, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints or lgp_ds run folders")
    parser.add_argument("--output_dir", default="runs/eval")
    parser.add_argument("--img_size", type=int, default=None,
                        help="input size (default: the first checkpoint's)")
    parser.add_argument("--which", choices=WHICH, default="base", help="encoder to evaluate")
    parser.add_argument("--pooling", choices=POOLING, default="cls")
    parser.add_argument("--projector_layers", type=int, default=0,
                        help="features after the first k projector layers (SimCLR v2)")
    parser.add_argument("--arch", help="override the recorded architecture (timm or MoCo name)")
    parser.add_argument("--num_heads", type=int, help="override the recorded head count")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    add_eval_arguments(parser)
    args = parser.parse_args()
    with errors_as_one_line(ranks_started=False):
        if (args.train_data is None) != (args.val_data is None):
            raise ValueError("give both --train_data and --val_data, or neither (the embedded "
                             "set)")
        encoders = {path: load_encoder(path, args.which, args.pooling, args.projector_layers,
                                       args.arch, args.num_heads) for path in args.checkpoints}
        first = next(iter(encoders.values())).vit.patch_embed.img_size[0]
        settings = eval_settings(args, img_size=args.img_size or first)
    dist.init_process_group()
    with errors_as_one_line(BAD_INPUT + (DataError,)):
        for path, encoder in encoders.items():
            dist.print_main(f"{path}: {encoder.description}")
        train, val = (shards_or_embedded(data, settings.img_size, split, settings.num_workers)
                      for data, split in ((args.train_data, "train"), (args.val_data, "val")))
        results = evaluate_encoders(encoders, train, val, settings, args.output_dir)
        publish(results, settings, args.output_dir)


if __name__ == "__main__":
    main()

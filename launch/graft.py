"""Step ii of Layer Grafted Pre-training: MoCo v3 from MIM weights with stage-wise LRs.

    deepspeed [--num_gpus N | --hostfile H] launch/graft.py --deepspeed_config ds_configs/X.json \
        [--config RECIPE.yaml | bundled name] [--output_dir DIR] [key=value ...]

Without --config the bundled ``digits_demo`` recipe trains a tiny ViT on the embedded data.
"""
import argparse

import deepspeed

from lgp_ds.cli import errors_as_one_line
from lgp_ds.config import load_run_config
from lgp_ds.data.shards import DataError
from lgp_ds.dist import init_process_group
from lgp_ds.engine.trainer import GraftTrainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help="YAML recipe: a path or a bundled name (vit_b_graft, ...)")
    parser.add_argument("--output_dir", help="shorthand for output_dir=DIR")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after options
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (see ds_configs/)")

    # Bad input fails here, on every rank alike, before any process group or engine exists.
    with errors_as_one_line(ranks_started=False):
        overrides = args.overrides + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        cfg, ds_config = load_run_config(args.config, overrides, args.deepspeed_config)
    init_process_group()
    with errors_as_one_line():  # data, init weights and the resume checkpoint are checked here
        trainer = GraftTrainer(cfg, ds_config)
    with errors_as_one_line((DataError,)):  # shards that turn out hopeless while training
        trainer.fit()


if __name__ == "__main__":
    main()

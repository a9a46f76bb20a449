"""The training entry point that ``launch/pretrain.py`` and ``launch/graft.py`` run.

    deepspeed [--num_gpus N | --hostfile H] launch/pretrain.py --deepspeed_config ds_configs/X.json \
        [--config RECIPE.yaml | bundled name] [--output_dir DIR] [key=value ...]

The recipe's ``method`` key (or ``method=...``) picks the method; without --config the bundled
``digits_demo`` recipe grafts a tiny ViT on the embedded data.
"""
import argparse

import deepspeed

from lgp_ds.cli import errors_as_one_line
from lgp_ds.data.shards import DataError
from lgp_ds.dist import init_process_group
from lgp_ds.ds_config import load_run_config
from lgp_ds.engine.faults import CollectiveError, NonFiniteError, collective_errors
from lgp_ds.engine.trainer import Trainer
from lgp_ds.eval.monitor import KNNMonitor
from lgp_ds.methods import build_method


def build_trainer(cfg, ds_config: dict) -> Trainer:
    """Collective: the trainer of ``cfg``'s method with the evaluations ``cfg`` asks for (the kNN
    monitor with ``knn_every``; its shards are checked here, before training)."""
    evaluators = []
    if cfg.knn_every:
        # at least 64 images a forward: no activations are kept, and fewer forwards mean fewer
        # parameter gathers under ZeRO 3
        evaluators.append(KNNMonitor(cfg, max(64, ds_config["train_micro_batch_size_per_gpu"])))
    return Trainer(cfg, ds_config, build_method(cfg), evaluators=evaluators)


def main(argv=None, description: str = __doc__) -> None:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawTextHelpFormatter)
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
    init_process_group(cfg.collective_timeout_s)
    with errors_as_one_line():  # data, init weights and the resume checkpoint are checked here
        trainer = build_trainer(cfg, ds_config)
    # shards that turn out hopeless while training, a diverged run, a dead or hung rank
    with errors_as_one_line((DataError, NonFiniteError, CollectiveError)), \
            collective_errors(cfg.collective_timeout_s):
        trainer.fit()

"""The paper's comparison end to end: MAE (step i), Layer Grafted (step ii from those MAE
weights), plain MoCo v3 and MIM->CL with frozen lower stages; then kNN, few-label logistic
regression and a linear probe of each encoder and of a random-init one, on held-out images.

    deepspeed --num_gpus 2 launch/compare.py --deepspeed_config ds_configs/cpu_demo.json \
        [--output_dir runs/compare] [--recipes digits] [key=value ...]

Runs recipes ``{recipes}_mae``, ``{recipes}_graft``, ``{recipes}_moco`` and
``{recipes}_mim2cl_frozen``; ``key=value`` overrides apply to every run (e.g. ``max_steps=20``).
Writes ``results.md``, ``results.json`` and ``results.png`` into the output folder; a second run
into it keeps what is finished and continues the rest.
"""
import argparse

import deepspeed

from lgp_ds import comparison
from lgp_ds.cli import BAD_INPUT, add_eval_arguments, errors_as_one_line, eval_settings
from lgp_ds.data.shards import DataError
from lgp_ds.dist import init_process_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--recipes", default="digits", help="recipe name prefix (digits, vit_b)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every pre-training run")
    add_eval_arguments(parser)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_intermixed_args()
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (see ds_configs/)")
    with errors_as_one_line(ranks_started=False):
        plan = comparison.plan(args.output_dir, args.deepspeed_config, args.recipes,
                               args.overrides, eval_settings(args), args.train_data,
                               args.val_data)
    init_process_group()
    with errors_as_one_line(BAD_INPUT + (DataError,)):
        comparison.run(plan)


if __name__ == "__main__":
    main()

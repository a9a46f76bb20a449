"""A grid of runs, each in its own folder: the paper's Figure 4 stage-LR grid, or any config keys.

    python tools/lr_grid.py --out DIR --deepspeed_config ds_configs/X.json [--config RECIPE]
        [--stage_blrs V1,V2,...] [--grid KEY=V1,V2,... ...] [--launch]
        [--launcher "deepspeed --num_gpus 8"] [--entry launch/pretrain.py] [--world_size N]
        [key=value ...]
    python tools/lr_grid.py --out DIR --launch | --collect     (the grid planned in DIR)

Figure 4 (each of the 3 stages' per-256 base LR from 1.5e-6, 1.5e-5, 1.5e-4: 27 runs):

    python tools/lr_grid.py --out runs/fig4 --deepspeed_config ds_configs/zero2_bf16.json \\
        --config vit_b_graft --stage_blrs 1.5e-6,1.5e-5,1.5e-4 \\
        --launcher "deepspeed --num_gpus 8" \\
        data='/data/imagenet/train-{000000..001023}.tar' init=mae_pretrain_vit_base.pth

--stage_blrs LIST: every stage's LR (config key stage_blrs) from LIST, independently:
num_stages ** len(LIST) runs. --grid KEY=V1,V2,...: an axis over any config key; each value is
read as the override KEY=V is (YAML), a list value in brackets (commas inside brackets, braces or
quotes do not separate values), e.g. --grid tau=0.1,0.2 or
--grid "stage_blrs=[1e-5,1e-5,1e-4],[1e-4,1e-4,1e-4]" (two runs). The grid is the product of
all axes; key=value overrides apply to every run. --world_size N (default 1) is only used to
check the DeepSpeed config's batch sizes; --launcher is split like a shell command line.

Every run's config is validated first (a bad key or value: one error line naming the run and
the key, and nothing written). Then DIR gets grid.json (the plan), commands.sh (every run's
command, one a line, for launching by hand or through a scheduler) and a folder per run, named
from its grid values (s1-1.5e-06_s2-1.5e-05_s3-1.5e-04), holding its command.sh. A run's command
is LAUNCHER ENTRY --deepspeed_config ... [--config ...] OVERRIDES GRID-VALUES output_dir=DIR/RUN
resume=auto (started again, it continues from the newest complete checkpoint). Any entry with
launch/pretrain.py's command line works (launch/graft.py is the same); --launcher python runs one
process without a launcher.

--launch runs them one after another (each one's output in DIR/RUN/launch.log): runs that
finished are skipped, started ones continued, and a failed one is recorded and the grid goes on;
the exit status is 1 if a run failed. Without grid arguments --launch takes the plan in DIR.
After --launch, or alone with --collect, the final metrics of every run (status, last step,
loss and the other scalars of its last metrics.jsonl record) go to DIR/results.md and
DIR/results.csv (which also has the per-group LRs as lr.GROUP), and the table is printed.
"""
import argparse
import shlex
import sys

from lgp_ds import grid

PLANNING = ("deepspeed_config", "config", "stage_blrs", "grid", "overrides", "entry", "launcher",
            "world_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="the grid's folder")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON config of every run")
    p.add_argument("--config", help="YAML recipe: a path or a bundled name (default: digits_demo)")
    p.add_argument("--stage_blrs", metavar="V1,V2,...",
                   help="every stage's per-256 base LR from this list, independently")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="an axis over a config key (repeatable)")
    p.add_argument("--entry", help=f"training entry point (default: {grid.DEFAULT_ENTRY}; any "
                                   f"with its command line, e.g. launch/pretrain.py)")
    p.add_argument("--launcher", help="the words before the entry (default: deepspeed; e.g. "
                                      "\"deepspeed --num_gpus 8\", or python for one process)")
    p.add_argument("--world_size", type=int,
                   help="ranks per run, to check the DeepSpeed config's batch sizes (default 1)")
    p.add_argument("--launch", action="store_true", help="run the runs one after another")
    p.add_argument("--collect", action="store_true",
                   help="collect the runs' final metrics into results.md / results.csv")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every run")
    args = p.parse_intermixed_args(argv)
    args.planning = any(getattr(args, k) for k in PLANNING)
    if args.planning and not args.deepspeed_config:
        p.error("--deepspeed_config is required to set up a grid")
    if not args.planning and not (args.launch or args.collect):
        p.error("nothing to do: set up a grid (--deepspeed_config, --stage_blrs / --grid), or "
                "give --launch or --collect to use the one planned in --out")
    if args.world_size is not None and args.world_size < 1:
        p.error(f"--world_size {args.world_size}: must be 1 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = []
    try:
        if args.planning:
            plan = grid.make_plan(
                args.out, args.deepspeed_config, args.config, args.overrides, args.stage_blrs,
                args.grid or [], args.entry or grid.DEFAULT_ENTRY,
                shlex.split(args.launcher if args.launcher is not None else "deepspeed"),
                args.world_size or 1)
            dropped = grid.write_plan(plan)
            print(f"planned {len(plan.runs)} runs in {args.out} ({grid.PLAN}, {grid.COMMANDS})"
                  + ("" if args.launch else f"; launch them with --launch, or by hand or a "
                                             f"scheduler: {args.out}/RUN/{grid.COMMAND}"))
            if dropped:
                more = " ..." if len(dropped) > 5 else ""
                print(f"note: {len(dropped)} runs of the plan replaced are not in this one (their "
                      f"folders stay): {', '.join(dropped[:5])}{more}")
        else:
            plan = grid.load_plan(args.out)
        if args.launch:
            failed = grid.launch(plan, echo=lambda line: print(line, flush=True))
        if args.launch or args.collect:
            print(grid.collect(plan))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the same command continues the grid", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (see their launch.log)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

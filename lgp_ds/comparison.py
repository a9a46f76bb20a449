"""The paper's comparison, end to end, on one data set: the README's main job.

Pre-training (each run a folder of its own under ``output_dir``, on the one shared trainer):

    mae             step i: MAE trains the whole ViT
    graft           step ii, Layer Grafted: MoCo v3 from the MAE weights, stage-wise LRs
    moco            baseline: MoCo v3 from random weights
    mim2cl_frozen   baseline: MoCo v3 from the MAE weights, the lower stages frozen

then every encoder, and the untrained one (``random init``), is evaluated on frozen features
(CLS token after the final norm, no augmentation): kNN with every training label, L2 logistic
regression on a class-balanced ``fraction`` of them, and a linear probe with every training
label, all scored on held-out images that no pre-training run read. One table (Markdown, JSON,
PNG) in ``output_dir``.

Re-running continues: finished runs are kept (``resume=auto``), an interrupted one resumes from
its newest complete checkpoint, a run grafted from MAE weights that have trained further since
starts again, and features are cached per checkpoint.
"""
import math
import os
import shutil
import time
from dataclasses import dataclass, replace

import torch

from lgp_ds import dist
from lgp_ds.checkpoint_file import tensor_digest
from lgp_ds.data.pipeline import samples_per_epoch, shards_or_embedded
from lgp_ds.ds_config import load_run_config
from lgp_ds.engine import checkpoint
from lgp_ds.engine.init_weights import read_init
from lgp_ds.engine.run_dir import CHECKPOINTS
from lgp_ds.eval import features as feats
from lgp_ds.eval.protocols import EvalSettings, evaluate_encoders, publish
from lgp_ds.launch import build_trainer
from lgp_ds.models.vit import vit_from_config


@dataclass(frozen=True)
class Run:
    name: str  # folder under output_dir, and the method (recipe ``{prefix}_{name}``)
    init_from: str | None  # the run whose weights it starts from
    about: str


RUNS = (
    Run("mae", None, "step i: MAE, the whole ViT"),
    Run("graft", "mae", "step ii, Layer Grafted: MoCo v3 from the MAE weights, stage-wise LRs"),
    Run("moco", None, "baseline: MoCo v3 from random weights"),
    Run("mim2cl_frozen", "mae", "baseline: MoCo v3 from the MAE weights, lower stages frozen"),
)
RANDOM = "random init"


class Progress:
    """Which run, how far, and the time left, estimated from the seconds per step so far."""

    def __init__(self, steps: list[int]):
        self.steps, self.start, self.done_steps, self.done_seconds = steps, time.time(), 0, 0.0

    def begin(self, i: int, run: Run) -> None:
        left = sum(self.steps[i:])
        eta = (f", about {_minutes(left * self.done_seconds / self.done_steps)} of pre-training "
               f"left" if self.done_steps else "")
        dist.print_main(f"== run {i + 1}/{len(self.steps)}: {run.name} ({run.about}); "
                        f"{self.steps[i]} steps{eta}")

    def end(self, i: int, seconds: float, steps_run: int) -> None:
        self.done_steps += steps_run
        self.done_seconds += seconds
        dist.print_main(f"== {RUNS[i].name} done in {_minutes(seconds)} "
                        f"({_minutes(time.time() - self.start)} so far)")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


@dataclass
class Plan:
    """What :func:`run` does, every run's config validated before anything trains."""
    output_dir: str
    recipes: str
    configs: list  # (Config, DeepSpeed config) per entry of RUNS
    settings: EvalSettings
    train_data: str | None
    val_data: str | None


def plan(output_dir: str, ds_config_path: str, recipes: str = "digits", overrides=(),
         settings: EvalSettings | None = None, train_data: str | None = None,
         val_data: str | None = None) -> Plan:
    """Validate every run's config (recipe ``{recipes}_{run}``, ``overrides`` on top) and the
    settings; ValueError / FileNotFoundError name what is wrong. Needs no process group."""
    settings = settings or EvalSettings()
    if (train_data is None) != (val_data is None):
        raise ValueError("give both --train_data and --val_data, or neither (the embedded set)")
    configs = []
    for r in RUNS:
        keys = [*overrides, f"output_dir={os.path.join(output_dir, r.name)}", "resume=auto"]
        if r.init_from:
            keys.append(f"init={os.path.join(output_dir, r.init_from)}")
        configs.append(load_run_config(f"{recipes}_{r.name}", keys, ds_config_path))
    if configs[0][0].data is not None and train_data is None:
        raise ValueError("with data= of your own, give the labelled evaluation sets: "
                         "--train_data and --val_data (shard patterns)")
    return Plan(output_dir, recipes, configs, settings, train_data, val_data)


def pretrain(configs, progress: Progress) -> bool:
    """Collective: train every run in turn (finished ones only load their last checkpoint);
    False where a run stopped on request (SIGTERM): the next runs would start from it."""
    for i, (run, (cfg, ds_config)) in enumerate(zip(RUNS, configs)):
        began = time.time()
        progress.begin(i, run)
        if run.init_from:
            _set_aside_if_grafted_from_other_weights(cfg)
        trainer = build_trainer(cfg, ds_config)
        first = trainer.step
        trainer.fit()
        if trainer.stopped:
            dist.print_main(f"the comparison stopped during {run.name}: run the same command "
                            f"again to continue")
            return False
        progress.end(i, time.time() - began, trainer.step - first)
        del trainer
    return True


def _set_aside_if_grafted_from_other_weights(cfg) -> None:
    """Collective: a run whose checkpoints started from other ``init=`` weights than its init
    run's present ones (the MAE run has trained further since, e.g. with a larger
    ``max_steps``) would be refused as another run; it is moved to ``<folder>.old`` (replacing
    an older one) and trains again from the present weights. Rank 0 decides and moves; what goes
    wrong there is raised on every rank (ValueError), rather than leaving the others waiting."""
    outcome = None
    if dist.is_main():
        try:
            outcome = ("ok", _set_aside(cfg))
        except (OSError, ValueError) as e:
            outcome = ("error", f"{cfg.output_dir}: could not check or set aside its "
                                f"checkpoints: {type(e).__name__}: {e}")
    status, message = dist.broadcast_object(outcome)
    if status == "error":
        raise ValueError(message)
    if message:
        dist.print_main(message)


def _set_aside(cfg) -> str | None:
    """Rank 0's part of :func:`_set_aside_if_grafted_from_other_weights`: what it did."""
    found = checkpoint.find_checkpoint("auto", os.path.join(cfg.output_dir, CHECKPOINTS))
    if found is None:
        return None
    then = checkpoint.read_marker(*found)["run"].get("init_digest")
    if then == tensor_digest(read_init(cfg.init).encoder()):
        return None
    old = cfg.output_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(cfg.output_dir, old)
    return (f"{cfg.output_dir}: its checkpoints started from other weights than {cfg.init} "
            f"holds now; moved to {old}, training again")


def _eval_urls(p: Plan) -> tuple[list[str], list[str]]:
    """Collective: shard URLs of the labelled training images and of the held-out ones."""
    cfg = p.configs[0][0]
    return (shards_or_embedded(p.train_data, cfg.img_size, "train", cfg.num_workers),
            shards_or_embedded(p.val_data, cfg.img_size, "val", cfg.num_workers))


def _random_encoder(cfg) -> feats.FrozenEncoder:
    """The untrained encoder of ``cfg`` (its seed's initial weights), frozen."""
    torch.manual_seed(cfg.seed)
    vit = vit_from_config(cfg)
    key = {"weights": tensor_digest(vit.state_dict()), "model": "random init", "which": "base",
           "pooling": "cls", "projector_layers": 0}
    return feats.FrozenEncoder(vit, None, f"random init of {cfg.arch}", key)


def run(p: Plan) -> dict:
    """Collective: pre-train every run, evaluate every encoder, write the table; the results
    ({} where a stop request (SIGTERM) ended the pre-training early)."""
    cfg = p.configs[0][0]
    settings = replace(p.settings, img_size=cfg.img_size)
    train_urls, val_urls = _eval_urls(p)
    steps = [min(c.epochs * (samples_per_epoch(c) // c.batch_size), c.max_steps or math.inf)
             for c, _ in p.configs]
    if not pretrain(p.configs, Progress(steps)):
        return {}

    encoders = {RANDOM: _random_encoder(cfg)}
    for name in ROW_ORDER:
        encoders[name] = feats.load_encoder(os.path.join(p.output_dir, name))
    results = evaluate_encoders(encoders, train_urls, val_urls, settings, p.output_dir)
    publish(results, settings, p.output_dir, p.recipes)
    return results


# Table rows after the random-init encoder: the baselines, then the method.
ROW_ORDER = ("mae", "moco", "mim2cl_frozen", "graft")

"""The training entry point (``lgp_ds.launch.main``, what launch/graft.py runs) with a recording
trainer, for tests/test_cluster.py to launch with the deepspeed launcher.

The trainer trains as it always does; it only notes the labels of the samples each rank trained
on, per epoch, and at the end writes them with the rank's model state and momentum encoder to
``$LGP_DS_DUMP/rank<R>.pt``.
"""
import os

import torch

import lgp_ds.launch
from lgp_ds import dist
from lgp_ds.engine.trainer import Trainer


class RecordingTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels_seen = {}  # epoch -> labels of this rank's samples, in the order trained on

    def train_step(self, *views, labels=None):
        self.labels_seen.setdefault(self.epoch, []).extend(labels.tolist())
        return super().train_step(*views, labels=labels)

    def fit(self):
        records = super().fit()
        dump = {"world_size": dist.get_world_size(), "labels": self.labels_seen,
                "weights": {n: t.detach().cpu().clone()
                            for n, t in self.engine.module.state_dict().items()},
                "momentum": self.momentum.state_dict()}
        torch.save(dump, os.path.join(os.environ["LGP_DS_DUMP"], f"rank{dist.get_rank()}.pt"))
        return records


if __name__ == "__main__":
    lgp_ds.launch.Trainer = RecordingTrainer  # what lgp_ds.launch.build_trainer builds
    lgp_ds.launch.main()

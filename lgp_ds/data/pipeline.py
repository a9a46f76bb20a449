"""Data from the config: the user's shards (``data=``) or the embedded digits set."""
from lgp_ds import dist

from .builtin import NUM_SAMPLES, digits_shards, embedded_subset
from .index import NoIndex, indexed_samples
from .shards import (StreamPosition, check_readers, expand_shards, image_name, shard_set,
                     train_batches)
from .subsets import read_subset


def subset_names(cfg) -> list[str] | None:
    """The images a run trains on when it trains on a subset (``subset`` file or
    ``subset_fraction`` of the embedded set), as :func:`shards.image_name` values; else None."""
    if cfg.subset is not None:
        return [image_name(n) for n in read_subset(cfg.subset)]
    if cfg.subset_fraction is not None:
        return embedded_subset(cfg.subset_fraction)
    return None


def samples_per_epoch(cfg) -> int:
    """Training samples in one epoch: the subset's size with one, else ``cfg.samples_per_epoch``,
    else with ``data=`` the count in the shards' index (ValueError without one), else the size of
    the embedded set's train split."""
    names = subset_names(cfg)
    if names is not None:
        return len(names)
    if cfg.samples_per_epoch or cfg.data is None:
        return cfg.samples_per_epoch or NUM_SAMPLES["train"]
    try:
        return indexed_samples(expand_shards(cfg.data))
    except NoIndex as e:
        raise ValueError(f"config key samples_per_epoch=None must be given with data= when the "
                         f"shards have no index: {e}") from None


def embedded_shards(img_size: int, split: str = "train", readers: int = 1) -> list[str]:
    """Collective: the shard URLs of the embedded set's ``split`` at ``img_size`` px, with a shard
    for each of ``readers`` (ranks x workers), built by rank 0 on first use."""
    shards = max(8, readers)
    if dist.is_main():  # build once; the other ranks wait and then find it cached
        digits_shards(size=img_size, num_shards=shards)
    dist.barrier()
    return expand_shards([digits_shards(size=img_size, num_shards=shards, split=split)[0]])


def shards_or_embedded(patterns, img_size: int, split: str, num_workers: int) -> list[str]:
    """Collective: the shard URLs of ``patterns`` (a pattern or a list), or, without any, those of
    the embedded set's ``split`` with a shard for every rank x worker."""
    if patterns is None:
        return embedded_shards(img_size, split, dist.get_world_size() * max(1, num_workers))
    return expand_shards([patterns] if isinstance(patterns, str) else list(patterns))


class TrainData:
    """Per-epoch iterators of this rank's micro-batches: the views that ``transform`` makes of
    each image, each [batch_per_rank, 3, H, W]; and where the stream is, for checkpoints.

    Construction fails (FileNotFoundError, ValueError) on missing shards and on fewer shards than
    ranks x workers (unless ``resampled_shards``), before any engine is built.
    """

    def __init__(self, cfg, batch_per_rank: int, transform):
        self.urls = shards_or_embedded(cfg.data, cfg.img_size, "train", cfg.num_workers)
        self.shard_set = shard_set(self.urls)  # once: it stats every shard
        # Checked here, as the trainer builds the data before the engine, not when reading starts.
        check_readers(self.urls, dist.get_world_size(), cfg.num_workers, cfg.resampled_shards)
        self.cfg, self.batch_per_rank = cfg, batch_per_rank
        self.transform = transform  # PIL image -> tuple of view tensors
        names = subset_names(cfg)
        self.subset = frozenset(names) if names is not None else None
        # fine-tuning trains on the labels: a sample without one is skipped as corrupt
        self.labelled = cfg.method == "finetune"
        self.readers = max(1, cfg.num_workers)  # per rank
        self.epoch, self.position = 0, StreamPosition.head(self.readers)

    def batches(self, epoch: int, count: int, skip: int = 0):
        """The ``count`` micro-batches of ``epoch`` on this rank, without the first ``skip``.

        Where the stream is at batch ``skip`` of ``epoch`` (it was left there, or :meth:`resume`
        put it there), it goes on from there: the readers drop, undecoded, the samples they gave
        for the skipped batches, and the batches are exactly those an uninterrupted run takes.
        Otherwise the readers start from the head of the epoch's stream.
        """
        if (self.epoch, self.position.batches) != (epoch, skip):
            self.epoch, self.position = epoch, StreamPosition.head(self.readers, skip)
        cfg = self.cfg
        return train_batches(self.urls, self.transform, self.batch_per_rank, count,
                             dist.get_rank(), dist.get_world_size(), cfg.num_workers, cfg.seed,
                             epoch, cfg.shuffle_buffer, cfg.max_corrupt_run, self.subset,
                             cfg.resampled_shards, self.labelled, self.position)

    def state_dict(self) -> dict:
        """Where this rank's stream is, for a checkpoint: the raw samples each reader gave in the
        epoch so far (the epoch and batch are the trainer's), and the shards they read."""
        return {"samples": list(self.position.samples), "shards": self.shard_set}

    def resume(self, state: dict | None, epoch: int, batches: int,
               lost: str | None = None) -> None:
        """Continue at batch ``batches`` of ``epoch`` from ``state`` (:meth:`state_dict` of the
        run that saved the checkpoint at that batch; None where it recorded none, or where
        ``lost`` says why it does not apply: another world size).

        Readers of another layout cannot continue it (another ``num_workers`` deals the shards
        to other readers; other shards, or the same in another order or rewritten): the rest of the epoch then comes
        from the head of its stream for this layout, with a note, as a user who changed them
        would expect of a long run rather than a refusal. Some of the epoch's images then come
        twice and others not at all; the next epochs are those of a run with this layout.
        """
        self.epoch, self.position = epoch, StreamPosition.head(self.readers, batches)
        if batches == 0:  # at an epoch's start, whatever the layout
            return
        if lost is not None:
            why = lost
        elif state is None:
            why = "the checkpoint records no data position"
        elif len(state["samples"]) != self.readers:
            why = (f"num_workers gives {self.readers} reader(s) per rank, the run that saved it "
                   f"had {len(state['samples'])}")
        elif state["shards"] != self.shard_set:
            why = other_shards(self.shard_set, state["shards"])
        else:
            self.position.samples = list(state["samples"])
            return
        restart_note(epoch, why)


def other_shards(now: str, saved) -> str:
    """Why a position saved over the shards ``saved`` does not fit those read ``now`` (both
    :func:`shard_set`)."""
    return (f"data names {now}, the run that saved it read {saved} (other shards, "
            f"or the same in another order or rewritten)")


def restart_note(epoch: int, why: str) -> None:
    """Tell the user that a resumed stream cannot continue where it was (``why``) and what the
    rest of ``epoch`` is instead."""
    dist.print_main(f"resume: the data stream cannot continue where it was ({why}): the rest "
                    f"of epoch {epoch} comes from the head of its stream for this layout, so "
                    f"some of its images come twice and others not at all")


def build_train_data(cfg, batch_per_rank: int, method):
    """The training stream ``cfg.input_backend`` names, for ``method``'s views: TrainData over
    its transform, or (``dali``) :class:`lgp_ds.data.dali.DaliTrainData` over its views' crops,
    whose photometric part ``method.device_views`` adds (``augment_on: device``)."""
    if cfg.input_backend == "dali":
        from .dali import DaliTrainData  # imports NVIDIA DALI: only where it is asked for
        return DaliTrainData(cfg, batch_per_rank, [v.crop for v in method.views()])
    return TrainData(cfg, batch_per_rank, method.transform())

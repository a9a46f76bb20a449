"""The training stream on NVIDIA DALI (``input_backend: dali``), for machines short of CPU cores:
the same shards, decoded on the GPU (nvJPEG; DALI's CPU decoder where there is none) and cut
into the views' crops there, handed on as :class:`lgp_ds.data.crops.CropViews` hands them on,
uint8 views [B,3,H,W] one per :class:`Crop`, but already on the device. The method's
``device_views`` (``augment_on: device``) then adds the photometric part, so the views are
those of ``augment_on: device``.

Per rank and epoch, one DALI pipeline: this rank's shards of the epoch (dealt as
:func:`lgp_ds.data.shards.rank_shards` deals them, one reader per rank) -> DALI's webdataset
reader, going through them in a new seeded order each pass, forever -> a seeded shuffle buffer
of ``shuffle_buffer`` samples -> one decode per image -> per view a random resized crop
(torchvision's distribution: area uniform in [crop_min, 1], aspect ratio log-uniform in
[3/4, 4/3]; tests/test_dali.py measures it) and a flip with p=0.5 -> batches of
``batch_per_rank``, exactly ``count`` of them per epoch on every rank. Every random choice is
seeded from (seed, epoch, rank), so the stream is the same whatever ``num_workers`` (here
DALI's thread count). A checkpoint holds DALI's own serialized pipeline state, from which a
resumed run continues the epoch exactly.

Where it differs from the webdataset path: an image is decoded whole, once for all its views
(ROI decoding skips the inverse DCT outside a crop but never the entropy decoding of the whole
file, and each view would pay that again); the crops are resized by DALI's antialiased filters
rather than PIL's and torch's. DALI cannot skip a sample it fails to decode (a truncated JPEG,
a sample without an image): the run stops with a DataError naming this rank's shards
(tools/make_shards.py leaves undecodable images out of the shards it writes). It reads local
shard files only, every sample of them (no ``subset``, no ``resampled_shards``).
"""
import torch
from nvidia.dali import fn, pipeline_def, types
from torchvision.transforms import InterpolationMode

from lgp_ds import dist

from .crops import RATIO
from .pipeline import other_shards, restart_note, shards_or_embedded
from .shards import (IMAGE_KEYS, REMOTE_PREFIXES, DataError, label_of, rank_shards, shard_set,
                     shortlist, stable_seed)
from .transforms import Crop

_INTERPOLATION = {InterpolationMode.NEAREST: types.INTERP_NN,
                  InterpolationMode.BILINEAR: types.INTERP_LINEAR,
                  InterpolationMode.BICUBIC: types.INTERP_CUBIC}


def _interpolation(crop: Crop):
    """DALI's interpolation for ``crop``'s (ValueError for one DALI lacks)."""
    if crop.interpolation not in _INTERPOLATION:
        known = ", ".join(m.value for m in _INTERPOLATION)
        raise ValueError(f"input_backend=dali resizes crops with {known} interpolation, not "
                         f"{crop.interpolation.value}")
    return _INTERPOLATION[crop.interpolation]


@pipeline_def(enable_checkpointing=True, exec_dynamic=True)
def _crops_pipeline(shards: list[str], crops: list[Crop], size: int, shuffle_buffer: int,
                    shard_seed: int, decoder: str):
    """DALI graph, per sample: (view_1 uint8 [3,size,size], ..., view_k, the ``cls`` bytes,
    empty without one). ``decoder``: "mixed" (nvJPEG, output on the GPU) or "cpu"."""
    image, cls = fn.readers.webdataset(
        paths=shards, ext=[";".join(IMAGE_KEYS), "cls"], case_sensitive_extensions=False,
        missing_component_behavior="empty", random_shuffle=True, initial_fill=shuffle_buffer,
        shuffle_after_epoch=True, shuffle_after_epoch_seed=shard_seed)
    # As PIL's path: the EXIF orientation is not applied. nvJPEG's chroma upsampling, left at
    # DALI's default (jpeg_fancy_upsampling off), differs slightly from libjpeg's at colour edges.
    image = fn.decoders.image(image, device=decoder, output_type=types.RGB,
                              adjust_orientation=False)
    views = []
    for crop in crops:
        view = fn.random_resized_crop(image, size=[size, size], random_area=[crop.crop_min, 1.0],
                                      random_aspect_ratio=list(RATIO), antialias=True,
                                      interp_type=_interpolation(crop))
        views.append(fn.crop_mirror_normalize(  # the flip, and HWC -> CHW, still uint8
            view, mirror=fn.random.coin_flip(probability=0.5), output_layout="CHW",
            dtype=types.UINT8, mean=0.0, std=1.0))
    return (*views, cls)


def _dali_seed(*parts) -> int:
    """A seed DALI takes (a non-negative 32-bit int) from ``parts``."""
    return stable_seed(*parts) % 2 ** 31


def _resolved(device: torch.device | None) -> torch.device:
    """``device`` with its number (DALI needs it); None: the current CUDA device where there is
    one, else the CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _dali_problem(exn: RuntimeError) -> str:
    """What DALI says went wrong, without its pipeline traceback: the text after
    'encountered:' (it names the shard, offset and key of a JPEG it failed to decode)."""
    detail = str(exn).split("encountered:")[-1].split("Current pipeline object")[0]
    return " ".join(detail.split())


class DaliTrainData:
    """:class:`lgp_ds.data.pipeline.TrainData` on DALI (see the module): per-epoch iterators of
    this rank's micro-batches (view_1 uint8 [batch_per_rank,3,H,W] on ``device``, ...,
    view_k, labels [B] int64 (-1: none), skipped [B] zeros), and where the stream is.

    ``device``: where the views are made and handed on; default the current CUDA device (nvJPEG
    decoding) where there is one, else the CPU, looked up at the first batch: DeepSpeed sets
    each rank's device when it builds the engine, after the trainer builds its data.
    Construction fails (FileNotFoundError, ValueError) on missing or remote shards and on fewer
    shards than ranks.
    """

    def __init__(self, cfg, batch_per_rank: int, crops: list[Crop],
                 device: torch.device | None = None):
        self.urls = shards_or_embedded(cfg.data, cfg.img_size, "train", num_workers=0)
        self.shard_set = shard_set(self.urls)  # once: it stats every shard
        remote = [u for u in self.urls if u.startswith(REMOTE_PREFIXES)]
        if remote:
            raise ValueError(f"input_backend=dali reads local shard files; data= names remote "
                             f"ones ({shortlist(remote)}): use input_backend=webdataset")
        world = dist.get_world_size()
        if len(self.urls) < world:
            raise ValueError(f"input_backend=dali gives each rank shards of its own: "
                             f"{len(self.urls)} shard(s) ({shortlist(self.urls)}) cannot feed "
                             f"{world} ranks; use more shards, or input_backend=webdataset with "
                             f"resampled_shards=true")
        for crop in crops:
            _interpolation(crop)  # refused here rather than at the first batch
        self.cfg, self.batch_per_rank, self.crops = cfg, batch_per_rank, list(crops)
        self.device = device
        # Where the stream is: batch ``taken`` of ``epoch``; ``pipe`` the epoch's pipeline once
        # it runs, ``restore`` the DALI state it starts from (None: the head of the epoch).
        self.epoch, self.taken, self.pipe, self.restore = 0, 0, None, None

    def batches(self, epoch: int, count: int, skip: int = 0):
        """The ``count`` micro-batches of ``epoch`` on this rank, without the first ``skip``.

        Where the stream is at batch ``skip`` of ``epoch`` (it was left there, or :meth:`resume`
        put it there), it goes on from there, as an uninterrupted run would; otherwise it starts
        from the head of the epoch's stream."""
        if (self.epoch, self.taken) != (epoch, skip):
            self.epoch, self.taken, self.pipe, self.restore = epoch, skip, None, None
        return self._stream(count)

    def _stream(self, count: int):
        shards = rank_shards(self.urls, self.cfg.seed, self.epoch, dist.get_rank(),
                             dist.get_world_size())
        if self.pipe is None:  # else an iterator left mid-epoch ran it: go on with it
            self.pipe = self._pipeline(shards)
        while self.taken < count:
            try:
                *views, cls = self.pipe.run()
            except RuntimeError as exn:
                raise self._error(exn, shards) from None
            # DLPack: torch shares DALI's buffers, which the dynamic executor keeps until the
            # tensors are gone (DALI's own PyTorch iterator does the same). On the GPU torch
            # hands DALI its current stream, which the DLPack protocol orders after DALI's work.
            views = [torch.from_dlpack(v.as_tensor()) for v in views]
            labels = torch.tensor([label_of(cls.at(i).tobytes()) for i in range(len(cls))])
            self.taken += 1
            yield *views, labels, torch.zeros_like(labels)

    def _pipeline(self, shards: list[str]):
        """The epoch's DALI pipeline over ``shards``, built, at the state ``restore`` holds."""
        self.device = _resolved(self.device)
        cfg, cuda = self.cfg, self.device.type == "cuda"
        key = (cfg.seed, self.epoch, dist.get_rank())
        pipe = _crops_pipeline(shards, self.crops, cfg.img_size, cfg.shuffle_buffer,
                               _dali_seed(*key, "shards"), "mixed" if cuda else "cpu",
                               batch_size=self.batch_per_rank, num_threads=max(1, cfg.num_workers),
                               device_id=self.device.index if cuda else None,
                               seed=_dali_seed(*key, "views"), checkpoint=self.restore)
        try:
            pipe.build()
        except RuntimeError as exn:
            raise self._error(exn, shards) from None
        return pipe

    def _error(self, exn: RuntimeError, shards: list[str]) -> DataError:
        return DataError(
            f"input_backend=dali, rank {dist.get_rank()}, epoch {self.epoch}, batch "
            f"{self.taken}: DALI stopped on data it cannot use ({_dali_problem(exn)}); it cannot "
            f"skip a corrupt sample (a truncated image, a sample without one). This rank's "
            f"shards: {shortlist(shards)}. Rewrite them with tools/make_shards.py (it leaves "
            f"undecodable images out) or use input_backend=webdataset, which skips such samples")

    def _state(self) -> bytes | None:
        """DALI's serialized state after the last batch handed on (None at an epoch's head)."""
        return self.pipe.checkpoint() if self.pipe is not None else self.restore

    def state_dict(self) -> dict:
        """Where this rank's stream is, for a checkpoint: DALI's pipeline state (the epoch and
        batch are the trainer's), and the shards it reads."""
        return {"dali": self._state(), "shards": self.shard_set}

    def resume(self, state: dict | None, epoch: int, batches: int,
               lost: str | None = None) -> None:
        """Continue at batch ``batches`` of ``epoch`` from ``state`` (:meth:`state_dict` of the
        run that saved the checkpoint at that batch; None where it recorded none, or where
        ``lost`` says why it does not apply: another world size). With
        other shards the rest of the epoch comes from the head of its stream, with a
        note, as :meth:`TrainData.resume <lgp_ds.data.pipeline.TrainData.resume>` does."""
        self.epoch, self.taken, self.pipe, self.restore = epoch, batches, None, None
        if batches == 0:  # at an epoch's start, whatever the layout
            return
        if lost is not None:
            why = lost
        elif state is None or state.get("dali") is None:
            why = "the checkpoint records no DALI pipeline state"
        elif state["shards"] != self.shard_set:
            why = other_shards(self.shard_set, state["shards"])
        else:
            self.restore = state["dali"]
            return
        restart_note(epoch, why)

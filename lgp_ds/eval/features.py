"""Frozen features of a pre-trained encoder: from any checkpoint, over sharded data, cached.

- :func:`load_encoder` builds the encoder of any checkpoint that :func:`lgp_ds.convert.read`
  reads (an lgp_ds run folder of any ZeRO stage and world size, a timm file, an official MAE,
  MoCo v3 or grafting file) as the exact model it was trained as (the head count included:
  MoCo v3's ``vit_small`` has 12 heads where timm's has 6), loaded strictly.
- :func:`extract_features` runs an encoder over shards on every rank (each rank its own shards,
  :func:`lgp_ds.data.ordered.ordered_batches`) and gathers the features to every rank in dataset
  order, every image exactly once.
- :func:`cached_features` stores them on disk and reads them back on the next call.
"""
import hashlib
import json
import os
from functools import partial

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from lgp_ds import convert, dist
from lgp_ds.atomic import write_file
from lgp_ds.checkpoint_file import tensor_digest
from lgp_ds.data.ordered import ordered_batches
from lgp_ds.data.shards import expand_shards
from lgp_ds.models.heads import hidden_layers


WHICH = ("base", "momentum")
POOLING = ("cls", "mean")


# -- encoders from checkpoints ------------------------------------------------------------------
class FrozenEncoder(nn.Module):
    """forward(images [N,3,H,W], any float dtype) -> features [N, D] fp32; always in eval mode.

    ``vit``: a headless timm ViT (pooling built in); ``projector``: the first layers of the saved
    projector or None. ``description``: what was built, for logs; ``cache_key``: what the
    features depend on (weights digest, model, pooling, projector layers), for
    :func:`cached_features`.
    """

    def __init__(self, vit: VisionTransformer, projector: nn.Module | None, description: str,
                 cache_key: dict):
        super().__init__()
        self.vit, self.projector = vit, projector
        self.description, self.cache_key = description, cache_key
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: BN uses its saved running statistics

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit(images.to(self.vit.patch_embed.proj.weight.dtype))
        if self.projector is not None:
            x = self.projector(x)
        return x.float()


def _hidden_units(head: dict) -> int:
    """How many (Linear -> BN -> ReLU) units open the projector whose keys (``head.`` stripped)
    are in ``head``: unit u is Linear ``3u``, BatchNorm ``3u+1`` (with running statistics),
    ReLU ``3u+2``, and a layer ``3u+3`` follows it. MoCo v3's 3-layer projector and VICReg's
    expander have 2; their last Linear (-> BN without ReLU for MoCo) is the output, no unit."""
    units = 0
    while (head.get(f"{3 * units}.weight") is not None
           and head[f"{3 * units}.weight"].ndim == 2
           and f"{3 * units + 1}.running_mean" in head and f"{3 * units + 3}.weight" in head):
        units += 1
    return units


def _build_projector(head: dict, layers: int, where: str) -> tuple[nn.Sequential, dict]:
    """The first ``layers`` units of the saved projector (eval BN, saved running statistics),
    loaded strictly; and the tensors it holds."""
    units = _hidden_units(head)
    if layers > units:
        raise ValueError(f"projector_layers={layers}: the projector of {where} has {units} "
                         f"(Linear -> BN -> ReLU) layer(s) before its output layer; use 1 to "
                         f"{units}" if units else
                         f"projector_layers={layers}: the projector of {where} has no "
                         f"(Linear -> BN -> ReLU) layer before its output")
    hidden, width = head["0.weight"].shape
    modules, _ = hidden_layers(layers, width, hidden, nn.BatchNorm1d, bias="0.bias" in head)
    sd = {k: v for k, v in head.items() if int(k.split(".")[0]) < 3 * layers}
    projector = nn.Sequential(*modules)
    convert.load_strict(projector, sd, f"the first {layers} projector layer(s) of {where}")
    return projector.eval(), sd


def load_encoder(path: str, which: str = "base", pooling: str = "cls", projector_layers: int = 0,
                 arch: str | None = None, num_heads: int | None = None) -> FrozenEncoder:
    """The frozen encoder of the checkpoint ``path`` (any format :func:`lgp_ds.convert.read`
    reads), in eval mode, fp32, on the CPU: forward(images [N,3,H,W]) -> features [N, D] fp32.

    The model is the one :func:`lgp_ds.convert.model_spec` names from what the source records
    (lgp_ds config, MoCo v3 / grafting ``arch``: ``vit_small``/``vit_base`` with 12 heads, MAE's
    ``args.model``, the record of converted files) and the shapes, as ``tools/convert_ckpt.py``
    builds it; ``arch`` / ``num_heads`` override the record (``arch`` alone drops the recorded
    head count). The weights load strictly.

    ``which``: the ``base`` or ``momentum`` encoder. ``pooling``:
      - ``cls``: the class token after the final norm (MoCo v3's and MAE's linear probe);
      - ``mean``: MAE's global pool (``models_vit.py``, ``global_pool=True``): the mean of the
        patch tokens (class token excluded) of the last block's output, then a LayerNorm
        (``fc_norm``). That is timm's ``global_pool='avg'`` exactly (timm then replaces the
        per-token final norm by ``fc_norm`` after the pooling), which is what is built; its
        ``fc_norm`` carries the checkpoint's final norm weights (``norm.*``). (MAE's fine-tuning
        starts ``fc_norm`` at 1 / 0 and trains it; a frozen encoder keeps its trained norm.)
    ``projector_layers`` k >= 1: the output of the first k (Linear -> BN -> ReLU) units of the
    saved projector (``head.*``: MoCo v3's projector, VICReg's expander), BN in eval mode with
    the saved running statistics (SimCLR v2's "from the first projector layer" is k = 1). A
    checkpoint without a projector, or k beyond its hidden units, is a ValueError.

    ``.description`` says what was built (for logs); ``.cache_key`` what the features depend on.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}: not one of {WHICH}")
    if pooling not in POOLING:
        raise ValueError(f"pooling={pooling!r}: not one of {POOLING}")
    if projector_layers < 0:
        raise ValueError(f"projector_layers={projector_layers}: must be 0 (none) or more")
    weights = convert.read(path)
    sd = weights.encoder(which)  # ValueError when the source has no momentum encoder
    full = weights.base if which == "base" else weights.momentum
    heads = num_heads if num_heads is not None else (None if arch else weights.num_heads)
    spec = convert.model_spec(sd, arch or weights.arch, heads, arch_recorded=not arch)
    if "fc_norm.weight" in sd and "norm.weight" not in sd:  # trained with global pooling
        if pooling == "cls":
            raise ValueError(f"{path}: the encoder has fc_norm and no final norm (a global-pool "
                             f"model): use pooling='mean'")
        vit_sd = dict(sd)
    elif pooling == "mean":  # MAE's fc_norm after the pooling, with the final norm's weights
        vit_sd = {("fc_" + k if k.startswith("norm.") else k): v for k, v in sd.items()}
    else:
        vit_sd = dict(sd)
    vit = timm.create_model(spec.name, pretrained=False, num_classes=0,
                            global_pool="token" if pooling == "cls" else "avg", **spec.kwargs)
    convert.load_strict(vit, vit_sd, f"the {which} encoder of {path} ({spec.call()})")
    projector, proj_sd = None, {}
    what = f"{path} ({which} encoder)"
    if projector_layers:
        head = {k[len("head."):]: v for k, v in full.items() if k.startswith("head.")}
        if not head:
            raise ValueError(f"projector_layers={projector_layers}: {what} has no projector "
                             f"(no head.* weights); use projector_layers=0")
        projector, proj_sd = _build_projector(head, projector_layers, what)
    proj = (f", projector layers 1-{projector_layers} "
            f"({projector[-3].out_features} wide)" if projector_layers else "")
    description = (f"{spec.describe()}; {which} encoder, {pooling} pooling{proj}; from {path} "
                   f"as {spec.call()}" + "".join(f"; note: {n}" for n in spec.notes + weights.notes))
    key = {"weights": tensor_digest({**vit_sd, **{f"head.{k}": v for k, v in proj_sd.items()}}),
           "model": spec.call(), "which": which, "pooling": pooling,
           "projector_layers": projector_layers}
    return FrozenEncoder(vit, projector, description, key)


# -- extraction ------------------------------------------------------------------------------------
def _device_of(encoder) -> torch.device:
    if isinstance(encoder, nn.Module):
        p = next(encoder.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(encoder, urls, transform, batch_size: int, num_workers: int = 0,
                     device=None, with_keys: bool = False) -> tuple:
    """Collective: (features [N, D] fp32, labels [N] int64) of every image of the shards
    ``urls`` (URLs or brace/glob patterns), on every rank, in dataset order (shards in the order
    given, samples in shard order), each image exactly once; ``with_keys`` adds the N sample
    keys (image names, as subset files list them) in the same order.

    Each rank encodes the whole shards :func:`ordered_batches` deals it (``num_workers``
    DataLoader workers; ``transform``: PIL image -> [3,H,W], e.g.
    :func:`lgp_ds.data.transforms.eval_transform`); the rows are gathered by
    :func:`lgp_ds.dist.gather_in_order` (padding for the transport only). ``encoder``: images
    [B,3,H,W] on ``device`` (default: its parameters' device) -> [B, D]; inputs are cast to the
    dtype of its parameters (bf16 models work) and the output is returned as fp32. Every rank
    calls ``encoder`` the same number of times, whatever shards it holds (a rank out of batches
    encodes a dummy image and drops the result), so an encoder whose forward is a collective (a
    ZeRO-3 module) works (:func:`lgp_ds.dist.in_lockstep`).
    """
    urls = expand_shards([urls] if isinstance(urls, str) else list(urls))
    device = torch.device(device) if device is not None else _device_of(encoder)
    dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), None) \
        if isinstance(encoder, nn.Module) else None
    batches = ordered_batches(urls, transform, batch_size, dist.get_rank(),
                              dist.get_world_size(), num_workers, with_keys=True)
    indices, feats, labels, keys, dim = [], [], [], [], None
    for batch, shape in dist.in_lockstep(batches, device, lambda b: b[1].shape[1:]):
        images = batch[1] if batch is not None else torch.zeros(1, *shape)  # dropped below
        out = encoder(images.to(device, dtype or images.dtype, non_blocking=True)).float()
        dim = out.shape[1]
        if batch is not None:
            indices.append(batch[0])
            feats.append(out.cpu())
            labels.append(batch[2].to(torch.int64))
            keys += batch[3]
    if dim is None:
        raise ValueError(f"no image in the shards {urls[:3]}{' ...' if len(urls) > 3 else ''}")
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
    feats = torch.cat(feats) if feats else torch.zeros(0, dim)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    order, feats, labels = dist.gather_in_order(index, feats, labels, device=device)
    if not with_keys:
        return feats, labels
    key_of = {}  # dataset index -> sample key, from every rank
    for part in dist.all_gather_object(dict(zip(index.tolist(), keys))):
        key_of.update(part)
    return feats, labels, [key_of[i] for i in order.tolist()]


# -- cache -----------------------------------------------------------------------------------------
def _shard_identity(url: str) -> list:
    if os.path.isfile(url):
        st = os.stat(url)
        return [os.path.realpath(url), st.st_size, st.st_mtime_ns]
    return [url]  # remote: its URL


def features_key(encoder, urls, transform) -> dict:
    """What cached features depend on: the encoder's ``cache_key`` (weights digest, model,
    which encoder, pooling, projector layers) and parameter dtype, every shard (path, size,
    mtime; remote URLs as given), and the transform (its repr: torchvision's names every step
    and its sizes, interpolation and normalisation)."""
    key = getattr(encoder, "cache_key", None)
    if key is None:
        raise ValueError("cached features need an encoder from load_encoder (its cache_key says "
                         "which weights and model the features come from)")
    dtype = next((str(p.dtype) for p in encoder.parameters()), None)
    urls = expand_shards([urls] if isinstance(urls, str) else list(urls))
    return {**key, "dtype": dtype, "shards": [_shard_identity(u) for u in urls],
            "transform": repr(transform)}


def cached_features(cache_dir: str, encoder: FrozenEncoder, urls, transform, batch_size: int,
                    num_workers: int = 0, device=None, with_keys: bool = False) -> tuple:
    """Collective: :func:`extract_features` (the sample keys stored alongside), stored in
    ``cache_dir`` and read back next time.

    The file is named by the sha256 of :func:`features_key` (the encoder's weights digest, so a
    moved or re-converted checkpoint with the same weights hits the cache; its model incl. head
    count, which encoder, pooling, projector layers and dtype; every shard's path, size and
    mtime; the transform's repr) and holds that key, checked on reading. Rank 0 writes it
    under a temporary name and renames it when complete; every rank reads it (``cache_dir``
    must be storage that every rank sees; rank 0 decides whether the file is there).
    """
    key = features_key(encoder, urls, transform)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"features-{name}.pt")
    hit = dist.broadcast_object(os.path.isfile(path))  # rank 0 decides: one answer for all
    if not hit:
        feats, labels, keys = extract_features(encoder, urls, transform, batch_size, num_workers,
                                               device, with_keys=True)
        if dist.is_main():
            os.makedirs(cache_dir, exist_ok=True)
            write_file(path, partial(torch.save, {"key": key, "features": feats,
                                                  "labels": labels, "keys": keys}))
        dist.barrier()
        return (feats, labels, keys) if with_keys else (feats, labels)
    dist.barrier()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != json.loads(json.dumps(key)):
        raise ValueError(f"{path}: holds features of another encoder or data (its key differs)")
    out = saved["features"], saved["labels"]
    return (*out, saved["keys"]) if with_keys else out

"""The ``init=`` weights a run starts from: any format the converter reads, checked against the
model's head count, and for a grafting method against what trained them, before they load."""
from lgp_ds import convert
from lgp_ds.config import ANCHORED_METHODS

MIM, CONTRASTIVE = "MIM", "contrastive"
# What each grafting method's init= weights must be: the MIM->CL methods keep or anchor MIM
# weights below the contrastive stages they train, cl2mim the other way round.
GRAFTED_ONTO = {**dict.fromkeys(ANCHORED_METHODS, MIM), "cl2mim": CONTRASTIVE}
# What trained the encoder of an lgp_ds run of each method; a grafting method's run (graft and
# graft_vicreg only when started from init=) holds weights grafted already. MTL's encoder learns
# both objectives at once: neither the MIM nor the contrastive weights a graft starts from.
RUN_WEIGHTS = {"mae": MIM, "moco": CONTRASTIVE, "mtl": "MIM and contrastive (jointly trained)",
               "finetune": "fine-tuned (supervised)"}
# Where to find the weights each kind of grafting wants
SOURCES = {MIM: "an official MAE file or an lgp_ds run of method=mae",
           CONTRASTIVE: "an official MoCo v3 file or an lgp_ds run of method=moco"}


def read_init(path: str, num_heads: int | None = None,
              method: str | None = None) -> convert.Weights:
    """The ``init=`` weights: an MAE, MoCo v3 or timm file, or an lgp_ds checkpoint folder (run
    folder, ``checkpoints/`` or a tag: the newest complete checkpoint, consolidated to fp32).

    ``num_heads``: the head count of the model they are for. Weights whose source records
    another (its own record, or its architecture's: MoCo v3's ``vit_small`` has 12 heads where
    timm's has 6) are refused, naming both counts: the shapes match, so a strict load would
    go through and compute other features.

    ``method``: the method they start. A grafting method (:data:`GRAFTED_ONTO`) refuses weights
    whose source says another objective trained them (:func:`_trained_by`); weights whose source
    does not say (a timm file, an MAE encoder alone) are taken as given."""
    try:
        weights = convert.read(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"init={e}") from e
    recorded = _recorded_heads(weights)
    if num_heads is not None and recorded is not None and recorded != num_heads:
        raise ValueError(
            f"init={path}: its weights were trained with {recorded} attention heads (as its "
            f"source records: arch {weights.arch!r}), but the config builds {num_heads} (config "
            f"key num_heads); the shapes match, so they would load and compute other features: "
            f"set num_heads={recorded} (if the record is wrong, e.g. a grafting-code vit_small "
            f"file with 6 heads, convert it with tools/convert_ckpt.py --to init --num_heads N)")
    wanted, (trained, source) = GRAFTED_ONTO.get(method), _trained_by(weights)
    if wanted is not None and trained not in (None, wanted):
        raise ValueError(
            f"init={path} holds {trained} weights ({source}), but method={method} grafts onto "
            f"{wanted} weights: give {SOURCES[wanted]} (to graft onto these weights anyway, "
            f"convert them to an encoder alone: tools/convert_ckpt.py {path} DST --to init)")
    return weights


def _trained_by(weights: convert.Weights) -> tuple[str | None, str]:
    """(what trained the encoder of ``weights``, where the source says so), or (None, '') where
    it does not. An lgp_ds run records its method (graft and graft_vicreg without init= are
    MoCo v3 and VICReg from random weights); an official MAE model has MAE's decoder, an
    official MoCo v3 one its momentum encoder and predictor; an encoder alone says nothing."""
    if weights.config is not None:
        method = weights.config.get("method")
        source = f"an lgp_ds run of method={method}"
        if method in ("graft", "graft_vicreg") and weights.config.get("init") is None:
            return CONTRASTIVE, source + " from random weights"
        return RUN_WEIGHTS.get(method, "grafted"), source
    if weights.decoder is not None:
        return MIM, "an MAE model: it has MAE's decoder"
    if weights.momentum is not None or weights.predictor is not None:
        return CONTRASTIVE, "a MoCo v3 model: it has a momentum encoder or predictor"
    return None, ""


def _recorded_heads(weights: convert.Weights) -> int | None:
    """The head count the source of ``weights`` records, or None where it is only a guess."""
    if weights.num_heads is not None:
        return weights.num_heads
    if not weights.arch:
        return None
    try:
        spec = convert.model_spec(weights.encoder(), weights.arch, None, arch_recorded=True)
    except ValueError:
        return None
    if any("is a guess" in note for note in spec.notes):
        return None
    return spec.shape["num_heads"]

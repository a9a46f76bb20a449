"""The ``init=`` weights a run starts from: any format the converter reads, checked against the
model's head count before they load."""
from lgp_ds import convert


def read_init(path: str, num_heads: int | None = None) -> convert.Weights:
    """The ``init=`` weights: an MAE, MoCo v3 or timm file, or an lgp_ds checkpoint folder (run
    folder, ``checkpoints/`` or a tag: the newest complete checkpoint, consolidated to fp32).

    ``num_heads``: the head count of the model they are for. Weights whose source records
    another (its own record, or its architecture's: MoCo v3's ``vit_small`` has 12 heads where
    timm's has 6) are refused, naming both counts: the shapes match, so a strict load would
    go through and compute other features."""
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
    return weights


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

"""The DeepSpeed config checked the way DeepSpeed itself reads it, before any process group
exists, so that a mistake is named with its key path instead of failing late inside
``deepspeed.initialize`` or, worse, being ignored.

DeepSpeed ignores what it does not read: a misspelt ``"bf_16"`` trains in fp32, a misspelt
``"gradient_accumulation_step"`` does not accumulate, and both exit 0. :func:`check_reads`
builds DeepSpeed's own ``DeepSpeedConfig`` from the config and names every key DeepSpeed never
looked at, with the closest one it did. Sections DeepSpeed hands whole to a pydantic model
(``zero_optimization``, ``bf16``, ``fp16``, the monitors ...) forbid unknown keys themselves;
:func:`parsed` reads one such section with the model DeepSpeed uses and names a wrong key or
value.
"""
import difflib

import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
from pydantic import ValidationError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def parsed(key: str, model, section):
    """``section``, the DeepSpeed config's ``key``, read by DeepSpeed's pydantic ``model``
    (aliases and ``"false"`` read as DeepSpeed reads them); ValueError names each wrong key
    or value by its path."""
    if not isinstance(section, dict):
        raise ValueError(f"DeepSpeed config key {key}={section!r}: give a mapping")
    try:
        return model(**section)
    except ValidationError as e:
        raise ValueError("; ".join(
            f"DeepSpeed config key {key}" + "".join(f".{part}" for part in error["loc"])
            + f": {error['msg']}" for error in e.errors())) from None


def bf16(ds: dict) -> DeepSpeedBF16Config:
    """The bf16 section as DeepSpeed reads it (``bfloat16``, its older name, where ``bf16`` is
    absent)."""
    key = "bf16" if "bf16" in ds or "bfloat16" not in ds else "bfloat16"
    return parsed(key, DeepSpeedBF16Config, ds.get(key, {}))


def fp16(ds: dict) -> DeepSpeedFP16Config:
    """The fp16 section as DeepSpeed reads it."""
    return parsed("fp16", DeepSpeedFP16Config, ds.get("fp16", {}))


def check_batch_keys(ds: dict) -> None:
    """The batch keys that ``ds`` states are positive integers (DeepSpeed compares them as
    they are: ``"2"`` fails inside it with a TypeError, ``2.0`` slips through)."""
    for key in BATCH_KEYS:
        value = ds.get(key, 1)
        if type(value) is not int or value < 1:
            raise ValueError(f"DeepSpeed config key {key}={value!r}: give a positive integer "
                             f"(or remove the key)")


_WHOLE = object()  # in a record's reads: the mapping was handed on whole


class _ReadRecord(dict):
    """A config mapping that notes each key that is looked up in it (``get``, ``[]``, ``in``,
    ``in .keys()``), its nested mappings likewise. A copy (``copy.copy``, as DeepSpeed makes)
    shares the record."""

    def __init__(self, mapping: dict):
        super().__init__({k: _ReadRecord(v) if isinstance(v, dict) else v
                          for k, v in mapping.items()})
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):
        return self  # ``key in d.keys()``, DeepSpeed's usual test, is then recorded too

    def __iter__(self):
        # Defined, so that ``Model(**section)`` goes through here rather than dict's fast path:
        # a section handed on whole is checked by DeepSpeed's pydantic model, which refuses
        # unknown keys itself.
        self.read.add(_WHOLE)
        return dict.__iter__(self)

    def unread(self, path: str = "") -> list[str]:
        """Key paths never looked up, here and in the nested mappings that were looked up key
        by key (not those handed on whole, nor those that pydantic validated inside a model
        without a lookup through here)."""
        if _WHOLE in self.read or not self.read:
            return []
        unread = [path + k for k in dict.keys(self) if k not in self.read]
        for k, value in dict.items(self):
            if isinstance(value, _ReadRecord) and k in self.read:
                unread += value.unread(f"{path}{k}.")
        return unread


def check_reads(ds: dict) -> None:
    """ValueError unless DeepSpeed reads the config ``ds`` without error and reads every key of
    it, naming the keys it would ignore with the closest keys it reads."""
    # The batch keys as DeepSpeed needs them on any world size; their values are checked by
    # lgp_ds (the global batch is the recipe's).
    record = _ReadRecord({**{k: v for k, v in ds.items() if k != "train_batch_size"},
                          "train_micro_batch_size_per_gpu": 1})
    try:
        DeepSpeedConfig(record)
    except ValidationError as e:  # a section's model (its key path is the error's location)
        raise ValueError("; ".join(
            f"DeepSpeed config: {e.title} key {'.'.join(map(str, error['loc']))}: {error['msg']}"
            for error in e.errors())) from None
    except Exception as e:  # DeepSpeed's own checks: assertions, ValueError, ...
        reason = " ".join(str(e).split())
        raise ValueError(f"DeepSpeed {deepspeed.__version__} refuses the DeepSpeed config: "
                         f"{type(e).__name__}: {reason[:300]}") from None
    named = []
    for path in record.unread():
        *parents, name = path.split(".")
        section = record
        for parent in parents:
            section = dict.__getitem__(section, parent)
        read = [k for k in section.read if isinstance(k, str)]
        close = difflib.get_close_matches(name, read, n=1)
        named.append(path + (f" (did you mean {'.'.join([*parents, close[0]])}?)" if close
                             else ""))
    if named:
        raise ValueError(f"DeepSpeed config key(s) {', '.join(named)}: DeepSpeed "
                         f"{deepspeed.__version__} does not read them and would silently ignore "
                         f"them; correct or remove them")

"""Architecture facts shipped with vlzoo, and the one loading seam the backbones go through.

``model_configs/*.json`` holds, for every pretrained model a shipped recipe names, the published
``config.json`` values (written out in full, so no transformers default can drift), the facts
of its tokenizer (vocabulary size, special tokens and their ids) and its image preprocessing.
No weights.  SAM needs no file: ``segment_anything``'s registry settings live in code
(:data:`vlzoo.backbones.vision.SAM_ENCODER_VARIANTS`, ``vlzoo.decoders.sam.SAM_DECODER_VARIANTS``).

Every backbone loads through :func:`load_pretrained`, :func:`load_pretrained_tokenizer` and
:func:`read_weights`.  Normally they call ``from_pretrained`` / read the file.  Inside
:func:`dry_loading` (what ``vlzoo check --dry-run`` uses) they build the model from its
config instead - on PyTorch's ``meta`` device, so a 7 B model costs no memory - give a
:func:`~vlzoo.data.tokenizer.sized_tokenizer` with the family's vocabulary size and special
token ids, and skip weight files, recording each replacement.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.overrides

__all__ = [
    "MODEL_CONFIGS_DIR",
    "ShippedModel",
    "ShippedConfigError",
    "DryLoading",
    "shipped_models",
    "shipped_model",
    "dry_loading",
    "dry_loading_active",
    "load_pretrained",
    "load_pretrained_tokenizer",
    "read_weights",
    "preprocessor_settings",
]

MODEL_CONFIGS_DIR = Path(__file__).with_name("model_configs")


class ShippedConfigError(LookupError):
    """A dry run needs the architecture of a model vlzoo ships no config for."""


@dataclass(frozen=True)
class ShippedModel:
    """One ``model_configs/*.json`` file."""

    file: Path
    names: tuple[str, ...]
    model_class: str
    config: dict[str, Any]
    tokenizer: dict[str, Any] | None = None
    preprocessor: dict[str, Any] | None = None
    source: str = ""


@lru_cache(maxsize=1)
def _index() -> dict[str, ShippedModel]:
    out: dict[str, ShippedModel] = {}
    for path in sorted(MODEL_CONFIGS_DIR.glob("*.json")):
        body = json.loads(path.read_text())
        model = ShippedModel(
            file=path,
            names=tuple(body["names"]),
            model_class=body["class"],
            config=body["config"],
            tokenizer=body.get("tokenizer"),
            preprocessor=body.get("preprocessor"),
            source=body.get("source", ""),
        )
        for name in model.names:
            out[name] = model
    return out


def shipped_models() -> dict[str, ShippedModel]:
    """``{hub name: ShippedModel}`` for every shipped config."""
    return dict(_index())


def shipped_model(name_or_path: str) -> ShippedModel:
    """The shipped config of a hub name; :class:`ShippedConfigError` names the known ones."""
    index = _index()
    if name_or_path in index:
        return index[name_or_path]
    raise ShippedConfigError(
        f"vlzoo ships no architecture config for {name_or_path!r} (known: {', '.join(sorted(index))}); "
        f"point name_or_path at a local folder with its config.json, or add its published config.json values "
        f"to {MODEL_CONFIGS_DIR}/<name>.json"
    )


@dataclass
class DryLoading:
    """What :func:`dry_loading` replaced: ``(what, name_or_path, replaced by)`` per load."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)


_DRY: ContextVar[DryLoading | None] = ContextVar("vlzoo_dry_loading", default=None)


class _ValuesOnCpu(torch.overrides.TorchFunctionMode):
    """Integer tensors made from Python values (``torch.tensor([1, 10, 100])``) stay on the CPU
    inside the meta device: their values are data (a metric's thresholds, an index table)."""

    _MAKERS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func not in self._MAKERS or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        kwargs["device"] = "cpu"
        made = func(*args, **kwargs)
        # floating values may become weights (a learnable scale): those go to meta like the rest
        return made.to("meta") if made.is_floating_point() else made


@contextlib.contextmanager
def dry_loading() -> Iterator[DryLoading]:
    """Build models from shipped configs on the meta device, tokenizers from their facts, and
    skip weight files, for the duration of the block (tensors made from Python values stay on
    the CPU)."""
    record = DryLoading()
    token = _DRY.set(record)
    try:
        with torch.device("meta"), _ValuesOnCpu():
            yield record
    finally:
        _DRY.reset(token)


def dry_loading_active() -> bool:
    """Whether the caller runs inside :func:`dry_loading`."""
    return _DRY.get() is not None


def _local_config(name_or_path: str) -> Path | None:
    path = Path(name_or_path) / "config.json"
    return path if path.is_file() else None


def load_pretrained(cls: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, **kwargs)``; inside :func:`dry_loading` the same
    architecture from its config (a local folder's ``config.json`` or the shipped one), untrained,
    on the meta device."""
    # code shipped with a model folder never runs (a recipe cannot turn this on: vlzoo.targets)
    kwargs = {**kwargs, "trust_remote_code": False}
    record = _DRY.get()
    if record is None:
        return cls.from_pretrained(name_or_path, **kwargs)
    from transformers import AutoConfig

    local = _local_config(name_or_path)
    if local is not None:
        config = AutoConfig.from_pretrained(str(local.parent), trust_remote_code=False)
        source = str(local)
    else:
        shipped = shipped_model(name_or_path)
        settings = dict(shipped.config)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        source = str(shipped.file.name)
    build_kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "attn_implementation")}
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, **build_kwargs)
        else:
            model = cls._from_config(config, **build_kwargs)
    record.replaced.append(("model", name_or_path, f"{type(model).__name__} from {source} on meta"))
    return model


def load_pretrained_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained``; inside :func:`dry_loading` a local folder's tokenizer
    when it has one, else a :func:`~vlzoo.data.tokenizer.sized_tokenizer` from the shipped facts."""
    from transformers import AutoTokenizer

    record = _DRY.get()
    if record is None or Path(name_or_path).is_dir():
        return AutoTokenizer.from_pretrained(name_or_path, **{**kwargs, "trust_remote_code": False})
    from vlzoo.data.tokenizer import sized_tokenizer

    shipped = shipped_model(name_or_path)
    if shipped.tokenizer is None:
        raise ShippedConfigError(f"{shipped.file.name} holds no tokenizer facts for {name_or_path!r}")
    facts = shipped.tokenizer
    tokenizer = sized_tokenizer(
        vocab_size=int(facts["vocab_size"]),
        tokens={str(k): int(v) for k, v in facts["tokens"].items()},
        unk_token=facts["unk_token"],
        bos_token=facts.get("bos_token"),
        eos_token=facts.get("eos_token"),
        pad_token=facts.get("pad_token"),
        additional_special_tokens=facts.get("additional_special_tokens"),
    )
    record.replaced.append(("tokenizer", name_or_path, f"sized_tokenizer({len(tokenizer)} tokens) from {shipped.file.name}"))
    return tokenizer


def read_weights(path: str | Path, what: str) -> bool:
    """Whether to read the weight file ``path`` now (no inside :func:`dry_loading`: the weights
    do not matter and the file need not exist; the skip is recorded)."""
    record = _DRY.get()
    if record is None:
        return True
    record.replaced.append(("weights", str(path), f"{what}: not read (dry run)"))
    return False


def preprocessor_settings(name_or_path: str) -> dict[str, Any] | None:
    """``preprocessor_config.json`` of a local folder; inside :func:`dry_loading` the shipped
    preprocessing of a hub name; ``None`` when neither is known."""
    path = Path(name_or_path) / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if _DRY.get() is not None and name_or_path in _index():
        return _index()[name_or_path].preprocessor
    return None

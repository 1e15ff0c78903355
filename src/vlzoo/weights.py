"""Reading weight files without unpickling: one loader for every component that takes a file.

``torch.load(..., weights_only=True)`` admits only tensors and plain containers, so a file that
holds Python objects (a pickle that would run code when loaded) is refused instead of executed.
A refusal is a :class:`ValueError` naming the file and what to do, so a recipe that points at
such a file fails with the recipe key (``vlzoo.config.instantiate``) rather than a traceback.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_weights"]


def load_weights(path: str | Path, *, what: str) -> Any:
    """The contents of a weights file (``torch.save`` of tensors and plain containers).

    Args:
        path: the file.
        what: what the file is meant to be, for the messages (``"SAM checkpoint"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read as plain weights (damaged, another format, or it
            holds Python objects, which are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what} {path} cannot be read as plain weights ({type(err).__name__}: {first}). It is damaged, of "
            "another format, or holds Python objects, which vlzoo never unpickles (they could run code): "
            "re-save it as a state dict of tensors."
        ) from err

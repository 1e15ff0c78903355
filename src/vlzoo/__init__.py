"""vlzoo: interchangeable components for localization in large multimodal models."""

from __future__ import annotations

from vlzoo.version import __version__

__all__ = ["__version__", "build", "load", "load_checkpoint"]


def __getattr__(name: str):
    # heavy imports (lightning, transformers) only when these entry points are used
    if name == "build":
        from vlzoo.build import build

        return build
    if name == "load":
        from vlzoo.inference import load

        return load
    if name == "load_checkpoint":
        from vlzoo.checkpoints import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'vlzoo' has no attribute {name!r}")

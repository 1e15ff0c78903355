"""vlzoo's version, in a bottom-layer module so the tracking and checkpoint code can record it
without importing the package root (whose entry points reach up to build and inference)."""

__version__ = "0.1.0"

__all__ = ["__version__"]

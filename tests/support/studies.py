"""Study (and recipe) files written into a test's temporary folder."""

from __future__ import annotations

from pathlib import Path


def write_study(folder: Path, text: str, name: str = "study.yaml") -> Path:
    """Write ``text`` as ``folder/name`` and return the path."""
    path = folder / name
    path.write_text(text)
    return path

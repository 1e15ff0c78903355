"""Reading images from a folder: original size kept, EXIF orientation honoured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlzoo.data.errors import DataError

__all__ = ["load_image"]


def load_image(path: str | Path, *, record: str = "") -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB, rotated upright by its EXIF orientation.

    Raises :class:`DataError` naming ``path`` (and ``record``) when the file is missing or is
    not a readable image.
    """
    path = Path(path)
    where = f"{path}" + (f" ({record})" if record else "")
    hint = (
        "fix or remove it, or set on_bad_sample: skip on the datamodule (data.on_bad_sample=skip) to leave such "
        "samples out"
    )
    if not path.is_file():
        raise DataError(f"{where}: image file not found; check the dataset's image_dir, or {hint}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot read image ({e}); the file is damaged or not an image: {hint}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

"""Overlays: ground truth and predictions drawn on the raw image, for people to look at.

Ground truth is green, predictions are red.  A paradigm's evidence is drawn when present:
``evidence["heatmap"]`` (h, w) in [0, 1] semi-transparent over the image, ``evidence["points"]``
(P, 2) as yellow dots.  Evidence is in network-input pixels (see :class:`vlzoo.structures.
Predictions`); pass the sample's ``transform`` to map it onto the original image, otherwise the
heatmap is stretched over the whole image and points are taken as original pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from vlzoo.structures import ImageTransform, Predictions, Targets

__all__ = ["draw_overlay", "GT_COLOR", "PRED_COLOR", "EVIDENCE_COLOR"]

GT_COLOR = (0.1, 0.9, 0.2)
PRED_COLOR = (0.95, 0.1, 0.1)
EVIDENCE_COLOR = (1.0, 0.85, 0.0)


def _mask_layer(masks: Tensor, color: tuple[float, float, float], alpha: float) -> np.ndarray:
    union = masks.bool().any(dim=0).cpu().numpy()
    layer = np.zeros(union.shape + (4,), dtype=np.float32)
    layer[union] = (*color, alpha)
    return layer


def _heatmap_on_original(heatmap: Tensor, transform: ImageTransform | None, size: tuple[int, int]) -> np.ndarray:
    """The heatmap resampled onto the original image of ``size`` (H, W)."""
    heat = heatmap.detach().float().cpu()[None, None]
    if transform is not None:
        ih, iw = transform.input_size
        heat = torch.nn.functional.interpolate(heat, size=(ih, iw), mode="bilinear", align_corners=False)
        h, w = transform.original_size
        sx, sy = transform.scale
        ox, oy = transform.offset
        x0, y0 = int(round(ox)), int(round(oy))
        x1, y1 = max(int(round(ox + w * sx)), x0 + 1), max(int(round(oy + h * sy)), y0 + 1)
        heat = heat[..., y0:y1, x0:x1]
    heat = torch.nn.functional.interpolate(heat, size=size, mode="bilinear", align_corners=False)
    return heat[0, 0].clamp(0, 1).numpy()


def _draw_instances(ax, boxes: Tensor, masks: Tensor | None, keypoints: Tensor | None, color, size, style) -> None:
    if masks is not None and masks.numel() and masks.shape[-2:] == size:
        ax.imshow(_mask_layer(masks, color, 0.35), interpolation="nearest")
    for box in boxes.detach().cpu().tolist():
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2, linestyle=style))
    if keypoints is not None and keypoints.numel():
        kp = keypoints.detach().cpu().reshape(-1, keypoints.shape[-1])
        visible = kp[:, 2] > 0 if kp.shape[1] > 2 else torch.ones(len(kp), dtype=torch.bool)
        ax.scatter(kp[visible, 0], kp[visible, 1], s=18, c=[color], marker="o", edgecolors="black", linewidths=0.5)


def draw_overlay(
    image_uint8_chw: Tensor,
    targets: Targets | None,
    predictions: Predictions | None,
    path: str | Path,
    title: str | None = None,
    *,
    transform: ImageTransform | None = None,
) -> Path:
    """Draw ``targets`` (green) and ``predictions`` (red, plus their evidence) on the raw image
    ``(3, H, W)`` uint8 and save a PNG to ``path``.  Both are in original-image pixels.
    Returns the written path."""
    if image_uint8_chw.ndim != 3 or image_uint8_chw.shape[0] not in (1, 3):
        raise ValueError(f"draw_overlay needs a (3, H, W) image, got shape {tuple(image_uint8_chw.shape)}")
    image = image_uint8_chw.detach().cpu()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    h, w = int(image.shape[1]), int(image.shape[2])
    scale = max(1.0, 256 / max(h, w))
    fig = Figure(figsize=(w * scale / 100, h * scale / 100 + (0.3 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 if not title else h / (h + 30 / scale)))
    ax.imshow(image.permute(1, 2, 0).numpy().astype(np.uint8), interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    if predictions is not None and "heatmap" in predictions.evidence:
        heat = _heatmap_on_original(predictions.evidence["heatmap"], transform, (h, w))
        ax.imshow(heat, cmap="jet", alpha=0.45 * (heat > 0.02), vmin=0, vmax=1, interpolation="bilinear")
    if targets is not None:
        _draw_instances(ax, targets.boxes, targets.masks, targets.keypoints, GT_COLOR, (h, w), "--")
    if predictions is not None:
        _draw_instances(ax, predictions.boxes, predictions.masks, predictions.keypoints, PRED_COLOR, (h, w), "-")
        points = predictions.evidence.get("points")
        if points is not None and points.numel():
            pts = points.detach().float().cpu().reshape(-1, points.shape[-1])[:, :2]
            if transform is not None:
                pts = transform.points_to_original(pts)
            ax.scatter(pts[:, 0], pts[:, 1], s=22, c=[EVIDENCE_COLOR], marker="o", edgecolors="black", linewidths=0.6)
    if title:
        fig.suptitle(title, fontsize=8, y=0.995, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path

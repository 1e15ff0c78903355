"""Heatmap building blocks: Gaussian centre targets, the CenterNet focal loss, peak extraction
and sub-pixel refinement.  Plain tensor functions, no modules, so that every paradigm that
localizes through a heatmap (``heatmap``/Lumen, ``attention_keypoints``/LENS) shares one
definition of "where the peak is".

Coordinates are *continuous grid-cell coordinates*: on an ``(h, w)`` grid, cell ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``.  A pixel position ``p`` on an
input of ``S`` pixels maps to ``p * w / S`` cells and back; no half-cell offsets hide anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gaussian_radius",
    "draw_gaussian",
    "gaussian_heatmap_targets",
    "box_heatmap_targets",
    "heatmap_focal_loss",
    "find_peaks",
    "refine_subpixel",
    "decode_boxes",
]


def gaussian_radius(height: float, width: float, *, min_overlap: float = 0.7) -> float:
    """CenterNet's radius (in cells) for a box of ``height x width`` cells.

    The largest corner displacement such that a box displaced by it still overlaps the true box
    with IoU >= ``min_overlap`` (the three cases of CornerNet, the smallest root wins).  Big boxes
    tolerate a bigger miss, so their Gaussian is wider and the loss penalises near misses less.
    """
    a1 = 1.0
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(max(b1**2 - 4 * a1 * c1, 0.0))) / 2

    a2 = 4.0
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(max(b2**2 - 4 * a2 * c2, 0.0))) / 2

    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(max(b3**2 - 4 * a3 * c3, 0.0))) / 2
    return min(r1, r2, r3)


def draw_gaussian(
    heatmap: Tensor, cx: int, cy: int, radius: int, *, offset: tuple[float, float] = (0.0, 0.0)
) -> Tensor:
    """Write ``max(heatmap, gaussian)`` in place around integer cell ``(cx, cy)``; returns it.

    The Gaussian has ``sigma = (2 * radius + 1) / 6`` (CenterNet) and value exactly 1 at the
    centre cell, so the focal loss can tell positives by ``target == 1``.  ``offset`` ``(dx,
    dy)`` (cells, within +-0.5) moves the Gaussian's mean off the cell centre while the centre
    cell stays 1: the neighbours then carry the sub-cell position, which
    :func:`refine_subpixel` reads back.
    """
    h, w = heatmap.shape[-2:]
    if not (0 <= cx < w and 0 <= cy < h):
        raise ValueError(f"draw_gaussian: centre cell ({cx}, {cy}) outside the {h}x{w} grid")
    radius = max(int(radius), 0)
    sigma = (2 * radius + 1) / 6.0
    ys = torch.arange(-radius, radius + 1, dtype=heatmap.dtype, device=heatmap.device)
    dx, dy = float(offset[0]), float(offset[1])
    g = torch.exp(-((ys[:, None] - dy) ** 2 + (ys[None, :] - dx) ** 2) / (2 * sigma * sigma))
    g[radius, radius] = 1.0
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = g[radius - top : radius + bottom, radius - left : radius + right]
    region.copy_(torch.maximum(region, patch))
    return heatmap


def gaussian_heatmap_targets(
    centers: Tensor,
    sizes: Tensor,
    grid: tuple[int, int],
    *,
    min_overlap: float = 0.7,
    min_radius: int = 0,
    subcell: bool = False,
) -> Tensor:
    """The ``(h, w)`` target heatmap of ``N`` objects: one Gaussian per object, maximum where
    they overlap.

    Args:
        centers: ``(N, 2)`` object centres ``(x, y)`` in continuous grid cells; the peak goes to
            the cell that contains the centre.
        sizes: ``(N, 2)`` object ``(width, height)`` in grid cells; they set the radius
            (:func:`gaussian_radius`), so a bigger object gets a wider Gaussian.
        grid: ``(h, w)`` of the heatmap.
        min_overlap: IoU the radius guarantees (CenterNet uses 0.7).
        min_radius: lower bound of the radius in cells (keeps tiny objects from a 1-cell target).
        subcell: centre each Gaussian on the exact centre rather than on its cell's centre
            (the peak cell stays exactly 1), so a heatmap trained on it keeps sub-cell precision.
    """
    h, w = int(grid[0]), int(grid[1])
    centers = torch.as_tensor(centers, dtype=torch.float32).reshape(-1, 2)
    sizes = torch.as_tensor(sizes, dtype=torch.float32).reshape(-1, 2)
    if centers.shape[0] != sizes.shape[0]:
        raise ValueError(f"gaussian_heatmap_targets: {centers.shape[0]} centres but {sizes.shape[0]} sizes")
    heatmap = torch.zeros((h, w), dtype=torch.float32)
    for (x, y), (bw, bh) in zip(centers.tolist(), sizes.tolist(), strict=True):
        cx = min(max(int(math.floor(x)), 0), w - 1)
        cy = min(max(int(math.floor(y)), 0), h - 1)
        radius = max(int(gaussian_radius(max(bh, 0.0), max(bw, 0.0), min_overlap=min_overlap)), min_radius)
        offset = (
            (min(max(x - cx - 0.5, -0.5), 0.5), min(max(y - cy - 0.5, -0.5), 0.5)) if subcell else (0.0, 0.0)
        )
        draw_gaussian(heatmap, cx, cy, radius, offset=offset)
    return heatmap


def box_heatmap_targets(
    boxes: Tensor,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    *,
    min_overlap: float = 0.7,
    min_radius: int = 0,
    subcell: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Centre heatmap, size map and size weights of ``N`` boxes (CenterNet / Lumen training).

    Args:
        boxes: ``(N, 4)`` xyxy in pixels of an image of ``image_size`` ``(H, W)``.
        grid: ``(h, w)`` of the heatmap.
        min_overlap, min_radius, subcell: see :func:`gaussian_heatmap_targets`.

    Returns:
        ``heat (h, w)`` (:func:`gaussian_heatmap_targets`), ``size (2, h, w)`` the ``(width,
        height)`` of the box owning each cell as a fraction of the image, and ``weight (h, w)``:
        the owner's Gaussian value, so the size loss trains the peak cell most and its
        neighbours less (a peak found one cell off still reads a sensible size).  A cell belongs
        to the box whose Gaussian is highest there.
    """
    h, w = int(grid[0]), int(grid[1])
    big_h, big_w = float(image_size[0]), float(image_size[1])
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    heat = torch.zeros((h, w), dtype=torch.float32)
    size = torch.zeros((2, h, w), dtype=torch.float32)
    for x1, y1, x2, y2 in boxes.tolist():
        bw, bh = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
        centre = torch.tensor([[(x1 + x2) / 2 * w / big_w, (y1 + y2) / 2 * h / big_h]])
        one = gaussian_heatmap_targets(
            centre,
            torch.tensor([[bw * w / big_w, bh * h / big_h]]),
            (h, w),
            min_overlap=min_overlap,
            min_radius=min_radius,
            subcell=subcell,
        )
        owns = one > heat
        size[0][owns] = bw / big_w
        size[1][owns] = bh / big_h
        heat = torch.maximum(heat, one)
    return heat, size, heat.clone()


def heatmap_focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    *,
    num_peaks: Tensor | float | None = None,
) -> Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the number of peaks.

    Cells where ``target == 1`` are positives; every other cell is a negative whose penalty is
    reduced by ``(1 - target) ** beta``, so a near miss inside the Gaussian costs little.
    ``alpha`` focuses the loss on the cells the model still gets wrong.  Works on logits (any
    shape, same as ``target``) through ``logsigmoid`` for numerical stability.

    Args:
        num_peaks: the normaliser; by default the number of positive cells (at least 1), which
            keeps an image with many objects from dominating the batch's gradient.
    """
    if logits.shape != target.shape:
        raise ValueError(f"heatmap_focal_loss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    logits = logits.float()
    target = target.float()
    pos = target.ge(1.0 - 1e-4).float()
    neg = 1.0 - pos
    prob = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    pos_loss = log_p * (1.0 - prob).pow(alpha) * pos
    neg_loss = log_1mp * prob.pow(alpha) * (1.0 - target).pow(beta) * neg
    norm = pos.sum() if num_peaks is None else torch.as_tensor(num_peaks, dtype=logits.dtype)
    return -(pos_loss.sum() + neg_loss.sum()) / norm.clamp(min=1.0)


def _local_maxima(heatmap: Tensor, kernel: int) -> Tensor:
    """Keep only cells equal to the maximum of their ``kernel x kernel`` neighbourhood (the
    max-pool NMS of CenterNet: no IoU computation, no sort)."""
    if kernel % 2 != 1 or kernel < 1:
        raise ValueError(f"find_peaks: kernel must be a positive odd number, got {kernel}")
    pooled = F.max_pool2d(heatmap.unsqueeze(1), kernel, stride=1, padding=kernel // 2).squeeze(1)
    return heatmap * (pooled == heatmap)


def find_peaks(
    heatmap: Tensor,
    k: int,
    threshold: float = 0.0,
    kernel: int = 3,
) -> tuple[Tensor, Tensor, Tensor] | tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The ``k`` highest local maxima of a heatmap, keeping those with ``score > threshold``.

    Args:
        heatmap: ``(h, w)`` or ``(B, h, w)`` scores (probabilities, i.e. after ``sigmoid``: a
            local maximum of 0 is not a peak).
        k: at most this many peaks per heatmap (top-1 for grounding, top-K for detection).
        threshold: peaks must score strictly above it.
        kernel: neighbourhood of the max-pool NMS (odd).

    Returns:
        ``(scores, ys, xs)``: for a 2-D heatmap, three 1-D tensors sorted by descending score
        (``ys``/``xs`` are integer cell indices); for a batch, three lists with one such tensor
        per heatmap, since each keeps a different number of peaks.
    """
    if heatmap.dim() not in (2, 3):
        raise ValueError(f"find_peaks: heatmap must be (h, w) or (B, h, w), got {tuple(heatmap.shape)}")
    single = heatmap.dim() == 2
    maps = heatmap.unsqueeze(0) if single else heatmap
    b, h, w = maps.shape
    peaks = _local_maxima(maps.float(), kernel).reshape(b, h * w)
    top = min(int(k), h * w)
    scores, idx = peaks.topk(top, dim=1)
    out_s, out_y, out_x = [], [], []
    for i in range(b):
        keep = scores[i] > threshold
        out_s.append(scores[i][keep])
        out_y.append(torch.div(idx[i][keep], w, rounding_mode="floor"))
        out_x.append(idx[i][keep] % w)
    if single:
        return out_s[0], out_y[0], out_x[0]
    return out_s, out_y, out_x


def refine_subpixel(
    heatmap: Tensor,
    ys: Tensor,
    xs: Tensor,
    method: str = "quadratic",
    window: int = 3,
) -> tuple[Tensor, Tensor]:
    """Sub-cell positions of the peaks at integer cells ``(ys, xs)`` of a 2-D ``heatmap``.

    ``"quadratic"`` fits a parabola to the *log* of the scores along each axis through the peak
    (least squares over ``window`` cells): the log of a Gaussian is exactly a parabola, so a
    Gaussian-shaped peak is recovered without bias.  ``"soft_argmax"`` takes the score-weighted
    centroid of the ``window x window`` neighbourhood (differentiable, slightly pulled towards
    the peak cell by the truncation).  Neighbours outside the grid repeat the border.

    Returns ``(x, y)`` in continuous cell coordinates (a cell's centre is ``index + 0.5``).
    """
    if heatmap.dim() != 2:
        raise ValueError(f"refine_subpixel: heatmap must be (h, w), got {tuple(heatmap.shape)}")
    if window % 2 != 1 or window < 3:
        raise ValueError(f"refine_subpixel: window must be an odd number >= 3, got {window}")
    if method not in ("quadratic", "soft_argmax"):
        raise ValueError(f"refine_subpixel: method must be 'quadratic' or 'soft_argmax', got {method!r}")
    ys = torch.as_tensor(ys, dtype=torch.long, device=heatmap.device).reshape(-1)
    xs = torch.as_tensor(xs, dtype=torch.long, device=heatmap.device).reshape(-1)
    r = window // 2
    h, w = heatmap.shape
    t = torch.arange(-r, r + 1, device=heatmap.device)
    rows = (ys[:, None, None] + t[None, :, None]).clamp(0, h - 1)  # (N, window, 1)
    cols = (xs[:, None, None] + t[None, None, :]).clamp(0, w - 1)  # (N, 1, window)
    patch = heatmap.float()[rows, cols]  # (N, window, window)
    tf = t.float()
    if method == "soft_argmax":
        weights = patch.clamp(min=0)
        total = weights.sum(dim=(1, 2)).clamp(min=1e-12)
        dy = (weights.sum(dim=2) * tf).sum(dim=1) / total
        dx = (weights.sum(dim=1) * tf).sum(dim=1) / total
    else:
        logs = patch.clamp(min=1e-12).log()
        dx = _parabola_vertex(logs[:, r, :], tf, r)
        dy = _parabola_vertex(logs[:, :, r], tf, r)
    return xs.float() + 0.5 + dx, ys.float() + 0.5 + dy


def _parabola_vertex(values: Tensor, t: Tensor, r: int) -> Tensor:
    """Vertex of the least-squares parabola ``a t^2 + b t + c`` through ``values`` (N, 2r+1) at
    symmetric offsets ``t``; 0 where the fit is not a maximum, clamped to the window."""
    n = float(t.numel())
    s2 = (t**2).sum()
    s4 = (t**4).sum()
    b = (values * t).sum(dim=1) / s2
    a = (n * (values * t**2).sum(dim=1) - s2 * values.sum(dim=1)) / (n * s4 - s2**2)
    vertex = torch.where(a < 0, -b / (2 * a.clamp(max=-1e-12)), torch.zeros_like(a))
    return vertex.clamp(-float(r), float(r))


def decode_boxes(
    heatmap: Tensor,
    box_size: Tensor,
    *,
    image_size: tuple[int, int],
    k: int = 100,
    threshold: float = 0.0,
    kernel: int = 3,
    refine: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Boxes from a centre heatmap and a per-cell size map (CenterNet / Lumen decoding).

    Args:
        heatmap: ``(h, w)`` centre probabilities.
        box_size: ``(2, h, w)`` box ``(width, height)`` at every cell as a fraction of the image
            (read at each peak).
        image_size: ``(H, W)`` pixels of the image the boxes are returned in.
        k / threshold / kernel: see :func:`find_peaks`.
        refine: ``None`` (the peak cell's centre), ``"quadratic"`` or ``"soft_argmax"``
            (:func:`refine_subpixel`).

    Returns:
        ``(boxes (N, 4) xyxy pixels, scores (N,))`` sorted by descending score.
    """
    if box_size.dim() != 3 or box_size.shape[0] != 2 or box_size.shape[1:] != heatmap.shape:
        raise ValueError(
            f"decode_boxes: box_size must be (2, h, w) for a {tuple(heatmap.shape)} heatmap, "
            f"got {tuple(box_size.shape)}"
        )
    scores, ys, xs = find_peaks(heatmap, k, threshold, kernel)
    h, w = heatmap.shape
    big_h, big_w = image_size
    if refine is None:
        cx, cy = xs.float() + 0.5, ys.float() + 0.5
    else:
        cx, cy = refine_subpixel(heatmap, ys, xs, method=refine)
    bw = box_size[0, ys, xs].float() * big_w
    bh = box_size[1, ys, xs].float() * big_h
    px, py = cx * (big_w / w), cy * (big_h / h)
    boxes = torch.stack([px - bw / 2, py - bh / 2, px + bw / 2, py + bh / 2], dim=-1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, big_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, big_h)
    return boxes, scores.float()

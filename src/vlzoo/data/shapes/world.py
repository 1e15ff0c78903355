"""The Shapes world: categories, colours, sizes, keypoints and a vectorised numpy rasteriser.

A scene is generated from one ``numpy.random.Generator`` (seeded by ``(seed, split, index)``), so
the same index always yields the same pixels, masks, boxes and keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SHAPES_CATEGORIES",
    "CATEGORY_NAMES",
    "CATEGORY_PLURALS",
    "COLOURS",
    "COLOUR_NAMES",
    "SIZE_NAMES",
    "KEYPOINT_NAMES",
    "SKELETON",
    "COMPOSITIONAL_HOLDOUT",
    "ShapeObject",
    "Scene",
    "generate_scene",
]

#: Category names; the category id is the index + 1 (0 is never used, as in COCO).
CATEGORY_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
CATEGORY_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
#: The same K = 5 named keypoints for every category: the extreme points of the shape and its
#: centre (for a triangle "bottom" is the middle of the base, "left"/"right" its base corners).
KEYPOINT_NAMES: tuple[str, ...] = ("top", "bottom", "left", "right", "centre")
#: 1-based pairs as in COCO ``skeleton``: the centre joined to each extreme point.
SKELETON: tuple[tuple[int, int], ...] = ((5, 1), (5, 2), (5, 3), (5, 4))

#: Stable category table, COCO style (``id``, ``name``, ``keypoints``, ``skeleton``).
SHAPES_CATEGORIES: list[dict] = [
    {
        "id": i + 1,
        "name": name,
        "supercategory": "shape",
        "keypoints": list(KEYPOINT_NAMES),
        "skeleton": [list(p) for p in SKELETON],
    }
    for i, name in enumerate(CATEGORY_NAMES)
]

COLOUR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
COLOURS = np.array(
    [[220, 40, 40], [40, 170, 60], [40, 80, 220], [235, 205, 30], [140, 60, 190], [245, 130, 20]],
    dtype=np.uint8,
)
SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
#: outer radius of each size class as a fraction of the image side
SIZE_FRACTIONS = (0.075, 0.11, 0.15)

#: CLEVR-CoGenT style held-out (category, colour) combinations: absent from every split when
#: ``compositional=True``, and the referred object of every ``comp_test`` sample.
COMPOSITIONAL_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("circle", "green"),
    ("square", "blue"),
    ("triangle", "red"),
    ("diamond", "yellow"),
    ("cross", "purple"),
)
_HOLDOUT_IDX = {(CATEGORY_NAMES.index(c), COLOUR_NAMES.index(k)) for c, k in COMPOSITIONAL_HOLDOUT}

_S3 = np.sqrt(3.0) / 2.0
_SQ = 0.7  # half side of a square relative to r (corners stay inside the bounding circle)
_CROSS_T = 0.3  # half width of a cross arm relative to r
# keypoint offsets (top, bottom, left, right, centre) in units of r, per category
_KP_OFFSETS = np.array(
    [
        [[0, -1], [0, 1], [-1, 0], [1, 0], [0, 0]],  # circle
        [[0, -_SQ], [0, _SQ], [-_SQ, 0], [_SQ, 0], [0, 0]],  # square
        [[0, -1], [0, 0.5], [-_S3, 0.5], [_S3, 0.5], [0, 0]],  # triangle
        [[0, -1], [0, 1], [-1, 0], [1, 0], [0, 0]],  # diamond
        [[0, -1], [0, 1], [-1, 0], [1, 0], [0, 0]],  # cross
    ],
    dtype=np.float64,
)
_KP_UNIT = _KP_OFFSETS / np.maximum(np.linalg.norm(_KP_OFFSETS, axis=2, keepdims=True), 1e-9)


def _shape_mask(category: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Exact inside test at pixel centres; ``dx`` (1, w) and ``dy`` (h, 1) broadcast."""
    if category == 0:
        return dx * dx + dy * dy <= r * r
    if category == 1:
        a = _SQ * r
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    if category == 2:
        return (dy <= 0.5 * r) & (dy >= -r + np.sqrt(3.0) * np.abs(dx))
    if category == 3:
        return np.abs(dx) + np.abs(dy) <= r
    t = _CROSS_T * r
    adx, ady = np.abs(dx), np.abs(dy)
    return ((adx <= r) & (ady <= t)) | ((ady <= r) & (adx <= t))


@dataclass
class ShapeObject:
    """One object of a scene (all geometry in pixels of the scene image)."""

    category: int  # 0-based index into CATEGORY_NAMES (category id = category + 1)
    colour: int
    size: int
    cx: float
    cy: float
    r: float
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 of the rasterised window
    amodal: np.ndarray | None = None  # bool mask of the full shape inside ``crop``
    box: np.ndarray = field(default_factory=lambda: np.zeros(4))  # visible xyxy
    area: int = 0  # visible pixels
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((5, 3)))

    @property
    def category_name(self) -> str:
        return CATEGORY_NAMES[self.category]

    @property
    def colour_name(self) -> str:
        return COLOUR_NAMES[self.colour]

    @property
    def size_name(self) -> str:
        return SIZE_NAMES[self.size]


@dataclass
class Scene:
    """A rasterised scene: image ``(3, H, W)`` uint8, ``owner`` map (-1 background, else the
    index of the object visible at that pixel) and the objects in drawing order."""

    image: np.ndarray
    owner: np.ndarray
    objects: list[ShapeObject]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.owner.shape[0]), int(self.owner.shape[1])

    def mask(self, i: int) -> np.ndarray:
        """Visible (modal) mask of object ``i``: exact, from the rasteriser."""
        return self.owner == i


def _rasterise(obj: ShapeObject, h: int, w: int) -> None:
    x0 = max(int(np.floor(obj.cx - obj.r)) - 1, 0)
    x1 = min(int(np.ceil(obj.cx + obj.r)) + 2, w)
    y0 = max(int(np.floor(obj.cy - obj.r)) - 1, 0)
    y1 = min(int(np.ceil(obj.cy + obj.r)) + 2, h)
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - obj.cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - obj.cy)[:, None]
    obj.crop = (x0, y0, x1, y1)
    obj.amodal = _shape_mask(obj.category, dx, dy, obj.r)


def generate_scene(
    rng: np.random.Generator,
    *,
    image_size: int,
    num_objects: tuple[int, int],
    occlusion: float,
    noise: float,
    texture: bool,
    twin_prob: float,
    exclude_holdout: bool,
    force_holdout: bool,
) -> Scene:
    """Sample and rasterise one scene.

    ``occlusion`` is the largest fraction of an object's area later objects may cover (0: no
    overlap).  ``twin_prob`` is the chance that an object copies the attributes of an earlier
    one, so that spatial expressions are needed.  ``force_holdout`` makes the first object a
    held-out combination (``comp_test``); ``exclude_holdout`` keeps held-out combinations out.
    """
    h = w = int(image_size)
    n_target = int(rng.integers(num_objects[0], num_objects[1] + 1))
    objects: list[ShapeObject] = []
    owner = np.full((h, w), -1, dtype=np.int16)
    holdout = sorted(_HOLDOUT_IDX)
    for j in range(n_target):
        if j == 0 and force_holdout:
            cat, col = holdout[int(rng.integers(len(holdout)))]
            size = int(rng.integers(3))
        elif objects and rng.random() < twin_prob:
            src = objects[int(rng.integers(len(objects)))]
            cat, col = src.category, src.colour
            size = src.size if rng.random() < 0.6 else int(rng.integers(3))
        else:
            cat = int(rng.integers(len(CATEGORY_NAMES)))
            col = int(rng.integers(len(COLOUR_NAMES)))
            if (exclude_holdout or force_holdout) and (cat, col) in _HOLDOUT_IDX:
                col = (col + 1) % len(COLOUR_NAMES)  # the held-out colour of a category is unique
            size = int(rng.integers(3))
        r = SIZE_FRACTIONS[size] * image_size
        placed = None
        tries = rng.uniform(r + 1, w - r - 1, size=(25, 2))
        for cx, cy in tries.tolist():
            ok = True
            for o in objects:
                d2 = (cx - o.cx) ** 2 + (cy - o.cy) ** 2
                need = (1.0 - occlusion) * 1.05 * (r + o.r) + 1.0
                if d2 < need * need:
                    ok = False
                    break
            if not ok:
                continue
            cand = ShapeObject(category=cat, colour=col, size=size, cx=cx, cy=cy, r=r)
            _rasterise(cand, h, w)
            if occlusion > 0 and objects and not _occlusion_ok(cand, objects, owner, occlusion):
                continue
            placed = cand
            break
        if placed is None:
            continue
        x0, y0, x1, y1 = placed.crop
        owner[y0:y1, x0:x1][placed.amodal] = len(objects)
        objects.append(placed)

    image = _background(rng, h, w, texture=texture)
    for i, o in enumerate(objects):
        x0, y0, x1, y1 = o.crop
        vis = owner[y0:y1, x0:x1] == i
        image[:, y0:y1, x0:x1][:, vis] = COLOURS[o.colour][:, None]
        rows = np.flatnonzero(vis.any(1))
        cols = np.flatnonzero(vis.any(0))
        o.area = int(vis.sum())
        o.box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float64)
        kp = np.empty((5, 3))
        kp[:, :2] = _KP_OFFSETS[o.category] * o.r + (o.cx, o.cy)
        # the pixel just inside each keypoint (1 px towards the centre; the offsets are unit
        # vectors except the centre's) decides visibility: 2 when no later object covers it,
        # 1 when one does (COCO: labelled but not visible)
        probe = kp[:, :2] - _KP_UNIT[o.category]
        px = np.minimum(np.maximum(probe[:, 0].astype(np.intp), 0), w - 1)
        py = np.minimum(np.maximum(probe[:, 1].astype(np.intp), 0), h - 1)
        kp[:, 2] = np.where(owner[py, px] > i, 1.0, 2.0)
        o.keypoints = kp
    if noise > 0:
        jitter = rng.normal(0.0, noise * 255.0, size=image.shape)
        image = np.clip(image.astype(np.float32) + jitter, 0, 255).astype(np.uint8)
    return Scene(image=image, owner=owner, objects=objects)


def _occlusion_ok(cand: ShapeObject, objects: list[ShapeObject], owner: np.ndarray, occlusion: float) -> bool:
    """Would every earlier object keep more than ``1 - occlusion`` of its area (and >= 6 px)?"""
    x0, y0, x1, y1 = cand.crop
    covered = owner[y0:y1, x0:x1][cand.amodal]
    for i, o in enumerate(objects):
        lost = int((covered == i).sum())
        if lost == 0:
            continue
        visible_now = int((owner == i).sum())
        full = int(o.amodal.sum())
        if visible_now - lost < max(6, (1.0 - occlusion) * full):
            return False
    return True


def _background(rng: np.random.Generator, h: int, w: int, *, texture: bool) -> np.ndarray:
    grey = int(rng.integers(110, 170))
    image = np.full((3, h, w), grey, dtype=np.uint8)
    if texture:
        # low-contrast oriented stripes, a different frequency and direction per image
        freq = rng.uniform(2.0, 6.0) / max(h, w)
        theta = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:h, 0:w]
        wave = np.sin(2 * np.pi * freq * (xs * np.cos(theta) + ys * np.sin(theta)))
        image = np.clip(grey + 18.0 * wave, 0, 255).astype(np.uint8)[None].repeat(3, 0)
    return image

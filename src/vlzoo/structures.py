"""Typed containers shared by every layer: what a dataset yields, what a batch carries, what a
paradigm predicts.  Imported by everything, imports nothing from vlzoo.

Units (the data contract of docs/architecture.md):

* boxes are ``xyxy`` floats in absolute pixels of the image the container describes;
* masks are boolean ``(N, H, W)`` tensors at that image's size (COCO RLE only at file boundaries);
* keypoints are ``(N, K, 3)``: x, y, visibility (0 absent, 1 occluded, 2 visible) as in COCO.

A :class:`Sample` and ``Batch.original_targets`` are in original-image pixels; ``Batch.targets``
and a paradigm's :class:`Predictions` are in the pixels of the network input (after resize and
pad); :class:`ImageTransform` maps between the two.

The *query* - what the instruction refers to - is typed too: ``category_id`` / ``category_name``
(the category a det / seg / pose instruction names), ``prompt_boxes`` (boxes the prompt refers
to, e.g. the region of a REG sample; original pixels on a :class:`Sample`, input pixels on a
:class:`Batch`) and ``expression_kind`` (what kind of referring expression a rec / res / reg
prompt is).  A paradigm reads the query and never the targets at predict time; ``meta`` holds
free-form extras that no paradigm or evaluator reads (:data:`QUERY_META_KEYS` are refused there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "answer_order",
    "mask_to_polygon",
    "polygon_to_mask",
    "TASKS",
    "LOCALIZATION_TASKS",
    "GENERALIZED_TASKS",
    "EXPRESSION_KINDS",
    "CATEGORY_TASKS",
    "QUERY_META_KEYS",
    "Targets",
    "Predictions",
    "ImageTransform",
    "Sample",
    "Batch",
    "AudioClip",
    "References",
    "REFERENCE_START",
    "REFERENCE_END",
    "REFERENCE_TOKENS",
    "reference_text",
]

#: Every task name vlzoo knows.  ``rec`` referring expression -> box, ``res`` expression -> mask,
#: ``det`` category -> all boxes, ``seg`` category -> all instance masks, ``pose`` category ->
#: keypoints per instance, ``reg`` box -> expression, ``caption`` / ``vqa`` text only, and the
#: generalized referring tasks ``grec`` expression -> the set of its referents' boxes, ``gres``
#: expression -> their masks (gRefCOCO: zero, one or several referents).
TASKS = ("rec", "res", "det", "seg", "pose", "reg", "caption", "vqa", "grec", "gres")
LOCALIZATION_TASKS = ("rec", "res", "det", "seg", "pose", "grec", "gres")
#: Referring tasks whose ground truth is a *set*: ``Targets`` with N = 0 (a no-target expression,
#: "the purple cross" when there is none), 1 or several boxes (``grec``) / masks (``gres``);
#: scored by the generalized metrics (:mod:`vlzoo.evaluation.generalized`).
GENERALIZED_TASKS = ("grec", "gres")
#: Kinds of referring expression that referring scores are broken down by (``Targets.expression_kinds``):
#: attributes only ("the small red circle"), an ordinal ("the second circle from the left", "the
#: leftmost square"), a superlative ("the largest circle") or a relation to another object ("the
#: cross left of the blue circle").  The Shapes programs have exactly these kinds.
EXPRESSION_KINDS = ("attribute", "ordinal", "superlative", "relation")
#: Tasks whose instruction names a category (``Sample.category_id`` / ``category_name``); their
#: predictions are labelled with that category's id.
CATEGORY_TASKS = ("det", "seg", "pose")
#: ``meta`` keys that used to carry the query; a ``Sample`` whose ``meta`` holds one of them is
#: refused by the collate (the typed field named in the value is the place for it).
QUERY_META_KEYS = {
    "category": "category_name",
    "category_id": "category_id",
    "prompt_boxes": "prompt_boxes",
    "expression_kind": "expression_kind",
    "reference_audio": "reference_audio",
}


def _empty_boxes() -> Tensor:
    return torch.zeros((0, 4), dtype=torch.float32)


def _empty_long() -> Tensor:
    return torch.zeros((0,), dtype=torch.long)


@dataclass
class Targets:
    """What one sample asks the model to produce (only the objects the task refers to).

    For ``rec``/``res`` that is the one referred object; for ``grec``/``gres`` the set of
    referents (possibly none); for ``det``/``seg``/``pose`` every
    instance of the named category; for ``reg`` the region whose expression is the answer text.
    """

    boxes: Tensor = field(default_factory=_empty_boxes)  # (N, 4) float xyxy
    labels: Tensor = field(default_factory=_empty_long)  # (N,) category ids
    masks: Tensor | None = None  # (N, H, W) bool
    keypoints: Tensor | None = None  # (N, K, 3) float
    iscrowd: Tensor | None = None  # (N,) bool; crowd regions are ignored by COCO matching
    areas: Tensor | None = None  # (N,) float; COCO "area" (mask area); used for OKS scale
    expressions: list[str] = field(default_factory=list)  # referring expression(s) of the sample
    #: the kind (one of EXPRESSION_KINDS) of each expression, parallel to ``expressions``; empty
    #: when the dataset does not say (RefCOCO).  Evaluation only: methods never read targets
    #: (the query's kind is ``Sample.expression_kind``; the collate fills this from it).
    expression_kinds: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # one region caption per box (REG)
    text: str | None = None  # reference answer text (caption / vqa / reg)
    image_id: int = 0
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the image these units refer to

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def replace(self, **changes: Any) -> Targets:
        return replace(self, **changes)


@dataclass
class Predictions:
    """What a paradigm produced for one sample, in the same units as the Targets it answers."""

    boxes: Tensor = field(default_factory=_empty_boxes)  # (N, 4) float xyxy
    scores: Tensor = field(default_factory=lambda: torch.zeros((0,), dtype=torch.float32))
    labels: Tensor = field(default_factory=_empty_long)
    masks: Tensor | None = None  # (N, H, W) bool
    mask_scores: Tensor | None = None  # (N,) optional mask quality scores
    keypoints: Tensor | None = None  # (N, K, 3): x, y, score/visibility
    text: str | None = None  # generated answer text, if the paradigm generates
    parsed: bool = True  # False when generated text could not be parsed into an output
    image_id: int = 0
    image_size: tuple[int, int] = (0, 0)
    #: paradigm-specific evidence for overlays (e.g. ``heatmap`` (h, w) in [0, 1],
    #: ``points`` (P, 2) input-frame pixels, ``attention`` (h, w)).
    evidence: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def replace(self, **changes: Any) -> Predictions:
        return replace(self, **changes)


@dataclass(frozen=True)
class ImageTransform:
    """The geometric map original image -> network input: scale then pad (right/bottom) or
    pad-to-square then scale.  Represented as ``input = original * scale + offset``.

    ``original_size`` and ``input_size`` are ``(H, W)``.
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    scale: tuple[float, float]  # (sx, sy)
    offset: tuple[float, float] = (0.0, 0.0)  # (ox, oy), in input pixels

    # --- forward (original -> input) -------------------------------------------------------
    def boxes_to_input(self, boxes: Tensor) -> Tensor:
        return self._affine_boxes(boxes, self.scale, self.offset)

    def points_to_input(self, points: Tensor) -> Tensor:
        return self._affine_points(points, self.scale, self.offset)

    # --- inverse (input -> original) -------------------------------------------------------
    def boxes_to_original(self, boxes: Tensor) -> Tensor:
        sx, sy = self.scale
        ox, oy = self.offset
        out = self._affine_boxes(boxes, (1.0 / sx, 1.0 / sy), (-ox / sx, -oy / sy))
        h, w = self.original_size
        if out.numel():
            out[:, 0::2] = out[:, 0::2].clamp(0, w)
            out[:, 1::2] = out[:, 1::2].clamp(0, h)
        return out

    def points_to_original(self, points: Tensor) -> Tensor:
        sx, sy = self.scale
        ox, oy = self.offset
        return self._affine_points(points, (1.0 / sx, 1.0 / sy), (-ox / sx, -oy / sy))

    def masks_to_original(self, masks: Tensor) -> Tensor:
        """(N, Hin, Win) bool/float at input size -> (N, H, W) bool at original size."""
        h, w = self.original_size
        if masks.shape[0] == 0:
            return torch.zeros((0, h, w), dtype=torch.bool)
        sx, sy = self.scale
        ox, oy = self.offset
        # the region of the input that holds the (scaled) original image
        x0, y0 = int(round(ox)), int(round(oy))
        x1 = int(round(ox + w * sx))
        y1 = int(round(oy + h * sy))
        crop = masks[:, y0:y1, x0:x1].float().unsqueeze(1)
        out = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        return out.squeeze(1) > 0.5

    @staticmethod
    def _affine_boxes(boxes: Tensor, scale: tuple[float, float], offset: tuple[float, float]) -> Tensor:
        out = boxes.clone().float()
        if out.numel() == 0:
            return out
        out[:, 0::2] = out[:, 0::2] * scale[0] + offset[0]
        out[:, 1::2] = out[:, 1::2] * scale[1] + offset[1]
        return out

    @staticmethod
    def _affine_points(points: Tensor, scale: tuple[float, float], offset: tuple[float, float]) -> Tensor:
        """points (..., >=2): only x, y (the first two channels) are mapped."""
        out = points.clone().float()
        if out.numel() == 0:
            return out
        out[..., 0] = out[..., 0] * scale[0] + offset[0]
        out[..., 1] = out[..., 1] * scale[1] + offset[1]
        return out


#: AnyRef's reference span: ``<ref_start>`` + k placeholder tokens + ``<ref_end>``; the backbone's
#: :class:`~vlzoo.backbones.ReferenceEncoder` puts k embedding tokens at the placeholders.  One
#: placeholder token per modality, so a prompt may mix a crop and a clip.
REFERENCE_START = "<ref_start>"
REFERENCE_END = "<ref_end>"
REFERENCE_TOKENS: dict[str, str] = {"crop": "<ref>", "box": "<ref_box>", "audio": "<ref_audio>"}


def reference_text(modality: str, tokens: int) -> str:
    """The prompt text of one reference: ``<ref_start>`` + ``tokens`` placeholders + ``<ref_end>``."""
    if modality not in REFERENCE_TOKENS:
        raise ValueError(f"unknown reference modality {modality!r}; choose one of {sorted(REFERENCE_TOKENS)}")
    if tokens < 1:
        raise ValueError(f"a reference needs >= 1 token, got {tokens}")
    return REFERENCE_START + REFERENCE_TOKENS[modality] * int(tokens) + REFERENCE_END


@dataclass
class AudioClip:
    """A mono waveform (``(S,)`` float in [-1, 1]) and its sample rate: a spoken reference."""

    waveform: Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        wave = torch.as_tensor(self.waveform, dtype=torch.float32)
        if wave.dim() != 1 or wave.numel() == 0:
            raise ValueError(f"AudioClip: expected a non-empty mono waveform (S,), got shape {tuple(wave.shape)}")
        if int(self.sample_rate) <= 0:
            raise ValueError(f"AudioClip: sample_rate must be > 0, got {self.sample_rate}")
        self.waveform = wave
        self.sample_rate = int(self.sample_rate)

    @property
    def seconds(self) -> float:
        return self.waveform.numel() / self.sample_rate


@dataclass
class References:
    """What a backbone's reference encoder reads for a batch, one entry per row: the prompt boxes
    (input pixels; crop and box references, one per reference in prompt order) and the spoken
    reference (``None`` for a row without one)."""

    prompt_boxes: list[Tensor]
    audio: list[AudioClip | None]


@dataclass
class Sample:
    """One dataset item: an image, a task, its instruction, its query and its targets (original
    pixels).

    ``answer`` is the reference answer text for text tasks (caption, vqa, reg); for localization
    tasks it is ``None`` and the paradigm's :class:`AnswerFormat` writes the answer.

    The query fields say what the instruction refers to; a paradigm may read them (and the
    prompt) at predict time, never ``targets``:

    * ``category_id`` / ``category_name``: the category a det / seg / pose instruction names
      (the id is the one ``targets.labels`` use; predictions are labelled with it);
    * ``prompt_boxes``: ``(N, 4)`` float ``xyxy`` boxes in *original* pixels that the prompt
      refers to, one per ``{box}`` placeholder in order (REG's region);
    * ``expression_kind``: the kind (:data:`EXPRESSION_KINDS`) of a referring expression, when
      the dataset knows it (Shapes);
    * ``reference_audio``: a spoken reference (:class:`AudioClip`), written in the prompt as
      :func:`reference_text` ``("audio", k)`` (Spoken Shapes).
    """

    image: Tensor  # (3, H, W) uint8
    task: str
    prompt: str  # the instruction (without the image placeholder)
    targets: Targets
    answer: str | None = None
    image_id: int = 0
    category_id: int | None = None
    category_name: str | None = None
    prompt_boxes: Tensor = field(default_factory=_empty_boxes)  # (N, 4) float xyxy, original pixels
    expression_kind: str | None = None
    reference_audio: AudioClip | None = None
    #: free-form extras no paradigm or evaluator reads (``object_ids``, ``ref``, ``file_name`` ...);
    #: the query keys of :data:`QUERY_META_KEYS` are refused here
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        boxes = torch.as_tensor(self.prompt_boxes, dtype=torch.float32)
        self.prompt_boxes = boxes.reshape(-1, 4) if boxes.numel() else _empty_boxes()


@dataclass
class Batch:
    """A collated batch.  Built by the datamodule's collate; read by paradigms and evaluators."""

    images: Tensor  # (B, 3, S, S) float, normalised for the vision backbone
    input_ids: Tensor  # (B, L) prompt + answer, right-padded
    attention_mask: Tensor  # (B, L)
    labels: Tensor  # (B, L) answer tokens, -100 elsewhere (prompt, image placeholder, padding)
    prompt_ids: Tensor  # (B, Lp) prompt only, LEFT-padded, for generation
    prompt_attention_mask: Tensor  # (B, Lp)
    tasks: list[str]
    prompts: list[str]
    answers: list[str]
    targets: list[Targets]  # in network-input pixels; training and evaluation only
    original_targets: list[Targets]  # in original pixels, for evaluation
    transforms: list[ImageTransform]
    image_ids: list[int]
    # --- the query (see Sample), one entry per sample: what predict may read besides the prompt
    category_ids: list[int | None] = field(default_factory=list)
    category_names: list[str | None] = field(default_factory=list)
    prompt_boxes: list[Tensor] = field(default_factory=list)  # (N_i, 4) xyxy, network-input pixels
    expression_kinds: list[str | None] = field(default_factory=list)
    reference_audio: list[AudioClip | None] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)  # free-form extras, read by no method
    raw_images: list[Tensor] | None = None  # original uint8 images, kept for overlays when asked

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def category_id(self, index: int) -> int:
        """The id of the category sample ``index``'s instruction names (its predictions' label).

        ``ValueError`` when the batch does not carry one: a det / seg / pose sample whose dataset
        left ``Sample.category_id`` unset."""
        value = self.category_ids[index] if index < len(self.category_ids) else None
        if value is None:
            raise ValueError(
                f"sample {self.image_ids[index]} ({self.tasks[index]}): the query names no category id, so its "
                "detections cannot be labelled; the dataset must set Sample.category_id (the id its "
                "targets' labels use) for det / seg / pose samples"
            )
        return int(value)

    def references(self) -> References:
        """The rows' references for the backbone (prompt boxes and spoken clips)."""
        audio = list(self.reference_audio) + [None] * (len(self) - len(self.reference_audio))
        boxes = list(self.prompt_boxes) + [torch.zeros(0, 4)] * (len(self) - len(self.prompt_boxes))
        return References(prompt_boxes=boxes, audio=audio)

    def to(self, device: torch.device | str) -> Batch:
        """Move tensors (not targets: they stay on CPU for evaluation) to ``device``."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device)
        return replace(self, **changes)

    def targets_to(self, device: torch.device | str) -> list[Targets]:
        out = []
        for t in self.targets:
            kw = {}
            for f in fields(t):
                value = getattr(t, f.name)
                if isinstance(value, Tensor):
                    kw[f.name] = value.to(device)
            out.append(replace(t, **kw))
        return out

    def select(self, indices: list[int]) -> Batch:
        """A sub-batch (e.g. the samples of one task)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list) and len(value) == len(self):
                changes[f.name] = [value[i] for i in indices]
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------- geometry
# Shared by every paradigm that writes several objects or a polygon into an answer: one order
# and one polygon convention, so two paradigms compared on det / res differ in the paradigm only.


def answer_order(boxes: Tensor, *, limit: int | None = None) -> list[int]:
    """The order in which the objects of a multi-object answer are written: raster order of the
    boxes' top-left corners (by ``y1``, then ``x1``, then index; rounded to 1e-3 px so that float
    noise from a transform does not reorder objects).  ``limit`` keeps the first ones.

    One order for every paradigm: the pixel2seq answers (boxes, keypoints of each instance) and
    the pixel2emb triggers (one per object, matched to the targets in this order) alike."""
    keys = [(round(float(b[1]), 3), round(float(b[0]), 3), i) for i, b in enumerate(boxes)]
    order = [i for _, _, i in sorted(keys)]
    return order if limit is None else order[:limit]


def mask_to_polygon(mask: Tensor, *, vertices: int = 16) -> Tensor:
    """A star polygon ``(vertices, 2)`` (xy pixels) around a boolean ``(H, W)`` mask.

    Vertex ``j`` lies on the ray from the mask centroid at angle ``2 pi j / vertices`` (clockwise
    from the top, in image coordinates), at the outer edge of the farthest mask pixel of that
    angular sector.  Exact for star-shaped masks (every Shapes object); a fixed vertex count
    keeps answers one length, which is easier to learn and to constrain.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask_to_polygon: expected an (H, W) mask, got shape {tuple(mask.shape)}")
    if vertices < 3:
        raise ValueError(f"mask_to_polygon: a polygon needs >= 3 vertices, got {vertices}")
    ys, xs = torch.nonzero(mask.bool(), as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("mask_to_polygon: the mask is empty")
    px, py = xs.double() + 0.5, ys.double() + 0.5
    cx, cy = px.mean(), py.mean()
    dx, dy = px - cx, py - cy
    # angle measured clockwise from "up" (y grows downwards)
    angle = torch.atan2(dx, -dy) % (2 * math.pi)
    sector = ((angle / (2 * math.pi) * vertices + 0.5).floor().long()) % vertices
    radius = torch.sqrt(dx * dx + dy * dy) + 0.5 * math.sqrt(2.0)
    r = torch.zeros(vertices, dtype=torch.float64).scatter_reduce(0, sector, radius, reduce="amax")
    theta = torch.arange(vertices, dtype=torch.float64) * (2 * math.pi / vertices)
    h, w = mask.shape
    x = (cx + r * torch.sin(theta)).clamp(0, w)
    y = (cy - r * torch.cos(theta)).clamp(0, h)
    return torch.stack([x, y], 1).float()


def polygon_to_mask(polygon: Tensor, size: tuple[int, int]) -> Tensor:
    """Rasterise a polygon ``(P, 2)`` (xy pixels) to a boolean ``(H, W)`` mask (even-odd rule at
    pixel centres)."""
    h, w = (int(v) for v in size)
    poly = torch.as_tensor(polygon, dtype=torch.float64).reshape(-1, 2)
    if poly.shape[0] < 3:
        return torch.zeros((h, w), dtype=torch.bool)
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = poly.roll(-1, 0)[:, 0], poly.roll(-1, 0)[:, 1]
    crosses = (y0 > ys) != (y1 > ys)  # (H, P): edge p crosses the centre line of row h
    denom = torch.where(y1 == y0, torch.full_like(y1, 1e-12), y1 - y0)
    x_at = x0 + (ys - y0) * (x1 - x0) / denom  # (H, P): where it crosses
    # a pixel centre x is inside when an odd number of crossings lie to its right (x < x_at):
    # crossing p of row h counts for the first ``number of centres < x_at`` pixels of the row, so
    # one scan line of +1 / -1 steps and a cumulative sum give every count in O(H * (W + P))
    first_outside = torch.searchsorted(xs, x_at.contiguous(), side="left")  # (H, P) in 0..W
    steps = torch.zeros((h, w + 1), dtype=torch.long)
    steps[:, 0] = crosses.sum(1)
    steps.scatter_add_(1, first_outside, -crosses.long())
    return (steps.cumsum(1)[:, :w] % 2) == 1

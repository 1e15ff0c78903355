"""Coordinate codecs: how a model family writes boxes and points as text.

Each codec follows one family's published convention exactly, so a vlzoo answer is the text that
family's model reads and writes.  Where transformers ships the family's reference code the codec
is tested against it on thousands of random boxes at several image sizes: Florence-2
(``Florence2PostProcessor`` quantize / dequantize / grounding parser: identical bins and pixels)
and Kosmos-2 (``coordinate_to_patch_index`` / ``patch_index_to_coordinate`` and its text parsers).
transformers ships PaliGemma's location-token names only (checked; the binning follows
big_vision) and nothing for Pix2Seq, Shikra or Qwen2-VL / Qwen2.5-VL (round trips only):

=============  ==================================================================  ============
codec          one box (image ``W x H``)                                            bins
=============  ==================================================================  ============
``bins``       ``<bin_x1><bin_y1><bin_x2><bin_y2>`` (Pix2Seq / Shikra token         ``N`` per
               variant; ``y_first`` gives Pix2Seq's ymin, xmin, ymax, xmax)         axis
``kosmos2``    ``<object><patch_index_UL><patch_index_LR></object>``, boxes of one  32 x 32
               object joined by ``</delimiter_of_multi_objects/>``                  patches
``florence2``  ``<loc_x1><loc_y1><loc_x2><loc_y2>``                                 1000
``paligemma``  ``<locY1><locX1><locY2><locX2>`` (4 digits), objects joined " ; "     1024
``qwen2vl``    ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``, integers in 0..1000     1000
``qwen2.5vl``  the same tokens with absolute pixels of the (resized) input image    pixels
``shikra``     ``[x1,y1,x2,y2]``, 3 decimals of the box normalised to the           text
               pad-to-square image; several boxes ``[b1;b2]``
=============  ==================================================================  ============

``encode(boxes, image_size)`` takes ``(N, 4)`` xyxy pixels and ``image_size = (H, W)``;
``decode(text, image_size)`` returns every box it finds, ``(N, 4)`` pixels, and raises
:class:`CodecError` on malformed text.  Points (keypoints, polygon vertices) use the same
quantisation: ``encode_points`` / ``decode_points`` on ``(P, 2)`` xy pixels.

For constrained generation a codec also describes its answers as regular grammars over a
*normalised* text: whitespace removed, each coordinate token replaced by :data:`COORD` and each
structural special token (``<object>``, ``<|box_start|>`` ...) by a private character of its own,
so a grammar cannot be satisfied by spelling ``<object>`` out of ``<``, ``object``, ``>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "CODECS",
    "COORD",
    "PHRASE",
    "BinsCodec",
    "CodecError",
    "CoordinateCodec",
    "Florence2Codec",
    "Kosmos2Codec",
    "PaliGemmaCodec",
    "Qwen25VLCodec",
    "Qwen2VLCodec",
    "ShikraCodec",
    "make_codec",
]

#: the normalised character every coordinate token of a token codec stands for
COORD = "\x01"
#: grammar of a phrase (referring expression / label) in normalised text: no markup characters
PHRASE = r"[^<>\[\]();\x01\ue000-\ue0ff]+"


class CodecError(ValueError):
    """Generated text does not hold the coordinates the codec expects (a parse failure)."""


def _as_boxes(boxes: Tensor | Sequence[Sequence[float]], *, keep_dtype: bool = False) -> Tensor:
    """``(N, 4)`` boxes in float64, or in their own floating dtype with ``keep_dtype``."""
    if keep_dtype and isinstance(boxes, Tensor) and boxes.is_floating_point():
        return boxes.detach().cpu().reshape(-1, 4)
    return torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)


def _as_points(points: Tensor | Sequence[Sequence[float]], *, keep_dtype: bool = False) -> Tensor:
    """``(P, 2)`` points in float64, or in their own floating dtype with ``keep_dtype``."""
    if keep_dtype and isinstance(points, Tensor) and points.is_floating_point():
        return points.detach().cpu().reshape(-1, 2)
    return torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)


def _check_size(image_size: tuple[int, int]) -> tuple[float, float]:
    h, w = (float(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    return h, w


def _rep(pattern: str, min_count: int, max_count: int | None) -> str:
    """``pattern`` repeated ``min_count`` .. ``max_count`` times (``None``: unbounded)."""
    hi = "" if max_count is None else str(max_count)
    return f"(?:{pattern}){{{min_count},{hi}}}"


def _joined(pattern: str, sep: str, min_count: int, max_count: int | None) -> str:
    """``pattern (sep pattern)*`` with a count between ``min_count`` (>= 1) and ``max_count``."""
    if min_count < 1:
        raise ValueError("a joined list has at least one element")
    rest_hi = None if max_count is None else max_count - 1
    return f"(?:{pattern}){_rep(sep + pattern, min_count - 1, rest_hi)}"


class CoordinateCodec:
    """Base class: the family-independent parts (grammar symbols, point/box conversions).

    Subclasses define ``name``, the token tables and the six format methods.  A codec is small
    and picklable (it travels with the answer format to dataloader workers).
    """

    name: ClassVar[str] = "codec"
    #: how many coordinate tokens one box uses (``None`` for plain-text codecs); used to give
    #: each decoded box the mean probability of its own tokens
    tokens_per_box: ClassVar[int | None] = None
    #: text between two objects written as separate groups (paligemma: " ; ")
    separator: ClassVar[str] = ""

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def coordinate_tokens(self) -> tuple[str, ...]:
        """Tokens that stand for a quantised coordinate (normalised to :data:`COORD`)."""
        return ()

    @property
    def structure_tokens(self) -> tuple[str, ...]:
        """Markup special tokens (each normalised to its own private character)."""
        return ()

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every token the backbone must have in its vocabulary for this codec."""
        return self.structure_tokens + self.coordinate_tokens

    def sym(self, token: str) -> str:
        """The regex for structural token ``token`` in normalised text."""
        return re.escape(chr(0xE000 + self.structure_tokens.index(token)))

    def normalise_token(self, token: str) -> str | None:
        """Normalised form of a special token of this codec, ``None`` for other tokens."""
        if token in self._coordinate_set:
            return COORD
        if token in self.structure_tokens:
            return chr(0xE000 + self.structure_tokens.index(token))
        return None

    @property
    def _coordinate_set(self) -> frozenset[str]:
        cached = self.__dict__.get("_coord_cache")
        if cached is None:
            cached = frozenset(self.coordinate_tokens)
            self.__dict__["_coord_cache"] = cached
        return cached

    # --- format (overridden) ------------------------------------------------------------------
    def encode(
        self,
        boxes: Tensor | Sequence[Sequence[float]],
        image_size: tuple[int, int],
        *,
        phrase: str | None = None,
    ) -> str:
        """Boxes of one object (``(N, 4)`` xyxy pixels) as the family writes them."""
        raise TypeError(f"{type(self).__name__} does not define encode")

    def decode(self, text: str, image_size: tuple[int, int]) -> Tensor:
        """Every box in ``text`` as ``(N, 4)`` xyxy pixels (float32)."""
        raise TypeError(f"{type(self).__name__} does not define decode")

    def encode_points(self, points: Tensor | Sequence[Sequence[float]], image_size: tuple[int, int]) -> str:
        """Points (``(P, 2)`` xy pixels) of one object, e.g. keypoints or polygon vertices."""
        raise TypeError(f"{type(self).__name__} does not define encode_points")

    def decode_points(self, text: str, image_size: tuple[int, int]) -> Tensor:
        """Every point in ``text`` as ``(P, 2)`` xy pixels (float32)."""
        raise TypeError(f"{type(self).__name__} does not define decode_points")

    def boxes_grammar(self, min_count: int = 1, max_count: int | None = None, *, phrase: bool = False) -> str:
        """Regex (normalised text) of one :meth:`encode` output with that many boxes."""
        raise TypeError(f"{type(self).__name__} does not define boxes_grammar")

    def points_grammar(self, min_count: int = 1, max_count: int | None = None) -> str:
        """Regex (normalised text) of one :meth:`encode_points` output with that many points."""
        raise TypeError(f"{type(self).__name__} does not define points_grammar")

    def separator_grammar(self) -> str:
        return re.escape("".join(self.separator.split()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------- tokens
class _TokenCodec(CoordinateCodec):
    """Codecs whose coordinates are one vocabulary token per value on each axis."""

    tokens_per_box: ClassVar[int | None] = 4
    bins: int = 1000
    y_first: bool = False
    #: quantize in the dtype of the given boxes (the family's reference does) instead of float64
    keeps_dtype: ClassVar[bool] = False
    _pattern: ClassVar[re.Pattern[str]]

    def token(self, k: int) -> str:
        raise TypeError(f"{type(self).__name__} does not define token")

    @property
    def coordinate_tokens(self) -> tuple[str, ...]:
        return tuple(self.token(k) for k in range(self.bins))

    def quantize(self, values: Tensor, size: float) -> Tensor:
        raise TypeError(f"{type(self).__name__} does not define quantize")

    def dequantize(self, bins: Tensor, size: float) -> Tensor:
        raise TypeError(f"{type(self).__name__} does not define dequantize")

    def _quantize_xy(self, xy: Tensor, image_size: tuple[int, int]) -> Tensor:
        h, w = _check_size(image_size)
        return torch.stack([self.quantize(xy[:, 0], w), self.quantize(xy[:, 1], h)], 1)

    def _pairs_text(self, xy: Tensor, image_size: tuple[int, int]) -> str:
        q = self._quantize_xy(xy, image_size)
        if self.y_first:
            q = q.flip(1)
        return "".join(self.token(int(k)) for k in q.reshape(-1).tolist())

    def _values(self, text: str) -> list[int]:
        values = [int(m) for m in self._pattern.findall(text)]
        bad = [v for v in values if not 0 <= v < self.bins]
        if bad:
            raise CodecError(f"{self.name}: coordinate token(s) {bad} out of range 0..{self.bins - 1}")
        return values

    def _xy_from_values(self, values: list[int], image_size: tuple[int, int]) -> Tensor:
        h, w = _check_size(image_size)
        q = torch.tensor(values, dtype=torch.float64).reshape(-1, 2)
        if self.y_first:
            q = q.flip(1)
        return torch.stack([self.dequantize(q[:, 0], w), self.dequantize(q[:, 1], h)], 1).float()

    def encode(self, boxes, image_size, *, phrase=None):  # type: ignore[override]
        b = _as_boxes(boxes, keep_dtype=self.keeps_dtype)
        text = self._pairs_text(b.reshape(-1, 2), image_size)
        return (phrase or "") + text

    def decode(self, text, image_size):  # type: ignore[override]
        values = self._values(text)
        if not values or len(values) % 4:
            raise CodecError(f"{self.name}: expected a multiple of 4 coordinate tokens, found {len(values)}")
        return self._xy_from_values(values, image_size).reshape(-1, 4)

    def encode_points(self, points, image_size):  # type: ignore[override]
        return self._pairs_text(_as_points(points, keep_dtype=self.keeps_dtype), image_size)

    def decode_points(self, text, image_size):  # type: ignore[override]
        values = self._values(text)
        if not values or len(values) % 2:
            raise CodecError(
                f"{self.name}: expected an even number of coordinate tokens, found {len(values)}"
            )
        return self._xy_from_values(values, image_size)

    def boxes_grammar(self, min_count=1, max_count=None, *, phrase=False):  # type: ignore[override]
        body = _rep(re.escape(COORD) + "{4}", min_count, max_count)
        return (PHRASE + body) if phrase else body

    def points_grammar(self, min_count=1, max_count=None):  # type: ignore[override]
        return _rep(re.escape(COORD) + "{2}", min_count, max_count)


class BinsCodec(_TokenCodec):
    """``<bin_k>``: ``bins`` uniform bins per axis as new vocabulary tokens (Pix2Seq).

    Quantisation as Pix2Seq: ``k = round(v / size * (bins - 1))``, ``v = k / (bins - 1) * size``,
    so the image borders are exact bins.  ``y_first`` writes ``ymin, xmin, ymax, xmax`` as Pix2Seq
    does; the default x-first order is the Shikra token variant.
    """

    name: ClassVar[str] = "bins"
    _pattern: ClassVar[re.Pattern[str]] = re.compile(r"<bin_(\d+)>")

    def __init__(self, *, bins: int = 64, y_first: bool = False) -> None:
        if bins < 2:
            raise ValueError(f"BinsCodec: bins must be >= 2, got {bins}")
        self.bins = int(bins)
        self.y_first = bool(y_first)

    def token(self, k: int) -> str:
        return f"<bin_{k}>"

    def quantize(self, values: Tensor, size: float) -> Tensor:
        return (values / size * (self.bins - 1)).round().clamp(0, self.bins - 1).long()

    def dequantize(self, bins: Tensor, size: float) -> Tensor:
        return bins.double() / (self.bins - 1) * size

    def __repr__(self) -> str:
        return f"BinsCodec(bins={self.bins}, y_first={self.y_first})"


class Florence2Codec(_TokenCodec):
    """Florence-2 ``<loc_k>``: 1000 bins per axis, x first.

    Exactly ``transformers``' ``Florence2PostProcessor``: ``k = clamp(floor(v / (size / 1000)),
    0, 999)`` in the dtype of the boxes given (float32 boxes are quantized in float32, as there),
    and ``decode`` gives the bin centre ``(k + 0.5) * size / 1000`` computed in float32 and
    truncated to a whole pixel, as its post-processor returns it.  ``whole_pixels=False`` keeps
    the float64 bin centre instead (half a bin closer on average; vlzoo's own figures do not need
    it).  Detection joins boxes without separators; a phrase (phrase grounding) comes before its
    boxes.  ``tests/paradigms/test_codecs.py`` checks both directions against the post-processor
    on random boxes at several image sizes.
    """

    name: ClassVar[str] = "florence2"
    bins: int = 1000
    keeps_dtype: ClassVar[bool] = True
    _pattern: ClassVar[re.Pattern[str]] = re.compile(r"<loc_(\d+)>")

    def __init__(self, *, whole_pixels: bool = True) -> None:
        self.whole_pixels = bool(whole_pixels)

    def token(self, k: int) -> str:
        return f"<loc_{k}>"

    def quantize(self, values: Tensor, size: float) -> Tensor:
        per_bin = size / self.bins
        return (values / per_bin).floor().clamp(0, self.bins - 1).long()

    def dequantize(self, bins: Tensor, size: float) -> Tensor:
        per_bin = size / self.bins
        if self.whole_pixels:
            # transformers: int64 bins + 0.5 is a float32 tensor, times the Python float, then .int()
            return ((bins.long() + 0.5) * per_bin).int().double()
        return (bins.double() + 0.5) * per_bin

    def __repr__(self) -> str:
        return f"Florence2Codec(whole_pixels={self.whole_pixels})"


class PaliGemmaCodec(_TokenCodec):
    """PaliGemma ``<loc0000>`` ... ``<loc1023>``: 1024 bins, y first (ymin, xmin, ymax, xmax).

    ``k = clip(round(v / size * 1023), 0, 1023)`` as big_vision's RefCOCO preprocessing, decoded
    with its inverse ``v = k / 1023 * size``.  Objects are joined by ``" ; "``; a label follows the
    four tokens of its box (``<loc..>x4 red circle``).
    """

    name: ClassVar[str] = "paligemma"
    bins: int = 1024
    y_first: bool = True
    separator: ClassVar[str] = " ; "
    _pattern: ClassVar[re.Pattern[str]] = re.compile(r"<loc(\d{4})>")

    def token(self, k: int) -> str:
        return f"<loc{k:04d}>"

    def quantize(self, values: Tensor, size: float) -> Tensor:
        return (values / size * (self.bins - 1)).round().clamp(0, self.bins - 1).long()

    def dequantize(self, bins: Tensor, size: float) -> Tensor:
        return bins.double() / (self.bins - 1) * size

    def encode(self, boxes, image_size, *, phrase=None):  # type: ignore[override]
        b = _as_boxes(boxes)
        label = f" {phrase}" if phrase else ""
        return self.separator.join(self._pairs_text(box.reshape(2, 2), image_size) + label for box in b)

    def boxes_grammar(self, min_count=1, max_count=None, *, phrase=False):  # type: ignore[override]
        one = re.escape(COORD) + "{4}" + (PHRASE if phrase else "")
        return _joined(one, self.separator_grammar(), min_count, max_count)


#: how close (in patches) a corner must be to a patch edge to count as on it: a box that went
#: through a resized frame in float32 (a 640 px edge at 20 px is 7.000001 px of a 224 px input)
#: lands on the patch the original pixels give; 1e-5 patch is 2e-4 px of a 640 px image
_EDGE_TOLERANCE = 1e-5


def _on_edge(value: float) -> float:
    """``value`` (in patch units) snapped to the nearest integer when within the tolerance."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < _EDGE_TOLERANCE else value


class Kosmos2Codec(_TokenCodec):
    """Kosmos-2 patch-index tokens on a 32 x 32 grid.

    A box is its upper-left and lower-right patch (``coordinate_to_patch_index`` of transformers'
    Kosmos-2 processor), wrapped in ``<object>`` ... ``</object>``; several boxes of one object
    are joined by ``</delimiter_of_multi_objects/>`` and a phrase is ``<phrase>..</phrase>``
    before them.  Decoding follows ``patch_index_to_coordinate`` (patch centres, or the patch
    edges when the two corners share a row or column).  A point is the patch holding it, decoded
    to the patch centre; points of one object share one ``<object>`` group.
    """

    name: ClassVar[str] = "kosmos2"
    tokens_per_box: ClassVar[int | None] = 2
    _pattern: ClassVar[re.Pattern[str]] = re.compile(r"<patch_index_(\d+)>")
    OBJECT, END, DELIMITER = "<object>", "</object>", "</delimiter_of_multi_objects/>"
    PHRASE_START, PHRASE_END = "<phrase>", "</phrase>"

    def __init__(self, *, patches_per_side: int = 32) -> None:
        if patches_per_side < 2:
            raise ValueError(f"Kosmos2Codec: patches_per_side must be >= 2, got {patches_per_side}")
        self.side = int(patches_per_side)
        self.bins = self.side * self.side

    def token(self, k: int) -> str:
        return f"<patch_index_{k:04d}>"

    @property
    def structure_tokens(self) -> tuple[str, ...]:
        return (self.OBJECT, self.END, self.DELIMITER, self.PHRASE_START, self.PHRASE_END)

    def patch_indices(self, box: Sequence[float], image_size: tuple[int, int]) -> tuple[int, int]:
        """(upper-left, lower-right) patch index of one pixel box (degenerate boxes widened)."""
        h, w = _check_size(image_size)
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = (min(max(v / w, 0.0), 1.0) for v in (x1, x2))
        y1, y2 = (min(max(v / h, 0.0), 1.0) for v in (y1, y2))
        n = self.side
        x1, y1, x2, y2 = (_on_edge(v * n) for v in (x1, y1, x2, y2))
        ul_x, ul_y = min(math.floor(x1), n - 1), min(math.floor(y1), n - 1)
        # the processor's ceil(v * n - 1), kept inside the grid and not before the other corner
        lr_x = min(max(math.ceil(x2 - 1), ul_x), n - 1)
        lr_y = min(max(math.ceil(y2 - 1), ul_y), n - 1)
        return ul_y * n + ul_x, lr_y * n + lr_x

    def box_from_indices(self, ul: int, lr: int, image_size: tuple[int, int]) -> tuple[float, ...]:
        h, w = _check_size(image_size)
        n, cell = self.side, 1.0 / self.side
        ul_x, ul_y, lr_x, lr_y = ul % n, ul // n, lr % n, lr // n
        if ul == lr or ul_x == lr_x or ul_y == lr_y:
            box = (ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell)
        else:
            half = cell / 2
            box = (ul_x * cell + half, ul_y * cell + half, lr_x * cell + half, lr_y * cell + half)
        return box[0] * w, box[1] * h, box[2] * w, box[3] * h

    def _group(self, body: str, phrase: str | None) -> str:
        head = f"{self.PHRASE_START}{phrase}{self.PHRASE_END}" if phrase else ""
        return f"{head}{self.OBJECT}{body}{self.END}"

    def encode(self, boxes, image_size, *, phrase=None):  # type: ignore[override]
        pairs = []
        for box in _as_boxes(boxes).tolist():
            ul, lr = self.patch_indices(box, image_size)
            pairs.append(self.token(ul) + self.token(lr))
        return self._group(self.DELIMITER.join(pairs), phrase)

    def _groups(self, text: str) -> list[str]:
        groups = re.findall(re.escape(self.OBJECT) + r"(.*?)" + re.escape(self.END), text, flags=re.S)
        if not groups:
            raise CodecError(f"kosmos2: no {self.OBJECT} ... {self.END} group in the text")
        return groups

    def decode(self, text, image_size):  # type: ignore[override]
        boxes = []
        for group in self._groups(text):
            for pair in group.split(self.DELIMITER):
                values = self._values(pair)
                if len(values) != 2:
                    raise CodecError(f"kosmos2: a box needs 2 patch indices, found {len(values)} in {pair!r}")
                boxes.append(self.box_from_indices(values[0], values[1], image_size))
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    def encode_points(self, points, image_size):  # type: ignore[override]
        h, w = _check_size(image_size)
        n = self.side
        tokens = []
        for x, y in _as_points(points).tolist():
            px = min(max(math.floor(x / w * n), 0), n - 1)
            py = min(max(math.floor(y / h * n), 0), n - 1)
            tokens.append(self.token(py * n + px))
        return self._group("".join(tokens), None)

    def decode_points(self, text, image_size):  # type: ignore[override]
        h, w = _check_size(image_size)
        values = [v for group in self._groups(text) for v in self._values(group)]
        if not values:
            raise CodecError("kosmos2: no patch index token in the text")
        idx = torch.tensor(values, dtype=torch.float64)
        x = (idx % self.side + 0.5) / self.side * w
        y = (idx // self.side + 0.5) / self.side * h
        return torch.stack([x, y], 1).float()

    def boxes_grammar(self, min_count=1, max_count=None, *, phrase=False):  # type: ignore[override]
        pair = re.escape(COORD) + "{2}"
        head = (self.sym(self.PHRASE_START) + PHRASE + self.sym(self.PHRASE_END)) if phrase else ""
        body = _joined(pair, self.sym(self.DELIMITER), min_count, max_count)
        return head + self.sym(self.OBJECT) + body + self.sym(self.END)

    def points_grammar(self, min_count=1, max_count=None):  # type: ignore[override]
        return self.sym(self.OBJECT) + _rep(re.escape(COORD), min_count, max_count) + self.sym(self.END)

    def __repr__(self) -> str:
        return f"Kosmos2Codec(patches_per_side={self.side})"


# ---------------------------------------------------------------------------------------------- text
_INT = r"\d{1,5}"
_NUMBER_RE = r"(\d+(?:\.\d+)?)"


class Qwen2VLCodec(CoordinateCodec):
    """Qwen2-VL: ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.

    Coordinates are integers normalised to 0..1000 (``round(v / size * 1000)``, decoded
    ``k / 1000 * size``); several boxes of one phrase follow each other.  Points of one object
    are ``<|box_start|>(x,y),(x,y),...<|box_end|>`` (a vlzoo extension in the same syntax).
    """

    name: ClassVar[str] = "qwen2vl"
    REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
    BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
    scale: int = 1000

    @property
    def structure_tokens(self) -> tuple[str, ...]:
        return (self.REF_START, self.REF_END, self.BOX_START, self.BOX_END)

    def _to_ints(self, xy: Tensor, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        h, w = _check_size(image_size)
        x = (xy[:, 0] / w * self.scale).round().clamp(0, self.scale).long()
        y = (xy[:, 1] / h * self.scale).round().clamp(0, self.scale).long()
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def _from_ints(self, values: Tensor, image_size: tuple[int, int]) -> Tensor:
        h, w = _check_size(image_size)
        return torch.stack([values[:, 0] / self.scale * w, values[:, 1] / self.scale * h], 1).float()

    def _wrap(self, pts: list[tuple[int, int]]) -> str:
        return self.BOX_START + ",".join(f"({x},{y})" for x, y in pts) + self.BOX_END

    def encode(self, boxes, image_size, *, phrase=None):  # type: ignore[override]
        b = _as_boxes(boxes)
        head = f"{self.REF_START}{phrase}{self.REF_END}" if phrase else ""
        return head + "".join(self._wrap(self._to_ints(box.reshape(2, 2), image_size)) for box in b)

    def _point_groups(self, text: str) -> list[list[tuple[int, int]]]:
        groups = re.findall(re.escape(self.BOX_START) + r"(.*?)" + re.escape(self.BOX_END), text, flags=re.S)
        if not groups:
            raise CodecError(f"{self.name}: no {self.BOX_START} ... {self.BOX_END} group in the text")
        out = []
        for group in groups:
            pts = re.findall(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", group)
            if not pts or re.sub(r"\(\s*\d+\s*,\s*\d+\s*\)|[\s,]", "", group):
                raise CodecError(f"{self.name}: malformed coordinates {group!r}")
            out.append([(int(x), int(y)) for x, y in pts])
        return out

    def _check_range(self, values: Tensor, image_size: tuple[int, int]) -> None:
        if values.numel() and float(values.max()) > self.scale:
            raise CodecError(f"{self.name}: coordinate {int(values.max())} beyond {self.scale}")

    def decode(self, text, image_size):  # type: ignore[override]
        boxes = []
        for pts in self._point_groups(text):
            if len(pts) != 2:
                raise CodecError(f"{self.name}: a box is two points, found {len(pts)}")
            boxes.append([pts[0][0], pts[0][1], pts[1][0], pts[1][1]])
        values = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 2)
        self._check_range(values, image_size)
        return self._from_ints(values, image_size).reshape(-1, 4)

    def encode_points(self, points, image_size):  # type: ignore[override]
        return self._wrap(self._to_ints(_as_points(points), image_size))

    def decode_points(self, text, image_size):  # type: ignore[override]
        values = torch.tensor([p for g in self._point_groups(text) for p in g], dtype=torch.float64).reshape(
            -1, 2
        )
        self._check_range(values, image_size)
        return self._from_ints(values, image_size)

    def _point_grammar(self) -> str:
        return rf"\({_INT},{_INT}\)"

    def boxes_grammar(self, min_count=1, max_count=None, *, phrase=False):  # type: ignore[override]
        p = self._point_grammar()
        box = self.sym(self.BOX_START) + p + "," + p + self.sym(self.BOX_END)
        head = (self.sym(self.REF_START) + PHRASE + self.sym(self.REF_END)) if phrase else ""
        return head + _rep(box, min_count, max_count)

    def points_grammar(self, min_count=1, max_count=None):  # type: ignore[override]
        body = _joined(self._point_grammar(), ",", min_count, max_count)
        return self.sym(self.BOX_START) + body + self.sym(self.BOX_END)


class Qwen25VLCodec(Qwen2VLCodec):
    """Qwen2.5-VL variant: the same tokens with *absolute* integer pixels of the input image
    (the image after Qwen's resize, i.e. the network input the boxes are given in)."""

    name: ClassVar[str] = "qwen2.5vl"

    def _to_ints(self, xy: Tensor, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        h, w = _check_size(image_size)
        x = xy[:, 0].round().clamp(0, w).long()
        y = xy[:, 1].round().clamp(0, h).long()
        return list(zip(x.tolist(), y.tolist(), strict=True))

    def _from_ints(self, values: Tensor, image_size: tuple[int, int]) -> Tensor:
        return values.float()

    def _check_range(self, values: Tensor, image_size: tuple[int, int]) -> None:
        h, w = _check_size(image_size)
        if values.numel() and (float(values[:, 0].max()) > w or float(values[:, 1].max()) > h):
            raise CodecError(f"{self.name}: coordinates beyond the {int(w)}x{int(h)} image")


class ShikraCodec(CoordinateCodec):
    """Shikra plain text ``[x1,y1,x2,y2]``: the box normalised to the (pad-to-square) input
    image with 3 decimals; several boxes of one phrase ``[b1;b2]``; points ``[x,y;x,y]``."""

    name: ClassVar[str] = "shikra"

    def __init__(self, *, decimals: int = 3) -> None:
        if not 1 <= decimals <= 6:
            raise ValueError(f"ShikraCodec: decimals must be in 1..6, got {decimals}")
        self.decimals = int(decimals)
        self._num = rf"(?:0\.\d{{{self.decimals}}}|1\.{'0' * self.decimals})"

    def _fmt(self, values: Tensor) -> str:
        return ",".join(f"{min(max(v, 0.0), 1.0):.{self.decimals}f}" for v in values.tolist())

    def _normalise(self, xy: Tensor, image_size: tuple[int, int]) -> Tensor:
        h, w = _check_size(image_size)
        return torch.stack([xy[:, 0] / w, xy[:, 1] / h], 1)

    def encode(self, boxes, image_size, *, phrase=None):  # type: ignore[override]
        b = _as_boxes(boxes)
        norm = self._normalise(b.reshape(-1, 2), image_size).reshape(-1, 4)
        return (phrase or "") + "[" + ";".join(self._fmt(box) for box in norm) + "]"

    def _groups(self, text: str, arity: int) -> list[list[float]]:
        groups = re.findall(r"\[([^\[\]]*)\]", text)
        if not groups:
            raise CodecError("shikra: no [...] coordinate group in the text")
        out = []
        for group in groups:
            for part in group.split(";"):
                nums = re.findall(_NUMBER_RE, part)
                if len(nums) != arity or re.sub(_NUMBER_RE + r"|[\s,]", "", part):
                    raise CodecError(f"shikra: expected {arity} numbers in {part!r}")
                values = [float(v) for v in nums]
                if any(v > 1.0 for v in values):
                    raise CodecError(f"shikra: normalised coordinate above 1 in {part!r}")
                out.append(values)
        return out

    def decode(self, text, image_size):  # type: ignore[override]
        h, w = _check_size(image_size)
        v = torch.tensor(self._groups(text, 4), dtype=torch.float64).reshape(-1, 4)
        return (v * torch.tensor([w, h, w, h], dtype=torch.float64)).float()

    def encode_points(self, points, image_size):  # type: ignore[override]
        norm = self._normalise(_as_points(points), image_size)
        return "[" + ";".join(self._fmt(p) for p in norm) + "]"

    def decode_points(self, text, image_size):  # type: ignore[override]
        h, w = _check_size(image_size)
        v = torch.tensor(self._groups(text, 2), dtype=torch.float64).reshape(-1, 2)
        return (v * torch.tensor([w, h], dtype=torch.float64)).float()

    def boxes_grammar(self, min_count=1, max_count=None, *, phrase=False):  # type: ignore[override]
        n = self._num
        box = f"{n},{n},{n},{n}"
        body = r"\[" + _joined(box, ";", min_count, max_count) + r"\]"
        return (PHRASE + body) if phrase else body

    def points_grammar(self, min_count=1, max_count=None):  # type: ignore[override]
        n = self._num
        return r"\[" + _joined(f"{n},{n}", ";", min_count, max_count) + r"\]"

    def __repr__(self) -> str:
        return f"ShikraCodec(decimals={self.decimals})"


#: codec name -> class (the names recipes use for ``codec:``)
CODECS: dict[str, type[CoordinateCodec]] = {
    "bins": BinsCodec,
    "kosmos2": Kosmos2Codec,
    "florence2": Florence2Codec,
    "paligemma": PaliGemmaCodec,
    "qwen2vl": Qwen2VLCodec,
    "qwen2.5vl": Qwen25VLCodec,
    "shikra": ShikraCodec,
}


def make_codec(name: str, *, bins: int | None = None) -> CoordinateCodec:
    """A codec by family name; ``bins`` sets the bin count of the ``bins`` codec only."""
    if name not in CODECS:
        raise ValueError(f"unknown coordinate codec {name!r}; choose from {sorted(CODECS)}")
    if bins is not None and name != "bins":
        raise ValueError(f"codec {name!r} has a fixed quantisation; 'bins' applies to the 'bins' codec only")
    if name == "bins":
        return BinsCodec(bins=bins if bins is not None else 64)
    return CODECS[name]()

"""A lenient reader of the boxes in a model's answer text, for ``vlzoo score``.

Models answer in many forms, and not always in their own family's syntax.  :func:`parse_answer`
looks for, in this order:

1. the declared family codec's **tokens** (:mod:`vlzoo.paradigms.codecs`): Florence-2
   ``<loc_k>``, PaliGemma ``<locNNNN>`` (y first), Kosmos-2 ``<patch_index_NNNN>`` pairs,
   Pix2Seq ``<bin_k>``; decoded by the codec itself to fractions of the reference image;
2. **JSON** (also inside a fenced ```` ```json ```` block): Qwen2.5-VL's
   ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``, ``{"bbox": [...]}`` / ``{"box": [...]}``, or
   bare ``[x1, y1, x2, y2]`` lists, at any depth;
3. **point pairs** ``(x1,y1),(x2,y2)``, with or without Qwen's ``<|box_start|>`` ... ``<|box_end|>``;
4. **bracketed lists** of four numbers, ``[x1, y1, x2, y2]`` (Shikra joins several with ``;``).

Plain numbers are returned as written: the coordinate frame (:mod:`vlzoo.data.frames`) says what
they mean.  An answer with several boxes keeps them all, in order (REC scores the first).  A
truncated answer (generation cut off inside a JSON list) keeps every *complete* box before the
cut and is flagged ``truncated``.  An answer with no complete box is a parse failure with a reason
(scored as a miss, never dropped).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vlzoo.paradigms.codecs import (
    BinsCodec,
    CodecError,
    CoordinateCodec,
    Florence2Codec,
    Kosmos2Codec,
    PaliGemmaCodec,
    make_codec,
)

__all__ = ["ParsedAnswer", "parse_answer", "ANSWER_FORMS", "codec_for_scoring"]

#: the forms :func:`parse_answer` reports in :attr:`ParsedAnswer.form`
ANSWER_FORMS = ("tokens", "json", "pairs", "list")

_NUM = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_PAIRS_RE = re.compile(
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
)
_GROUP_RE = re.compile(r"\[([^\[\]]*)\]")
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|$)", re.S)
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")
_DECODER = json.JSONDecoder()
#: a complete ``"bbox_2d": [a, b, c, d]`` inside text that is not valid JSON (a truncated list)
_KEYED_BOX_RE = re.compile(
    r'"(?:' + "|".join(_BOX_KEYS) + rf')"\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]'
)


@dataclass
class ParsedAnswer:
    """The boxes found in one answer.

    ``boxes`` are ``xyxy`` in the numbers the answer wrote (``fractions=False``: plain numbers,
    read in the declared frame) or as fractions 0..1 of the frame's reference image
    (``fractions=True``: a codec's tokens).  ``failure`` says why nothing could be read.
    """

    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    form: str | None = None
    fractions: bool = False
    truncated: bool = False
    failure: str | None = None

    @property
    def parsed(self) -> bool:
        return bool(self.boxes)


def codec_for_scoring(name: str, *, bins: int | None = None) -> CoordinateCodec:
    """The family codec used to read its tokens (``bins``: the bin count of the ``bins`` codec).
    Florence-2 bins are read at their centres without the post-processor's truncation to whole
    pixels (a fraction of the image has none)."""
    if name == "florence2" and bins is None:
        return Florence2Codec(whole_pixels=False)
    return make_codec(name, bins=bins)


# --------------------------------------------------------------------------------------------- tokens
def _token_boxes(text: str, codec: CoordinateCodec) -> ParsedAnswer | None:
    """Boxes in the codec's own coordinate tokens, as fractions of the image; ``None`` when the
    text holds none of its tokens."""
    if not isinstance(codec, (Florence2Codec, PaliGemmaCodec, Kosmos2Codec, BinsCodec)):
        return None
    values = [int(v) for v in codec._pattern.findall(text)]
    if not values:
        return None
    bad = sorted({v for v in values if not 0 <= v < codec.bins})
    if bad:
        return ParsedAnswer(form="tokens", fractions=True,
                            failure=f"{codec.name} coordinate token(s) {bad[:5]} out of range 0..{codec.bins - 1}")
    per_box = 2 if isinstance(codec, Kosmos2Codec) else 4
    complete = len(values) - len(values) % per_box
    boxes: list[tuple[float, float, float, float]] = []
    for start in range(0, complete, per_box):
        chunk = "".join(codec.token(v) for v in values[start:start + per_box])
        if isinstance(codec, Kosmos2Codec):
            chunk = f"{codec.OBJECT}{chunk}{codec.END}"
        try:
            decoded = codec.decode(chunk, (1.0, 1.0))
        except CodecError as err:
            return ParsedAnswer(form="tokens", fractions=True, failure=f"bad {codec.name} tokens: {err}")
        boxes.extend(tuple(float(v) for v in box) for box in decoded.tolist())  # type: ignore[misc]
    if not boxes:
        return ParsedAnswer(form="tokens", fractions=True, truncated=True,
                            failure=f"{len(values)} {codec.name} coordinate token(s), fewer than one box")
    return ParsedAnswer(boxes=boxes, form="tokens", fractions=True, truncated=complete != len(values))


# --------------------------------------------------------------------------------------------- JSON
def _is_box(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _json_boxes(value: Any, out: list[tuple[float, float, float, float]]) -> None:
    """Every box in a JSON value, depth first in document order."""
    if _is_box(value):
        out.append(tuple(float(v) for v in value))  # type: ignore[arg-type]
    elif isinstance(value, dict):
        for key in _BOX_KEYS:
            if _is_box(value.get(key)):
                out.append(tuple(float(v) for v in value[key]))  # type: ignore[arg-type]
                return
        for item in value.values():
            if isinstance(item, (list, dict)):
                _json_boxes(item, out)
    elif isinstance(value, list):
        for item in value:
            _json_boxes(item, out)


def _json_candidates(text: str) -> list[str]:
    """Fenced blocks first (a model often wraps its JSON in ```json ... ```), then the text
    from its first ``[`` or ``{``."""
    out = [m.group(1).strip() for m in _FENCE_RE.finditer(text) if m.group(1).strip()]
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if starts:
        out.append(text[min(starts):].strip())
    return out


def _json_answer(text: str) -> tuple[ParsedAnswer | None, bool]:
    """``(the JSON boxes or None, whether the text held JSON that does not parse)``."""
    broken = False
    for candidate in _json_candidates(text):
        try:
            value, _ = _DECODER.raw_decode(candidate)  # text after the JSON value is prose, not an error
        except ValueError:
            broken = True
            # not valid JSON: a truncated list still holds its complete "bbox_2d": [...] entries
            keyed = [tuple(float(v) for v in m.groups()) for m in _KEYED_BOX_RE.finditer(candidate)]
            if keyed:
                return ParsedAnswer(boxes=keyed, form="json", truncated=True), True  # type: ignore[arg-type]
            continue
        boxes: list[tuple[float, float, float, float]] = []
        _json_boxes(value, boxes)
        if boxes:
            return ParsedAnswer(boxes=boxes, form="json"), False
    return None, broken


# --------------------------------------------------------------------------------------------- text
def _pair_answer(text: str) -> ParsedAnswer | None:
    boxes = [tuple(float(v) for v in m.groups()) for m in _PAIRS_RE.finditer(text)]
    return ParsedAnswer(boxes=boxes, form="pairs") if boxes else None  # type: ignore[arg-type]


def _list_answer(text: str) -> ParsedAnswer | None:
    boxes: list[tuple[float, float, float, float]] = []
    four = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*$")
    for group in _GROUP_RE.finditer(text):
        for part in group.group(1).split(";"):
            m = four.match(part)
            if m:
                boxes.append(tuple(float(v) for v in m.groups()))  # type: ignore[arg-type]
    # a last list cut off after its fourth number ("... [0.1, 0.2, 0.3, 0.4") is still a box
    tail = re.search(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,?\s*$", text)
    truncated = bool(tail)
    if tail:
        boxes.append(tuple(float(v) for v in tail.groups()))  # type: ignore[arg-type]
    return ParsedAnswer(boxes=boxes, form="list", truncated=truncated) if boxes else None


def parse_answer(text: Any, codec: CoordinateCodec | str) -> ParsedAnswer:
    """The boxes of one answer (module doc for the forms, in the order they are tried)."""
    if not isinstance(text, str):
        return ParsedAnswer(failure=f"the answer is {type(text).__name__}, not text")
    if not text.strip():
        return ParsedAnswer(failure="empty answer")
    if isinstance(codec, str):
        codec = codec_for_scoring(codec)
    tokens = _token_boxes(text, codec)
    if tokens is not None:
        return tokens
    found, broken = _json_answer(text)
    if found is not None:
        return found
    for reader in (_pair_answer, _list_answer):
        found = reader(text)
        if found is not None:
            # JSON that does not parse, read as text: a list cut off after its complete boxes
            # (a closed list followed by a full stop is not cut off)
            found.truncated = found.truncated or (broken and text.rstrip().rstrip(".!?")[-1:] not in ("]", "}", "`"))
            return found
    return ParsedAnswer(failure="no box found (no coordinate tokens, JSON box, (x,y) pairs or [x1,y1,x2,y2] list)")

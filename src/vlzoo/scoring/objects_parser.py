"""Lenient readers of the *labelled boxes* (detection) and *polygons* (RES) in a model's answer,
for ``vlzoo score --task det`` / ``--task res``.

:func:`parse_objects` reads boxes with the label each one is written with:

* the family codec's **tokens**: Florence-2 ``<OD>`` answers ``label<loc_..>x4`` (a label before
  one or more boxes), Pix2Seq ``<bin_..>`` (the same layout, usually unlabelled), PaliGemma
  ``<locNNNN>x4 label ; ...`` (the label after its box) and Kosmos-2 grounded phrases
  ``<phrase>label</phrase><object><patch_index_..><patch_index_..></object>`` (several boxes of
  one phrase joined by ``</delimiter_of_multi_objects/>``);
* **JSON**, as Qwen2.5-VL writes it: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` (also
  ``bbox`` / ``box`` and ``label`` / ``name`` / ``category`` / ``class``), fenced or not; a list
  cut off mid-way keeps every complete object before the cut;
* **point pairs**, Qwen2-VL's ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  (a label applies to the boxes that follow it);
* plain bracketed lists (unlabelled);
* **no object**: ``none`` (vlzoo's own answer for an image without the category), an empty JSON
  list ``[]`` (also fenced): a parsed answer with no box (form ``none``), not a failure.

:func:`parse_polygons` reads polygons (each a list of ``(x, y)`` vertices):

* **tokens**: Florence-2 ``<REFERRING_EXPRESSION_SEGMENTATION>`` answers ``<loc_x><loc_y>...``
  (several polygons split by ``<sep>`` or wrapped in ``<poly>`` ... ``</poly>``), the ``bins``
  codec's polygon answers (vlzoo pixel2seq ``res``), PaliGemma / Kosmos-2 points;
* **JSON**: ``[[x, y], ...]``, several such lists, COCO-style flat ``[x1, y1, x2, y2, x3, y3, ...]``
  lists, or an object with a ``polygon`` / ``points`` / ``segmentation`` key;
* **point pairs** ``(x,y),(x,y),(x,y)`` (one polygon per ``<|box_start|>`` ... ``<|box_end|>``
  group) and Shikra's ``[x,y;x,y;...]``.

As :func:`~vlzoo.scoring.answers_parser.parse_answer`, plain numbers are returned as written
(the frame says what they mean) and token coordinates as fractions of the frame's reference image;
an answer with nothing complete is a failure with a reason.  A polygon needs at least 3 vertices:
shorter ones are counted in :attr:`ParsedPolygons.dropped` (and the answer fails when none is left).
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
    Qwen2VLCodec,
)
from vlzoo.scoring.answers_parser import _NUM, _json_candidates, codec_for_scoring, parse_answer

__all__ = ["ParsedObjects", "ParsedPolygons", "parse_objects", "parse_polygons", "LABEL_KEYS", "POLYGON_KEYS"]

Box = tuple[float, float, float, float]
Point = tuple[float, float]

#: the keys a JSON object may name its label by (the first present is used)
LABEL_KEYS = ("label", "name", "category", "class", "object")
#: the keys a JSON object may hold its polygon(s) under
POLYGON_KEYS = ("polygon", "polygons", "points", "segmentation", "mask_polygon")
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")
_DECODER = json.JSONDecoder()
_FLAT_OBJECT_RE = re.compile(r"\{[^{}\[\]]*\[[^\[\]{}]*\][^{}\[\]]*\}")
_TAG_RE = re.compile(r"</?[A-Za-z_][^<>]*>")
_REF_RE = re.compile(re.escape(Qwen2VLCodec.REF_START) + r"(.*?)" + re.escape(Qwen2VLCodec.REF_END), re.S)
_BOXED_RE = re.compile(re.escape(Qwen2VLCodec.BOX_START) + r"(.*?)(?:" + re.escape(Qwen2VLCodec.BOX_END) + r"|$)", re.S)
_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_SHIKRA_POINTS_RE = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*(?:;\s*{_NUM}\s*,\s*{_NUM}\s*){{2,}}\]")
_POLY_SPLIT_RE = re.compile(r"<sep>|<poly>|</poly>")


@dataclass
class ParsedObjects:
    """The labelled boxes of one detection answer: ``boxes`` (``xyxy``, as written, or
    fractions of the reference image when ``fractions``) and ``labels`` (the text each box is
    labelled with, ``None`` when unlabelled), parallel."""

    boxes: list[Box] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    form: str | None = None
    fractions: bool = False
    truncated: bool = False
    failure: str | None = None
    #: of an answer in several parts (one per category's sample), how many did not parse
    failed_parts: int = 0
    #: complete coordinate groups that are no box (a ``<|box_start|>`` group of 1 or 3+ points)
    skipped: int = 0

    @property
    def parsed(self) -> bool:
        return self.failure is None


@dataclass
class ParsedPolygons:
    """The polygons of one RES answer (vertices ``(x, y)``, as written or as fractions)."""

    polygons: list[list[Point]] = field(default_factory=list)
    form: str | None = None
    fractions: bool = False
    truncated: bool = False
    dropped: int = 0
    failure: str | None = None

    @property
    def parsed(self) -> bool:
        return bool(self.polygons)


def _label(text: str | None) -> str | None:
    """A label as written, without markup and separators; ``None`` when nothing is left."""
    if text is None:
        return None
    cleaned = _TAG_RE.sub(" ", text)
    cleaned = re.sub(r"\s+", " ", cleaned).strip(" \t\n;,.:")
    return cleaned or None


def _reader(codec: CoordinateCodec | str) -> CoordinateCodec:
    return codec_for_scoring(codec) if isinstance(codec, str) else codec


def _token_codec(codec: CoordinateCodec) -> bool:
    return isinstance(codec, (Florence2Codec, PaliGemmaCodec, Kosmos2Codec, BinsCodec))


def _out_of_range(codec: CoordinateCodec, text: str) -> str | None:
    bad = sorted({int(v) for v in codec._pattern.findall(text) if not 0 <= int(v) < codec.bins})
    return f"{codec.name} coordinate token(s) {bad[:5]} out of range 0..{codec.bins - 1}" if bad else None


def _runs(text: str, codec: CoordinateCodec) -> list[tuple[str, list[int], str]]:
    """``(text before, coordinate values, text after)`` of each run of adjacent coordinate
    tokens (only whitespace between them); the text between two runs is both the first's
    "after" and the second's "before"."""
    matches = list(codec._pattern.finditer(text))
    runs: list[tuple[int, int, list[int]]] = []
    for m in matches:
        if runs and not text[runs[-1][1]:m.start()].strip():
            runs[-1] = (runs[-1][0], m.end(), [*runs[-1][2], int(m.group(1))])
        else:
            runs.append((m.start(), m.end(), [int(m.group(1))]))
    out = []
    for i, (start, end, values) in enumerate(runs):
        before = text[runs[i - 1][1] if i else 0:start]
        after = text[end:runs[i + 1][0] if i + 1 < len(runs) else len(text)]
        out.append((before, values, after))
    return out


def _fraction_boxes(codec: CoordinateCodec, values: list[int]) -> list[Box]:
    chunk = "".join(codec.token(v) for v in values)
    return [tuple(float(v) for v in b) for b in codec.decode(chunk, (1.0, 1.0)).tolist()]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- objects
def _kosmos_objects(text: str, codec: Kosmos2Codec) -> ParsedObjects:
    groups = re.finditer(r"(?:" + re.escape(codec.PHRASE_START) + r"(.*?)" + re.escape(codec.PHRASE_END)
                         + r"\s*)?" + re.escape(codec.OBJECT) + r"(.*?)(" + re.escape(codec.END) + r"|$)", text, re.S)
    out = ParsedObjects(form="tokens", fractions=True)
    for g in groups:
        label = _label(g.group(1))
        complete = bool(g.group(3))
        for pair in g.group(2).split(codec.DELIMITER):
            values = [int(v) for v in codec._pattern.findall(pair)]
            if len(values) == 2:
                out.boxes.append(codec.box_from_indices(values[0], values[1], (1.0, 1.0)))  # type: ignore[arg-type]
                out.labels.append(label)
            elif values:
                out.truncated = True
        if not complete:
            out.truncated = True
    return out


def _token_objects(text: str, codec: CoordinateCodec) -> ParsedObjects | None:
    if not _token_codec(codec) or not codec._pattern.search(text):
        return None
    bad = _out_of_range(codec, text)
    if bad:
        return ParsedObjects(form="tokens", fractions=True, failure=bad)
    if isinstance(codec, Kosmos2Codec):
        out = _kosmos_objects(text, codec)
    else:
        out = ParsedObjects(form="tokens", fractions=True)
        label_after = isinstance(codec, PaliGemmaCodec)  # "<loc..>x4 label ; ..."
        for before, values, after in _runs(text, codec):
            complete = len(values) - len(values) % 4
            if complete != len(values):
                out.truncated = True
            if not complete:
                continue
            try:
                boxes = _fraction_boxes(codec, values[:complete])
            except CodecError as err:
                return ParsedObjects(form="tokens", fractions=True, failure=f"bad {codec.name} tokens: {err}")
            label = _label(after if label_after else before)
            out.boxes.extend(boxes)
            out.labels.extend([label] * len(boxes))
    if not out.boxes:
        out.failure = f"{codec.name} coordinate tokens, but no complete box"
    return out


def _object_label(obj: dict) -> str | None:
    for key in LABEL_KEYS:
        if isinstance(obj.get(key), str):
            return _label(obj[key])
    return None


def _is_box(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _json_objects_in(value: Any, out: ParsedObjects, label: str | None = None) -> None:
    if _is_box(value):
        out.boxes.append(tuple(float(v) for v in value))  # type: ignore[arg-type]
        out.labels.append(label)
    elif isinstance(value, dict):
        own = _object_label(value) or label
        for key in _BOX_KEYS:
            if _is_box(value.get(key)):
                out.boxes.append(tuple(float(v) for v in value[key]))  # type: ignore[arg-type]
                out.labels.append(own)
                return
        for item in value.values():
            if isinstance(item, (list, dict)):
                _json_objects_in(item, out, own)
    elif isinstance(value, list):
        for item in value:
            _json_objects_in(item, out, label)


def _json_objects(text: str) -> ParsedObjects | None:
    for candidate in _json_candidates(text):
        try:
            value, _ = _DECODER.raw_decode(candidate)
        except ValueError:
            # a list cut off mid-way: its complete flat objects {"bbox_2d": [...], "label": ...}
            out = ParsedObjects(form="json", truncated=True)
            for m in _FLAT_OBJECT_RE.finditer(candidate):
                try:
                    _json_objects_in(json.loads(m.group(0)), out)
                except ValueError:
                    continue
            if out.boxes:
                return out
            continue
        out = ParsedObjects(form="json")
        _json_objects_in(value, out)
        if out.boxes:
            return out
    return None


def _pair_objects(text: str) -> ParsedObjects | None:
    """Qwen2-VL's ``<|object_ref_start|>label<|object_ref_end|>`` before its boxes."""
    if Qwen2VLCodec.BOX_START not in text:
        return None
    refs = [(m.end(), _label(m.group(1))) for m in _REF_RE.finditer(text)]
    out = ParsedObjects(form="pairs")
    for m in _BOXED_RE.finditer(text):
        pairs = [(float(a), float(b)) for a, b in _PAIR_RE.findall(m.group(1))]
        if not m.group(0).endswith(Qwen2VLCodec.BOX_END):
            out.truncated = True
            continue
        if len(pairs) != 2:
            out.skipped += 1
            continue
        label = next((lab for end, lab in reversed(refs) if end <= m.start()), None)
        out.boxes.append((*pairs[0], *pairs[1]))
        out.labels.append(label)
    if not out.boxes and out.skipped:
        out.failure = f"{out.skipped} {Qwen2VLCodec.BOX_START} group(s), none of two points (a box)"
    return out if out.boxes or out.skipped else None


def parse_objects(text: Any, codec: CoordinateCodec | str) -> ParsedObjects:
    """The labelled boxes of one detection answer (module doc for the forms, in order)."""
    if not isinstance(text, str):
        return ParsedObjects(failure=f"the answer is {type(text).__name__}, not text")
    if not text.strip():
        return ParsedObjects(failure="empty answer")
    bare = re.sub(r"^(?:json|JSON)\s*", "", text.strip().strip("`").strip()).strip()
    if bare.lower() in ("none", "[]"):
        return ParsedObjects(form="none")
    codec = _reader(codec)
    for reader in (lambda t: _token_objects(t, codec), _json_objects, _pair_objects):
        found = reader(text)
        if found is not None:
            return found
    boxes = parse_answer(text, codec)  # the REC reader's remaining forms: pairs and lists, unlabelled
    if not boxes.parsed:
        return ParsedObjects(failure=boxes.failure)
    return ParsedObjects(boxes=list(boxes.boxes), labels=[None] * len(boxes.boxes), form=boxes.form,
                         fractions=boxes.fractions, truncated=boxes.truncated)


# --------------------------------------------------------------------------------------------- polygons
def _keep(polys: list[list[Point]], out: ParsedPolygons) -> ParsedPolygons:
    for poly in polys:
        if len(poly) >= 3:
            out.polygons.append(poly)
        elif poly:
            out.dropped += 1
    if not out.polygons:
        out.failure = (f"{out.dropped} polygon(s) with fewer than 3 vertices, none complete" if out.dropped
                       else "no polygon vertex found")
    return out


def _token_polygons(text: str, codec: CoordinateCodec) -> ParsedPolygons | None:
    if not _token_codec(codec) or not codec._pattern.search(text):
        return None
    bad = _out_of_range(codec, text)
    if bad:
        return ParsedPolygons(form="tokens", fractions=True, failure=bad)
    out = ParsedPolygons(form="tokens", fractions=True)
    if isinstance(codec, Kosmos2Codec):
        pieces = re.findall(re.escape(codec.OBJECT) + r"(.*?)(?:" + re.escape(codec.END) + r"|$)", text, re.S) or [text]
    else:
        pieces = _POLY_SPLIT_RE.split(text)
    polys: list[list[Point]] = []
    for piece in pieces:
        values = [int(v) for v in codec._pattern.findall(piece)]
        if not values:
            continue
        if len(values) % 2:
            out.truncated = True
            values = values[:-1]
        if not values:
            continue
        chunk = "".join(codec.token(v) for v in values)
        if isinstance(codec, Kosmos2Codec):
            chunk = f"{codec.OBJECT}{chunk}{codec.END}"
        try:
            xy = codec.decode_points(chunk, (1.0, 1.0))
        except CodecError as err:
            return ParsedPolygons(form="tokens", fractions=True, failure=f"bad {codec.name} tokens: {err}")
        polys.append([(float(x), float(y)) for x, y in xy.tolist()])
    return _keep(polys, out)


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _json_polygons_in(value: Any, polys: list[list[Point]]) -> None:
    """Polygons in a JSON value: a list of ``[x, y]`` points, a flat list of 6+ numbers (COCO),
    or lists / objects holding them."""
    if isinstance(value, dict):
        for key in POLYGON_KEYS:
            if key in value:
                _json_polygons_in(value[key], polys)
                return
        for item in value.values():
            if isinstance(item, (list, dict)):
                _json_polygons_in(item, polys)
    elif isinstance(value, list) and value:
        if all(_numbers(p) and len(p) == 2 for p in value):
            polys.append([(float(x), float(y)) for x, y in value])
        elif _numbers(value) and len(value) >= 6 and len(value) % 2 == 0:
            polys.append([(float(value[i]), float(value[i + 1])) for i in range(0, len(value), 2)])
        elif _numbers(value):
            polys.append([])  # a list of numbers that is no polygon (e.g. a box): counted, not read
        else:
            for item in value:
                _json_polygons_in(item, polys)


def _json_polygons(text: str) -> ParsedPolygons | None:
    for candidate in _json_candidates(text):
        try:
            value, _ = _DECODER.raw_decode(candidate)
        except ValueError:
            # cut off inside the list of points: the complete [x, y] pairs before the cut
            pairs = re.findall(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*\]", candidate)
            if len(pairs) >= 3:
                return _keep([[(float(x), float(y)) for x, y in pairs]], ParsedPolygons(form="json", truncated=True))
            continue
        polys: list[list[Point]] = []
        _json_polygons_in(value, polys)
        if any(polys):
            return _keep(polys, ParsedPolygons(form="json"))
    return None


def _pair_polygons(text: str) -> ParsedPolygons | None:
    groups = [m.group(1) for m in _BOXED_RE.finditer(text)] or [text]
    polys = [[(float(x), float(y)) for x, y in _PAIR_RE.findall(g)] for g in groups]
    if not any(polys):
        return None
    return _keep(polys, ParsedPolygons(form="pairs", truncated=Qwen2VLCodec.BOX_START in text
                                       and not text.rstrip().endswith(Qwen2VLCodec.BOX_END)))


def _shikra_polygons(text: str) -> ParsedPolygons | None:
    groups = _SHIKRA_POINTS_RE.findall(text)
    if not groups:
        return None
    polys = [[(float(x), float(y)) for x, y in re.findall(rf"({_NUM})\s*,\s*({_NUM})", g)] for g in groups]
    return _keep(polys, ParsedPolygons(form="list"))


def parse_polygons(text: Any, codec: CoordinateCodec | str) -> ParsedPolygons:
    """The polygons of one RES answer (module doc for the forms, in order)."""
    if not isinstance(text, str):
        return ParsedPolygons(failure=f"the answer is {type(text).__name__}, not text")
    if not text.strip():
        return ParsedPolygons(failure="empty answer")
    codec = _reader(codec)
    for reader in (lambda t: _token_polygons(t, codec), _shikra_polygons, _json_polygons, _pair_polygons):
        found = reader(text)
        if found is not None:
            return found
    return ParsedPolygons(failure="no polygon found (no coordinate tokens, JSON points, (x,y) pairs or [x,y;...] list)")

"""Language of the Shapes world: referring expressions unique by construction, a resolver that
evaluates them on the scene graph, captions and VQA questions.

An expression is a small program (:class:`Ref`) rendered to text.  Generation keeps only the
programs that :func:`resolve` maps to exactly the target object, so every expression a dataset
emits is unambiguous by the same semantics the resolver (and the tests) use.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from vlzoo.data.shapes.world import (
    CATEGORY_NAMES,
    CATEGORY_PLURALS,
    COLOUR_NAMES,
    SIZE_NAMES,
    Scene,
    ShapeObject,
)
from vlzoo.structures import EXPRESSION_KINDS

__all__ = [
    "Ref",
    "SetRef",
    "resolve",
    "render",
    "referring_candidates",
    "set_references",
    "absent_references",
    "caption",
    "vqa_question",
    "NUMBER_WORDS",
    "ORDINALS",
    "RELATIONS",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
EXTREMES = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
#: relation -> phrasings
RELATIONS = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
SUPERLATIVES = {"largest": ("largest", "biggest"), "smallest": ("smallest",)}
#: minimum separation (pixels, as a fraction of the image side) for an order or relation to count
_MARGIN = 0.04


@dataclass(frozen=True)
class Ref:
    """A referring program: attribute filter, then at most one of ordinal / superlative /
    relation.  ``axis`` is the side an ordinal counts from ("left", "right", "top", "bottom")."""

    size: str | None = None
    colour: str | None = None
    category: str | None = None
    ordinal: int | None = None  # 1-based
    axis: str | None = None
    superlative: str | None = None  # "largest" | "smallest"
    relation: str | None = None  # a key of RELATIONS
    anchor: Ref | None = None

    @property
    def kind(self) -> str:
        if self.relation:
            return "relation"
        if self.ordinal:
            return "ordinal"
        if self.superlative:
            return "superlative"
        return "attribute"


@dataclass(frozen=True)
class SetRef(Ref):
    """A set expression ("every red shape", "all the small circles"): an attribute filter read as
    every object it keeps - what :func:`resolve` returns for any filter.  It differs from
    :class:`Ref` in its rendering only (generalized referring, ``grec`` / ``gres``)."""


class _View:
    """Plain-Python columns of a scene (attribute names, centres, size classes) for fast lookups."""

    __slots__ = ("attrs", "xs", "ys", "sizes", "margin", "n")

    def __init__(self, scene: Scene) -> None:
        objs = scene.objects
        self.attrs = [(o.size_name, o.colour_name, o.category_name) for o in objs]
        self.xs = [o.cx for o in objs]
        self.ys = [o.cy for o in objs]
        self.sizes = [o.size for o in objs]
        self.margin = _MARGIN * scene.size[1]
        self.n = len(objs)


def _members(ref: Ref, v: _View) -> list[int]:
    s, c, k = ref.size, ref.colour, ref.category
    return [
        i
        for i, (a, b, d) in enumerate(v.attrs)
        if (s is None or s == a) and (c is None or c == b) and (k is None or k == d)
    ]


def _related(rel: str, i: int, a: int, v: _View) -> bool:
    m = v.margin
    if rel == "left of":
        return v.xs[i] < v.xs[a] - m
    if rel == "right of":
        return v.xs[i] > v.xs[a] + m
    if rel == "above":
        return v.ys[i] < v.ys[a] - m
    return v.ys[i] > v.ys[a] + m


def _coord(i: int, axis: str, v: _View) -> float:
    if axis == "left":
        return v.xs[i]
    if axis == "right":
        return -v.xs[i]
    if axis == "top":
        return v.ys[i]
    return -v.ys[i]


def resolve(ref: Ref, scene: Scene) -> list[int]:
    """Indices of the objects ``ref`` denotes in ``scene`` (exactly one when unambiguous).

    Orders and relations need a separation of ``4%`` of the image side: an ordinal whose object
    is closer than that to a neighbour, or a superlative with a tie, denotes all tied objects.
    """
    return _resolve(ref, _View(scene))


def _resolve(ref: Ref, v: _View) -> list[int]:
    cand = _members(ref, v)
    if ref.relation is not None:
        anchors = _resolve(ref.anchor, v) if ref.anchor is not None else []
        if len(anchors) != 1:
            return []
        a = anchors[0]
        return [i for i in cand if i != a and _related(ref.relation, i, a, v)]
    if ref.superlative is not None:
        if not cand:
            return []
        sizes = [v.sizes[i] for i in cand]
        best = max(sizes) if ref.superlative == "largest" else min(sizes)
        return [i for i in cand if v.sizes[i] == best]
    if ref.ordinal is not None:
        order = sorted(cand, key=lambda i: _coord(i, ref.axis, v))
        k = ref.ordinal - 1
        if k >= len(order):
            return []
        c = _coord(order[k], ref.axis, v)
        return [i for i in cand if abs(_coord(i, ref.axis, v) - c) < v.margin]
    return cand


def _noun(ref: Ref) -> str:
    words = [w for w in (ref.size, ref.colour) if w]
    words.append(ref.category or "shape")
    return " ".join(words)


def render(ref: Ref, rng: np.random.Generator | None = None) -> str:
    """Text of ``ref``; ``rng`` picks one of a few phrasings (the first when ``None``)."""

    def pick(options: tuple[str, ...] | list[str]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    noun = _noun(ref)
    if isinstance(ref, SetRef):
        plural = " ".join([w for w in (ref.size, ref.colour) if w] + [CATEGORY_PLURALS.get(ref.category, "shapes")])
        return pick([f"every {noun}", f"all {plural}", f"all the {plural}"])
    if ref.relation is not None:
        rel = pick(RELATIONS[ref.relation])
        anchor = render(ref.anchor, None).removeprefix("the ")
        return pick([f"the {noun} {rel} the {anchor}", f"the {noun} that is {rel} the {anchor}"])
    if ref.superlative is not None:
        sup = pick(SUPERLATIVES[ref.superlative])
        return f"the {sup} {noun}"
    if ref.ordinal is not None:
        options = [f"the {ORDINALS[ref.ordinal - 1]} {noun} from the {ref.axis}"]
        if ref.ordinal == 1:
            options.append(f"the {EXTREMES[ref.axis]} {noun}")
        return pick(options)
    return f"the {noun}"


def _filters(attrs: tuple[str, str, str], *, allow_empty: bool) -> list[Ref]:
    size_name, colour_name, cat_name = attrs
    out = []
    for size, colour, cat in product((None, size_name), (None, colour_name), (None, cat_name)):
        if not allow_empty and size is None and colour is None and cat is None:
            continue
        out.append(Ref(size=size, colour=colour, category=cat))
    return out


def _simplest_unique(i: int, v: _View) -> Ref | None:
    for ref in _filters(v.attrs[i], allow_empty=False):
        if len(_members(ref, v)) == 1:
            return ref
    return None


_KINDS = EXPRESSION_KINDS  # the kinds of Ref.kind, in the order generation draws from


def _candidates_of_kind(kind: str, target: int, v: _View) -> list[Ref]:
    out: list[Ref] = []
    anchors = {a: _simplest_unique(a, v) for a in range(v.n) if a != target} if kind == "relation" else {}
    for f in _filters(v.attrs[target], allow_empty=True):
        members = _members(f, v)
        if kind == "attribute":
            if len(members) == 1 and (f.size or f.colour or f.category):
                out.append(f)
            continue
        if len(members) == 1:
            continue
        if kind == "ordinal":
            for axis in ("left", "right", "top", "bottom"):
                order = sorted(members, key=lambda i: _coord(i, axis, v))
                k = order.index(target)
                ref = Ref(size=f.size, colour=f.colour, category=f.category, ordinal=k + 1, axis=axis)
                if k < 4 and _resolve(ref, v) == [target]:
                    out.append(ref)
        elif kind == "superlative":
            if f.size is None:
                for sup in ("largest", "smallest"):
                    ref = Ref(colour=f.colour, category=f.category, superlative=sup)
                    if _resolve(ref, v) == [target]:
                        out.append(ref)
        else:
            for a, g in anchors.items():
                if g is None:
                    continue
                for rel in RELATIONS:
                    # inline of _resolve for a relation whose anchor is unique by construction
                    if not _related(rel, target, a, v):
                        continue
                    if any(i != a and i != target and _related(rel, i, a, v) for i in members):
                        continue
                    out.append(Ref(size=f.size, colour=f.colour, category=f.category, relation=rel, anchor=g))
    return out


def referring_candidates(target: int, scene: Scene) -> dict[str, list[Ref]]:
    """Every program of each kind that resolves to exactly ``target``."""
    v = _View(scene)
    return {kind: _candidates_of_kind(kind, target, v) for kind in _KINDS}


def set_references(scene: Scene) -> list[Ref]:
    """Every set expression (:class:`SetRef`, an attribute filter) that denotes two or more
    objects of ``scene``: "every red shape", "all the small circles"."""
    v = _View(scene)
    seen: set[Ref] = set()
    out: list[Ref] = []
    for attrs in v.attrs:
        for f in _filters(attrs, allow_empty=False):
            ref = SetRef(size=f.size, colour=f.colour, category=f.category)
            if ref not in seen and len(_members(f, v)) >= 2:
                seen.add(ref)
                out.append(ref)
    return out


def absent_references(scene: Scene, *, exclude: frozenset[tuple[str, str]] = frozenset()) -> list[Ref]:
    """Every attribute filter (size, colour, category, each optional but not all absent) that
    denotes *no* object of ``scene``: "the purple cross" when there is none.  ``exclude`` holds
    ``(category, colour)`` names no expression may name together (held-out combinations)."""
    v = _View(scene)
    out = []
    for size, colour, cat in product((None, *SIZE_NAMES), (None, *COLOUR_NAMES), (None, *CATEGORY_NAMES)):
        if size is None and colour is None and cat is None:
            continue
        if (cat, colour) in exclude:
            continue
        ref = Ref(size=size, colour=colour, category=cat)
        if not _members(ref, v):
            out.append(ref)
    return out


def choose_reference(
    target: int, scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = _KINDS
) -> Ref | None:
    """A random unique program for ``target``: a kind uniformly among those of ``kinds`` that
    are available (the first available kind of a random permutation), then a program of that
    kind uniformly.  ``None`` when nothing of those kinds denotes the target alone."""
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise ValueError(f"choose_reference: unknown expression kinds {unknown or kinds}; choose from {_KINDS}")
    v = _View(scene)
    for k in rng.permutation(len(kinds)):
        refs = _candidates_of_kind(kinds[int(k)], target, v)
        if refs:
            return refs[int(rng.integers(len(refs)))]
    return None


def describe_object(o: ShapeObject) -> str:
    return f"a {o.size_name} {o.colour_name} {o.category_name}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """An image caption listing every object left to right (count in words)."""
    objs = sorted(scene.objects, key=lambda o: o.cx)
    parts = [describe_object(o) for o in objs]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    options = [
        f"there {verb} {NUMBER_WORDS[n]} {noun}: {listing}.",
        f"from left to right: {listing}.",
    ]
    return options[int(rng.integers(len(options)))]


VQA_KINDS = ("colour", "shape", "count", "exist", "position")


def vqa_question(scene: Scene, rng: np.random.Generator, focus: int | None = None) -> tuple[str, str, str]:
    """``(question, answer, kind)`` about colour, shape, count, existence or coarse position.

    ``focus`` (an object index) is asked about when the question is about one object.
    """
    objs = scene.objects
    h, w = scene.size
    kinds = list(VQA_KINDS)
    while kinds:
        kind = kinds.pop(int(rng.integers(len(kinds))))
        i = focus if focus is not None else int(rng.integers(len(objs)))
        o = objs[i]
        if kind in ("colour", "shape", "position"):
            # an expression that does not give the answer away
            drop = "colour" if kind == "colour" else "category" if kind == "shape" else None
            v = _View(scene)
            refs = []
            for k in rng.permutation(len(_KINDS)):
                found = _candidates_of_kind(_KINDS[int(k)], i, v)
                refs = [r for r in found if drop is None or getattr(r, drop) is None]
                if refs:
                    break
            if not refs:
                continue
            ref = refs[int(rng.integers(len(refs)))]
            expr = render(ref, rng)
            if kind == "colour":
                q = [f"what colour is {expr}?", f"what is the colour of {expr}?"]
                return q[int(rng.integers(2))], o.colour_name, kind
            if kind == "shape":
                q = [f"what shape is {expr}?", f"what kind of shape is {expr}?"]
                return q[int(rng.integers(2))], o.category_name, kind
            horizontal = bool(rng.random() < 0.5)
            if horizontal:
                side = ("left", "right")[int(rng.integers(2))]
                if abs(o.cx - w / 2) < _MARGIN * w:
                    continue
                yes = (o.cx < w / 2) == (side == "left")
            else:
                side = ("top", "bottom")[int(rng.integers(2))]
                if abs(o.cy - h / 2) < _MARGIN * h:
                    continue
                yes = (o.cy < h / 2) == (side == "top")
            return f"is {expr} in the {side} half?", "yes" if yes else "no", kind
        if kind == "count":
            if rng.random() < 0.5:
                cat = o.category_name
                n = sum(x.category_name == cat for x in objs)
                q = f"how many {CATEGORY_PLURALS[cat]} are there?"
            else:
                col = o.colour_name
                n = sum(x.colour_name == col for x in objs)
                q = f"how many {col} shapes are there?"
            return q, NUMBER_WORDS[n], kind
        # existence: half the time ask about a (colour, category) pair that is absent
        if rng.random() < 0.5:
            col, cat = o.colour_name, o.category_name
        else:
            col = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            cat = CATEGORY_NAMES[int(rng.integers(len(CATEGORY_NAMES)))]
        yes = any(x.colour_name == col and x.category_name == cat for x in objs)
        return f"is there a {col} {cat}?", "yes" if yes else "no", kind
    raise RuntimeError("unreachable: the count question is always available")

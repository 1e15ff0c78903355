"""The Shapes world: a procedural, deterministic referring dataset (see docs/data.md)."""

from __future__ import annotations

from vlzoo.data.shapes.dataset import (
    DEFAULT_REFERENTS,
    REFERENT_SETS,
    RUNG_KINDS,
    RUNGS,
    SPLITS,
    ShapesDataset,
)
from vlzoo.data.shapes.language import (
    Ref,
    SetRef,
    absent_references,
    caption,
    choose_reference,
    referring_candidates,
    render,
    resolve,
    set_references,
    vqa_question,
)
from vlzoo.data.shapes.world import (
    CATEGORY_NAMES,
    COLOUR_NAMES,
    COMPOSITIONAL_HOLDOUT,
    KEYPOINT_NAMES,
    SHAPES_CATEGORIES,
    SIZE_NAMES,
    SKELETON,
    Scene,
    ShapeObject,
    generate_scene,
)

__all__ = [
    "ShapesDataset",
    "SPLITS",
    "RUNGS",
    "RUNG_KINDS",
    "REFERENT_SETS",
    "DEFAULT_REFERENTS",
    "SHAPES_CATEGORIES",
    "CATEGORY_NAMES",
    "COLOUR_NAMES",
    "SIZE_NAMES",
    "KEYPOINT_NAMES",
    "SKELETON",
    "COMPOSITIONAL_HOLDOUT",
    "Scene",
    "ShapeObject",
    "generate_scene",
    "Ref",
    "SetRef",
    "set_references",
    "absent_references",
    "resolve",
    "render",
    "referring_candidates",
    "choose_reference",
    "caption",
    "vqa_question",
]

"""Data: the Shapes world, COCO and RefCOCO readers, transforms, tokenizer and the datamodule.

See docs/data.md for the schema of a sample and what each task fills in.
"""

from __future__ import annotations

from vlzoo.data.answers import BOX_PLACEHOLDER, AnswerFormat, plain_box_text
from vlzoo.data.audio_files import read_audio
from vlzoo.data.coco import CocoDataset
from vlzoo.data.datamodule import DEFAULT_TEMPLATE, PromptTemplate, VLCollate, VLDataModule
from vlzoo.data.errors import DataError
from vlzoo.data.export import export_shapes_coco
from vlzoo.data.grefcoco import GRefCocoDataset
from vlzoo.data.images import load_image
from vlzoo.data.reasonseg import ReasonSegDataset
from vlzoo.data.refcoco import RefCocoDataset, load_refs
from vlzoo.data.regions import RegionReferences
from vlzoo.data.shapes import (
    CATEGORY_NAMES,
    COLOUR_NAMES,
    COMPOSITIONAL_HOLDOUT,
    KEYPOINT_NAMES,
    SHAPES_CATEGORIES,
    SIZE_NAMES,
    SKELETON,
    ShapesDataset,
)
from vlzoo.data.spoken import SpokenReferences, SpokenShapesDataset
from vlzoo.data.templates import (
    FAMILY_INSTRUCTIONS,
    INSTRUCTION_FIELDS,
    INSTRUCTIONS,
    instruction,
    instruction_table,
    reword,
    worded,
)
from vlzoo.data.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, save_shapes_tokenizer, shapes_tokenizer
from vlzoo.data.transforms import ResizeTransform

__all__ = [
    "AnswerFormat",
    "BOX_PLACEHOLDER",
    "plain_box_text",
    "DataError",
    "CocoDataset",
    "RefCocoDataset",
    "GRefCocoDataset",
    "ReasonSegDataset",
    "load_refs",
    "load_image",
    "export_shapes_coco",
    "ShapesDataset",
    "SpokenReferences",
    "SpokenShapesDataset",
    "RegionReferences",
    "SHAPES_CATEGORIES",
    "CATEGORY_NAMES",
    "COLOUR_NAMES",
    "SIZE_NAMES",
    "KEYPOINT_NAMES",
    "SKELETON",
    "COMPOSITIONAL_HOLDOUT",
    "shapes_tokenizer",
    "save_shapes_tokenizer",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "read_audio",
    "ResizeTransform",
    "PromptTemplate",
    "DEFAULT_TEMPLATE",
    "INSTRUCTIONS",
    "FAMILY_INSTRUCTIONS",
    "INSTRUCTION_FIELDS",
    "instruction",
    "instruction_table",
    "reword",
    "worded",
    "VLCollate",
    "VLDataModule",
]

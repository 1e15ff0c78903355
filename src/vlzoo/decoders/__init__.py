"""Decoders: plain ``nn.Module`` heads and the functions around them (no Lightning, no recipes).

Each imports on its own, e.g. ``from vlzoo.decoders import SamMaskDecoder``.  The heads several
paradigms share live here once: :class:`SamPromptHead` (vision features + prompts -> SAM masks,
one neck for every mask paradigm) and :func:`mask_loss_parts` (one spelling of the mask losses).
"""

from __future__ import annotations

from vlzoo.decoders.aligner import AlignerOutput, ConvAligner, DenseAligner
from vlzoo.decoders.box import (
    BoxDecoder,
    BoxEncoder,
    box_cycle_losses,
    box_losses,
    denormalise_boxes,
    normalise_boxes,
    valid_boxes,
)
from vlzoo.decoders.heatmap import (
    box_heatmap_targets,
    decode_boxes,
    find_peaks,
    gaussian_heatmap_targets,
    heatmap_focal_loss,
    refine_subpixel,
)
from vlzoo.decoders.keypoints import (
    AttentionRefinementHead,
    PointDescriptor,
    QueryPooling,
    box_projection_loss,
    extract_keypoints,
    interior_point,
    text_to_image_attention,
)
from vlzoo.decoders.prompt import PromptMLP, TriggerImageAttention, mask_losses
from vlzoo.decoders.sam import SAM_DECODER_VARIANTS, SamMaskDecoder
from vlzoo.decoders.sam_prompt import MASK_LOSS_PARTS, RENAMED_LOSS_PARTS, SamPromptHead, mask_loss_parts

__all__ = [
    "MASK_LOSS_PARTS",
    "RENAMED_LOSS_PARTS",
    "SAM_DECODER_VARIANTS",
    "AlignerOutput",
    "AttentionRefinementHead",
    "BoxDecoder",
    "BoxEncoder",
    "ConvAligner",
    "DenseAligner",
    "PointDescriptor",
    "PromptMLP",
    "QueryPooling",
    "SamMaskDecoder",
    "SamPromptHead",
    "TriggerImageAttention",
    "box_cycle_losses",
    "box_heatmap_targets",
    "box_losses",
    "box_projection_loss",
    "decode_boxes",
    "denormalise_boxes",
    "extract_keypoints",
    "find_peaks",
    "gaussian_heatmap_targets",
    "heatmap_focal_loss",
    "interior_point",
    "mask_loss_parts",
    "mask_losses",
    "normalise_boxes",
    "refine_subpixel",
    "text_to_image_attention",
    "valid_boxes",
]

"""The SAM prompt head every mask paradigm shares, and the names of its loss parts.

:class:`SamPromptHead` turns a backbone's vision features and a paradigm's prompts into mask
logits, the same way for every paradigm:

1. **Neck**: a 1x1 convolution from the feature width to SAM's ``embed_dim`` and a one-group
   ``GroupNorm``, then a bilinear resize to the decoder's ``image_embedding_size``.
2. **Prompts**: boxes and points given in network-input pixels are scaled into the decoder's
   ``input_image_size`` frame; extra sparse prompt tokens (an LM state through a
   :class:`~vlzoo.decoders.PromptMLP`, point descriptors) are appended as they are.
3. **Decoder**: the :class:`~vlzoo.decoders.SamMaskDecoder` (one mask, or SAM's three with the
   one of highest predicted IoU kept: ``multimask``).
4. **Output**: the low-resolution logits upsampled to the network input.

Why this neck: SAM's decoder was trained on the output of SAM's own neck, which ends in a
normalisation; a bare projection (the heatmap paradigm's former neck) hands it features at
whatever scale the LMM's vision tower has.  A single-group GroupNorm normalises each map to
zero mean and unit variance without batch statistics (so it behaves the same at batch size 1
and under gradient accumulation) and was already the neck of pixel2emb and LENS; one 1x1 layer
keeps the head light next to the decoder.  One neck for every paradigm means that two mask
paradigms compared on RES differ in the paradigm only.

What differs between paradigms is only *what they prompt with*, which stays theirs: pixel2emb a
trigger state (``sparse_embeddings``) and optionally its decoded box, heatmap a box and its
centre, LENS a keypoint (a point) and its descriptor tokens.

Loss parts: :func:`mask_loss_parts` names the mask losses the same way in every paradigm -
``mask_bce`` (or ``mask_focal``), ``mask_dice`` and, with an IoU prediction, ``mask_iou``.
:data:`RENAMED_LOSS_PARTS` lists the spellings they replaced, so a recipe that still uses one
gets an error naming the new key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.decoders.prompt import mask_losses

__all__ = ["SamPromptHead", "mask_loss_parts", "MASK_LOSS_PARTS", "RENAMED_LOSS_PARTS"]

#: every mask loss part a paradigm may produce (which of bce / focal: the paradigm's choice)
MASK_LOSS_PARTS: tuple[str, ...] = ("mask_bce", "mask_focal", "mask_dice", "mask_iou")

#: former spellings of loss parts -> their name now (``loss_weights`` keys are checked against it)
RENAMED_LOSS_PARTS: dict[str, str] = {"mask": "mask_bce", "dice": "mask_dice"}


def mask_loss_parts(
    logits: Tensor, target: Tensor, *, iou_pred: Tensor | None = None, kind: str = "bce"
) -> dict[str, Tensor]:
    """:func:`~vlzoo.decoders.mask_losses` under the shared part names: ``mask_bce`` (or
    ``mask_focal``), ``mask_dice`` and, when ``iou_pred`` is given, ``mask_iou``."""
    return {f"mask_{k}": v for k, v in mask_losses(logits, target, iou_pred=iou_pred, kind=kind).items()}


class SamPromptHead(nn.Module):
    """Vision features + prompts -> SAM mask logits at the network input (see the module doc).

    Args:
        decoder: a built :class:`~vlzoo.decoders.SamMaskDecoder` (or a module with its
            interface: ``embed_dim``, ``image_embedding_size``, ``input_image_size``).
        feature_dim: channels of the feature map the head reads (a paradigm passes the
            backbone's ``vision_width``, or its ``hidden_size`` for LMM states on the grid).
        input_size: side in pixels of the network input: the frame of the prompts and of the
            output logits (a paradigm passes the backbone's ``input_size``).
    """

    def __init__(self, *, decoder: nn.Module, feature_dim: int, input_size: int) -> None:
        super().__init__()
        for attr in ("embed_dim", "image_embedding_size", "input_image_size"):
            if not hasattr(decoder, attr):
                raise ValueError(
                    f"paradigm.mask_decoder ({type(decoder).__name__}) has no '{attr}': use "
                    "vlzoo.decoders.SamMaskDecoder or a module with its interface"
                )
        dim = int(decoder.embed_dim)
        self.decoder = decoder
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.neck = nn.Sequential(nn.Conv2d(self.feature_dim, dim, 1), nn.GroupNorm(1, dim))

    @property
    def embed_dim(self) -> int:
        return int(self.decoder.embed_dim)

    def embed(self, features: Tensor) -> Tensor:
        """``(N, feature_dim, h, w)`` -> SAM image embeddings ``(N, embed_dim, *image_embedding_size)``."""
        weight = self.neck[0].weight
        embeddings = self.neck(features.to(weight.dtype))
        size = tuple(self.decoder.image_embedding_size)
        if tuple(embeddings.shape[-2:]) != size:
            embeddings = F.interpolate(embeddings, size=size, mode="bilinear", align_corners=False)
        return embeddings

    def forward(
        self,
        features: Tensor,
        *,
        boxes: Tensor | None = None,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        sparse_embeddings: Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One mask per row.

        Args:
            features: ``(N, feature_dim, h, w)`` the feature map of each row's image (repeat an
                image's map to ask several prompts of it).
            boxes: ``(N, 4)`` xyxy in network-input pixels.
            points: ``(N, P, 2)`` xy in network-input pixels.
            point_labels: ``(N, P)`` SAM's labels (1 foreground, 0 background); default all 1.
            sparse_embeddings: ``(N, n, embed_dim)`` extra prompt tokens.
            multimask: ask SAM for its three masks and keep the one of highest predicted IoU.

        Returns:
            ``(logits (N, S, S), iou (N,))`` with ``S = input_size``.
        """
        embeddings = self.embed(features)
        scale = float(self.decoder.input_image_size) / float(self.input_size)
        prompt_points = None
        if points is not None:
            coords = points.to(embeddings.dtype) * scale
            labels = point_labels
            if labels is None:
                labels = torch.ones(coords.shape[:2], dtype=torch.long, device=coords.device)
            prompt_points = (coords, labels)
        prompt_boxes = None if boxes is None else boxes.to(embeddings.dtype) * scale
        if sparse_embeddings is not None:
            sparse_embeddings = sparse_embeddings.to(embeddings.dtype)
        low, iou = self.decoder(
            embeddings,
            points=prompt_points,
            boxes=prompt_boxes,
            sparse_embeddings=sparse_embeddings,
            multimask_output=multimask,
        )
        if multimask:
            best = iou.argmax(dim=1)
            rows = torch.arange(low.shape[0], device=low.device)
            low, iou = low[rows, best][:, None], iou[rows, best][:, None]
        side = self.input_size
        if tuple(low.shape[-2:]) != (side, side):
            low = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        return low[:, 0], iou[:, 0]


"""SAM's prompt encoder and mask decoder as one module, with extra sparse prompt embeddings.

:class:`SamMaskDecoder` wraps ``segment_anything``'s ``PromptEncoder`` and ``MaskDecoder``
(two-way transformer) under the same attribute names as SAM itself, so an official checkpoint
(``sam_vit_{b,l,h}_*.pth``: keys ``prompt_encoder.*`` and ``mask_decoder.*``) loads as is.

Beyond SAM's point / box / mask prompts, ``sparse_embeddings`` ``(B, n, embed_dim)`` are
appended to the sparse prompt tokens: this is how LISA's ``[SEG]`` and NExT-Chat's trigger
feed an LM hidden state (projected to ``embed_dim`` by the paradigm) to the decoder.

Unlike SAM's own ``MaskDecoder.forward`` (one image, many prompts), the batch here pairs image
``b`` with prompt set ``b``; to ask several prompts of one image, repeat its embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo.weights import load_weights

__all__ = ["SamMaskDecoder", "SAM_DECODER_VARIANTS"]

_OFFICIAL = {
    "transformer_dim": 256,
    "depth": 2,
    "num_heads": 8,
    "mlp_dim": 2048,
    "image_embedding_size": 64,
    "input_image_size": 1024,
    "mask_in_chans": 16,
    "iou_head_hidden_dim": 256,
}

#: Decoder settings per SAM variant (the three official ones share one decoder design).
SAM_DECODER_VARIANTS: dict[str, dict[str, int]] = {
    "vit_b": dict(_OFFICIAL),
    "vit_l": dict(_OFFICIAL),
    "vit_h": dict(_OFFICIAL),
    "tiny": {
        "transformer_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "mlp_dim": 64,
        "image_embedding_size": 8,
        "input_image_size": 64,
        "mask_in_chans": 4,
        "iou_head_hidden_dim": 32,
    },
}


class SamMaskDecoder(nn.Module):
    """SAM prompt encoder + mask decoder.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h`` (SAM's decoder: 256 channels, depth 2) or
            ``tiny`` (32 channels, depth 1) for CPU tests.
        checkpoint: an official SAM checkpoint file (or any file with ``prompt_encoder.`` /
            ``mask_decoder.`` keys); other keys (``image_encoder.``) are ignored.
        transformer_dim, depth, num_heads, mlp_dim: override the variant's two-way transformer.
        image_embedding_size: side of the image-embedding grid the decoder expects (SAM: 64).
        input_image_size: side of the input image in pixels; point and box prompts are in these
            pixels (SAM: 1024).

    Attributes:
        embed_dim: channel count of image embeddings and prompt tokens (``transformer_dim``).
        image_embedding_size: ``(h, w)`` of the image-embedding grid; masks come out at 4x.
    """

    def __init__(
        self,
        *,
        variant: str = "vit_h",
        checkpoint: str | None = None,
        transformer_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        image_embedding_size: int | None = None,
        input_image_size: int | None = None,
    ) -> None:
        super().__init__()
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        if variant not in SAM_DECODER_VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_DECODER_VARIANTS)}")
        spec: dict[str, Any] = dict(SAM_DECODER_VARIANTS[variant])
        overrides = {
            "transformer_dim": transformer_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_dim": mlp_dim,
            "image_embedding_size": image_embedding_size,
            "input_image_size": input_image_size,
        }
        spec.update({k: v for k, v in overrides.items() if v is not None})
        self.variant = variant
        self.embed_dim = int(spec["transformer_dim"])
        side = int(spec["image_embedding_size"])
        self.image_embedding_size = (side, side)
        self.input_image_size = int(spec["input_image_size"])
        self.prompt_encoder = PromptEncoder(
            embed_dim=self.embed_dim,
            image_embedding_size=self.image_embedding_size,
            input_image_size=(self.input_image_size, self.input_image_size),
            mask_in_chans=int(spec["mask_in_chans"]),
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=self.embed_dim,
            transformer=TwoWayTransformer(
                depth=int(spec["depth"]),
                embedding_dim=self.embed_dim,
                num_heads=int(spec["num_heads"]),
                mlp_dim=int(spec["mlp_dim"]),
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=int(spec["iou_head_hidden_dim"]),
        )
        if checkpoint is not None:
            from vlzoo.backbones.shipped import read_weights

            if read_weights(checkpoint, "SamMaskDecoder"):
                self.load_sam_checkpoint(checkpoint)

    def load_sam_checkpoint(self, path: str | Path) -> None:
        """Load the ``prompt_encoder.`` and ``mask_decoder.`` weights of a SAM checkpoint file."""
        state = load_weights(path, what="SAM checkpoint")
        own = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if not own:
            raise ValueError(f"{path}: no 'prompt_encoder.' / 'mask_decoder.' keys; is this a SAM checkpoint?")
        try:
            self.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not match SamMaskDecoder(variant={self.variant!r}): {err}") from err

    def image_pe(self) -> Tensor:
        """``(1, embed_dim, h, w)`` dense positional encoding of the image-embedding grid."""
        return self.prompt_encoder.get_dense_pe()

    def forward(
        self,
        image_embeddings: Tensor,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        sparse_embeddings: Tensor | None = None,
        mask_inputs: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Decode one mask (or three with ``multimask_output``) per image.

        Args:
            image_embeddings: ``(B, embed_dim, h, w)``, ``(h, w) == image_embedding_size``.
            points: ``(coords (B, P, 2) xy in input pixels, labels (B, P))``; label 1 foreground,
                0 background, -1 ignored (SAM's convention).
            boxes: ``(B, 4)`` xyxy in input pixels.
            sparse_embeddings: ``(B, n, embed_dim)`` extra prompt tokens, appended after the
                point and box tokens.
            mask_inputs: ``(B, 1, 4h, 4w)`` low-resolution mask logits as a dense prompt.
            multimask_output: return SAM's three ambiguity-aware masks instead of the single one.

        Returns:
            ``(mask_logits (B, M, 4h, 4w), iou_predictions (B, M))`` with ``M`` 1 or 3.
        """
        b, _, h, w = image_embeddings.shape
        if (h, w) != self.image_embedding_size:
            raise ValueError(f"image embeddings are {h}x{w}; this decoder expects {self.image_embedding_size}")
        pe = self.prompt_encoder
        sparse = image_embeddings.new_zeros(b, 0, self.embed_dim)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, pe._embed_points(coords, labels, pad=boxes is None)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, pe._embed_boxes(boxes.reshape(b, 4))], 1)
        if sparse_embeddings is not None:
            if sparse_embeddings.ndim != 3 or sparse_embeddings.shape[0] != b or sparse_embeddings.shape[2] != self.embed_dim:
                raise ValueError(
                    f"sparse_embeddings must be (B={b}, n, {self.embed_dim}); got {tuple(sparse_embeddings.shape)}"
                )
            sparse = torch.cat([sparse, sparse_embeddings.to(sparse.dtype)], 1)
        if mask_inputs is not None:
            dense = pe._embed_masks(mask_inputs)
        else:
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
        masks, iou = self._predict(image_embeddings, self.image_pe(), sparse, dense)
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        return masks[:, :1], iou[:, :1]

    def _predict(self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """``MaskDecoder.predict_masks`` with image ``b`` paired to prompt set ``b``."""
        md = self.mask_decoder
        b, c, h, w = image_embeddings.shape
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], 1)
        src = image_embeddings + dense
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = md.transformer(src, pos, tokens)
        iou_token = hs[:, 0]
        mask_tokens = hs[:, 1 : 1 + md.num_mask_tokens]
        upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], 1)
        _, cu, hu, wu = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu)
        return masks, md.iou_prediction_head(iou_token)

"""References as a backbone feature (AnyRef): a box, an image crop or a spoken clip in a prompt
becomes ``<ref_start>`` + k embedding tokens + ``<ref_end>``.

The prompt carries the span :func:`vlzoo.structures.reference_text` ``(modality, k)`` - one
placeholder token per modality (``<ref>`` crop, ``<ref_box>`` box, ``<ref_audio>`` clip), k of
them - and the backbone replaces the placeholders' input embeddings by k tokens computed from the
row's :class:`~vlzoo.structures.References` (``Batch.references()``):

* **crop** (one per prompt box, in order): the box cut out of the image with ``roi_align``,
  resized to the input, encoded by the backbone's vision encoder and projector, average-pooled on
  a ``sqrt(k)`` square grid (k must be a square number);
* **box** (one per prompt box): the normalised box through an MLP to k tokens;
* **audio** (the row's clip): :class:`~vlzoo.backbones.WhisperAudioEncoder`, its states over the
  clip average-pooled to k, then a projector to the LM width.

Every paradigm gets references this way (the backbone does it inside ``forward`` / ``decode``,
before the image is spliced), so "segment what this clip refers to" needs no paradigm code.  A
row whose placeholders do not match its references (count, or a clip missing) is an error naming
the sample's row and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.audio import WhisperAudioEncoder
from vlzoo.backbones.multimodal import build_projector
from vlzoo.structures import REFERENCE_END, REFERENCE_START, REFERENCE_TOKENS, References

__all__ = ["ReferenceEncoder", "crop_reference_tokens"]

MODALITIES = tuple(REFERENCE_TOKENS)


def crop_reference_tokens(
    encode_images: Callable[[Tensor], tuple[Tensor, Tensor]],
    images: Tensor,
    boxes: Tensor,
    *,
    tokens: int,
    grid: tuple[int, int],
) -> Tensor:
    """AnyRef's image-crop reference: crop each box out of its image, resize the crop to the input
    size, encode it with the backbone (vision encoder + projector) and average-pool the projected
    tokens on a ``sqrt(tokens)`` square grid.

    Args:
        encode_images: the backbone's ``encode_images`` (``-> (feature_map, tokens (B, N, D))``).
        images: ``(R, 3, S, S)`` the image of each reference.
        boxes: ``(R, 4)`` input-pixel boxes.
        tokens: tokens per reference.
        grid: the backbone's feature grid ``(h, w)``.
    Returns:
        ``(R, tokens, D)``.
    """
    from torchvision.ops import roi_align

    size = images.shape[-2:]
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    crops = roi_align(images, rois.to(images.dtype), output_size=tuple(size), aligned=True)
    _, projected = encode_images(crops)
    h, w = grid
    side = int(round(tokens**0.5))
    fmap = projected.transpose(1, 2).reshape(projected.shape[0], projected.shape[-1], h, w)
    return F.adaptive_avg_pool2d(fmap, side).flatten(2).transpose(1, 2)


class ReferenceEncoder(nn.Module):
    """k embedding tokens per reference, spliced at the reference placeholders (see module doc).

    A backbone's ``references`` sub-slot; the backbone calls :meth:`bind` with its LM width.

    Args:
        tokens: k, tokens per reference (a square number when ``crop`` is a modality).
        modalities: which references the prompts may hold: ``crop``, ``box``, ``audio``.
        audio: the audio encoder (required with ``audio``).
        projector: ``linear`` or ``mlp2x_gelu``, audio states -> LM width.
    """

    def __init__(
        self,
        *,
        tokens: int = 4,
        modalities: list[str] | tuple[str, ...] = ("crop",),
        audio: WhisperAudioEncoder | None = None,
        projector: str = "mlp2x_gelu",
    ) -> None:
        super().__init__()
        modalities = tuple(modalities)
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ValueError(f"backbone.references.modalities: unknown {unknown} or empty; choose from {list(MODALITIES)}")
        if tokens < 1:
            raise ValueError(f"backbone.references.tokens must be >= 1, got {tokens}")
        side = int(round(tokens**0.5))
        if "crop" in modalities and side * side != tokens:
            raise ValueError(f"backbone.references.tokens must be a square number for crop references, got {tokens}")
        if "audio" in modalities and audio is None:
            raise ValueError("backbone.references.audio (an audio encoder, e.g. WhisperAudioEncoder) is required for audio references")
        if audio is not None and "audio" not in modalities:
            raise ValueError("backbone.references.audio is given but 'audio' is not in backbone.references.modalities")
        self.tokens = int(tokens)
        self.modalities = modalities
        self.audio = audio
        self.projector_kind = projector
        self.audio_projector: nn.Module | None = None
        self.box_mlp: nn.Module | None = None
        self.hidden_size: int | None = None

    @property
    def special_tokens(self) -> list[str]:
        return [REFERENCE_START, REFERENCE_END] + [REFERENCE_TOKENS[m] for m in self.modalities]

    def bind(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        """Build the parts that map to the LM width (called by the backbone)."""
        self.hidden_size = int(hidden_size)
        if self.audio is not None:
            self.audio_projector = build_projector(self.projector_kind, self.audio.dim, self.hidden_size).to(dtype)
        if "box" in self.modalities:
            self.box_mlp = nn.Sequential(
                nn.Linear(4, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, self.tokens * self.hidden_size)
            ).to(dtype)

    # ------------------------------------------------------------------ the tokens
    def audio_tokens(self, clips: list) -> Tensor:
        """``(R, k, D)``: each clip's encoder states over the clip pooled to k, projected."""
        states, valid = self.audio(clips)
        pooled = [
            F.adaptive_avg_pool1d(states[i, : int(valid[i])].T[None], self.tokens)[0].T for i in range(len(clips))
        ]
        x = torch.stack(pooled)
        weight = next(self.audio_projector.parameters())
        return self.audio_projector(x.to(weight.dtype))

    def box_tokens(self, boxes: Tensor, input_size: tuple[int, int]) -> Tensor:
        """``(R, k, D)`` from ``(R, 4)`` input-pixel boxes."""
        h, w = input_size
        scale = boxes.new_tensor([w, h, w, h])
        weight = next(self.box_mlp.parameters())
        return self.box_mlp((boxes / scale).to(weight.dtype)).reshape(len(boxes), self.tokens, -1)

    def embed(
        self,
        text_embeds: Tensor,
        input_ids: Tensor,
        references: References | None,
        *,
        token_ids: dict[str, int],
        images: Tensor,
        encode_images: Callable[[Tensor], tuple[Tensor, Tensor]],
        grid: tuple[int, int],
    ) -> Tensor:
        """``text_embeds`` with every placeholder replaced by its reference's tokens.

        A row's clip fills its ``<ref_audio>`` span.  Its crop and box spans (runs of k ``<ref>``
        / ``<ref_box>``) take the row's prompt boxes in prompt order; there are as many spans as
        prompt boxes, or none (the boxes are then referred to otherwise, e.g. a pixel2emb
        ``<loc>`` or plain text)."""
        out = text_embeds
        if "audio" in self.modalities:
            out = self._embed_audio(out, input_ids, references, token_ids)
        spatial = [m for m in ("crop", "box") if m in self.modalities]
        if not spatial:
            return out
        kinds = torch.full_like(input_ids, -1)
        for i, m in enumerate(spatial):
            kinds[input_ids == token_ids[REFERENCE_TOKENS[m]]] = i
        rows_with = (kinds >= 0).any(1).nonzero().flatten().tolist()
        if not rows_with:
            return out
        self._need(references, " / ".join(REFERENCE_TOKENS[m] for m in spatial))
        jobs: dict[str, list[tuple[int, Tensor, Tensor]]] = {m: [] for m in spatial}  # (row, box, columns)
        for row in rows_with:
            cols = (kinds[row] >= 0).nonzero().flatten()
            boxes = references.prompt_boxes[row].reshape(-1, 4) if row < len(references.prompt_boxes) else torch.zeros(0, 4)
            if len(cols) != self.tokens * len(boxes):
                raise ValueError(
                    f"row {row}: {len(cols)} crop / box reference tokens for {len(boxes)} prompt boxes x {self.tokens} "
                    "backbone.references.tokens; write each prompt box as reference_text(modality, tokens)"
                )
            for i, box in enumerate(boxes):
                span = cols[i * self.tokens : (i + 1) * self.tokens]
                span_kinds = kinds[row, span].unique().tolist()
                if len(span_kinds) != 1 or int(span[-1] - span[0]) != self.tokens - 1:
                    raise ValueError(f"row {row}: reference {i} is not {self.tokens} consecutive placeholders of one modality")
                jobs[spatial[span_kinds[0]]].append((row, box, span))
        for modality, items in jobs.items():
            if not items:
                continue
            boxes = torch.stack([b for _, b, _ in items]).float().to(images.device)
            if modality == "box":
                tokens = self.box_tokens(boxes, tuple(images.shape[-2:]))
            else:
                index = torch.tensor([r for r, _, _ in items], device=images.device)
                tokens = crop_reference_tokens(encode_images, images[index], boxes, tokens=self.tokens, grid=grid)
            r = torch.cat([torch.full((self.tokens,), row, dtype=torch.long) for row, _, _ in items]).to(out.device)
            c = torch.cat([span for _, _, span in items]).to(out.device)
            out = out.index_put((r, c), tokens.reshape(-1, tokens.shape[-1]).to(out.dtype))
        return out

    @staticmethod
    def _need(references: References | None, placeholder: str) -> None:
        if references is None:
            raise ValueError(
                f"the prompts hold {placeholder} references but the backbone was given no references "
                "(pass references=batch.references())"
            )

    def _embed_audio(
        self, out: Tensor, input_ids: Tensor, references: References | None, token_ids: dict[str, int]
    ) -> Tensor:
        placeholder = REFERENCE_TOKENS["audio"]
        is_ref = input_ids == token_ids[placeholder]
        counts = is_ref.sum(1).tolist()
        if not any(counts):
            return out
        self._need(references, placeholder)
        rows = []
        for row, n in enumerate(counts):
            has = row < len(references.audio) and references.audio[row] is not None
            if n != self.tokens * int(has):
                raise ValueError(
                    f"row {row}: {n} {placeholder} tokens for {int(has)} x a spoken clip (Sample.reference_audio) x "
                    f"{self.tokens} backbone.references.tokens; write the clip as reference_text('audio', tokens)"
                )
            if has:
                rows.append(row)
        tokens = self.audio_tokens([references.audio[r] for r in rows])
        r, c = is_ref.nonzero(as_tuple=True)  # row-major: each row's k tokens in order
        return out.index_put((r, c), tokens.reshape(-1, tokens.shape[-1]).to(out.dtype))

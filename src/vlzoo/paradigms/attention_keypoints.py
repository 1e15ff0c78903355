"""LENS: segmentation as a plug-in for a *frozen* multimodal LM.

The LMM is never changed - no LoRA, no new token, no trainable row, kept in eval mode - and a
light head reads what it already computes when it reads the prompt:

1. **Attention maps**: the attention of chosen layers and heads from the query text positions
   (the prompt after the image) to the image tokens, on the image-token grid, one channel per
   (layer, head).  Which text positions speak for the query is learned from the LMM's own hidden
   states (:class:`~vlzoo.decoders.keypoints.QueryPooling`), which also gives the query's
   *global semantic feature*.
2. **Refinement head**: a few convolutions turn the attention channels (optionally with the
   frozen vision features, modulated by the semantic feature) into a target heatmap, trained
   with CenterNet's focal loss against Gaussians at each target's interior point.
3. **Keypoints**: the top peaks of the heatmap, refined below the cell (log-parabola fit).
4. **Point descriptors**: each keypoint becomes a positive point prompt, a descriptor
   (cross-attention from its positional encoding to the image features) and the semantic token:
   the sparse prompt of a SAM mask decoder, which outputs the mask; boxes are the masks' extents.

Masks train with BCE + dice (RES / instance seg); samples with boxes only (REC / detection)
train the mask through its x / y projections (BoxInst), so a box derived from the mask is
exactly what they supervise.

The promise: attaching and training the head leaves the LMM's behaviour untouched (its
parameters get no gradient and never change, greedy generation and logits stay identical) and
the head alone is a small file (:meth:`AttentionKeypoints.save_head`) that loads onto the same
frozen LMM (:meth:`AttentionKeypoints.load_head` checks a fingerprint of it).

A frozen *randomly initialised* LMM has meaningless attention: the recipe starts from a stage-0
checkpoint (``backbone.checkpoint=``, trained with ``paradigms/language_modeling.py``).

Shared, not LENS's own: the SAM prompt head (:class:`~vlzoo.decoders.SamPromptHead`: neck,
prompt scaling, decoder, multimask choice, upsampling - this paradigm only chooses its prompts,
a keypoint as a point and its descriptor tokens), the mask loss names (``mask_bce``,
``mask_dice``, ``mask_iou``) and the sizes (all from the backbone interface,
:class:`~vlzoo.backbones.Backbone`).  LENS's own: reading the frozen LMM's attention, the
refinement head, keypoint extraction, point descriptors and the box-projection loss.  Head
files written before the shared head (``embed.*`` / ``decoder.*``, now ``mask_head.neck.*`` /
``mask_head.decoder.*``) do not load (:meth:`AttentionKeypoints.load_head` says so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.ops import masks_to_boxes

from vlzoo.backbones.interface import Backbone, check_attention_maps, check_backbone
from vlzoo.data.answers import AnswerFormat
from vlzoo.decoders.heatmap import gaussian_heatmap_targets, heatmap_focal_loss
from vlzoo.decoders.keypoints import (
    AttentionRefinementHead,
    PointDescriptor,
    QueryPooling,
    box_projection_loss,
    extract_keypoints,
    interior_point,
    text_to_image_attention,
)
from vlzoo.decoders.sam import SamMaskDecoder
from vlzoo.decoders.sam_prompt import SamPromptHead, mask_loss_parts
from vlzoo.paradigms.base import BaseParadigm, OptimizerFactory, SchedulerFactory
from vlzoo.structures import CATEGORY_TASKS, Batch, Predictions, Sample, Targets
from vlzoo.weights import load_weights

__all__ = ["AttentionKeypoints", "AttentionKeypointsAnswer", "HEAD_FORMAT"]

#: format tag of :meth:`AttentionKeypoints.save_head` files
HEAD_FORMAT = "vlzoo-attention-keypoints-head/1"
_MASK_TASKS = ("res", "seg", "gres")
#: tasks answered with every heatmap peak above ``peak_threshold`` (none: an empty answer)
_MULTI_TASKS = ("seg", "det", "grec", "gres")


class AttentionKeypointsAnswer(AnswerFormat):
    """No special tokens and no location in the answer: the frozen LMM is only *read* while it
    reads the prompt, so a localization answer is empty (the collate still appends eos)."""

    special_tokens: tuple[str, ...] = ()

    def localization_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        return ""


@dataclass
class _Reading:
    """What the head computed from one pass of the frozen LMM over the prompts."""

    heatmap: Tensor  # (B, H', W') logits
    attention: Tensor  # (B, C, h, w) text -> image attention channels
    semantic: Tensor  # (B, hidden) pooled query feature
    image_features: Tensor  # (B, C, h, w) frozen vision features or image-token states
    mask_features: Tensor  # (B, C', h, w) what SAM's image embeddings are made from


class AttentionKeypoints(BaseParadigm):
    """A frozen LMM, a head reading its attention, keypoints and a SAM mask decoder (LENS).

    Args:
        backbone: the frozen ``MultimodalBackbone`` (injected); it is frozen here whatever its
            own ``freeze_*`` settings say; LoRA on it is an error.
            Every size comes from the backbone (:class:`~vlzoo.backbones.Backbone`).
        mask_decoder: a :class:`~vlzoo.decoders.sam.SamMaskDecoder` (``variant: tiny`` for CPU,
            ``vit_h`` + ``checkpoint`` for SAM's own); default the tiny one sized to the
            backbone.  It is wrapped in the shared :class:`~vlzoo.decoders.SamPromptHead`
            (``self.mask_head``), prompted with each keypoint and its descriptor tokens.
        multimask: ask SAM for its three masks and keep the one of highest predicted IoU
            (SAM's answer to an ambiguous single click) instead of the single-mask output.
        attention_layers: LM layers whose attention is read (negative counts from the end;
            default every layer).
        attention_heads: heads kept in every chosen layer (default all).
        use_image_features: let the refinement head also see the image features, gated by the
            semantic feature (LENS reads attention alone; a tiny LMM's attention is coarse, see
            docs/paradigms/attention_keypoints.md).
        image_source: the image features the head, the point descriptors and the SAM decoder
            read: ``"vision"`` (the frozen vision encoder's map, as in LENS) or ``"language"``
            (the frozen LMM's last hidden states at the image tokens; with the instruction
            before the image they are query-aware - still only what the frozen LMM computes).
        mask_source: the features SAM's image embeddings are made from, ``"vision"`` or
            ``"language"`` (default: ``image_source``).  The vision map keeps the image's
            detail; query-aware LMM states are better at *which* object than at its outline.
        head_channels, head_layers: width and depth of the refinement head.
        match_heads: query-to-cell similarity maps the head adds to its features (see
            :class:`~vlzoo.decoders.keypoints.AttentionRefinementHead`; needs
            ``use_image_features``).
        heatmap_upsample: the heatmap is this many times finer than the image-token grid.
        min_radius: smallest Gaussian radius of a target, in heatmap cells.
        refine: sub-pixel refinement, ``"quadratic"`` or ``"soft_argmax"``.
        max_instances: peaks kept for ``seg`` / ``det`` / ``grec`` / ``gres`` (and instances trained per sample).
        peak_threshold: score a ``seg`` / ``det`` / ``grec`` / ``gres`` peak must exceed (REC / RES keep
            the top one); on grec / gres no peak above it is the answer "no object" (an empty mask).
        point_jitter: training keypoints are the targets' interior points moved by up to this
            many pixels, so the mask decoder learns to work from imperfect predicted peaks.
        mask_threshold: mask logit threshold at prediction.
    """

    name: ClassVar[str] = "attention_keypoints"
    supported_tasks: ClassVar[tuple[str, ...]] = ("res", "rec", "seg", "det", "grec", "gres")

    def __init__(
        self,
        *,
        backbone: Backbone,
        mask_decoder: SamMaskDecoder | None = None,
        evaluator: Any | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        loss_weights: dict[str, float] | None = None,
        tasks: list[str] | None = None,
        attention_layers: list[int] | None = None,
        attention_heads: list[int] | None = None,
        use_image_features: bool = True,
        image_source: str = "vision",
        mask_source: str | None = None,
        head_channels: int = 64,
        head_layers: int = 3,
        match_heads: int = 0,
        heatmap_upsample: int = 2,
        min_radius: int = 1,
        refine: str = "quadratic",
        max_instances: int = 10,
        peak_threshold: float = 0.3,
        point_jitter: float = 2.0,
        mask_threshold: float = 0.0,
        multimask: bool = False,
    ) -> None:
        check_backbone(backbone, self.name)
        check_attention_maps(backbone, self.name, "paradigm._target_",
                             "pick pixel2seq, heatmap or pixel2emb for this backbone")
        if getattr(backbone, "peft_model", None) is not None:
            raise ValueError(
                "paradigm 'attention_keypoints' keeps the LMM frozen: remove backbone.lora from the recipe"
            )
        super().__init__(
            backbone=backbone,
            answer_format=AttentionKeypointsAnswer(),
            evaluator=evaluator,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_weights=loss_weights,
            tasks=tasks,
        )
        if match_heads and not use_image_features:
            raise ValueError("paradigm.match_heads needs paradigm.use_image_features: true (it matches the query to them)")
        mask_source = image_source if mask_source is None else mask_source
        for key, value in (("image_source", image_source), ("mask_source", mask_source)):
            if value not in ("vision", "language"):
                raise ValueError(f"paradigm.{key} must be 'vision' or 'language', got {value!r}")
        if refine not in ("quadratic", "soft_argmax"):
            raise ValueError(f"paradigm.refine must be 'quadratic' or 'soft_argmax', got {refine!r}")
        backbone.requires_grad_(False)
        backbone.eval()
        text_config = _text_config(backbone)
        num_layers = int(text_config.num_hidden_layers)
        num_heads = int(text_config.num_attention_heads)
        layers = list(range(num_layers)) if attention_layers is None else list(attention_layers)
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad or not layers:
            raise ValueError(
                f"paradigm.attention_layers {attention_layers} must name layers of the {num_layers}-layer LM"
            )
        self.attention_layers = sorted({i % num_layers for i in layers})
        heads = list(range(num_heads)) if attention_heads is None else list(attention_heads)
        if not heads or any(not 0 <= h < num_heads for h in heads):
            raise ValueError(f"paradigm.attention_heads {attention_heads} must name heads of the {num_heads}-head LM")
        self.attention_heads = heads
        hidden_size, vision_width = int(backbone.hidden_size), int(backbone.vision_width)
        self.feature_grid = (int(backbone.feature_grid[0]), int(backbone.feature_grid[1]))
        tokens = getattr(backbone, "num_image_tokens", None)  # a backbone whose image tokens are not its grid
        if tokens is not None and int(tokens) != self.feature_grid[0] * self.feature_grid[1]:
            raise ValueError(
                f"paradigm 'attention_keypoints' reads the LM's attention over the image tokens as a "
                f"{self.feature_grid[0]}x{self.feature_grid[1]} map, but {type(backbone).__name__} gives the LM "
                f"{int(tokens)} image tokens that are not on its feature grid; use heatmap, pixel2emb or pixel2seq "
                "on this backbone"
            )
        self.input_size = int(backbone.input_size)
        self.heatmap_upsample = heatmap_upsample
        self.min_radius = min_radius
        self.refine = refine
        self.max_instances = max_instances
        self.peak_threshold = peak_threshold
        self.point_jitter = point_jitter
        self.mask_threshold = mask_threshold
        self.image_source = image_source
        self.mask_source = mask_source
        feature_dim = vision_width if image_source == "vision" else hidden_size
        mask_dim = vision_width if mask_source == "vision" else hidden_size
        self.pooling = QueryPooling(hidden_size=hidden_size)
        self.head = AttentionRefinementHead(
            in_channels=len(self.attention_layers) * len(heads),
            vision_dim=feature_dim if use_image_features else 0,
            query_dim=hidden_size,
            hidden_channels=head_channels,
            num_layers=head_layers,
            upsample=heatmap_upsample,
            match_heads=match_heads,
        )
        self.multimask = multimask
        if mask_decoder is None:
            mask_decoder = SamMaskDecoder(
                variant="tiny", image_embedding_size=self.feature_grid[0], input_image_size=self.input_size
            )
        self.mask_head = SamPromptHead(decoder=mask_decoder, feature_dim=mask_dim, input_size=self.input_size)
        dim = self.mask_head.embed_dim
        self.descriptor = PointDescriptor(
            embed_dim=dim,
            vision_dim=feature_dim,
            query_dim=hidden_size,
            num_heads=max(1, min(4, dim // 16)),
            positional_encoding=mask_decoder.prompt_encoder.pe_layer,
        )

    # ------------------------------------------------------------------ the frozen LMM
    def train(self, mode: bool = True) -> AttentionKeypoints:
        """Lightning switches the whole module to train mode; the LMM stays in eval mode (no
        dropout), so what the head reads is exactly what the LMM computes at inference."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _read(self, batch: Batch) -> _Reading:
        with torch.no_grad():
            out = self.backbone(
                images=batch.images,
                input_ids=batch.prompt_ids,
                attention_mask=batch.prompt_attention_mask,
                output_attentions=self.attention_layers,
                references=batch.references(),
            )
        t = out.hidden_states.shape[1]
        after_image = torch.arange(t, device=out.hidden_states.device)[None] > out.image_positions[:, -1:]
        query = out.attention_mask.bool() & after_image
        weights, semantic = self.pooling(out.hidden_states, query)
        attention = text_to_image_attention(
            [out.attentions[i] for i in self.attention_layers],
            weights,
            out.image_positions,
            self.feature_grid,
            heads=self.attention_heads,
        )
        feats = self._image_features(out, self.image_source).float()
        masks = feats if self.mask_source == self.image_source else self._image_features(out, self.mask_source).float()
        heat = self.head(attention, image_features=feats, query=semantic)
        return _Reading(heat, attention, semantic, feats, masks)

    def _image_features(self, out: Any, source: str) -> Tensor:
        """``(B, C, h, w)``: the vision features, or the LMM's last hidden states at the image
        tokens laid on the feature grid (``image_source`` / ``mask_source``)."""
        if source == "vision":
            return out.image_features
        states = out.image_hidden_states()
        h, w = self.feature_grid
        if states.shape[1] != h * w:
            raise ValueError(
                f"paradigm image_source / mask_source 'language': the LMM has {states.shape[1]} image tokens, "
                f"not the {h}x{w} feature grid; use 'vision' for this backbone"
            )
        return states.transpose(1, 2).reshape(states.shape[0], -1, h, w)

    # ------------------------------------------------------------------ targets
    def _points_of(self, target: Targets, task: str) -> tuple[Tensor, Tensor]:
        """Keypoints ``(N, 2)`` (input pixels) and sizes ``(N, 2)`` (w, h) of a sample's objects."""
        boxes = target.boxes.float()
        if task in _MASK_TASKS and target.masks is not None and len(target):
            points = torch.stack([interior_point(m) if m.any() else _centre(b) for m, b in zip(target.masks, boxes, strict=False)])
        else:
            points = torch.stack([_centre(b) for b in boxes]) if len(target) else boxes.new_zeros(0, 2)
        sizes = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1.0)
        return points[: self.max_instances], sizes[: self.max_instances]

    def _heatmap_targets(self, batch: Batch, grid: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        h, w = batch.input_size
        maps, all_points = [], []
        for target, task in zip(batch.targets, batch.tasks, strict=False):
            points, sizes = self._points_of(target, task)
            scale = torch.tensor([grid[1] / w, grid[0] / h])
            maps.append(gaussian_heatmap_targets(points * scale, sizes * scale, grid, min_radius=self.min_radius))
            all_points.append(points)
        return torch.stack(maps), all_points

    # ------------------------------------------------------------------ masks from keypoints
    def _masks(self, reading: _Reading, sample_index: Tensor, points: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One mask per keypoint: ``points (M, 2)`` input pixels of samples ``sample_index (M,)``
        -> (logits ``(M, H, W)`` at input size, predicted IoU ``(M,)``)."""
        h, w = size
        feats = reading.image_features[sample_index]
        norm = (points / torch.tensor([w, h], dtype=points.dtype, device=points.device)).clamp(0, 1)
        extra = self.descriptor(norm[:, None], feats, reading.semantic[sample_index])
        return self.mask_head(
            reading.mask_features[sample_index],
            points=norm[:, None] * self.input_size,
            sparse_embeddings=extra,
            multimask=self.multimask,
        )

    # ------------------------------------------------------------------ the paradigm contract
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        reading = self._read(batch)
        grid = tuple(reading.heatmap.shape[-2:])
        target_maps, points = self._heatmap_targets(batch, grid)
        parts = {"heatmap": heatmap_focal_loss(reading.heatmap, target_maps.to(reading.heatmap.device))}
        index = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(points)])
        flat = torch.cat(points).to(reading.heatmap.device)
        if self.training and self.point_jitter > 0 and len(flat):
            flat = flat + (torch.rand_like(flat) * 2 - 1) * self.point_jitter
        h, w = batch.input_size
        zero = reading.heatmap.sum() * 0
        if not len(flat):  # every sample refers to nothing (grec / gres): the heatmap alone learns
            zero = zero + sum(p.sum() * 0.0 for p in self.mask_head.parameters() if p.requires_grad)
            return {**parts, "mask_bce": zero, "mask_dice": zero, "mask_iou": zero, "box_projection": zero}
        flat = torch.stack([flat[:, 0].clamp(0, w - 1e-3), flat[:, 1].clamp(0, h - 1e-3)], dim=-1)
        logits, iou = self._masks(reading, index.to(flat.device), flat, (h, w))
        masked, boxed = [], []
        for row, (i, k) in enumerate(_object_rows(points)):
            target, task = batch.targets[i], batch.tasks[i]
            (masked if task in _MASK_TASKS and target.masks is not None else boxed).append((row, i, k))
        if masked:
            rows = torch.tensor([r for r, _, _ in masked], device=logits.device)
            gt = torch.stack([batch.targets[i].masks[k] for _, i, k in masked]).to(logits.device)
            parts.update(mask_loss_parts(logits[rows], gt, iou_pred=iou[rows]))
        else:
            parts.update({"mask_bce": zero, "mask_dice": zero, "mask_iou": zero})
        if boxed:
            rows = torch.tensor([r for r, _, _ in boxed], device=logits.device)
            gt_boxes = torch.stack([batch.targets[i].boxes[k] for _, i, k in boxed]).to(logits.device)
            parts["box_projection"] = box_projection_loss(logits[rows], gt_boxes)
        else:
            parts["box_projection"] = zero
        return parts

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Predictions]:
        reading = self._read(batch)
        probs = reading.heatmap.sigmoid()
        size = batch.input_size
        found, index = [], []
        for i, task in enumerate(batch.tasks):
            multi = task in _MULTI_TASKS
            pts, scores = extract_keypoints(
                probs[i],
                image_size=size,
                k=self.max_instances if multi else 1,
                threshold=self.peak_threshold if multi else 0.0,
                refine=self.refine,
            )
            found.append((pts, scores))
            index += [i] * len(pts)
        flat = torch.cat([p for p, _ in found]) if index else probs.new_zeros(0, 2)
        if len(flat):
            logits, iou = self._masks(reading, torch.tensor(index, device=flat.device), flat, size)
        else:
            logits, iou = probs.new_zeros(0, *size), probs.new_zeros(0)
        out, start = [], 0
        for i, (pts, scores) in enumerate(found):
            n = len(pts)
            masks = logits[start : start + n] > self.mask_threshold
            mask_scores = iou[start : start + n].float()
            start += n
            label = batch.category_id(i) if batch.tasks[i] in CATEGORY_TASKS else 0
            out.append(
                Predictions(
                    boxes=_boxes_of(masks, pts),
                    scores=scores,
                    labels=torch.full((n,), label, dtype=torch.long),
                    masks=masks,
                    mask_scores=mask_scores,
                    image_id=batch.image_ids[i],
                    image_size=size,
                    evidence={
                        "heatmap": probs[i],
                        "points": pts,
                        "attention": reading.attention[i].mean(0),
                    },
                )
            )
        return out

    # ------------------------------------------------------------------ the head alone
    def head_state_dict(self) -> dict[str, Tensor]:
        """Every trainable tensor and buffer outside the frozen LMM (the head's checkpoint)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def backbone_fingerprint(self) -> str:
        """A hash of the frozen LMM's weights: a head only makes sense on the LMM it was trained on."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone.state_dict().items()):
            t = tensor.detach().double()
            digest.update(name.encode())
            digest.update(f"{tuple(t.shape)}:{t.sum().item():.10e}:{(t * t).sum().item():.10e}".encode())
        return digest.hexdigest()

    def save_head(self, path: str | Path) -> None:
        """Write the head alone (not the LMM) with what it needs to check its LMM on load."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": HEAD_FORMAT,
            "attention_layers": self.attention_layers,
            "attention_heads": self.attention_heads,
            "backbone_fingerprint": self.backbone_fingerprint(),
            "state_dict": self.head_state_dict(),
        }
        torch.save(blob, str(path))

    def load_head(self, path: str | Path, *, check_backbone: bool = True) -> None:
        """Load a :meth:`save_head` file; the LMM must be the one the head was trained on
        (``check_backbone=False`` skips that check, e.g. for a re-saved copy of the same LMM)."""
        blob = load_weights(path, what="attention_keypoints head file")
        if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path} is not an attention_keypoints head file (save_head)")
        if (blob["attention_layers"], blob["attention_heads"]) != (self.attention_layers, self.attention_heads):
            raise ValueError(
                f"{path}: head reads layers {blob['attention_layers']} / heads {blob['attention_heads']}, "
                f"this paradigm {self.attention_layers} / {self.attention_heads} (paradigm.attention_layers/heads)"
            )
        if check_backbone and blob["backbone_fingerprint"] != self.backbone_fingerprint():
            raise ValueError(
                f"{path}: the head was trained on a different frozen LMM (fingerprint mismatch); "
                "build the backbone from the same checkpoint (backbone.checkpoint=...)"
            )
        state = blob["state_dict"]
        if any(k.startswith(("embed.", "decoder.")) for k in state):
            raise ValueError(
                f"{path}: a head file written before the shared SAM prompt head (weights 'embed.*' / "
                "'decoder.*', now 'mask_head.neck.*' / 'mask_head.decoder.*'); train and save the head again"
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"{path}: head does not fit this paradigm: missing {missing}, unexpected {unexpected}")


def _text_config(backbone: nn.Module) -> Any:
    """The LM's transformers config: ``MultimodalBackbone.language.model`` or ``LlavaBackbone.model``."""
    language = getattr(backbone, "language", None)
    model = getattr(language, "model", None) or getattr(backbone, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"paradigm 'attention_keypoints' cannot find the LM config of {type(backbone).__name__} "
            "(expected .language.model.config or .model.config) to count its layers and heads"
        )
    return config.get_text_config()


def _centre(box: Tensor) -> Tensor:
    return torch.stack([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _object_rows(points: list[Tensor]) -> list[tuple[int, int]]:
    """``(sample, object)`` of every row of the flattened keypoints."""
    return [(i, k) for i, p in enumerate(points) for k in range(len(p))]


def _boxes_of(masks: Tensor, points: Tensor) -> Tensor:
    """Boxes of masks; an empty mask gets a one-pixel box at its keypoint (never a crash, and
    scored as the miss it is)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    boxes = torch.zeros(masks.shape[0], 4, device=masks.device)
    nonempty = masks.flatten(1).any(1)
    if nonempty.any():
        b = masks_to_boxes(masks[nonempty])
        b[:, 2:] += 1  # masks_to_boxes gives inclusive pixel indices; boxes cover the pixels
        boxes[nonempty] = b
    if (~nonempty).any():
        p = points[~nonempty].to(boxes)
        boxes[~nonempty] = torch.cat([p - 0.5, p + 0.5], dim=-1)
    return boxes

"""pixel2emb: a trigger token's hidden state is decoded into a box and a mask; a box can also be
*input* as an embedding (NExT-Chat), with LISA's ``[SEG]`` variant and AnyRef's options.

The method, in the order one batch meets it:

1. **Answers.**  :class:`EmbeddingAnswerFormat` writes every object of a localization answer as
   ``<trigger><loc>`` (optionally after its name: a *grounded* answer such as
   ``the red circle <trigger><loc>``); a box referred to in a prompt (REG) is written ``<loc>``
   or, with AnyRef's unified references, ``<ref_start> <ref> x k <ref_end>``.
2. **Input embeddings.**  Through the backbone's ``inputs_embeds_fn`` hook every ``<loc>`` input
   embedding is replaced by ``BoxEncoder(box)`` (the ground-truth box after a trigger - teacher
   forcing - or the prompt's box); every ``<ref>`` (crop), ``<ref_audio>`` (clip) ... gets the
   tokens of the backbone's reference encoder (:mod:`vlzoo.backbones.references`, shared by
   every paradigm).  The LM loss skips the ``<loc>`` that follows a trigger: generation inserts it.
3. **Heads.**  The last-layer hidden state at each ``<trigger>`` (optionally *refocused*:
   ``h + lambda * sum_i a_i h_i`` with ``a_i`` the normalised last-layer attention from the
   trigger to the answer tokens before it, AnyRef) optionally attends to the image tokens
   (:class:`~vlzoo.decoders.TriggerImageAttention`), then goes to ``BoxDecoder`` (L1 + GIoU) and
   to ``PromptMLP`` -> SAM mask decoder (decoded box as extra box prompt) for masks (BCE / focal
   + Dice + IoU MSE).  The cycle losses tie ``BoxEncoder`` and ``BoxDecoder``.
4. **Generation** (``predict``) is greedy, through the backbone's shared KV-cached loop
   (:func:`~vlzoo.backbones.generation.greedy_decode`) with NExT-Chat's hooks: when a row emits
   a trigger, its box (and mask) is decoded from the hidden state of the pass over the trigger
   and the row's next input is forced to ``<loc>`` carrying ``BoxEncoder(decoded box)`` - that
   embedding is appended to the cache like any token's.  Rows decode in a left-padded batch as
   they would alone; ``use_cache=False`` re-runs the sequence every step with the same answers.

Loss parts (weights in ``loss_weights``; defaults in :data:`DEFAULT_LOSS_WEIGHTS`): ``lm``,
``box_l1``, ``box_giou``, ``cycle_embedding``, ``cycle_box``, ``mask_bce`` or ``mask_focal``,
``mask_dice``, ``mask_iou``, ``attention`` - only the parts of the heads a recipe configures.

``attention_target`` (off by default; not in any of the papers - an option of issue 18 item 6
on what makes selection learnable): supervises the trigger's attention over the image tokens
with the referred object, the target distribution being the object's mask (its box when the
sample has no mask) pooled on the feature grid; the loss is ``KL(target || attention)``.
``"cross"`` supervises the :class:`~vlzoo.decoders.TriggerImageAttention` weights (averaged
over heads), ``"lmm"`` the LMM's own last-layer attention from the trigger position to the
image positions (averaged over heads, renormalised over the image tokens).  Prediction is
unchanged: it is a training signal only.

Shared, not pixel2emb's own: the SAM prompt head (:class:`~vlzoo.decoders.SamPromptHead`: neck,
prompt scaling, decoder, upsampling - this paradigm only chooses its prompts, the trigger's
``PromptMLP`` tokens and optionally the decoded box), the mask loss names, the order of the
objects of an answer (:func:`vlzoo.structures.answer_order`) and the sizes (all from the backbone
interface, :class:`~vlzoo.backbones.Backbone`).  pixel2emb's own: the trigger / ``<loc>``
answers, box embeddings as input, the box heads and cycle losses, refocusing and the NExT-Chat decoding hooks.  Checkpoints written before the shared head
(``mask_projection.*`` / ``mask_decoder.*``, now ``mask_head.neck.*`` / ``mask_head.decoder.*``)
do not load into this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.generation import DecodingHooks, DecodingState
from vlzoo.backbones.interface import Backbone, check_attention_maps, check_backbone
from vlzoo.backbones.references import crop_reference_tokens
from vlzoo.data.answers import AnswerFormat
from vlzoo.decoders.box import (
    BoxDecoder,
    BoxEncoder,
    box_cycle_losses,
    box_losses,
    denormalise_boxes,
    normalise_boxes,
)
from vlzoo.decoders.prompt import PromptMLP, TriggerImageAttention
from vlzoo.decoders.sam import SamMaskDecoder
from vlzoo.decoders.sam_prompt import SamPromptHead, mask_loss_parts
from vlzoo.paradigms.base import BaseParadigm, OptimizerFactory, SchedulerFactory
from vlzoo.structures import (
    CATEGORY_TASKS,
    REFERENCE_TOKENS,
    Batch,
    Predictions,
    Sample,
    answer_order,
    reference_text,
)

__all__ = [
    "EmbeddingAnswerFormat",
    "Pixel2Emb",
    "DEFAULT_LOSS_WEIGHTS",
    "box_grid_share",
    "answer_order",
    "refocus",
    "crop_reference_tokens",
]

#: NExT-Chat's box weights (L1 2.0, GIoU 0.2) and LISA's mask weights (BCE 2.0, Dice 0.5);
#: a recipe's ``loss_weights`` override them part by part.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "lm": 1.0,
    "box_l1": 2.0,
    "box_giou": 0.2,
    "cycle_embedding": 1.0,
    "cycle_box": 1.0,
    "mask_bce": 2.0,
    "mask_focal": 2.0,
    "mask_dice": 0.5,
    "mask_iou": 1.0,
    "attention": 1.0,
}
#: which attention ``attention_target`` supervises
ATTENTION_TARGETS = ("cross", "lmm")

_MASK_TASKS = ("res", "seg", "gres")
_BOX_TASKS = ("rec", "det", "res", "seg", "grec", "gres")
#: generalized referring: one trigger per referent, none for an expression that refers to nothing
_SET_TASKS = ("grec", "gres")


class EmbeddingAnswerFormat(AnswerFormat):
    """How pixel2emb writes locations: ``<trigger><loc>`` per object, ``<loc>`` (or a crop
    reference) for a box in a prompt.

    Args:
        trigger: the token whose hidden state is decoded (``<trigger>``; LISA: ``[SEG]``).
        loc: the token whose input embedding carries a box (``<loc>``).
        box_after_trigger: write ``<loc>`` after every trigger (NExT-Chat); off for LISA.
        grounded: write the object's name before its trigger (the expression for rec/res, the
            category for det/seg): an answer mixing text and boxes.
        prefix: text before the first object (LISA: ``"sure, it is"`` style); ``""`` for none.
        separator: text between objects.
        reference: how a prompt box is referred to: ``"box"`` (``<loc>``, box encoder) or
            ``"crop"`` (AnyRef: the crop's vision features pooled to ``crop_tokens`` tokens
            between ``<ref_start>`` and ``<ref_end>``, computed by the backbone's reference
            encoder - ``backbone.references`` with modality ``crop`` and ``tokens: crop_tokens``).
        crop_tokens: tokens per crop reference (a square number: pooled on a k x k grid).
        none_answer: the answer of a grec / gres expression that refers to nothing: text
            without a trigger (a referent set is one trigger per referent, in the shared
            answer order, each named by the expression when ``grounded``).
    """

    def __init__(
        self,
        *,
        trigger: str = "<trigger>",
        loc: str = "<loc>",
        box_after_trigger: bool = True,
        grounded: bool = False,
        prefix: str = "",
        separator: str = " and ",
        reference: str = "box",
        crop_tokens: int = 4,
        none_answer: str = "none",
    ) -> None:
        if not none_answer.strip() or trigger in none_answer:
            raise ValueError(f"EmbeddingAnswerFormat: none_answer must be non-empty text without the trigger, got {none_answer!r}")
        if reference not in ("box", "crop"):
            raise ValueError(f"EmbeddingAnswerFormat: reference must be 'box' or 'crop', got {reference!r}")
        side = int(round(crop_tokens**0.5))
        if side * side != crop_tokens or crop_tokens < 1:
            raise ValueError(f"EmbeddingAnswerFormat: crop_tokens must be a square number, got {crop_tokens}")
        self.trigger = trigger
        self.loc = loc
        self.box_after_trigger = box_after_trigger
        self.grounded = grounded
        self.prefix = prefix
        self.separator = separator
        self.reference = reference
        self.crop_tokens = crop_tokens
        self.none_answer = none_answer
        self.ref_start, self.ref_token, self.ref_end = "<ref_start>", REFERENCE_TOKENS["crop"], "<ref_end>"
        tokens = [trigger]
        if box_after_trigger or reference == "box":
            tokens.append(loc)
        if reference == "crop":
            tokens += [self.ref_start, self.ref_token, self.ref_end]
        self.special_tokens = tuple(tokens)

    def object_text(self, name: str | None) -> str:
        """One object of an answer: ``[name ]<trigger>[<loc>]``."""
        text = self.trigger + (self.loc if self.box_after_trigger else "")
        return f"{name} {text}" if self.grounded and name else text

    def box_in_prompt(self, box: list[float], input_size: tuple[int, int]) -> str:
        if self.reference == "box":
            return self.loc
        return reference_text("crop", self.crop_tokens)

    def localization_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        t = sample.targets
        if sample.task in _SET_TASKS:
            if len(t) == 0:
                return self.none_answer
            expression = t.expressions[0] if t.expressions else None
            body = self.separator.join(self.object_text(expression) for _ in answer_order(t.boxes))
            return f"{self.prefix} {body}".strip() if self.prefix else body
        if len(t) == 0:
            raise ValueError(
                f"sample {sample.image_id} ({sample.task}): pixel2emb writes one trigger per object, "
                "and the targets hold no box"
            )
        if sample.task in ("rec", "res"):
            names = [t.expressions[0] if t.expressions else None]
            order = [0]
        else:
            category = sample.category_name
            order = answer_order(t.boxes)
            names = [category] * len(order)
        body = self.separator.join(self.object_text(n) for n in names[: len(order)])
        return f"{self.prefix} {body}".strip() if self.prefix else body


def refocus(hidden: Tensor, attention: Tensor, *, query: int, keys: Tensor, strength: float) -> Tensor:
    """AnyRef's refocusing of one segmentation-token state.

    ``hidden[query] + strength * sum_i a_i hidden[keys[i]]`` with ``a = attention[:, query, keys]``
    averaged over heads and normalised to sum 1 over ``keys``.  With no keys the state is returned
    unchanged.

    Args:
        hidden: ``(T, D)`` last-layer hidden states of one sequence.
        attention: ``(heads, T, T)`` last-layer attention probabilities of that sequence, or
            ``(heads, T)``: the query's row alone (what a cached decoding step computes).
        query: index of the trigger / ``[SEG]`` position.
        keys: ``(K,)`` indices of the answer tokens it attends to.
        strength: lambda.
    """
    if keys.numel() == 0 or strength == 0.0:
        return hidden[query]
    row = attention[:, query] if attention.dim() == 3 else attention
    a = row[:, keys].float().mean(0)
    a = a / a.sum().clamp(min=1e-9)
    return hidden[query] + strength * (a.to(hidden.dtype)[:, None] * hidden[keys]).sum(0)


def box_grid_share(boxes: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(N, h, w)``: the fraction of each cell of an ``h x w`` grid over the unit square that
    each normalised ``x1, y1, x2, y2`` box covers (0..1)."""
    h, w = grid
    xs = torch.arange(w + 1, device=boxes.device, dtype=torch.float32) / w
    ys = torch.arange(h + 1, device=boxes.device, dtype=torch.float32) / h
    b = boxes.float()
    ox = (torch.minimum(b[:, 2:3], xs[None, 1:]) - torch.maximum(b[:, 0:1], xs[None, :-1])).clamp(min=0) * w
    oy = (torch.minimum(b[:, 3:4], ys[None, 1:]) - torch.maximum(b[:, 1:2], ys[None, :-1])).clamp(min=0) * h
    return oy[:, :, None] * ox[:, None, :]


class Pixel2Emb(BaseParadigm):
    """Trigger-token embeddings decoded into boxes and masks (NExT-Chat, LISA, AnyRef).

    Args:
        backbone: the backbone (:class:`~vlzoo.backbones.Backbone`; injected); every size comes
            from it.
        answer_format: an :class:`EmbeddingAnswerFormat` (default NExT-Chat style).
        box_decoder: :class:`BoxDecoder` (needed for rec / det).
        box_encoder: :class:`BoxEncoder` (needed when ``<loc>`` is written: boxes as input).
        image_attention: optional :class:`TriggerImageAttention` between the trigger state and
            the heads (off by default, as in the papers; see docs/paradigms/pixel2emb.md).
        prompt_mlp: :class:`PromptMLP` to the mask decoder's sparse prompt (built from the mask
            decoder's width when a mask decoder is given without one).
        mask_decoder: a :class:`~vlzoo.decoders.sam.SamMaskDecoder` (needed for res / seg),
            wrapped in the shared :class:`~vlzoo.decoders.SamPromptHead` (``self.mask_head``)
            over the backbone's vision features.
        box_prompt: also give the decoded box to the mask decoder as its box prompt (NExT-Chat).
        mask_loss: ``"bce"`` (LISA) or ``"focal"`` (SAM / NExT-Chat).
        cycle: compute the two cycle losses (needs both box heads).
        refocus_lambda: AnyRef's refocusing strength (0 disables it; AnyRef uses 0.1).
        attention_target: ``None`` (default), ``"cross"`` or ``"lmm"``: supervise the trigger's
            attention over the image tokens with the referred object (see the module notes).
        head_lr: learning rate of the heads (box / prompt / attention / mask decoder); ``None``
            uses the optimizer's.  Heads trained from scratch on a pretrained LMM often want more.
        lm_loss: train the LM cross-entropy on the answer (off: heads only).
        evaluator, optimizer, scheduler, loss_weights, tasks, max_new_tokens, use_cache: see
            ``BaseParadigm``.
    """

    name: ClassVar[str] = "pixel2emb"
    supported_tasks: ClassVar[tuple[str, ...]] = ("rec", "res", "det", "seg", "reg", "caption", "vqa", "grec", "gres")

    def __init__(
        self,
        *,
        backbone: Backbone,
        answer_format: EmbeddingAnswerFormat | None = None,
        box_decoder: BoxDecoder | None = None,
        box_encoder: BoxEncoder | None = None,
        image_attention: TriggerImageAttention | None = None,
        prompt_mlp: PromptMLP | None = None,
        mask_decoder: SamMaskDecoder | None = None,
        box_prompt: bool = True,
        mask_loss: str = "bce",
        cycle: bool = True,
        refocus_lambda: float = 0.0,
        attention_target: str | None = None,
        head_lr: float | None = None,
        lm_loss: bool = True,
        evaluator: Any | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        loss_weights: dict[str, float] | None = None,
        tasks: list[str] | None = None,
        max_new_tokens: int = 32,
        use_cache: bool = True,
    ) -> None:
        check_backbone(backbone, self.name)
        fmt = answer_format if answer_format is not None else EmbeddingAnswerFormat()
        if mask_loss not in ("bce", "focal"):
            raise ValueError(f"paradigm.mask_loss must be 'bce' or 'focal', got {mask_loss!r}")
        if refocus_lambda < 0:
            raise ValueError(f"paradigm.refocus_lambda must be >= 0, got {refocus_lambda}")
        if refocus_lambda > 0:
            check_attention_maps(backbone, self.name, "paradigm.refocus_lambda", "set paradigm.refocus_lambda: 0")
        if attention_target not in (None, *ATTENTION_TARGETS):
            raise ValueError(f"paradigm.attention_target must be null, 'cross' or 'lmm', got {attention_target!r}")
        if attention_target == "cross" and image_attention is None:
            raise ValueError(
                "paradigm.attention_target: cross supervises the trigger-to-image cross-attention, and "
                "paradigm.image_attention is not set: add a vlzoo.decoders.TriggerImageAttention or use 'lmm'"
            )
        if attention_target == "lmm":
            check_attention_maps(backbone, self.name, "paradigm.attention_target", "set paradigm.attention_target: null")
        self.attention_target = attention_target
        self._head_parts = {
            "box": box_decoder is not None,
            "encoder": box_encoder is not None,
            "mask": mask_decoder is not None,
            "cycle": cycle and box_decoder is not None and box_encoder is not None,
        }
        defaults = {k: v for k, v in DEFAULT_LOSS_WEIGHTS.items() if k in self._produced_parts(mask_loss, lm_loss)}
        loss_weights = dict(loss_weights or {})
        if not self._head_parts["cycle"]:
            # cycle: false (or no box encoder) switches the cycle losses off: the weights a base recipe
            # gives them weight nothing, so `paradigm.cycle=false` alone is the switch
            for part in ("cycle_embedding", "cycle_box"):
                loss_weights.pop(part, None)
        super().__init__(
            backbone=backbone,
            answer_format=fmt,
            evaluator=evaluator,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_weights={**defaults, **(loss_weights or {})},
            tasks=tasks,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )
        self._check_heads(fmt, box_decoder, box_encoder, mask_decoder)
        self.box_decoder = box_decoder
        self.box_encoder = box_encoder
        self.image_attention = image_attention
        if mask_decoder is not None and prompt_mlp is None:
            prompt_mlp = PromptMLP(hidden_size=int(backbone.hidden_size), prompt_dim=int(mask_decoder.embed_dim))
        self.prompt_mlp = prompt_mlp
        self.box_prompt = box_prompt and box_decoder is not None
        # the LMM's vision features stand in for SAM's image embedding (LISA keeps SAM's own
        # ViT-H encoder; with a SAM encoder as the backbone's vision tower this is 256 -> 256)
        self.mask_head = (
            None
            if mask_decoder is None
            else SamPromptHead(
                decoder=mask_decoder, feature_dim=int(backbone.vision_width), input_size=int(backbone.input_size)
            )
        )
        self.mask_loss = mask_loss
        self.cycle = self._head_parts["cycle"]
        self.refocus_lambda = float(refocus_lambda)
        self.head_lr = head_lr
        self.lm_loss = lm_loss
        ids = self.special_token_ids
        self.trigger_id = ids.get(fmt.trigger, -1)
        self.loc_id = ids.get(fmt.loc, -1)
        self.ref_id = ids.get(fmt.ref_token, -1)
        if fmt.reference == "crop":
            encoder = getattr(backbone, "references", None)
            if encoder is None or "crop" not in encoder.modalities or encoder.tokens != fmt.crop_tokens:
                raise ValueError(
                    f"answer_format.reference: crop needs the backbone's reference encoder to make the crop tokens: "
                    f"set backbone.references to a vlzoo.backbones.ReferenceEncoder with modalities [crop] and "
                    f"tokens: {fmt.crop_tokens} (answer_format.crop_tokens)"
                )

    # ------------------------------------------------------------------ construction checks
    def _produced_parts(self, mask_loss: str, lm_loss: bool) -> set[str]:
        parts = {"lm"} if lm_loss else set()
        if self._head_parts["box"]:
            parts |= {"box_l1", "box_giou"}
        if self._head_parts["cycle"]:
            parts |= {"cycle_embedding", "cycle_box"}
        if self._head_parts["mask"]:
            parts |= {f"mask_{mask_loss}", "mask_dice", "mask_iou"}
        if self.attention_target is not None:
            parts |= {"attention"}
        return parts

    def _check_heads(self, fmt: EmbeddingAnswerFormat, box_decoder: Any, box_encoder: Any, mask_decoder: Any) -> None:
        if any(t in ("rec", "det", "grec") for t in self.tasks) and box_decoder is None:
            raise ValueError("paradigm.box_decoder is required for tasks rec / det / grec (paradigm.tasks)")
        if any(t in _MASK_TASKS for t in self.tasks) and mask_decoder is None:
            raise ValueError("paradigm.mask_decoder is required for tasks res / seg / gres (paradigm.tasks)")
        if (fmt.box_after_trigger or (fmt.reference == "box" and "reg" in self.tasks)) and box_encoder is None:
            raise ValueError(
                "paradigm.box_encoder is required when the answer format writes <loc> "
                "(answer_format.box_after_trigger, or reg with answer_format.reference='box')"
            )
        if fmt.box_after_trigger and box_decoder is None:
            raise ValueError(
                "answer_format.box_after_trigger needs paradigm.box_decoder (the <loc> after a trigger "
                "carries the decoded box); set box_after_trigger: false for a mask-only ([SEG]) recipe"
            )

    # ------------------------------------------------------------------ input embeddings
    def _prompt_boxes(self, batch: Batch, row: int) -> Tensor:
        """The boxes referred to in a row's prompt (``Batch.prompt_boxes``, input pixels),
        normalised to the network input."""
        boxes = batch.prompt_boxes[row] if row < len(batch.prompt_boxes) else None
        if boxes is None or boxes.numel() == 0:
            return torch.zeros(0, 4, device=batch.images.device)
        return normalise_boxes(boxes.float().reshape(-1, 4).to(batch.images.device), batch.input_size)

    def _embedding_plan(self, batch: Batch, input_ids: Tensor) -> dict[tuple[int, int], Tensor]:
        """What replaces the ``<loc>`` input embeddings of ``input_ids``: ``{(row, index):
        normalised box}`` (a ``<loc>`` right after a trigger takes the row's next target box -
        teacher forcing; any other one the next prompt box).  The targets are read only for a
        ``<loc>`` after a trigger, which a prompt (predict) never has.  Crop / audio references
        are the backbone's (``references=batch.references()``)."""
        fmt: EmbeddingAnswerFormat = self.answer_format  # type: ignore[assignment]
        plan: dict[tuple[int, int], Tensor] = {}
        for row in range(input_ids.shape[0]):
            ids = input_ids[row]
            prompt_boxes = self._prompt_boxes(batch, row)
            targets: Tensor | None = None  # read on the first <loc> after a trigger (training only)
            n_prompt = n_answer = 0
            locs = (ids == self.loc_id).nonzero().flatten().tolist() if self.loc_id >= 0 else []
            for i in locs:
                if i > 0 and int(ids[i - 1]) == self.trigger_id:
                    if targets is None:
                        targets = self._target_boxes(batch, row)
                    if n_answer >= len(targets):
                        raise ValueError(
                            f"sample {batch.image_ids[row]} ({batch.tasks[row]}): more <loc> after triggers "
                            f"than target boxes ({len(targets)})"
                        )
                    plan[(row, i)] = targets[n_answer]
                    n_answer += 1
                else:
                    if n_prompt >= len(prompt_boxes):
                        raise ValueError(
                            f"sample {batch.image_ids[row]} ({batch.tasks[row]}): the prompt has more {fmt.loc} "
                            f"than Batch.prompt_boxes ({len(prompt_boxes)})"
                        )
                    plan[(row, i)] = prompt_boxes[n_prompt]
                    n_prompt += 1
        return plan

    def _embeds_fn(self, plan: dict[tuple[int, int], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        """The backbone's ``inputs_embeds_fn``: box embeddings at ``<loc>``."""

        def fn(embeds: Tensor, input_ids: Tensor) -> Tensor:
            if not plan:
                return embeds
            rows = torch.tensor([r for r, _ in plan], device=embeds.device)
            cols = torch.tensor([c for _, c in plan], device=embeds.device)
            boxes = torch.stack(list(plan.values())).to(embeds.device)
            return embeds.index_put((rows, cols), self.box_encoder(boxes).to(embeds.dtype))

        return fn

    def _target_boxes(self, batch: Batch, row: int) -> Tensor:
        """A row's target boxes, normalised, in answer order."""
        t = batch.targets[row]
        if len(t) == 0 or batch.tasks[row] not in _BOX_TASKS:
            return torch.zeros(0, 4, device=batch.images.device)
        order = [0] if batch.tasks[row] in ("rec", "res") else answer_order(t.boxes)
        return normalise_boxes(t.boxes[order].to(batch.images.device), batch.input_size)

    def _target_masks(self, batch: Batch, row: int) -> Tensor | None:
        t = batch.targets[row]
        if t.masks is None or batch.tasks[row] not in _MASK_TASKS or len(t) == 0:
            return None
        order = [0] if batch.tasks[row] in ("rec", "res") else answer_order(t.boxes)
        return t.masks[order].to(batch.images.device)

    # ------------------------------------------------------------------ heads
    def _image_tokens(self, out: Any) -> Tensor:
        """The image tokens the optional cross-attention reads (see TriggerImageAttention.source)."""
        source = self.image_attention.source
        if source == "vision":
            return out.image_features.flatten(2).transpose(1, 2)
        if source == "projected":
            return out.image_tokens
        return out.image_hidden_states()

    def trigger_states(
        self,
        out: Any,
        rows: Tensor,
        positions: Tensor,
        answer_keys: list[Tensor],
    ) -> tuple[Tensor, Tensor | None]:
        """The states the heads read for triggers at expanded ``positions`` of ``rows``: the
        last-layer hidden state, refocused (``refocus_lambda > 0``: attention from
        ``out.attentions``, keys ``answer_keys[k]``) and passed through the image cross-attention
        when configured.  Returns ``(states (N, D), attention over image tokens (N, P) or None)``."""
        hidden = out.hidden_states[rows, positions]
        if self.refocus_lambda > 0 and len(rows):
            if not out.attentions:
                raise ValueError("refocusing needs the backbone's last-layer attention (output_attentions)")
            attention = out.attentions[max(out.attentions)]
            hidden = torch.stack(
                [
                    refocus(
                        out.hidden_states[r],
                        attention[r],
                        query=int(p),
                        keys=answer_keys[k],
                        strength=self.refocus_lambda,
                    )
                    for k, (r, p) in enumerate(zip(rows.tolist(), positions.tolist(), strict=True))
                ]
            )
        weights = None
        if self.image_attention is not None and len(rows):
            tokens = self._image_tokens(out)[rows]
            refined, weights = self.image_attention(hidden[:, None, :], tokens)
            hidden, weights = refined[:, 0], weights[:, 0]
        return hidden, weights

    def decode_masks(self, out: Any, rows: Tensor, states: Tensor, boxes: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mask logits ``(N, S, S)`` at the network-input size and predicted IoU ``(N,)``: the
        shared SAM prompt head over the vision features of ``rows``, prompted with the prompt
        MLP's tokens (extra sparse prompt) and, when ``box_prompt`` is on, the decoded box
        (ordered corners, not a path for gradients) - pixel2emb's prompts."""
        box_prompt = None
        if self.box_prompt and boxes is not None:
            side = float(self.mask_head.input_size)
            box_prompt = denormalise_boxes(boxes.detach(), (side, side))
        return self.mask_head(out.image_features[rows], boxes=box_prompt, sparse_embeddings=self.prompt_mlp(states))

    # ------------------------------------------------------------------ training
    def _answer_keys(self, out: Any, labels: Tensor, special: Tensor, rows: Tensor, cols: Tensor) -> list[Tensor]:
        """Expanded positions of the answer tokens before each trigger (refocusing keys)."""
        keys = []
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            idx = torch.arange(c, device=labels.device)
            keep = (labels[r, :c] != -100) & ~special[r, :c]
            keys.append(out.positions[r, idx[keep]])
        return keys

    def read_triggers(
        self, batch: Batch, *, labels: Tensor | None = None, attentions: bool = False
    ) -> tuple[Any, Tensor, Tensor, Tensor, Tensor | None]:
        """The teacher-forced pass over the batch's answers and what the heads read at its
        triggers: ``(out, rows, positions, states, cross-attention weights or None)`` (see
        :meth:`trigger_states`).  ``labels`` gives the LM its loss; ``attentions`` asks the
        backbone for the last layer's attention even when neither refocusing nor the ``lmm``
        attention target needs it."""
        ids = batch.input_ids
        plan = self._embedding_plan(batch, ids)
        out = self.backbone(
            images=batch.images,
            input_ids=ids,
            attention_mask=batch.attention_mask,
            labels=labels,
            output_attentions=[-1] if attentions or self.refocus_lambda > 0 or self.attention_target == "lmm" else None,
            inputs_embeds_fn=self._embeds_fn(plan),
            references=batch.references(),
        )
        rows, cols = (ids == self.trigger_id).nonzero(as_tuple=True)
        special = (ids == self.trigger_id) | (ids == self.loc_id)
        keys = self._answer_keys(out, batch.labels, special, rows, cols) if self.refocus_lambda > 0 else []
        positions = out.positions[rows, cols]
        states, weights = self.trigger_states(out, rows, positions, keys)
        return out, rows, positions, states, weights

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        ids = batch.input_ids
        labels = batch.labels.clone()
        after_trigger = torch.zeros_like(ids, dtype=torch.bool)
        after_trigger[:, 1:] = (ids[:, 1:] == self.loc_id) & (ids[:, :-1] == self.trigger_id)
        labels[after_trigger] = -100  # generation inserts this <loc>; the LM is not asked for it
        out, rows, positions, states, weights = self.read_triggers(batch, labels=labels)
        parts: dict[str, Tensor] = {}
        if self.lm_loss:
            parts["lm"] = out.loss
        targets = [self._target_boxes(batch, r) for r in range(len(batch))]
        counts = torch.bincount(rows, minlength=len(batch)).tolist()
        for r, n in enumerate(counts):
            if batch.tasks[r] in _BOX_TASKS and n != len(targets[r]):
                raise ValueError(
                    f"sample {batch.image_ids[r]} ({batch.tasks[r]}): {n} triggers in the tokenized answer but "
                    f"{len(targets[r])} target objects (answer cut by data.max_length?)"
                )
        tgt = torch.cat([t for t in targets]) if rows.numel() else states.new_zeros(0, 4)
        if self.attention_target is not None:
            parts["attention"] = self._attention_loss(batch, out, rows, positions, weights, targets)
        decoded = None
        if self.box_decoder is not None:
            decoded = self.box_decoder(states)
            parts.update({f"box_{k}": v for k, v in box_losses(decoded, tgt).items()})
            if self.cycle:
                prompt = [self._prompt_boxes(batch, r) for r in range(len(batch))]
                boxes = torch.cat([tgt.to(states.dtype)] + [p.to(states.dtype) for p in prompt])
                cyc = box_cycle_losses(self.box_encoder, self.box_decoder, hidden=states, decoded=decoded, boxes=boxes)
                parts.update({f"cycle_{k}": v for k, v in cyc.items()})
        if self.mask_head is not None:
            parts.update(self._mask_loss(batch, out, rows, states, decoded))
        return parts

    def attention_targets(self, batch: Batch, rows: Tensor, targets: list[Tensor]) -> Tensor:
        """``(N, P)``: per trigger (``rows``, answer order), the referred object's share of each
        image token's cell of the feature grid - its mask average-pooled when the sample has
        masks, else the fraction of the cell its box covers - normalised to sum 1."""
        h, w = (int(v) for v in self.backbone.feature_grid)
        device = batch.images.device
        out = []
        for r in sorted(set(rows.tolist())):
            t, boxes = batch.targets[r], targets[r]
            if t.masks is not None and len(boxes) and len(t.masks) == len(t):
                order = [0] if batch.tasks[r] in ("rec", "res") else answer_order(t.boxes)
                grid = F.adaptive_avg_pool2d(t.masks[order].to(device).float()[:, None], (h, w))[:, 0]
            else:
                grid = box_grid_share(boxes, (h, w))
            out.append(grid.flatten(1))
        if not out:
            return torch.zeros(0, h * w, device=device)
        q = torch.cat(out)
        return q / q.sum(-1, keepdim=True).clamp(min=1e-12)

    def trigger_image_attention(
        self, out: Any, rows: Tensor, positions: Tensor, weights: Tensor | None, *, source: str
    ) -> Tensor | None:
        """``(N, P)``: each trigger's attention over the image tokens - ``"cross"``: the
        cross-attention ``weights`` (``trigger_states``' second output, head mean); ``"lmm"``: the
        LMM's last-layer attention row at the trigger (``out.attentions``), head mean,
        renormalised over the image positions."""
        if source == "cross":
            return weights
        if not out.attentions:
            raise ValueError("the LMM's trigger attention needs the backbone's last-layer attention (output_attentions)")
        last = out.attentions[max(out.attentions)]  # (B, heads, T, T)
        row = last[rows, :, positions]  # (N, heads, T): each trigger's attention row
        image = out.image_positions[rows][:, None, :].expand(-1, row.shape[1], -1)
        attention = row.gather(-1, image).float().mean(1)  # (N, P) over the image tokens
        return attention / attention.sum(-1, keepdim=True).clamp(min=1e-12)

    def _attention_loss(
        self, batch: Batch, out: Any, rows: Tensor, positions: Tensor, weights: Tensor | None, targets: list[Tensor]
    ) -> Tensor:
        """``KL(target || attention)`` averaged over the triggers of box tasks (0 without any)."""
        keep = torch.tensor([batch.tasks[r] in _BOX_TASKS for r in rows.tolist()], dtype=torch.bool, device=rows.device)
        attention = self.trigger_image_attention(out, rows, positions, weights, source=self.attention_target)
        if attention is None or not bool(keep.any()):
            return out.hidden_states.sum() * 0.0
        q = self.attention_targets(batch, rows[keep], targets)
        p = attention[keep].float().clamp(min=1e-9)
        kl = (q * (q.clamp(min=1e-12).log() - p.log())).sum(-1)
        return kl.mean()

    def _mask_loss(self, batch: Batch, out: Any, rows: Tensor, states: Tensor, decoded: Tensor | None) -> dict[str, Tensor]:
        masks = [self._target_masks(batch, r) for r in range(len(batch))]
        keep = torch.tensor([masks[r] is not None for r in rows.tolist()], dtype=torch.bool, device=rows.device)
        if not bool(keep.any()):
            zero = sum(p.sum() * 0.0 for p in [*self.prompt_mlp.parameters(), *self.mask_head.parameters()])
            zero = zero + states.sum() * 0.0
            return {f"mask_{self.mask_loss}": zero, "mask_dice": zero, "mask_iou": zero}
        logits, iou = self.decode_masks(out, rows[keep], states[keep], None if decoded is None else decoded[keep])
        target = torch.cat([m for m in masks if m is not None])
        return mask_loss_parts(logits, target.bool(), iou_pred=iou, kind=self.mask_loss)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, batch: Batch) -> list[Predictions]:
        b = len(batch)
        device = batch.images.device
        plan = self._embedding_plan(batch, batch.prompt_ids)
        tok = self.backbone.tokenizer
        hooks = _NextChatDecoding(self, batch)
        new_ids = self.backbone.decode(
            batch.images,
            batch.prompt_ids,
            batch.prompt_attention_mask,
            hooks=hooks,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=[] if tok.eos_token_id is None else tok.eos_token_id,
            use_cache=self.use_cache,
            inputs_embeds_fn=self._embeds_fn(plan),
            references=batch.references(),
        )
        texts = tok.batch_decode(new_ids, skip_special_tokens=False)
        preds = []
        size = batch.input_size
        for r in range(b):
            text = self._clean_text(texts[r])
            boxes = hooks.boxes[r]
            box_t = torch.stack(boxes) if boxes else torch.zeros(0, 4, device=device)
            n = max(len(boxes), len(hooks.masks[r]))
            label = batch.category_id(r) if batch.tasks[r] in CATEGORY_TASKS else 0
            pred = Predictions(
                boxes=denormalise_boxes(box_t, size),
                scores=torch.tensor(hooks.scores[r], dtype=torch.float32),
                labels=torch.full((n,), label, dtype=torch.long),
                text=text,
                # no trigger is the answer "no object" on grec / gres, a failure elsewhere
                parsed=bool(boxes or hooks.masks[r]) or batch.tasks[r] not in _BOX_TASKS or batch.tasks[r] in _SET_TASKS,
                image_id=batch.image_ids[r],
                image_size=size,
            )
            if self.mask_head is not None:
                masks = hooks.masks[r]
                m = torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.bool, device=device)
                if m.shape[-2:] != size:
                    m = F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
                pred = pred.replace(masks=m, mask_scores=torch.tensor(hooks.mask_scores[r], dtype=torch.float32))
            preds.append(pred)
        return preds

    # ------------------------------------------------------------------ optimisation
    def head_modules(self) -> list[nn.Module]:
        """The modules this paradigm adds on top of the backbone."""
        parts = [
            self.box_decoder,
            self.box_encoder,
            self.image_attention,
            self.prompt_mlp,
            self.mask_head,
        ]
        return [m for m in parts if m is not None]

    def param_groups(self) -> list[dict[str, Any]]:
        """Backbone parameters (row-masked embeddings without weight decay) and the heads, at
        ``head_lr`` when set."""
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        no_decay_names = set(self.backbone.no_weight_decay()) if hasattr(self.backbone, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, p in self.backbone.named_parameters():
            if p.requires_grad and id(p) not in head_ids:
                (no_decay if name in no_decay_names else decay).append(p)
        heads = [p for m in self.head_modules() for p in m.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        head_group: dict[str, Any] = {"params": heads}
        if self.head_lr is not None:
            head_group["lr"] = self.head_lr
        groups.append(head_group)
        return groups


class _NextChatDecoding(DecodingHooks):
    """NExT-Chat's steps in the shared greedy loop: a pass over a trigger decodes the row's box
    (and mask) from the trigger's state; the row's next token is forced to ``<loc>`` and its
    input embedding is ``BoxEncoder(decoded box)``.  ``<loc>``, ``<ref>`` and ``<image>`` are
    never generated freely.  Collects boxes, masks and scores per row."""

    def __init__(self, paradigm: Pixel2Emb, batch: Batch) -> None:
        super().__init__()
        self.paradigm = paradigm
        self.batch = batch
        b = len(batch)
        device = batch.images.device
        self.boxes: list[list[Tensor]] = [[] for _ in range(b)]
        self.scores: list[list[float]] = [[] for _ in range(b)]
        self.masks: list[list[Tensor]] = [[] for _ in range(b)]
        self.mask_scores: list[list[float]] = [[] for _ in range(b)]
        self.trigger_prob = torch.zeros(b, device=device)
        self.fresh = torch.zeros(b, dtype=torch.bool, device=device)
        self.force = torch.zeros(b, dtype=torch.bool, device=device)
        self.start = batch.prompt_ids.shape[1]
        p = paradigm
        self.banned = [t for t in (p.loc_id, p.ref_id, p.backbone.image_token_id) if t >= 0]
        pad = p.backbone.tokenizer.pad_token_id
        self.pad = pad if pad is not None else 0

    def attention_layers(self, token: Tensor | None) -> list[int] | None:
        p = self.paradigm
        if p.refocus_lambda > 0 and token is not None and bool((token == p.trigger_id).any()):
            return [-1]
        return None

    def final_pass(self, state: DecodingState, token: Tensor) -> bool:
        return bool((token == self.paradigm.trigger_id).any())  # a last trigger still gets its box

    def observe(self, state: DecodingState) -> None:
        p = self.paradigm
        self.fresh = (state.ids[:, -1] == p.trigger_id) & (state.step > 0)
        if not bool(self.fresh.any()):
            return
        rows = self.fresh.nonzero().flatten()
        positions = torch.full_like(rows, state.last_position)
        keys = []
        if p.refocus_lambda > 0:
            ids, text_positions = state.ids, state.text_positions()
            for r in rows.tolist():
                gen = torch.arange(self.start, ids.shape[1] - 1, device=ids.device)
                gen = gen[(ids[r, gen] != p.trigger_id) & (ids[r, gen] != p.loc_id) & (ids[r, gen] != self.pad)]
                keys.append(text_positions[r, gen])
        states, _ = p.trigger_states(state, rows, positions, keys)
        decoded = p.box_decoder(states) if p.box_decoder is not None else None
        if p.mask_head is not None:
            logits, iou = p.decode_masks(state, rows, states, decoded)
        for k, r in enumerate(rows.tolist()):
            if decoded is not None:
                self.boxes[r].append(decoded[k])
                self.scores[r].append(float(self.trigger_prob[r]))
            if p.mask_head is not None:
                self.masks[r].append(logits[k] > 0)
                self.mask_scores[r].append(float(iou[k]))
                if decoded is None:
                    self.scores[r].append(float(self.trigger_prob[r]))

    def choose(self, state: DecodingState) -> Tensor:
        p = self.paradigm
        scores = state.scores.clone()
        if self.banned:
            scores[:, self.banned] = float("-inf")
        probs = scores.softmax(-1)
        token = scores.argmax(-1)
        live = ~state.finished
        self.force = self.fresh & live if p.answer_format.box_after_trigger else torch.zeros_like(self.fresh)
        token = torch.where(self.force, torch.full_like(token, p.loc_id), token)
        is_trigger = (token == p.trigger_id) & live
        rows = torch.arange(token.shape[0], device=token.device)
        self.trigger_prob = torch.where(is_trigger, probs[rows, p.trigger_id], self.trigger_prob)
        return token

    def next_embeds(self, state: DecodingState, token: Tensor, embeds: Tensor) -> Tensor:
        if not bool(self.force.any()):
            return embeds
        p = self.paradigm
        rows = self.force.nonzero().flatten()
        size = self.batch.input_size
        # the encoder was taught on ordered ground-truth boxes: feed the ordered decoded box
        boxes = torch.stack([normalise_boxes(denormalise_boxes(self.boxes[r][-1], size), size) for r in rows.tolist()])
        out = embeds.clone()
        out[rows, 0] = p.box_encoder(boxes).to(embeds.dtype)
        return out

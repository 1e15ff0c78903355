"""Pixel2Seq: locations are tokens of the answer text, trained by the LM loss alone.

The method (Pix2Seq, Shikra, Kosmos-2, Florence-2, PaliGemma, Qwen2-VL): a box, a keypoint or
a polygon vertex is written with the coordinate convention of one model family
(:mod:`vlzoo.paradigms.codecs`) and the LMM learns to say it like any other word.

* **Answers** (:class:`Pixel2SeqAnswerFormat`): ``rec`` one box; ``det`` every box, in the shared
  answer order (:func:`vlzoo.structures.answer_order`: raster order of the top-left corners),
  ``none`` when there is none; ``pose`` the ``K``
  keypoints of every instance (same order), ``none`` when there is none; ``res`` a polygon of
  the mask (``polygon_vertices`` vertices, rasterised back to a mask); ``reg`` the box goes into
  the prompt through the codec and the answer is text; ``grec`` / ``gres`` (generalized
  referring) the boxes / polygons of every referent in the shared answer order, and ``none``
  for an expression that refers to nothing.
* **Training**: LM cross-entropy on the answer tokens (the batch labels mask the prompt).  With
  ``coordinate_sigma > 0`` the target of a coordinate token is a Gaussian over neighbouring bins
  instead of one bin, so a near miss costs less than a far one (token codecs only).
* **Inference**: greedy generation with the KV cache and :class:`GrammarConstraint`, a
  transformers ``LogitsProcessor`` that lets through only tokens that keep the answer a prefix of
  its task's grammar - inside a box only coordinate tokens, and the end of text only when the
  answer is complete.  Text that still does not parse (e.g. cut by ``max_new_tokens``) becomes
  ``Predictions(parsed=False)``, which the evaluator counts as a parse failure.

What is shared, not pixel2seq's own: the object order (:func:`vlzoo.structures.answer_order`),
the polygon of a mask (:func:`vlzoo.structures.mask_to_polygon` / ``polygon_to_mask``), the
grammar-constrained decoding (:mod:`vlzoo.paradigms.grammar`, next to the codecs) and the sizes
(none: this paradigm adds no head).  What is its own: the answer format over a codec, the
Gaussian coordinate loss and the parsing of generated text.  ``GrammarConstraint``,
``mask_to_polygon`` and ``polygon_to_mask`` stay importable from here.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.backbones.interface import Backbone, check_backbone
from vlzoo.data.answers import AnswerFormat
from vlzoo.paradigms.base import BaseParadigm
from vlzoo.paradigms.codecs import BinsCodec, CodecError, CoordinateCodec, Kosmos2Codec, _TokenCodec
from vlzoo.paradigms.grammar import GrammarConstraint
from vlzoo.structures import (
    CATEGORY_TASKS,
    Batch,
    Predictions,
    Sample,
    Targets,
    answer_order,
    mask_to_polygon,
    polygon_to_mask,
)

__all__ = [
    "GrammarConstraint",
    "Pixel2Seq",
    "Pixel2SeqAnswerFormat",
    "mask_to_polygon",
    "polygon_to_mask",
]

NONE_ANSWER = "none"


# ---------------------------------------------------------------------------------------------- answers
class Pixel2SeqAnswerFormat(AnswerFormat):
    """Writes and reads locations with one :class:`~vlzoo.paradigms.codecs.CoordinateCodec`.

    Args:
        codec: the coordinate convention (its tokens become the format's ``special_tokens``).
        write_phrases: write the referring expression with the box where the family does
            (Kosmos-2 ``<phrase>``, Qwen ``<|object_ref_start|>``, PaliGemma label ...); REC only.
        polygon_vertices: vertices of a RES polygon.
        max_objects: most boxes / instances in a det, pose, grec or gres answer (longer answers keep the
            first ones in the shared answer order); ``None`` for no limit.
        num_keypoints: keypoints per instance of a pose answer (its grammar and parser at predict
            time; the targets are never read there).
    """

    def __init__(
        self,
        *,
        codec: CoordinateCodec,
        write_phrases: bool = False,
        polygon_vertices: int = 16,
        max_objects: int | None = None,
        num_keypoints: int = 5,
    ) -> None:
        if polygon_vertices < 3:
            raise ValueError(f"paradigm.polygon_vertices must be >= 3, got {polygon_vertices}")
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"paradigm.max_objects must be >= 1 or null, got {max_objects}")
        self.codec = codec
        self.special_tokens = tuple(codec.special_tokens)
        self.write_phrases = bool(write_phrases)
        self.polygon_vertices = int(polygon_vertices)
        self.max_objects = max_objects
        self.num_keypoints = int(num_keypoints)

    # --- writing --------------------------------------------------------------------------------
    def box_in_prompt(self, box: list[float], input_size: tuple[int, int]) -> str:
        return self.codec.encode(torch.tensor([box], dtype=torch.float32), input_size)

    def _order(self, boxes: Tensor) -> list[int]:
        """The shared answer order (:func:`~vlzoo.structures.answer_order`), cut at ``max_objects``."""
        return answer_order(boxes, limit=self.max_objects)

    def localization_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        t = sample.targets
        task = sample.task
        if task == "rec":
            if len(t) < 1:
                raise ValueError(f"sample {sample.image_id} (rec): the target has no box")
            phrase = t.expressions[0] if (self.write_phrases and t.expressions) else None
            return self.codec.encode(t.boxes[:1], input_size, phrase=phrase)
        if task == "det":
            if len(t) == 0:
                return NONE_ANSWER
            return self.codec.encode(t.boxes[self._order(t.boxes)], input_size)
        if task == "pose":
            if t.keypoints is None:
                raise ValueError(f"sample {sample.image_id} (pose): the target has no keypoints")
            if t.keypoints.dim() == 3 and t.keypoints.shape[0] and t.keypoints.shape[1] != self.num_keypoints:
                raise ValueError(
                    f"sample {sample.image_id} (pose): the target has {t.keypoints.shape[1]} keypoints per instance "
                    f"but paradigm.num_keypoints is {self.num_keypoints} (what predictions are read with); set it to "
                    f"{t.keypoints.shape[1]}"
                )
            if len(t) == 0:
                return NONE_ANSWER
            parts = [
                self.codec.encode_points(self._pose_points(t, i), input_size) for i in self._order(t.boxes)
            ]
            return self.codec.separator.join(parts)
        if task == "res":
            if t.masks is None or t.masks.shape[0] < 1:
                raise ValueError(f"sample {sample.image_id} (res): the target has no mask")
            mask = t.masks[0]
            if not bool(mask.any()):
                raise ValueError(
                    f"sample {sample.image_id} (res): the referred mask is empty at the input size"
                )
            return self.codec.encode_points(mask_to_polygon(mask, vertices=self.polygon_vertices), input_size)
        if task == "grec":  # the set of referents, possibly empty
            return NONE_ANSWER if len(t) == 0 else self.codec.encode(t.boxes[self._order(t.boxes)], input_size)
        if task == "gres":
            if t.masks is None or t.masks.shape[0] != len(t):
                raise ValueError(f"sample {sample.image_id} (gres): the target has no mask per referent")
            if len(t) == 0:
                return NONE_ANSWER
            polygons = []
            for i in self._order(t.boxes):
                if not bool(t.masks[i].any()):
                    raise ValueError(
                        f"sample {sample.image_id} (gres): referent {i}'s mask is empty at the input size"
                    )
                polygons.append(self.codec.encode_points(mask_to_polygon(t.masks[i], vertices=self.polygon_vertices),
                                                         input_size))
            return self.codec.separator.join(polygons)
        return super().localization_answer(sample, input_size)

    @staticmethod
    def _pose_points(t: Targets, i: int) -> Tensor:
        """Keypoints of instance ``i``; unlabelled ones (v = 0) are written at the box centre
        (COCO's OKS ignores them, and a fixed count keeps the grammar simple)."""
        kp = t.keypoints[i].float()
        centre = torch.stack([(t.boxes[i, 0] + t.boxes[i, 2]) / 2, (t.boxes[i, 1] + t.boxes[i, 3]) / 2])
        xy = kp[:, :2].clone()
        xy[kp[:, 2] <= 0] = centre
        return xy

    # --- grammars -------------------------------------------------------------------------------
    def grammar(self, task: str, *, num_keypoints: int | None = None) -> str | None:
        """Regex (normalised text, see codecs) every answer of ``task`` matches; ``None`` for
        free-text tasks."""
        c = self.codec
        if task == "rec":
            return c.boxes_grammar(1, 1, phrase=self.write_phrases)
        if task in ("det", "grec"):
            return f"(?:none|{c.boxes_grammar(1, self.max_objects)})"
        if task == "pose":
            k = num_keypoints or self.num_keypoints
            one = c.points_grammar(k, k)
            sep = c.separator_grammar()
            rest = "*" if self.max_objects is None else f"{{0,{self.max_objects - 1}}}"
            return f"(?:none|(?:{one})(?:{sep}{one}){rest})"
        if task == "res":
            v = self.polygon_vertices
            return c.points_grammar(v, v)
        if task == "gres":
            v = self.polygon_vertices
            rest = "*" if self.max_objects is None else f"{{0,{self.max_objects - 1}}}"
            return f"(?:none|(?:{c.points_grammar(v, v)})(?:{c.separator_grammar()}{c.points_grammar(v, v)}){rest})"
        return None

    # --- reading --------------------------------------------------------------------------------
    def parse(
        self,
        task: str,
        text: str,
        input_size: tuple[int, int],
        *,
        num_keypoints: int | None = None,
    ) -> dict[str, Any]:
        """Fields of a :class:`Predictions` for generated ``text`` (input pixels); raises
        :class:`~vlzoo.paradigms.codecs.CodecError` when it does not parse."""
        stripped = text.strip()
        if task in ("det", "pose", "grec", "gres") and stripped == NONE_ANSWER:
            empty: dict[str, Any] = {"boxes": torch.zeros((0, 4))}
            if task == "pose":
                k = num_keypoints or self.num_keypoints
                empty["keypoints"] = torch.zeros((0, k, 3))
            if task == "gres":
                empty["masks"] = torch.zeros((0, *input_size), dtype=torch.bool)
            return empty
        if task in ("rec", "det", "grec"):
            boxes = self.codec.decode(text, input_size)
            if task == "rec":
                boxes = boxes[:1]
            return {"boxes": _ordered(boxes)}
        if task == "pose":
            k = num_keypoints or self.num_keypoints
            pts = self.codec.decode_points(text, input_size)
            if pts.shape[0] == 0 or pts.shape[0] % k:
                raise CodecError(f"pose: {pts.shape[0]} points is not a multiple of {k} keypoints")
            kp = pts.reshape(-1, k, 2)
            vis = torch.full((kp.shape[0], k, 1), 2.0)
            boxes = torch.cat([kp.min(1).values, kp.max(1).values], 1)
            return {"keypoints": torch.cat([kp, vis], -1), "boxes": boxes}
        if task == "res":
            pts = self.codec.decode_points(text, input_size)
            if pts.shape[0] < 3:
                raise CodecError(f"res: a polygon needs >= 3 points, found {pts.shape[0]}")
            mask = polygon_to_mask(pts, input_size)
            box = torch.cat([pts.min(0).values, pts.max(0).values])[None]
            return {"masks": mask[None], "boxes": box}
        if task == "gres":  # polygons of polygon_vertices points each, one per referent
            v = self.polygon_vertices
            pts = self.codec.decode_points(text, input_size)
            if pts.shape[0] == 0 or pts.shape[0] % v:
                raise CodecError(f"gres: {pts.shape[0]} points is not a multiple of {v} polygon vertices")
            polys = pts.reshape(-1, v, 2)
            masks = torch.stack([polygon_to_mask(p, input_size) for p in polys])
            boxes = torch.cat([polys.min(1).values, polys.max(1).values], 1)
            return {"masks": masks, "boxes": boxes}
        raise ValueError(f"Pixel2SeqAnswerFormat cannot parse task {task!r}")

    def __repr__(self) -> str:
        return (
            f"Pixel2SeqAnswerFormat(codec={self.codec!r}, write_phrases={self.write_phrases}, "
            f"polygon_vertices={self.polygon_vertices}, max_objects={self.max_objects})"
        )


def _ordered(boxes: Tensor) -> Tensor:
    """Boxes with x1 <= x2 and y1 <= y2 (a generated box may name its corners the other way)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    return torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], 1)


# ---------------------------------------------------------------------------------------------- paradigm
class Pixel2Seq(BaseParadigm):
    """Coordinates as tokens: LM loss to train, constrained greedy generation to predict.

    Args:
        backbone: the built backbone (:class:`~vlzoo.backbones.Backbone`; injected).
        codec: the coordinate convention (default ``BinsCodec(bins=64)``).
        write_phrases, polygon_vertices, max_objects, num_keypoints: see
            :class:`Pixel2SeqAnswerFormat`.
        constrained: constrain generation to each task's answer grammar.
        coordinate_sigma: > 0 trains coordinate tokens with a Gaussian target of that width in
            bins (grid cells for Kosmos-2) instead of one-hot; token codecs only.
        evaluator, optimizer, scheduler, loss_weights, tasks, max_new_tokens, use_cache: see
            :class:`~vlzoo.paradigms.base.BaseParadigm`.
    """

    name: ClassVar[str] = "pixel2seq"
    supported_tasks: ClassVar[tuple[str, ...]] = ("rec", "det", "reg", "pose", "res", "grec", "gres")

    def __init__(
        self,
        *,
        backbone: Backbone,
        codec: CoordinateCodec | None = None,
        write_phrases: bool = False,
        polygon_vertices: int = 16,
        max_objects: int | None = None,
        num_keypoints: int = 5,
        constrained: bool = True,
        coordinate_sigma: float = 0.0,
        evaluator: Any | None = None,
        optimizer: Any | None = None,
        scheduler: Any | None = None,
        loss_weights: dict[str, float] | None = None,
        tasks: list[str] | None = None,
        max_new_tokens: int = 64,
        use_cache: bool = True,
    ) -> None:
        check_backbone(backbone, self.name)
        codec = codec if codec is not None else BinsCodec(bins=64)
        if coordinate_sigma < 0:
            raise ValueError(f"paradigm.coordinate_sigma must be >= 0, got {coordinate_sigma}")
        if coordinate_sigma > 0 and not isinstance(codec, _TokenCodec):
            raise ValueError(
                f"paradigm.coordinate_sigma needs a codec with coordinate tokens (bins, florence2, "
                f"paligemma, kosmos2); {codec.name!r} writes coordinates as plain text"
            )
        answer_format = Pixel2SeqAnswerFormat(
            codec=codec,
            write_phrases=write_phrases,
            polygon_vertices=polygon_vertices,
            max_objects=max_objects,
            num_keypoints=num_keypoints,
        )
        super().__init__(
            backbone=backbone,
            answer_format=answer_format,
            evaluator=evaluator,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_weights=loss_weights,
            tasks=tasks,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )
        self.codec = codec
        self.constrained = bool(constrained)
        self.coordinate_sigma = float(coordinate_sigma)
        self._soft: tuple[Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        out = self.backbone(
            images=batch.images,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            references=batch.references(),
        )
        if self.coordinate_sigma <= 0:
            return {"lm": out.loss}
        return {"lm": self._soft_coordinate_loss(out.logits, out.labels)}

    def _soft_targets(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(coordinate ids (C,), row of each vocabulary id in the table (V,) or -1, table (C, C))."""
        if self._soft is None or self._soft[0].device != device:
            tok = self.backbone.tokenizer
            codec = self.codec
            ids = torch.tensor(tok.convert_tokens_to_ids(list(codec.coordinate_tokens)), dtype=torch.long)
            k = torch.arange(len(ids), dtype=torch.float32)
            if isinstance(codec, Kosmos2Codec):
                pos = torch.stack([k // codec.side, k % codec.side], 1)
            else:
                pos = k[:, None]
            d2 = torch.cdist(pos, pos).pow(2)
            table = torch.softmax(-d2 / (2 * self.coordinate_sigma**2), dim=1)
            vocab = int(max(len(tok), int(ids.max()) + 1))
            row = torch.full((vocab,), -1, dtype=torch.long)
            row[ids] = torch.arange(len(ids))
            self._soft = (ids.to(device), row.to(device), table.to(device))
        return self._soft

    def _soft_coordinate_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy with a Gaussian over neighbouring bins as the target of coordinate tokens."""
        ids, row, table = self._soft_targets(logits.device)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        target = labels[:, 1:]
        valid = target != -100
        safe = target.clamp(min=0)
        hard = -logp.gather(-1, safe[..., None])[..., 0]
        which = torch.where(valid & (safe < row.numel()), row[safe.clamp(max=row.numel() - 1)], -1)
        is_coord = which >= 0
        per_token = hard
        if bool(is_coord.any()):
            soft_target = table[which[is_coord]]  # (M, C)
            soft = -(soft_target * logp[is_coord][:, ids]).sum(-1)
            per_token = per_token.masked_scatter(is_coord, soft)
        return (per_token * valid).sum() / valid.sum().clamp(min=1)

    # ------------------------------------------------------------------ inference
    def predict(self, batch: Batch) -> list[Predictions]:
        fmt: Pixel2SeqAnswerFormat = self.answer_format  # type: ignore[assignment]
        size = batch.input_size
        grammars = [fmt.grammar(task) for task in batch.tasks]
        constraint = None
        if self.constrained and any(g is not None for g in grammars):
            constraint = GrammarConstraint(
                tokenizer=self.backbone.tokenizer,
                codec=self.codec,
                grammars=grammars,
                prompt_length=batch.prompt_ids.shape[1],
            )
        new_ids, texts = self.generate_text(batch, logits_processor=constraint)
        probs = constraint.token_probabilities(new_ids.cpu()) if constraint is not None else None
        out = []
        for i, (task, text) in enumerate(zip(batch.tasks, texts, strict=True)):
            base = Predictions(text=text, image_id=batch.image_ids[i], image_size=size)
            if task not in ("rec", "det", "pose", "res", "grec", "gres"):
                out.append(base)
                continue
            try:
                fields = fmt.parse(task, text, size)
            except CodecError:
                out.append(base.replace(parsed=False))
                continue
            n = int(fields["boxes"].shape[0])
            fields["scores"] = self._box_scores(new_ids[i].cpu(), probs[i] if probs is not None else None, n)
            if task in CATEGORY_TASKS:  # labelled with the category the query names
                fields["labels"] = torch.full((n,), batch.category_id(i), dtype=torch.long)
            out.append(base.replace(**fields))
        return out

    def _box_scores(self, ids: Tensor, probs: Tensor | None, n: int) -> Tensor:
        """Each box's mean probability of its own coordinate tokens (token codecs), else the mean
        over the answer's tokens; 1.0 without a constraint to record them."""
        if n == 0:
            return torch.zeros(0)
        if probs is None:
            return torch.ones(n)
        eos = self.backbone.tokenizer.eos_token_id
        pad = self.backbone.tokenizer.pad_token_id
        live = (ids != eos) & (ids != pad)
        answer_mean = probs[live].mean() if bool(live.any()) else torch.tensor(1.0)
        per = self.codec.tokens_per_box
        if per is not None:
            coord = torch.tensor([i in self._coordinate_id_set() for i in ids.tolist()], dtype=torch.bool)
            coord_probs = probs[coord & live]
            if coord_probs.numel() == n * per:
                return coord_probs.reshape(n, per).mean(1)
        return answer_mean.expand(n).clone()

    def _coordinate_id_set(self) -> set[int]:
        cached = getattr(self, "_coord_ids", None)
        if cached is None:
            tok = self.backbone.tokenizer
            cached = set(tok.convert_tokens_to_ids(list(self.codec.coordinate_tokens)))
            self._coord_ids = cached
        return cached

"""Pixel2Seq: locations are tokens of the answer text, trained by the LM loss alone.

The method (Pix2Seq, Shikra, Kosmos-2, Florence-2, PaliGemma, Qwen2-VL): a box, a keypoint or
a polygon vertex is written with the coordinate convention of one model family
(:mod:`vlzoo.paradigms.codecs`) and the LMM learns to say it like any other word.

* **Answers** (:class:`Pixel2SeqAnswerFormat`): ``rec`` one box; ``det`` every box, sorted by the
  (y, x) of its top-left corner (raster order), ``none`` when there is none; ``pose`` the ``K``
  keypoints of every instance (same order), ``none`` when there is none; ``res`` a polygon of
  the mask (``polygon_vertices`` vertices, rasterised back to a mask); ``reg`` the box goes into
  the prompt through the codec and the answer is text.
* **Training**: LM cross-entropy on the answer tokens (the batch labels mask the prompt).  With
  ``coordinate_sigma > 0`` the target of a coordinate token is a Gaussian over neighbouring bins
  instead of one bin, so a near miss costs less than a far one (token codecs only).
* **Inference**: greedy generation with the KV cache and :class:`GrammarConstraint`, a
  transformers ``LogitsProcessor`` that lets through only tokens that keep the answer a prefix of
  its task's grammar - inside a box only coordinate tokens, and the end of text only when the
  answer is complete.  Text that still does not parse (e.g. cut by ``max_new_tokens``) becomes
  ``Predictions(parsed=False)``, which the evaluator counts as a parse failure.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import regex
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LogitsProcessor

from vlzoo.data.answers import AnswerFormat
from vlzoo.paradigms.base import BaseParadigm
from vlzoo.paradigms.codecs import BinsCodec, CodecError, CoordinateCodec, Kosmos2Codec, _TokenCodec
from vlzoo.structures import CATEGORY_TASKS, Batch, Predictions, Sample, Targets

__all__ = [
    "GrammarConstraint",
    "Pixel2Seq",
    "Pixel2SeqAnswerFormat",
    "mask_to_polygon",
    "polygon_to_mask",
]

NONE_ANSWER = "none"


# ---------------------------------------------------------------------------------------------- polygons
def mask_to_polygon(mask: Tensor, *, vertices: int = 16) -> Tensor:
    """A star polygon ``(vertices, 2)`` (xy pixels) around a boolean ``(H, W)`` mask.

    Vertex ``j`` lies on the ray from the mask centroid at angle ``2 pi j / vertices`` (clockwise
    from the top, in image coordinates), at the outer edge of the farthest mask pixel of that
    angular sector.  Exact for star-shaped masks (every Shapes object); a fixed vertex count
    keeps answers one length, which is easier to learn and to constrain.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask_to_polygon: expected an (H, W) mask, got shape {tuple(mask.shape)}")
    if vertices < 3:
        raise ValueError(f"mask_to_polygon: a polygon needs >= 3 vertices, got {vertices}")
    ys, xs = torch.nonzero(mask.bool(), as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("mask_to_polygon: the mask is empty")
    px, py = xs.double() + 0.5, ys.double() + 0.5
    cx, cy = px.mean(), py.mean()
    dx, dy = px - cx, py - cy
    # angle measured clockwise from "up" (y grows downwards)
    angle = torch.atan2(dx, -dy) % (2 * math.pi)
    sector = ((angle / (2 * math.pi) * vertices + 0.5).floor().long()) % vertices
    radius = torch.sqrt(dx * dx + dy * dy) + 0.5 * math.sqrt(2.0)
    r = torch.zeros(vertices, dtype=torch.float64).scatter_reduce(0, sector, radius, reduce="amax")
    theta = torch.arange(vertices, dtype=torch.float64) * (2 * math.pi / vertices)
    h, w = mask.shape
    x = (cx + r * torch.sin(theta)).clamp(0, w)
    y = (cy - r * torch.cos(theta)).clamp(0, h)
    return torch.stack([x, y], 1).float()


def polygon_to_mask(polygon: Tensor, size: tuple[int, int]) -> Tensor:
    """Rasterise a polygon ``(P, 2)`` (xy pixels) to a boolean ``(H, W)`` mask (even-odd rule at
    pixel centres)."""
    h, w = (int(v) for v in size)
    poly = torch.as_tensor(polygon, dtype=torch.float64).reshape(-1, 2)
    if poly.shape[0] < 3:
        return torch.zeros((h, w), dtype=torch.bool)
    ys = torch.arange(h, dtype=torch.float64)[:, None, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :, None] + 0.5
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = poly.roll(-1, 0)[:, 0], poly.roll(-1, 0)[:, 1]
    crosses = (y0 > ys) != (y1 > ys)  # (H, 1, P)
    denom = torch.where(y1 == y0, torch.full_like(y1, 1e-12), y1 - y0)
    x_at = x0 + (ys - y0) * (x1 - x0) / denom
    inside = crosses & (xs < x_at)
    return (inside.sum(-1) % 2) == 1


# ---------------------------------------------------------------------------------------------- answers
class Pixel2SeqAnswerFormat(AnswerFormat):
    """Writes and reads locations with one :class:`~vlzoo.paradigms.codecs.CoordinateCodec`.

    Args:
        codec: the coordinate convention (its tokens become the format's ``special_tokens``).
        write_phrases: write the referring expression with the box where the family does
            (Kosmos-2 ``<phrase>``, Qwen ``<|object_ref_start|>``, PaliGemma label ...); REC only.
        polygon_vertices: vertices of a RES polygon.
        max_objects: most boxes / instances in a det or pose answer (longer answers keep the
            first ones in raster order); ``None`` for no limit.
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
        """Raster order of the top-left corners: by y, then x."""
        keys = [(round(float(b[1]), 3), round(float(b[0]), 3), i) for i, b in enumerate(boxes)]
        order = [i for _, _, i in sorted(keys)]
        return order if self.max_objects is None else order[: self.max_objects]

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
        if task == "det":
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
        if task in ("det", "pose") and stripped == NONE_ANSWER:
            empty: dict[str, Any] = {"boxes": torch.zeros((0, 4))}
            if task == "pose":
                k = num_keypoints or self.num_keypoints
                empty["keypoints"] = torch.zeros((0, k, 3))
            return empty
        if task in ("rec", "det"):
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


# ---------------------------------------------------------------------------------------------- constraint
class GrammarConstraint(LogitsProcessor):
    """Let through only tokens that keep each row's answer a prefix of its grammar.

    The answer so far is normalised as the codec's grammars expect (whitespace dropped, the
    codec's special tokens replaced by their symbols); a candidate token is allowed when
    ``grammar.fullmatch(answer + token, partial=True)`` succeeds, eos only when the answer
    already matches in full.  A whitespace-only token is allowed once between two others (the
    datamodule starts every answer with a word boundary).  Masks are cached per
    ``(grammar, answer)``, so token codecs - whose normalised answers are a handful of strings -
    pay the regex cost once.  Rows whose grammar is ``None`` are not constrained.

    It also records the probability of every chosen token (after the constraint);
    :meth:`token_probabilities` returns them for the ids ``generate`` produced.

    Args:
        tokenizer: the backbone's tokenizer.
        codec: the codec whose special tokens the grammars name.
        grammars: one regex (or ``None``) per row.
        prompt_length: width of the (left-padded) prompt: ids beyond it are generated.
        cache_size: most ``(grammar, answer)`` masks kept.
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        codec: CoordinateCodec,
        grammars: Sequence[str | None],
        prompt_length: int,
        cache_size: int = 4096,
    ) -> None:
        self.grammars = [regex.compile(g) if g is not None else None for g in grammars]
        self.prompt_length = int(prompt_length)
        self.eos_id = tokenizer.eos_token_id
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self.vocab_size = len(tokenizer)
        self.strings, self.space_ids = _normalised_vocabulary(tokenizer, codec)
        by_string: dict[str, list[int]] = {}
        for i, s in enumerate(self.strings):
            if s:
                by_string.setdefault(s, []).append(i)
        self._candidates = [(s, torch.tensor(ids, dtype=torch.long)) for s, ids in by_string.items()]
        self._by_first: dict[str, list[int]] = {}
        for index, (s, _) in enumerate(self._candidates):
            self._by_first.setdefault(s[0], []).append(index)
        self._steps: dict[tuple[int, str], list[int]] = {}
        self._space = torch.tensor(sorted(self.space_ids), dtype=torch.long)
        self._probs: list[Tensor] = []
        self._last: Tensor | None = None

    def _extensions(self, grammar: Any, text: str) -> list[int]:
        """Indices of the candidate strings that keep ``text`` a grammar prefix (one step)."""
        key = (id(grammar), text)
        found = self._steps.get(key)
        if found is None:
            found = []
            for first, group in self._by_first.items():
                if grammar.fullmatch(text + first, partial=True) is None:
                    continue
                for index in group:
                    if grammar.fullmatch(text + self._candidates[index][0], partial=True) is not None:
                        found.append(index)
            self._steps[key] = found
            if len(self._steps) > self.cache_size:
                self._steps.pop(next(iter(self._steps)))
        return found

    def _allowed(self, row: int, text: str, after_space: bool) -> Tensor:
        grammar = self.grammars[row]
        key = (id(grammar), text)
        mask = self._cache.get(key)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            for index in self._extensions(grammar, text):
                s, ids = self._candidates[index]
                # one step of look-ahead: a token is taken only if the answer can go on or end
                # after it ("no" is a prefix of "none" but no token completes it)
                child = text + s
                if grammar.fullmatch(child) is not None or self._extensions(grammar, child):
                    mask[ids] = True
            if mask.any() and self._space.numel():
                mask[self._space] = True
            if self.eos_id is not None and grammar.fullmatch(text) is not None:
                mask[self.eos_id] = True
            self._cache[key] = mask
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if after_space and self._space.numel():
            mask = mask.clone()
            mask[self._space] = False
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:
            chosen = input_ids[:, -1].to(self._last.device)
            self._probs.append(self._last.gather(1, chosen[:, None])[:, 0].cpu())
        generated = input_ids[:, self.prompt_length :].tolist()
        vocab = scores.shape[-1]
        keep = torch.ones(scores.shape, dtype=torch.bool)
        for row, ids in enumerate(generated):
            if self.grammars[row] is None or (self.eos_id is not None and self.eos_id in ids):
                continue
            text = "".join(self.strings[i] for i in ids if i < len(self.strings))
            after_space = bool(ids) and ids[-1] in self.space_ids
            allowed = self._allowed(row, text, after_space)
            if not allowed.any():
                # a dead end (the look-ahead is one token deep): end the answer, which then fails
                # to parse and is counted, rather than let the row say anything
                allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
                if self.eos_id is not None:
                    allowed[self.eos_id] = True
            row_mask = torch.zeros(vocab, dtype=torch.bool)
            n = min(vocab, allowed.numel())
            row_mask[:n] = allowed[:n]
            keep[row] = row_mask
        out = scores.masked_fill(~keep.to(scores.device), float("-inf"))
        self._last = out.float().softmax(-1)
        return out

    def token_probabilities(self, new_ids: Tensor) -> Tensor:
        """``(B, T)`` probability of each generated token (1.0 where none was recorded)."""
        probs = torch.ones(new_ids.shape, dtype=torch.float32)
        recorded = list(self._probs)
        if self._last is not None and len(recorded) < new_ids.shape[1]:
            last = new_ids[:, len(recorded)].to(self._last.device)
            recorded.append(self._last.gather(1, last[:, None])[:, 0].cpu())
        for t, p in enumerate(recorded[: new_ids.shape[1]]):
            probs[:, t] = p
        return probs


def _normalised_vocabulary(tokenizer: Any, codec: CoordinateCodec) -> tuple[list[str], set[int]]:
    """Normalised string of every token id ('' for tokens never allowed) and the whitespace ids."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    strings: list[str] = []
    spaces: set[int] = set()
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    for i, tok in enumerate(tokens):
        if tok is None:
            strings.append("")
            continue
        sym = codec.normalise_token(tok)
        if sym is not None:
            strings.append(sym)
            continue
        if i in special:
            strings.append("")
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if text.strip() == "" and (text != "" or tok.strip("▁Ġ ") == ""):
            spaces.add(i)
            strings.append("")
            continue
        strings.append("".join(text.split()))
    return strings, spaces


# ---------------------------------------------------------------------------------------------- paradigm
class Pixel2Seq(BaseParadigm):
    """Coordinates as tokens: LM loss to train, constrained greedy generation to predict.

    Args:
        backbone: the built ``MultimodalBackbone`` (injected).
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
    supported_tasks: ClassVar[tuple[str, ...]] = ("rec", "det", "reg", "pose", "res")

    def __init__(
        self,
        *,
        backbone: Any = None,
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
            if task not in ("rec", "det", "pose", "res"):
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

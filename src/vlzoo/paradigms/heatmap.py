"""Heatmap paradigm (Lumen): a ``[LOC]`` token is matched densely against the image, and light
task decoders turn the heatmap into boxes, masks or keypoints.

Lumen's two stages, each a swappable part:

1. **Task-agnostic matching.**  The answer of every localization task is a fixed sentence with a
   ``[LOC]`` token and a task token, e.g. ``"sure, the location is [LOC]. the task output is
   [DET]."``.  The ``[LOC]`` hidden state and the image features enter an *aligner*
   (:class:`~vlzoo.decoders.DenseAligner` or :class:`~vlzoo.decoders.ConvAligner`) that returns a
   centre heatmap, per-location box width/height maps and, for pose, one heatmap per keypoint.
   Training: the LM loss on the sentence (so the model learns to say the task token), the
   CenterNet focal loss on the heatmaps and an L1 loss on the sizes.
2. **Task-specific decoding**, routed by the task token the model emitted (``route="generated"``)
   or by the sample's task (``route="given"``): rec - top-1 peak + size -> one box; det - top-K
   local maxima above a threshold -> scored boxes labelled with the category the instruction
   names; seg / res - each box (and its peak) prompts a SAM mask decoder; pose - inside each
   detected box, the peak of every keypoint heatmap, refined to sub-cell precision; grec / gres
   (generalized referring) - every local maximum above ``referent_threshold``, so *no
   peak* answers "no object" and several peaks "several objects" (gres: a mask per box).

Because the answer sentence carries no coordinates, ``route="given"`` reads ``[LOC]`` from one
teacher-forced forward pass (no generation), which is exact and fast; ``route="generated"``
decodes the sentence first, as the model would be used in a chat, in the backbone's shared
KV-cached loop (:func:`~vlzoo.backbones.generation.greedy_decode`), whose pass over ``[LOC]``
gives its state - no second pass over the answer.

Shared, not Lumen's own: the SAM prompt head (:class:`~vlzoo.decoders.SamPromptHead`: neck,
prompt scaling, decoder, upsampling - this paradigm only chooses its prompts, each box and its
centre), the mask loss names (``mask_bce``, ``mask_dice``) and the sizes (all from the backbone
interface, :class:`~vlzoo.backbones.Backbone`).  Lumen's own: the answer sentence, the aligner's
heatmaps and the task decoders.  Checkpoints written before the shared head (a bare 1x1
``mask_proj``) do not load into this module: their mask weights are ``mask_proj.*`` /
``mask_decoder.*``, now ``mask_head.neck.*`` / ``mask_head.decoder.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.generation import DecodingHooks, DecodingState
from vlzoo.backbones.interface import Backbone, check_backbone
from vlzoo.data.answers import AnswerFormat
from vlzoo.decoders.aligner import AlignerOutput, DenseAligner
from vlzoo.decoders.heatmap import (
    box_heatmap_targets,
    decode_boxes,
    draw_gaussian,
    find_peaks,
    heatmap_focal_loss,
    refine_subpixel,
)
from vlzoo.decoders.sam_prompt import SamPromptHead, mask_loss_parts
from vlzoo.paradigms.base import BaseParadigm
from vlzoo.structures import CATEGORY_TASKS, Batch, Predictions, Sample, Targets

__all__ = [
    "LOC_TOKEN",
    "TASK_TOKENS",
    "DEFAULT_ANSWER",
    "LumenAnswerFormat",
    "HeatmapMatching",
]

LOC_TOKEN = "[LOC]"
#: one task token per localization task; the model says it after ``[LOC]`` and it routes decoding
TASK_TOKENS: dict[str, str] = {
    "rec": "[REC]",
    "res": "[RES]",
    "det": "[DET]",
    "seg": "[SEG]",
    "pose": "[POSE]",
    "grec": "[GREC]",
    "gres": "[GRES]",
}
#: tasks whose decoder prompts the mask decoder with each decoded box
_MASK_TASKS = ("seg", "res", "gres")
#: Lumen's answer sentence; ``{loc}`` and ``{task}`` are replaced by the special tokens
DEFAULT_ANSWER = "sure, the location is {loc}. the task output is {task}."


class LumenAnswerFormat(AnswerFormat):
    """Writes the fixed answer sentence with ``[LOC]`` and the task token.

    Args:
        template: the answer with ``{loc}`` and ``{task}`` once each.
        tasks: the tasks whose tokens are added to the vocabulary.
    """

    def __init__(self, *, template: str = DEFAULT_ANSWER, tasks: Sequence[str] = tuple(TASK_TOKENS)) -> None:
        if template.count("{loc}") != 1 or template.count("{task}") != 1:
            raise ValueError(
                f"paradigm.answer_template must contain '{{loc}}' and '{{task}}' exactly once, got {template!r}"
            )
        unknown = [t for t in tasks if t not in TASK_TOKENS]
        if unknown:
            raise ValueError(f"LumenAnswerFormat: no task token for {unknown}; known: {sorted(TASK_TOKENS)}")
        self.template = template
        self.tasks = tuple(tasks)
        self.special_tokens = (LOC_TOKEN,) + tuple(TASK_TOKENS[t] for t in self.tasks)

    def answer_for(self, task: str) -> str:
        if task not in self.tasks:
            raise ValueError(
                f"LumenAnswerFormat: task '{task}' is not one of this run's tasks {list(self.tasks)}"
            )
        return self.template.replace("{loc}", LOC_TOKEN).replace("{task}", TASK_TOKENS[task])

    def localization_answer(self, sample: Sample, input_size: tuple[int, int]) -> str:
        return self.answer_for(sample.task)


class HeatmapMatching(BaseParadigm):
    """Lumen: ``[LOC]`` -> dense aligner -> heatmaps -> task decoders (see the module doc).

    Args:
        backbone, evaluator, optimizer, scheduler, loss_weights, tasks, max_new_tokens, use_cache: see
            :class:`~vlzoo.paradigms.BaseParadigm`.  Loss parts: ``lm``, ``heatmap``, ``size``,
            ``keypoints`` (with keypoint queries), ``mask_bce`` and ``mask_dice`` (with a mask
            decoder).  The backbone (required) gives every size.
        aligner: a built :class:`~vlzoo.decoders.DenseAligner` / :class:`~vlzoo.decoders.ConvAligner`
            (default: a ``DenseAligner`` on the backbone's grid).
        mask_decoder: a built :class:`~vlzoo.decoders.SamMaskDecoder` for seg / res, wrapped in
            the shared :class:`~vlzoo.decoders.SamPromptHead` (``self.mask_head``) over the
            backbone's vision features: each predicted box and its centre prompt it.
        max_mask_prompts: ground-truth instances per batch that train the mask decoder.
        answer_template: the answer sentence (``{loc}``, ``{task}``); the default is Lumen's.
        route: ``"given"`` (decode by the sample's task, ``[LOC]`` from a teacher-forced pass) or
            ``"generated"`` (generate the answer, route by the emitted task token).
        max_detections: top-K peaks for det / seg / pose.
        score_threshold: peaks at or below it are dropped (det / seg / pose).
        referent_threshold: the heatmap score a peak must exceed to be a referent of a grec /
            gres answer (no peak there: the expression refers to nothing); a decision
            threshold, as GREC's F1 scores the set, unlike det's ranked mAP.
        nms_kernel: max-pool window of the local-maximum NMS.
        refine: sub-cell refinement of box centres (``"quadratic"``, ``"soft_argmax"`` or ``None``).
        subcell_targets: Gaussian targets centred on the exact centre (see
            :func:`~vlzoo.decoders.gaussian_heatmap_targets`); pairs with ``refine``.
        min_overlap: CenterNet's IoU for the Gaussian radius of a box.
        keypoint_radius: radius of a keypoint Gaussian as a fraction of its instance's box side.

    The det / seg / pose label of every box is the id of the category the instruction names
    (``Batch.category_ids``, the typed query); a sample routed to det / seg / pose whose own task
    names no category (``route="generated"`` misrouting a rec sample) gets label 0.
    """

    name: ClassVar[str] = "heatmap"
    supported_tasks: ClassVar[tuple[str, ...]] = ("rec", "res", "det", "seg", "pose", "grec", "gres")

    def __init__(
        self,
        *,
        backbone: Backbone,
        aligner: nn.Module | None = None,
        mask_decoder: nn.Module | None = None,
        max_mask_prompts: int = 32,
        answer_template: str = DEFAULT_ANSWER,
        route: str = "given",
        max_detections: int = 20,
        score_threshold: float = 0.05,
        referent_threshold: float = 0.3,
        nms_kernel: int = 3,
        refine: str | None = "quadratic",
        subcell_targets: bool = True,
        min_overlap: float = 0.7,
        keypoint_radius: float = 0.15,
        evaluator: Any | None = None,
        optimizer: Any | None = None,
        scheduler: Any | None = None,
        loss_weights: dict[str, float] | None = None,
        tasks: list[str] | None = None,
        max_new_tokens: int = 24,
        use_cache: bool = True,
    ) -> None:
        check_backbone(backbone, self.name)
        if route not in ("given", "generated"):
            raise ValueError(f"paradigm.route must be 'given' or 'generated', got {route!r}")
        if refine not in (None, "quadratic", "soft_argmax"):
            raise ValueError(f"paradigm.refine must be null, 'quadratic' or 'soft_argmax', got {refine!r}")
        chosen = list(tasks) if tasks else list(getattr(evaluator, "tasks", None) or self.supported_tasks)
        super().__init__(
            backbone=backbone,
            answer_format=LumenAnswerFormat(
                template=answer_template, tasks=[t for t in chosen if t in TASK_TOKENS]
            ),
            evaluator=evaluator,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_weights=loss_weights,
            tasks=chosen,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )
        feature_grid = (int(backbone.feature_grid[0]), int(backbone.feature_grid[1]))
        if aligner is None:
            aligner = DenseAligner(
                hidden_size=int(backbone.hidden_size), vision_dim=int(backbone.vision_width), feature_grid=feature_grid
            )
        self.aligner = aligner
        self.max_mask_prompts = int(max_mask_prompts)
        self.mask_head = (
            None
            if mask_decoder is None
            else SamPromptHead(
                decoder=mask_decoder, feature_dim=int(backbone.vision_width), input_size=int(backbone.input_size)
            )
        )
        self.feature_grid = feature_grid
        needs_masks = [t for t in self.tasks if t in _MASK_TASKS]
        if needs_masks and self.mask_head is None:
            raise ValueError(
                f"tasks {needs_masks} need masks: set paradigm.mask_decoder (e.g. vlzoo.decoders.SamMaskDecoder)"
            )
        if "pose" in self.tasks and int(getattr(aligner, "num_keypoints", 0)) < 1:
            raise ValueError(
                "task 'pose' needs keypoint queries: set paradigm.aligner.num_keypoints (5 for Shapes)"
            )
        self.route = route
        self.max_detections = int(max_detections)
        self.score_threshold = float(score_threshold)
        if not 0.0 <= referent_threshold < 1.0:
            raise ValueError(f"paradigm.referent_threshold must be in [0, 1), got {referent_threshold}")
        self.referent_threshold = float(referent_threshold)
        self.nms_kernel = int(nms_kernel)
        self.refine = refine
        self.subcell_targets = bool(subcell_targets)
        self.min_overlap = float(min_overlap)
        self.keypoint_radius = float(keypoint_radius)
        self.loc_token_id = self.special_token_ids.get(LOC_TOKEN)
        self.task_token_ids = {
            task: self.special_token_ids[tok]
            for task, tok in TASK_TOKENS.items()
            if tok in self.special_token_ids
        }

    # ------------------------------------------------------------------ matching
    def _backbone_pass(
        self, batch_images: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None, references: Any = None
    ):
        if self.backbone is None or self.loc_token_id is None:
            raise ValueError("HeatmapMatching needs a backbone (paradigm.backbone)")
        return self.backbone(
            images=batch_images, input_ids=input_ids, attention_mask=attention_mask, labels=labels, references=references
        )

    def _loc_states(
        self, out: Any, input_ids: Tensor, tasks: Sequence[str], image_ids: Sequence[int]
    ) -> Tensor:
        """``(B, hidden)`` last hidden state at each row's (first) ``[LOC]`` token.

        A row of a text task (a dataset may fall back to a caption when no object can be
        referred to alone) has no ``[LOC]``; it reads the last position and is left out of the
        heatmap losses by :meth:`loss`.  A localization row without ``[LOC]`` is an error."""
        is_loc = input_ids == self.loc_token_id
        has = is_loc.any(1)
        bad = [int(image_ids[i]) for i in range(len(tasks)) if tasks[i] in TASK_TOKENS and not bool(has[i])]
        if bad:
            raise ValueError(
                f"no '{LOC_TOKEN}' token in the sequence of sample(s) {bad}: the datamodule must use "
                "the paradigm's answer_format (and a max_length long enough for the answer)"
            )
        index = torch.where(
            has, is_loc.float().argmax(1), torch.full_like(has, input_ids.shape[1] - 1, dtype=torch.long)
        )
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return out.hidden_states[rows, out.positions[rows, index]]

    def _image_features(self, out: Any) -> Tensor:
        if getattr(self.aligner, "image_source", "vision") == "vision":
            return out.image_features
        tokens = out.image_hidden_states()
        h, w = self.feature_grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def match(self, batch: Batch) -> tuple[Any, AlignerOutput]:
        """One teacher-forced pass: backbone output (with the LM loss) and the aligner's maps."""
        out = self._backbone_pass(
            batch.images, batch.input_ids, batch.attention_mask, batch.labels, references=batch.references()
        )
        loc = self._loc_states(out, batch.input_ids, batch.tasks, batch.image_ids)
        return out, self.aligner(self._image_features(out), loc)

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch) -> dict[str, Tensor]:
        out, maps = self.match(batch)
        device = maps.heatmaps.device
        b, _, h, w = maps.heatmaps.shape
        input_size = batch.input_size
        heat_t = torch.zeros(b, h, w)
        size_t = torch.zeros(b, 2, h, w)
        size_w = torch.zeros(b, h, w)
        for i, t in enumerate(batch.targets):
            heat_t[i], size_t[i], size_w[i] = box_heatmap_targets(
                t.boxes, input_size, (h, w), min_overlap=self.min_overlap, subcell=self.subcell_targets
            )
        heat_t, size_t, size_w = heat_t.to(device), size_t.to(device), size_w.to(device)
        loc_rows = torch.tensor([task in TASK_TOKENS for task in batch.tasks], device=device)
        size_w = size_w * loc_rows[:, None, None]
        if bool(loc_rows.all()):
            heat_loss = heatmap_focal_loss(maps.centre, heat_t)
        elif bool(loc_rows.any()):
            heat_loss = heatmap_focal_loss(maps.centre[loc_rows], heat_t[loc_rows])
        else:
            heat_loss = maps.centre.sum() * 0.0
        parts = {
            "lm": out.loss,
            "heatmap": heat_loss,
            "size": (F.l1_loss(maps.box_size, size_t, reduction="none").sum(1) * size_w).sum()
            / size_w.sum().clamp(min=1.0),
        }
        k = maps.keypoints.shape[1]
        if k:
            parts["keypoints"] = self._keypoint_loss(batch, maps, device)
        if self.mask_head is not None:
            parts.update(self._mask_loss(batch, out))
        return parts

    def _keypoint_targets(
        self, t: Targets, k: int, input_size: tuple[int, int], grid: tuple[int, int], sample: int
    ):
        """``(K, h, w)``: a Gaussian at every labelled keypoint, its radius ``keypoint_radius``
        times its instance's box side (small shapes get tight keypoint targets)."""
        h, w = grid
        target = torch.zeros(k, h, w)
        if t.keypoints is None or len(t) == 0:
            return target
        if t.keypoints.shape[1] != k:
            raise ValueError(
                f"sample {sample}: targets have {t.keypoints.shape[1]} keypoints but the aligner has "
                f"{k} keypoint queries (paradigm.aligner.num_keypoints)"
            )
        sx, sy = w / input_size[1], h / input_size[0]
        sides = ((t.boxes[:, 2] - t.boxes[:, 0]) * sx + (t.boxes[:, 3] - t.boxes[:, 1]) * sy) / 2
        for n in range(len(t)):
            radius = max(1, int(round(float(sides[n]) * self.keypoint_radius)))
            for j in range(k):
                x, y, v = (float(c) for c in t.keypoints[n, j])
                if v <= 0:
                    continue
                gx = min(max(x * sx, 0.0), w - 1e-3)
                gy = min(max(y * sy, 0.0), h - 1e-3)
                cx, cy = int(gx), int(gy)
                offset = (gx - cx - 0.5, gy - cy - 0.5) if self.subcell_targets else (0.0, 0.0)
                draw_gaussian(target[j], cx, cy, radius, offset=offset)
        return target

    def _keypoint_loss(self, batch: Batch, maps: AlignerOutput, device: torch.device) -> Tensor:
        b, k, h, w = maps.keypoints.shape
        rows = [i for i, task in enumerate(batch.tasks) if task == "pose"]
        if not rows:
            return maps.keypoints.sum() * 0.0  # keeps the graph (and DDP) identical across batches
        target = torch.stack(
            [
                self._keypoint_targets(batch.targets[i], k, batch.input_size, (h, w), batch.image_ids[i])
                for i in rows
            ]
        ).to(device)
        return heatmap_focal_loss(maps.keypoints[rows], target)

    # ------------------------------------------------------------------ masks
    def _decode_masks(self, out: Any, rows: Sequence[int], boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits ``(N, H, W)`` at the input size and predicted IoUs ``(N,)``: the shared
        SAM prompt head over the vision features of ``rows``, prompted with one box and its
        centre (a foreground point) per row - Lumen's prompts."""
        feats = out.image_features[list(rows)].float()
        boxes = boxes.to(feats)
        centres = ((boxes[:, :2] + boxes[:, 2:]) / 2).unsqueeze(1)
        return self.mask_head(feats, boxes=boxes, points=centres)

    def _mask_loss(self, batch: Batch, out: Any) -> dict[str, Tensor]:
        """SAM-style training of the mask decoder: every ground-truth instance of a seg / res /
        gres sample prompts it with its box and centre (at most ``max_mask_prompts`` per batch);
        BCE + Dice against the instance mask."""
        rows, boxes, masks = [], [], []
        for i, (task, t) in enumerate(zip(batch.tasks, batch.targets, strict=True)):
            if task not in _MASK_TASKS or t.masks is None:
                continue
            for n in range(len(t)):
                if len(rows) < self.max_mask_prompts:
                    rows.append(i)
                    boxes.append(t.boxes[n])
                    masks.append(t.masks[n])
        if not rows:
            zero = sum(q.sum() * 0.0 for q in self.mask_head.parameters())
            return {"mask_bce": zero, "mask_dice": zero}
        device = out.image_features.device
        logits, _ = self._decode_masks(out, rows, torch.stack(boxes).to(device))
        return mask_loss_parts(logits, torch.stack(masks).to(device))

    def _masks(
        self, out: Any, index: int, boxes: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``(N, H, W)`` bool masks and IoU scores of one sample's predicted boxes."""
        if boxes.shape[0] == 0:
            return torch.zeros((0, *input_size), dtype=torch.bool), torch.zeros(0)
        logits, iou = self._decode_masks(out, [index] * boxes.shape[0], boxes.to(out.image_features.device))
        return (logits > 0).cpu(), iou.detach().float().clamp(0, 1).cpu()

    # ------------------------------------------------------------------ inference
    def predict(self, batch: Batch) -> list[Predictions]:
        if self.route == "given":
            out, maps = self.match(batch)
            tasks: list[str | None] = list(batch.tasks)
            parsed = [True] * len(batch)
            texts: list[str | None] = [None] * len(batch)
        else:
            out, maps, tasks, texts = self._generated_pass(batch)
            parsed = [t is not None for t in tasks]
        preds = []
        for i in range(len(batch)):
            task = tasks[i]
            if task is None:
                preds.append(
                    Predictions(
                        parsed=False, text=texts[i], image_id=batch.image_ids[i], image_size=batch.input_size
                    )
                )
                continue
            if task not in TASK_TOKENS:
                # a text sample in a localization run: nothing to localize, scored as unparsed
                preds.append(
                    Predictions(parsed=False, image_id=batch.image_ids[i], image_size=batch.input_size)
                )
                continue
            pred = self.decode(task, maps, i, batch, out)
            preds.append(pred.replace(parsed=parsed[i], text=texts[i]))
        return preds

    def _generated_pass(self, batch: Batch) -> tuple[Any, AlignerOutput, list[str | None], list[str | None]]:
        """Generate the answer, reading each row's ``[LOC]`` state from the decoding pass over it.

        The task is the first task token generated after ``[LOC]``; a row without ``[LOC]`` or a
        task token is unparsed (no prediction, counted by the evaluator)."""
        hooks = _LocReader(int(self.loc_token_id))
        new_ids, texts = self.generate_text(batch, hooks=hooks)
        eos = self.backbone.tokenizer.eos_token_id
        finished = torch.zeros_like(new_ids, dtype=torch.bool)
        if eos is not None:
            finished = (new_ids == eos).long().cumsum(1) > 0
            finished = finished & ~(new_ids == eos)  # eos itself stays attended
        has_loc = (new_ids == self.loc_token_id) & ~finished
        tasks: list[str | None] = []
        id_to_task = {v: k for k, v in self.task_token_ids.items()}
        for row, loc_row in zip(new_ids.tolist(), has_loc.tolist(), strict=True):
            if True not in loc_row:
                tasks.append(None)
                continue
            after = row[loc_row.index(True) + 1 :]
            tasks.append(next((id_to_task[t] for t in after if t in id_to_task), None))
        out = hooks.last  # image features and image-token states of the prompt pass
        maps = self.aligner(self._image_features(out), hooks.states)
        return out, maps, tasks, texts

    def decode(self, task: str, maps: AlignerOutput, index: int, batch: Batch, out: Any) -> Predictions:
        """The task decoder of one sample (``task`` is the routed task)."""
        input_size = batch.input_size
        heat = maps.centre[index].detach().float().sigmoid()
        sizes = maps.box_size[index].detach().float()
        k = 1 if task in ("rec", "res") else self.max_detections
        threshold = {"rec": -1.0, "res": -1.0, "grec": self.referent_threshold, "gres": self.referent_threshold}.get(
            task, self.score_threshold
        )
        boxes, scores = decode_boxes(
            heat,
            sizes,
            image_size=input_size,
            k=k,
            threshold=threshold,
            kernel=self.nms_kernel,
            refine=self.refine,
        )
        label = self._label(task, batch, index)
        labels = torch.full((len(boxes),), label, dtype=torch.long)
        pred = Predictions(
            boxes=boxes,
            scores=scores,
            labels=labels,
            image_id=batch.image_ids[index],
            image_size=input_size,
            evidence={"heatmap": heat},
        )
        if task in _MASK_TASKS:
            masks, ious = self._masks(out, index, boxes, input_size)
            pred = pred.replace(masks=masks, mask_scores=ious)
        if task == "pose":
            pred = pred.replace(
                keypoints=self._keypoints(maps.keypoints[index].detach().float().sigmoid(), boxes, input_size)
            )
        return pred

    @staticmethod
    def _label(task: str, batch: Batch, index: int) -> int:
        """The label of the boxes decoded as ``task``: the query's category for det / seg / pose;
        0 for rec / res and for a sample whose own task names no category (a misrouted one)."""
        if task not in CATEGORY_TASKS or batch.tasks[index] not in CATEGORY_TASKS:
            return 0
        return batch.category_id(index)

    def _keypoints(self, heat: Tensor, boxes: Tensor, input_size: tuple[int, int]) -> Tensor:
        """``(N, K, 3)`` keypoints: for each box and keypoint, the highest cell of that keypoint's
        heatmap inside the box (grown by one cell), refined to sub-cell precision; the third
        channel is its score.  Grouping by box is what ties keypoints to instances."""
        k, h, w = heat.shape
        n = boxes.shape[0]
        out = torch.zeros(n, k, 3)
        if n == 0 or k == 0:
            return out
        sy, sx = h / input_size[0], w / input_size[1]
        ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            inside = (
                (xs >= x1 * sx - 1) & (xs <= x2 * sx + 1) & (ys >= y1 * sy - 1) & (ys <= y2 * sy + 1)
            ).float()
            for j in range(k):
                masked = heat[j] * inside
                flat = int(masked.argmax())
                py, px = divmod(flat, w)
                if self.refine is None:
                    cx, cy = px + 0.5, py + 0.5
                else:
                    rx, ry = refine_subpixel(
                        heat[j], torch.tensor([py]), torch.tensor([px]), method=self.refine
                    )
                    cx, cy = float(rx[0]), float(ry[0])
                out[i, j] = torch.tensor([cx / sx, cy / sy, float(masked.view(-1)[flat])])
        return out

    # ------------------------------------------------------------------ helpers for studies
    def peaks(self, batch: Batch, k: int = 1) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Raw centre-heatmap peaks ``(scores, ys, xs)`` per sample (for overlays and analysis)."""
        with torch.no_grad():
            _, maps = self.match(batch)
        return find_peaks(maps.centre.sigmoid(), k, -1.0, self.nms_kernel)  # type: ignore[return-value]


class _LocReader(DecodingHooks):
    """Plain greedy decoding that keeps every row's last-layer state at its first generated
    ``[LOC]`` (from the pass over it; zeros for a row that never says it), so reading ``[LOC]``
    needs no second pass over prompt + answer."""

    def __init__(self, loc_token_id: int) -> None:
        super().__init__()
        self.loc_token_id = loc_token_id
        self.states: Tensor | None = None
        self.found: Tensor | None = None
        self.last: DecodingState | None = None

    def observe(self, state: DecodingState) -> None:
        self.last = state
        if self.states is None:
            self.states = torch.zeros_like(state.hidden)
            self.found = torch.zeros(state.hidden.shape[0], dtype=torch.bool, device=state.hidden.device)
        if state.step == 0:
            return
        fresh = (state.ids[:, -1] == self.loc_token_id) & ~self.found
        if bool(fresh.any()):
            self.states = torch.where(fresh[:, None], state.hidden, self.states)
            self.found = self.found | fresh

    def final_pass(self, state: DecodingState, token: Tensor) -> bool:
        return bool(((token == self.loc_token_id) & ~self.found).any())  # a last [LOC] still gets read

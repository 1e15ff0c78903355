"""The shared base of every paradigm: a template LightningModule.

A paradigm implements little (see docs/architecture.md):

* ``answer_format`` - how a location is written into prompts and answers (passed to ``__init__``);
* ``loss(batch) -> dict[str, Tensor]`` - named loss parts, summed with ``loss_weights``;
* ``predict(batch) -> list[Predictions]`` - one per sample, in network-input pixels.

The base owns the steps, the metric collections per split and task (cloned from one
``Evaluator``), mapping predictions back to original pixels, optimizer / scheduler wiring and
logging.  Read a paradigm file top to bottom and you know the method; read this one once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vlzoo.data.answers import AnswerFormat
from vlzoo.decoders.sam_prompt import RENAMED_LOSS_PARTS
from vlzoo.structures import Batch, Predictions

__all__ = ["BaseParadigm", "to_original", "warmup_cosine"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.05,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_ratio`` of the base learning rate.

    Use in a recipe as ``scheduler: {_target_: vlzoo.paradigms.warmup_cosine, _partial_: true,
    warmup_steps: 50}``; ``total_steps`` is filled from the trainer when the recipe leaves it out.
    """
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine: total_steps must be positive, got {total_steps}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_original(pred: Predictions, batch: Batch, index: int) -> Predictions:
    """Map one sample's prediction from network-input pixels to original-image pixels."""
    tf = batch.transforms[index]
    changes: dict[str, Any] = {
        "boxes": tf.boxes_to_original(pred.boxes.detach().float().cpu()),
        "scores": pred.scores.detach().float().cpu(),
        "labels": pred.labels.detach().cpu(),
        "image_id": batch.image_ids[index],
        "image_size": tf.original_size,
    }
    if pred.masks is not None:
        changes["masks"] = tf.masks_to_original(pred.masks.detach().cpu())
    if pred.mask_scores is not None:
        changes["mask_scores"] = pred.mask_scores.detach().float().cpu()
    if pred.keypoints is not None:
        changes["keypoints"] = tf.points_to_original(pred.keypoints.detach().float().cpu())
    if pred.evidence:
        changes["evidence"] = {k: v.detach().float().cpu() for k, v in pred.evidence.items()}
    return pred.replace(**changes)


class BaseParadigm(L.LightningModule):
    """Template LightningModule shared by all paradigms.

    Args:
        backbone: the built ``MultimodalBackbone`` (injected by ``vlzoo.build``).
        answer_format: how the paradigm writes locations (given by the subclass).
        evaluator: a ``vlzoo.evaluation.Evaluator``; one metric collection per split and task.
        optimizer: a partial optimizer (``params`` missing); AdamW(lr=1e-3) when ``None``.
        scheduler: a partial scheduler taking the optimizer (``total_steps`` filled when the
            factory accepts it and the recipe left it out); stepped every optimizer step.
        loss_weights: weight per loss part name (parts not named weigh 1.0); naming a part
            the paradigm does not produce is an error, and so is a former spelling
            (:data:`~vlzoo.decoders.RENAMED_LOSS_PARTS`, e.g. ``mask`` -> ``mask_bce``).
        tasks: the tasks this run evaluates (default: the evaluator's, else every supported task).
        max_new_tokens: generation budget for paradigms that generate.
        use_cache: generate with the KV cache; ``False`` re-runs the whole sequence at every
            step (the same answers, slower: a check of the cache).
    """

    name: ClassVar[str] = "base"
    #: tasks the paradigm can train and predict; the support matrix in docs is built from these
    supported_tasks: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        backbone: nn.Module | None = None,
        answer_format: AnswerFormat | None = None,
        evaluator: Any | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        loss_weights: dict[str, float] | None = None,
        tasks: list[str] | None = None,
        max_new_tokens: int = 32,
        use_cache: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.answer_format = answer_format if answer_format is not None else AnswerFormat()
        self.evaluator = evaluator
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_weights = dict(loss_weights or {})
        renamed = {k: RENAMED_LOSS_PARTS[k] for k in self.loss_weights if k in RENAMED_LOSS_PARTS}
        if renamed:
            raise ValueError(
                "paradigm.loss_weights: "
                + ", ".join(f"'{old}' is now '{new}'" for old, new in renamed.items())
                + " (the mask loss parts have one spelling in every paradigm: mask_bce / mask_focal, "
                "mask_dice, mask_iou); rename the key(s) in the recipe"
            )
        self.max_new_tokens = max_new_tokens
        self.use_cache = bool(use_cache)
        self._checked_weights = False
        chosen = list(tasks) if tasks else list(getattr(evaluator, "tasks", None) or self.supported_tasks)
        unsupported = [t for t in chosen if t not in self.supported_tasks]
        if unsupported:
            raise ValueError(
                f"paradigm '{self.name}' does not support task(s) {unsupported}; it supports "
                f"{list(self.supported_tasks)} (recipe key paradigm.tasks or evaluator.tasks)"
            )
        self.tasks = chosen
        for method in ("loss", "predict"):
            if not callable(getattr(self, method, None)):
                raise TypeError(
                    f"{type(self).__name__} must define {method}(batch): see docs/tutorials/add_a_paradigm.md"
                )
        self.special_token_ids: dict[str, int] = {}
        if backbone is not None and self.answer_format.special_tokens:
            self.special_token_ids = backbone.add_special_tokens(list(self.answer_format.special_tokens))
        # metric collections are created in setup(), once the split names are known
        self.metrics = nn.ModuleDict()
        # the evaluation loss per split, a sample-weighted mean summed across ranks by torchmetrics
        # (Lightning 2.6's own sync_dist mean floors the per-rank sample counts when ranks
        # evaluate unequal numbers of samples: Lightning-AI/pytorch-lightning#21838)
        self.eval_losses = nn.ModuleDict()

    # ------------------------------------------------------------------ helpers for subclasses
    def generate_text(
        self, batch: Batch, *, logits_processor: Any | None = None, hooks: Any | None = None
    ) -> tuple[Tensor, list[str]]:
        """Greedy generation from the prompt; returns (new token ids, decoded texts).

        ``hooks`` (a :class:`~vlzoo.backbones.generation.DecodingHooks`) replace plain greedy
        decoding in the backbone's shared loop, e.g. to read a hidden state while generating."""
        if self.backbone is None:
            raise ValueError(f"paradigm '{self.name}' needs a backbone to generate text")
        if hooks is None:
            new_ids = self.backbone.generate(
                batch.images,
                batch.prompt_ids,
                batch.prompt_attention_mask,
                max_new_tokens=self.max_new_tokens,
                logits_processor=logits_processor,
                use_cache=self.use_cache,
                references=batch.references(),
            )
        else:
            if logits_processor is not None:
                raise ValueError("generate_text: give the logits processor to the hooks, not both")
            new_ids = self.backbone.decode(
                batch.images,
                batch.prompt_ids,
                batch.prompt_attention_mask,
                hooks=hooks,
                max_new_tokens=self.max_new_tokens,
                use_cache=self.use_cache,
                references=batch.references(),
            )
        texts = self.backbone.tokenizer.batch_decode(new_ids, skip_special_tokens=False)
        return new_ids, [self._clean_text(t) for t in texts]

    def _clean_text(self, text: str) -> str:
        tok = self.backbone.tokenizer
        for special in (tok.eos_token, tok.pad_token, tok.bos_token):
            if special:
                text = text.split(special)[0] if special == tok.eos_token else text.replace(special, "")
        return text.strip()

    def weighted_total(self, parts: dict[str, Tensor]) -> Tensor:
        """Sum of the loss parts with the recipe's weights."""
        if not self._checked_weights:
            unknown = sorted(set(self.loss_weights) - set(parts))
            if unknown:
                raise ValueError(
                    f"paradigm.loss_weights names {unknown}, which paradigm '{self.name}' does not "
                    f"produce; its loss parts are {sorted(parts)}"
                )
            self._checked_weights = True
        total = sum(self.loss_weights.get(k, 1.0) * v for k, v in parts.items())
        return total  # type: ignore[return-value]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        for split in self._eval_split_names():
            if split not in self.eval_losses:
                self.eval_losses[split] = MeanMetric()
        if self.evaluator is None:
            return
        for split in self._eval_split_names():
            for task in self.tasks:
                key = f"{split}__{task}"
                if key not in self.metrics:
                    self.metrics[key] = self.evaluator.collection(task)

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _eval_split_names(self) -> list[str]:
        """Every split this run may evaluate: the datamodule's ``val_names`` / ``test_names``
        (e.g. ``val``, ``test``, ``comp_test``) plus the stage names."""
        dm = self._datamodule()
        names = list(getattr(dm, "val_names", None) or []) + list(getattr(dm, "test_names", None) or [])
        for base in ("val", "test", "predict"):
            if base not in names:
                names.append(base)
        return list(dict.fromkeys(names))

    def _split_name(self, stage: str, dataloader_idx: int) -> str:
        names = getattr(self._datamodule(), f"{stage}_names", None)
        if names and dataloader_idx < len(names):
            return names[dataloader_idx]
        return stage if dataloader_idx == 0 else f"{stage}{dataloader_idx}"

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        parts = self.loss(batch)
        total = self.weighted_total(parts)
        if not torch.isfinite(total):
            bad = [k for k, v in parts.items() if not torch.isfinite(v)]
            raise FloatingPointError(
                f"non-finite training loss at global step {self.global_step} (batch {batch_idx}): "
                f"loss part(s) {bad or ['total']}; lower the learning rate or check the data. "
                "The last good checkpoint is kept."
            )
        # logged in on_train_batch_end, on the steps a logger or the progress bar reads them
        self._train_losses = ({k: v.detach() for k, v in parts.items()}, total.detach(), len(batch))
        return total

    def on_train_start(self) -> None:
        # a progress bar shows the loss every step, and a callback monitoring a train/ metric
        # (ModelCheckpoint, EarlyStopping) reads it whenever it checks: then log every step
        self._log_every_step = self.trainer.progress_bar_callback is not None or any(
            str(getattr(cb, "monitor", None) or "").startswith("train/") for cb in self.trainer.callbacks
        )

    def _train_logs_due(self, batch_idx: int) -> bool:
        """True when this step's training losses are read: Lightning's loggers write them
        (every ``log_every_n_steps`` steps, and when training stops), on the last step of
        training (so ``trainer.callback_metrics`` ends with the final losses), or every step when
        a progress bar or a callback monitoring a ``train/`` metric reads them.

        ``self.log`` costs about a millisecond per call on CPU; logging only the steps that are
        written keeps the logged values and their steps as before (issue 19)."""
        trainer = self.trainer
        if getattr(self, "_log_every_step", True) or trainer.fast_dev_run:
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if last_epoch and batch_idx + 1 >= trainer.num_training_batches:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        due = getattr(connector, "should_update_logs", None)
        return True if due is None else bool(due)  # an unknown Lightning: every step, as before

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        losses = getattr(self, "_train_losses", None)
        self._train_losses = None
        if losses is None or not self._train_logs_due(batch_idx):
            return
        parts, total, bs = losses
        for k, v in parts.items():
            self.log(f"train/loss_{k}", v, batch_size=bs)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)

    def _eval_step(self, stage: str, batch: Batch, dataloader_idx: int) -> list[Predictions]:
        split = self._split_name(stage, dataloader_idx)
        parts = self.loss(batch)
        total = self.weighted_total(parts)
        loss = self.eval_losses[split] if split in self.eval_losses else None
        if loss is None:  # a split setup() did not name (no datamodule names): Lightning's mean
            self.log(f"{split}/loss", total.detach(), batch_size=len(batch), add_dataloader_idx=False, sync_dist=True)
        else:
            loss.update(total.detach().float(), weight=len(batch))
            self.log(f"{split}/loss", loss, batch_size=len(batch), add_dataloader_idx=False)
        preds = [to_original(p, batch, i) for i, p in enumerate(self.predict(batch))]
        self.update_metrics(split, batch, preds)
        return preds

    def update_metrics(self, split: str, batch: Batch, preds: list[Predictions]) -> None:
        """Route each sample to its task's metric collection of ``split``."""
        if self.evaluator is None:
            return
        by_task: dict[str, list[int]] = {}
        for i, task in enumerate(batch.tasks):
            by_task.setdefault(task, []).append(i)
        for task, idx in by_task.items():
            key = f"{split}__{task}"
            if key not in self.metrics:
                raise ValueError(
                    f"split '{split}' holds task '{task}', which this run does not evaluate "
                    f"(tasks: {self.tasks}); add it to paradigm.tasks or evaluator.tasks"
                )
            self.metrics[key].update([preds[i] for i in idx], [batch.original_targets[i] for i in idx])

    def _log_metrics(self, stage: str) -> None:
        for key, collection in self.metrics.items():
            split, task = key.split("__")
            if not self._belongs(split, stage):
                continue
            updated = any(m.update_count > 0 for m in collection.values())
            if self._trainer is not None and self.trainer.world_size > 1:
                # compute() is collective under DDP: every rank must take the same branch, also a
                # rank that got no sample of this task
                updated = self.trainer.strategy.reduce_boolean_decision(updated, all=False)
            if not updated:
                continue
            values = collection.compute()  # torchmetrics sums the states of every rank first
            for name, value in values.items():
                # the values are already global and equal on every rank; max keeps them exact and
                # tells Lightning so (no "use sync_dist" warning)
                self.log(f"{split}/{task}/{name}", value, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")
            collection.reset()

    def _belongs(self, split: str, stage: str) -> bool:
        names = getattr(self._datamodule(), f"{stage}_names", None)
        if names:
            return split in names
        return split == stage or (split.startswith(stage) and split[len(stage) :].isdigit())

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> list[Predictions]:
        return [to_original(p, batch, i) for i, p in enumerate(self.predict(batch))]

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups; override for per-part learning rates.

        Embedding matrices of which only some rows train (new special tokens on a frozen
        embedding) go to a group without weight decay: AdamW's decoupled decay would otherwise
        shrink the frozen rows, which get no gradient but do get decayed."""
        no_decay_names = set()
        if self.backbone is not None and hasattr(self.backbone, "no_weight_decay"):
            no_decay_names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name in no_decay_names else decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"paradigm '{self.name}' has no trainable parameters (check the freeze policy)")
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        optimizer = factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        if _accepts_unbound(self.scheduler_factory, "total_steps"):
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):  # validation refuses such a recipe; this is for code that builds its own
                raise ValueError(
                    "a schedule over the run's length (a scheduler taking total_steps) needs a finite run, but "
                    "trainer.max_steps and trainer.max_epochs are both -1; set one, or bind the scheduler's total_steps"
                )
            kwargs["total_steps"] = int(steps)
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)


def _accepts_unbound(factory: Callable[..., Any], name: str) -> bool:
    """True when ``factory`` (a function or functools.partial) takes ``name`` and it is not bound."""
    bound = getattr(factory, "keywords", {}) or {}
    if name in bound:
        return False
    func = getattr(factory, "func", factory)
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False

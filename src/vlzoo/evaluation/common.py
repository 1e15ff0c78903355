"""Helpers shared by the evaluation metrics: input checks and a distributed sync that copes with
ragged per-sample state (uneven or empty ranks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from vlzoo.structures import Predictions, Targets

__all__ = ["check_pairs", "check_finite", "ObjectListSync"]


def check_pairs(preds: Sequence[Predictions], targets: Sequence[Targets], *, metric: str) -> None:
    """Raise ``ValueError`` unless ``preds`` and ``targets`` are equally long sequences of
    :class:`Predictions` and :class:`Targets`."""
    if not isinstance(preds, Sequence) or not isinstance(targets, Sequence):
        raise ValueError(f"{metric}.update expects lists of Predictions and Targets, got {type(preds).__name__} "
                         f"and {type(targets).__name__}")
    if len(preds) != len(targets):
        ids_p = [getattr(p, "image_id", "?") for p in preds[:5]]
        ids_t = [getattr(t, "image_id", "?") for t in targets[:5]]
        raise ValueError(
            f"{metric}.update got {len(preds)} predictions but {len(targets)} targets "
            f"(first image_ids: predictions {ids_p}, targets {ids_t})"
        )
    for p, t in zip(preds, targets, strict=True):
        if not isinstance(p, Predictions):
            raise ValueError(f"{metric}.update expects Predictions, got {type(p).__name__}")
        if not isinstance(t, Targets):
            raise ValueError(f"{metric}.update expects Targets, got {type(t).__name__}")


def check_finite(value: Tensor | None, *, what: str, image_id: int, metric: str) -> None:
    """Raise ``ValueError`` naming the sample if ``value`` holds NaN or infinite entries."""
    if value is not None and value.numel() and not bool(torch.isfinite(value.float()).all()):
        raise ValueError(f"{metric}: {what} of image_id={image_id} contain NaN or infinite values")


class ObjectListSync:
    """Mixin for :class:`torchmetrics.Metric` subclasses whose ragged state lives in python lists.

    torchmetrics' default sync concatenates list states into one tensor per rank; that breaks when
    ranks hold different dtypes / trailing shapes, or (for lists of tuples) different lengths.
    Here list states are gathered with ``all_gather_object`` and concatenated in rank order, and
    tensor states are gathered with ``dist_sync_fn`` and reduced with their ``dist_reduce_fx``.
    Every list element must be picklable (tensors are kept on CPU by the metrics).
    """

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        group = process_group if process_group is not None else self.process_group  # type: ignore[attr-defined]
        world_size = dist.get_world_size(group)
        for attr, reduce_fx in self._reductions.items():  # type: ignore[attr-defined]
            value = getattr(self, attr)
            if isinstance(value, list):
                parts: list[Any] = [None] * world_size
                dist.all_gather_object(parts, value, group=group)
                setattr(self, attr, [item for part in parts for item in part])
            else:
                gathered = dist_sync_fn(value, group=group)
                stacked = torch.stack(gathered)
                setattr(self, attr, reduce_fx(stacked) if reduce_fx is not None else stacked)

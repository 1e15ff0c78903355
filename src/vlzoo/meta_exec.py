"""Running a model whose weights and float activations live on PyTorch's ``meta`` device.

A meta tensor has a shape and a dtype but no values, so every layer runs and every shape is
checked at no memory cost.  Two things need help, and :class:`MetaExecution` (a
``TorchFunctionMode``) gives it:

* **Mixed devices.** A dry run keeps the batch's integer structure - token ids, the image
  placeholder, targets, boxes - as real small CPU tensors, because paradigms index and branch on
  them.  An op that meets a CPU and a meta tensor is retried with the CPU tensors moved to meta.
* **Fused attention.** ``scaled_dot_product_attention`` on meta runs as the fused kernels do
  (:class:`_FusedAttention`), so what it keeps for backward is counted as on a GPU.
* **Values read from meta tensors.** ``.item()``, ``.tolist()``, ``bool()``, ``nonzero`` and
  the like need values a meta tensor does not have (a generated token, a heatmap peak, a
  score threshold).  A truth value is taken as **true** (checks pass) and a mask as all true
  (``nonzero`` with torch's ``meta_nonzero_assume_all_nonzero``: a mask selects every element);
  indices computed from meta values (``argmax``, ``topk`` ...) become CPU **zeros**, so
  generated token ids are 0 and decoding that stops at end-of-sequence runs to
  ``max_new_tokens``; any other read is retried with the meta integer operands, then all meta
  operands, read on the CPU as zeros (masks as true).  Each read is recorded with the vlzoo
  source line that made it (:attr:`MetaExecution.reads`).
  A training step normally makes no such read (its structure comes from the CPU batch); a
  prediction step does (generation reads its tokens), so what it decodes is meaningless while
  the shapes on its way are still checked.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["MetaExecution", "MetaRead"]

_SRC = str(Path(__file__).resolve().parent)
_DEVICE_ERRORS = ("is not on the expected device", "Expected all tensors to be on the same device",
                  "must be on the same device", "found at least two devices")
_DTYPE_ERRORS = ("should be the same", "same dtype", "expected scalar type", "mixed dtype", "Expected both")
_VALUE_ERRORS = ("meta", "Cannot copy out of meta tensor", "data-dependent", "DataDependent")


def _lower_precision_ops() -> frozenset[Any]:
    """The ops CPU / CUDA autocast runs in the lower precision (matmuls and convolutions)."""
    import torch.nn.functional as F

    names = ("matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm")
    ops: set[Any] = {getattr(torch, n) for n in names} | {getattr(torch.Tensor, n) for n in names}
    ops |= {torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}
    ops |= {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
            F.scaled_dot_product_attention, F.prelu}
    return frozenset(ops)


_LOWER = _lower_precision_ops()


class _FusedAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` on meta tensors as the fused kernels (flash / memory
    efficient, on GPU and on CPU) run it: the output, and for backward ``q, k, v``, the output and
    the row log-sum-exp - not the ``(L, S)`` attention matrix the math fallback the meta device
    would take keeps."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@dataclass(frozen=True)
class MetaRead:
    """One value read from a meta tensor and taken as zero."""

    op: str
    where: str  # the innermost vlzoo source line (file:line function)


_INDEX_OPS = frozenset({"argmax", "argmin", "topk", "sort", "argsort", "max", "min", "multinomial", "searchsorted",
                        "bucketize"})


def _zeros(x: torch.Tensor) -> torch.Tensor:
    """What a meta tensor reads as: true for a mask (as ``bool()`` and ``nonzero``), else 0."""
    if x.dtype == torch.bool:
        return torch.ones(x.shape, dtype=torch.bool)
    return torch.zeros(x.shape, dtype=x.dtype)


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _where() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(_SRC) and not frame.filename.endswith(("meta_exec.py", "dryrun.py", "cli.py", "memory.py")):
            return f"{Path(frame.filename).relative_to(Path(_SRC).parent)}:{frame.lineno} {frame.name}"
    return "outside vlzoo"


@dataclass
class MetaExecution(TorchFunctionMode):
    """Mix CPU and meta tensors, and read meta values as zeros (recorded); see the module doc."""

    reads: list[MetaRead] = field(default_factory=list)
    #: emulate autocast to this dtype (``torch.autocast`` leaves meta tensors alone)
    autocast: torch.dtype | None = None

    def __post_init__(self) -> None:
        super().__init__()
        self._saved_nonzero: list[bool] = []

    def __enter__(self) -> MetaExecution:
        from torch.fx.experimental import _config

        # a meta mask selects every element (torch's own option), as bool() reads true
        self._saved_nonzero.append(_config.meta_nonzero_assume_all_nonzero)
        _config.meta_nonzero_assume_all_nonzero = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        from torch.fx.experimental import _config

        super().__exit__(*exc)
        _config.meta_nonzero_assume_all_nonzero = self._saved_nonzero.pop()

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.autocast is not None and func in _LOWER:
            with torch._C.DisableTorchFunction():
                args, kwargs = tree_map(self._lower, (args, kwargs))
        if func is torch.nn.functional.scaled_dot_product_attention and _is_meta(args[0] if args else kwargs.get("query")):
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            with torch._C.DisableTorchFunction():
                q, k, v = (x.to("meta") for x in (q, k, v))
                return _FusedAttention.apply(q, k, v)
        try:
            return self._indices(func, func(*args, **kwargs))
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            flat, _ = tree_flatten((args, kwargs))
            if not any(_is_meta(x) for x in flat):
                raise
            message = str(err)
            if any(s in message for s in _DEVICE_ERRORS):
                with torch._C.DisableTorchFunction():
                    moved = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) and not _is_meta(x) else x,
                                     (args, kwargs))
                return self.__torch_function__(func, types, *moved)
            if self.autocast is not None and any(s in message for s in _DTYPE_ERRORS):
                # autocast's fp32 ops (norms, losses) take mixed inputs in float32
                with torch._C.DisableTorchFunction():
                    wide = tree_map(lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                                    (args, kwargs))
                return self.__torch_function__(func, types, *wide)
            if not any(s in message for s in _VALUE_ERRORS):
                raise
            name = getattr(func, "__name__", str(func))
            self.reads.append(MetaRead(op=name, where=_where()))
            if name == "__bool__":
                return True  # a condition on meta values holds: checks pass
            with torch._C.DisableTorchFunction():
                # integer operands (masks, indices) first, so float data keeps its graph
                ints = tree_map(lambda x: _zeros(x) if _is_meta(x) and not x.is_floating_point() else x, (args, kwargs))
            try:
                return func(*ints[0], **ints[1])
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                with torch._C.DisableTorchFunction():
                    zeroed = tree_map(lambda x: _zeros(x) if _is_meta(x) else x, (args, kwargs))
                return func(*zeroed[0], **zeroed[1])

    def _indices(self, func: Callable, result: Any) -> Any:
        """Indices computed from meta values (argmax, topk ...) become CPU zeros: what they
        index is real (token ids, positions), only their values are unknown."""
        name = getattr(func, "__name__", "")
        if name not in _INDEX_OPS:
            return result
        found = [x for x in tree_flatten(result)[0] if _is_meta(x) and x.dtype in (torch.int64, torch.int32)]
        if not found:
            return result
        self.reads.append(MetaRead(op=name, where=_where()))
        with torch._C.DisableTorchFunction():
            return tree_map(lambda x: _zeros(x) if _is_meta(x) and x.dtype in (torch.int64, torch.int32) else x, result)

    def _lower(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.autocast:
            return x.to(self.autocast)
        return x

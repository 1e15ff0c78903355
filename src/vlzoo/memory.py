"""The memory plan of a recipe: what each GPU holds under its strategy and precision.

Everything is counted on the model as built (:func:`vlzoo.dryrun.dry_run` builds it at full
size on the meta device), not derived from a formula:

* **parameters** - ``numel x element size`` of every parameter tensor, in the dtype the recipe
  loads it in (tied weights once);
* **gradients** - one per trainable parameter, in its dtype;
* **optimizer state** - the bytes of the real optimizer's state after one step (AdamW: two
  moments per trainable parameter, plus its step counters);
* **activations** - the bytes autograd keeps from the forward pass for the backward pass, for
  the recipe's batch: every tensor a ``saved_tensors_hooks`` pack hook sees, counted once per
  storage, parameters excluded (:class:`SavedTensorCounter`).  *With* gradient checkpointing
  the transformer layers that save anything keep only their inputs, and one layer's saved tensors are alive again
  while it is recomputed: ``saved - sum(layer saved) + sum(layer inputs) + max(layer saved)``.

How the strategy divides them over ``world`` GPUs (:func:`memory_plan`):

====================  ================================================================
``single`` / ``ddp``  everything replicated; DDP also keeps gradient buckets (one more copy
                      of the gradients, ``gradient_as_bucket_view`` off, Lightning's default)
``deepspeed_stage_2``  weights replicated (trainable ones in the compute dtype); an fp32 master
                      copy of the trainable weights, their optimizer state and gradients
                      divided by ``world``
``fsdp``              parameters, gradients and optimizer state divided by ``world``; plus the
                      largest wrapped unit gathered in the compute dtype, twice (prefetch)
====================  ================================================================

Not included: the CUDA context and allocator slack (1-2 GB), temporary buffers inside one op,
and autocast's lower-precision copies (activations are counted in the dtypes the layers compute
in without autocast, so under ``bf16-mixed`` the figure for fp32 trainable layers is an upper
bound).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ActivationCount",
    "SavedTensorCounter",
    "MemoryPlan",
    "memory_plan",
    "strategy_of",
    "checkpointable_layers",
    "parameter_bytes",
    "optimizer_state_bytes",
    "STRATEGIES",
]

STRATEGIES = ("single", "ddp", "deepspeed_stage_2", "fsdp")
GB = 1e9


def _unique_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def parameter_bytes(module: nn.Module) -> dict[str, int]:
    """``numel`` and bytes of all and of trainable parameters (tied weights counted once)."""
    out = {"numel": 0, "trainable_numel": 0, "bytes": 0, "trainable_bytes": 0}
    for p in _unique_parameters(module):
        size = p.numel() * p.element_size()
        out["numel"] += p.numel()
        out["bytes"] += size
        if p.requires_grad:
            out["trainable_numel"] += p.numel()
            out["trainable_bytes"] += size
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def checkpointable_layers(model: nn.Module) -> list[nn.Module]:
    """The units gradient checkpointing wraps: transformers' decoder / encoder layers
    (``GradientCheckpointingLayer``) and timm's ViT blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            layers.append(module)
        elif hasattr(module, "grad_checkpointing") and isinstance(getattr(module, "blocks", None), nn.Sequential):
            layers.extend(module.blocks)
    return layers


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


@dataclass
class ActivationCount:
    """Bytes autograd saves for backward in one training step (see the module doc)."""

    saved: int = 0
    layer_saved: list[int] = field(default_factory=list)
    layer_inputs: list[int] = field(default_factory=list)

    @property
    def without_checkpointing(self) -> int:
        return self.saved

    @property
    def checkpointed_forward(self) -> int:
        """What stays alive after a checkpointed forward: the saves outside the layers and the
        inputs of the layers (a layer that saved nothing - frozen, no gradient through it -
        keeps nothing either way)."""
        used = [i for i, size in enumerate(self.layer_saved) if size > 0]
        return self.saved - sum(self.layer_saved) + sum(self.layer_inputs[i] for i in used)

    @property
    def with_checkpointing(self) -> int:
        """The peak during backward: the checkpointed forward plus one layer's saved tensors
        while it is recomputed."""
        return self.checkpointed_forward + max(self.layer_saved, default=0)


class SavedTensorCounter:
    """Count what autograd saves during a forward pass (a context manager).

    Tensors are counted once per storage; parameters (and views of them) are not activations
    and are left out.  Saves made while one of ``layers`` runs are attributed to it, and each
    layer's tensor inputs are counted too (what checkpointing keeps instead).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module] = ()) -> None:
        self.count = ActivationCount(layer_saved=[0] * len(layers), layer_inputs=[0] * len(layers))
        self._params = {_storage_key(p) for p in model.parameters()}
        self._seen: set[int] = set()
        self._inputs: set[int] = set()
        self._layers = list(layers)
        self._current: list[int] = []
        self._handles: list[Any] = []
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._params and key not in self._seen:
            self._seen.add(key)
            size = _storage_bytes(t)
            self.count.saved += size
            if self._current:
                self.count.layer_saved[self._current[-1]] += size
        return t

    def _enter(self, index: int) -> Any:
        def hook(_module: nn.Module, args: Any, kwargs: Any) -> None:
            self._current.append(index)
            for value in [*args, *kwargs.values()]:
                # inputs shared by every layer (rotary cos / sin, masks) are kept once
                if isinstance(value, torch.Tensor) and value.is_floating_point() and _storage_key(value) not in self._inputs:
                    self._inputs.add(_storage_key(value))
                    self.count.layer_inputs[index] += _storage_bytes(value)

        return hook

    def _leave(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._current:
            self._current.pop()

    def __enter__(self) -> SavedTensorCounter:
        for index, layer in enumerate(self._layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(index), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def strategy_of(recipe: Any, *, default_world: int = 8) -> tuple[str, int, str]:
    """``(strategy, world, precision)`` of a recipe's ``trainer`` slot.

    ``strategy`` is one of :data:`STRATEGIES`; ``world`` is ``devices x num_nodes`` (``-1`` /
    ``auto`` devices count as ``default_world``)."""
    trainer = recipe.slot("trainer") or {}
    raw = trainer.get("strategy", "auto")
    if isinstance(raw, dict):
        target = str(raw.get("_target_", ""))
        raw = "fsdp" if "FSDP" in target else "deepspeed" if "DeepSpeed" in target else "ddp" if "DDP" in target else target
    raw = str(raw).lower()
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    devices = default_world if devices in (-1, "-1", "auto", None) else int(devices)
    world = devices * int(trainer.get("num_nodes", 1) or 1)
    if raw.startswith("fsdp"):
        strategy = "fsdp"
    elif raw.startswith("deepspeed"):
        if "stage_2" not in raw:
            raise ValueError(f"trainer.strategy {raw!r}: the memory plan knows DeepSpeed ZeRO-2 only")
        strategy = "deepspeed_stage_2"
    elif raw.startswith("ddp") or world > 1:
        strategy = "ddp"
    else:
        strategy = "single"
    return strategy, world, str(trainer.get("precision", "32-true"))


def _compute_bytes(precision: str) -> int:
    return 2 if precision.startswith(("bf16", "16")) else 4


def _largest_wrapped_unit(model: nn.Module, min_num_params: int) -> int:
    """Parameters of the largest unit FSDP's ``size_based_auto_wrap_policy`` makes: a module is
    wrapped when the parameters not already in a wrapped child reach ``min_num_params``; the root
    holds the rest."""
    largest = 0

    def visit(module: nn.Module, seen: set[int]) -> int:
        nonlocal largest
        remaining = 0
        for child in module.children():
            remaining += visit(child, seen)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                remaining += p.numel()
        if remaining >= min_num_params:
            largest = max(largest, remaining)
            return 0
        return remaining

    rest = visit(model, set())
    return max(largest, rest)


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one recipe; ``rows`` is ``[(item, bytes per GPU, how)]``."""

    strategy: str
    world: int
    precision: str
    batch_size: int
    parameters: int
    trainable: int
    parameter_bytes: int
    trainable_bytes: int
    optimizer_bytes: int
    activations: int
    activations_checkpointed: int
    gradient_checkpointing: bool
    rows: list[tuple[str, int, str]] = field(default_factory=list)
    activation_count: ActivationCount | None = None

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "world": self.world,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "parameter_bytes": self.parameter_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activations": self.activations,
            "activations_checkpointed": self.activations_checkpointed,
            "gradient_checkpointing": self.gradient_checkpointing,
            "total": self.total,
        }

    def format(self) -> str:
        gc = "on" if self.gradient_checkpointing else "off"
        lines = [
            f"memory plan: {self.strategy} on {self.world} GPU(s), {self.precision}, batch {self.batch_size} per GPU, "
            f"gradient checkpointing {gc}",
            f"  parameters {self.parameters:,} ({self.trainable:,} trainable); activations per step "
            f"{self.activations / GB:.2f} GB without / {self.activations_checkpointed / GB:.2f} GB with checkpointing",
        ]
        width = max(len(item) for item, _, _ in self.rows)
        for item, size, how in self.rows:
            lines.append(f"  {item:<{width}}  {size / GB:8.2f} GB  {how}")
        lines.append(f"  {'total per GPU':<{width}}  {self.total / GB:8.2f} GB  (+ 1-2 GB CUDA context and allocator slack)")
        return "\n".join(lines)


def memory_plan(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: ActivationCount,
    *,
    strategy: str,
    world: int,
    precision: str,
    batch_size: int,
    gradient_checkpointing: bool,
    fsdp_min_num_params: int = 50_000_000,
) -> MemoryPlan:
    """The per-GPU plan of a built model after one optimizer step (see the module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    counts = parameter_bytes(model)
    opt = optimizer_state_bytes(optimizer)
    frozen = counts["bytes"] - counts["trainable_bytes"]
    trainable, grads = counts["trainable_bytes"], counts["trainable_bytes"]
    act = activations.with_checkpointing if gradient_checkpointing else activations.without_checkpointing
    act_how = f"saved for backward, batch {batch_size}" + (", checkpointed layers" if gradient_checkpointing else "")
    n = max(1, world)
    rows: list[tuple[str, int, str]]
    if strategy in ("single", "ddp"):
        rows = [
            ("frozen weights", frozen, "as loaded"),
            ("trainable weights", trainable, "as loaded"),
            ("gradients", grads, "one per trainable weight"),
            ("optimizer state", opt, "measured after one step"),
        ]
        if strategy == "ddp" and n > 1:
            rows.append(("DDP gradient buckets", grads, "a second copy of the gradients for all-reduce"))
    elif strategy == "deepspeed_stage_2":
        compute = _compute_bytes(precision)
        numel = counts["trainable_numel"]
        rows = [
            ("frozen weights", frozen, "as loaded, replicated"),
            ("trainable weights", numel * compute, f"{compute} B each in the compute dtype, replicated"),
            ("fp32 master weights", numel * 4 // n, f"4 B each / {n}"),
            ("gradients", numel * compute // n, f"{compute} B each / {n}"),
            ("optimizer state", opt // n, f"measured after one step / {n}"),
        ]
    else:
        compute = _compute_bytes(precision)
        unit = _largest_wrapped_unit(model, fsdp_min_num_params)
        rows = [
            ("weights (sharded)", counts["bytes"] // n, f"as loaded / {n}"),
            ("gradients (sharded)", grads // n, f"/ {n}"),
            ("optimizer state (sharded)", opt // n, f"measured after one step / {n}"),
            ("gathered units", unit * compute * 2, f"largest wrapped unit {unit:,} params x {compute} B x 2 (prefetch)"),
        ]
    rows.append(("activations", act, act_how))
    return MemoryPlan(
        strategy=strategy,
        world=n,
        precision=precision,
        batch_size=batch_size,
        parameters=counts["numel"],
        trainable=counts["trainable_numel"],
        parameter_bytes=counts["bytes"],
        trainable_bytes=counts["trainable_bytes"],
        optimizer_bytes=opt,
        activations=activations.without_checkpointing,
        activations_checkpointed=activations.with_checkpointing,
        gradient_checkpointing=gradient_checkpointing,
        rows=rows,
        activation_count=activations,
    )

"""Training policies: what is frozen, LoRA, gradient checkpointing, trainable-row masks, and a
parameter report for the start of fit.

These are plain functions on ``nn.Module`` s so a user can apply them to any model;
:class:`~vlzoo.backbones.MultimodalBackbone` calls them from its constructor arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "set_trainable",
    "apply_lora",
    "lora_settings",
    "enable_gradient_checkpointing",
    "train_rows",
    "parameter_report",
    "LORA_DEFAULTS",
]

#: Defaults of the ``lora`` dict (LLaVA-1.5's LoRA recipe uses r=128, alpha=256 on all linears).
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "modules_to_save": None,
}


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze (``True``) every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(trainable)


def lora_settings(lora: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` dict completed with :data:`LORA_DEFAULTS`; an unknown key is an error."""
    unknown = set(lora) - set(LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown lora setting(s) {sorted(unknown)}; known: {sorted(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **lora}
    for name in ("target_modules", "modules_to_save"):
        if isinstance(out[name], str):
            out[name] = [out[name]]
        elif out[name] is not None:
            out[name] = list(out[name])
    return out


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    modules_to_save: Sequence[str] | None = None,
    exclude_modules: str | None = None,
) -> Any:
    """Wrap a transformers model in a PEFT LoRA model (causal-LM task).

    Everything but the LoRA matrices and ``modules_to_save`` (full trainable copies, e.g.
    ``lm_head``) is frozen by PEFT.  LoRA on embeddings is refused: vlzoo resizes embeddings
    when a paradigm adds tokens, which a LoRA embedding layer would not follow; train new token
    rows with ``train_new_embeddings`` instead.  ``exclude_modules`` is a regular expression of
    module names to leave alone (e.g. a VLM's vision tower, whose attention also has ``q_proj``).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    embeddings = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    bad = embeddings & set(target_modules)
    if bad:
        raise ValueError(f"LoRA target_modules {sorted(bad)} are embeddings; LoRA on embeddings is not supported")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        exclude_modules=exclude_modules,
    )
    return get_peft_model(model, config)


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Turn on activation checkpointing: transformers models (non-reentrant, so frozen inputs
    still pass gradients to LoRA weights) and timm / vlzoo encoders (``set_grad_checkpointing``)."""
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(module, "set_grad_checkpointing"):
        module.set_grad_checkpointing(True)
    else:
        raise ValueError(f"{type(module).__name__} does not support gradient checkpointing")


def train_rows(weight: nn.Parameter, rows: Iterable[int]) -> torch.utils.hooks.RemovableHandle:
    """Make only ``rows`` of an otherwise frozen matrix trainable.

    ``weight`` gets ``requires_grad=True`` and a gradient hook that zeroes every other row, so
    the optimizer sees zero gradient there.  Put such weights in a no-weight-decay group
    (``MultimodalBackbone.no_weight_decay()``): decoupled weight decay would otherwise shrink the
    frozen rows.
    """
    mask = torch.zeros(weight.shape[0], *([1] * (weight.ndim - 1)), dtype=weight.dtype, device=weight.device)
    index = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long, device=weight.device)
    mask[index] = 1
    weight.requires_grad_(True)
    weight._vlzoo_row_masked = True  # type: ignore[attr-defined]  # frozen apart from ``rows``

    def _mask(grad: Tensor) -> Tensor:
        return grad * mask.to(grad.dtype)

    return weight.register_hook(_mask)


def parameter_report(module: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` counted once per parameter tensor (tied weights once).

    A matrix whose rows are partly trainable through :func:`train_rows` counts as trainable.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total}

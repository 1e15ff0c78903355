"""bf16 mixed precision and gradient accumulation are recipe switches (``trainer.precision``,
``trainer.accumulate_grad_batches``) that every paradigm's base runs with on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from vlzoo.build import build
from vlzoo.config import load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = [
    "trainer=smoke",
    "data.train.size=16",
    "data.val.size=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "trainer.limit_val_batches=1",
]


class DtypeProbe(Callback):
    """Records the output dtype of the model's first trainable Linear layer during training steps, and the
    number of training batches and optimizer steps."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.batches = 0
        self.optimizer_steps = 0
        self._handle = None

    def on_fit_start(self, trainer, pl_module) -> None:
        linear = next(m for m in pl_module.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad)

        def hook(module, args, output):
            if module.training and isinstance(output, torch.Tensor):
                self.dtypes.add(output.dtype)

        self._handle = linear.register_forward_hook(hook)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._handle.remove()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.optimizer_steps += 1


def _fit(recipe: str, overrides: list[str], tmp_path: Path) -> tuple[object, DtypeProbe]:
    probe = DtypeProbe()
    built = build(RECIPES / "shapes" / f"{recipe}.yaml", overrides=[*TINY, *overrides], with_logger=False,
                  output_dir=tmp_path, extra_callbacks=[probe])
    built.trainer.fit(built.model, datamodule=built.datamodule)
    return built, probe


@pytest.mark.parametrize("recipe", ["pixel2seq_rec", "pixel2emb_rec", "heatmap_rec", "attention_keypoints_rec"])
def test_bf16_mixed_trains_and_evaluates_each_paradigm(recipe: str, tmp_path: Path) -> None:
    built, probe = _fit(recipe, ["trainer.precision=bf16-mixed"], tmp_path)
    trainer, model = built.trainer, built.model
    assert trainer.precision == "bf16-mixed"
    assert torch.bfloat16 in probe.dtypes  # the layers ran under bf16 autocast ...
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # ... on fp32 master weights
    assert trainer.global_step == 4 == probe.optimizer_steps
    metrics = trainer.callback_metrics
    for name in ("train/loss", "val/loss", "val/rec/miou"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
    assert all(torch.isfinite(p).all() for p in trainable)


def test_fp32_default_does_not_autocast(tmp_path: Path) -> None:
    _, probe = _fit("pixel2seq_rec", [], tmp_path)
    assert probe.dtypes == {torch.float32}


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_gradient_accumulation_counts_optimizer_steps(accumulate: int, tmp_path: Path) -> None:
    # one epoch of 4 batches: 4 / N optimizer steps, the scheduler sized for that many
    built, probe = _fit(
        "heatmap_rec",
        [f"trainer.accumulate_grad_batches={accumulate}", "trainer.max_steps=-1", "trainer.max_epochs=1"],
        tmp_path,
    )
    trainer = built.trainer
    assert probe.batches == 4
    assert trainer.global_step == probe.optimizer_steps == 4 // accumulate
    assert trainer.estimated_stepping_batches == 4 // accumulate
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4 // accumulate  # stepped once per optimizer step
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_accumulation_sums_micro_batch_gradients(tmp_path: Path) -> None:
    """With N micro-batches per step, the first update uses the mean of their gradients: the same
    parameters as one SGD step on the gradient averaged by hand."""
    recipe = load_recipe(RECIPES / "shapes" / "pixel2seq_rec.yaml", overrides=[
        *TINY, "data.train.size=8", "trainer.max_steps=1", "trainer.max_epochs=1", "trainer.accumulate_grad_batches=2",
    ])
    data = dict(recipe.data)
    data["optimizer"] = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    data.pop("scheduler", None)
    built = build(recipe_from_dict(data), with_logger=False, output_dir=tmp_path)
    model, dm = built.model, built.datamodule
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dm.setup("fit")
    batches = list(dm.train_dataloader())[:2]
    grads = {n: torch.zeros_like(p) for n, p in start.items()}
    model.train()
    for batch in batches:
        model.zero_grad()
        model.weighted_total(model.loss(batch)).backward()
        for n, p in model.named_parameters():
            if n in grads and p.grad is not None:
                grads[n] += p.grad / len(batches)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    model.zero_grad()
    built.trainer.fit(model, datamodule=dm)
    assert built.trainer.global_step == 1
    moved = 0
    for n, p in model.named_parameters():
        if n in start:
            expected = start[n] - 0.1 * grads[n]
            torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=n)
            moved += int(not torch.equal(p.detach(), start[n]))
    assert moved > 0

"""vlzoo.build: slot order, injection by parameter name, absent slots, trainer wiring."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from support.tiny import TinyBackbone, TinyData, TinyParadigm
from vlzoo.build import build
from vlzoo.callbacks import ParameterCount, RecipeInCheckpoint, RunLogging
from vlzoo.config import INJECTABLE, RecipeError, load_recipe, recipe_from_dict, shipped_recipes_dir, validate

SUPPORT = Path(__file__).parent / "support" / "recipes"
TINY = SUPPORT / "tiny.yaml"


def test_paradigm_and_data_receive_built_parts_by_name() -> None:
    built = build(TINY, with_trainer=False)
    model, backbone, data = built.model, built.backbone, built.datamodule
    assert isinstance(model, TinyParadigm) and isinstance(data, TinyData)
    assert model.backbone is backbone  # injected: the recipe's paradigm node has no backbone key
    assert model.evaluator is built.evaluator and built.evaluator.tasks == ["rec"]
    assert model.hidden_size == backbone.hidden_size == 8  # size from the backbone, not from YAML
    assert model.head.in_features == 8
    opt = model.configure_optimizers()  # the optimizer partial was injected
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == pytest.approx(1e-2)
    assert data.tokenizer is backbone.tokenizer
    assert data.answer_format is model.answer_format
    assert data.image_mean.flatten().tolist() == [0.5, 0.5, 0.5]  # from backbone.data_config
    assert data.image_std.flatten().tolist() == [0.25, 0.25, 0.25]
    assert data.image_size == 16
    assert data.seed == 7  # the recipe's seed
    assert backbone.tokenizer.get_vocab()["<box>"] >= 2  # the answer format's special token was added
    assert built.trainer is None and built.logger is None


def test_recipe_values_win_over_injection() -> None:
    built = build(TINY, overrides=["paradigm.hidden_size=8", "data.image_size=12", "data.seed=3"], with_trainer=False)
    assert built.datamodule.image_size == 12 and built.datamodule.seed == 3
    assert build(TINY, overrides=["paradigm.hidden_size=5"], with_trainer=False).model.head.in_features == 5


def test_special_tokens_are_not_added_twice_when_the_paradigm_adds_them() -> None:
    built = build(TINY, overrides=["paradigm.add_tokens_itself=true"], with_trainer=False)
    assert built.backbone.added == ["<box>"]


def test_absent_slots_are_fine_and_nested_nodes_build() -> None:
    built = build(SUPPORT / "nobackbone.yaml", with_trainer=False)
    assert built.backbone is None and built.datamodule is None and built.evaluator is None
    assert isinstance(built.model.backbone, TinyBackbone)
    assert built.model.optimizer_factory is None  # nothing to inject: the parameter keeps its default


def test_injected_names_count_as_provided_in_validation() -> None:
    recipe = load_recipe(TINY)
    validate(recipe)  # TinyParadigm requires backbone; build injects it
    assert "backbone" in INJECTABLE["paradigm"] and "tokenizer" in INJECTABLE["data"]
    no_backbone = recipe_from_dict({"allow_targets": ["support"], "paradigm": {"_target_": "support.tiny.TinyBackbone", "hidden_sizee": 2}})
    with pytest.raises(RecipeError, match="Did you mean hidden_size"):
        validate(no_backbone)


def test_paradigm_must_be_a_lightning_module() -> None:
    recipe = {"paradigm": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2}}
    with pytest.raises(RecipeError, match="not a LightningModule"):
        build(recipe, with_trainer=False)


def test_seed_makes_builds_repeatable() -> None:
    a = build(TINY, with_trainer=False, with_data=False).model
    b = build(TINY, with_trainer=False, with_data=False).model
    assert torch.equal(a.head.weight, b.head.weight)
    c = build(TINY, overrides=["seed=8"], with_trainer=False, with_data=False).model
    assert not torch.equal(a.head.weight, c.head.weight)


def test_trainer_gets_checkpoints_callbacks_and_quiet_progress_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    overrides = ["trainer.callbacks=[{_target_: lightning.pytorch.callbacks.LearningRateMonitor}]"]
    built = build(TINY, overrides=overrides, with_logger=False, output_dir=tmp_path)
    trainer = built.trainer
    assert isinstance(trainer, L.Trainer) and trainer.logger is None
    kinds = [type(c).__name__ for c in trainer.callbacks]
    for kind in ("LearningRateMonitor", "ModelCheckpoint", "RecipeInCheckpoint", "RunLogging", "ParameterCount"):
        assert kind in kinds
    assert trainer.progress_bar_callback is None  # quiet in CI
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.save_last and checkpoint.monitor == "val/loss" and checkpoint.mode == "min"
    assert Path(checkpoint.dirpath).parent == (tmp_path / "checkpoints").resolve()
    assert isinstance(built.callbacks[-1], ParameterCount)
    assert any(isinstance(c, RecipeInCheckpoint) for c in built.callbacks)
    assert any(isinstance(c, RunLogging) for c in built.callbacks)


def test_checkpoint_settings_come_from_the_recipe(tmp_path: Path) -> None:
    built = build(TINY, overrides=["checkpoint.monitor=train/loss", "checkpoint.save_top_k=2"], with_logger=False, output_dir=tmp_path)
    checkpoint = next(c for c in built.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.monitor == "train/loss" and checkpoint.save_top_k == 2
    with pytest.raises(RecipeError, match="checkpoint.monitr"):
        build(TINY, overrides=["checkpoint.monitr=x"], with_logger=False, output_dir=tmp_path)


def test_trainer_must_be_a_lightning_trainer(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a lightning.Trainer"):
        build(TINY, overrides=["trainer={_target_: torch.nn.Identity}"], with_logger=False, output_dir=tmp_path)


@pytest.mark.parametrize("slot", ["trainer", "optimizer", "logger"])
def test_shipped_slot_recipes_validate(slot: str) -> None:
    root = shipped_recipes_dir()
    files = sorted((root / slot).glob("*.yaml"))
    assert files, f"no shipped {slot} recipes"
    for file in files:
        recipe = load_recipe(TINY, [f"{slot}={file.stem}"])
        validate(recipe)
        assert recipe.data[slot]["_target_"]

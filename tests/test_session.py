"""The run session (vlzoo.session): one way a run is driven, from Python as from the command line,
and the split of the former vlzoo.runs (tracking is the only module that imports MLflow)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import vlzoo
from vlzoo.config import RecipeError, load_recipe, recipe_from_dict
from vlzoo.session import RunSession
from vlzoo.tracking import ResilientMLFlowLogger, find_run, tracking_uri_for

TINY = Path(__file__).parent / "support" / "recipes" / "tiny.yaml"
SRC = Path(vlzoo.__file__).parent


def test_fit_then_test_in_memory_and_resume_continue_the_same_run(tmp_path: Path) -> None:
    session = RunSession(TINY, output_dir=tmp_path)
    built = session.prepare()  # the checks and the build, ahead of the (timed) Lightning call
    assert built.trainer.global_step == 0
    fitted = session.fit()
    assert fitted.built is built
    assert fitted.run_id and fitted.tracking_uri == tracking_uri_for(tmp_path)
    tested = session.test()  # the model just trained, no second build
    assert tested.built is fitted.built and "test/loss" in tested.results[0]
    last = fitted.built.checkpoint_dir / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    again = RunSession(TINY, overrides=["trainer.max_epochs=2"], output_dir=tmp_path, resume="last").fit()
    assert again.run_id == fitted.run_id
    assert again.built.trainer.global_step > step
    assert find_run(again.tracking_uri, again.run_id).info.status == "FINISHED"


def test_the_consent_check_and_the_tracking_preflight_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlzoo.build
    import vlzoo.session

    calls: list[str] = []
    real = vlzoo.session.preflight_tracking

    def counted(*args: object, **kwargs: object) -> str | None:
        calls.append("preflight")
        return real(*args, **kwargs)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("build checked the tracking store a second time")

    monkeypatch.setattr(vlzoo.session, "preflight_tracking", counted)
    monkeypatch.setattr(vlzoo.build, "preflight_tracking", never)
    RunSession(TINY, output_dir=tmp_path).fit()
    assert calls == ["preflight"]
    # a stored recipe's allow_targets count only where the caller confirms them: refused before any build
    stored = recipe_from_dict(load_recipe(TINY).data, trust_own_allow_targets=False)
    with pytest.raises(RecipeError, match="asks to trust support"):
        RunSession(stored, output_dir=tmp_path / "stored").fit()
    assert not (tmp_path / "stored" / "checkpoints").exists()
    RunSession(stored, allow_targets=["support"], output_dir=tmp_path / "confirmed").validate()


def test_a_checkpoint_that_does_not_fit_is_refused_before_a_run_is_opened(tmp_path: Path) -> None:
    fitted = RunSession(TINY, output_dir=tmp_path / "a").fit()
    last = fitted.built.checkpoint_dir / "last.ckpt"
    with pytest.raises(RecipeError, match=r"does not fit recipe .*differ in shape"):
        RunSession(TINY, overrides=["backbone.hidden_size=16"], output_dir=tmp_path / "b", checkpoint=last).test()
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_recipes_naming_the_former_logger_path_still_work(tmp_path: Path) -> None:
    recipe = load_recipe(TINY, ["logger._target_=vlzoo.runs.ResilientMLFlowLogger", "trainer.max_steps=1"])
    outcome = RunSession(recipe, output_dir=tmp_path).fit()
    assert isinstance(outcome.built.logger, ResilientMLFlowLogger) and outcome.run_id
    with pytest.raises(ImportError, match=r"vlzoo.runs.load_checkpoint moved to vlzoo.checkpoints.load_checkpoint"):
        from vlzoo.runs import load_checkpoint  # noqa: F401


def test_only_the_tracking_module_imports_mlflow() -> None:
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.append(path.relative_to(SRC).as_posix())
    assert sorted(set(importers)) == ["tracking.py"]

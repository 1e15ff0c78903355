"""What vlzoo prints (issue 21): a line per validation without a terminal, no third-party
messages the user cannot act on (and every other message kept), study progress with the time
left, no MLflow progress bars while the study report is written."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from vlzoo.config import shipped_recipes_dir
from vlzoo.terminal import ValidationLine, quiet_third_party

RECIPES = shipped_recipes_dir()
assert RECIPES is not None
REC = RECIPES / "shapes" / "pixel2seq_rec.yaml"  # generates text: the decoder's key/value cache is used
THIRD_PARTY = ("LeafSpec", "past_key_values", "💡 Tip", "litlogger", "Downloading artifacts")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fit_without_a_terminal_prints_a_line_per_validation_and_no_third_party_noise(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # no CI: quiet only because stdout is a pipe
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "vlzoo.cli", "fit", str(REC), "trainer=smoke", "data.train.size=4", "data.val.size=2",
            "data.test.size=2", "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=540, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("vlzoo: step ")]
    assert [line.split(":")[1] for line in lines] == [" step 2", " step 4"], done.stdout
    assert all("val/rec/acc_0.5 " in line and "(val/loss " in line for line in lines), lines
    for text in THIRD_PARTY:
        assert text not in done.stdout + done.stderr, (text, done.stderr[-3000:])


def test_quiet_third_party_filters_only_what_it_names() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        noisy = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
        warnings.warn_explicit(noisy, DeprecationWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit("something else", UserWarning, "_pytree.py", 22, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(noisy, DeprecationWarning, "mine.py", 1, module="my_project.code")
        warnings.warn("vlzoo: a warning of ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else", noisy, "vlzoo: a warning of ours"]

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_third_party()  # twice: still one filter
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert stream.getvalue() == "GPU available: False, used: False\n"
    assert len([f for f in logger.filters if type(f).__name__ == "_DropLines"]) == 1


def test_the_decoder_gets_its_cache_by_the_name_it_takes() -> None:
    from vlzoo.backbones.multimodal import _cache_argument
    from vlzoo.build import build

    backbone = build(REC, with_data=False, with_trainer=False).backbone
    decoder = backbone._lm().get_decoder()
    import inspect

    params = inspect.signature(decoder.forward).parameters
    assert _cache_argument(decoder) == ("cache" if "cache" in params else "past_key_values")
    assert _cache_argument(decoder) in params


class _FakeTrainer:
    def __init__(self, metrics: dict[str, float], names: list[str]) -> None:
        import torch

        self.callback_metrics = {k: torch.tensor(v) for k, v in metrics.items()}
        self.datamodule = type("DM", (), {"val_names": names})()
        self.global_step = 500


def test_validation_line_shows_the_primary_metric_of_each_task_and_the_losses() -> None:
    trainer = _FakeTrainer({"val/rec/acc_0.5": 0.61234, "val/rec/miou": 0.5, "val/res/ciou": 0.4, "val/loss": 0.88,
                            "comp_test/rec/acc_0.5": 0.2, "comp_test/loss": 1.5, "train/loss": 0.3}, ["val", "comp_test"])
    model = type("M", (), {"tasks": ["rec", "res"]})()
    assert ValidationLine().line(trainer, model) == (
        "vlzoo: step 500: val/rec/acc_0.5 0.6123 val/res/ciou 0.4000 (comp_test/loss 1.5000, val/loss 0.8800)")
    assert ValidationLine("val/rec/miou").line(trainer, model).startswith("vlzoo: step 500: val/rec/miou 0.5000 (")


def test_study_progress_counts_cells_and_estimates_the_time_left(tmp_path: Path) -> None:
    from vlzoo.study import load_study
    from vlzoo.study.runner import StudyRun, _Progress

    now = [0.0]
    progress = _Progress(total=5, done=1, to_run=4, clock=lambda: now[0])
    said = []
    for t in (10.0, 30.0, 45.0, 200.0):
        now[0] = t
        said.append(progress.step())
    assert said == ["2/5 cells done, 10s so far, about 30s left", "3/5 cells done, 30s so far, about 30s left",
                    "4/5 cells done, 45s so far, about 15s left", "5/5 cells done, 3m20s so far, none left"]

    # the runner's own loop, with cells that finish at once
    study = tmp_path / "s.yaml"
    study.write_text(f"study:\n  name: progress\n  recipe: {RECIPES}/shapes/{{paradigm}}_{{task}}.yaml\n"
                     "  grid:\n    paradigm: [pixel2seq]\n    task: [rec]\n    seed: [0, 1]\n")
    run = StudyRun(load_study(study), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", output_dir=tmp_path)
    run._cell_command = lambda cell: [sys.executable, "-c", "pass"]  # type: ignore[method-assign]
    log: list[str] = []
    run.run(jobs=2, log=log.append)
    finished = sorted(line for line in log if " finished; " in line)
    assert len(finished) == 2
    assert sorted(line.split("; ")[1].split(",")[0] for line in finished) == ["1/2 cells done", "2/2 cells done"]
    assert any("about " in line and " left" in line for line in finished)
    assert any(line.endswith("none left") for line in finished)


def test_the_study_report_is_written_without_artifact_progress_bars(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import vlzoo.study.runner as runner
    from vlzoo.study import load_study

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    seen = {}

    def report(**kwargs: object) -> Path:
        from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

        seen["bar"] = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get()
        return tmp_path / "report" / "report.md"

    monkeypatch.setattr(runner, "build_report", report)
    study = tmp_path / "s.yaml"
    study.write_text(f"study:\n  name: bars\n  recipe: {RECIPES}/shapes/{{paradigm}}_{{task}}.yaml\n"
                     "  grid:\n    paradigm: [pixel2seq]\n    task: [rec]\n")
    runner.StudyRun(load_study(study), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", output_dir=tmp_path).report()
    assert seen == {"bar": False}
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # put back as it was

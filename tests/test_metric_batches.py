"""ResilientMLFlowLogger writes metrics in batches (issue 19): every metric reaches the store (or,
once the server is lost, the local file) exactly once, at the step it was logged, and the batches
are written on time, before a checkpoint is reported and when the run ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlzoo.config import RecipeError, load_recipe
from vlzoo.config.validation import validate
from vlzoo.tracking import ResilientMLFlowLogger, tracking_client, tracking_uri_for

TESTS = Path(__file__).resolve().parent
TINY = TESTS / "support" / "recipes" / "tiny.yaml"


def _logger(tmp_path: Path, **kwargs: Any) -> ResilientMLFlowLogger:
    return ResilientMLFlowLogger(
        experiment_name="batches",
        tracking_uri=tracking_uri_for(tmp_path),
        offline_dir=tmp_path / "offline",
        **kwargs,
    )


class _CountingBatches:
    """Wraps the client's ``log_batch``: counts the writes, and raises from the ``fail_from``-th on."""

    def __init__(self, logger: ResilientMLFlowLogger, fail_from: int | None = None) -> None:
        self.inner = logger.experiment.log_batch
        self.calls: list[int] = []  # metrics per write
        self.fail_from = fail_from
        logger.experiment.log_batch = self  # type: ignore[method-assign]

    def __call__(self, *, run_id: str, metrics: list = (), **kwargs: Any) -> None:
        if self.fail_from is not None and len(self.calls) + 1 >= self.fail_from:
            raise ConnectionError("the tracking server went away")
        self.calls.append(len(metrics))
        self.inner(run_id=run_id, metrics=metrics, **kwargs)


def _history(logger: ResilientMLFlowLogger, key: str) -> list[tuple[int, float]]:
    client = tracking_client(logger._tracking_uri)
    return [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]


def test_metrics_are_kept_until_a_write_is_due_then_written_once(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=3600.0)
    writes = _CountingBatches(logger)
    for step in range(25):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "train/loss_box": float(step)}, step=step)
    assert writes.calls == [2]  # the first call is written at once (a broken store shows early), then kept
    assert _history(logger, "train/loss") == [(0, 1.0)]
    logger.finalize("success")
    assert writes.calls == [2, 48]  # one write for the other 24 steps
    assert _history(logger, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(25)]
    assert _history(logger, "train/loss_box") == [(s, float(s)) for s in range(25)]
    assert tracking_client(logger._tracking_uri).get_run(logger.run_id).info.status == "FINISHED"
    # after the end of the run (a test after fit) a metric is written at once
    logger.log_metrics({"test/acc": 0.5}, step=25)
    assert writes.calls == [2, 48, 1] and _history(logger, "test/acc") == [(25, 0.5)]


def test_zero_flush_seconds_writes_every_call(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=0)
    writes = _CountingBatches(logger)
    for step in range(4):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert writes.calls == [1, 1, 1, 1]


def test_a_due_write_goes_out_on_the_next_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("vlzoo.tracking.time.monotonic", lambda: clock[0])
    logger = _logger(tmp_path, flush_seconds=5.0)
    writes = _CountingBatches(logger)
    logger.log_metrics({"a": 0.0}, step=0)
    clock[0] += 4.9
    logger.log_metrics({"a": 1.0}, step=1)
    assert writes.calls == [1]
    clock[0] += 0.1
    logger.log_metrics({"a": 2.0}, step=2)
    assert writes.calls == [1, 2]


def test_a_checkpoint_writes_what_is_kept(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=3600.0)
    writes = _CountingBatches(logger)
    for step in range(3):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.after_save_checkpoint(checkpoint_callback=None)  # log_model is off: nothing else to do
    assert writes.calls == [1, 2] and [s for s, _ in _history(logger, "train/loss")] == [0, 1, 2]


def test_large_batches_are_split_at_mlflows_limit(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=3600.0)
    writes = _CountingBatches(logger)
    logger.log_metrics({"first": 0.0}, step=0)
    for step in range(1, 121):
        logger.log_metrics({f"m{i}": float(step) for i in range(10)}, step=step)  # 1,200 metrics kept
    logger.flush()
    assert writes.calls == [1, 1000, 200]
    assert len(_history(logger, "m3")) == 120


def test_losing_the_store_mid_batch_keeps_every_metric_once(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=3600.0)
    writes = _CountingBatches(logger, fail_from=2)  # the first write succeeds, every later one fails
    for step in range(6):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    with pytest.warns(UserWarning, match="lost the MLflow tracking server"):
        logger.flush()
    assert logger.lost_at_step == 1  # the first step the store did not get
    logger.log_metrics({"train/loss": 6.0}, step=6)  # from now on: the local file
    logger.finalize("success")
    local = [json.loads(line) for line in (logger.offline_folder / "metrics.jsonl").read_text().splitlines()]
    stored = [s for s, _ in _history(logger, "train/loss")]
    assert stored == [0] and [m["step"] for m in local] == [1, 2, 3, 4, 5, 6]
    assert [m["value"] for m in local] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert json.loads((logger.offline_folder / "run.json").read_text())["status"] == "FINISHED"
    assert writes.calls == [1]


def test_metric_names_are_cleaned_and_strings_dropped_as_mlflowlogger_does(tmp_path: Path) -> None:
    logger = _logger(tmp_path, flush_seconds=0, prefix="fit")
    with pytest.warns(RuntimeWarning, match="is logged as"):
        logger.log_metrics({"val/acc@0.5": 0.25, "note": "text"}, step=3)
    assert _history(logger, "fit-val/acc0.5") == [(3, 0.25)]
    assert "fit-note" not in tracking_client(logger._tracking_uri).get_run(logger.run_id).data.metrics


@pytest.mark.parametrize("bad", [-1, "soon", True])
def test_a_bad_flush_interval_is_a_recipe_error(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(RecipeError, match="logger.flush_seconds"):
        _logger(tmp_path, flush_seconds=bad)


def _tiny_with_logger(tmp_path: Path, **logger: Any) -> Path:
    recipe = yaml.safe_load(TINY.read_text())
    recipe["trainer"]["_base_"] = str(TINY.parent / "trainer" / "quick.yaml")
    recipe["logger"] = {"_base_": str(TESTS.parent / "recipes" / "logger" / "mlflow.yaml"), **logger}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_vlzoo_check_takes_flush_seconds_on_the_shipped_mlflow_logger(tmp_path: Path) -> None:
    # the recipe names Lightning's MLFlowLogger; vlzoo builds it as the resilient logger, and checks it so
    validate(load_recipe(_tiny_with_logger(tmp_path, flush_seconds=0)))
    with pytest.raises(RecipeError, match=r"logger\.flush_second .*flush_seconds"):
        validate(load_recipe(_tiny_with_logger(tmp_path, flush_second=0)))
    with pytest.raises(RecipeError, match=r"logger\.flush_seconds"):
        validate(load_recipe(_tiny_with_logger(tmp_path, flush_seconds="soon")))


def test_a_logger_slot_without_a_target_holds_the_default_loggers_arguments(tmp_path: Path) -> None:
    from vlzoo.build import build

    validate(load_recipe(TINY, ["logger.flush_seconds=0"]))
    built = build(TINY, overrides=["logger.flush_seconds=0"], output_dir=tmp_path)
    assert isinstance(built.logger, ResilientMLFlowLogger) and built.logger.flush_seconds == 0
    with pytest.raises(RecipeError, match=r"logger\.flush_second .*Did you mean flush_seconds"):
        build(TINY, overrides=["logger.flush_second=0"], output_dir=tmp_path)

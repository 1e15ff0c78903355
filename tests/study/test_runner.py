"""A real (tiny) study: cells as processes, a failing cell, an unsupported cell, interruption
and resume, the report at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "recipes" / "shapes"

pytestmark = pytest.mark.slow


def _study(tmp_path: Path) -> Path:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "heatmap_rec.yaml").write_text(f"_base_: {SHAPES / 'heatmap_rec.yaml'}\n")
    # resolves like the others (the study is fair) but fails at its first training step
    (recipes / "broken_rec.yaml").write_text(
        f"_base_: {SHAPES / 'heatmap_rec.yaml'}\nparadigm:\n  loss_weights: {{no_such_part: 1.0}}\n"
    )
    path = tmp_path / "tiny_study.yaml"
    path.write_text(
        """# tiny study for the tests
study:
  name: tiny
  recipe: recipes/{paradigm}_{task}.yaml
  grid:
    paradigm: [heatmap, broken, nothing]
    task: [rec]
  fixed:
    - data.batch_size=4
    - data.eval_batch_size=4
    - data.num_workers=0
    - data.train.size=32
    - data.val.size=4
    - data.test=null
    - "data.test={test: {_target_: vlzoo.data.ShapesDataset, split: test, size: 3, image_size: 64, tasks: [{task}]}, comp_test: {_target_: vlzoo.data.ShapesDataset, split: comp_test, size: 3, image_size: 64, tasks: [{task}]}}"
    - trainer.val_check_interval=2
    - trainer.max_epochs=-1
    - trainer.max_time=null
  budget: {steps: 2}
  primary: {rec: acc_0.5}
  gallery: {samples: 2}
"""
    )
    return path


def _cells(uri: str) -> dict[str, list]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study-tiny")
    if exp is None:
        return {}
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], filter_string="tags.`vlzoo.role` = 'cell'"):
        out.setdefault(run.data.tags["vlzoo.cell_key"], []).append(run.data.tags.get("vlzoo.cell_status"))
    return out


def test_study_survives_a_failed_cell_and_an_interruption(tmp_path):
    study = _study(tmp_path)
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "vlzoo.cli", "study", str(study), "--output-dir", str(out)]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and first.poll() is None:
            # the study's own process creates the store; read it only once cells are running
            ready = (out / "logs" / "cell-000.log").exists()
            if ready and "finished" in _cells(uri).get("paradigm=heatmap,task=rec", []):
                break
            time.sleep(2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # interrupt the study (and its running cell) mid-run
        first.wait()
    before = _cells(uri)
    assert before["paradigm=heatmap,task=rec"] == ["finished"]

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "report at" in second.stdout
    after = _cells(uri)
    # the finished cell was not run again; the failure is recorded; the unsupported cell is reported
    assert after["paradigm=heatmap,task=rec"] == ["finished"]
    assert "failed" in after["paradigm=broken,task=rec"]
    assert after["paradigm=nothing,task=rec"] == ["unsupported"]
    report = (out / "report" / "report.md").read_text()
    assert "| paradigm=heatmap,task=rec | finished |" in report
    assert "paradigm=broken,task=rec | failed: ValueError" in report
    assert "no_such_part" in report
    assert "paradigm=nothing,task=rec | unsupported: no recipe nothing_rec.yaml" in report
    assert (out / "report" / "gallery_rec.png").is_file()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study-tiny")
    (heat,) = client.search_runs([exp.experiment_id], filter_string="tags.`vlzoo.cell_key` = 'paradigm=heatmap,task=rec'")
    for key in ("test/rec/acc_0.5", "comp_test/rec/acc_0.5", "cost/latency_ms_per_query", "cost/peak_memory_mb",
                "params/trainable", "cost/train_seconds"):
        assert key in heat.data.metrics, key

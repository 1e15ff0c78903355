"""The shipped quick study, shrunk to smoke size (tiny data, a few steps), end to end: the rung
axis reaches every split, the baselines are computed, every cell logs its CPU-time curve and
per-kind scores, and the report has baselines, flags, the per-kind and time-to-accuracy tables
and the first paragraph."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "studies" / "shapes_quick.yaml"

pytestmark = pytest.mark.slow


def smoke_variant(folder: Path, *, paradigms: list[str] | None = None, steps: int = 4) -> Path:
    """``shapes_quick.yaml`` with tiny data and budgets (same grid axes, recipes and protocol)."""
    raw = yaml.safe_load(QUICK.read_text())
    body = raw["study"]
    body["name"] = "quick_smoke"
    body["recipe"] = str(QUICK.parent / body["recipe"])
    body["stage0"] = str((QUICK.parent / body["stage0"]).resolve())
    if paradigms:
        body["grid"]["paradigm"] = paradigms
    fixed = []
    for item in body["fixed"]:
        if item.startswith("data.test={"):
            item = re.sub(r"(?<![\w_])size: \d+", "size: 4", item)
        fixed.append(item)
    fixed += ["data.batch_size=4", "data.eval_batch_size=4", "data.train.size=64", "data.val.size=4",
              "trainer.val_check_interval=2"]
    body["fixed"] = fixed
    body["budget"] = {"steps": steps}
    body["stage0_overrides"] = body["stage0_overrides"] + [
        "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val.size=4", "data.test.size=4",
        "data.batch_size=4", "data.train.size=16",
    ]
    body["gallery"] = {"samples": 1, "split": "test"}
    body["baselines"] = {"train_samples": 32}
    path = folder / "quick_smoke.yaml"
    path.write_text("# the quick study at smoke size\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def test_quick_study_at_smoke_size_end_to_end(tmp_path):
    study = smoke_variant(tmp_path, paradigms=["pixel2emb", "heatmap"])
    out = tmp_path / "out"
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlzoo.cli", "study", str(study), "--output-dir", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-quick_smoke")
    cells = client.search_runs([exp.experiment_id], filter_string="tags.`vlzoo.role` = 'cell'")
    assert len(cells) == 4 and {r.data.tags["vlzoo.cell_status"] for r in cells} == {"finished"}
    for run in cells:
        cpu = {m.step for m in client.get_metric_history(run.info.run_id, "cost/cpu_seconds")}
        val = {m.step for m in client.get_metric_history(run.info.run_id, "val/rec/acc_0.5")}
        assert cpu and cpu == val, run.data.tags["vlzoo.cell_key"]  # the CPU curve at the validation steps
        assert any(k.startswith("test/rec/by_kind/") for k in run.data.metrics)
        if run.data.tags["grid.rung"] == "one":  # a lone object: attribute expressions only
            kinds = {k.split("/")[3] for k in run.data.metrics if k.startswith("test/rec/by_kind/")}
            assert kinds == {"attribute"}
    baselines = client.search_runs([exp.experiment_id], filter_string="tags.`vlzoo.role` = 'baseline'")
    assert {(r.data.tags["vlzoo.baseline"], r.data.tags["grid.rung"]) for r in baselines} == {
        (b, rung) for b in ("random_object", "mean_box") for rung in ("one", "full")
    }
    one = next(r for r in baselines if r.data.tags["vlzoo.baseline"] == "random_object" and r.data.tags["grid.rung"] == "one")
    assert one.data.metrics["test/rec/acc_0.5"] == pytest.approx(1.0)
    text = (out / "report" / "report.md").read_text()
    assert "random object (baseline): task=rec,rung=full" in text
    assert "by kind of referring expression" in text and "Time to accuracy" in text
    assert "on the `one` rung" in text.split("\n\n")[1]  # the first paragraph, from the numbers
    assert (out / "report" / "accuracy_vs_compute.png").is_file()

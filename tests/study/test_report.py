"""Reports are rebuilt from a tracking store with known runs."""

from __future__ import annotations

import csv
import re

import matplotlib
import numpy as np
from mlflow.tracking import MlflowClient

from vlzoo.study.report import build_report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study-known", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(
        exp,
        tags={"vlzoo.study": "known", "vlzoo.role": "study", "vlzoo.primary.rec": "acc_0.5", "vlzoo.budget": "steps=5"},
    ).info.run_id
    client.log_metric(parent, "retention/before/vqa/exact_match", 0.8)
    values = {("a", 0): 0.5, ("a", 1): 0.7, ("b", 0): 0.2, ("b", 1): 0.4}
    for (paradigm, seed), acc in values.items():
        tags = {
            "mlflow.parentRunId": parent,
            "vlzoo.study": "known",
            "vlzoo.role": "cell",
            "vlzoo.cell_key": f"paradigm={paradigm},task=rec,seed={seed}",
            "vlzoo.grid_order": "paradigm,task,seed",
            "grid.paradigm": paradigm,
            "grid.task": "rec",
            "grid.seed": str(seed),
            "vlzoo.cell_status": "finished",
        }
        run = client.create_run(exp, tags=tags).info.run_id
        for step in (1, 2):
            client.log_metric(run, "val/rec/acc_0.5", acc * step / 2, step=step)
        client.log_metric(run, "test/rec/acc_0.5", acc)
        client.log_metric(run, "comp_test/rec/acc_0.5", acc / 2)
        client.log_metric(run, "cost/latency_ms_per_query", 10.0 if paradigm == "a" else 3.0)
        client.log_metric(run, "retention/after/vqa/exact_match", 0.6 if paradigm == "a" else 0.8)
        image = tmp_path / f"{paradigm}{seed}.png"
        plt.imsave(image, np.full((8, 8, 3), 0.5))
        client.log_artifact(run, str(image), "gallery")
    failed = client.create_run(
        exp,
        tags={
            "mlflow.parentRunId": parent,
            "vlzoo.role": "cell",
            "vlzoo.cell_key": "paradigm=c,task=rec,seed=0",
            "grid.paradigm": "c",
            "grid.task": "rec",
            "grid.seed": "0",
            "vlzoo.cell_status": "failed",
            "vlzoo.error": "ValueError: boom",
        },
    ).info.run_id
    unsupported = client.create_run(
        exp,
        tags={
            "mlflow.parentRunId": parent,
            "vlzoo.role": "cell",
            "vlzoo.cell_key": "paradigm=d,task=rec,seed=0",
            "grid.paradigm": "d",
            "grid.task": "rec",
            "grid.seed": "0",
            "vlzoo.cell_status": "unsupported",
            "vlzoo.error": "d does not support rec",
        },
    ).info.run_id
    return uri, client, parent, failed, unsupported


def test_report_tables_csv_plots_and_html_from_the_store(tmp_path):
    uri, client, parent, _, _ = _store(tmp_path)
    path = build_report(study="known", tracking_uri=uri, out_dir=tmp_path / "report")
    text = path.read_text()
    # mean ± std over the two seeds; the best mean in bold
    assert "| paradigm=a,task=rec | finished | **0.600 ± 0.141** |" in text
    assert "| paradigm=b,task=rec | finished | 0.300 ± 0.141 |" in text
    assert re.search(r"\| paradigm=c,task=rec \| failed: ValueError: boom \|", text)
    assert "| paradigm=d,task=rec | unsupported: d does not support rec |" in text
    assert "0.800 -> 0.600 (-0.200)" in text  # retention of paradigm a
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert len(rows) == 6
    assert {r["status"] for r in rows} == {"finished", "failed", "unsupported"}
    for name in ("curves.png", "accuracy_vs_latency.png", "accuracy_by_split.png", "gallery_rec.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000, name
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # self-contained: images inline
    assert "src='http" not in html and "src=\"http" not in html
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/results.csv"} <= logged


def test_report_of_a_study_that_never_ran_is_a_clear_error(tmp_path):
    import pytest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ValueError, match="has study 'nothing' run"):
        build_report(study="nothing", tracking_uri=uri, out_dir=tmp_path / "r")


def _ladder_store(tmp_path):
    """Two paradigms on the `one` and `full` rungs with known curves, CPU curves and baselines."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study-ladder", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(
        exp, tags={"vlzoo.study": "ladder", "vlzoo.role": "study", "vlzoo.primary.rec": "acc_0.5"}
    ).info.run_id
    client.log_metric(parent, "retention/before/vqa/exact_match", 0.5)
    final = {("a", "one"): 0.95, ("a", "full"): 0.30, ("b", "one"): 0.92, ("b", "full"): 0.60}
    for index, ((paradigm, rung), acc) in enumerate(final.items()):
        tags = {
            "mlflow.parentRunId": parent,
            "vlzoo.study": "ladder",
            "vlzoo.role": "cell",
            "vlzoo.cell_key": f"paradigm={paradigm},task=rec,rung={rung},seed=0",
            "vlzoo.cell_index": str(index),
            "vlzoo.grid_order": "paradigm,task,rung,seed",
            "grid.paradigm": paradigm,
            "grid.task": "rec",
            "grid.rung": rung,
            "grid.seed": "0",
            "vlzoo.cell_status": "finished",
        }
        run = client.create_run(exp, tags=tags).info.run_id
        for step, share in ((100, 0.4), (200, 0.8), (300, 1.0)):
            client.log_metric(run, "val/rec/acc_0.5", acc * share, step=step)
            client.log_metric(run, "cost/cpu_seconds", step / 10, step=step)
        client.log_metric(run, "cost/train_steps", 300)
        client.log_metric(run, "test/rec/acc_0.5", acc)
        client.log_metric(run, "test/rec/by_kind/attribute/acc_0.5", acc)
        client.log_metric(run, "test/rec/by_kind/attribute/count", 10)
        client.log_metric(run, "retention/after/vqa/exact_match", 0.5 if paradigm == "a" else 0.1)
    # "spatial": a rung the grid no longer has (no cell uses that data): its baseline is left out
    for index, (rung, rand) in enumerate((("one", 1.0), ("full", 0.36), ("spatial", 0.35))):
        run = client.create_run(
            exp,
            tags={
                "mlflow.parentRunId": parent,
                "vlzoo.role": "baseline",
                "vlzoo.baseline": "random_object",
                "vlzoo.cell_key": f"random_object:task=rec,rung={rung},seed=0",
                "vlzoo.cell_index": str(index),
                "vlzoo.grid_order": "task,rung,seed",
                "grid.task": "rec",
                "grid.rung": rung,
                "grid.seed": "0",
                "vlzoo.cell_status": "finished",
            },
        ).info.run_id
        client.log_metric(run, "test/rec/acc_0.5", rand)
        client.log_metric(run, "test/rec/by_kind/attribute/acc_0.5", rand)
        client.log_metric(run, "test/rec/by_kind/attribute/count", 10)
    return uri


def test_report_with_ladder_baselines_and_curves(tmp_path):
    uri = _ladder_store(tmp_path)
    text = build_report(study="ladder", tracking_uri=uri, out_dir=tmp_path / "report").read_text()
    first = text.split("\n\n")[1]
    assert "a (0.95) and b (0.92) localize a lone object" in first
    assert "b (0.60) selects; a (0.30) does not" in first
    assert "a (100%) keeps them; b (20%) loses them" in first
    # baselines are rows of the same table; a cell below the random object of its rung is flagged
    assert "| random object (baseline): task=rec,rung=full | baseline (no training) | 0.360 |" in text
    assert "rung=spatial" not in text
    assert "| paradigm=a,task=rec,rung=full | finished | 0.300 ↓ |" in text
    # one object per image: the random object is the answer itself, nothing is flagged against it
    assert "| paradigm=a,task=rec,rung=one | finished | **0.950** |" in text
    assert "| paradigm=b,task=rec,rung=one | finished | 0.920 |" in text
    assert "| paradigm=b,task=rec,rung=full | finished | **0.600** |" in text
    # the per-kind table
    assert "| cell | attribute (acc_0.5) | samples per kind |" in text
    assert "| paradigm=a,task=rec,rung=full | 0.300 ↓ | 10 |" in text
    # time to accuracy from the curves: a/full reaches 0.5 never (best 0.3); b/full at step 300
    assert "| paradigm=a,task=rec,rung=full | 300 | > budget (300 steps, best 0.300) | > budget (300 steps, best 0.300) |" in text
    assert "| paradigm=b,task=rec,rung=full | 300 | 300 steps, 30 CPU s | > budget (300 steps, best 0.600) |" in text
    assert "| paradigm=a,task=rec,rung=one | 300 | 200 steps, 20 CPU s | 200 steps, 20 CPU s |" in text
    assert (tmp_path / "report" / "accuracy_vs_compute.png").stat().st_size > 1000

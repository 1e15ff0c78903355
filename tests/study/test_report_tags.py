"""What a report says about its study comes from the study file as it is now: a part appended
after the parent run was created (and run with ``--cell``) is in the rebuilt report's budget,
while the recorded command stays the study's own invocation."""

from __future__ import annotations

from pathlib import Path

from support.studies import write_study
from vlzoo.cli import main
from vlzoo.study.runner import StudyRun
from vlzoo.study.spec import load_study

SHAPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
ONE = f"""study:
  name: grown
  parts:
    first:
      recipe: {SHAPES / 'heatmap_rec.yaml'}
      grid: {{task: [rec], seed: [0]}}
      budget: {{steps: 7}}
"""
APPENDED = ONE + f"""    later:
      recipe: {SHAPES / 'pixel2emb_rec.yaml'}
      grid: {{task: [rec], seed: [0]}}
      budget: {{steps: 11}}
"""


def test_a_rebuilt_report_reads_the_parts_appended_since(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = StudyRun(load_study(write_study(tmp_path, ONE)), tracking_uri=uri, output_dir=tmp_path)
    first.write_spec_tags()
    parent = first.parent()
    before = first.client.get_run(parent).data.tags
    assert before["vlzoo.budget"] == "first: steps=7"
    command = before["vlzoo.command"]
    # the file grows; `vlzoo study report FILE` rebuilds the report from the store
    path = write_study(tmp_path, APPENDED)
    assert main(["study", "report", str(path), "--output-dir", str(tmp_path), "--tracking-uri", uri]) == 0
    after = first.client.get_run(parent).data.tags
    assert after["vlzoo.budget"] == "first: steps=7; later: steps=11"
    assert after["vlzoo.command"] == command
    report = (tmp_path / "report" / "report.md").read_text()
    assert "later: steps=11" in report and f"`{command}`" in report

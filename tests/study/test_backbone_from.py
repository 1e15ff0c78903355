"""``backbone_from``: a part whose cells start from the trained backbone of another part's cell
with the same seed (LENS on a frozen grounding-trained LMM) - the file checks, the seed match,
the export of the source cell's backbone, and the errors when the source has not run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from support.studies import write_study
from support.trained import fit_tiny
from vlzoo.study.runner import BACKBONE_FROM_TAG, StudyRun
from vlzoo.study.spec import StudyError, expand_grid, load_study

SHAPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"
TEXT = f"""study:
  name: grounded
  parts:
    grounding:
      recipe: {SHAPES / 'heatmap_rec.yaml'}
      grid: {{task: [rec], seed: [0, 1]}}
    lens:
      recipe: {SHAPES / 'attention_keypoints_res.yaml'}
      backbone_from: grounding
      grid: {{task: [res], seed: [1, 0]}}
"""


def test_the_file_names_an_earlier_part_with_one_cell_per_seed(tmp_path):
    spec = load_study(write_study(tmp_path, TEXT))
    assert [p.backbone_from for p in spec.parts] == ["", "grounding"]
    cells = expand_grid(spec)
    assert [c.backbone_from for c in cells] == ["", "", "grounding", "grounding"]
    # itself is no earlier part
    with pytest.raises(StudyError, match=r"study.parts.lens.backbone_from': names the part .* earlier parts are \['grounding'\]"):
        load_study(write_study(tmp_path, TEXT.replace("backbone_from: grounding", "backbone_from: lens")))
    with pytest.raises(StudyError, match="has 2 cells per seed"):
        load_study(write_study(tmp_path, TEXT.replace("task: [rec], seed", "task: [rec, res], seed")))
    with pytest.raises(StudyError, match="has no cell with seed 2"):
        load_study(write_study(tmp_path, TEXT.replace("seed: [1, 0]", "seed: [1, 2]")))
    with pytest.raises(StudyError, match="cells are matched by seed"):
        load_study(write_study(tmp_path, TEXT.replace("grid: {task: [res], seed: [1, 0]}", "grid: {task: [res]}")))


def test_a_cell_starts_from_the_backbone_its_seed_s_source_cell_trained(tmp_path):
    spec = load_study(write_study(tmp_path, TEXT))
    study = StudyRun(spec, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", output_dir=tmp_path / "out")
    source0, source1, lens1, lens0 = study.cells
    assert study.backbone_source(lens1) is source1 and study.backbone_source(lens0) is source0
    with pytest.raises(StudyError, match=r"which has not finished: run it first \(vlzoo study .* --cell 1\)"):
        study.source_backbone(lens1)
    # the source cell finished: its run's last.ckpt is where a cell's checkpoints go
    run_id = study.new_cell_run(source1, "finished")
    with pytest.raises(StudyError, match="its checkpoint .*last.ckpt is missing"):
        study.source_backbone(lens1)
    trained = fit_tiny(tmp_path / "fit", "shapes/heatmap_rec")
    target = tmp_path / "out" / "cells" / "001" / "checkpoints" / run_id / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(trained, target)
    path = study.source_backbone(lens1)
    assert path == tmp_path / "out" / "cells" / "001" / "backbone.pt" and path.is_file()
    from vlzoo.checkpoints import backbone_of_checkpoint

    expected = backbone_of_checkpoint(trained).backbone_blob()
    got = torch.load(path, weights_only=False)
    assert set(got) == set(expected)
    # the provenance is a tag of the dependent cell's run
    assert study._cell_tags(lens1, "running")[BACKBONE_FROM_TAG] == source1.key

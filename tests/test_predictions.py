"""vlzoo predict's writer: the record file plus one COCO result file per type predicted."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlzoo.predictions import PredictionWriter
from vlzoo.structures import Predictions, Targets


def test_writer_adds_a_coco_result_file_per_type(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path / "preds.json")
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 2:6] = True
    box = torch.tensor([[1.0, 1.0, 6.0, 6.0]])
    outputs = [
        Predictions(boxes=box, scores=torch.tensor([0.9]), labels=torch.tensor([3]), image_id=1),  # det
        Predictions(boxes=box, masks=masks, scores=torch.tensor([0.8]), image_id=2),  # seg, unlabeled
        Predictions(keypoints=torch.tensor([[[1.0, 2.0, 2.0], [4.0, 7.0, 2.0]]]), scores=torch.ones(1),
                    labels=torch.ones(1, dtype=torch.long), image_id=3),  # pose
        Predictions(boxes=box, image_id=4),  # rec: no COCO result file
        Predictions(boxes=box, scores=torch.ones(1), image_id=5),  # det, unlabeled, a query without category
    ]
    # the unlabeled seg prediction takes the category its query names (7), never the targets' (9)
    targets = [Targets(labels=torch.tensor([3])), Targets(labels=torch.tensor([9, 9])), Targets(),
               Targets(), Targets(labels=torch.tensor([1]))]
    batch = SimpleNamespace(tasks=["det", "seg", "pose", "rec", "det"], original_targets=targets,
                            category_ids=[3, 7, 1, None, None])
    writer.on_predict_batch_end(None, None, outputs, batch, 0)  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match="1 sample"):
        writer.on_predict_end(None, None)  # type: ignore[arg-type]
    assert len(json.loads((tmp_path / "preds.json").read_text())) == 5
    paths = writer.result_paths()
    bbox, segm, kps = (json.loads(paths[t].read_text()) for t in ("bbox", "segm", "keypoints"))
    assert bbox == [{"image_id": 1, "category_id": 3, "score": pytest.approx(0.9), "bbox": [1.0, 1.0, 5.0, 5.0]}]
    assert [r["category_id"] for r in segm] == [7] and "bbox" not in segm[0] and segm[0]["segmentation"]["size"] == [8, 8]
    assert kps[0]["keypoints"] == [1.0, 2.0, 2.0, 4.0, 7.0, 2.0] and "bbox" not in kps[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.bbox.json", "preds.json", "preds.keypoints.json",
                                                          "preds.segm.json"]

"""LENS on the frozen LMM of another recipe's run: `backbone.checkpoint=<that run's last.ckpt>`
takes the trained backbone (added tokens and all) out of a `vlzoo fit` checkpoint, and
`export_backbone` writes the same as a small file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo.build import build
from vlzoo.cli import main
from vlzoo.config import RecipeError, load_recipe
from vlzoo.paradigms.attention_keypoints import AttentionKeypoints
from vlzoo.runs import export_backbone, load_checkpoint

SMALL = [
    "data.train.size=8",
    "data.val.size=4",
    "data.test.size=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def heatmap_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heatmap_run")
    assert main(["fit", "recipes/shapes/heatmap_rec_textfirst.yaml", *SMALL, "--output-dir", str(out)]) == 0
    (last,) = out.glob("checkpoints/*/last.ckpt")
    return last


def test_lens_takes_the_backbone_of_another_runs_checkpoint(heatmap_run: Path, tmp_path: Path) -> None:
    trained = load_checkpoint(heatmap_run).backbone
    recipe = load_recipe(
        "recipes/shapes/attention_keypoints_res_grounded.yaml",
        overrides=[f"backbone.checkpoint={heatmap_run}", *SMALL],
    )
    built = build(recipe, with_logger=False, output_dir=tmp_path)
    assert isinstance(built.model, AttentionKeypoints)
    lmm = built.model.backbone
    # the heatmap run's tokens and weights, exactly, and frozen
    assert "[LOC]" in lmm.tokenizer.get_vocab() and "[REC]" in lmm.tokenizer.get_vocab()
    own = lmm.plain_state_dict()
    for name, value in trained.plain_state_dict().items():
        assert torch.equal(own[name], value), name
    assert not any(p.requires_grad for p in lmm.parameters())
    before = {k: v.clone() for k, v in own.items()}
    built.trainer.fit(built.model, datamodule=built.datamodule)
    assert "val/res/ciou" in built.trainer.callback_metrics
    after = lmm.plain_state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_export_backbone_writes_a_loadable_backbone_file(heatmap_run: Path, tmp_path: Path) -> None:
    path = export_backbone(heatmap_run, tmp_path / "lmm" / "backbone.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    blob = torch.load(path, weights_only=True)
    assert blob["added_tokens"][:1] == ["<image>"] and "[LOC]" in blob["added_tokens"]
    recipe = load_recipe("recipes/shapes/attention_keypoints_res_grounded.yaml",
                         overrides=[f"backbone.checkpoint={path}", *SMALL])
    lmm = build(recipe, with_data=False, with_trainer=False, with_logger=False).model.backbone
    trained = load_checkpoint(heatmap_run).backbone.plain_state_dict()
    assert all(torch.equal(lmm.plain_state_dict()[k], v) for k, v in trained.items())


def test_a_run_checkpoint_of_another_architecture_is_a_clear_error(heatmap_run: Path) -> None:
    recipe = load_recipe(
        "recipes/shapes/attention_keypoints_res_grounded.yaml",
        overrides=[f"backbone.checkpoint={heatmap_run}", "backbone.language.config.hidden_size=32", *SMALL],
    )
    with pytest.raises(RecipeError, match=r"(?s)recipe key backbone.checkpoint: .*does not match.*shape mismatch"):
        build(recipe, with_data=False, with_trainer=False, with_logger=False)

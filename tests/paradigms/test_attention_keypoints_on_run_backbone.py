"""LENS on the frozen LMM of another recipe's run, as an explicit step: `vlzoo export
<that run's last.ckpt> backbone.pt --backbone` (`export_backbone`) writes the trained backbone
(added tokens and all) as a backbone file, which `backbone.checkpoint=` loads.  The run's
checkpoint itself is refused as a backbone checkpoint, with the export command in the error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo.build import build
from vlzoo.checkpoints import export_backbone, load_checkpoint
from vlzoo.cli import main
from vlzoo.config import RecipeError, load_recipe
from vlzoo.paradigms.attention_keypoints import AttentionKeypoints

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


@pytest.fixture(scope="module")
def heatmap_backbone(heatmap_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The heatmap run's backbone, exported with the command line's verb."""
    path = tmp_path_factory.mktemp("heatmap_backbone") / "backbone.pt"
    assert main(["export", str(heatmap_run), str(path), "--backbone"]) == 0
    return path


def test_lens_takes_the_exported_backbone_of_another_run(heatmap_run: Path, heatmap_backbone: Path,
                                                         tmp_path: Path) -> None:
    trained = load_checkpoint(heatmap_run).backbone
    recipe = load_recipe(
        "recipes/shapes/attention_keypoints_res_grounded.yaml",
        overrides=[f"backbone.checkpoint={heatmap_backbone}", *SMALL],
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


def test_export_backbone_writes_a_loadable_backbone_file(heatmap_run: Path, heatmap_backbone: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # the command line never replaces a file by accident
    assert main(["export", str(heatmap_run), str(heatmap_backbone), "--backbone"]) == 2
    assert "exists" in capsys.readouterr().err
    path = export_backbone(heatmap_run, tmp_path / "lmm" / "backbone.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    blob = torch.load(path, weights_only=True)
    assert blob["added_tokens"][:1] == ["<image>"] and "[LOC]" in blob["added_tokens"]
    recipe = load_recipe("recipes/shapes/attention_keypoints_res_grounded.yaml",
                         overrides=[f"backbone.checkpoint={path}", *SMALL])
    lmm = build(recipe, with_data=False, with_trainer=False, with_logger=False).model.backbone
    trained = load_checkpoint(heatmap_run).backbone.plain_state_dict()
    assert all(torch.equal(lmm.plain_state_dict()[k], v) for k, v in trained.items())


def test_a_run_checkpoint_as_backbone_checkpoint_says_to_export_it_first(
    heatmap_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = load_recipe("recipes/shapes/attention_keypoints_res_grounded.yaml",
                         overrides=[f"backbone.checkpoint={heatmap_run}", *SMALL])
    with pytest.raises(RecipeError, match=r"(?s)recipe key backbone.checkpoint: .*not a backbone file.*"
                                          r"vlzoo export .* backbone.pt --backbone"):
        build(recipe, with_data=False, with_trainer=False, with_logger=False)
    # the command line says the same, in one paragraph, before any run is opened
    out = tmp_path / "out"
    assert main(["fit", "recipes/shapes/attention_keypoints_res_grounded.yaml", f"backbone.checkpoint={heatmap_run}",
                 *SMALL, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a backbone file" in err and "--backbone" in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()


def test_an_exported_backbone_of_another_architecture_is_a_clear_error(heatmap_backbone: Path) -> None:
    recipe = load_recipe(
        "recipes/shapes/attention_keypoints_res_grounded.yaml",
        overrides=[f"backbone.checkpoint={heatmap_backbone}", "backbone.language.config.hidden_size=32", *SMALL],
    )
    with pytest.raises(RecipeError, match=r"(?s)recipe key backbone.checkpoint: .*does not match.*shape mismatch"):
        build(recipe, with_data=False, with_trainer=False, with_logger=False)

"""References on a tiny Qwen2-VL through recipes (the validator takes backbone.references on the
Qwen backbones): heatmap on Spoken Shapes RES (a heard expression) and pixel2emb AnyRef style on
crop-reference Shapes RES + REG (a region given as its crop) lower the loss in a few steps, and
their gradients reach the reference encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import recipe_from_dict
from vlzoo.structures import reference_text

from .qwen_tiny import TINY_TEMPLATE, make_qwen_folder

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
AUDIO = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
         "max_source_positions": 250}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_qwen_folder(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl")


def _recipe(folder: str, references: dict, data: dict, paradigm: dict, tasks: list[str]) -> dict:
    return {
        "seed": 0,
        "backbone": {"_target_": "vlzoo.backbones.Qwen2VLBackbone", "name_or_path": folder, "image_size": 64,
                     "references": references},
        "data": {"batch_size": 8, "num_workers": 0, "template": TINY_TEMPLATE, **data},
        "paradigm": paradigm,
        "evaluator": {"_base_": str(RECIPES / "evaluator" / "default.yaml"), "tasks": tasks},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3.0e-3, "weight_decay": 0.0},
        "trainer": {"_base_": str(RECIPES / "trainer" / "cpu.yaml"), "max_steps": 1},
        "logger": None,
    }


def _steps(model, batch, n: int) -> tuple[list[float], torch.Tensor | None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, first_grad = [], None
    model.train()
    for step in range(n):
        opt.zero_grad()
        total = model.weighted_total(model.loss(batch))
        total.backward()
        if step == 0:
            refs = model.backbone.references
            part = refs.audio_projector if refs.audio_projector is not None else model.backbone._lm().model.visual.merger
            first_grad = next(part.parameters()).grad
        opt.step()
        losses.append(float(total.detach()))
    return losses, first_grad


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_heatmap_on_spoken_shapes_learns_on_a_qwen2_vl(folder, tmp_path):
    spoken = {"_target_": "vlzoo.data.SpokenShapesDataset", "size": 8, "image_size": 64, "tasks": ["res"],
              "reference_tokens": 4, "cache_dir": str(tmp_path / "speech")}
    references = {"_target_": "vlzoo.backbones.ReferenceEncoder", "tokens": 4, "modalities": ["audio"],
                  "audio": {"_target_": "vlzoo.backbones.WhisperAudioEncoder", "config": AUDIO}}
    data = {"_base_": str(RECIPES / "data" / "shapes_spoken_res.yaml"), "train": dict(spoken, split="train"),
            "val": dict(spoken, split="val"), "test": dict(spoken, split="test")}
    paradigm = {"_base_": str(RECIPES / "paradigm" / "heatmap.yaml"), "tasks": ["res"],
                "mask_decoder": {"_target_": "vlzoo.decoders.SamMaskDecoder", "variant": "tiny"}}
    torch.manual_seed(0)
    built = build(recipe_from_dict(_recipe(folder, references, data, paradigm, ["res"])), with_trainer=False)
    dm = built.datamodule
    batch = dm.collate()([dm.train_dataset[i] for i in range(8)])
    assert all(reference_text("audio", 4) in p for p in batch.prompts)
    assert batch.images.shape[-2:] == (64, 64)
    losses, grad = _steps(built.model, batch, 12)
    assert grad is not None and grad.abs().sum() > 0  # the audio projector trains
    assert built.model.backbone.references.audio.encoder.conv1.weight.grad is not None
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.slow
def test_pixel2emb_with_crop_references_learns_on_a_qwen2_vl(folder):
    shapes = {"_target_": "vlzoo.data.ShapesDataset", "size": 8, "image_size": 64, "tasks": {"res": 1.0, "reg": 1.0}}
    references = {"_target_": "vlzoo.backbones.ReferenceEncoder", "tokens": 4, "modalities": ["crop"]}
    data = {"_base_": str(RECIPES / "data" / "shapes_res.yaml"), "train": dict(shapes, split="train"),
            "val": dict(shapes, split="val"), "test": dict(shapes, split="test")}
    paradigm = {"_base_": str(RECIPES / "paradigm" / "pixel2emb_anyref.yaml"), "tasks": ["res", "reg"]}
    torch.manual_seed(0)
    built = build(recipe_from_dict(_recipe(folder, references, data, paradigm, ["res", "reg"])), with_trainer=False)
    dm = built.datamodule
    batch = dm.collate()([dm.train_dataset[i] for i in range(8)])
    assert any(reference_text("crop", 4) in p for p in batch.prompts)  # the REG rows' regions are crops
    losses, grad = _steps(built.model, batch, 24)
    assert grad is not None and grad.abs().sum() > 0  # the merger encodes the crops and trains
    assert losses[-1] < 0.75 * losses[0], losses
    built.model.eval()
    assert len(built.model.predict(batch)) == 8


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_a_spoken_qwen_run_exports_self_contained(tmp_path, monkeypatch):
    import yaml

    import vlzoo
    from support.trained import SMALL
    from vlzoo.cli import main
    from vlzoo.config import load_recipe
    from vlzoo.data import SpokenShapesDataset
    from vlzoo.export import export

    monkeypatch.setenv("VLZOO_SPEECH_CACHE", str(tmp_path / "speech"))
    pretrained = Path(make_qwen_folder(tmp_path / "qwen", "qwen2_vl"))
    data = load_recipe(RECIPES / "shapes" / "heatmap_audio_res.yaml").data
    data["name"] = "heatmap_audio_res_qwen2"
    references = data["backbone"]["references"]
    references["audio"]["config"] = dict(AUDIO)
    data["backbone"] = {"_target_": "vlzoo.backbones.Qwen2VLBackbone", "name_or_path": str(pretrained),
                        "image_size": 64, "references": references}
    data["data"]["template"] = TINY_TEMPLATE
    recipe = tmp_path / "heatmap_audio_res_qwen2.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    assert main(["check", str(recipe)]) == 0  # the validator takes backbone.references on a Qwen backbone
    assert main(["fit", str(recipe), *SMALL, "trainer.max_steps=1", "--output-dir", str(out)]) == 0
    (ckpt,) = out.rglob("last.ckpt")
    sample = SpokenShapesDataset(split="test", size=1, image_size=64, tasks=["res"], reference_tokens=4)[0]
    clip = (sample.reference_audio.waveform.numpy(), sample.reference_audio.sample_rate)
    original = vlzoo.load(ckpt)
    expected = original(sample.image, audio=clip, task="res")
    folder = export(ckpt, tmp_path / "export")
    shutil.rmtree(pretrained)  # the pretrained folder is gone: the export alone must do
    node = yaml.safe_load((folder / "recipe.yaml").read_text())["backbone"]
    assert node["name_or_path"] is None and node["references"]["modalities"] == ["audio"]
    reloaded = vlzoo.load(folder)
    got = reloaded(sample.image, audio=clip, task="res")
    assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.masks, expected.masks)
    for key, value in original.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key

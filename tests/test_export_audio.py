"""``vlzoo export`` of a model whose audio reference encoder was loaded from a pretrained Whisper
folder: the folder is not needed any more - the export's recipe holds the encoder's config and
the export hears as its checkpoint after the Whisper folder is gone."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import vlzoo
from support.trained import fit_tiny
from vlzoo.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None,
                       reason="espeak-ng is not installed (apt-get install -y espeak-ng): Spoken Shapes synthesizes its clips"),
]


def test_an_export_does_not_need_the_pretrained_whisper_folder(tmp_path, monkeypatch) -> None:
    from transformers import WhisperConfig, WhisperModel

    from vlzoo.backbones.audio import TINY_WHISPER
    from vlzoo.data import SpokenShapesDataset

    monkeypatch.setenv("VLZOO_SPEECH_CACHE", str(tmp_path / "speech"))
    torch.manual_seed(0)
    whisper = tmp_path / "whisper-tiny"
    WhisperModel(WhisperConfig(**TINY_WHISPER)).save_pretrained(whisper)
    ckpt = fit_tiny(tmp_path / "run", "shapes/heatmap_audio_res",
                    [f"backbone.references.audio.pretrained={whisper}", "backbone.references.audio.config=null"])
    dataset = SpokenShapesDataset(split="test", size=1, image_size=64, tasks=["res"], reference_tokens=4)
    sample = dataset[0]
    clip = (sample.reference_audio.waveform.numpy(), sample.reference_audio.sample_rate)
    expected = vlzoo.load(ckpt)(sample.image, audio=clip, task="res")
    folder = tmp_path / "export"
    assert main(["export", str(ckpt), str(folder)]) == 0
    node = yaml.safe_load((folder / "recipe.yaml").read_text())["backbone"]["references"]["audio"]
    assert node["pretrained"] is None and node["config"]["d_model"] == TINY_WHISPER["d_model"]
    shutil.rmtree(whisper)
    exported = vlzoo.load(folder)(sample.image, audio=clip, task="res")
    assert torch.equal(exported.boxes, expected.boxes) and torch.equal(exported.masks, expected.masks)
    assert torch.equal(exported.evidence["heatmap"], expected.evidence["heatmap"])

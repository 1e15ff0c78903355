"""Audio-referring RES learns: the Spoken Shapes pixel2emb recipe ([SEG], refocusing, a tiny
Whisper tower) fits a fixed batch in a few steps, and its gradients reach the audio tower."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pixel2emb_audio_res", "heatmap_audio_res"])
def test_audio_res_loss_falls(recipe, tmp_path, monkeypatch):
    from vlzoo.build import build
    from vlzoo.structures import reference_text

    monkeypatch.setenv("VLZOO_SPEECH_CACHE", str(tmp_path / "speech"))
    torch.manual_seed(0)
    built = build(RECIPES / f"{recipe}.yaml", overrides=["data.train.size=8", "data.val.size=8"], with_trainer=False)
    model = built.model
    dataset = built.datamodule.train_dataset
    batch = built.datamodule.collate()([dataset[i] for i in range(8)])
    assert all(reference_text("audio", 4) in p for p in batch.prompts)
    assert all(clip is not None for clip in batch.reference_audio)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    totals = []
    for step in range(16):
        optimizer.zero_grad()
        total = model.weighted_total(model.loss(batch))
        total.backward()
        if step == 0:
            tower = model.backbone.references.audio.encoder.conv1.weight.grad
            assert tower is not None and tower.abs().sum() > 0
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < 0.75 * totals[0], totals

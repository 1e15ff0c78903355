"""Every paradigm takes a spoken reference: the backbone's reference encoder fills the prompt's
audio span, whatever the paradigm; loss and predict run and the audio tower gets gradients
wherever the LMM trains (attention_keypoints keeps it frozen: it only reads the prompt)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "shapes"

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SPOKEN = """
_base_: {base}
backbone:
  references:
    _target_: vlzoo.backbones.ReferenceEncoder
    tokens: 2
    modalities: [audio]
    audio: {{_target_: vlzoo.backbones.WhisperAudioEncoder}}
data:
  train:
    _target_: vlzoo.data.SpokenShapesDataset
    split: train
    size: 4
    image_size: 64
    tasks: [rec]
    reference_tokens: ${{backbone.references.tokens}}
    cache_dir: {cache}
"""


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["pixel2seq", "pixel2emb", "heatmap", "attention_keypoints"])
def test_every_paradigm_takes_an_audio_reference(paradigm, tmp_path):
    from vlzoo.build import build
    from vlzoo.structures import reference_text

    recipe = tmp_path / "spoken.yaml"
    recipe.write_text(SPOKEN.format(base=RECIPES / f"{paradigm}_rec.yaml", cache=tmp_path / "speech"))
    torch.manual_seed(0)
    built = build(recipe, overrides=["data.val.size=2", "data.test.size=2"], with_trainer=False)
    data = built.datamodule
    batch = data.collate()([data.train_dataset[i] for i in range(2)])
    assert all(reference_text("audio", 2) in p for p in batch.prompts)
    model = built.model
    model.train()
    total = model.weighted_total(model.loss(batch))
    assert torch.isfinite(total)
    if total.requires_grad:
        total.backward()
    tower = model.backbone.references.audio.encoder.conv1.weight.grad
    if paradigm == "attention_keypoints":
        assert tower is None  # the LMM (and its reference encoder) is frozen and only read
    else:
        assert tower is not None and tower.abs().sum() > 0
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == 2

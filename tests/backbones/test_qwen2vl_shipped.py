"""The shipped Qwen2-VL / Qwen2.5-VL configs: the published sizes on the meta device, the
family's token ids and preprocessing, and the backbone built from them in a dry run."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones.shipped import dry_loading, load_pretrained, shipped_model

MODELS = [
    # the parameter counts the model cards publish (8.29B)
    ("Qwen/Qwen2-VL-7B-Instruct", "Qwen2VLForConditionalGeneration", 8_291_375_616),
    ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration", 8_292_166_656),
]


@pytest.mark.parametrize(("name", "cls", "expected"), MODELS)
def test_shipped_qwen_configs_build_the_published_sizes_on_meta(name, cls, expected):
    import transformers

    with dry_loading():
        model = load_pretrained(getattr(transformers, cls), name, dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == expected
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (3584, 28, 152064)
    assert model.config.image_token_id == 151655


@pytest.mark.parametrize(("name", "target"), [("Qwen/Qwen2-VL-7B-Instruct", "Qwen2VLBackbone"),
                                              ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen25VLBackbone")])
def test_the_backbone_reads_the_released_frame_in_a_dry_run(name, target):
    import vlzoo.backbones as backbones

    with dry_loading():
        bb = getattr(backbones, target)(name_or_path=name, dtype="bfloat16")
    facts = shipped_model(name)
    assert (bb.min_pixels, bb.max_pixels, bb.factor) == (3136, 12845056, 28) == (
        facts.preprocessor["min_pixels"], facts.preprocessor["max_pixels"], 28)
    assert bb.tokenizer.convert_tokens_to_ids("<|image_pad|>") == bb.image_pad_id == 151655
    assert bb.tokenizer.convert_tokens_to_ids("<|box_start|>") == 151648
    assert bb.transform.geometry((480, 640)).input_size == (476, 644)  # smart_resize of a COCO-sized image

"""The shipped PaliGemma-3B (448 px) config: the full size on the meta device, the family's token
ids and preprocessing, and the backbone built from them in a dry run."""

from __future__ import annotations

import torch

from vlzoo.backbones.shipped import dry_loading, load_pretrained, shipped_model

NAME = "google/paligemma-3b-pt-448"


def test_the_shipped_config_builds_paligemma_3b_on_meta():
    import transformers

    with dry_loading():
        model = load_pretrained(transformers.PaliGemmaForConditionalGeneration, NAME, dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    # 2.92 B: the 224 px checkpoint's 2,923,466,480 plus 768 more SigLIP position embeddings (1024 - 256) x 1152
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == 2_923_466_480 + 768 * 1152
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.head_dim) == (2048, 18, 257216, 256)
    assert (vision.image_size, vision.patch_size, text.num_image_tokens) == (448, 14, 1024)
    assert model.config.image_token_id == 257152


def test_the_backbone_reads_the_released_frame_and_tokens_in_a_dry_run():
    from vlzoo.backbones import PaliGemmaBackbone

    with dry_loading():
        bb = PaliGemmaBackbone(name_or_path=NAME, dtype="bfloat16")
    facts = shipped_model(NAME)
    assert (bb.input_size, bb.feature_grid, bb.num_image_tokens) == (448, (32, 32), 1024) == (
        facts.preprocessor["size"]["height"], (32, 32), facts.preprocessor["image_seq_length"])
    assert (bb.image_token_id, bb.separator_id, bb.tokenizer.bos_token_id, bb.tokenizer.eos_token_id) == (257152, 108, 2, 1)
    assert bb.tokenizer.convert_tokens_to_ids("<loc0000>") == 256000 and bb.transform.resample == "bicubic"
    geo = bb.transform.geometry((480, 640))  # a COCO-sized image: both sides to 448, no padding
    assert geo.input_size == (448, 448) and geo.scale == (448 / 640, 448 / 480) and geo.offset == (0.0, 0.0)

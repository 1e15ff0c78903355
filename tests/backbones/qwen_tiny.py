"""Tiny Qwen2-VL / Qwen2.5-VL folders for tests: a Shapes word tokenizer with Qwen's special tokens,
an image processor with tiny patches (patch 4 x merge 2: sides multiples of 8) and an untrained
1-2 layer model, each written with ``save_pretrained`` so the backbones load them through the real
loading path."""

from __future__ import annotations

from pathlib import Path

import torch

#: Qwen2's special tokens (ids follow the Shapes vocabulary here; the real ones are 151643..151656)
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
#: the chat template without newlines (the Shapes word tokenizer has no newline token)
TINY_TEMPLATE = "<|im_start|>user <|vision_start|>{image}<|vision_end|>{prompt}<|im_end|> <|im_start|>assistant"
PATCH, MERGE = 4, 2


def qwen_tokenizer():
    from vlzoo.data.tokenizer import shapes_tokenizer

    tok = shapes_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS}, replace_extra_special_tokens=False)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.bos_token = None
    return tok


def make_qwen_folder(folder: Path, family: str, *, layers: int = 2, seed: int = 0) -> str:
    import transformers

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": len(tok), "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    if family == "qwen2_vl":
        vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                  "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2}
        cls, config_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    else:
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                  "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2, "window_size": 16,
                  "fullatt_block_indexes": [0]}
        cls, config_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=128 * 128
    ).save_pretrained(folder)
    return str(folder)

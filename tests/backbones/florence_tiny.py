"""A tiny Florence-2 folder for tests: a Shapes word tokenizer with Florence-2's ``<loc_0>`` ..
``<loc_999>`` tokens, an untrained DaViT + BART model (hidden 64, 1 layer each side) and a
preprocessor config for 64 px inputs, each written with ``save_pretrained`` so the backbone loads
them through the real loading path."""

from __future__ import annotations

from pathlib import Path

import torch

SIDE = 64  # input side: strides 4, 2 -> a 8 x 8 grid, 65 image tokens


def florence_tokenizer():
    from vlzoo.data.tokenizer import shapes_tokenizer

    tok = shapes_tokenizer()
    tok.add_tokens([f"<loc_{k}>" for k in range(1000)], special_tokens=True)
    return tok


def make_florence_folder(folder: Path, *, seed: int = 0) -> str:
    import transformers

    tok = florence_tokenizer()
    # the native image token gets its own row after the vocabulary, like the released 51289
    image_id = len(tok)
    text = {"model_type": "bart", "vocab_size": image_id + 1, "d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
            "max_position_embeddings": 256, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "decoder_start_token_id": tok.eos_token_id, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "dropout": 0.0, "attention_dropout": 0.0, "scale_embedding": False}
    vision = {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
              "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [2, 4], "num_groups": [2, 4],
              "window_size": 4, "drop_path_rate": 0.0, "projection_dim": 64, "max_position_embeddings": 16}
    config = transformers.Florence2Config(text_config=text, vision_config=vision, image_token_id=image_id)
    torch.manual_seed(seed)
    transformers.Florence2ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"height": SIDE, "width": SIDE}, do_center_crop=False, crop_size=None, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    path = Path(folder) / "preprocessor_config.json"
    import json

    body = json.loads(path.read_text())
    body["image_seq_length"] = 1 + (SIDE // 8) ** 2
    path.write_text(json.dumps(body, indent=2))
    return str(folder)

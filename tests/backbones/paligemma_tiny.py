"""A tiny PaliGemma folder for tests: the Shapes word tokenizer with Gemma's special tokens
(``<bos>``, ``<eos>``, ``<pad>``, ``<image>``) and ``\\n`` as one token, a SigLIP image processor at
32 px (patch 8: a 4 x 4 grid, 16 image tokens) and an untrained 1-2 layer Gemma (hidden 64) or
Gemma 2 model, each written with ``save_pretrained`` so the backbone loads them through the real
loading path."""

from __future__ import annotations

from pathlib import Path

import torch

SIDE, PATCH = 32, 8
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TEMPLATE = {"_target_": "vlzoo.data.PromptTemplate", "text": "{image}<bos>{prompt}\n", "verbatim": True}


def paligemma_tokenizer():
    from tokenizers import AddedToken

    from vlzoo.data.tokenizer import shapes_tokenizer

    tok = shapes_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tok


def make_paligemma_folder(folder: Path, *, layers: int = 2, gemma2: bool = False, seed: int = 0) -> str:
    import transformers

    tok = paligemma_tokenizer()
    text = {"model_type": "gemma2" if gemma2 else "gemma", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "vocab_size": len(tok), "max_position_embeddings": 512, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if gemma2:  # the soft-capping and the local layers of Gemma 2 (a window shorter than the rows)
        text.update({"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "sliding_window": 8,
                     "query_pre_attn_scalar": 16})
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": SIDE, "patch_size": PATCH, "vision_use_head": False}
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=64,
                                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                                          vocab_size=len(tok))
    torch.manual_seed(seed)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": SIDE, "width": SIDE}, resample=3, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, image_seq_length=(SIDE // PATCH) ** 2).save_pretrained(folder)
    return str(folder)


def shapes_recipe(folder: str, paradigm: dict) -> dict:
    """A recipe (dict) training ``paradigm`` on 8 Shapes REC scenes of 60 px on the folder's model."""
    # absolute: tests/study loads this module by path, outside the package
    from backbones.native_recipes import shapes_recipe as native

    return native({"_target_": "vlzoo.backbones.PaliGemmaBackbone", "name_or_path": folder}, paradigm, TEMPLATE)


def shapes_pixel2seq() -> dict:
    """pixel2seq with the paligemma codec, for :func:`shapes_recipe`."""
    return {"_base_": str(RECIPES / "paradigm" / "pixel2seq.yaml"), "tasks": ["rec"], "max_new_tokens": 12,
            "coordinate_sigma": 0.0, "codec": {"_target_": "vlzoo.paradigms.codecs.PaliGemmaCodec"}}

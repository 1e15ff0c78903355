"""A tiny Kosmos-2 folder for tests: a Shapes word tokenizer in XLM-R's special-token order
(``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3) to which the real ``Kosmos2Processor`` adds its
tag and patch-index tokens, a CLIP image processor resizing to 32 x 32 and an untrained 1-2 layer
``Kosmos2ForConditionalGeneration``, all written with ``save_pretrained`` so the backbone loads
them through the real loading path."""

from __future__ import annotations

from pathlib import Path

import torch

from vlzoo.backbones.kosmos2 import KOSMOS2_TEMPLATE

SIDE, PATCH, QUERIES = 32, 8, 4  # a 4 x 4 patch grid, 4 latent image tokens
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def kosmos2_processor():
    from transformers import CLIPImageProcessor, Kosmos2Processor, PreTrainedTokenizerFast

    from vlzoo.data.tokenizer import _word_level, shapes_tokenizer

    shapes = [p for p in shapes_tokenizer().get_vocab() if p not in ("<pad>", "<s>", "</s>", "<unk>", "<image>")]
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *sorted(shapes)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_word_level({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"),
        bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>", padding_side="right",
        model_max_length=512,
    )
    side = {"height": SIDE, "width": SIDE}
    images = CLIPImageProcessor(size=side, crop_size=side, do_center_crop=True, resample=3)
    return Kosmos2Processor(images, tok)


def make_kosmos2_folder(folder: Path, *, layers: int = 2, seed: int = 0) -> str:
    import transformers

    processor = kosmos2_processor()
    tok = processor.tokenizer
    text = {"vocab_size": len(tok), "embed_dim": 64, "layers": layers, "ffn_dim": 128, "attention_heads": 4,
            "max_position_embeddings": 256, "dropout": 0.0, "attention_dropout": 0.0,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": SIDE, "patch_size": PATCH}
    config = transformers.Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=QUERIES)
    torch.manual_seed(seed)
    transformers.Kosmos2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def shapes_recipe(folder: str, paradigm: dict) -> dict:
    """A recipe (dict) training ``paradigm`` on 8 Shapes REC scenes of 60 px on the folder's model."""
    # absolute: tests/study loads this module by path, outside the package
    from backbones.native_recipes import shapes_recipe as native

    return native({"_target_": "vlzoo.backbones.Kosmos2Backbone", "name_or_path": folder}, paradigm, KOSMOS2_TEMPLATE)

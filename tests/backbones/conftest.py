"""Tiny parts for backbone tests: a word-level tokenizer in a temporary folder, tiny encoders and LMs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = "a the red green blue circle square triangle is in left right half what colour yes no".split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>"]


def make_tokenizer_folder(folder: Path) -> Path:
    """A whitespace word-level tokenizer saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(make_tokenizer_folder(tmp_path_factory.mktemp("tokenizer")))


LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 256}
VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32,
       "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}


@pytest.fixture
def make_backbone(tokenizer_dir):
    """``make_backbone(**policy)`` -> a tiny MultimodalBackbone (ViT 32 px / 4x4 grid, llama 32)."""
    from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder

    def _make(*, lm_config: dict | None = None, **kwargs):
        torch.manual_seed(0)
        vision = TimmVisionEncoder(**VIT)
        language = CausalLM(config=dict(lm_config or LLAMA), tokenizer=tokenizer_dir)
        return MultimodalBackbone(vision=vision, language=language, **kwargs)

    return _make


def encode(tokenizer, texts: list[str], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``<bos> <image> text`` rows, padded right (or left)."""
    rows = [[tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(["<image>"] + t.split()) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask

"""Causal LMs: built from a config with the tokenizer's vocabulary, folder round trips."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import CausalLM

from .conftest import LLAMA


def test_config_built_lm_takes_vocab_and_ids_from_tokenizer(tokenizer_dir):
    lm = CausalLM(config=dict(LLAMA), tokenizer=tokenizer_dir)
    tok = lm.tokenizer
    assert lm.vocab_size == len(tok) and lm.hidden_size == 32
    cfg = lm.model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert lm.model.dtype == torch.float32


def test_lm_save_and_reload_from_folder(tokenizer_dir, tmp_path):
    lm = CausalLM(config=dict(LLAMA), tokenizer=tokenizer_dir)
    lm.save_pretrained(tmp_path / "lm")
    again = CausalLM(name_or_path=str(tmp_path / "lm"), attn_implementation="eager")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.allclose(lm(ids).logits, again(ids).logits, atol=1e-5)
    assert again.tokenizer.get_vocab() == lm.tokenizer.get_vocab()
    assert again.model.config._attn_implementation == "eager"
    half = CausalLM(name_or_path=str(tmp_path / "lm"), dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16


def test_lm_argument_errors(tokenizer_dir):
    with pytest.raises(ValueError, match="exactly one"):
        CausalLM(tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="model_type"):
        CausalLM(config={"hidden_size": 32}, tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="tokenizer"):
        CausalLM(config=dict(LLAMA))
    with pytest.raises(ValueError, match="dtype"):
        CausalLM(config=dict(LLAMA), tokenizer=tokenizer_dir, dtype="float8")


def test_shapes_tokenizer_by_name():
    pytest.importorskip("vlzoo.data.tokenizer")
    from vlzoo.data.tokenizer import shapes_tokenizer

    lm = CausalLM(config=dict(LLAMA), tokenizer="shapes")
    assert lm.tokenizer.get_vocab() == shapes_tokenizer().get_vocab()
    assert lm.vocab_size == len(lm.tokenizer)

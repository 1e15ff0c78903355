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


def test_attention_maps_show_the_prefix_both_ways(folder):
    """The maps a paradigm reads (eager, asked layers) come from the same prefix mask: an image
    token attends to the prompt after it, an answer token never to a later one."""
    bb = PaliGemmaBackbone(name_or_path=folder).eval()
    ids, mask = _rows(bb.tokenizer, ["detect red circle"], ["red circle"])
    with torch.no_grad():
        out = bb(torch.randn(1, 3, SIDE, SIDE), ids, mask, output_attentions=[-1])
    attn = out.attentions[1][0].sum(0)  # (T, T) summed over heads
    start = 16 + 1 + 3 + 1  # the first answer token
    assert attn[0, 16:start].sum() > 0  # the first image token reads <bos>, the prompt and "\n"
    assert attn[0, start:].sum() == 0  # ... but not the answer
    assert torch.equal(attn[start:, start:], attn[start:, start:].tril())  # the answer is causal


def test_the_frame_is_the_processors(folder):
    """A fixed square resize without padding to the tower's side, normalised with the saved
    preprocessor's mean / std: at that side the pixels equal SiglipImageProcessor's; other sizes
    are resampled close to it (PIL's bicubic vs torch's) and boxes map back exactly."""
    from transformers import AutoImageProcessor

    bb = PaliGemmaBackbone(name_or_path=folder)
    assert (bb.hidden_size, bb.vision_width, bb.feature_grid, bb.input_size, bb.num_image_tokens) == (64, 32, (4, 4), 32, 16)
    assert bb.data_config["transform"] is bb.transform and bb.data_config["input_size"] == SIDE
    processor = AutoImageProcessor.from_pretrained(folder)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8)
    x, geo = bb.transform.image(image)
    assert torch.allclose(x, processor(images=[image], return_tensors="pt")["pixel_values"][0], atol=1e-6)
    smooth = (torch.linspace(0, 255, 90)[None, :, None] * torch.ones(3, 90, 60)).to(torch.uint8)
    x, geo = bb.transform.image(smooth)
    ref = processor(images=[smooth], return_tensors="pt")["pixel_values"][0]
    assert geo.input_size == (32, 32) and geo.offset == (0.0, 0.0) and (x - ref).abs().max() < 0.01
    box = torch.tensor([[6.0, 9.0, 48.0, 81.0]])
    assert torch.allclose(geo.boxes_to_input(box), torch.tensor([[3.2, 3.2, 25.6, 28.8]]))
    assert torch.allclose(geo.boxes_to_original(geo.boxes_to_input(box)), box, atol=1e-5)
    with pytest.raises(ValueError, match="not in PaliGemma's 32 x 32 frame"):
        bb.encode_images(torch.randn(1, 3, 48, 48))


def test_policies_lora_and_checkpoint_round_trip(folder, tmp_path):
    bb = PaliGemmaBackbone(name_or_path=folder, freeze_lm=True, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    new = bb.add_special_tokens(["<loc0007>"])["<loc0007>"]
    images = torch.randn(1, 3, SIDE, SIDE)
    ids, mask = _rows(bb.tokenizer, ["detect red circle"], ["<loc0007> red circle"])
    bb(images, ids, mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in bb.named_parameters()}
    lora = [n for n in grads if "lora_" in n]
    assert lora and all("vision_tower" not in n for n in lora) and all(grads[n] is not None for n in lora)
    assert all(g is None for n, g in grads.items() if "vision_tower" in n)  # the frozen tower
    assert all(g is not None for n, g in grads.items() if "multi_modal_projector" in n)  # the trainable projector
    emb = bb._lm().get_input_embeddings().weight  # tied to the head, as released
    assert bb._lm().get_output_embeddings().weight is emb
    assert emb.grad.abs().sum(-1).nonzero().flatten().tolist() == [new]
    bb.save_backbone(tmp_path / "pg.pt")
    again = PaliGemmaBackbone(name_or_path=folder, checkpoint=str(tmp_path / "pg.pt")).eval()
    assert torch.allclose(again(images, ids, mask).logits, bb.eval()(images, ids, mask).logits, atol=1e-5)
    again.save_pretrained(tmp_path / "folder")
    third = PaliGemmaBackbone(name_or_path=str(tmp_path / "folder")).eval()
    assert third.tokenizer.convert_tokens_to_ids("<loc0007>") == new and third.transform.resample == "bicubic"
    assert torch.allclose(third(images, ids, mask).logits, again(images, ids, mask).logits, atol=1e-5)


def test_bad_inputs_are_refused_with_what_to_do(folder, tmp_path):
    bb = PaliGemmaBackbone(name_or_path=folder)
    ids = torch.tensor([bb.tokenizer("<image><bos>detect red circle", add_special_tokens=False)["input_ids"]])
    with pytest.raises(ValueError, match=r"rows \[0\] have no '\\n' after the image.*PALIGEMMA_TEMPLATE"):
        bb(torch.randn(1, 3, SIDE, SIDE), ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="flash"):
        PaliGemmaBackbone(name_or_path=folder, attn_implementation="flash_attention_2")
    from .qwen_tiny import make_qwen_folder

    qwen = make_qwen_folder(tmp_path / "qwen", "qwen2_vl", layers=1)
    with pytest.raises(ValueError, match="needs a 'paligemma' model, got model_type 'qwen2_vl'"):
        PaliGemmaBackbone(name_or_path=qwen)

"""LlavaBackbone: a tiny native LLaVA folder behind the MultimodalBackbone interface."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import LlavaBackbone

from .conftest import encode


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    from .conftest import make_tokenizer_folder

    folder = tmp_path_factory.mktemp("llava")
    make_tokenizer_folder(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return str(folder)


def test_llava_matches_the_native_forward(llava_dir):
    from transformers import LlavaForConditionalGeneration

    bb = LlavaBackbone(name_or_path=llava_dir).eval()
    native = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    assert (bb.hidden_size, bb.vision_width, bb.feature_grid, bb.input_size) == (32, 32, (4, 4), 32)
    assert bb.image_token == "<image>"
    images = torch.randn(2, 3, 32, 32)
    ids, mask = encode(bb.tokenizer, ["a red circle", "the blue square"])
    out = bb(images, ids, mask, labels=ids)
    # the native model wants the placeholder repeated once per image token
    expanded = torch.cat([ids[:, :1], ids[:, 1:2].repeat(1, 16), ids[:, 2:]], 1)
    ref = native(input_ids=expanded, pixel_values=images, attention_mask=torch.ones_like(expanded))
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    assert out.image_features.shape == (2, 32, 4, 4) and out.image_positions[0].tolist() == list(range(1, 17))
    cached = bb.generate(images, ids, mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(cached, bb.generate(images, ids, mask, max_new_tokens=4, eos_token_id=[], use_cache=False))


def test_llava_generation_matches_native_generate_batched_and_alone(llava_dir):
    """Greedy decoding through the splice (KV cache over the image prefix) gives transformers' own
    LLaVA generate's tokens, row by row; a left-padded batch of four prompts of different lengths
    gives each row's tokens alone."""
    from transformers import LlavaForConditionalGeneration

    bb = LlavaBackbone(name_or_path=llava_dir).eval()
    native = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    prompts = ["a", "the blue square is in", "what colour is the circle", "is the red"]
    ids, mask = encode(bb.tokenizer, prompts, left=True)
    batched = bb.generate(images, ids, mask, max_new_tokens=6)
    pad = bb.tokenizer.pad_token_id
    for i, prompt in enumerate(prompts):
        one, one_mask = encode(bb.tokenizer, [prompt])
        alone = bb.generate(images[i : i + 1], one, one_mask, max_new_tokens=6)[0]
        expanded = torch.cat([one[:, :1], one[:, 1:2].repeat(1, 16), one[:, 2:]], 1)
        with torch.no_grad():
            ref = native.generate(input_ids=expanded, pixel_values=images[i : i + 1],
                                  attention_mask=torch.ones_like(expanded), max_new_tokens=6, do_sample=False)
        assert alone.tolist() == ref[0, expanded.shape[1] :].tolist()
        row = batched[i][: len(alone)]
        assert torch.equal(row, alone) and bool((batched[i][len(alone) :] == pad).all())


def test_llava_policies_tokens_and_round_trip(llava_dir, tmp_path):
    bb = LlavaBackbone(name_or_path=llava_dir, freeze_lm=True, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    ids = bb.add_special_tokens(["<loc>"])
    images = torch.randn(1, 3, 32, 32)
    tokens, mask = encode(bb.tokenizer, ["a <loc> circle"])
    bb(images, tokens, mask, labels=tokens).loss.backward()
    grads = {n: p.grad for n, p in bb.named_parameters()}
    lora = [n for n in grads if "lora_" in n]
    assert lora and all("vision_tower" not in n for n in lora)  # LoRA skips the CLIP tower
    assert all(grads[n] is not None for n in lora)
    assert all(g is None for n, g in grads.items() if "vision_tower" in n)
    assert all(g is not None for n, g in grads.items() if "multi_modal_projector" in n)
    emb = bb._lm().get_input_embeddings().weight
    assert emb.grad.abs().sum(-1).nonzero().flatten().tolist() == [ids["<loc>"]]
    bb.save_backbone(tmp_path / "llava.pt")
    again = LlavaBackbone(name_or_path=llava_dir, checkpoint=str(tmp_path / "llava.pt")).eval()
    assert torch.allclose(again(images, tokens, mask).logits, bb.eval()(images, tokens, mask).logits, atol=1e-5)
    again.save_pretrained(tmp_path / "folder")
    third = LlavaBackbone(name_or_path=str(tmp_path / "folder")).eval()
    assert third.tokenizer.convert_tokens_to_ids("<loc>") == ids["<loc>"]
    assert torch.allclose(third(images, tokens, mask).logits, again(images, tokens, mask).logits, atol=1e-5)


def test_llava_takes_references_too(llava_dir):
    from vlzoo.backbones import ReferenceEncoder
    from vlzoo.structures import REFERENCE_TOKENS, References, reference_text

    torch.manual_seed(0)
    bb = LlavaBackbone(name_or_path=llava_dir, references=ReferenceEncoder(tokens=2, modalities=["box"])).eval()
    text = "<image> where is " + reference_text("box", 2)
    ids = torch.tensor([bb.tokenizer(text, add_special_tokens=False)["input_ids"]])
    refs = References([torch.tensor([[2.0, 3.0, 20.0, 24.0]])], [None])
    images = torch.randn(1, 3, bb.input_size, bb.input_size)
    with torch.no_grad():
        embeds = bb.embed_references(bb.embed_tokens(ids), ids, refs, images)
        where = ids == bb._reference_ids[REFERENCE_TOKENS["box"]]
        assert int(where.sum()) == 2
        assert torch.allclose(embeds[where], bb.references.box_tokens(refs.prompt_boxes[0], (bb.input_size,) * 2)[0])
        out = bb(images, ids, torch.ones_like(ids), references=refs)
    assert out.logits.shape[1] == ids.shape[1] - 1 + out.image_tokens.shape[1]

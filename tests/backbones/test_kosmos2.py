"""Kosmos-2 backbone: a tiny native folder (save_pretrained, the real Kosmos2Processor's tokens)
loaded back through the real path; the processor's layout, logits and generation against the
native transformers model; the codec's tokens; the frame; policies."""

from __future__ import annotations

import random

import pytest
import torch

from vlzoo.backbones import Kosmos2Backbone
from vlzoo.backbones.kosmos2 import KOSMOS2_PATCH_TOKENS, KOSMOS2_TAG_TOKENS
from vlzoo.paradigms.codecs import Kosmos2Codec

from .kosmos2_tiny import QUERIES, SIDE, make_kosmos2_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_kosmos2_folder(tmp_path_factory.mktemp("kosmos2"))


def _rows(bb, texts: list[str], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the collate writes with the template ``{image}<grounding> {prompt}``: ``<s> <image>``
    then the text after the image, padded right (or left)."""
    tok = bb.tokenizer
    rows = [[tok.bos_token_id, bb.image_token_id] + tok(f"<grounding> {t}", add_special_tokens=False)["input_ids"]
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _native(folder: str):
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(folder).eval()


def test_the_processors_layout_and_the_native_logits(folder):
    """Kosmos2Processor writes <s><image> (64 placeholder ids) </image><grounding> ... with
    image_embeds_position_mask on the 64; the backbone's splice is that sequence (its ids and mask
    from native_inputs equal the processor's), and its logits equal the native model's."""
    from transformers import AutoProcessor

    bb = Kosmos2Backbone(name_or_path=folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    image = torch.randint(0, 256, (SIDE, SIDE, 3), dtype=torch.uint8).numpy()
    texts = ["the red circle", "a blue square is left of the green triangle"]
    enc = processor(text=[f"<grounding>{t}" for t in texts], images=[image, image], num_image_tokens=QUERIES,
                    padding=True, return_tensors="pt")
    ids, mask = _rows(bb, texts)
    native_in = bb.native_inputs(enc["pixel_values"], ids, mask)
    for key in ("input_ids", "attention_mask", "image_embeds_position_mask"):
        assert torch.equal(native_in[key], enc[key]), key
    out = bb(enc["pixel_values"], ids, mask)
    tok = bb.tokenizer
    first = native_in["input_ids"][0].tolist()
    assert first[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    assert first[2 + QUERIES : 4 + QUERIES] == tok.convert_tokens_to_ids(["</image>", "<grounding>"])
    assert out.image_positions.tolist() == [list(range(2, 2 + QUERIES))] * 2
    assert out.image_tokens.shape == (2, QUERIES, 64) and out.image_features.shape == (2, 32, 4, 4)
    with torch.no_grad():
        ref = _native(folder)(**native_in)
    keep = out.attention_mask.bool()
    assert torch.allclose(out.logits[keep], ref.logits[keep], atol=1e-5)


def test_attention_maps_are_the_native_models(folder):
    """Asked layers return (B, heads, T, T) maps computed with eager attention for the call (the
    model stays on its sdpa kernel otherwise), equal to the native model's eager attentions."""
    bb = Kosmos2Backbone(name_or_path=folder).eval()
    ids, mask = _rows(bb, ["the red circle", "a blue square is left of the green triangle"])
    images = torch.randn(2, 3, SIDE, SIDE)
    out = bb(images, ids, mask, output_attentions=[0, -1])
    t = out.attention_mask.shape[1]
    assert sorted(out.attentions) == [0, 1] and out.attentions[0].shape == (2, 4, t, t)
    assert bb._decoder_module().config._attn_implementation == "sdpa"
    native = _native(folder)
    native.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        ref = native(**bb.native_inputs(images, ids, mask), output_attentions=True)
    for layer in (0, 1):
        assert torch.allclose(out.attentions[layer], ref.attentions[layer], atol=1e-6)


def test_the_codec_tokens_are_the_tokenizers(folder):
    """The kosmos2 codec's tokens are the processor's (tag tokens then patch indices, in its order,
    as in the released tokenizer: 64002.. and 64013..); pixel2seq adds no row for them."""
    from vlzoo.paradigms import Pixel2Seq

    bb = Kosmos2Backbone(name_or_path=folder)
    vocab = bb.tokenizer.get_vocab()
    base = vocab["</doc>"]
    assert [vocab[t] for t in KOSMOS2_TAG_TOKENS] == list(range(base, base + 11))
    assert [vocab[t] for t in KOSMOS2_PATCH_TOKENS] == list(range(base + 11, base + 11 + 1024))
    codec = Kosmos2Codec()
    assert set(codec.special_tokens) <= set(vocab) and list(codec.coordinate_tokens) == list(KOSMOS2_PATCH_TOKENS)
    rows = bb._vocab_rows()
    model = Pixel2Seq(backbone=bb, codec=codec, tasks=["rec"])
    assert bb._vocab_rows() == rows == len(bb.tokenizer) and not bb._new_token_ids
    assert all(model.special_token_ids[t] == vocab[t] for t in codec.special_tokens)
    ids = bb.tokenizer(codec.encode(torch.tensor([[4.0, 8.0, 20.0, 30.0]]), (SIDE, SIDE), phrase="red"),
                       add_special_tokens=False)["input_ids"]
    assert bb.tokenizer.unk_token_id not in ids


def test_the_frame_maps_boxes_exactly(folder):
    """The frame is the processor's resize straight to the tower's side: its pixel values for an
    image at that side are the transform's (close to them for a resized one), and a box written in the input frame has the patch
    indices transformers' own helper gives the original box (random boxes, COCO-like sizes)."""
    from transformers import AutoImageProcessor
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

    bb = Kosmos2Backbone(name_or_path=folder)
    assert (bb.input_size, bb.feature_grid, bb.hidden_size, bb.vision_width) == (32, (4, 4), 64, 32)
    assert bb.data_config["transform"] is bb.transform and bb.transform.mode == "resize"  # Kosmos2ResizeTransform
    image = torch.randint(0, 256, (3, SIDE, SIDE), dtype=torch.uint8)
    x, geo = bb.transform.image(image)
    ref = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(x[None], ref, atol=1e-5)
    # resized (non-square, aspect ratio not kept) the pixels are close to the processor's bicubic
    # (bilinear would be 0.07..0.10 away here)
    for shape in ((3, 48, 64), (3, 90, 60)):
        image = torch.randint(0, 256, shape, dtype=torch.uint8)
        x, geo = bb.transform.image(image)
        assert geo.input_size == (SIDE, SIDE) and geo.scale == (SIDE / shape[2], SIDE / shape[1])
        ref = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")["pixel_values"]
        assert (x[None] - ref).abs().mean() < 0.01
    codec, rng = Kosmos2Codec(), random.Random(0)
    for _ in range(2000):
        h, w = rng.choice([(480, 640), (427, 640), (640, 480), (375, 500), (612, 612), (360, 640)])
        x1, y1 = rng.randint(0, w - 2), rng.randint(0, h - 2)
        box = torch.tensor([[x1, y1, rng.randint(x1 + 1, w), rng.randint(y1 + 1, h)]], dtype=torch.float32)
        geo = bb.transform.geometry((h, w))
        assert geo.input_size == (SIDE, SIDE)
        b = box[0].tolist()
        expected = tuple(coordinate_to_patch_index((b[0] / w, b[1] / h, b[2] / w, b[3] / h), 32))
        assert codec.patch_indices(geo.boxes_to_input(box)[0].tolist(), geo.input_size) == expected
        decoded = geo.boxes_to_original(codec.decode(codec.encode(geo.boxes_to_input(box), geo.input_size), geo.input_size))
        assert torch.allclose(decoded, codec.decode(codec.encode(box, (h, w)), (h, w)), atol=1e-3)
    with pytest.raises(ValueError, match="not in Kosmos-2's frame"):
        bb.encode_images(torch.randn(1, 3, 24, 24))


def test_generation_is_padding_invariant_and_matches_native_generate(folder):
    """A left-padded batch decodes each row as alone (with and without the cache), and alone is
    the native generate's greedy answer."""
    bb = Kosmos2Backbone(name_or_path=folder).eval()
    native = _native(folder)
    torch.manual_seed(1)
    images = torch.randn(3, 3, SIDE, SIDE)
    prompts = ["a", "the blue square is in the left half", "what colour is the circle"]
    ids, mask = _rows(bb, prompts, left=True)
    batched = bb.generate(images, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(batched, bb.generate(images, ids, mask, max_new_tokens=5, eos_token_id=[], use_cache=False))
    for i, prompt in enumerate(prompts):
        one, one_mask = _rows(bb, [prompt])
        alone = bb.generate(images[i : i + 1], one, one_mask, max_new_tokens=5, eos_token_id=[])[0]
        assert torch.equal(batched[i], alone)
        native_in = bb.native_inputs(images[i : i + 1], one, one_mask)
        with torch.no_grad():
            ref = native.generate(**native_in, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert alone.tolist() == ref[0, -5:].tolist()


def test_policies_lora_and_checkpoint_round_trip(folder, tmp_path):
    bb = Kosmos2Backbone(name_or_path=folder, freeze_lm=True, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    new = bb.add_special_tokens(["<loc>"])["<loc>"]
    images = torch.randn(1, 3, SIDE, SIDE)
    ids, mask = _rows(bb, ["a red circle"])
    ids[0, 3] = new  # a word inside the row (the last token predicts nothing)
    bb(images, ids, mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in bb.named_parameters()}
    lora = [n for n in grads if "lora_" in n]
    assert lora and all("vision_model" not in n and "image_to_text" not in n for n in lora)
    assert all(grads[n] is not None for n in lora)
    assert all(g is None for n, g in grads.items() if "vision_model" in n)  # the frozen tower
    assert all(g is not None for n, g in grads.items() if "image_to_text_projection" in n)  # the projection
    emb = bb._lm().get_input_embeddings().weight
    assert emb.grad.abs().sum(-1).nonzero().flatten().tolist() == [new]
    bb.save_backbone(tmp_path / "kosmos2.pt")
    again = Kosmos2Backbone(name_or_path=folder, checkpoint=str(tmp_path / "kosmos2.pt")).eval()
    assert torch.allclose(again(images, ids, mask).logits, bb.eval()(images, ids, mask).logits, atol=1e-5)
    again.save_pretrained(tmp_path / "folder")
    third = Kosmos2Backbone(name_or_path=str(tmp_path / "folder")).eval()
    assert third.tokenizer.convert_tokens_to_ids("<loc>") == new and third.input_size == SIDE
    assert torch.allclose(third(images, ids, mask).logits, again(images, ids, mask).logits, atol=1e-5)


def test_bad_folders_and_templates_are_refused(folder, tmp_path):
    from vlzoo.data.tokenizer import save_shapes_tokenizer

    bb = Kosmos2Backbone(name_or_path=folder)
    ids, mask = _rows(bb, ["a red circle"])
    twice = torch.cat([ids[:, :2], ids[:, 1:]], 1)  # a literal <image> in the template
    with pytest.raises(ValueError, match=r"exactly one '<image>'.*no literal <image>"):
        bb(torch.randn(1, 3, SIDE, SIDE), twice, torch.ones_like(twice))
    with pytest.raises(ValueError, match="lacks Kosmos-2's tag / location tokens"):
        Kosmos2Backbone(name_or_path=folder, tokenizer=str(save_shapes_tokenizer(tmp_path / "plain")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="needs a 'kosmos-2' model, got model_type 'llava'"):
        Kosmos2Backbone(name_or_path=str(tmp_path / "other"))


def test_the_shipped_config_is_the_released_checkpoint_in_a_dry_run():
    """The shipped microsoft/kosmos-2-patch14-224 facts: 1.66 B parameters on meta, the released
    token ids (transformers' integration test: <image> 64003, </image> 64004, <grounding> 64012,
    <patch_index_0044> 64057) and the 224 px resize frame."""
    from vlzoo.backbones.shipped import dry_loading

    with dry_loading():
        bb = Kosmos2Backbone(name_or_path="microsoft/kosmos-2-patch14-224", dtype="bfloat16")
    assert sum(p.numel() for p in {id(p): p for p in bb.parameters()}.values()) == 1_664_485_376
    tok = bb.tokenizer
    assert (bb.image_token_id, bb.end_image_token_id, bb.first_image_token_id) == (64003, 64004, 4)
    assert tok.convert_tokens_to_ids(["<grounding>", "<phrase>", "<object>", "<patch_index_0044>"]) == [
        64012, 64007, 64009, 64057]
    assert (bb.input_size, bb.feature_grid, bb.num_image_tokens) == (224, (16, 16), 64)
    assert bb.transform.geometry((480, 640)).input_size == (224, 224)

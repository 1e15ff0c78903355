"""Florence-2 backbone: a tiny native folder (save_pretrained) loaded back through the real path;
the encoder / decoder layout, logits and generation against the native transformers model, the
frame and codec against the processor, policies and checkpoints."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones.florence2 import (
    AttentionUnavailableError,
    Florence2Backbone,
    Florence2Template,
    expand_task_prompt,
)

from .florence_tiny import SIDE, make_florence_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_florence_folder(tmp_path_factory.mktemp("florence2"))


@pytest.fixture(scope="module")
def native(folder):
    import transformers

    return transformers.Florence2ForConditionalGeneration.from_pretrained(folder).eval()


def _rows(bb, prompts: list[str], answers: list[str] | None = None, *, left: bool = False):
    """``<s> <image> prompt [answer </s>]`` rows as the datamodule builds them (labels on the answer)."""
    tok = bb.tokenizer
    rows, labels = [], []
    for i, p in enumerate(prompts):
        head = [tok.bos_token_id, bb.image_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        tail = [] if answers is None else tok(" " + answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(head + tail)
        labels.append([-100] * len(head) + tail)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl], lab[i, sl], mask[i, sl] = torch.tensor(r), torch.tensor(la), 1
    return ids, mask, lab


def test_layout_and_logits_match_the_native_model(folder, native):
    """Encoder: 1 + 8 x 8 image tokens then <s> prompt </s>; decoder: </s> <s> answer </s>; the
    decoder's logits equal the native model's on the processor's inputs (right-padded rows of
    different lengths), and the loss is the native loss over the answer."""
    bb = Florence2Backbone(name_or_path=folder).eval()
    assert (bb.hidden_size, bb.vision_width, bb.feature_grid, bb.input_size) == (64, 32, (8, 8), SIDE)
    torch.manual_seed(0)
    images = torch.randn(2, 3, SIDE, SIDE)
    ids, mask, labels = _rows(bb, ["where is the red circle?", "find the blue square left of the green triangle."],
                              ["<loc_1><loc_2><loc_300><loc_999>", "<loc_0><loc_0><loc_10><loc_20>"])
    out = bb(images, ids, mask, labels=labels)
    native_in = bb.native_inputs(images, ids, mask, labels)
    enc = native_in["input_ids"]
    assert (enc[:, :65] == bb.native_image_id).all() and enc[0, 65] == bb.tokenizer.bos_token_id
    assert (native_in["decoder_input_ids"][:, :2] == torch.tensor([bb.decoder_start_id, bb.tokenizer.bos_token_id])).all()
    te = enc.shape[1]
    assert out.image_positions[0].tolist() == list(range(1, 65))
    assert out.image_features.shape == (2, 32, 8, 8) and out.image_tokens.shape == (2, 64, 64)
    # the answer ids map to the decoder block, after </s> <s>; the collate's lone space before the
    # answer maps onto <s>, so the decoder reads <s><loc_..> as the processor's tokenizer writes it
    answer = (labels[0] != -100).nonzero().flatten()
    tok = bb.tokenizer
    assert tok.convert_ids_to_tokens(int(ids[0, answer[0]])) == "\u2581"
    assert out.positions[0, answer].tolist() == [te + 1] + [te + 2 + j for j in range(len(answer) - 1)]
    assert native_in["decoder_input_ids"][0].tolist() == [bb.decoder_start_id, tok.bos_token_id] + tok(
        "<loc_1><loc_2><loc_300><loc_999>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answer = answer[1:]
    with torch.no_grad():
        ref = native(**native_in)
    keep = out.attention_mask[:, te:].bool()
    assert torch.allclose(out.logits[:, te:][keep], ref.logits[keep], atol=1e-4)
    assert (out.logits[:, :te] == 0).all()
    # the loss: next-token cross-entropy over the answer and its </s>
    target = out.labels[:, te + 1 :]
    expected = torch.nn.functional.cross_entropy(ref.logits[:, :-1].reshape(-1, ref.logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # the [LOC]-style read: the hidden state at an answer id is the decoder's
    assert torch.allclose(out.text_hidden_states()[0, answer[0]], out.hidden_states[0, te + 2])


def test_generation_is_padding_invariant_and_matches_native_generate(folder, native):
    """A left-padded batch of prompts decodes each row as alone (cache or not), and alone is the
    native generate's greedy answer from the processor's inputs and </s> <s>."""
    bb = Florence2Backbone(name_or_path=folder).eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, SIDE, SIDE)
    prompts = ["a", "the blue square is in the left half", "what colour is the circle"]
    ids, mask, _ = _rows(bb, prompts, left=True)
    batched = bb.generate(images, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batched, bb.generate(images, ids, mask, max_new_tokens=6, eos_token_id=[], use_cache=False))
    for i, prompt in enumerate(prompts):
        one, one_mask, _ = _rows(bb, [prompt])
        alone = bb.generate(images[i : i + 1], one, one_mask, max_new_tokens=6, eos_token_id=[])[0]
        assert torch.equal(batched[i], alone)
        native_in = bb.native_inputs(images[i : i + 1], one, one_mask)
        with torch.no_grad():
            ref = native.generate(**native_in, max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=None,
                                  forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0)
        assert alone.tolist() == ref[0, 2:].tolist()


def test_frame_codec_and_task_prompts_are_the_processors(folder):
    """The frame is the processor's fixed square resize (aspect ratio not kept): a box encoded by
    the florence2 codec in the input frame gives the post-processor's bins of the original box,
    the tokens are the tokenizer's own single tokens, and task tokens expand as the processor's."""
    import transformers
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    from vlzoo.paradigms.codecs import Florence2Codec

    bb = Florence2Backbone(name_or_path=folder)
    geo = bb.transform.geometry((480, 640))
    assert geo.input_size == (SIDE, SIDE) and geo.offset == (0.0, 0.0)
    tok = bb.tokenizer
    post = Florence2PostProcessor(config=None, tokenizer=tok)
    codec = Florence2Codec()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, 2, generator=g) * torch.tensor([640.0, 480.0])
    boxes = torch.cat([xy.min(1).values, xy.max(1).values], 1)
    same = 0
    for box in boxes:
        text = codec.encode(geo.boxes_to_input(box[None].double()).float(), geo.input_size)
        bins = [int(t) for t in text.replace("<loc_", " ").replace(">", " ").split()]
        ref = post.quantize(box[None], (640, 480))[0].tolist()
        assert max(abs(a - b) for a, b in zip(bins, ref, strict=True)) <= 1
        same += bins == ref
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 4
    assert same >= 495  # only boundary values may fall in the neighbouring bin (float rounding of the scale)
    assert tok.convert_tokens_to_ids("<loc_999>") != tok.unk_token_id
    # task prompts: the processor's own expansion
    image_processor = transformers.CLIPImageProcessor()
    image_processor.image_seq_length = 65
    tok.image_token, tok.image_token_id = "<image>", bb.image_token_id
    processor = transformers.Florence2Processor(image_processor=image_processor, tokenizer=tok)
    for prompt in ["<OD>", "<CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING> the red circle", "<OPEN_VOCABULARY_DETECTION>a cat",
                   "where is the red circle?"]:
        assert expand_task_prompt(prompt) == processor._construct_prompts(prompt)[0]
    with pytest.raises(ValueError, match="whole prompt"):
        expand_task_prompt("<OD> and more")
    assert Florence2Template(text="<OPEN_VOCABULARY_DETECTION>{prompt}").split("the red circle") == (
        "", "Locate the red circle in the image.")
    with pytest.raises(ValueError, match="reads the image before the text"):
        Florence2Template(text="look: {image} {prompt}")


def test_refusals_name_the_setting(folder, tmp_path):
    bb = Florence2Backbone(name_or_path=folder).eval()
    ids, mask, labels = _rows(bb, ["where is the red circle?"], ["<loc_1><loc_2><loc_3><loc_4>"])
    images = torch.randn(1, 3, SIDE, SIDE)
    with pytest.raises(AttentionUnavailableError, match="refocus_lambda"):
        bb(images, ids, mask, labels=labels, output_attentions=[-1])
    with pytest.raises(ValueError, match="not in Florence-2's frame"):
        bb(torch.randn(1, 3, 32, 32), ids, mask, labels=labels)
    before = torch.cat([torch.tensor([[bb.tokenizer.convert_tokens_to_ids("▁the")]]), ids], 1)
    with pytest.raises(ValueError, match="text before the image"):
        bb(images, before, torch.ones_like(before))
    from vlzoo.backbones import greedy_decode

    with pytest.raises(TypeError, match="encoder-decoder"):
        greedy_decode(bb, images, ids, mask)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(ValueError, match="needs a 'florence2' model"):
        Florence2Backbone(name_or_path=str(tmp_path))


def test_policies_lora_and_checkpoint_round_trip(folder, tmp_path):
    bb = Florence2Backbone(name_or_path=folder, freeze_vision=True, freeze_lm=True,
                           lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    names = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and not any("vision_tower" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)  # the projector trains by default
    assert not any("lora_" in n and ("vision_tower" in n or "multi_modal_projector" in n) for n in names)
    ids = bb.add_special_tokens(["[LOC]"])
    assert ids["[LOC]"] == len(bb.tokenizer) - 1
    path = tmp_path / "bb.pt"
    bb.save_backbone(path)
    again = Florence2Backbone(name_or_path=folder, checkpoint=str(path))
    state = bb.plain_state_dict()
    for key, value in again.plain_state_dict().items():
        assert torch.equal(value, state[key]), key

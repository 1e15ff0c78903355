"""References as a backbone feature: crop, box and audio references land at their placeholders
with k tokens each, in prompt order; wrong counts and missing references are errors; forward,
generation and gradients go through them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.backbones import (
    CausalLM,
    MultimodalBackbone,
    ReferenceEncoder,
    TimmVisionEncoder,
    WhisperAudioEncoder,
)
from vlzoo.backbones.references import crop_reference_tokens
from vlzoo.structures import REFERENCE_TOKENS, AudioClip, References, reference_text

VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 32,
       "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 256}
K = 4


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    refs = ReferenceEncoder(tokens=K, modalities=["crop", "box", "audio"], audio=WhisperAudioEncoder())
    return MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"), references=refs
    )


def _clip(freq: float, seconds: float = 0.8) -> AudioClip:
    t = np.arange(int(16000 * seconds)) / 16000
    return AudioClip(torch.from_numpy(0.3 * np.sin(2 * np.pi * freq * t)).float(), 16000)


def _ids(backbone, prompts):
    rows = [backbone.tokenizer("<image> " + p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(map(len, rows))
    pad = backbone.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left-padded, as prompts are
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return ids, mask


def test_the_tokens_are_added_and_the_span_is_k_placeholders(backbone):
    vocab = backbone.tokenizer.get_vocab()
    for token in ("<ref_start>", "<ref_end>", *REFERENCE_TOKENS.values()):
        assert token in vocab
    assert reference_text("audio", 3) == "<ref_start><ref_audio><ref_audio><ref_audio><ref_end>"
    with pytest.raises(ValueError, match="modality"):
        reference_text("smell", 2)


def test_each_modality_lands_at_its_placeholders_in_prompt_order(backbone):
    backbone.eval()
    a, b = _clip(300), _clip(900, seconds=1.5)
    boxes0 = torch.tensor([[2.0, 2.0, 18.0, 14.0], [8.0, 8.0, 30.0, 30.0]])
    boxes1 = torch.tensor([[0.0, 4.0, 16.0, 28.0]])
    prompts = [
        f"find {reference_text('audio', K)} near {reference_text('crop', K)} and {reference_text('crop', K)}",
        f"where is {reference_text('box', K)} ?",
    ]
    ids, mask = _ids(backbone, prompts)
    refs = References(prompt_boxes=[boxes0, boxes1], audio=[a, None])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = backbone.embed_tokens(ids)
        out = backbone.embed_references(text, ids, refs, images)
        audio = backbone.references.audio_tokens([a])[0]
        crops = crop_reference_tokens(backbone.encode_images, images[[0, 0]], boxes0, tokens=K, grid=(4, 4))
        box = backbone.references.box_tokens(boxes1, (32, 32))[0]
    tid = backbone._reference_ids
    where = {m: (ids == tid[REFERENCE_TOKENS[m]]).nonzero(as_tuple=True) for m in ("audio", "crop", "box")}
    assert [len(where[m][0]) for m in ("audio", "crop", "box")] == [K, 2 * K, K]
    assert set(where["audio"][0].tolist()) == {0} and set(where["box"][0].tolist()) == {1}
    assert torch.allclose(out[where["audio"]], audio)
    assert torch.allclose(out[where["crop"]], crops.reshape(-1, crops.shape[-1]))  # first box first
    assert torch.allclose(out[where["box"]], box)
    untouched = torch.ones_like(ids, dtype=torch.bool)
    for r, c in where.values():
        untouched[r, c] = False
    assert torch.equal(out[untouched], text[untouched])
    # two different clips give different tokens
    assert not torch.allclose(backbone.references.audio_tokens([b])[0], audio)


def test_counts_that_do_not_match_the_references_are_errors(backbone):
    ids, mask = _ids(backbone, [f"find {reference_text('audio', K - 1)} ."])
    text = backbone.embed_tokens(ids)
    images = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"row 0: 3 <ref_audio> tokens for 1"):
        backbone.embed_references(text, ids, References([torch.zeros(0, 4)], [_clip(300)]), images)
    ids, _ = _ids(backbone, [f"find {reference_text('audio', K)} ."])
    with pytest.raises(ValueError, match="Sample.reference_audio"):  # a span without a clip
        backbone.embed_references(backbone.embed_tokens(ids), ids, References([torch.zeros(0, 4)], [None]), images)
    with pytest.raises(ValueError, match="no references"):
        backbone.embed_references(backbone.embed_tokens(ids), ids, None, images)
    ids, _ = _ids(backbone, [f"segment {reference_text('crop', K)} ."])
    with pytest.raises(ValueError, match="0 prompt boxes"):
        backbone.embed_references(backbone.embed_tokens(ids), ids, References([torch.zeros(0, 4)], [None]), images)


def test_prompt_boxes_referred_to_otherwise_need_no_span(backbone):
    # a REG prompt whose box is written as text (or a pixel2emb <loc>) leaves the boxes alone
    ids, _ = _ids(backbone, ["describe the region [0.1,0.2,0.5,0.6] ."])
    text = backbone.embed_tokens(ids)
    refs = References([torch.tensor([[3.0, 6.0, 16.0, 19.0]])], [None])
    assert torch.equal(backbone.embed_references(text, ids, refs, torch.zeros(1, 3, 32, 32)), text)
    # a span of mixed placeholders is refused
    mixed = "<ref_start>" + "<ref>" * (K - 1) + "<ref_box><ref_end>"
    ids, _ = _ids(backbone, [f"find {mixed} ."])
    with pytest.raises(ValueError, match="consecutive placeholders of one modality"):
        backbone.embed_references(backbone.embed_tokens(ids), ids, refs, torch.zeros(1, 3, 32, 32))


def test_forward_and_generation_read_the_references_and_train_the_audio_tower(backbone):
    backbone.train()
    backbone.zero_grad()
    ids, mask = _ids(backbone, [f"segment {reference_text('audio', K)} ."] * 2)
    refs = References([torch.zeros(0, 4)] * 2, [_clip(300), _clip(700)])
    images = torch.randn(2, 3, 32, 32)
    out = backbone(images, ids, mask, labels=ids, references=refs)
    out.loss.backward()
    assert backbone.references.audio_projector[0].weight.grad.abs().sum() > 0
    assert backbone.references.audio.encoder.conv1.weight.grad.abs().sum() > 0
    backbone.eval()
    with torch.no_grad():
        new = backbone.generate(images, ids, mask, max_new_tokens=3, references=refs)
        assert new.shape[0] == 2
        with pytest.raises(ValueError, match="no references"):
            backbone.generate(images, ids, mask, max_new_tokens=2)
        # the prompt pass of generation sees what forward sees
        full = backbone(images, ids, mask, references=refs)
        first = full.logits[:, -1].argmax(-1)
        assert torch.equal(new[:, 0], first)


def test_the_reference_encoder_checks_its_settings():
    with pytest.raises(ValueError, match="square"):
        ReferenceEncoder(tokens=3, modalities=["crop"])
    with pytest.raises(ValueError, match="audio encoder"):
        ReferenceEncoder(tokens=4, modalities=["audio"])
    with pytest.raises(ValueError, match="unknown"):
        ReferenceEncoder(tokens=4, modalities=["smell"])
    assert ReferenceEncoder(tokens=3, modalities=["box"]).tokens == 3


def test_a_backbone_file_with_an_audio_tower_round_trips(tmp_path):
    def make(lora):
        torch.manual_seed(0)
        refs = ReferenceEncoder(tokens=K, modalities=["audio"], audio=WhisperAudioEncoder(lora=lora))
        return MultimodalBackbone(
            vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"), references=refs
        )

    trained = make({"r": 2, "alpha": 4})
    with torch.no_grad():
        for name, p in trained.references.audio.encoder.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # a LoRA that changes the tower
    trained.save_backbone(tmp_path / "bb.pt")
    ids, mask = _ids(trained, [f"segment {reference_text('audio', K)} ."])
    refs = References([torch.zeros(0, 4)], [_clip(400)])
    images = torch.randn(1, 3, 32, 32)
    trained.eval()
    with torch.no_grad():
        expected = trained(images, ids, mask, references=refs).logits
    for lora in (None, {"r": 2, "alpha": 4}):  # LoRA merged into the file: loads with or without it
        again = MultimodalBackbone(
            vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"),
            references=ReferenceEncoder(tokens=K, modalities=["audio"], audio=WhisperAudioEncoder(lora=lora)),
            checkpoint=str(tmp_path / "bb.pt"),
        ).eval()
        with torch.no_grad():
            got = again(images, ids, mask, references=refs).logits
        # with a LoRA the fresh adapter starts at zero (B = 0): the merged weights alone
        assert torch.allclose(got, expected, atol=1e-5)


def test_a_backbone_file_without_references_starts_a_backbone_with_them(tmp_path):
    # the usual start: a stage-0 LMM (no reference encoder) -> a recipe that adds audio references
    torch.manual_seed(0)
    plain = MultimodalBackbone(vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"))
    plain.add_special_tokens(["[SEG]"])  # a token the earlier run added: keeps its id
    plain.save_backbone(tmp_path / "stage0.pt")
    saved = plain.plain_state_dict()
    refs = ReferenceEncoder(tokens=K, modalities=["audio"], audio=WhisperAudioEncoder())
    grown = MultimodalBackbone(
        vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"),
        references=refs, checkpoint=str(tmp_path / "stage0.pt"),
    )
    own = grown.plain_state_dict()
    rows = saved["language.model.model.embed_tokens.weight"].shape[0]
    for key, value in saved.items():
        if value.shape == own[key].shape:
            assert torch.equal(own[key], value), key
        else:  # the embeddings grew by the reference tokens, after the file's rows
            assert torch.equal(own[key][:rows], value), key
    assert own["language.model.model.embed_tokens.weight"].shape[0] == rows + len(refs.special_tokens)
    assert grown.tokenizer.convert_tokens_to_ids("[SEG]") == plain.tokenizer.convert_tokens_to_ids("[SEG]")
    assert all(grown.tokenizer.convert_tokens_to_ids(t) >= rows for t in refs.special_tokens)
    assert any(k.startswith("references.") for k in own)

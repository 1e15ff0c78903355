"""References on the native Kosmos-2 backbone: crop and audio references fill their spans with k
tokens each (a crop is its latent image tokens pooled in query order), a different reference
changes the output, a padded batch decodes like each row alone, and a backbone file saved
without references starts a Kosmos-2 backbone with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.backbones import Kosmos2Backbone, ReferenceEncoder, WhisperAudioEncoder
from vlzoo.backbones.references import crop_reference_tokens
from vlzoo.structures import REFERENCE_END, REFERENCE_START, REFERENCE_TOKENS, AudioClip, References

from .kosmos2_tiny import QUERIES, SIDE, make_kosmos2_folder

K = 4
AUDIO = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
         "max_source_positions": 100}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_kosmos2_folder(tmp_path_factory.mktemp("kosmos2"))


def _encoder(modalities=("crop", "audio")) -> ReferenceEncoder:
    audio = WhisperAudioEncoder(config=dict(AUDIO)) if "audio" in modalities else None
    return ReferenceEncoder(tokens=K, modalities=list(modalities), audio=audio)


def _clip(freq: float, seconds: float = 0.8) -> AudioClip:
    t = np.arange(int(16000 * seconds)) / 16000
    return AudioClip(torch.from_numpy(0.3 * np.sin(2 * np.pi * freq * t)).float(), 16000)


def _span(modality: str) -> list[str]:
    return [REFERENCE_START] + [REFERENCE_TOKENS[modality]] * K + [REFERENCE_END]


def _rows(bb, prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s> <image> <grounding>`` + each prompt's tokens, left-padded."""
    tok = bb.tokenizer
    rows = [[tok.bos_token_id, bb.image_token_id] + tok.convert_tokens_to_ids(["<grounding>", *p]) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    assert tok.unk_token_id not in ids.tolist()
    return ids, mask


PROMPTS = [
    ["▁find", *_span("audio"), "▁and", *_span("crop")],
    ["▁where", "▁is", "▁the", "▁red", *_span("crop"), "▁and", *_span("crop"), "▁?"],
]


def _references() -> References:
    return References(
        prompt_boxes=[torch.tensor([[2.0, 4.0, 20.0, 18.0]]), torch.tensor([[0.0, 0.0, 12.0, 12.0], [8.0, 10.0, 32.0, 30.0]])],
        audio=[_clip(300), None],
    )


@pytest.fixture(scope="module")
def backbone(folder):
    torch.manual_seed(0)
    return Kosmos2Backbone(name_or_path=folder, references=_encoder()).eval()


def test_crop_and_audio_references_fill_their_spans(backbone):
    bb = backbone
    ids, _ = _rows(bb, PROMPTS)
    refs = _references()
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        text = bb.embed_tokens(ids)
        out = bb.embed_references(text, ids, refs, images)
        audio = bb.references.audio_tokens([refs.audio[0]])[0]
        side = int(QUERIES**0.5)
        crops = crop_reference_tokens(bb.encode_images, images[[0, 1, 1]], torch.cat(refs.prompt_boxes), tokens=K,
                                      grid=(side, side))
    vocab = bb.tokenizer.get_vocab()
    audio_id, crop_id = (vocab[REFERENCE_TOKENS[m]] for m in ("audio", "crop"))
    assert (ids == audio_id).sum(1).tolist() == [K, 0] and (ids == crop_id).sum(1).tolist() == [K, 2 * K]
    assert torch.allclose(out[0][ids[0] == audio_id], audio, atol=1e-6)
    assert torch.allclose(out[0][ids[0] == crop_id], crops[0], atol=1e-6)
    assert torch.allclose(out[1][ids[1] == crop_id], crops[1:].reshape(-1, crops.shape[-1]), atol=1e-6)
    untouched = (ids != audio_id) & (ids != crop_id)
    assert torch.equal(out[untouched], text[untouched])


def test_a_different_reference_changes_the_output_and_decoding_is_padding_invariant(backbone):
    bb = backbone
    ids, mask = _rows(bb, PROMPTS)
    torch.manual_seed(1)
    images = torch.randn(2, 3, SIDE, SIDE)
    refs = _references()
    with torch.no_grad():
        base = bb(images, ids, mask, references=refs).logits
        heard = bb(images, ids, mask, references=References(refs.prompt_boxes, [_clip(1200, 1.5), None])).logits
        moved = References([refs.prompt_boxes[0], refs.prompt_boxes[1].flip(0)], refs.audio)
        cropped = bb(images, ids, mask, references=moved).logits
    assert (heard[0, -1] - base[0, -1]).abs().max() > 1e-3 and torch.equal(heard[1], base[1])
    # the untrained tiny projection's latent tokens barely depend on the image: a small but real change
    assert (cropped[1, -1] - base[1, -1]).abs().max() > 1e-6 and torch.equal(cropped[0], base[0])
    batched = bb.generate(images, ids, mask, max_new_tokens=5, eos_token_id=[], references=refs)
    for row in range(2):
        alone_ids, alone_mask = _rows(bb, [PROMPTS[row]])
        alone = bb.generate(images[row:row + 1], alone_ids, alone_mask, max_new_tokens=5, eos_token_id=[],
                            references=References([refs.prompt_boxes[row]], [refs.audio[row]]))
        assert torch.equal(alone[0], batched[row]), row


def test_a_backbone_file_without_references_starts_one_with_them(folder, tmp_path):
    torch.manual_seed(0)
    plain = Kosmos2Backbone(name_or_path=folder)
    plain.add_special_tokens(["[SEG]"])
    plain.save_backbone(tmp_path / "stage0.pt")
    saved = plain.plain_state_dict()
    grown = Kosmos2Backbone(
        name_or_path=folder, references=_encoder(("box",)), checkpoint=str(tmp_path / "stage0.pt"),
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    own = grown.plain_state_dict()
    for name, value in saved.items():
        rows = value.shape[0]
        assert torch.equal(own[name][:rows] if value.shape != own[name].shape else own[name], value), name
    assert any(k.startswith("references.box_mlp") for k in own)
    assert all(p.requires_grad for p in grown.references.parameters())  # LoRA leaves the encoder trainable
    assert not any("lora_" in n for n, _ in grown.references.named_parameters())
    assert grown.tokenizer.convert_tokens_to_ids("[SEG]") == plain.tokenizer.convert_tokens_to_ids("[SEG]")

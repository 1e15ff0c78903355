"""References on the native Qwen backbones: crop and audio references fill their spans with k
tokens each, the reference tokens take text positions on the three M-RoPE axes, a different
reference changes the output, padded batches decode like each row alone (KV cache or not), LoRA
leaves the reference encoder alone, and a backbone file saved without references starts a Qwen
backbone with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.backbones import Qwen2VLBackbone, Qwen25VLBackbone, ReferenceEncoder, WhisperAudioEncoder
from vlzoo.backbones.references import crop_reference_tokens
from vlzoo.structures import REFERENCE_END, REFERENCE_START, REFERENCE_TOKENS, AudioClip, References

from .qwen_tiny import make_qwen_folder

FAMILIES = {"qwen2_vl": Qwen2VLBackbone, "qwen2_5_vl": Qwen25VLBackbone}
K = 4
AUDIO = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
         "max_source_positions": 100}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, make_qwen_folder(tmp_path_factory.mktemp(request.param), request.param)


def _encoder(**audio) -> ReferenceEncoder:
    return ReferenceEncoder(tokens=K, modalities=["crop", "audio"], audio=WhisperAudioEncoder(config=dict(AUDIO), **audio))


def _backbone(family: str, folder: str, **kwargs):
    torch.manual_seed(0)
    return FAMILIES[family](name_or_path=folder, references=_encoder(), **kwargs)


def _clip(freq: float, seconds: float = 0.8) -> AudioClip:
    t = np.arange(int(16000 * seconds)) / 16000
    return AudioClip(torch.from_numpy(0.3 * np.sin(2 * np.pi * freq * t)).float(), 16000)


def _span(modality: str) -> list[str]:
    return [REFERENCE_START] + [REFERENCE_TOKENS[modality]] * K + [REFERENCE_END]


def _rows(tok, prompts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<|vision_start|> <image> <|vision_end|>`` + each prompt's tokens, left-padded."""
    rows = [tok.convert_tokens_to_ids(["<|vision_start|>", "<image>", "<|vision_end|>"] + p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _prompts() -> list[list[str]]:
    return [
        ["▁find", *_span("audio"), "▁and", *_span("crop")],
        ["▁where", "▁is", "▁the", "▁red", *_span("crop"), "▁and", *_span("crop"), "▁?"],
    ]


def _references() -> References:
    return References(
        prompt_boxes=[torch.tensor([[4.0, 8.0, 40.0, 36.0]]), torch.tensor([[0.0, 0.0, 24.0, 24.0], [16.0, 20.0, 64.0, 60.0]])],
        audio=[_clip(300), None],
    )


def test_crop_and_audio_references_fill_their_spans(family_dir):
    family, folder = family_dir
    bb = _backbone(family, folder).eval()
    vocab = bb.tokenizer.get_vocab()
    assert all(t in vocab for t in bb.references.special_tokens)
    ids, mask = _rows(bb.tokenizer, _prompts())
    refs = _references()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        text = bb.embed_tokens(ids)
        out = bb.embed_references(text, ids, refs, images)
        audio = bb.references.audio_tokens([refs.audio[0]])[0]
        crops = crop_reference_tokens(
            bb.encode_images, images[[0, 1, 1]], torch.cat(refs.prompt_boxes), tokens=K, grid=(8, 8)
        )
    audio_id, crop_id = (vocab[REFERENCE_TOKENS[m]] for m in ("audio", "crop"))
    assert (ids == audio_id).sum(1).tolist() == [K, 0] and (ids == crop_id).sum(1).tolist() == [K, 2 * K]
    assert torch.allclose(out[0][ids[0] == audio_id], audio, atol=1e-6)
    assert torch.allclose(out[0][ids[0] == crop_id], crops[0], atol=1e-6)
    assert torch.allclose(out[1][ids[1] == crop_id], crops[1:].reshape(-1, crops.shape[-1]), atol=1e-6)
    untouched = (ids != audio_id) & (ids != crop_id)
    assert torch.equal(out[untouched], text[untouched])
    # a crop is encoded at the batch's size, whatever image_size says (none here)
    assert bb.reference_grid(torch.zeros(1, 3, 48, 80)) == (6, 10)


def test_reference_tokens_take_text_positions_on_every_m_rope_axis(family_dir):
    family, folder = family_dir
    bb = _backbone(family, folder).eval()
    ids, mask = _rows(bb.tokenizer, _prompts())
    images = torch.randn(2, 3, 64, 64)
    refs = _references()
    with torch.no_grad():
        text = bb.embed_references(bb.embed_tokens(ids), ids, refs, images)
        features, tokens = bb.encode_images(images)
        sp = bb.splice(text, ids, mask, tokens)
        positions = bb.position_ids(sp, features)  # (3, B, T)
    assert positions.shape == (3, 2, sp.attention_mask.shape[1])
    placeholder = torch.zeros_like(ids, dtype=torch.bool)
    for m in ("audio", "crop"):
        placeholder |= ids == bb.tokenizer.convert_tokens_to_ids(REFERENCE_TOKENS[m])
    for row in range(2):
        cols = sp.positions[row][placeholder[row]]
        axes = positions[:, row, cols]
        assert torch.equal(axes[0], axes[1]) and torch.equal(axes[1], axes[2])  # text-like: one value on all axes
        after_image = int(positions[:, row, sp.image_positions[row]].max()) + 1
        first_text = sp.positions[row, (ids[row] == bb.tokenizer.convert_tokens_to_ids("<|vision_end|>")).nonzero()[0, 0]]
        assert int(positions[0, row, first_text]) == after_image
        # every token after the image, references included, is one step after the one before it
        tail = positions[0, row, first_text:]
        assert torch.equal(tail, torch.arange(after_image, after_image + len(tail)))


def test_a_different_reference_changes_the_output(family_dir):
    family, folder = family_dir
    bb = _backbone(family, folder).eval()
    ids, mask = _rows(bb.tokenizer, _prompts())
    images = torch.randn(2, 3, 64, 64)
    refs = _references()
    with torch.no_grad():
        base = bb(images, ids, mask, references=refs).logits[:, -1]
        heard = References(refs.prompt_boxes, [_clip(1200, seconds=1.5), None])
        other_clip = bb(images, ids, mask, references=heard).logits[:, -1]
        moved = References([refs.prompt_boxes[0], refs.prompt_boxes[1].flip(0)], refs.audio)
        other_crops = bb(images, ids, mask, references=moved).logits[:, -1]
    assert not torch.allclose(other_clip[0], base[0], atol=1e-5)
    assert torch.allclose(other_clip[1], base[1], atol=1e-5)  # the row without a clip is not touched
    assert not torch.allclose(other_crops[1], base[1], atol=1e-5)
    with pytest.raises(ValueError, match="no references"):
        bb(images, ids, mask)


def test_a_padded_batch_decodes_like_each_row_alone(family_dir):
    family, folder = family_dir
    bb = _backbone(family, folder).eval()
    ids, mask = _rows(bb.tokenizer, _prompts())
    torch.manual_seed(2)
    images = torch.randn(2, 3, 64, 64)
    refs = _references()

    def no_placeholder(_ids, scores):  # the untrained model may pick <image>; a full pass re-splices the answer
        scores[:, bb.image_token_id] = float("-inf")
        return scores

    kw = {"max_new_tokens": 6, "eos_token_id": [], "logits_processor": no_placeholder}
    batched = bb.generate(images, ids, mask, references=refs, **kw)
    uncached = bb.generate(images, ids, mask, references=refs, use_cache=False, **kw)
    assert torch.equal(batched, uncached)
    for row in range(2):
        alone_ids, alone_mask = _rows(bb.tokenizer, [_prompts()[row]])
        alone_refs = References([refs.prompt_boxes[row]], [refs.audio[row]])
        alone = bb.generate(images[row:row + 1], alone_ids, alone_mask, references=alone_refs, **kw)
        assert torch.equal(alone[0], batched[row]), row
    # the cached decode's logits are those of a full pass over prompt + generated tokens
    full_ids = torch.cat([ids, batched], 1)
    full_mask = torch.cat([mask, torch.ones_like(batched)], 1)
    with torch.no_grad():
        logits = bb(images, full_ids, full_mask, references=refs).logits
    assert torch.equal(no_placeholder(None, logits[:, -2]).argmax(-1), batched[:, -1])


def test_lora_and_freezing_leave_the_reference_encoder_as_on_the_other_backbones(family_dir):
    family, folder = family_dir
    bb = FAMILIES[family](
        name_or_path=folder, freeze_lm=True,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        references=ReferenceEncoder(
            tokens=K, modalities=["crop", "audio"], audio=WhisperAudioEncoder(config=dict(AUDIO), freeze=True)
        ),
    )
    names = [n for n, _ in bb.named_parameters()]
    assert not any("lora_" in n for n in names if n.startswith("references."))
    assert all(p.requires_grad for p in bb.references.audio_projector.parameters())
    assert not any(p.requires_grad for p in bb.references.audio.parameters())  # the tower's own policy
    visual = bb._lm().model.visual
    assert not any(p.requires_grad for n, p in visual.named_parameters() if not n.startswith("merger."))
    assert all(p.requires_grad for p in visual.merger.parameters())  # freeze_projector=False
    ids, mask = _rows(bb.tokenizer, _prompts())
    out = bb(torch.randn(2, 3, 64, 64), ids, mask, labels=ids, references=_references())
    out.loss.backward()
    assert bb.references.audio_projector[0].weight.grad.abs().sum() > 0
    # the new reference rows of the frozen embedding train (row mask), the old ones do not
    grad = bb._lm().get_input_embeddings().weight.grad
    new = [bb.tokenizer.convert_tokens_to_ids(t) for t in bb.references.special_tokens]
    assert grad[new].abs().sum() > 0
    old = torch.ones(grad.shape[0], dtype=torch.bool)
    old[new] = False
    assert grad[old].abs().sum() == 0


def test_a_backbone_file_round_trips_with_and_without_references(family_dir, tmp_path):
    family, folder = family_dir
    cls = FAMILIES[family]
    torch.manual_seed(0)
    plain = cls(name_or_path=folder)
    plain.add_special_tokens(["[SEG]"])
    plain.save_backbone(tmp_path / "stage0.pt")
    saved = plain.plain_state_dict()
    grown = cls(name_or_path=folder, references=_encoder(), checkpoint=str(tmp_path / "stage0.pt"))
    own = grown.plain_state_dict()
    key = "model.model.language_model.embed_tokens.weight"
    rows = saved[key].shape[0]
    for name, value in saved.items():
        if value.shape == own[name].shape:
            assert torch.equal(own[name], value), name
        else:  # the embedding and head grew by the reference tokens, after the file's rows
            assert torch.equal(own[name][:rows], value), name
    assert own[key].shape[0] == rows + len(grown.references.special_tokens)
    assert grown.tokenizer.convert_tokens_to_ids("[SEG]") == plain.tokenizer.convert_tokens_to_ids("[SEG]")
    assert any(k.startswith("references.") for k in own)
    # a file saved with the references loads back (encoder weights and token rows included)
    with torch.no_grad():
        for p in grown.references.parameters():
            p.add_(0.01)
    grown.save_backbone(tmp_path / "with_refs.pt")
    again = cls(name_or_path=folder, references=_encoder(), checkpoint=str(tmp_path / "with_refs.pt")).eval()
    grown.eval()
    ids, mask = _rows(grown.tokenizer, _prompts())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = grown(images, ids, mask, references=_references()).logits
        got = again(images, ids, mask, references=_references()).logits
    assert torch.allclose(got, expected, atol=1e-5)

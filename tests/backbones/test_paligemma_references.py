"""References on the native PaliGemma backbone: crop and audio references fill their spans with
k tokens each, sit inside the bidirectional prefix (they are part of the prompt), change the
output of their row only, and a left-padded batch decodes each row as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.backbones import PaliGemmaBackbone, ReferenceEncoder, WhisperAudioEncoder
from vlzoo.backbones.references import crop_reference_tokens
from vlzoo.structures import REFERENCE_TOKENS, AudioClip, References, reference_text

from .paligemma_tiny import SIDE, make_paligemma_folder

K = 4
AUDIO = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
         "max_source_positions": 100}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = make_paligemma_folder(tmp_path_factory.mktemp("paligemma"))
    torch.manual_seed(0)
    refs = ReferenceEncoder(tokens=K, modalities=["crop", "audio"], audio=WhisperAudioEncoder(config=dict(AUDIO)))
    return PaliGemmaBackbone(name_or_path=folder, references=refs).eval()


def _clip(freq: float, seconds: float = 0.8) -> AudioClip:
    t = np.arange(int(16000 * seconds)) / 16000
    return AudioClip(torch.from_numpy(0.3 * np.sin(2 * np.pi * freq * t)).float(), 16000)


PROMPTS = [f"find {reference_text('audio', K)} and {reference_text('crop', K)}",
           f"where is the red {reference_text('crop', K)} and {reference_text('crop', K)} ?"]


def _rows(tok, prompts: list[str]):
    rows = [tok("<image><bos>" + p + "\n", add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _references() -> References:
    s = float(SIDE)
    return References(
        prompt_boxes=[torch.tensor([[0.1, 0.2, 0.6, 0.5]]) * s, torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.3, 0.3, 1.0, 0.9]]) * s],
        audio=[_clip(300), None],
    )


def test_references_fill_their_spans_inside_the_prefix(backbone):
    bb = backbone
    ids, mask = _rows(bb.tokenizer, PROMPTS)
    refs = _references()
    images = torch.randn(2, 3, SIDE, SIDE)
    vocab = bb.tokenizer.get_vocab()
    audio_id, crop_id = (vocab[REFERENCE_TOKENS[m]] for m in ("audio", "crop"))
    assert (ids == audio_id).sum(1).tolist() == [K, 0] and (ids == crop_id).sum(1).tolist() == [K, 2 * K]
    with torch.no_grad():
        text = bb.embed_tokens(ids)
        out = bb.embed_references(text, ids, refs, images)
        crops = crop_reference_tokens(bb.encode_images, images[[0, 1, 1]], torch.cat(refs.prompt_boxes), tokens=K,
                                      grid=bb.feature_grid)
        assert torch.allclose(out[0][ids[0] == audio_id], bb.references.audio_tokens([refs.audio[0]])[0], atol=1e-6)
        assert torch.allclose(out[1][ids[1] == crop_id], crops[1:].reshape(-1, crops.shape[-1]), atol=1e-6)
        _, tokens = bb.encode_images(images)
        sp = bb.splice(out, ids, mask, tokens)
    prefix = bb.bidirectional_prefix(ids, sp)
    placeholder = (ids == audio_id) | (ids == crop_id)
    for row in range(2):
        assert bool(prefix[row, sp.positions[row][placeholder[row]]].all())


def test_a_reference_changes_its_row_and_decoding_is_padding_invariant(backbone):
    bb = backbone
    ids, mask = _rows(bb.tokenizer, PROMPTS)
    torch.manual_seed(1)
    images = torch.randn(2, 3, SIDE, SIDE)
    refs = _references()
    with torch.no_grad():
        base = bb(images, ids, mask, references=refs).logits
        heard = bb(images, ids, mask, references=References(refs.prompt_boxes, [_clip(1200, 1.5), None])).logits
    assert (heard[0, -1] - base[0, -1]).abs().max() > 1e-4 and torch.equal(heard[1], base[1])

    def no_placeholder(_ids, scores):
        scores[:, bb.image_token_id] = float("-inf")
        return scores

    kw = {"max_new_tokens": 5, "eos_token_id": [], "logits_processor": no_placeholder}
    batched = bb.generate(images, ids, mask, references=refs, **kw)
    assert torch.equal(batched, bb.generate(images, ids, mask, references=refs, use_cache=False, **kw))
    for row in range(2):
        alone_ids, alone_mask = _rows(bb.tokenizer, [PROMPTS[row]])
        alone = bb.generate(images[row:row + 1], alone_ids, alone_mask,
                            references=References([refs.prompt_boxes[row]], [refs.audio[row]]), **kw)
        assert torch.equal(alone[0], batched[row]), row

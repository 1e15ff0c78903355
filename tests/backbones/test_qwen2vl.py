"""Qwen2-VL / Qwen2.5-VL backbones: tiny native folders (save_pretrained) loaded back through the
real path; splicing, M-RoPE and generation against the native transformers model; the frame."""

from __future__ import annotations

import pytest
import torch

from vlzoo.backbones import Qwen2VLBackbone, Qwen25VLBackbone
from vlzoo.backbones.qwen2vl import VariableGridError

from .qwen_tiny import make_qwen_folder

FAMILIES = {"qwen2_vl": Qwen2VLBackbone, "qwen2_5_vl": Qwen25VLBackbone}
NATIVE = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    return request.param, make_qwen_folder(tmp_path_factory.mktemp(request.param), request.param)


def _rows(tok, texts: list[str], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``<|vision_start|> <image> <|vision_end|> words`` rows, padded right (or left)."""
    rows = [tok.convert_tokens_to_ids(["<|vision_start|>", "<image>", "<|vision_end|>"] + [f"▁{w}" for w in t.split()])
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def _native(family: str, folder: str):
    import transformers

    return getattr(transformers, NATIVE[family]).from_pretrained(folder).eval()


def test_splice_and_m_rope_match_the_native_model(family_dir):
    """One <image> placeholder becomes (H/8) x (W/8) merged tokens exactly where the processor puts
    as many <|image_pad|> tokens; logits equal the native model's on those inputs (non-square
    images, right-padded rows of different lengths)."""
    family, folder = family_dir
    bb = FAMILIES[family](name_or_path=folder).eval()
    assert (bb.patch_size, bb.merge_size, bb.factor, bb.min_pixels, bb.max_pixels) == (4, 2, 8, 64, 128 * 128)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 80)  # grid 6 x 10 patches -> 3 x 5 merged tokens
    ids, mask = _rows(bb.tokenizer, ["the red circle", "a blue square is left of the green triangle"])
    out = bb(images, ids, mask)
    assert out.image_features.shape == (2, 32, 6, 10) and out.image_tokens.shape == (2, 60, 32)
    native_in = bb.native_inputs(images, ids, mask)
    pads = native_in["input_ids"] == bb.image_pad_id
    assert pads.sum(1).tolist() == [60, 60]  # (48 / 8) * (80 / 8): the grid after the 2 x 2 merge
    assert [row.nonzero().flatten().tolist() for row in pads] == out.image_positions.tolist()
    assert native_in["image_grid_thw"].tolist() == [[1, 12, 20]] * 2
    with torch.no_grad():
        ref = _native(family, folder)(**native_in)
    keep = out.attention_mask.bool()
    assert torch.allclose(out.logits[keep], ref.logits[keep], atol=1e-4)


def test_patchify_is_the_image_processors(family_dir):
    """The rows the vision tower reads equal the saved image processor's own output for the same
    image (already at its smart_resize size, so the processor does not resample it)."""
    from transformers import AutoImageProcessor

    family, folder = family_dir
    bb = FAMILIES[family](name_or_path=folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    image = torch.randint(0, 256, (3, 40, 64), dtype=torch.uint8)
    x, geo = bb.transform.image(image)
    assert geo.input_size == (40, 64)
    pixel_values, grid = bb.patchify(x[None])
    ref = processor(images=[image], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == grid.tolist() == [[1, 10, 16]]
    assert torch.allclose(pixel_values, ref["pixel_values"], atol=1e-5)


def test_generation_is_padding_invariant_and_matches_native_generate(family_dir):
    """A left-padded batch of prompts of different lengths decodes each row as alone, and alone is
    the native generate's greedy answer (M-RoPE continued by one per token)."""
    family, folder = family_dir
    bb = FAMILIES[family](name_or_path=folder).eval()
    native = _native(family, folder)
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    prompts = ["a", "the blue square is in the left half", "what colour is the circle"]
    ids, mask = _rows(bb.tokenizer, prompts, left=True)
    batched = bb.generate(images, ids, mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(batched, bb.generate(images, ids, mask, max_new_tokens=5, eos_token_id=[], use_cache=False))
    for i, prompt in enumerate(prompts):
        one, one_mask = _rows(bb.tokenizer, [prompt])
        alone = bb.generate(images[i : i + 1], one, one_mask, max_new_tokens=5, eos_token_id=[])[0]
        assert torch.equal(batched[i], alone)
        native_in = bb.native_inputs(images[i : i + 1], one, one_mask)
        with torch.no_grad():
            ref = native.generate(**native_in, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert alone.tolist() == ref[0, native_in["input_ids"].shape[1] :].tolist()


def test_sizes_frame_and_the_variable_grid_error(family_dir):
    family, folder = family_dir
    fixed = FAMILIES[family](name_or_path=folder, image_size=64)
    assert (fixed.hidden_size, fixed.vision_width, fixed.feature_grid, fixed.input_size) == (32, 32, (8, 8), 64)
    assert fixed.data_config["input_size"] == 64 and fixed.data_config["transform"] is fixed.transform
    free = FAMILIES[family](name_or_path=folder, min_pixels=32 * 32, max_pixels=64 * 64)
    for name in ("feature_grid", "input_size"):
        with pytest.raises(VariableGridError, match="set backbone.image_size"):
            getattr(free, name)
    assert free.data_config["input_size"] is None
    # the frame: each image its own smart_resize size, boxes mapped back through it
    geo = free.transform.geometry((300, 500))
    assert geo.input_size == (48, 80)
    box = torch.tensor([[50.0, 30.0, 400.0, 290.0]])
    assert torch.allclose(geo.boxes_to_original(geo.boxes_to_input(box)), box, atol=1e-4)
    with pytest.raises(ValueError, match="not in the smart_resize frame"):
        free.encode_images(torch.randn(1, 3, 30, 30))


def test_policies_lora_and_checkpoint_round_trip(family_dir, tmp_path):
    family, folder = family_dir
    cls = FAMILIES[family]
    bb = cls(name_or_path=folder, freeze_lm=True, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    new = bb.add_special_tokens(["<loc>"])["<loc>"]
    images = torch.randn(1, 3, 32, 32)
    ids, mask = _rows(bb.tokenizer, ["a red circle"])
    ids[0, 3] = new  # a word inside the row (the last token predicts nothing)
    bb(images, ids, mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in bb.named_parameters()}
    lora = [n for n in grads if "lora_" in n]
    assert lora and all("visual" not in n for n in lora) and all(grads[n] is not None for n in lora)
    assert all(g is None for n, g in grads.items() if "visual" in n and "merger" not in n)  # frozen tower
    assert all(g is not None for n, g in grads.items() if "merger" in n)  # the trainable projector
    emb = bb._lm().get_input_embeddings().weight
    assert emb.grad.abs().sum(-1).nonzero().flatten().tolist() == [new]
    bb.save_backbone(tmp_path / "qwen.pt")
    again = cls(name_or_path=folder, checkpoint=str(tmp_path / "qwen.pt")).eval()
    assert torch.allclose(again(images, ids, mask).logits, bb.eval()(images, ids, mask).logits, atol=1e-5)
    again.save_pretrained(tmp_path / "folder")
    third = cls(name_or_path=str(tmp_path / "folder")).eval()
    assert third.tokenizer.convert_tokens_to_ids("<loc>") == new and third.max_pixels == 128 * 128
    assert torch.allclose(third(images, ids, mask).logits, again(images, ids, mask).logits, atol=1e-5)


def test_the_wrong_family_is_refused(tmp_path):
    folder = make_qwen_folder(tmp_path, "qwen2_vl", layers=1)
    with pytest.raises(ValueError, match="needs a 'qwen2_5_vl' model"):
        Qwen25VLBackbone(name_or_path=folder)


class _Evil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.canary}",))


def test_a_pickled_checkpoint_runs_nothing(family_dir, tmp_path):
    import pickle

    family, folder = family_dir
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": _Evil(canary)}))
    with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
        FAMILIES[family](name_or_path=folder, checkpoint=str(evil))
    assert not canary.exists()

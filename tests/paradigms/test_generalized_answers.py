"""Every paradigm says "no object" and "several objects" in its own way on grec / gres, and
its parse path reads both back (issue 22 part 4).  Untrained tiny models are steered: the
generating paradigms through forced logits of the LM head, the dense ones through a forced
heatmap; the answer formats are checked on hand-written samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlzoo.build import build
from vlzoo.config import load_recipe
from vlzoo.evaluation import Evaluator
from vlzoo.paradigms.codecs import BinsCodec
from vlzoo.paradigms.pixel2emb import EmbeddingAnswerFormat
from vlzoo.paradigms.pixel2seq import Pixel2SeqAnswerFormat
from vlzoo.structures import Sample, Targets

ROOT = Path(__file__).resolve().parents[2]
SIZE = (32, 32)


def _sample(task: str, n: int) -> Sample:
    """A grec / gres sample with ``n`` referents (two squares side by side, then one below)."""
    corners = [(2, 2), (18, 4), (6, 20)][:n]
    boxes = torch.tensor([[x, y, x + 10, y + 10] for x, y in corners], dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros((n, *SIZE), dtype=torch.bool)
    for i, (x, y) in enumerate(corners):
        masks[i, y:y + 10, x:x + 10] = True
    t = Targets(boxes=boxes, labels=torch.zeros(n, dtype=torch.long), masks=masks if task == "gres" else None,
                expressions=["every red square"], image_size=SIZE)
    return Sample(torch.zeros(3, *SIZE, dtype=torch.uint8), task, "find every red square.", t)


# ---------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("task", ["grec", "gres"])
def test_pixel2seq_writes_none_and_every_referent_and_parses_them_back(task):
    fmt = Pixel2SeqAnswerFormat(codec=BinsCodec(bins=32), polygon_vertices=8)
    assert fmt.localization_answer(_sample(task, 0), SIZE) == "none"
    empty = fmt.parse(task, "none", SIZE)
    assert empty["boxes"].shape == (0, 4) and (task == "grec" or empty["masks"].shape == (0, *SIZE))
    sample = _sample(task, 3)
    text = fmt.localization_answer(sample, SIZE)
    parsed = fmt.parse(task, text, SIZE)
    # the shared answer order: raster order of the top-left corners
    expected = sample.targets.boxes[[0, 1, 2]]
    assert parsed["boxes"].shape == (3, 4)
    assert torch.allclose(parsed["boxes"], expected, atol=1.5)
    if task == "gres":
        assert parsed["masks"].shape == (3, *SIZE)
        inter = (parsed["masks"] & sample.targets.masks).sum((1, 2)).float()
        union = (parsed["masks"] | sample.targets.masks).sum((1, 2)).float()
        assert bool((inter / union > 0.6).all())


def test_pixel2emb_writes_no_trigger_for_none_and_one_per_referent():
    fmt = EmbeddingAnswerFormat(grounded=True)
    assert fmt.localization_answer(_sample("grec", 0), SIZE) == "none"
    several = fmt.localization_answer(_sample("gres", 3), SIZE)
    assert several.count("<trigger>") == 3 and several.startswith("every red square <trigger><loc>")
    with pytest.raises(ValueError, match="none_answer"):
        EmbeddingAnswerFormat(none_answer="<trigger>")


# ---------------------------------------------------------------------------------------------- models
def _built(name: str, overrides: list[str] = ()):
    recipe = load_recipe(ROOT / "recipes" / "shapes" / f"{name}.yaml", overrides=[
        "backbone.vision.img_size=32", "data.num_workers=0", "data.val.size=4", "data.val.image_size=32",
        "data.eval_batch_size=4", *overrides])
    torch.manual_seed(0)
    built = build(recipe, with_trainer=False, with_logger=False)
    loaders = built.datamodule.val_dataloader()
    batch = next(iter(loaders[0] if isinstance(loaders, (list, tuple)) else loaders))
    return built.model.eval(), batch


def _force_tokens(model, boost: list[int], suppress: list[int] = ()) -> None:
    head = model.backbone._lm().get_output_embeddings()

    def hook(module, args, out):
        out = out.clone()
        out[..., list(boost)] += 1e4
        if suppress:
            out[..., list(suppress)] -= 1e4
        return out

    head.register_forward_hook(hook)


def _scored(task: str, preds, targets) -> dict[str, float]:
    collection = Evaluator(tasks=[task]).collection(task)
    collection.update(preds, targets)
    return {k: float(v) for k, v in collection.compute().items()}


@pytest.mark.parametrize("task", ["grec", "gres"])
def test_pixel2seq_predicts_none_and_several(task):
    model, batch = _built(f"pixel2seq_{task}", ["paradigm.max_new_tokens=16"] + (
        ["paradigm.polygon_vertices=4"] if task == "gres" else []))
    tok = model.backbone.tokenizer
    # "none" as a word, its bare form and the lone space marker: every way the answer starts with it
    none_ids = [i for t, i in tok.get_vocab().items() if t.replace("\u2581", "") in ("none", "")]
    _force_tokens(model, none_ids)
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and p.text.strip() == "none" and len(p) == 0 for p in preds)
    if task == "gres":
        assert all(p.masks.shape == (0, *batch.input_size) for p in preds)
    empty_targets = [t.replace(boxes=torch.zeros((0, 4)), masks=None if t.masks is None else t.masks[:0])
                     for t in batch.targets]
    assert _scored(task, preds, empty_targets)["n_acc"] == 1.0

    # several: no "none" and no end of text; the grammar lets only coordinates through, and 16
    # new tokens are exactly 4 boxes (grec) / 2 four-vertex polygons (gres)
    model, batch = _built(f"pixel2seq_{task}", ["paradigm.max_new_tokens=16"] + (
        ["paradigm.polygon_vertices=4"] if task == "gres" else []))
    _force_tokens(model, [], suppress=none_ids + [tok.eos_token_id])
    with torch.no_grad():
        preds = model.predict(batch)
    expected = 4 if task == "grec" else 2
    assert all(p.parsed and len(p) == expected for p in preds), [p.text for p in preds]
    if task == "gres":
        assert all(p.masks.shape == (expected, *batch.input_size) for p in preds)


@pytest.mark.parametrize("task", ["grec", "gres"])
def test_pixel2emb_predicts_no_trigger_and_several_triggers(task):
    model, batch = _built(f"pixel2emb_{task}", ["paradigm.max_new_tokens=6"])
    tok = model.backbone.tokenizer
    _force_tokens(model, tok("none", add_special_tokens=False)["input_ids"], suppress=[model.trigger_id])
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and len(p) == 0 for p in preds), [p.text for p in preds]
    model, batch = _built(f"pixel2emb_{task}", ["paradigm.max_new_tokens=6"])
    _force_tokens(model, [model.trigger_id])
    with torch.no_grad():
        preds = model.predict(batch)
    # every trigger is followed by its forced <loc>: 6 steps, 3 objects
    assert all(p.parsed and len(p) == 3 and p.text.count("<trigger>") == 3 for p in preds), [p.text for p in preds]
    if task == "gres":
        assert all(p.masks.shape == (3, *batch.input_size) for p in preds)


def _peaks(grid: tuple[int, int], cells: list[tuple[int, int]]) -> torch.Tensor:
    logits = torch.full(grid, -12.0)
    for y, x in cells:
        logits[y, x] = 12.0
    return logits


@pytest.mark.parametrize("task", ["grec", "gres"])
def test_heatmap_answers_no_peak_and_several_peaks(task):
    model, batch = _built(f"heatmap_{task}")
    original = model.aligner.forward
    forced: dict[str, list[tuple[float, float]]] = {}

    def aligner(*args, **kwargs):
        out = original(*args, **kwargs)
        heat = out.heatmaps.clone()
        h, w = heat.shape[-2:]
        heat[:, 0] = _peaks((h, w), [(int(y * h), int(x * w)) for y, x in forced["centre"]]).to(heat)
        return type(out)(heatmaps=heat, box_size=out.box_size)

    model.aligner.forward = aligner
    forced["centre"] = []
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and len(p) == 0 for p in preds)
    if task == "gres":
        assert all(p.masks.shape == (0, *batch.input_size) for p in preds)
    forced["centre"] = [(0.1, 0.1), (0.1, 0.8), (0.8, 0.2)]  # three peaks, as fractions of the grid
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and len(p) == 3 for p in preds)
    if task == "gres":
        assert all(p.masks.shape == (3, *batch.input_size) for p in preds)


@pytest.mark.parametrize("task", ["grec", "gres"])
def test_lens_answers_an_empty_mask_and_several_masks(task):
    model, batch = _built(f"attention_keypoints_{task}")
    original = model._read
    forced: dict[str, torch.Tensor] = {}

    def read(b):
        reading = original(b)
        reading.heatmap = forced["heatmap"].to(reading.heatmap).expand_as(reading.heatmap).clone()
        return reading

    model._read = read
    grid = tuple(original(batch).heatmap.shape[-2:])
    forced["heatmap"] = _peaks(grid, [])
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and len(p) == 0 and p.masks.shape == (0, *batch.input_size) for p in preds)
    forced["heatmap"] = _peaks(grid, [(2, 2), (2, grid[1] - 3), (grid[0] - 3, 3)])
    with torch.no_grad():
        preds = model.predict(batch)
    assert all(p.parsed and len(p) == 3 and p.masks.shape[0] == 3 for p in preds)

"""Pixel2Seq: answers per task, the grammar constraint, polygons, soft coordinate loss, learning."""

from __future__ import annotations

import pytest
import torch

from vlzoo.data.datamodule import VLDataModule
from vlzoo.data.shapes import ShapesDataset
from vlzoo.data.tokenizer import shapes_tokenizer
from vlzoo.paradigms.codecs import CODECS, BinsCodec, Florence2Codec, make_codec
from vlzoo.paradigms.pixel2seq import (
    GrammarConstraint,
    Pixel2Seq,
    Pixel2SeqAnswerFormat,
    mask_to_polygon,
    polygon_to_mask,
)
from vlzoo.structures import Batch

TASKS = ("rec", "det", "pose", "res", "reg")
VIT = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


def _backbone(vit=VIT, llama=LLAMA):
    from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder

    torch.manual_seed(0)
    return MultimodalBackbone(
        vision=TimmVisionEncoder(**vit),
        language=CausalLM(config=dict(llama), tokenizer="shapes"),
        freeze_vision=False,
    )


def _batch(fmt, tokenizer, tasks, *, n=8, image_size=32, split="val", seed=0) -> Batch:
    dm = VLDataModule(
        tokenizer=tokenizer,
        answer_format=fmt,
        image_size=image_size,
        image_mean=(0.5,) * 3,
        image_std=(0.25,) * 3,
    )
    ds = ShapesDataset(split=split, size=n, image_size=image_size, tasks=list(tasks), seed=seed)
    return dm.collate()([ds[i] for i in range(n)])


def _tokenizer_for(codec):
    tok = shapes_tokenizer()
    tok.add_tokens(list(codec.special_tokens), special_tokens=True)
    return tok


@pytest.mark.parametrize("name", sorted(CODECS))
def test_answers_follow_grammar_and_parse_back(name):
    """Teacher forcing every reference answer through the constraint: each answer token is
    allowed, eos only at the end, and the answer parses back to its targets."""
    codec = make_codec(name, bins=32) if name == "bins" else make_codec(name)
    fmt = Pixel2SeqAnswerFormat(codec=codec)
    tok = _tokenizer_for(codec)
    batch = _batch(fmt, tok, TASKS, n=10, image_size=64)
    grammars = [fmt.grammar(t) for t in batch.tasks]
    plen = batch.prompt_ids.shape[1]
    assert {"rec", "det", "pose", "res", "reg"} <= set(batch.tasks)
    for i, task in enumerate(batch.tasks):
        answer = batch.labels[i][batch.labels[i] != -100].tolist()  # answer ids then eos
        assert answer[-1] == tok.eos_token_id
        ids = batch.prompt_ids[i : i + 1]
        proc = GrammarConstraint(tokenizer=tok, codec=codec, grammars=[grammars[i]], prompt_length=plen)
        for step, token in enumerate(answer):
            scores = proc(ids, torch.zeros(1, len(tok)))
            allowed = torch.isfinite(scores[0])
            if grammars[i] is not None:
                assert allowed[token], (
                    f"{name}/{task}: answer token {step} {tok.convert_ids_to_tokens(token)!r} blocked"
                )
                if step < len(answer) - 1 and task in ("rec", "res"):  # det/pose may stop after any object
                    assert not allowed[tok.eos_token_id], f"{name}/{task}: eos allowed mid-answer"
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
        if task == "reg":
            continue
        text = tok.decode(answer[:-1])
        fields = fmt.parse(task, text, batch.input_size, num_keypoints=5)
        target = batch.targets[i]
        tol = 64 / 32 + 0.6  # coarsest codec step (kosmos2 32 x 32 patches) and rounding
        if task == "rec":
            assert (fields["boxes"][0] - target.boxes[0]).abs().max() <= tol
        elif task == "det":
            assert fields["boxes"].shape == target.boxes.shape
        elif task == "pose":
            assert fields["keypoints"].shape == (len(target), 5, 3)
        elif task == "res":
            inter = (fields["masks"][0] & target.masks[0]).sum()
            union = (fields["masks"][0] | target.masks[0]).sum()
            assert inter / union > 0.5


def test_reg_prompt_holds_codec_box():
    fmt = Pixel2SeqAnswerFormat(codec=BinsCodec(bins=16))
    batch = _batch(fmt, _tokenizer_for(fmt.codec), ["reg"], n=2)
    assert all("<bin_" in p and "{box}" not in p for p in batch.prompts)
    assert batch.answers[0] == batch.targets[0].text


def test_det_answer_order_is_raster():
    codec = Florence2Codec()
    fmt = Pixel2SeqAnswerFormat(codec=codec)
    ds = ShapesDataset(
        split="train", size=40, image_size=64, tasks=["det"], num_objects=(4, 6), twin_prob=0.9
    )
    sample = next(s for s in (ds[i] for i in range(40)) if len(s.targets) >= 3)
    boxes = fmt.parse("det", fmt.localization_answer(sample, (64, 64)), (64, 64))["boxes"]
    keys = [(round(float(b[1]) * 1000 / 64), round(float(b[0]) * 1000 / 64)) for b in boxes]
    assert keys == sorted(keys) and len(boxes) == len(sample.targets)


def test_polygon_round_trip_on_shapes_masks():
    ds = ShapesDataset(split="val", size=12, image_size=64, tasks=["res"], seed=3)
    for i in range(12):
        mask = ds[i].targets.masks[0]
        poly = mask_to_polygon(mask, vertices=16)
        back = polygon_to_mask(poly, mask.shape)
        iou = (back & mask).sum() / (back | mask).sum()
        assert iou > 0.7, (i, float(iou))
    square = torch.zeros(10, 10, dtype=torch.bool)
    square[2:8, 3:7] = True
    assert torch.equal(
        polygon_to_mask(torch.tensor([[3.0, 2.0], [7.0, 2.0], [7.0, 8.0], [3.0, 8.0]]), (10, 10)), square
    )
    with pytest.raises(ValueError, match="empty"):
        mask_to_polygon(torch.zeros(4, 4, dtype=torch.bool))


def _even_odd_per_pixel(poly: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The even-odd rule tested at every pixel centre against every edge: (H, W, P) at once."""
    h, w = size
    ys = torch.arange(h, dtype=torch.float64)[:, None, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :, None] + 0.5
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = poly.roll(-1, 0)[:, 0], poly.roll(-1, 0)[:, 1]
    crosses = (y0 > ys) != (y1 > ys)
    denom = torch.where(y1 == y0, torch.full_like(y1, 1e-12), y1 - y0)
    inside = crosses & (xs < x0 + (ys - y0) * (x1 - x0) / denom)
    return (inside.sum(-1) % 2) == 1


def test_polygon_to_mask_is_the_even_odd_rule_at_pixel_centres():
    """The scan-line rasteriser gives the per-pixel rule bit for bit: random polygons (beyond the
    image too, self-intersecting), vertices on pixel edges and on pixel centres."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        n = int(torch.randint(3, 30, (1,), generator=g))
        if trial % 3 == 0:
            poly = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor(
                [w * 0.2, h * 0.2])
        elif trial % 3 == 1:
            poly = torch.randint(-3, max(h, w) + 3, (n, 2), generator=g).double()
        else:
            poly = torch.randint(0, 2 * max(h, w), (n, 2), generator=g).double() / 2
        assert torch.equal(polygon_to_mask(poly, (h, w)), _even_odd_per_pixel(poly, (h, w))), trial


def test_constrained_generation_always_parses_and_maps_to_original():
    """An untrained model, constrained, still answers every localization task in a parseable form."""
    backbone = _backbone()
    model = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16), max_new_tokens=80, max_objects=4)
    batch = _batch(model.answer_format, backbone.tokenizer, TASKS, n=10)
    model.eval()
    preds = model.predict(batch)
    assert len(preds) == len(batch)
    for p, task in zip(preds, batch.tasks, strict=True):
        if task == "reg":
            assert isinstance(p.text, str) and p.parsed
            continue
        assert p.parsed, (task, p.text)
        assert p.scores.shape[0] == p.boxes.shape[0]
        assert bool(((p.scores > 0) & (p.scores <= 1)).all())
        if task == "res":
            assert p.masks.shape == (1, 32, 32)
        if task == "pose" and len(p):
            assert p.keypoints.shape[1:] == (5, 3)
    # the same model unconstrained says something that does not parse: counted, not dropped
    free = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16), constrained=False, max_new_tokens=6)
    free.eval()
    loose = free.predict(batch)
    assert len(loose) == len(batch) and not all(p.parsed for p in loose if p.text is not None)


def test_soft_coordinate_loss_reduces_to_cross_entropy():
    backbone = _backbone()
    model = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16), coordinate_sigma=1e-3)
    head = backbone.language.model.get_output_embeddings().weight
    with torch.no_grad():  # new rows start equal (the mean), where any soft target gives the same loss
        rows = list(model.special_token_ids.values())
        head[rows] += torch.randn(len(rows), head.shape[1])
    batch = _batch(model.answer_format, backbone.tokenizer, ["rec", "det"], n=4)
    out = backbone(
        images=batch.images,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
    )
    assert torch.allclose(model.loss(batch)["lm"], out.loss, atol=1e-4)
    wide = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16), coordinate_sigma=2.0)
    assert float(wide.loss(batch)["lm"].detach()) != pytest.approx(float(out.loss.detach()), abs=1e-3)
    with pytest.raises(ValueError, match="plain text"):
        Pixel2Seq(backbone=backbone, codec=make_codec("shikra"), coordinate_sigma=1.0)
    with pytest.raises(ValueError, match="does not support"):
        Pixel2Seq(backbone=backbone, tasks=["seg"])


def test_loss_falls_on_shapes_rec():
    backbone = _backbone()
    model = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16))
    assert model.special_token_ids and all(
        t in backbone.tokenizer.get_vocab() for t in model.codec.special_tokens
    )
    ds = ShapesDataset(split="train", size=64, image_size=32, tasks=["rec"])
    dm = VLDataModule(
        train=ds,
        tokenizer=backbone.tokenizer,
        answer_format=model.answer_format,
        image_size=32,
        image_mean=(0.5,) * 3,
        image_std=(0.25,) * 3,
        batch_size=16,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _epoch in range(8):
        for batch in dm.train_dataloader():
            loss = model.loss(batch)["lm"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("task", ["rec", "det"])
def test_tiny_recipe_builds_and_runs_with_lightning(task, tmp_path):
    """The shipped tiny recipe, shrunk, trains a few steps and validates through the evaluator."""
    from vlzoo.build import build
    from vlzoo.config import load_recipe

    overrides = [
        "backbone.vision.img_size=32",
        "data.train.size=16",
        "data.train.image_size=32",
        "data.val.size=8",
        "data.val.image_size=32",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    recipe = load_recipe(f"recipes/shapes/pixel2seq_{task}.yaml", overrides=overrides)
    built = build(recipe, with_logger=False, output_dir=tmp_path)
    assert isinstance(built.model, Pixel2Seq)
    assert "<bin_31>" in built.backbone.tokenizer.get_vocab()
    built.trainer.fit(built.model, datamodule=built.datamodule)
    metrics = built.trainer.callback_metrics
    assert f"val/{task}/parse_fail_rate" in metrics
    assert float(metrics[f"val/{task}/parse_fail_rate"]) == 0.0  # the constraint guarantees parseable boxes


def _same_predictions(a, b, atol=1e-5):
    assert a.parsed == b.parsed and a.text == b.text, (a.text, b.text)
    assert a.boxes.shape == b.boxes.shape and torch.allclose(a.boxes, b.boxes, atol=atol)
    assert torch.allclose(a.scores, b.scores, atol=atol)
    for field in ("masks", "keypoints"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None) and (x is None or torch.allclose(x.float(), y.float(), atol=atol))


def test_generation_same_with_and_without_cache_and_batched_as_alone():
    """Constrained generation with the KV cache equals re-running the sequence every step, and a
    left-padded batch of four prompts of different lengths gives each prompt's answer alone."""
    backbone = _backbone()
    model = Pixel2Seq(backbone=backbone, codec=BinsCodec(bins=16), max_new_tokens=40, max_objects=2).eval()
    fmt, tok = model.answer_format, backbone.tokenizer
    samples = [
        ShapesDataset(split="val", size=4, image_size=32, tasks=[task], seed=1)[i]
        for i, task in enumerate(("rec", "det", "pose", "res"))
    ]
    dm = VLDataModule(tokenizer=tok, answer_format=fmt, image_size=32, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    batch = dm.collate()(samples)
    assert len(set(batch.prompt_attention_mask.sum(1).tolist())) == 4  # four prompt lengths
    with torch.no_grad():
        cached = model.predict(batch)
        model.use_cache = False
        full = model.predict(batch)
        model.use_cache = True
        alone = [model.predict(dm.collate()([s]))[0] for s in samples]
    assert all(p.parsed for p in cached)
    for a, b, c in zip(cached, full, alone, strict=True):
        _same_predictions(a, b)
        _same_predictions(a, c)

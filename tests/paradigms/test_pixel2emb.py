"""pixel2emb (NExT-Chat / LISA / AnyRef): answers, input embeddings, heads, losses, gradients,
refocusing, generation with <loc> insertion, and a loss that falls."""

from __future__ import annotations

import pytest
import torch

from support.pixel2emb import LLAMA, make_backbone, make_batch, make_paradigm, mask_decoder
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.decoders import BoxEncoder
from vlzoo.decoders.box import normalise_boxes
from vlzoo.paradigms.pixel2emb import EmbeddingAnswerFormat, Pixel2Emb, answer_order, refocus


def test_answer_format_writes_triggers_locs_and_references():
    ds = ShapesDataset(split="train", size=64, image_size=32, tasks=["det"], num_objects=(3, 5), twin_prob=0.9)
    sample = next(ds[i] for i in range(64) if len(ds[i].targets) >= 2)
    n = len(sample.targets)
    plain = EmbeddingAnswerFormat()
    assert plain.special_tokens == ("<trigger>", "<loc>")
    assert plain.format_answer(sample, (32, 32)) == " and ".join(["<trigger><loc>"] * n)
    grounded = EmbeddingAnswerFormat(grounded=True, separator=" , ")
    cat = sample.category_name
    assert grounded.format_answer(sample, (32, 32)) == " , ".join([f"{cat} <trigger><loc>"] * n)
    lisa = EmbeddingAnswerFormat(trigger="[SEG]", box_after_trigger=False, prefix="the mask is")
    assert lisa.special_tokens == ("[SEG]", "<loc>")
    reg = ShapesDataset(split="train", size=4, image_size=32, tasks=["reg"])[0]
    assert "<loc>" in plain.format_prompt(reg, (32, 32))
    crop = EmbeddingAnswerFormat(reference="crop", crop_tokens=4)
    assert "<ref_start><ref><ref><ref><ref><ref_end>" in crop.format_prompt(reg, (32, 32))
    with pytest.raises(ValueError, match="square"):
        EmbeddingAnswerFormat(crop_tokens=3)
    boxes = torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10], [20, 0, 30, 10]])
    assert answer_order(boxes) == [1, 2, 0]


def test_missing_heads_are_named():
    bb = make_backbone()
    with pytest.raises(ValueError, match="paradigm.box_decoder"):
        Pixel2Emb(backbone=bb, box_encoder=BoxEncoder(hidden_size=32), tasks=["rec"])
    with pytest.raises(ValueError, match="paradigm.mask_decoder"):
        make_paradigm(bb, tasks=["res"])
    with pytest.raises(ValueError, match="loss_weights"):
        p = make_paradigm(bb, loss_weights={"mask_dice": 1.0})
        p.weighted_total(p.loss(make_batch(p)))


def test_cycle_false_is_the_whole_switch():
    """The recipe's cycle weights (pixel2emb.yaml sets them) weight nothing once cycle is off:
    `paradigm.cycle=false` alone must train; a misspelt weight is still refused."""
    weights = {"box_l1": 2.0, "box_giou": 0.2, "cycle_embedding": 1.0, "cycle_box": 1.0}
    p = make_paradigm(cycle=False, loss_weights=weights)
    parts = p.loss(make_batch(p))
    assert set(parts) == {"lm", "box_l1", "box_giou"}
    assert torch.isfinite(p.weighted_total(parts))
    assert "cycle_box" not in p.loss_weights
    with pytest.raises(ValueError, match="cycle_bx"):
        q = make_paradigm(cycle=False, loss_weights={**weights, "cycle_bx": 1.0})
        q.weighted_total(q.loss(make_batch(q)))


@pytest.mark.parametrize("attention", [False, True])
def test_loss_parts_and_head_shapes(attention):
    p = make_paradigm(attention=attention, refocus_lambda=0.1)
    batch = make_batch(p)
    parts = p.loss(batch)
    assert set(parts) == {"lm", "box_l1", "box_giou", "cycle_embedding", "cycle_box"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    # NExT-Chat defaults unless the recipe overrides them
    assert p.loss_weights["box_l1"] == 2.0 and p.loss_weights["box_giou"] == 0.2
    out = p.backbone(batch.images, batch.input_ids, batch.attention_mask, output_attentions=[-1])
    rows, cols = (batch.input_ids == p.trigger_id).nonzero(as_tuple=True)
    keys = [torch.zeros(0, dtype=torch.long)] * len(rows)
    states, weights = p.trigger_states(out, rows, out.positions[rows, cols], keys)
    assert states.shape == (len(rows), 32)
    assert p.box_decoder(states).shape == (len(rows), 4)
    if attention:
        assert weights.shape == (len(rows), 16)


def test_box_losses_zero_when_decoder_outputs_the_targets():
    """Targets are matched to triggers in answer order, several triggers giving several objects."""
    p = make_paradigm(tasks=["rec", "det"], cycle=False)
    batch = make_batch(p, tasks=("det", "rec"), n=8)
    assert max(len(t) for t in batch.targets) >= 2
    wanted = torch.cat([p._target_boxes(batch, r) for r in range(len(batch))])

    class Oracle(torch.nn.Module):
        def forward(self, states):
            return wanted + states.sum() * 0

    p.box_decoder = Oracle()
    parts = p.loss(batch)
    assert parts["box_l1"].item() == 0.0 and abs(parts["box_giou"].item()) < 1e-5


def test_loc_embeddings_come_from_the_box_encoder():
    p = make_paradigm()
    batch = make_batch(p, tasks=("rec", "reg"), n=4)
    plan = p._embedding_plan(batch, batch.input_ids)
    locs = (batch.input_ids == p.loc_id).nonzero().tolist()
    assert sorted(plan) == sorted(map(tuple, locs)) and len(locs) >= 4
    embeds = p.backbone.embed_tokens(batch.input_ids)
    new = p._embeds_fn(plan)(embeds, batch.input_ids)
    for (r, c), box in plan.items():
        assert torch.allclose(new[r, c], p.box_encoder(box))
        if batch.tasks[r] == "rec":  # after the trigger: the ground-truth box (teacher forcing)
            assert torch.allclose(box, normalise_boxes(batch.targets[r].boxes[0], (32, 32)))
        else:  # REG: the query's prompt box (input pixels), the sample's original box mapped
            assert torch.allclose(batch.prompt_boxes[r], batch.transforms[r].boxes_to_input(batch.original_targets[r].boxes))
            assert torch.allclose(box, normalise_boxes(batch.prompt_boxes[r][0], (32, 32)))
    other = batch.input_ids != p.loc_id
    assert torch.equal(new[other], embeds[other])


def test_crop_references_fill_ref_tokens():
    from vlzoo.backbones import ReferenceEncoder

    with pytest.raises(ValueError, match="backbone.references"):
        make_paradigm(fmt=EmbeddingAnswerFormat(reference="crop", crop_tokens=4), tasks=["reg", "rec"])
    bb = make_backbone(references=ReferenceEncoder(tokens=4, modalities=["crop"]))
    p = make_paradigm(bb, fmt=EmbeddingAnswerFormat(reference="crop", crop_tokens=4), tasks=["reg", "rec"])
    batch = make_batch(p, tasks=("reg",), n=3)
    assert int((batch.input_ids == p.ref_id).sum()) == 12
    parts = p.loss(batch)
    parts["lm"].backward()
    assert p.backbone.projector[0].weight.grad is not None


def test_refocus_formula():
    hidden = torch.randn(6, 8)
    attention = torch.rand(2, 6, 6)
    keys = torch.tensor([1, 3])
    a = attention[:, 5, keys].mean(0)
    a = a / a.sum()
    expected = hidden[5] + 0.1 * (a[0] * hidden[1] + a[1] * hidden[3])
    assert torch.allclose(refocus(hidden, attention, query=5, keys=keys, strength=0.1), expected)
    assert torch.equal(refocus(hidden, attention, query=5, keys=keys[:0], strength=0.1), hidden[5])


def test_refocusing_reads_the_last_layer_attention_from_trigger_to_answer_tokens():
    p = make_paradigm(fmt=EmbeddingAnswerFormat(grounded=True), refocus_lambda=0.1, tasks=["rec"])
    batch = make_batch(p, tasks=("rec",), n=2)
    out = p.backbone(batch.images, batch.input_ids, batch.attention_mask, output_attentions=[-1])
    last = max(out.attentions)
    assert last == LLAMA["num_hidden_layers"] - 1
    rows, cols = (batch.input_ids == p.trigger_id).nonzero(as_tuple=True)
    special = (batch.input_ids == p.trigger_id) | (batch.input_ids == p.loc_id)
    keys = p._answer_keys(out, batch.labels, special, rows, cols)
    for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        answer = [i for i in range(c) if batch.labels[r, i] != -100]
        assert len(answer) >= 2  # the grounded answer echoes the expression before the trigger
        assert keys[k].tolist() == out.positions[r, answer].tolist()
    states, _ = p.trigger_states(out, rows, out.positions[rows, cols], keys)
    for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        q = int(out.positions[r, c])
        att = out.attentions[last][r, :, q, keys[k]].mean(0)
        att = att / att.sum()
        expected = out.hidden_states[r, q] + 0.1 * (att[:, None] * out.hidden_states[r, keys[k]]).sum(0)
        assert torch.allclose(states[k], expected, atol=1e-5)


def test_gradients_reach_exactly_the_trained_parts():
    bb = make_backbone(freeze_vision=True, freeze_projector=True, freeze_lm=True)
    p = make_paradigm(bb, attention=True)
    batch = make_batch(p)
    p.weighted_total(p.loss(batch)).backward()
    for name, param in p.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    emb = bb._lm().get_input_embeddings().weight
    rows = emb.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert set(rows) <= {p.trigger_id, p.loc_id}  # only the new tokens' rows train
    for head in p.head_modules():
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in head.parameters())
    groups = p.param_groups()
    assert sum(len(g["params"]) for g in groups) == sum(1 for q in p.parameters() if q.requires_grad)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_decodes_each_trigger_and_feeds_its_box_back(use_cache):
    """A trigger emitted during generation is decoded at once and followed by <loc> carrying
    BoxEncoder(decoded box), as NExT-Chat generates; two triggers give two boxes.  The LM head is
    scripted; what the LM is fed is recorded at the decoder (one position per step with the cache)."""
    p = make_paradigm(tasks=["rec", "det"], use_cache=use_cache)
    p.eval()
    batch = make_batch(p, tasks=("rec",), n=2)
    bb = p.backbone
    eos = bb.tokenizer.eos_token_id
    head = bb._lm().get_output_embeddings()
    original_head, original_decode, original_generate = head.forward, bb._decode, bb.decode
    calls, fed, generated_ids = [], [], []

    def scripted_head(hidden):
        generated = len(calls)
        calls.append(generated)
        logits = torch.full((*hidden.shape[:-1], original_head(hidden).shape[-1]), -1e4)
        logits[..., p.trigger_id if generated in (0, 2) else (bb.tokenizer.convert_tokens_to_ids("▁and") if generated == 4 else eos)] = 0
        if generated == 1:
            logits[..., p.trigger_id] = 0  # must be overridden: a trigger is always followed by <loc>
        return logits

    def recording_decode(embeds, mask, positions, **kwargs):
        fed.append(embeds)
        return original_decode(embeds, mask, positions, **kwargs)

    def recording_generate(*args, **kwargs):
        generated_ids.append(original_generate(*args, **kwargs))
        return generated_ids[-1]

    head.forward, bb._decode, bb.decode = scripted_head, recording_decode, recording_generate
    preds = p.predict(batch)
    embeds = torch.cat(fed, 1) if use_cache else fed[-1]
    assert all(e.shape[1] == 1 for e in fed[1:]) == use_cache  # the cache feeds one position per step
    prompt = fed[0].shape[1]
    assert generated_ids[0][0].tolist()[:4] == [p.trigger_id, p.loc_id, p.trigger_id, p.loc_id]
    for pred, row in zip(preds, range(2), strict=True):
        assert len(pred) == 2 and pred.parsed and pred.boxes.shape == (2, 4)
        # the embedding fed at each <loc> is the box encoder of the box decoded at its trigger
        for k, col in enumerate([prompt + 1, prompt + 3]):
            box = normalise_boxes(pred.boxes[k], (32, 32))
            assert torch.allclose(embeds[row, col], p.box_encoder(box), atol=1e-4)


def _trained_grounded_paradigm(task="rec", **kwargs):
    """A grounded NExT-Chat model after a few steps, so generation says text, then triggers."""
    bb = make_backbone()
    if task == "res":
        kwargs["mask_decoder"] = mask_decoder(bb)
    p = make_paradigm(bb, fmt=EmbeddingAnswerFormat(grounded=True), tasks=[task], max_new_tokens=12, **kwargs)
    batch = make_batch(p, tasks=(task,), n=8)
    opt = torch.optim.AdamW(p.param_groups(), lr=1e-2)
    for _ in range(25):
        loss = p.weighted_total(p.loss(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return p.eval()


def _same_answers(a, b, atol=1e-5):
    assert a.text == b.text
    assert a.boxes.shape == b.boxes.shape and torch.allclose(a.boxes, b.boxes, atol=atol), (a.boxes, b.boxes)
    assert torch.allclose(a.scores, b.scores, atol=atol)
    if a.masks is not None or b.masks is not None:
        assert torch.equal(a.masks, b.masks)


@pytest.mark.parametrize(
    "options",
    [{}, {"attention": True, "refocus_lambda": 0.1}, {"task": "res"}],
    ids=["plain", "refocus+attention", "masks"],
)
def test_generation_same_with_and_without_cache_and_batched_as_alone(options):
    """The KV-cached NExT-Chat loop gives the tokens, boxes and masks of re-running the whole
    sequence every step, and a left-padded batch of prompts of different lengths gives each
    prompt's answer alone."""
    p = _trained_grounded_paradigm(**options)
    task = options.get("task", "rec")
    batch = make_batch(p, tasks=(task,), n=4, index=8)
    assert len(set(batch.prompt_attention_mask.sum(1).tolist())) > 1  # prompts of different lengths
    cached = p.predict(batch)
    p.use_cache = False
    full = p.predict(batch)
    p.use_cache = True
    assert sum(len(pred) for pred in cached) >= 2  # triggers were generated and decoded
    if task == "res":
        assert all(pred.masks is not None and len(pred.masks) == len(pred) for pred in cached)
    assert any(pred.text.split("<trigger>")[0].strip() for pred in cached)  # text before a trigger
    for a, b in zip(cached, full, strict=True):
        _same_answers(a, b)
    for i in range(4):
        alone = p.predict(make_batch(p, tasks=(task,), n=1, index=8 + i))[0]
        _same_answers(cached[i], alone)
    # the boxes are those a forward pass over prompt + answer gives (the answer's <loc> carrying
    # the fed-back boxes), read at each trigger with the keys of the tokens before it
    bb, generated = p.backbone, []
    original = bb.decode
    bb.decode = lambda *a, **k: generated.append(original(*a, **k)) or generated[-1]
    preds = p.predict(batch)
    del bb.decode
    new_ids = generated[0]
    ids = torch.cat([batch.prompt_ids, new_ids], 1)
    pad, eos, start = bb.tokenizer.pad_token_id, bb.tokenizer.eos_token_id, batch.prompt_ids.shape[1]
    mask = torch.cat([batch.prompt_attention_mask, (new_ids != pad).long()], 1)
    plan = {}
    for r in range(len(batch)):
        locs = [c for c in range(start, ids.shape[1]) if int(ids[r, c]) == p.loc_id]
        for k, c in enumerate(locs):
            plan[(r, c)] = normalise_boxes(preds[r].boxes[k], batch.input_size)
    with torch.no_grad():
        out = bb(batch.images, ids, mask, output_attentions=[-1], inputs_embeds_fn=p._embeds_fn(plan))
        rows, cols = (ids[:, start:] == p.trigger_id).nonzero(as_tuple=True)
        cols = cols + start
        keys = []
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            before = [i for i in range(start, c) if int(ids[r, i]) not in (p.trigger_id, p.loc_id, pad, eos)]
            keys.append(out.positions[r, before])
        states, _ = p.trigger_states(out, rows, out.positions[rows, cols], keys)
        expected = p.box_decoder(states)
    got = torch.cat([normalise_boxes(pred.boxes, batch.input_size) for pred in preds])
    assert len(rows) == len(got) and torch.allclose(got, expected, atol=1e-5)


def test_loss_falls():
    p = make_paradigm(attention=True, tasks=["rec"], head_lr=3e-3)
    batch = make_batch(p, tasks=("rec",), n=8)
    opt = torch.optim.AdamW(p.param_groups(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = p.weighted_total(p.loss(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_masks_through_prompt_mlp_and_sam_decoder_with_box_prompt():
    bb = make_backbone()
    p = make_paradigm(bb, tasks=["rec", "res"], mask_decoder=mask_decoder(bb), mask_loss="focal")
    assert p.prompt_mlp.prompt_dim == 32 and p.box_prompt
    batch = make_batch(p, tasks=("res", "rec"), n=4)
    parts = p.loss(batch)
    assert {"mask_focal", "mask_dice", "mask_iou", "box_l1"} <= set(parts)
    assert p.loss_weights["mask_focal"] == 2.0 and p.loss_weights["mask_dice"] == 0.5
    p.weighted_total(parts).backward()
    for head in (p.prompt_mlp, p.mask_head.decoder.mask_decoder, p.mask_head.neck):
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in head.parameters())
    out = p.backbone(batch.images, batch.input_ids, batch.attention_mask)
    rows, cols = (batch.input_ids == p.trigger_id).nonzero(as_tuple=True)
    states, _ = p.trigger_states(out, rows, out.positions[rows, cols], [])
    logits, iou = p.decode_masks(out, rows, states, p.box_decoder(states))
    assert logits.shape == (len(rows), 32, 32) and iou.shape == (len(rows),)


def test_lisa_seg_token_variant():
    """[SEG] hidden state -> 256-d-style prompt -> SAM decoder; CE + 2.0 BCE + 0.5 Dice."""
    bb = make_backbone()
    fmt = EmbeddingAnswerFormat(trigger="[SEG]", box_after_trigger=False, prefix="the mask is")
    p = Pixel2Emb(backbone=bb, answer_format=fmt, mask_decoder=mask_decoder(bb), tasks=["res"])
    assert p.box_decoder is None and not p.box_prompt
    batch = make_batch(p, tasks=("res",), n=3)
    assert all(a.endswith("[SEG]") and a.startswith("the mask is") for a in batch.answers)
    parts = p.loss(batch)
    assert set(parts) == {"lm", "mask_bce", "mask_dice", "mask_iou"}
    assert (p.loss_weights["mask_bce"], p.loss_weights["mask_dice"]) == (2.0, 0.5)
    p.eval()
    preds = p.predict(batch)
    assert all(pr.masks is not None and pr.masks.shape[-2:] == (32, 32) for pr in preds)

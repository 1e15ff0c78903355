"""pixel2emb's optional trigger-attention supervision (issue 18 item 6): the target
distribution on the feature grid, the KL loss against a direct computation, gradients into the
attention it names, prediction unchanged, and the construction errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from support.pixel2emb import make_backbone, make_batch, make_paradigm, mask_decoder
from vlzoo.decoders.box import normalise_boxes


def _box_share(box, h, w):
    """Per cell of an h x w grid over [0, 1]^2, the area of the cell the box covers, by brute
    force on a fine raster (independent of the paradigm's interval arithmetic)."""
    n = 400
    c = (torch.arange(n) + 0.5) / n
    inside = ((c[None, :] >= box[0]) & (c[None, :] <= box[2])) & ((c[:, None] >= box[1]) & (c[:, None] <= box[3]))
    return F.adaptive_avg_pool2d(inside.float()[None, None], (h, w))[0, 0].flatten()


def test_targets_are_the_box_share_for_rec_and_the_pooled_mask_for_res():
    bb = make_backbone()
    p = make_paradigm(bb, tasks=["rec", "res"], mask_decoder=mask_decoder(bb), attention=True, attention_target="cross")
    h, w = bb.feature_grid
    batch = make_batch(p, tasks=("rec", "res"), n=6)
    rows, _ = (batch.input_ids == p.trigger_id).nonzero(as_tuple=True)
    targets = [p._target_boxes(batch, r) for r in range(len(batch))]
    q = p.attention_targets(batch, rows, targets)
    assert q.shape == (len(rows), h * w)
    assert torch.allclose(q.sum(-1), torch.ones(len(rows)), atol=1e-6)
    for k, r in enumerate(rows.tolist()):
        t = batch.targets[r]
        if batch.tasks[r] == "res":
            expected = F.adaptive_avg_pool2d(t.masks[[0]].float()[:, None], (h, w)).flatten()
        else:
            expected = _box_share(normalise_boxes(t.boxes[:1], batch.input_size)[0].tolist(), h, w)
        assert torch.allclose(q[k], expected / expected.sum(), atol=2e-2), batch.tasks[r]
    assert {batch.tasks[r] for r in rows.tolist()} == {"rec", "res"}


@pytest.mark.parametrize("source", ["cross", "lmm"])
def test_the_loss_is_kl_from_the_target_to_the_named_attention(source):
    p = make_paradigm(tasks=["rec"], attention=True, attention_target=source)
    assert "attention" in p.loss_weights
    batch = make_batch(p, tasks=("rec",), n=4)
    parts = p.loss(batch)
    out = p.backbone(batch.images, batch.input_ids, batch.attention_mask, output_attentions=[-1])
    rows, cols = (batch.input_ids == p.trigger_id).nonzero(as_tuple=True)
    positions = out.positions[rows, cols]
    states, weights = p.trigger_states(out, rows, positions, [])
    if source == "cross":
        attention = weights
    else:
        last = out.attentions[max(out.attentions)]
        attention = torch.stack([last[r, :, q][:, out.image_positions[r]].mean(0)
                                 for r, q in zip(rows.tolist(), positions.tolist(), strict=True)])
        attention = attention / attention.sum(-1, keepdim=True)
    q = p.attention_targets(batch, rows, [p._target_boxes(batch, r) for r in range(len(batch))])
    expected = sum(float((qi[qi > 0] * (qi[qi > 0].log() - ai[qi > 0].log())).sum()) for qi, ai in zip(q, attention.detach(), strict=True))
    assert parts["attention"].item() == pytest.approx(expected / len(rows), rel=1e-4)


def test_gradients_reach_the_supervised_attention_and_prediction_is_unchanged():
    bb = make_backbone()
    p = make_paradigm(bb, tasks=["rec"], attention=True, attention_target="lmm")
    batch = make_batch(p, tasks=("rec",), n=4)
    parts = p.loss(batch)
    parts["attention"].backward()
    # the LMM's attention is what the loss names: its query / key projections get the gradient
    q_proj = [m for n, m in bb.language.named_modules() if n.endswith("self_attn.q_proj")][-1]
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    plain = make_paradigm(make_backbone(), tasks=["rec"], attention=True)
    plain.load_state_dict(p.state_dict())
    p.eval()
    plain.eval()
    a, b = p.predict(batch), plain.predict(batch)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.boxes, y.boxes)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="attention_target must be null, 'cross' or 'lmm'"):
        make_paradigm(tasks=["rec"], attention=True, attention_target="mask")
    with pytest.raises(ValueError, match="paradigm.image_attention is not set"):
        make_paradigm(tasks=["rec"], attention_target="cross")

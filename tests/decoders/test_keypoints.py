"""Attention-map reading, refinement head, point descriptors and targets of the LENS decoders."""

from __future__ import annotations

import pytest
import torch

from vlzoo.decoders.keypoints import (
    AttentionRefinementHead,
    PointDescriptor,
    QueryPooling,
    box_projection_loss,
    extract_keypoints,
    interior_point,
    text_to_image_attention,
)


def _attention(b: int, heads: int, t: int) -> torch.Tensor:
    return torch.rand(b, heads, t, t).softmax(dim=-1)


def test_text_to_image_attention_picks_query_rows_and_image_columns():
    b, heads, h, w = 2, 3, 2, 3
    n = h * w
    t = 1 + n + 4
    image_pos = torch.arange(1, 1 + n)
    att = torch.zeros(b, heads, t, t)
    # query row 8 of sample 0, head 1 attends the image token of grid cell (1, 2) only
    att[0, 1, 8, 1 + (1 * w + 2)] = 1.0
    # a non-query row attends elsewhere: must be ignored
    att[0, 1, 9, 1 + 0] = 1.0
    att[1, 2, 7, 1 + 3] = 1.0
    weights = torch.zeros(b, t)
    weights[0, 8] = 1.0
    weights[1, 7] = 1.0
    maps = text_to_image_attention([att, att * 0.5], weights, image_pos, (h, w), normalize=False)
    assert maps.shape == (b, 2 * heads, h, w)
    assert maps[0, 1, 1, 2] == 1.0 and maps[0].sum() == 1.5  # layer 0 head 1, layer 1 head 1
    assert maps[0, heads + 1, 1, 2] == 0.5
    assert maps[1, 2, 1, 0] == 1.0  # token 3 of a 2x3 grid is (1, 0)


def test_text_to_image_attention_per_sample_positions_and_heads():
    # left padding moves the image tokens of sample 1 by two positions
    b, heads, h, w, t = 2, 4, 2, 2, 10
    att = _attention(b, heads, t)
    pos = torch.stack([torch.arange(1, 5), torch.arange(3, 7)])
    weights = torch.zeros(b, t)
    weights[:, -1] = 1.0
    maps = text_to_image_attention([att], weights, pos, (h, w), heads=[3, 0], normalize=False)
    assert maps.shape == (b, 2, h, w)
    assert torch.allclose(maps[1, 0].flatten(), att[1, 3, -1, 3:7])
    assert torch.allclose(maps[0, 1].flatten(), att[0, 0, -1, 1:5])
    normed = text_to_image_attention([att], weights, pos, (h, w))
    assert torch.allclose(normed.sum(dim=(-1, -2)), torch.full((b, heads), float(h * w)))


def test_text_to_image_attention_rejects_bad_shapes():
    att = _attention(1, 2, 6)
    with pytest.raises(ValueError, match="do not fill"):
        text_to_image_attention([att], torch.ones(1, 6), torch.arange(1, 4), (2, 2))
    with pytest.raises(ValueError, match="expected"):
        text_to_image_attention([att], torch.ones(1, 7), torch.arange(1, 5), (2, 2))
    with pytest.raises(ValueError, match="at least one layer"):
        text_to_image_attention([], torch.ones(1, 6), torch.arange(1, 5), (2, 2))


def test_query_pooling_weights_live_on_query_positions():
    pool = QueryPooling(hidden_size=8)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    weights, pooled = pool(hidden, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert (weights[~mask] == 0).all()
    assert torch.allclose(weights[0, 2:4], torch.full((2,), 0.5))  # starts as the plain mean
    assert pooled.shape == (2, 8)
    with pytest.raises(ValueError, match="no query text position"):
        pool(hidden, torch.zeros(2, 5, dtype=torch.bool))


def test_refinement_head_shapes_and_learns_a_peak():
    head = AttentionRefinementHead(in_channels=6, vision_dim=5, query_dim=4, hidden_channels=16, upsample=2)
    att = torch.rand(2, 6, 4, 4)
    feats = torch.randn(2, 5, 4, 4)
    query = torch.randn(2, 4)
    out = head(att, image_features=feats, query=query)
    assert out.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="image_features"):
        head(att, query=query)
    # the head can turn an attention blob into a sharp target
    target = torch.zeros(2, 8, 8)
    target[:, 3, 5] = 1.0
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(att, image_features=feats, query=query), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    assert head(att, image_features=feats, query=query)[0].flatten().argmax() == 3 * 8 + 5


def test_point_descriptor_tokens_depend_on_the_point():
    desc = PointDescriptor(embed_dim=16, vision_dim=6, query_dim=8, num_heads=2)
    feats = torch.randn(1, 6, 4, 4)
    query = torch.randn(1, 8)
    a = desc(torch.tensor([[[0.2, 0.3]]]), feats, query)
    b = desc(torch.tensor([[[0.8, 0.6]]]), feats, query)
    assert a.shape == (1, 2, 16)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the descriptor moves with the point
    assert torch.allclose(a[:, 1], b[:, 1])  # the semantic token does not
    with pytest.raises(ValueError, match="normalised"):
        desc(torch.rand(1, 2), feats, query)


def test_interior_point_is_inside_even_for_a_ring():
    square = torch.zeros(20, 20, dtype=torch.bool)
    square[4:11, 6:13] = True
    assert torch.allclose(interior_point(square), torch.tensor([9.5, 7.5]))
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    r = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2).sqrt()
    ring = (r > 6) & (r < 11)
    x, y = interior_point(ring).long().tolist()
    assert ring[y, x]
    with pytest.raises(ValueError, match="empty"):
        interior_point(torch.zeros(5, 5, dtype=torch.bool))


def test_box_projection_loss_prefers_the_mask_filling_the_box():
    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 4:10, 2:12] = True
    good = torch.where(target, 8.0, -8.0)
    bad = torch.where(target.roll(5, dims=2), 8.0, -8.0)
    box = torch.tensor([[2.0, 4.0, 12.0, 10.0]])
    assert box_projection_loss(good, box) < 0.01 < box_projection_loss(bad, box)
    empty = torch.zeros(0, 16, 16)
    assert box_projection_loss(empty, torch.zeros(0, 4)) == 0


@pytest.mark.parametrize("method", ["quadratic", "soft_argmax"])
def test_extract_keypoints_is_sub_pixel_accurate(method):
    # a Gaussian peak between cells: 16x16 grid over a 64-pixel image (4 px per cell)
    h = w = 16
    true_cells = torch.tensor([6.3, 9.8])  # x, y in continuous cells
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    heat = torch.exp(-((xs - true_cells[0]) ** 2 + (ys - true_cells[1]) ** 2) / (2 * 1.2**2))
    points, scores = extract_keypoints(heat, image_size=(64, 64), refine=method)
    assert points.shape == (1, 2) and scores.shape == (1,)
    err = (points[0] - true_cells * 4).abs().max().item()
    tolerance = 0.05 if method == "quadratic" else 1.2  # soft-argmax is pulled to the peak cell
    assert err < tolerance
    # the integer peak cell alone is off by up to half a cell (2 px): refinement must beat it
    assert err < (torch.tensor([6.5, 9.5]) * 4 - true_cells * 4).abs().max().item()


def test_extract_keypoints_top_k_and_threshold():
    heat = torch.zeros(8, 8)
    heat[1, 1], heat[5, 6], heat[6, 2] = 0.9, 0.7, 0.2
    points, scores = extract_keypoints(heat, image_size=(32, 32), k=3, threshold=0.5)
    assert torch.allclose(scores, torch.tensor([0.9, 0.7]))
    assert torch.allclose(points, torch.tensor([[6.0, 6.0], [26.0, 22.0]]))
    none, _ = extract_keypoints(torch.zeros(8, 8), image_size=(32, 32), threshold=0.5)
    assert none.shape == (0, 2)
    flat, _ = extract_keypoints(torch.zeros(8, 8), image_size=(32, 32))
    assert flat.shape == (1, 2)


def test_match_heads_score_each_cell_against_the_query():
    torch.manual_seed(0)
    head = AttentionRefinementHead(in_channels=2, vision_dim=3, query_dim=3, hidden_channels=4, match_heads=2)
    with torch.no_grad():
        head.match_key.weight.zero_()
        head.match_key.bias.zero_()
        head.match_key.weight[:3, :, 0, 0] = torch.eye(3)  # head 0, channels 0-2: the features themselves
        head.match_query.weight.zero_()
        head.match_query.bias.zero_()
        head.match_query.weight[:3] = torch.eye(3)
    feats = torch.zeros(1, 3, 2, 2)
    feats[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    feats[0, :, 1, 0] = torch.tensor([0.0, 1.0, 0.0])
    sims = head._match(feats, torch.tensor([[0.0, 2.0, 0.0]]), (2, 2))
    assert sims.shape == (1, 2, 2, 2)
    # head 0: the query matches only the cell whose feature points the same way (scaled by 1/sqrt(4))
    assert torch.allclose(sims[0, 0], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(sims[0, 1], torch.zeros(2, 2))
    out = head(torch.rand(1, 2, 2, 2), image_features=feats, query=torch.tensor([[0.0, 2.0, 0.0]]))
    assert out.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="match_heads needs image features"):
        AttentionRefinementHead(in_channels=2, vision_dim=0, query_dim=3, match_heads=2)

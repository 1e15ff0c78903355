"""DenseAligner / ConvAligner: shapes, initial priors, errors, and that they learn to match."""

from __future__ import annotations

import functools

import pytest
import torch

from vlzoo.decoders.aligner import ConvAligner, DenseAligner, sincos_position_2d
from vlzoo.decoders.heatmap import find_peaks, gaussian_heatmap_targets, heatmap_focal_loss


@pytest.mark.parametrize("cls", [DenseAligner, ConvAligner])
def test_output_shapes_grid_and_priors(cls):
    aligner = cls(hidden_size=24, vision_dim=16, feature_grid=(4, 4), grid=(8, 6), dim=32, num_keypoints=5)
    with torch.no_grad():
        out = aligner(torch.randn(3, 16, 4, 4), torch.randn(3, 24))
    assert out.heatmaps.shape == (3, 6, 8, 6)
    assert out.centre.shape == (3, 8, 6) and out.keypoints.shape == (3, 5, 8, 6)
    assert out.box_size.shape == (3, 2, 8, 6)
    assert 0 <= float(out.box_size.min()) and float(out.box_size.max()) <= 1
    # CenterNet prior: the centre heatmap starts low, the sizes near size_prior
    assert float(out.centre.sigmoid().mean()) < 0.1
    assert abs(float(out.box_size.mean()) - 0.2) < 0.1
    # without a grid the feature grid is kept
    plain = cls(hidden_size=24, vision_dim=16, feature_grid=(4, 4), dim=32)
    assert plain(torch.randn(1, 16, 4, 4), torch.randn(1, 24)).heatmaps.shape == (1, 1, 4, 4)


@pytest.mark.parametrize("cls", [DenseAligner, ConvAligner])
def test_language_source_takes_hidden_size_channels_and_errors(cls):
    aligner = cls(hidden_size=24, vision_dim=16, image_source="language", dim=32)
    assert aligner(torch.randn(2, 24, 4, 4), torch.randn(2, 24)).heatmaps.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="image_source"):
        cls(hidden_size=24, vision_dim=16, image_source="pixels")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        aligner(torch.randn(2, 24, 16), torch.randn(2, 24))


def test_sincos_codes_are_distinct_per_cell():
    pos = sincos_position_2d(32, (5, 7))
    assert pos.shape == (35, 32)
    assert torch.cdist(pos, pos).add(torch.eye(35) * 10).min() > 0.1
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_2d(30, (2, 2))


@pytest.mark.parametrize(
    "cls",
    [DenseAligner, ConvAligner, functools.partial(DenseAligner, condition_queries=True)],
    ids=["dense", "conv", "dense-conditioned"],
)
def test_aligner_learns_to_find_the_object_the_query_names(cls):
    """Each image holds 3 "objects" (one-hot colour features at random cells); ``[LOC]`` names
    one colour; the aligner must put the peak on that object, which needs the match between
    ``[LOC]`` and the features, not just a position prior."""
    torch.manual_seed(0)
    grid, colours = (6, 6), 4

    def batch(n):
        feats = torch.zeros(n, colours, *grid)
        loc = torch.zeros(n, colours)
        target = torch.zeros(n, *grid)
        where = []
        for i in range(n):
            cells = torch.randperm(grid[0] * grid[1])[:3]
            cols = torch.randperm(colours)[:3]
            for c, k in zip(cells.tolist(), cols.tolist(), strict=True):
                feats[i, k, c // grid[1], c % grid[1]] = 1.0
            pick = int(torch.randint(3, ()))
            loc[i, cols[pick]] = 1.0
            y, x = divmod(int(cells[pick]), grid[1])
            target[i] = gaussian_heatmap_targets(
                torch.tensor([[x + 0.5, y + 0.5]]), torch.tensor([[2.0, 2.0]]), grid
            )
            where.append((y, x))
        return feats, loc, target, where

    aligner = cls(hidden_size=colours, vision_dim=colours, feature_grid=grid, dim=32, depth=2)
    opt = torch.optim.AdamW(aligner.parameters(), lr=3e-3)
    for _ in range(150):
        feats, loc, target, _ = batch(32)
        loss = heatmap_focal_loss(aligner(feats, loc).centre, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    feats, loc, target, where = batch(64)
    with torch.no_grad():
        heat = aligner(feats, loc).centre.sigmoid()
    _, ys, xs = find_peaks(heat, k=1)
    hits = sum(int(y[0]) == wy and int(x[0]) == wx for y, x, (wy, wx) in zip(ys, xs, where, strict=True))
    assert hits / 64 > 0.9

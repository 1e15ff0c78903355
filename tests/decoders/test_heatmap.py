"""Heatmap targets, focal loss, peaks and sub-pixel refinement (vlzoo.decoders.heatmap)."""

from __future__ import annotations

import math

import pytest
import torch

from vlzoo.decoders.heatmap import (
    decode_boxes,
    find_peaks,
    gaussian_heatmap_targets,
    gaussian_radius,
    heatmap_focal_loss,
    refine_subpixel,
)


def _gaussian(grid, mu_x, mu_y, sigma):
    """A Gaussian sampled at cell centres (index + 0.5)."""
    h, w = grid
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    return torch.exp(-((xs - mu_x) ** 2 + (ys - mu_y) ** 2) / (2 * sigma**2))


def test_target_peak_is_one_at_the_centre_cell():
    hm = gaussian_heatmap_targets(torch.tensor([[5.7, 3.2]]), torch.tensor([[4.0, 6.0]]), (10, 12))
    assert hm.shape == (10, 12)
    assert hm[3, 5] == 1.0
    assert int(hm.argmax()) == 3 * 12 + 5
    assert (hm == 1.0).sum() == 1
    assert hm.min() >= 0 and hm.max() <= 1


def test_target_radius_grows_with_box_size():
    small = gaussian_heatmap_targets(torch.tensor([[16.5, 16.5]]), torch.tensor([[2.0, 2.0]]), (33, 33))
    big = gaussian_heatmap_targets(torch.tensor([[16.5, 16.5]]), torch.tensor([[20.0, 20.0]]), (33, 33))
    assert gaussian_radius(20, 20) > gaussian_radius(2, 2)
    assert (big > 0).sum() > (small > 0).sum()
    # the support is exactly the (2r+1)^2 square of CenterNet's radius
    r = int(gaussian_radius(20.0, 20.0))
    assert (big > 0).sum() == (2 * r + 1) ** 2
    # a tiny box still gets its peak cell
    tiny = gaussian_heatmap_targets(torch.tensor([[3.5, 3.5]]), torch.tensor([[0.1, 0.1]]), (8, 8))
    assert tiny[3, 3] == 1 and (tiny > 0).sum() == 1


def test_target_keeps_the_max_of_overlapping_objects_and_clamps_the_border():
    hm = gaussian_heatmap_targets(
        torch.tensor([[2.5, 2.5], [4.5, 2.5], [9.9, 9.9]]), torch.tensor([[6.0, 6.0]] * 3), (10, 10)
    )
    assert hm[2, 2] == 1 and hm[2, 4] == 1 and hm[9, 9] == 1
    with pytest.raises(ValueError, match="centres"):
        gaussian_heatmap_targets(torch.zeros(2, 2), torch.zeros(1, 2), (4, 4))


def test_focal_loss_is_low_for_the_target_and_normalised_by_peaks():
    target = gaussian_heatmap_targets(torch.tensor([[3.5, 3.5]]), torch.tensor([[4.0, 4.0]]), (8, 8))
    good = torch.where(target == 1, torch.tensor(8.0), torch.tensor(-8.0))
    bad = torch.where(target == 1, torch.tensor(-8.0), torch.tensor(8.0))
    assert heatmap_focal_loss(good, target) < 1e-3
    assert heatmap_focal_loss(bad, target) > 10
    # two copies of the image -> same loss (normalised by peaks, not summed)
    two = heatmap_focal_loss(torch.stack([bad, bad]), torch.stack([target, target]))
    torch.testing.assert_close(two, heatmap_focal_loss(bad, target))
    # negatives near the peak are penalised less than far ones (penalty reduction)
    near = torch.full((8, 8), -8.0)
    near[3, 4] = 2.0
    far = torch.full((8, 8), -8.0)
    far[0, 0] = 2.0
    assert heatmap_focal_loss(near, target) < heatmap_focal_loss(far, target)
    logits = torch.zeros(8, 8, requires_grad=True)
    heatmap_focal_loss(logits, target).backward()
    assert logits.grad[3, 3] < 0 and logits.grad[0, 0] > 0


def test_find_peaks_local_max_nms_threshold_and_batch():
    hm = torch.zeros(10, 10)
    hm[2, 3] = 0.9
    hm[2, 4] = 0.8  # suppressed: neighbour of a higher peak
    hm[7, 7] = 0.6
    hm[5, 0] = 0.2  # below the threshold
    scores, ys, xs = find_peaks(hm, k=5, threshold=0.3)
    assert scores.tolist() == pytest.approx([0.9, 0.6])
    assert ys.tolist() == [2, 7] and xs.tolist() == [3, 7]
    s1, y1, x1 = find_peaks(hm, k=1)
    assert y1.tolist() == [2] and x1.tolist() == [3]
    bs, by, bx = find_peaks(torch.stack([hm, torch.zeros(10, 10)]), k=5, threshold=0.3)
    assert isinstance(bs, list) and len(bs) == 2
    assert by[0].tolist() == [2, 7] and len(bs[1]) == 0
    with pytest.raises(ValueError, match="kernel"):
        find_peaks(hm, k=1, kernel=2)


@pytest.mark.parametrize("method,window,tol", [("quadratic", 3, 0.02), ("soft_argmax", 5, 0.25)])
def test_refine_subpixel_on_off_grid_gaussians(method, window, tol):
    g = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(30):
        mu = torch.rand(2, generator=g) * 12 + 4  # well inside a 20x20 grid, off the cell centres
        hm = _gaussian((20, 20), float(mu[0]), float(mu[1]), sigma=1.5)
        _, ys, xs = find_peaks(hm, k=1)
        x, y = refine_subpixel(hm, ys, xs, method=method, window=window)
        errors.append(math.hypot(float(x[0] - mu[0]), float(y[0] - mu[1])))
        # the integer peak alone is off by up to ~0.7 cell; refinement must do much better
    assert max(errors) < tol, errors


def test_refine_subpixel_several_peaks_and_errors():
    hm = _gaussian((16, 16), 3.3, 4.8, 1.0) + _gaussian((16, 16), 11.9, 10.2, 1.0)
    _, ys, xs = find_peaks(hm, k=2)
    x, y = refine_subpixel(hm, ys, xs)
    got = sorted(zip(x.tolist(), y.tolist(), strict=True))
    assert got[0] == pytest.approx((3.3, 4.8), abs=0.05)
    assert got[1] == pytest.approx((11.9, 10.2), abs=0.05)
    with pytest.raises(ValueError, match="method"):
        refine_subpixel(hm, ys, xs, method="centroid")


def test_decode_boxes_gives_the_hand_built_boxes_back():
    # boxes centred on cell centres of an 8x8 grid over a 64 px image (8 px cells)
    boxes = torch.tensor([[8.0, 8.0, 32.0, 16.0], [32.0, 40.0, 56.0, 64.0]])
    cell = 8.0
    centers = ((boxes[:, :2] + boxes[:, 2:]) / 2) / cell
    sizes = (boxes[:, 2:] - boxes[:, :2]) / cell
    hm = gaussian_heatmap_targets(centers, sizes, (8, 8)) * 0.9
    size_map = torch.zeros(2, 8, 8)
    for (cx, cy), (bw, bh) in zip(centers.tolist(), sizes.tolist(), strict=True):
        size_map[0, int(cy), int(cx)] = bw * cell / 64
        size_map[1, int(cy), int(cx)] = bh * cell / 64
    for refine in (None, "quadratic"):
        got, scores = decode_boxes(hm, size_map, image_size=(64, 64), k=10, threshold=0.5, refine=refine)
        assert scores.tolist() == pytest.approx([0.9, 0.9])
        order = got[:, 0].argsort()
        torch.testing.assert_close(got[order], boxes, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="box_size"):
        decode_boxes(hm, size_map[:1], image_size=(64, 64))


def test_box_heatmap_targets_sizes_belong_to_the_nearest_box():
    from vlzoo.decoders.heatmap import box_heatmap_targets

    # centres (10, 10) and (46, 42) px: the centres of cells (2, 2) and (11, 10) of 4 px
    boxes = torch.tensor([[2.0, 2.0, 18.0, 18.0], [30.0, 34.0, 62.0, 50.0]])
    heat, size, weight = box_heatmap_targets(boxes, (64, 64), (16, 16))
    assert heat[2, 2] == 1 and heat[10, 11] == 1
    assert size[:, 2, 2].tolist() == pytest.approx([0.25, 0.25])
    assert size[:, 10, 11].tolist() == pytest.approx([0.5, 0.25])
    assert weight[2, 2] == 1 and weight[0, 15] == 0
    # decoding the targets gives the boxes back
    got, _ = decode_boxes(heat, size, image_size=(64, 64), k=5, threshold=0.5)
    torch.testing.assert_close(got[got[:, 0].argsort()], boxes)


def test_subcell_targets_keep_the_exact_centre_for_refinement():
    g = torch.Generator().manual_seed(1)
    plain_err, sub_err = [], []
    for _ in range(20):
        c = torch.rand(1, 2, generator=g) * 8 + 4
        for subcell, errs in ((False, plain_err), (True, sub_err)):
            hm = gaussian_heatmap_targets(c, torch.tensor([[6.0, 6.0]]), (16, 16), subcell=subcell)
            assert hm.max() == 1 and (hm == 1).sum() == 1
            _, ys, xs = find_peaks(hm, k=1)
            x, y = refine_subpixel(hm, ys, xs)
            errs.append(max(abs(float(x[0] - c[0, 0])), abs(float(y[0] - c[0, 1]))))
    assert max(sub_err) < 0.15 < max(plain_err)

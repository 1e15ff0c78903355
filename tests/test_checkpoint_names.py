"""A checkpoint written before the shared SAM prompt head is refused with a message that says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from vlzoo.checkpoints import CheckpointWeights, check_weights_fit
from vlzoo.config import RecipeError, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "pixel2emb_res.yaml"


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.mask_head = nn.Module()
        self.mask_head.neck = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(1, 8))


def _weights(names: dict[str, tuple[int, ...]]) -> CheckpointWeights:
    recipe = load_recipe(RECIPE)
    return CheckpointWeights(Path("old.ckpt"), names, recipe, None)


def test_old_mask_head_names_get_their_own_hint():
    model = _Model()
    old = {"backbone.weight": (2, 2), "backbone.bias": (2,), "mask_projection.0.weight": (8, 4, 1, 1),
           "mask_projection.0.bias": (8,), "mask_projection.1.weight": (8,), "mask_projection.1.bias": (8,)}
    with pytest.raises(RecipeError, match="before the mask paradigms shared one SAM prompt head"):
        check_weights_fit(_weights(old), model, load_recipe(RECIPE), resuming=False)


def test_other_misfits_keep_the_usual_hint():
    model = _Model()
    other = {"backbone.weight": (3, 2), "backbone.bias": (2,), "mask_head.neck.0.weight": (8, 4, 1, 1),
             "mask_head.neck.0.bias": (8,), "mask_head.neck.1.weight": (8,), "mask_head.neck.1.bias": (8,)}
    with pytest.raises(RecipeError, match="differ in shape") as info:
        check_weights_fit(_weights(other), model, load_recipe(RECIPE), resuming=False)
    assert "SAM prompt head" not in str(info.value)
    same = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights_fit(_weights(same), model, load_recipe(RECIPE), resuming=False)

"""The tiny Shapes recipe and the hand training loop that the native-backbone paradigm tests share
(Qwen, PaliGemma, Kosmos-2, Florence-2): 8 REC scenes of 60 px, one optimizer step's trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def shapes_recipe(backbone: dict, paradigm: dict, template: Any) -> dict:
    """A recipe (dict) training ``paradigm`` on ``backbone`` with the prompt ``template``."""
    shapes = {"_target_": "vlzoo.data.ShapesDataset", "size": 8, "image_size": 60, "tasks": ["rec"]}
    return {
        "seed": 0,
        "backbone": {"freeze_vision": False, **backbone},
        "data": {"_base_": str(RECIPES / "data" / "shapes_rec.yaml"), "batch_size": 8, "num_workers": 0,
                 "template": template, "train": dict(shapes, split="train"), "val": dict(shapes, split="val"),
                 "test": dict(shapes, split="test")},
        "paradigm": paradigm,
        "evaluator": {"_base_": str(RECIPES / "evaluator" / "default.yaml"), "tasks": ["rec"]},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3.0e-3, "weight_decay": 0.0},
        "trainer": {"_base_": str(RECIPES / "trainer" / "cpu.yaml"), "max_steps": 1},
        "logger": None,
    }


def train_steps(model, batch, n: int, lr: float = 3e-3) -> list[float]:
    """``n`` AdamW steps of ``model`` on one ``batch``; the total loss before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(n):
        opt.zero_grad()
        total = model.weighted_total(model.loss(batch))
        total.backward()
        opt.step()
        losses.append(float(total.detach()))
    return losses

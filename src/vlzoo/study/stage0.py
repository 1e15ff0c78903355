"""Stage 0: pretrain the shared base LMM once and keep its backbone checkpoint.

Used by studies (``study.stage0``) and by hand (``vlzoo fit recipes/shapes/base_lmm.yaml``
followed by ``backbone.checkpoint=...`` in a paradigm recipe)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlzoo.study.measure import retention

__all__ = ["run_stage0"]


def run_stage0(
    recipe: str | Path,
    *,
    output_dir: str | Path,
    tracking_uri: str,
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[Path, dict[str, float]]:
    """Train the stage-0 recipe, save its backbone to ``output_dir/backbone.pt`` and return the
    path with the stage-0 metrics (``retention/before/...`` and ``stage0/train_seconds``).

    The checkpoint is written last (after a ``.tmp`` file), so an interrupted stage 0 leaves no
    file a later run would mistake for a finished one."""
    from vlzoo.session import RunSession

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    session = RunSession(recipe, overrides=overrides, output_dir=output_dir, tracking_uri=tracking_uri)
    built = session.prepare("fit")  # the same session as `vlzoo fit` and a study's cells
    start = time.perf_counter()
    session.fit()
    seconds = time.perf_counter() - start
    metrics = {"stage0/train_seconds": seconds}
    metrics.update(retention(built.model, recipe, overrides=overrides, prefix="retention/before"))
    path = output_dir / "backbone.pt"
    tmp = output_dir / "backbone.pt.tmp"
    built.model.backbone.save_backbone(tmp)
    tmp.replace(path)
    (output_dir / "stage0_metrics.json").write_text(json.dumps(metrics, indent=2))
    return path, metrics

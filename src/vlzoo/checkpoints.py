"""Reading, loading and exporting vlzoo checkpoints (above :mod:`vlzoo.build`: loading builds
the model from the recipe a checkpoint embeds).

* :func:`read_checkpoint`: the checkpoint dictionary and its recipe, read with
  ``torch.load(..., weights_only=True)``: nothing is unpickled.
* :func:`load_checkpoint`: the model rebuilt from the file alone.
* :func:`backbone_of_checkpoint` / :func:`export_backbone`: the backbone of a run, as a module or
  as a backbone file for another recipe's ``backbone.checkpoint`` ("start from the backbone of run
  X" is this explicit step; a backbone never builds a paradigm).
* :func:`checkpoint_weights` / :func:`check_weights_fit`: a checkpoint that does not fit the model
  a recipe builds is refused before training or evaluation starts.
* :func:`find_last_checkpoint`: the last checkpoint of the latest run of a recipe (``--resume``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vlzoo.build import build
from vlzoo.callbacks import RECIPE_KEY, RUN_ID_KEY
from vlzoo.config import Recipe, RecipeError, recipe_from_dict, recipe_from_yaml
from vlzoo.tracking import CHECKPOINT_DIR_TAG, DEFAULT_EXPERIMENT, RECIPE_NAME_TAG, tracking_client

__all__ = [
    "read_checkpoint",
    "load_checkpoint",
    "backbone_of_checkpoint",
    "export_backbone",
    "find_last_checkpoint",
    "CheckpointWeights",
    "checkpoint_weights",
    "check_weights_fit",
]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], Recipe]:
    """The checkpoint dictionary and its embedded recipe, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refused or file damaged
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        first = first.split(". ", 1)[0].rstrip(".")[:200]  # torch's advice that follows is not ours to give
        raise RecipeError(
            f"checkpoint {path} cannot be loaded with weights_only=True: it is truncated, damaged or not a "
            f"checkpoint written by `vlzoo fit` ({type(err).__name__}: {first}). vlzoo never unpickles "
            "arbitrary objects from a checkpoint; use a last.ckpt or best-*.ckpt of a vlzoo run."
        ) from None
    text = checkpoint.get(RECIPE_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(text, str):
        raise RecipeError(f"checkpoint {path} holds no vlzoo recipe (key '{RECIPE_KEY}'); was it written by vlzoo?")
    return checkpoint, recipe_from_yaml(text, source=f"checkpoint {path}")


def load_checkpoint(
    path: str | Path, *, allow_targets: Sequence[str] = (), strict: bool = True, overrides: Sequence[str] = ()
) -> L.LightningModule:
    """Rebuild a model from a vlzoo checkpoint alone: its embedded recipe builds the model
    (no data, trainer or logger), then the weights are loaded.  The model is in eval mode.

    The checkpoint's ``allow_targets`` are not trusted blindly: each extra prefix it names must
    also be given in ``allow_targets`` (the caller's explicit consent).  ``overrides`` change the
    embedded recipe before building (e.g. ``backbone.checkpoint=null``: the weights come from
    the checkpoint anyway).
    """
    checkpoint, recipe = read_checkpoint(path)
    if overrides or allow_targets:
        # the checkpoint's own allow_targets count only where the caller confirms them (validate)
        recipe = recipe_from_dict(
            recipe.data, overrides=list(overrides), allow_targets=allow_targets, source=f"checkpoint {path}",
            trust_own_allow_targets=False,
        )
    built = build(recipe, with_data=False, with_trainer=False, with_logger=False)
    if built.model is None:
        raise RecipeError(f"checkpoint {path}: its recipe has no paradigm slot, so there is no model to load")
    built.model.load_state_dict(checkpoint["state_dict"], strict=strict)
    built.model.eval()
    return built.model


def backbone_of_checkpoint(path: str | Path, *, allow_targets: Sequence[str] = ()) -> torch.nn.Module:
    """The trained backbone of a ``vlzoo fit`` checkpoint (any paradigm), rebuilt from the
    recipe it embeds - e.g. a grounding-trained LMM to keep frozen under ``attention_keypoints``
    (:func:`export_backbone` writes it as a file for ``backbone.checkpoint=``).  The recipe's own
    ``backbone.checkpoint`` is not needed: the weights come from the checkpoint."""
    _, recipe = read_checkpoint(path)
    if not isinstance(recipe.data.get("backbone"), Mapping):
        raise RecipeError(f"checkpoint {path}: its recipe '{recipe.name}' has no backbone slot to take an LMM from")
    # the weights are in the file: the other recipe's own starting checkpoint need not exist any more
    unset = ["backbone.checkpoint=null"] if "checkpoint" in recipe.data["backbone"] else []
    model = load_checkpoint(path, allow_targets=allow_targets, overrides=unset)
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "backbone_blob"):
        raise RecipeError(f"checkpoint {path}: its model has no vlzoo backbone to take the weights from")
    return backbone


def export_backbone(checkpoint: str | Path, output: str | Path, *, allow_targets: Sequence[str] = ()) -> Path:
    """Write the backbone of a ``vlzoo fit`` checkpoint as a ``save_backbone`` file (LoRA
    merged, added tokens kept): the file ``backbone.checkpoint=`` takes to start from the
    backbone of that run (``vlzoo export CHECKPOINT FILE --backbone`` on the command line).
    Written atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    blob = backbone_of_checkpoint(checkpoint, allow_targets=allow_targets).backbone_blob()
    tmp = output.with_name(output.name + ".tmp")
    torch.save(blob, str(tmp))
    tmp.replace(output)
    return output


def find_last_checkpoint(
    *, recipe_name: str, tracking_uri: str, experiment_name: str = DEFAULT_EXPERIMENT
) -> tuple[str, Path]:
    """``(run_id, last.ckpt)`` of the latest run of ``recipe_name`` that has a last checkpoint."""
    client = tracking_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise RecipeError(f"--resume: no experiment '{experiment_name}' at {tracking_uri}, so no run to resume")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{RECIPE_NAME_TAG}` = '{recipe_name}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
        if folder and (Path(folder) / "last.ckpt").is_file():
            return run.info.run_id, Path(folder) / "last.ckpt"
    raise RecipeError(
        f"--resume: no run of recipe '{recipe_name}' with a last checkpoint at {tracking_uri} "
        f"(looked at {len(runs)} run(s))"
    )


@dataclass(frozen=True)
class CheckpointWeights:
    """What a ``vlzoo fit`` checkpoint says about its weights, read once: the shape of each
    weight, the recipe it embeds and the MLflow run that wrote it."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    recipe: Recipe
    run_id: str | None


def checkpoint_weights(path: str | Path) -> CheckpointWeights:
    """The weights of a checkpoint that ``vlzoo fit`` wrote; :class:`RecipeError` when the file
    is missing, damaged or not vlzoo's."""
    checkpoint, stored = read_checkpoint(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or "pytorch-lightning_version" not in checkpoint:
        raise RecipeError(
            f"checkpoint {path} holds a vlzoo recipe but no Lightning training state ('state_dict' and "
            "'pytorch-lightning_version'); use a last.ckpt or best-*.ckpt written by `vlzoo fit`"
        )
    shapes = {str(k): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
    run_id = checkpoint.get(RUN_ID_KEY)
    return CheckpointWeights(Path(path), shapes, stored, run_id if isinstance(run_id, str) else None)


#: weight names of the mask paradigms before the shared SAM prompt head (heatmap's ``mask_proj``,
#: pixel2emb's ``mask_projection``, LENS's ``embed``, and their SAM decoders)
_OLD_MASK_HEAD_PREFIXES = ("mask_decoder.", "decoder.", "mask_proj.", "mask_projection.", "embed.")


def _before_shared_mask_head(missing: list[str], unexpected: list[str]) -> bool:
    return any(k.startswith("mask_head.") for k in missing) and any(
        k.startswith(_OLD_MASK_HEAD_PREFIXES) for k in unexpected
    )


def check_weights_fit(weights: CheckpointWeights, model: Any, recipe: Recipe, *, resuming: bool) -> None:
    """:class:`RecipeError` when the checkpoint's weights do not fit the model the recipe built
    (another paradigm, backbone or size): said before Lightning fails half-way with a long
    ``load_state_dict`` report."""
    shapes, stored, path = weights.shapes, weights.recipe, weights.path
    own = {}
    for name, tensor in model.state_dict().items():
        try:
            own[name] = tuple(tensor.shape)
        except (AttributeError, RuntimeError, ValueError):  # e.g. an uninitialized lazy parameter
            continue
    strict = bool(getattr(model, "strict_loading", True))
    wrong = [k for k in own if k in shapes and own[k] != shapes[k]]
    missing = [k for k in own if k not in shapes] if strict else []
    unexpected = [k for k in shapes if k not in own] if strict else []
    if not (wrong or missing or unexpected):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} weight(s) differ in shape (e.g. {wrong[0]}: {list(shapes[wrong[0]])} in the "
                     f"checkpoint, {list(own[wrong[0]])} in the model)")
    if missing:
        parts.append(f"{len(missing)} weight(s) of the model are not in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) of the checkpoint are not in the model (e.g. {unexpected[0]})")
    written_by = stored.get("paradigm._target_") or "no paradigm"
    hint = (
        "resume with the recipe it was trained with (the same paradigm, backbone and sizes)"
        if resuming
        else "give the recipe it was trained with, or leave RECIPE out to use the checkpoint's own recipe"
    )
    if _before_shared_mask_head(missing, unexpected):
        hint = (
            "note that it was written before the mask paradigms shared one SAM prompt head (vlzoo.decoders."
            "SamPromptHead at paradigm.mask_head: the old paradigm.mask_decoder / decoder and its neck were renamed, "
            "and heatmap's neck gained a GroupNorm), so no recipe of this version loads it: retrain it, or load it "
            "with the vlzoo version that wrote it"
        )
    raise RecipeError(
        f"checkpoint {path} does not fit recipe {recipe.path or recipe.name}: it was written by recipe "
        f"'{stored.name}' ({written_by}), and {'; '.join(parts)}. To use it, {hint}."
    )

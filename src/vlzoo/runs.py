"""The former ``vlzoo.runs``, split along the layers (issue 17): kept for the recipes and
checkpoints that name its logger.

A recipe may name the logger ``vlzoo.runs.ResilientMLFlowLogger`` (its reviewed path before the
split; resolved recipes stored in checkpoints and MLflow runs do): that is still the same class
as :class:`vlzoo.tracking.ResilientMLFlowLogger`.  Every other name moved:

* :mod:`vlzoo.tracking` - MLflow: URIs, loggers, run tags, the tracking preflight;
* :mod:`vlzoo.callbacks` - the trainer's callbacks and checkpoint IO;
* :mod:`vlzoo.checkpoints` - reading, loading and exporting checkpoints;

and ``from vlzoo.runs import <name>`` (or ``vlzoo.runs.<name>``) raises an ImportError saying where.
"""

from __future__ import annotations

from vlzoo.tracking import ResilientMLFlowLogger

__all__ = ["ResilientMLFlowLogger"]

#: where each former name of ``vlzoo.runs`` lives now
MOVED: dict[str, str] = {
    **{name: "vlzoo.tracking" for name in (
        "DEFAULT_TRACKING_URI", "DEFAULT_EXPERIMENT", "CHECKPOINT_DIR_TAG", "RECIPE_NAME_TAG", "tracking_uri_for",
        "resolve_tracking_uri", "make_logger", "run_tags", "git_commit", "TrackingError", "check_tracking",
        "temporary_environment", "preflight_tracking", "uses_mlflow", "upload_offline_run")},
    **{name: "vlzoo.callbacks" for name in (
        "RECIPE_KEY", "VERSION_KEY", "RUN_ID_KEY", "RunLogging", "RecipeInCheckpoint", "AtomicCheckpointIO",
        "ParameterCount", "count_parameters", "FiniteCheckpoints", "non_finite_weight", "RandomStateInCheckpoint",
        "periodic_checkpoint")},
    **{name: "vlzoo.checkpoints" for name in (
        "read_checkpoint", "load_checkpoint", "backbone_of_checkpoint", "export_backbone", "find_last_checkpoint")},
}


def __getattr__(name: str):
    if name in MOVED:
        # ImportError, not AttributeError: `from vlzoo.runs import x` would replace the message
        raise ImportError(
            f"vlzoo.runs.{name} moved to {MOVED[name]}.{name} (vlzoo.runs was split into vlzoo.tracking, "
            f"vlzoo.callbacks and vlzoo.checkpoints); import it from there"
        )
    raise AttributeError(f"module 'vlzoo.runs' has no attribute {name!r}")

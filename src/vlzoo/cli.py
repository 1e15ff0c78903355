"""The ``vlzoo`` command line.

::

    vlzoo fit RECIPE [overrides...] [--resume | --resume-from RUN_ID|CKPT] [--tracking-uri U] [--output-dir D]
    vlzoo validate|test RECIPE [overrides...] [--checkpoint CKPT]
    vlzoo predict RECIPE [overrides...] [--checkpoint CKPT] [--output FILE] [--overlays DIR]
    vlzoo print RECIPE [overrides...] [--plain]
    vlzoo check RECIPE [overrides...] [--dry-run] [--memory]
    vlzoo recipes
    vlzoo study STUDY [--jobs N] [--cell I] [--tracking-uri U] [--output-dir D]
    vlzoo study report STUDY [--tracking-uri U] [--output-dir D]
    vlzoo infer CHECKPOINT|DIR IMAGE [EXPRESSION] [--task T] [--box x1,y1,x2,y2] [--overlay OUT]
    vlzoo export CHECKPOINT DIR            (--backbone: CHECKPOINT FILE, the run's backbone file)
    vlzoo demo CHECKPOINT|DIR [...] [--port N]
    vlzoo score ANSWERS.jsonl --recipe R --split S --codec FAMILY [--frame F] [--min-pixels N --max-pixels N]

RECIPE is a file or a shipped recipe name (``vlzoo recipes``); with ``--checkpoint`` it may be
left out and the checkpoint's own recipe is used.  Overrides are ``slot=name`` (swap a slot for
``recipes/<slot>/<name>.yaml``) or ``a.b.c=value``.  Every command takes ``--allow-target
PREFIX`` (repeatable) and ``--debug`` (show tracebacks).  A mistake in a recipe ends with exit
status 2 and one paragraph saying what and where.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlzoo._cli_support import EXIT_INTERRUPTED, report_interrupt, unknown_arguments
from vlzoo.config import (
    RecipeError,
    find_recipe,
    load_recipe,
    recipe_from_dict,
    shipped_recipes_dir,
    validate,
)
from vlzoo.study.spec import StudyError

__all__ = ["main", "list_recipes", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
RUN_VERBS = ("fit", "validate", "test", "predict")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlzoo", description="Train, evaluate and inspect localization paradigms for multimodal models."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    helps = {
        "fit": "train a recipe (logged in MLflow, checkpoints embed the recipe)",
        "validate": "run the validation split",
        "test": "run the test split",
        "predict": "write COCO-style predictions (and overlays on request)",
        "print": "show the resolved recipe and which file set each key",
        "check": "validate a recipe (--dry-run / --memory: build it at full size on the meta device)",
        "recipes": "list the shipped recipes",
        "study": "run a head-to-head study (recipes/studies/*.yaml) and write its report",
    }
    parser.verb_parsers = sub.choices  # type: ignore[attr-defined]  # for the unknown-option hint
    for verb, text in helps.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        if verb == "recipes":
            p.add_argument("--dir", default=None, help="list this recipes folder instead of the shipped one")
            continue
        if verb == "study":
            p.add_argument("study", nargs="+", metavar="[report] STUDY", help="study file; 'report FILE' rebuilds the report")
            p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
            p.add_argument("--cell", type=int, default=None, help="run only this cell index (cluster use)")
            p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: OUTPUT_DIR/mlflow.db)")
            p.add_argument("--output-dir", default=None, help="default: studies/<study name>")
            p.add_argument("--parent-run", default=None, help=argparse.SUPPRESS)
            p.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
            p.add_argument("--prepare", action="store_true",
                           help="only create the parent run and stage 0 (before launching --cell jobs)")
            continue
        p.add_argument("recipe", nargs="?" if verb in ("validate", "test", "predict") else None,
                       help="recipe file or shipped name")
        p.add_argument("overrides", nargs="*", help="slot=name or a.b.c=value")
        p.add_argument("--allow-target", action="append", default=[], metavar="PREFIX",
                       help="also allow _target_s under this module prefix (recorded in the recipe)")
        if verb == "check":
            p.add_argument("--dry-run", action="store_true",
                           help="build at full size on the meta device, run a training and a prediction step")
            p.add_argument("--memory", action="store_true", help="print the per-GPU memory plan (builds as --dry-run)")
        if verb == "print":
            p.add_argument("--plain", action="store_true", help="plain resolved YAML, without sources")
        if verb in RUN_VERBS:
            p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: OUTPUT_DIR/mlflow.db)")
            p.add_argument("--output-dir", default=".", help="MLflow store, mlruns/ and checkpoints/ go here")
        if verb == "fit":
            p.add_argument("--resume", action="store_true",
                           help="continue the latest run of this recipe from its last checkpoint")
            p.add_argument("--resume-from", default=None, metavar="RUN_ID|CKPT",
                           help="continue the given MLflow run (or checkpoint file)")
        if verb in ("validate", "test", "predict"):
            p.add_argument("--checkpoint", default=None, help="weights (and, without RECIPE, the recipe) to use")
        if verb == "predict":
            p.add_argument("--output", default=None, help="result JSON (default OUTPUT_DIR/predictions.json)")
            p.add_argument("--overlays", default=None, metavar="DIR", help="also draw overlay PNGs here")
            p.add_argument("--max-overlays", type=int, default=None, help="at most this many overlays")
    from vlzoo.use_commands import add_parsers

    add_parsers(sub)  # infer / export / demo (vlzoo.use_commands)
    from vlzoo.scoring.command import add_parser as add_score_parser

    add_score_parser(sub)  # score (vlzoo.scoring.command)
    return parser


def list_recipes(folder: str | Path | None = None) -> list[tuple[str, str]]:
    """``(name, description)`` of every ``*.yaml`` under a recipes folder; the description is
    the file's first comment line."""
    root = Path(folder) if folder is not None else shipped_recipes_dir()
    if root is None or not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob("*.yaml")):
        description = ""
        for line in path.read_text().splitlines():
            if line.strip().startswith("#"):
                description = line.strip().lstrip("#").strip()
                break
            if line.strip():
                break
        out.append((path.relative_to(root).with_suffix("").as_posix(), description))
    return out


def _load(args: argparse.Namespace):
    """The recipe of a command: from RECIPE, or from --checkpoint when RECIPE is left out."""
    recipe_arg = args.recipe
    overrides = list(args.overrides)
    # `vlzoo predict --checkpoint c.ckpt a.b=1`: argparse puts the first override into RECIPE
    if recipe_arg is not None and "=" in recipe_arg and not Path(recipe_arg).exists():
        overrides.insert(0, recipe_arg)
        recipe_arg = None
    checkpoint = getattr(args, "checkpoint", None)
    if recipe_arg is None:
        if checkpoint is None:
            raise RecipeError(f"vlzoo {args.verb} needs a RECIPE (or --checkpoint CKPT to use the recipe it holds)")
        from vlzoo.checkpoints import read_checkpoint

        _, stored = read_checkpoint(checkpoint)
        # the checkpoint's own allow_targets count only where --allow-target confirms them (validate)
        return recipe_from_dict(stored.data, overrides=overrides, allow_targets=args.allow_target,
                                source=f"checkpoint {checkpoint}", trust_own_allow_targets=False)
    return load_recipe(find_recipe(recipe_arg), overrides, allow_targets=args.allow_target)


def _cmd_print(args: argparse.Namespace) -> int:
    recipe = _load(args)
    sys.stdout.write(recipe.to_yaml() if args.plain else recipe.annotated())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    recipe = _load(args)
    validate(recipe)
    if args.dry_run or args.memory:
        from vlzoo.dryrun import dry_run

        report = dry_run(recipe)
        print(report.format() if args.dry_run or report.memory is None else report.memory.format())
        return 0 if report.ok else EXIT_USER_ERROR
    slots = [s for s in recipe.data if isinstance(recipe.data[s], dict) and "_target_" in recipe.data[s]]
    print(f"ok: {recipe.path or recipe.name} ({', '.join(slots) or 'no slots'})")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    items = list_recipes(args.dir)
    if not items:
        print("no recipes found")
        return 0
    width = max(len(name) for name, _ in items)
    for name, description in items:
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """fit / validate / test / predict: the arguments of one :class:`~vlzoo.session.RunSession`."""
    from vlzoo.session import RunInterrupted, RunSession, TrainingStopped

    writer = None
    if args.verb == "predict":
        from vlzoo.predictions import PredictionWriter

        output = Path(args.output) if args.output else Path(args.output_dir) / "predictions.json"
        writer = PredictionWriter(output, overlays=args.overlays, max_overlays=args.max_overlays)
    resume = (args.resume_from or ("last" if args.resume else None)) if args.verb == "fit" else None
    session = RunSession(_load(args), output_dir=args.output_dir, tracking_uri=args.tracking_uri,
                         checkpoint=getattr(args, "checkpoint", None), resume=resume,
                         keep_raw_images=True if getattr(args, "overlays", None) else None,
                         callbacks=[writer] if writer is not None else [])
    try:
        outcome = getattr(session, args.verb)()
    except RunInterrupted as err:
        return report_interrupt(args, err.built)
    except TrainingStopped as err:
        if args.debug:
            raise
        print(f"vlzoo fit: training stopped: {err}\n(run again with --debug for the full traceback)", file=sys.stderr)
        return 1
    built = outcome.built
    if args.verb in ("validate", "test") and built.trainer.is_global_zero:
        from vlzoo.terminal import evaluation_table

        stage = "val" if args.verb == "validate" else "test"
        # Lightning's own table lists every split's figures under every dataloader: one column per split
        names = list(getattr(built.datamodule, f"{stage}_names", None) or []) or [
            stage if i == 0 else f"{stage}{i}" for i in range(len(outcome.results))]  # as paradigms/base.py names them
        sys.stdout.write(evaluation_table(outcome.results, names, stage))
    if writer is not None:
        print(f"vlzoo: wrote {len(writer.records)} records to {writer.output}"
              + (f" and {len(writer.overlay_paths)} overlays to {args.overlays}" if args.overlays else ""))
    if outcome.run_id:
        print(f"vlzoo: MLflow run {outcome.run_id} at {outcome.tracking_uri}; checkpoints in {built.checkpoint_dir}")
    if outcome.lost_server:
        print(f"vlzoo: {outcome.lost_server}")
    return 0


def _study_cells(spec: Any) -> list[Any]:
    """The cells of a study, as :class:`~vlzoo.study.runner.StudyRun` expands them, without
    opening a tracking store."""
    from vlzoo.study.runner import paradigm_supports
    from vlzoo.study.spec import expand_grid

    try:
        return expand_grid(spec, supports=paradigm_supports)
    except RecipeError as err:
        raise StudyError(f"study file {spec.path}: key 'study.recipe': a recipe it names is broken: {err}") from None
    except (KeyError, IndexError, ValueError) as err:
        patterns = ", ".join(part.recipe for part in spec.parts)
        raise StudyError(f"study file {spec.path}: key 'study.recipe' ({patterns}) cannot be filled in from "
                         f"the grid: {type(err).__name__}: {err}") from None


def _check_study(spec: Any) -> None:
    """Before a study creates any run: every runnable cell's recipe, with the cell's overrides
    (grid values, ``study.fixed``, the budget), and the stage-0 recipe load and validate, and at
    least one cell can run.  A mistake ends the study with the cell and key named."""
    cells = _study_cells(spec)
    runnable = [c for c in cells if c.supported]
    if not runnable:
        reasons = "; ".join(f"cell {c.index} [{c.key}]: {c.reason}" for c in cells[:3])
        raise StudyError(
            f"study file {spec.path}: none of its {len(cells)} cells can run ({reasons}); check study.recipe "
            f"({', '.join(part.recipe for part in spec.parts)}) and study.grid"
        )
    for cell in runnable:
        try:
            validate(load_recipe(cell.recipe, list(cell.overrides)))
        except RecipeError as err:
            raise StudyError(
                f"study file {spec.path}: cell {cell.index} [{cell.key}] (recipe {cell.recipe}) is wrong: "
                f"{str(err).rstrip('.')}. "
                "Fix the study's grid / fixed / budget keys or the recipe."
            ) from None
    from vlzoo.study.zeroshot import check_zero_shot

    check_zero_shot(runnable)  # a zero-shot cell is the off-the-shelf model, tested as it is
    if spec.stage0 is not None:
        try:
            validate(load_recipe(spec.stage0, list(spec.stage0_overrides)))
        except RecipeError as err:
            raise StudyError(
                f"study file {spec.path}: key 'study.stage0' ({spec.stage0} with study.stage0_overrides) is "
                f"wrong: {err}"
            ) from None


def _cmd_study(args: argparse.Namespace) -> int:
    from vlzoo.study import load_study, run_cell, run_study
    from vlzoo.study.runner import StudyRun
    from vlzoo.tracking import tracking_uri_for

    words = list(args.study)
    rebuild = words[0] == "report"
    if rebuild:
        words = words[1:]
    if len(words) != 1:
        raise StudyError("usage: vlzoo study [report] STUDY_FILE [--jobs N] [--cell I]")
    spec = load_study(words[0])
    output_dir = Path(args.output_dir or Path("studies") / spec.name).resolve()
    tracking_uri = args.tracking_uri or tracking_uri_for(output_dir)
    if rebuild:
        from vlzoo.study.report import find_parent_run

        again = (f"run `vlzoo study {words[0]}` first, or pass the --output-dir (or --tracking-uri) of the "
                 "study's runs")
        if args.tracking_uri is None and not (output_dir / "mlflow.db").is_file():
            raise StudyError(f"no runs of study '{spec.name}' in {output_dir} (it has no mlflow.db); {again}")
        study = StudyRun(spec, tracking_uri=tracking_uri, output_dir=output_dir)
        try:
            find_parent_run(study.client, study.experiment_name, spec.name)
        except ValueError as err:
            raise StudyError(f"{err} (tracking store {tracking_uri}); {again}") from None
        study.write_spec_tags(command=False)  # the file as it is now: parts appended since are in the report
        path = study.report()
        print(f"vlzoo study: report at {path} (and {path.with_suffix('.html')})")
        return 0
    if args.jobs < 1:
        raise StudyError(f"--jobs must be at least 1, got {args.jobs}")
    if args.cell is None:
        _check_study(spec)  # before the output folder, the tracking store or any run exists
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        study = StudyRun(spec, tracking_uri=tracking_uri, output_dir=output_dir)
        from vlzoo.study.runner import check_fairness

        check_fairness(study.cells, axes=spec.fairness_axes)
        parent = study.parent()
        stage0 = study.stage0_checkpoint()
        study.baselines()
        print(f"vlzoo study: parent run {parent} at {tracking_uri}; stage 0: {stage0 or 'none'}; "
              f"cells 0..{len(study.cells) - 1}")
        return 0
    if args.cell is not None:
        run_id = run_cell(
            spec.path, args.cell, tracking_uri=tracking_uri, output_dir=output_dir, parent_run_id=args.parent_run
        )
        print(f"vlzoo study: cell {args.cell} finished (MLflow run {run_id} at {tracking_uri})")
        return 0
    path = run_study(spec.path, tracking_uri=tracking_uri, output_dir=output_dir, jobs=args.jobs,
                     report=not args.no_report)
    if path is not None:
        print(f"vlzoo study: report at {path} (and {path.with_suffix('.html')}); runs at {tracking_uri}")
    return 0


def _user_error(err: BaseException) -> str | None:
    """The message of a user mistake (bad recipe, override, study file, data or checkpoint), or
    ``None`` for anything else, which stays a traceback: a bug should be seen as one.

    ``err`` or one of its explicit causes (``raise ... from``) must be a :class:`RecipeError`,
    :class:`StudyError`, :class:`~vlzoo.data.DataError` or Lightning's
    ``MisconfigurationException``.  A ``DataError`` raised in a dataloader worker process arrives
    re-raised by torch with the worker's traceback in its message; only the original message is
    kept."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from vlzoo.data.errors import DataError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (RecipeError, StudyError, DataError, MisconfigurationException)):
            text = str(current)
            if isinstance(current, DataError) and "Original Traceback" in text:
                # torch's ExceptionWrapper: "Caught DataError in DataLoader worker ... DataError: <message>"
                text = text.rsplit("DataError: ", 1)[-1]
            return _one_paragraph(text)
        current = current.__cause__
    return None


def _one_paragraph(text: str) -> str:
    """``text`` without blank lines or trailing spaces (a YAML error keeps its pointer lines)."""
    lines = [line.rstrip() for line in str(text).strip().splitlines()]
    return "\n".join(line for line in lines if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 2 a mistake in the command, a recipe,
    a study file, the data or a checkpoint (one paragraph on stderr, no traceback unless
    ``--debug``).  Anything else is a bug and raises with its traceback."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may also come after options (`fit r.yaml --resume trainer.max_epochs=2`)
    unknown = [a for a in rest if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        unknown_arguments(parser, args.verb, unknown)
    if rest:
        args.overrides = list(args.overrides) + rest
    commands = {"print": _cmd_print, "check": _cmd_check, "recipes": _cmd_recipes, "study": _cmd_study}
    from vlzoo.use_commands import COMMANDS as USE_COMMANDS

    commands.update(USE_COMMANDS)  # infer / export / demo
    from vlzoo.scoring.command import COMMANDS as SCORE_COMMANDS

    commands.update(SCORE_COMMANDS)  # score
    command = commands.get(args.verb, _cmd_run)
    try:
        return command(args)
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's loops (inside fit: _cli_support.report_interrupt)
        said = ("; finished cells are kept, run the same command again to run the others" if args.verb == "study"
                else " before training or evaluation started; nothing was saved")
        print(f"vlzoo {args.verb}: interrupted (Ctrl-C){said}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # output piped into e.g. `head`, which stopped reading: not an error of ours
        sys.stderr.close()
        return 0
    except Exception as err:
        message = None if args.debug else _user_error(err)
        if message is None:
            raise
        print(f"vlzoo {args.verb}: error: {message}\n(run again with --debug for the full traceback)", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

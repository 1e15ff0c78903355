"""The ``vlzoo score`` command line (registered by :mod:`vlzoo.cli`: :func:`add_parser`, :data:`COMMANDS`).

::

    vlzoo score ANSWERS.jsonl --recipe RECIPE|DATA_RECIPE --split val|test|SET --codec FAMILY
                [--task rec|res|det] [--frame FRAME] [--min-pixels N] [--max-pixels N] [--factor N] [--square-size N]
                [--bins N] [--json OUT.json] [overrides...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlzoo.data.frames import FAMILY_FRAMES, FRAMES
from vlzoo.paradigms.codecs import CODECS

__all__ = ["add_parser", "COMMANDS"]

HELP = ("score a JSONL file of any model's answers against a dataset split (REC Acc@0.5, RES cIoU, detection AP; "
        "every-frame diagnostic)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``score`` sub-command."""
    p = sub.add_parser("score", help=HELP, description=HELP)
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--allow-target", action="append", default=[], metavar="PREFIX",
                   help="also allow _target_s under this module prefix (for the recipe's dataset)")
    p.add_argument("answers", metavar="ANSWERS", help='JSONL of {"sent_id" or "image_id", "text"}, or vlzoo predict output')
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides of the recipe")
    p.add_argument("--recipe", required=True, help="a recipe, or a data recipe (recipes/data/NAME)")
    p.add_argument("--split", default="val", help="val, test, or the name of one of their sets (default val)")
    p.add_argument("--task", default="rec", choices=["rec", "res", "det"],
                   help="what the answers are: rec boxes (default), res polygons / masks, det labelled boxes")
    p.add_argument("--codec", required=True, choices=list(CODECS), help="the answer syntax (model family)")
    p.add_argument("--frame", default=None, choices=list(FRAMES),
                   help="what the numbers mean (default: the family's, docs/evaluation.md 'Coordinate frames')")
    p.add_argument("--min-pixels", type=int, default=None, help="smart_resize min_pixels (default 3136)")
    p.add_argument("--max-pixels", type=int, default=None, help="smart_resize max_pixels (default 12845056)")
    p.add_argument("--factor", type=int, default=None, help="smart_resize factor (default 28)")
    p.add_argument("--square-size", type=int, default=None,
                   help="side pad_to_square is resized to (default: the padded side, not resized)")
    p.add_argument("--bins", type=int, default=None, help="bins per axis of the 'bins' codec (default 64)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")


def _cmd_score(args: argparse.Namespace) -> int:
    from vlzoo.config import RecipeError
    from vlzoo.data.errors import DataError
    from vlzoo.scoring.score import load_split, read_answers, reference_samples, score_answers

    for name in ("min_pixels", "max_pixels", "factor", "square_size", "bins"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    answers = read_answers(args.answers, task=args.task)  # a bad file is refused before the split is built
    dataset, key = load_split(args.recipe, args.split, overrides=args.overrides, allow_targets=args.allow_target)
    refs = reference_samples(dataset, task=args.task)
    try:
        report = score_answers(answers, refs, codec=args.codec, frame=args.frame or FAMILY_FRAMES[args.codec],
                               answers_file=args.answers, split=f"{args.recipe} {key}", min_pixels=args.min_pixels,
                               max_pixels=args.max_pixels, factor=args.factor, square_size=args.square_size,
                               bins=args.bins, task=args.task)
    except (RecipeError, DataError):
        raise
    except ValueError as err:  # e.g. an image smart_resize refuses (aspect ratio above 200)
        raise RecipeError(f"{args.answers} against {args.recipe} {key}: {err}") from err
    print(report.format(), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"vlzoo: wrote the report to {args.json}")
    return 0


COMMANDS = {"score": _cmd_score}

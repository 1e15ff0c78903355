"""The command-line verbs that use a trained model: ``infer``, ``export`` and ``demo``.

::

    vlzoo infer CHECKPOINT|DIR IMAGE [EXPRESSION] [--task T] [--box x1,y1,x2,y2] [--prompt TEXT]
                [--audio FILE.wav | --ref-box x1,y1,x2,y2 [--ref-kind crop|box]]
                [--overlay OUT.png|DIR] [--output FILE]
    vlzoo export CHECKPOINT DIR [--tracking-uri U] [--overwrite]
    vlzoo export CHECKPOINT FILE --backbone
    vlzoo demo CHECKPOINT|DIR [...] [--port N]

Registered by :mod:`vlzoo.cli` (:func:`add_parsers`, :data:`COMMANDS`); the work is done by
:mod:`vlzoo.inference`, :mod:`vlzoo.export` and :mod:`vlzoo.demo`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlzoo.structures import TASKS

__all__ = ["add_parsers", "COMMANDS"]

HELPS = {
    "infer": "answer about your own image(s): JSON in the image's pixels, an overlay on request",
    "export": "write a self-contained model folder (safetensors, recipe, tokenizer, model card)",
    "demo": "serve a browser demo of one or more trained models on 127.0.0.1",
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``infer``, ``export`` and ``demo`` sub-commands."""
    for verb, text in HELPS.items():
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        p.add_argument("--allow-target", action="append", default=[], metavar="PREFIX",
                       help="allow _target_s under this module prefix that the model's recipe asks for")
        if verb == "infer":
            p.add_argument("model", metavar="CHECKPOINT|DIR", help="a vlzoo fit checkpoint or a vlzoo export folder")
            p.add_argument("image", metavar="IMAGE", help="an image file, a folder of images or a glob pattern")
            p.add_argument("expression", nargs="?", default=None, metavar="EXPRESSION",
                           help="what to find (a category name for det / seg / pose; not needed for reg)")
            p.add_argument("--task", default=None, choices=list(TASKS),
                           help="default: the first task the model was trained for")
            p.add_argument("--box", default=None, metavar="x1,y1,x2,y2", help="a region in the image's pixels (reg)")
            p.add_argument("--prompt", default=None, help="the whole instruction, verbatim (instead of the task's)")
            p.add_argument("--audio", default=None, metavar="FILE.wav",
                           help="a spoken reference in place of the expression (models with an audio reference slot)")
            p.add_argument("--ref-box", default=None, metavar="x1,y1,x2,y2",
                           help="a region of the image as the reference in place of the expression (models with "
                                "crop / box references)")
            p.add_argument("--ref-kind", default=None, choices=["crop", "box"],
                           help="how --ref-box is referred to (default: the one the model's backbone has)")
            p.add_argument("--overlay", default=None, metavar="OUT.png|DIR",
                           help="also draw the answer (a folder when several images are given)")
            p.add_argument("--output", default=None, metavar="FILE", help="write the JSON here instead of stdout")
        elif verb == "export":
            p.add_argument("checkpoint", metavar="CHECKPOINT", help="a vlzoo fit checkpoint (last.ckpt, best-*.ckpt)")
            p.add_argument("folder", metavar="DIR", help="the folder to write (must not exist or be empty); "
                                                         "with --backbone, the backbone file to write")
            p.add_argument("--tracking-uri", default=None,
                           help="MLflow store of the run, for the model card's figures (default: the run's folder)")
            p.add_argument("--overwrite", action="store_true", help="replace DIR (or, with --backbone, FILE) if it exists")
            p.add_argument("--backbone", action="store_true",
                           help="write only the run's backbone (LoRA merged, added tokens) as a file for another "
                                "recipe's backbone.checkpoint")
        else:
            p.add_argument("models", nargs="+", metavar="CHECKPOINT|DIR", help="one or more models, answering side by side")
            p.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one from 7860)")


def _cmd_infer(args: argparse.Namespace) -> int:
    from vlzoo.inference import json_text, run_infer

    result = run_infer(args.model, args.image, args.expression, task=args.task, box=args.box, prompt=args.prompt,
                       overlay=args.overlay, allow_targets=args.allow_target, audio=args.audio,
                       reference_box=args.ref_box, reference_kind=args.ref_kind)
    text = json_text(result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
        print(f"vlzoo: wrote the answer to {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.backbone:
        from vlzoo.checkpoints import export_backbone
        from vlzoo.config import RecipeError

        if Path(args.folder).is_dir() or (Path(args.folder).exists() and not args.overwrite):
            raise RecipeError(f"vlzoo export --backbone: {args.folder} exists; give a new file name "
                              "(or --overwrite to replace a file)")

        path = export_backbone(args.checkpoint, args.folder, allow_targets=args.allow_target)
        print(f"vlzoo: wrote the backbone of {args.checkpoint} to {path} (use it as backbone.checkpoint={path})")
        return 0
    from vlzoo.export import export

    folder = export(args.checkpoint, args.folder, allow_targets=args.allow_target, tracking_uri=args.tracking_uri,
                    overwrite=args.overwrite)
    print(f"vlzoo: exported {args.checkpoint} to {folder} (load it with vlzoo.load({str(folder)!r}))")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlzoo.demo import serve

    serve(args.models, port=args.port, allow_targets=args.allow_target, block=True)
    return 0


COMMANDS = {"infer": _cmd_infer, "export": _cmd_export, "demo": _cmd_demo}

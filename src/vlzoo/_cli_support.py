"""Helpers of :mod:`vlzoo.cli` for a command line used by hand: unknown options named with the
nearest one and what Ctrl-C leaves behind (docs/faults.md, docs/recipes.md).  The checks every
run goes through (a missing split, a validation interval longer than an epoch) are the run
session's (:mod:`vlzoo.session`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["EXIT_INTERRUPTED", "report_interrupt", "unknown_arguments"]


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped with Ctrl-C


def report_interrupt(args: argparse.Namespace, built: Any) -> int:
    """After Ctrl-C in ``vlzoo fit`` (the session marked the run KILLED): say what was saved -
    nothing, and how to checkpoint more often, or the last checkpoint and the command that
    continues it."""
    import shlex

    import torch

    trainer = built.trainer
    last = built.checkpoint_dir / "last.ckpt"
    if last.is_file():
        step = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        again = ["vlzoo", "fit", *([args.recipe] if args.recipe else []), *args.overrides,
                 "--output-dir", str(args.output_dir), *(["--tracking-uri", args.tracking_uri] if args.tracking_uri else []),
                 "--resume-from", str(last)]
        told = (f"the last checkpoint is {last} (step {step}); continue the run with: {shlex.join(again)}"
                " (or `--resume` for the latest run of this recipe)")
    else:
        interval = trainer.val_check_interval
        when = (f"every {interval} training batches (trainer.val_check_interval)"
                if isinstance(interval, int) else "when validation runs (trainer.val_check_interval)")
        told = (f"no checkpoint had been written yet, so nothing was saved. Checkpoints are written {when}; to save "
                "more often, also refresh last.ckpt every N optimizer steps with checkpoint.every_n_train_steps=N "
                "(docs/faults.md)")
    print(f"vlzoo fit: interrupted (Ctrl-C) at global step {trainer.global_step}; {told}", file=sys.stderr)
    return EXIT_INTERRUPTED


def unknown_arguments(parser: argparse.ArgumentParser, verb: str, unknown: Sequence[str]) -> None:
    """Exit 2 naming the first unknown option of ``vlzoo VERB`` and the nearest one it has (an
    unknown ``--flag`` is never taken for an override)."""
    import difflib

    verb_parser = parser.verb_parsers[verb]  # type: ignore[attr-defined]
    options = sorted({o for action in verb_parser._actions for o in action.option_strings
                      if o.startswith("--") and action.help != argparse.SUPPRESS})
    flag = next((a for a in unknown if a.startswith("-")), None)
    if flag is None:
        verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    name = flag.split("=", 1)[0]
    # what another verb calls it: `fit` continues from a checkpoint with --resume-from
    aliases = {"--checkpoint": "--resume-from"} if verb == "fit" else {}
    candidates = [o for o in options if o != "--help"] + list(aliases)
    near = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not near:  # --ckpt -> --checkpoint: an abbreviation scores low on the ratio, but is a subsequence
        near = [o for o in candidates if _subsequence(name.lstrip("-"), o.lstrip("-"))][:1]
    hint = f" Did you mean {aliases.get(near[0], near[0])}?" if near else ""
    verb_parser.error(f"unknown option {name}.{hint} The options of `vlzoo {verb}` are: {', '.join(options)}")


def _subsequence(short: str, long: str) -> bool:
    chars = iter(long)
    return bool(short) and all(c in chars for c in short)

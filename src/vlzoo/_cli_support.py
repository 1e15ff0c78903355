"""Helpers of :mod:`vlzoo.cli` for a command line used by hand: unknown options named with the
nearest one, a missing split said before a run is opened, a validation interval longer than an
epoch said with its keys, and what Ctrl-C leaves behind (docs/faults.md, docs/recipes.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from vlzoo.config import RecipeError

__all__ = ["EXIT_INTERRUPTED", "check_split", "report_interrupt", "raise_if_interval_too_long", "unknown_arguments"]


def check_split(recipe: Any, verb: str) -> None:
    """The split a verb runs on, missing from a VLDataModule recipe: said before anything is built
    or a run is opened (the datamodule would say the same once asked for the dataloader)."""
    from vlzoo.config import locate
    from vlzoo.data import VLDataModule

    split = {"fit": "train", "validate": "val", "test": "test", "predict": "predict"}[verb]
    node = recipe.slot("data")
    if locate(node["_target_"], recipe.allowed_prefixes) is VLDataModule and not node.get(split):
        raise VLDataModule.missing_split(split)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped with Ctrl-C


def report_interrupt(args: argparse.Namespace, built: Any) -> int:
    """After Ctrl-C in ``vlzoo fit``: mark the run KILLED and say what was saved - nothing, and
    how to checkpoint more often, or the last checkpoint and the command that continues it."""
    import shlex

    import torch

    trainer = built.trainer
    if built.run_id and trainer.is_global_zero:
        try:  # Lightning marked it FAILED; the user stopped it
            built.logger.experiment.set_terminated(built.run_id, "KILLED")
        except Exception:  # noqa: BLE001 - a lost tracking server must not hide the message below
            pass
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


def raise_if_interval_too_long(trainer: Any, recipe: Any, err: BaseException) -> None:
    """Lightning refuses a ``val_check_interval`` longer than an epoch when validation is also
    counted in epochs (``check_val_every_n_epoch`` set): said with the keys and the epoch length
    of one process instead of its traceback."""
    interval, every = trainer.val_check_interval, trainer.check_val_every_n_epoch
    batches = getattr(trainer.fit_loop, "max_batches", None)
    if not (isinstance(interval, int) and every is not None and isinstance(batches, int) and interval > batches):
        return
    raise RecipeError(
        f"recipe key trainer.val_check_interval ({interval}, set in {recipe.source('trainer.val_check_interval')}) "
        f"is longer than an epoch: each of the {trainer.world_size} process(es) gets {batches} training batches per "
        f"epoch, and trainer.check_val_every_n_epoch ({every}, set in {recipe.source('trainer.check_val_every_n_epoch')}) "
        "makes Lightning count the interval inside each epoch. Leave check_val_every_n_epoch out (or set it to null) "
        f"to validate every {interval} batches across epochs, or set trainer.val_check_interval to at most {batches}."
    ) from err


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

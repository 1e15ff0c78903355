"""Tiny trained Shapes checkpoints for the tests of ``vlzoo infer`` / ``export`` / ``demo``: a
shipped recipe fitted for a step or two on a handful of scenes in a temporary folder, through
the real command line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vlzoo.config import shipped_recipes_dir

RECIPES = shipped_recipes_dir()
#: a few scenes, a few CPU steps (as tests/test_hardening.py)
SMALL = (
    "trainer=smoke",
    "data.train.size=4",
    "data.val.size=4",
    "data.test.size=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "data.num_workers=0",
)


def fit_tiny(out: Path, recipe: str, overrides: Sequence[str] = (), *, steps: int = 1) -> Path:
    """Fit ``recipes/<recipe>.yaml`` for ``steps`` steps into ``out``; returns its ``last.ckpt``."""
    from vlzoo.cli import main

    assert RECIPES is not None
    argv = ["fit", str(RECIPES / f"{recipe}.yaml"), *SMALL, f"trainer.max_steps={steps}", *overrides,
            "--output-dir", str(out)]
    assert main(argv) == 0
    (ckpt,) = out.rglob("last.ckpt")
    return ckpt


@contextmanager
def demo_server(paths: Sequence[Path]) -> Iterator[str]:
    """``vlzoo demo`` serving ``paths`` on a free port of 127.0.0.1; yields its URL, then stops it."""
    import socket

    from vlzoo.demo import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app = serve(list(paths), port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()

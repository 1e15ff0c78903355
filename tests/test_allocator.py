"""vlzoo.allocator: `vlzoo fit` sets glibc's malloc to keep freed memory (issue 19); the setting is
process-wide, set once, and `VLZOO_MALLOC=system` leaves glibc's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlzoo.allocator import MALLOC_ENV, MALLOC_SETTINGS
from vlzoo.session import RunSession

TINY = Path(__file__).resolve().parent / "support" / "recipes" / "tiny.yaml"

def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None


ON_GLIBC = sys.platform.startswith("linux") and bool(_glibc_version())

PROBE = "import json; from vlzoo.allocator import keep_freed_memory as k; a = k(); print(json.dumps([a, k()]))"


def _probe(**env: str) -> list[dict[str, int]]:
    done = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout)


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's")
def test_glibc_takes_every_setting_once_per_process() -> None:
    first, again = _probe()
    assert first == {name: value for name, _, value in MALLOC_SETTINGS} == again


def test_vlzoo_malloc_system_keeps_the_defaults() -> None:
    assert _probe(**{MALLOC_ENV: "system"}) == [{}, {}]


def test_fit_sets_the_allocator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr("vlzoo.session.keep_freed_memory", lambda: calls.append(1) or {})
    RunSession(TINY, overrides=["trainer.max_steps=1"], output_dir=tmp_path).fit()
    assert calls == [1]

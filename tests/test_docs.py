"""The docs: the tutorials and "import a component" run as written, the public API is explicit
(every module has ``__all__``; docs/api/index.md lists each package's stable names), the API
reference covers every package, and ``mkdocs build --strict`` passes (when mkdocs is installed).

Runnable code blocks (the convention of docs/tutorials/*.md and docs/import_a_component.md):

* ```` ```LANG title="PATH" ```` - a file: written to PATH (relative to the working folder);
* ```` ```bash ```` - commands, run where they appear, in one shell session (``set -e``);
* ```` ```python ```` without a title - on a "session" page, the blocks form one Python script;
* anything else (```` ```text ````, ```` ```yaml ```` without a title) is shown, not run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vlzoo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: pages run as one shell session (files + bash blocks)
SHELL_PAGES = ("tutorials/add_a_paradigm.md", "tutorials/add_a_decoder.md")
#: pages whose untitled python blocks form one script
SESSION_PAGES = ("import_a_component.md",)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def code_blocks(page: Path) -> list[tuple[str, str | None, str]]:
    """``(language, title, body)`` of every fenced block of a Markdown page, in order."""
    blocks = []
    for match in _FENCE.finditer(page.read_text()):
        info = match.group("info").strip()
        lang = info.split()[0] if info else ""
        title = re.search(r'title="([^"]+)"', info)
        indent = match.group("indent")
        body = "".join(
            line[len(indent) :] if line.startswith(indent) else line
            for line in match.group("body").splitlines(keepends=True)
        )
        blocks.append((lang, title.group(1) if title else None, body))
    return blocks


def shell_script(page: Path) -> str:
    """A bash script doing what the page says: write its files, run its commands, in order."""
    lines = ["set -euo pipefail"]
    for lang, title, body in code_blocks(page):
        if title is not None:
            path = Path(title)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"{page}: block title {title!r} must be a relative path inside the work folder")
            marker = "VLZOO_DOCS_EOF"
            assert marker not in body
            lines += [f"mkdir -p {shlex.quote(str(path.parent))}", f"cat > {shlex.quote(title)} <<'{marker}'",
                      body.rstrip("\n"), marker]
        elif lang == "bash":
            lines.append(body.rstrip("\n"))
    return "\n".join(lines) + "\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `python` and `vlzoo` of this interpreter's environment come first
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CI"] = "1"  # no progress bars
    env.pop("PYTHONPATH", None)
    env["NO_MKDOCS_2_WARNING"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}); the docs and the code disagree:\n{out[-6000:]}")
    return out


# --------------------------------------------------------------------------------------------
# the code-block reader itself
# --------------------------------------------------------------------------------------------
def test_code_blocks_are_read_with_titles_and_indentation(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        'Intro.\n\n```python title="pkg/a.py"\nx = 1\n```\n\n1. step\n\n    ```bash\n    echo hi\n    ```\n\n'
        "```text\nnot run\n```\n"
    )
    assert code_blocks(page) == [("python", "pkg/a.py", "x = 1\n"), ("bash", None, "echo hi\n"), ("text", None, "not run\n")]
    script = shell_script(page)
    assert "cat > pkg/a.py" in script and "echo hi" in script and "not run" not in script
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "hi\n"
    assert (tmp_path / "pkg" / "a.py").read_text() == "x = 1\n"


def test_a_failing_block_fails_the_script(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nfalse\necho after\n```\n")
    proc = subprocess.run(["bash", "-c", shell_script(page)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "after" not in proc.stdout


# --------------------------------------------------------------------------------------------
# tutorials and "import a component", run as written
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tutorial_add_a_paradigm_runs_as_written(tmp_path):
    page = DOCS / "tutorials" / "add_a_paradigm.md"
    blocks = code_blocks(page)
    titles = [t for _, t, _ in blocks if t]
    assert "my_paradigm.py" in titles and "recipes/shapes/box_token_rec.yaml" in titles
    out = _run(["bash", "-c", shell_script(page)], tmp_path, "docs/tutorials/add_a_paradigm.md")
    assert "ok: recipes/shapes/box_token_rec.yaml" in out
    assert list((tmp_path / "runs" / "checkpoints").glob("*/last.ckpt"))
    assert re.search(r"test metric\s+test\n", out) and re.search(r"\nrec/acc_0\.5\s+[0-9.]+\n", out), out[-3000:]


@pytest.mark.slow
def test_tutorial_add_a_decoder_runs_as_written(tmp_path):
    page = DOCS / "tutorials" / "add_a_decoder.md"
    titles = [t for _, t, _ in code_blocks(page) if t]
    assert "my_heads.py" in titles
    out = _run(["bash", "-c", shell_script(page)], tmp_path, "docs/tutorials/add_a_decoder.md")
    assert "CentreSizeBoxDecoder: 100% ordered" in out
    assert list((tmp_path / "runs" / "checkpoints").glob("*/last.ckpt"))
    (stored,) = [yaml.safe_load(p.read_text()) for p in (tmp_path / "runs" / "mlruns").glob("*/artifacts/recipe.yaml")]
    assert stored["paradigm"]["box_decoder"]["_target_"] == "my_heads.CentreSizeBoxDecoder"
    assert stored["allow_targets"] == ["my_heads"]  # --allow-target is recorded with the run


@pytest.mark.slow
def test_import_a_component_runs_as_written(tmp_path):
    page = DOCS / "import_a_component.md"
    script = "".join(body for lang, title, body in code_blocks(page) if lang == "python" and title is None)
    assert "SamMaskDecoder" in script and "vlzoo.evaluation" in script and "import vlzoo.config" not in script
    assert "recipe" not in script.lower(), "this page promises code without recipes"
    (tmp_path / "session.py").write_text(script)
    _run([sys.executable, "session.py"], tmp_path, "docs/import_a_component.md")


def test_runnable_pages_follow_the_block_convention():
    for name in SHELL_PAGES:
        blocks = code_blocks(DOCS / name)
        assert any(lang == "bash" for lang, _, _ in blocks), name
        untitled_python = [b for lang, t, b in blocks if lang == "python" and t is None]
        assert not untitled_python, f"{name}: a python block needs title=\"FILE\" to be run"
    for name in SESSION_PAGES:
        blocks = code_blocks(DOCS / name)
        assert not any(lang == "bash" for lang, _, _ in blocks), name
        assert sum(lang == "python" for lang, _, _ in blocks) >= 3, name


# --------------------------------------------------------------------------------------------
# the public API: __all__ everywhere, stable names documented
# --------------------------------------------------------------------------------------------
def _modules() -> list[str]:
    names = ["vlzoo"]
    for info in pkgutil.walk_packages(vlzoo.__path__, prefix="vlzoo."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _packages() -> list[str]:
    return [name for name in _modules() if hasattr(importlib.import_module(name), "__path__")]


def stable_names(page: Path = DOCS / "api" / "index.md") -> dict[str, list[str]]:
    """``{module: [names]}`` from the "## `vlzoo.x`" sections of the stable-names page: every
    name in backticks in the section's list items."""
    text = page.read_text()
    out: dict[str, list[str]] = {}
    for match in re.finditer(r"^## `(vlzoo[\w.]*)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        items = [line for line in match.group(2).splitlines() if line.lstrip().startswith("- ")]
        names = []
        for line in items:
            # "- group: `A`, `B`" - a group label may precede the colon
            names += re.findall(r"`([A-Za-z_][\w]*)`", line.split(":", 1)[-1] if ":" in line else line)
        out[match.group(1)] = names
    return out


def test_every_public_module_declares_all_and_its_names_exist():
    problems = []
    for name in _modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            problems.append(f"{name} has no __all__")
            continue
        if len(set(exported)) != len(exported):
            problems.append(f"{name}.__all__ has duplicates")
        problems += [f"{name}.__all__ names {n}, which does not exist" for n in exported if not hasattr(module, n)]
    assert not problems, "\n".join(problems)


def test_star_import_of_each_package_gives_exactly_its_all():
    for name in _packages():
        namespace: dict[str, object] = {}
        exec(f"from {name} import *", namespace)  # noqa: S102 - the import a user would write
        assert set(namespace) - {"__builtins__"} == set(importlib.import_module(name).__all__), name


def test_documented_stable_names_match_all():
    documented = stable_names()
    expected = _packages() + [m for m in _modules() if m.count(".") == 1 and m not in _packages()]
    assert sorted(documented) == sorted(expected), (
        "docs/api/index.md needs one '## `module`' section per package and top-level module"
    )
    for module, names in documented.items():
        exported = importlib.import_module(module).__all__
        assert len(names) == len(set(names)), f"{module}: a stable name is listed twice in docs/api/index.md"
        missing = sorted(set(exported) - set(names))
        extra = sorted(set(names) - set(exported))
        assert not missing and not extra, (
            f"{module}: docs/api/index.md and __all__ differ: only in __all__ {missing}, only in the docs {extra}"
        )


def test_api_reference_has_a_page_for_every_package_and_top_level_module():
    rendered = set()
    for page in (DOCS / "api").glob("*.md"):
        rendered |= set(re.findall(r"^::: (vlzoo[\w.]*)\s*$", page.read_text(), re.M))
    wanted = {m for m in _modules() if m == "vlzoo" or m.count(".") == 1 or m in _packages()} - {"vlzoo"}
    assert not (wanted - rendered), f"no ::: block in docs/api/ for {sorted(wanted - rendered)}"


# --------------------------------------------------------------------------------------------
# the site builds
# --------------------------------------------------------------------------------------------
def _mkdocs_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "material", "mkdocstrings_handlers.python"))


@pytest.mark.skipif(not _mkdocs_available(), reason="mkdocs, mkdocs-material or mkdocstrings[python] not installed "
                    "(pip install -e '.[docs]')")
def test_mkdocs_build_strict_passes(tmp_path):
    _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
         ROOT, "mkdocs build --strict")
    assert (tmp_path / "site" / "tutorials" / "add_a_paradigm" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "decoders" / "index.html").read_text()
    assert 'id="vlzoo.decoders.SamMaskDecoder"' in api  # mkdocstrings rendered the docstrings


def test_getting_started_shows_the_readme_commands():
    def commands(text: str) -> list[str]:
        section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
        return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]

    readme = commands((ROOT / "README.md").read_text())
    index = [re.sub(r"^ +", "", c, flags=re.M) for c in commands((DOCS / "index.md").read_text())]
    assert len(readme) == 2 and index == readme, "docs/index.md must show the README's two commands"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r":\s*([\w/]+\.md)\s*$", config, re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not (pages - nav), f"pages missing from the nav of mkdocs.yml: {sorted(pages - nav)}"
    assert not (nav - pages), f"nav entries of mkdocs.yml without a page: {sorted(nav - pages)}"

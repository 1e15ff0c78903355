"""``vlzoo demo``: the Gradio app on 127.0.0.1 answers as ``vlzoo.load`` does - over HTTP with
``gradio_client``, and in a headless Chromium that picks an example and presses the button."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vlzoo
from support.trained import demo_server, fit_tiny
from vlzoo.cli import main

gradio = pytest.importorskip("gradio", reason="the demo needs the optional [demo] extra: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (the [demo] extra)")

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two models answering side by side: a checkpoint and the export of it."""
    ckpt = fit_tiny(tmp_path_factory.mktemp("demo"), "shapes/heatmap_rec")
    folder = tmp_path_factory.mktemp("exported") / "heatmap_rec"
    assert main(["export", str(ckpt), str(folder)]) == 0
    return [ckpt, folder]


@pytest.fixture(scope="module")
def server(models: list[Path]):
    with demo_server(models) as url:
        yield url


def test_demo_answers_over_http_as_load_does(server: str, models: list[Path], tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from PIL import Image

    from vlzoo.data import ShapesDataset

    sample = ShapesDataset(split="test", size=3, image_size=64, tasks=["rec"])[2]
    image = tmp_path / "scene.png"
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).resize((96, 80)).save(image)
    expression = sample.targets.expressions[0]
    client = Client(server, verbose=False)
    overlay_a, answer_a, overlay_b, answer_b = client.predict(handle_file(str(image)), expression, "rec", "",
                                                              api_name="/answer")
    expected = vlzoo.load(models[0]).answer(image, expression, task="rec")
    expected.pop("image")
    assert answer_a == expected and answer_b == expected  # the export answers as its checkpoint
    assert Path(overlay_a).is_file() and Path(overlay_b).is_file()
    assert answer_a["image_size"] == [80, 96]
    # a missing expression is said in the answer, not a crash
    _, missing, _, _ = client.predict(handle_file(str(image)), "", "rec", "", api_name="/answer")
    assert "needs an expression" in missing["error"]


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install -y chromium)")
def test_demo_in_a_headless_browser(server: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright "
                                   "(pip install playwright; it uses the system Chromium, no browser download)")
    with sync_api.sync_playwright() as p:
        # playwright starts Chromium with a fresh temporary profile (its own --user-data-dir)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server, wait_until="networkidle")
            assert page.title() == "vlzoo demo"
            example = page.get_by_text("the rightmost circle").first  # a Shapes test scene offered as example
            example.click()
            page.wait_for_function("document.querySelector('#expression textarea, #expression input').value.length > 0")
            page.locator("#answer-button").click()
            answer = page.locator("#answer-0")
            answer.get_by_text("heatmap_peak").wait_for(timeout=120_000)
            text = answer.inner_text()
            assert "where is the rightmost circle?" in text and "boxes" in text
            assert "heatmap_peak" in page.locator("#answer-1").inner_text()
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000

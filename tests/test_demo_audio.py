"""``vlzoo demo`` with a model that has an audio reference slot: the page takes a spoken reference
(a fifth input of ``/answer``) and answers as ``vlzoo.load`` does; its examples include the
Shapes scenes spoken; in a headless Chromium a spoken example answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vlzoo
from support.trained import demo_server, fit_tiny

gradio = pytest.importorskip("gradio", reason="the demo needs the optional [demo] extra: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (the [demo] extra)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None,
                       reason="espeak-ng is not installed (apt-get install -y espeak-ng): the spoken clips are synthesized"),
]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("speech")
        mp.setenv("VLZOO_SPEECH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def ckpt(speech: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny(tmp_path_factory.mktemp("heard"), "shapes/heatmap_audio_res")


@pytest.fixture(scope="module")
def server(ckpt: Path):
    with demo_server([ckpt]) as url:
        yield url


def _scene(tmp_path: Path):
    from PIL import Image

    from vlzoo.data import SpokenShapesDataset

    dataset = SpokenShapesDataset(split="test", size=2, image_size=64, tasks=["res"], reference_tokens=4)
    sample = dataset[1]
    image = tmp_path / "scene.png"
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(image)
    voice, speed = dataset.speaker.voice_of(1)
    wav, _ = dataset.speaker.synthesizer.paths(sample.targets.expressions[0], voice, speed)
    return image, wav


def test_the_demo_hears_a_spoken_reference_as_load_does(server: str, ckpt: Path, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    image, wav = _scene(tmp_path)
    client = Client(server, verbose=False)
    overlay, answer = client.predict(handle_file(str(image)), "", "res", "", handle_file(str(wav)), api_name="/answer")
    expected = vlzoo.load(ckpt).answer(image, audio=wav, task="res")
    for key in ("image", "audio"):
        expected.pop(key)
    assert answer == expected and answer["reference"] == "audio" and Path(overlay).is_file()
    # an expression and a clip at once is said in the answer, not a crash
    _, both = client.predict(handle_file(str(image)), "the red circle", "res", "", handle_file(str(wav)),
                             api_name="/answer")
    assert "not both" in both["error"]


def test_the_examples_include_the_scenes_spoken(ckpt: Path, speech: Path, tmp_path: Path) -> None:
    from vlzoo.demo import hears, shapes_examples

    model = vlzoo.load(ckpt)
    assert hears([model])
    rows = shapes_examples([model], tmp_path)
    text = [r for r in rows if r[4] is None]
    spoken = [r for r in rows if r[4] is not None]
    assert len(text) == 4 and len(spoken) == 4 and all(len(r) == 5 for r in rows)
    for row in spoken:
        assert row[1] == "" and row[2] == "res" and Path(row[4]).is_file() and Path(row[4]).suffix == ".wav"
        answer = model.answer(row[0], audio=row[4], task="res")
        assert answer["reference"] == "audio" and answer["prompt"].startswith("segment <ref_start><ref_audio>")


@pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install -y chromium)")
def test_a_spoken_example_answers_in_a_headless_browser(server: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright "
                                   "(pip install playwright; it uses the system Chromium, no browser download)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1200})
            page.goto(server, wait_until="networkidle")
            assert page.locator("#audio").count() == 1  # the spoken-reference input is on the page
            rows = page.locator(".gallery-item, tbody tr")
            rows.last.click()  # the last example is a spoken one (no expression)
            page.locator("#audio audio").first.wait_for(state="attached", timeout=30_000)  # the clip is loaded
            page.locator("#answer-button").click()
            answer = page.locator("#answer-0")
            answer.get_by_text("heatmap_peak").wait_for(timeout=120_000)
            text = answer.inner_text()
            assert "<ref_audio>" in text and "audio" in text
        finally:
            browser.close()

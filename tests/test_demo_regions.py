"""``vlzoo demo`` with a model that takes a region as a reference (AnyRef's crop references): the
page takes a referred region and its kind (``/answer``'s last two inputs) and answers as
``vlzoo.load`` does; a bad region or a kind the model lacks is said in the answer."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlzoo
from support.trained import demo_server, fit_tiny

gradio = pytest.importorskip("gradio", reason="the demo needs the optional [demo] extra: pip install -e '.[demo]'")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client (the [demo] extra)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_tiny(tmp_path_factory.mktemp("regions"), "shapes/pixel2emb_anyref_res")


@pytest.fixture(scope="module")
def server(ckpt: Path):
    with demo_server([ckpt]) as url:
        yield url


def _scene(tmp_path: Path) -> tuple[Path, list[float]]:
    from PIL import Image

    from vlzoo.data import ShapesDataset

    sample = ShapesDataset(split="test", size=2, image_size=64, tasks=["res"])[1]
    image = tmp_path / "scene.png"
    Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(image)
    return image, [float(v) for v in sample.targets.boxes[0]]


def test_the_demo_takes_a_referred_region_as_load_does(server: str, ckpt: Path, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    from vlzoo.demo import region_kinds

    model = vlzoo.load(ckpt)
    assert region_kinds([model]) == ["crop"]
    image, box = _scene(tmp_path)
    region = ",".join(f"{v:g}" for v in box)
    client = Client(server, verbose=False)
    overlay, answer = client.predict(handle_file(str(image)), "", "res", "", region, "model default", api_name="/answer")
    expected = model.answer(image, reference_box=box, task="res")
    expected.pop("image")
    assert answer == expected and answer["reference"] == "crop" and answer["reference_box"] == box
    assert Path(overlay).is_file()
    _, same = client.predict(handle_file(str(image)), "", "res", "", region, "crop", api_name="/answer")
    assert same == expected
    _, bad = client.predict(handle_file(str(image)), "", "res", "", "1,2,3", "model default", api_name="/answer")
    assert "referred region '1,2,3': give four numbers" in bad["error"]
    # text still works, the region left empty
    _, text = client.predict(handle_file(str(image)), "the red circle", "res", "", "", "model default", api_name="/answer")
    assert "error" not in text and "reference" not in text

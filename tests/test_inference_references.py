"""``vlzoo.load`` / ``vlzoo infer`` asked about a reference instead of an expression: a spoken clip
(a WAV file or ``(samples, rate)``) or a region of the image as a crop reference.  The answer is
the one the datamodule path gives for the same sample (``vlzoo predict`` on Spoken Shapes; the
recipe's collate for a crop reference), the reference changes the answer, and a model without
the reference slot refuses it, naming what it takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlzoo
from support.trained import fit_tiny
from vlzoo.cli import main
from vlzoo.data.templates import instruction
from vlzoo.inference import TrainedModel
from vlzoo.structures import Sample, Targets, reference_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None,
                       reason="espeak-ng is not installed (apt-get install -y espeak-ng): Spoken Shapes synthesizes its clips"),
]
K = 4
SIZE = 6
PREDICT = (f"{{_target_: vlzoo.data.SpokenShapesDataset, split: test, size: {SIZE}, image_size: 64, tasks: [res], "
           f"reference_tokens: {K}}}")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory):
    """One clip cache for the module (the fit, vlzoo predict and the tests read the same WAVs)."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("speech")
        mp.setenv("VLZOO_SPEECH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def ckpt(speech: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The heatmap Spoken Shapes RES recipe with audio and crop references, fitted two steps: every
    answer has a box, a mask and a heatmap, whatever it was asked."""
    return fit_tiny(tmp_path_factory.mktemp("heard"), "shapes/heatmap_audio_res",
                    ["backbone.references.modalities=[audio,crop]"], steps=2)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> TrainedModel:
    return vlzoo.load(ckpt)


@pytest.fixture(scope="module")
def spoken(speech: Path):
    from vlzoo.data import SpokenShapesDataset

    return SpokenShapesDataset(split="test", size=SIZE, image_size=64, tasks=["res"], reference_tokens=K)


def _wav(dataset, index: int) -> Path:
    """The cached WAV file of item ``index``'s clip (what a user would hand over)."""
    sample = dataset.dataset[index] if hasattr(dataset, "dataset") else dataset[index]
    voice, speed = dataset.speaker.voice_of(index)
    path, _ = dataset.speaker.synthesizer.paths(sample.targets.expressions[0], voice, speed)
    assert path.is_file()
    return path


def _png(image: torch.Tensor, path: Path) -> Path:
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def test_a_spoken_reference_answers_as_vlzoo_predict_does(ckpt, model, spoken, tmp_path, capsys) -> None:
    output = tmp_path / "predictions.json"
    argv = ["predict", "--checkpoint", str(ckpt), f"data.predict={PREDICT}", "data.eval_batch_size=1",
            f"trainer.limit_predict_batches={SIZE}", "--output", str(output), "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    records = {r["image_id"]: r for r in json.loads(output.read_text())}
    assert len(records) == SIZE
    span = reference_text("audio", K)
    routes = set()
    for index in range(SIZE):
        sample = spoken[index]
        if sample.prompt == instruction("res", expr=span):  # the phrasing vlzoo.load writes: a WAV file
            pred = model(sample.image, audio=_wav(spoken, index), task="res")
            routes.add("wav")
        else:  # another phrasing of the dataset's: given verbatim, the clip as (samples, rate)
            clip = sample.reference_audio
            pred = model(sample.image, audio=(clip.waveform.numpy(), clip.sample_rate), task="res", prompt=sample.prompt)
            routes.add("array")
        record = records[index]
        x1, y1, x2, y2 = pred.boxes[0].tolist()
        assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(record["bbox"], abs=1e-5)
        assert float(pred.scores[0]) == pytest.approx(record["score"], abs=1e-7)
        from vlzoo.predictions import encode_rle

        assert encode_rle(pred.masks[0]) == record["segmentation"]  # the same mask
    assert routes == {"wav", "array"}, routes
    # vlzoo infer --audio: the same answer, and it says what it was asked about
    index = next(i for i in range(SIZE) if spoken[i].prompt == instruction("res", expr=span))
    sample, wav = spoken[index], _wav(spoken, index)
    png = _png(sample.image, tmp_path / "scene.png")
    capsys.readouterr()
    assert main(["infer", str(ckpt), str(png), "--audio", str(wav), "--task", "res", "--overlay",
                 str(tmp_path / "heard.png")]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["prompt"] == sample.prompt and answer["reference"] == "audio" and answer["audio"] == str(wav)
    assert answer["masks"][0] == records[index]["segmentation"] and (tmp_path / "heard.png").is_file()
    assert answer["scores"][0] == pytest.approx(records[index]["score"], abs=1e-4)


def test_the_clip_is_what_the_answer_depends_on(model, spoken) -> None:
    sample = spoken[0]
    heard = model(sample.image, audio=_wav(spoken, 0), task="res")
    other = next(i for i in range(1, SIZE) if spoken[i].targets.expressions[0] != sample.targets.expressions[0])
    otherwise = model(sample.image, audio=_wav(spoken, other), task="res")
    assert not torch.equal(heard.evidence["heatmap"], otherwise.evidence["heatmap"])
    # a clip at another rate is resampled by the audio encoder: it answers, in the image's pixels
    clip = sample.reference_audio
    slow = model(sample.image, audio=(clip.waveform[::2].numpy(), clip.sample_rate // 2), task="res")
    assert slow.image_size == (64, 64) and len(slow) == 1
    # one clip for a list of images, or a list of one per image
    both = model([sample.image, spoken[other].image], audio=[_wav(spoken, 0), _wav(spoken, other)], task="res")
    torch.testing.assert_close(both[0].boxes, heard.boxes, atol=1e-4, rtol=0)


REGIONS = (f"{{_target_: vlzoo.data.RegionReferences, modality: crop, reference_tokens: {K}, dataset: "
           f"{{_target_: vlzoo.data.ShapesDataset, split: test, size: {SIZE}, image_size: 64, tasks: [res]}}}}")


def test_a_crop_reference_answers_as_vlzoo_predict_does(ckpt, model, tmp_path) -> None:
    """A region as a crop reference: the answer to Shapes RES with the target shown as a crop
    (vlzoo.data.RegionReferences through vlzoo predict) is the one vlzoo.load gives for its box."""
    from vlzoo.data import RegionReferences, ShapesDataset
    from vlzoo.predictions import encode_rle

    output = tmp_path / "predictions.json"
    argv = ["predict", "--checkpoint", str(ckpt), f"data.predict={REGIONS}", "data.eval_batch_size=1",
            f"trainer.limit_predict_batches={SIZE}", "--output", str(output), "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    records = {r["image_id"]: r for r in json.loads(output.read_text())}
    regions = RegionReferences(dataset=ShapesDataset(split="test", size=SIZE, image_size=64, tasks=["res"]),
                               modality="crop", reference_tokens=K)
    routes = set()
    for index in range(SIZE):
        sample = regions[index]
        box = sample.prompt_boxes[0].tolist()
        default = sample.prompt == instruction("res", expr=reference_text("crop", K))
        routes.add(default)
        pred = model(sample.image, reference_box=box, task="res", prompt=None if default else sample.prompt)
        record = records[index]
        x1, y1, x2, y2 = pred.boxes[0].tolist()
        assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(record["bbox"], abs=1e-5)
        assert float(pred.scores[0]) == pytest.approx(record["score"], abs=1e-7)
        assert encode_rle(pred.masks[0]) == record["segmentation"]
    assert routes == {True, False}  # the phrasing vlzoo.load writes, and another given verbatim


def test_a_crop_reference_answers_as_the_recipes_collate_does(model, spoken) -> None:
    """A region of an image of another size as a crop reference: the sample a dataset would write
    ("segment <crop span>.", the box in Sample.prompt_boxes) through the recipe's own collate and
    predict_step."""
    image = Image.fromarray(spoken[1].image.permute(1, 2, 0).numpy()).resize((96, 80))  # not the input size
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    box = [12.0, 10.0, 60.0, 50.0]
    pred = model(image, reference_box=box, task="res")
    written = Sample(pixels, "res", instruction("res", expr=reference_text("crop", K)),
                     Targets(image_id=0, image_size=(80, 96)), prompt_boxes=torch.tensor([box]))
    batch = model.datamodule.collate(require_answers=False)([written])
    assert reference_text("crop", K) in batch.prompts[0]
    with torch.inference_mode():
        (expected,) = model.model.predict_step(batch, 0)
    assert pred.image_size == (80, 96)
    assert torch.equal(pred.boxes, expected.boxes) and torch.equal(pred.masks, expected.masks)
    assert torch.equal(pred.evidence["heatmap"], expected.evidence["heatmap"])
    elsewhere = model(image, reference_box=[60.0, 40.0, 90.0, 78.0], task="res")
    assert not torch.equal(pred.evidence["heatmap"], elsewhere.evidence["heatmap"])  # the crop is read
    answer = model.answer(image, reference_box=box, task="res")
    assert answer["reference"] == "crop" and answer["reference_box"] == box


def test_a_reference_the_model_has_no_slot_for_is_refused(ckpt, model, spoken, tmp_path, capsys) -> None:
    png = _png(spoken[0].image, tmp_path / "scene.png")
    assert main(["infer", str(ckpt), str(png), "--ref-box", "1,1,30,30", "--ref-kind", "box"]) == 2
    err = capsys.readouterr().err
    assert "takes no box reference" in err and "['audio', 'crop']" in err and "Traceback" not in err
    assert main(["infer", str(ckpt), str(png), "--ref-box", "1,1,30"]) == 2
    assert "--ref-box '1,1,30'" in capsys.readouterr().err
    assert main(["infer", str(ckpt), str(png), "--audio", str(tmp_path / "none.wav")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expression or a spoken clip"):
        model(png, "the red circle", audio=_wav(spoken, 0), task="res")
    with pytest.raises(ValueError, match="one reference at a time"):
        model(png, audio=_wav(spoken, 0), reference_box=[1, 1, 30, 30], task="res")
    # a model without a reference encoder: text only, and it says so
    from vlzoo.build import build
    from vlzoo.config import shipped_recipes_dir

    built = build(shipped_recipes_dir() / "shapes" / "heatmap_res.yaml", with_trainer=False, with_logger=False,
                  overrides=["data.num_workers=0"])
    text_only = TrainedModel(built.model.eval(), built.datamodule, built.recipe, source=tmp_path / "text-only")
    assert text_only.reference_modalities == ()
    with pytest.raises(ValueError, match=r"takes no spoken reference.*no reference encoder \(backbone.references\)"):
        text_only(png, audio=_wav(spoken, 0), task="res")
    with pytest.raises(ValueError, match="takes no crop or box reference"):
        text_only(png, reference_box=[1, 1, 30, 30], task="res")


def test_an_export_hears_as_its_checkpoint(ckpt, model, spoken, tmp_path) -> None:
    folder = tmp_path / "heard-export"
    assert main(["export", str(ckpt), str(folder)]) == 0
    exported = vlzoo.load(folder)
    assert exported.reference_modalities == ("audio", "crop") and exported.reference_tokens == K
    sample, wav = spoken[2], _wav(spoken, 2)
    a, b = model(sample.image, audio=wav, task="res"), exported(sample.image, audio=wav, task="res")
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.evidence["heatmap"], b.evidence["heatmap"])

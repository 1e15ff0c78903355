"""Spoken Shapes: espeak-ng clips, deterministic per (seed, index), cached by content hash (a
second run synthesizes nothing), corrupt cache entries regenerated, a missing synthesizer named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlzoo.data import SpokenReferences, SpokenShapesDataset
from vlzoo.data.shapes.dataset import ShapesDataset
from vlzoo.data.speech import EspeakSynthesizer, SynthesizerMissing, read_wav
from vlzoo.structures import reference_text

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")


def test_a_missing_synthesizer_names_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(SynthesizerMissing, match="apt-get install -y espeak-ng"):
        EspeakSynthesizer(cache_dir=str(tmp_path), program="no-such-espeak-ng")
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on PATH
    with pytest.raises(SynthesizerMissing, match="espeak-ng"):
        SpokenShapesDataset(size=2, tasks=["res"], cache_dir=str(tmp_path))


@needs_espeak
def test_spoken_shapes_replaces_the_expression_by_the_clip(tmp_path):
    text = ShapesDataset(split="val", size=6, image_size=32, tasks=["rec", "res", "det"], seed=3)
    spoken = SpokenShapesDataset(split="val", size=6, image_size=32, tasks=["rec", "res", "det"], seed=3,
                                 cache_dir=str(tmp_path), reference_tokens=4)
    seen = 0
    for i in range(6):
        a, b = text[i], spoken[i]
        assert a.task == b.task and torch.equal(a.targets.boxes, b.targets.boxes)
        if a.task in ("rec", "res"):
            seen += 1
            expr = a.targets.expressions[0]
            assert expr not in b.prompt and reference_text("audio", 4) in b.prompt
            assert b.prompt == a.prompt.replace(expr, reference_text("audio", 4))
            clip = b.reference_audio
            assert clip.sample_rate == 22050 and 0.3 < clip.seconds < 6 and clip.waveform.abs().max() > 0.05
        else:
            assert b.reference_audio is None and b.prompt == a.prompt
    assert seen


@needs_espeak
def test_clips_are_deterministic_and_a_second_run_synthesizes_nothing(tmp_path):
    make = lambda: SpokenShapesDataset(split="train", size=8, image_size=32, tasks=["res"], seed=1, cache_dir=str(tmp_path))  # noqa: E731
    first = make()
    clips = [first[i].reference_audio for i in range(8)]
    assert first.speaker.synthesizer.synthesized >= 1
    voices = {first.speaker.voice_of(i) for i in range(40)}
    assert len({v for v, _ in voices}) >= 3 and len({s for _, s in voices}) >= 2  # several voices and speeds
    second = make()
    again = [second[i].reference_audio for i in range(8)]
    assert second.speaker.synthesizer.synthesized == 0  # every clip from the cache
    for a, b in zip(clips, again, strict=True):
        assert torch.equal(a.waveform, b.waveform)
    assert [second.speaker.voice_of(i) for i in range(8)] == [first.speaker.voice_of(i) for i in range(8)]
    # the key is the content: another speed is another clip
    synth = second.speaker.synthesizer
    assert synth.key("the red circle", "en-us", 140) != synth.key("the red circle", "en-us", 175)
    assert synth.key("the red circle", "en-us", 140) == EspeakSynthesizer(cache_dir=str(tmp_path)).key("the red circle", "en-us", 140)


@needs_espeak
@pytest.mark.parametrize("damage", ["truncate", "flip", "record", "missing_record"])
def test_a_corrupt_cached_clip_is_synthesized_again(tmp_path, damage):
    synth = EspeakSynthesizer(cache_dir=str(tmp_path))
    clip = synth("the small blue square", voice="en-gb", speed=175)
    wav, record = synth.paths("the small blue square", "en-gb", 175)
    good = wav.read_bytes()
    if damage == "truncate":
        wav.write_bytes(good[: len(good) // 2])
    elif damage == "flip":  # same length, one sample changed: only the checksum tells
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        wav.write_bytes(bytes(data))
    elif damage == "record":
        record.write_text("{not json")
    else:
        record.unlink()
    fresh = EspeakSynthesizer(cache_dir=str(tmp_path))
    again = fresh("the small blue square", voice="en-gb", speed=175)
    assert fresh.synthesized == 1
    assert torch.equal(again.waveform, clip.waveform)
    assert wav.read_bytes() == good and json.loads(record.read_text())["voice"] == "en-gb"
    assert EspeakSynthesizer(cache_dir=str(tmp_path))("the small blue square", voice="en-gb", speed=175) is not None


def test_read_wav_refuses_a_truncated_file(tmp_path):
    import wave

    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x10" * 800)
    clip = read_wav(path)
    assert clip.sample_rate == 8000 and clip.waveform.numel() == 800
    with pytest.raises(ValueError, match="truncated"):
        read_wav(path.read_bytes()[:-100])


@needs_espeak
def test_any_referring_dataset_can_be_spoken(tmp_path):
    inner = ShapesDataset(split="test", size=3, image_size=32, tasks=["rec"])
    spoken = SpokenReferences(dataset=inner, cache_dir=str(tmp_path), reference_tokens=2)
    assert len(spoken) == 3
    assert reference_text("audio", 2) in spoken[0].prompt and spoken[0].reference_audio is not None


def test_a_clip_in_meta_is_refused_naming_the_typed_field():
    from vlzoo.data import DataError
    from vlzoo.data.datamodule import check_query

    sample = ShapesDataset(split="val", size=2, image_size=32, tasks=["rec"])[0]
    sample.meta["reference_audio"] = "clip.wav"
    with pytest.raises(DataError, match="Sample.reference_audio"):
        check_query(sample)

"""A spoken reference from a WAV file or an array: mono, scaled to [-1, 1], the clip Spoken Shapes
gives for its own cached WAV, and bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from vlzoo.data.audio_files import read_audio
from vlzoo.data.speech import read_wav
from vlzoo.structures import AudioClip

RATE = 22050


def _tone(seconds: float = 0.3, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_a_16_bit_wav_reads_as_the_speech_cache_reader_reads_it(tmp_path):
    path = tmp_path / "mono.wav"
    wavfile.write(path, RATE, (_tone() * 32767).astype(np.int16))
    clip = read_audio(path)
    expected = read_wav(path)
    assert clip.sample_rate == RATE == expected.sample_rate
    assert torch.equal(clip.waveform, expected.waveform)


def test_stereo_8_bit_and_float_wavs_become_mono_in_minus_one_to_one(tmp_path):
    tone = _tone()
    stereo = np.stack([tone, -tone * 0.5], axis=1)
    wavfile.write(tmp_path / "stereo.wav", RATE, (stereo * 32767).astype(np.int16))
    clip = read_audio(tmp_path / "stereo.wav")
    np.testing.assert_allclose(clip.waveform.numpy(), 0.25 * tone, atol=1e-4)
    wavfile.write(tmp_path / "u8.wav", RATE, ((tone + 1.0) * 127.5).astype(np.uint8))
    np.testing.assert_allclose(read_audio(tmp_path / "u8.wav").waveform.numpy(), tone, atol=2 / 128)  # 8-bit steps
    wavfile.write(tmp_path / "f32.wav", 8000, tone.astype(np.float32))
    as_float = read_audio(tmp_path / "f32.wav")
    assert as_float.sample_rate == 8000
    np.testing.assert_allclose(as_float.waveform.numpy(), tone, atol=1e-6)


def test_samples_and_rate_in_either_order_arrays_and_tensors():
    tone = _tone()
    ints = (tone * 32767).astype(np.int16)
    a = read_audio((tone.astype(np.float32), RATE))
    b = read_audio((RATE, ints))  # Gradio's order and dtype
    c = read_audio((torch.from_numpy(tone), float(RATE)))  # librosa gives the rate as a float
    assert a.sample_rate == b.sample_rate == c.sample_rate == RATE
    np.testing.assert_allclose(b.waveform.numpy(), a.waveform.numpy(), atol=1e-4)
    assert torch.allclose(c.waveform, a.waveform)
    channels_first = read_audio((np.stack([ints, ints]), RATE))  # (C, S)
    assert torch.equal(channels_first.waveform, b.waveform)
    clip = AudioClip(torch.zeros(10), 16000)
    assert read_audio(clip) is clip


@pytest.mark.parametrize(
    "value, says",
    [
        ((np.zeros(100), 0), "positive whole number of Hz"),
        ((np.zeros(100), 16000.5), "positive whole number of Hz"),
        ((np.zeros((2, 3, 4)), 16000), "mono samples"),
        ((np.array(["a", "b"]), 16000), "integers or floats"),
        (3.5, "WAV file path"),
    ],
)
def test_bad_values_are_named(value, says):
    with pytest.raises((ValueError, TypeError), match=says):
        read_audio(value, name="the clip")


def test_a_file_that_is_not_a_wav_is_named(tmp_path):
    bad = tmp_path / "clip.mp3"
    bad.write_bytes(b"ID3 not a wav at all")
    with pytest.raises(ValueError, match=r"clip\.mp3 is not a WAV file.*ffmpeg"):
        read_audio(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_audio(tmp_path / "missing.wav")

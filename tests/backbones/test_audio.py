"""The audio encoder slot: the Whisper log-mel front end against a direct computation, clips
shorter / longer than the window, the pretrained-folder path, and the training policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlzoo.backbones import WhisperAudioEncoder
from vlzoo.backbones.audio import TINY_WHISPER, resample
from vlzoo.structures import AudioClip


def _chirp(seconds: float, rate: int = 16000) -> AudioClip:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)
    return AudioClip(torch.from_numpy(wave).float(), rate)


def _numpy_log_mel(wave: np.ndarray, *, n_samples: int, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel written out: pad to the window, centred STFT (periodic Hann, 400 / 160),
    power, Slaney mel filters, log10, an 8-decade floor below the peak, then (x + 4) / 4."""
    from transformers.audio_utils import mel_filter_bank

    n_fft, hop = 400, 160
    x = np.zeros(n_samples, dtype=np.float64)
    x[: min(len(wave), n_samples)] = wave[:n_samples]
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[i : i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, 201)
    filters = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    log = np.log10(np.maximum(power @ filters, 1e-10)).T[:, :-1]
    log = np.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return WhisperAudioEncoder(config=TINY_WHISPER)


def test_the_front_end_is_whispers_log_mel(encoder):
    from transformers import WhisperFeatureExtractor

    clip = _chirp(1.3)
    ours = encoder.log_mel(clip).numpy()
    assert ours.shape == (80, 200) and encoder.window_seconds == 2.0
    direct = _numpy_log_mel(clip.waveform.numpy(), n_samples=32000)
    assert np.abs(ours - direct).max() < 2e-4
    library = WhisperFeatureExtractor(feature_size=80, chunk_length=2)(
        clip.waveform.numpy(), sampling_rate=16000, return_tensors="np"
    )["input_features"][0]
    assert np.abs(ours - library).max() < 1e-6


def test_a_clip_at_another_rate_is_resampled_first(encoder):
    clip = _chirp(1.0, rate=22050)
    assert torch.allclose(encoder.log_mel(clip), encoder.log_mel(AudioClip(resample(clip.waveform, 22050, 16000), 16000)))
    assert resample(clip.waveform, 22050, 16000).numel() == 16000


def test_a_short_clip_is_padded_and_a_long_one_cut(encoder):
    short, exact, long = _chirp(0.5), _chirp(2.0), _chirp(3.2)
    mel = encoder.log_mel(short)
    assert mel.shape == (80, 200)
    # after the clip (0.5 s = 50 frames, plus the STFT's half window) only the padding's floor remains
    tail = mel[:, 55:]
    assert torch.allclose(tail, tail[:, :1].expand_as(tail))
    assert not torch.allclose(mel[:, :45], tail[:, :45])
    # a long clip is its first 2 s
    assert torch.allclose(encoder.log_mel(long), encoder.log_mel(AudioClip(long.waveform[:32000], 16000)))
    assert [encoder.valid_frames(c) for c in (short, exact, long)] == [26, 100, 100]
    states, valid = encoder([short, long])
    assert states.shape == (2, 100, 32) and valid.tolist() == [26, 100]


def test_a_pretrained_folder_loads_back(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(1)
    saved = WhisperModel(WhisperConfig(**TINY_WHISPER)).eval()
    saved.save_pretrained(tmp_path / "whisper")
    loaded = WhisperAudioEncoder(pretrained=str(tmp_path / "whisper")).eval()
    clip = _chirp(1.0)
    with torch.no_grad():
        states, _ = loaded([clip])
        expected = saved.get_encoder()(input_features=loaded.log_mel(clip)[None]).last_hidden_state
    assert torch.allclose(states, expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        WhisperAudioEncoder(pretrained=str(tmp_path / "missing"))


def test_a_window_that_is_not_whole_seconds_is_refused():
    with pytest.raises(ValueError, match="max_source_positions"):
        WhisperAudioEncoder(config={"max_source_positions": 75})


def test_frozen_trainable_and_lora_policies():
    frozen = WhisperAudioEncoder(freeze=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = WhisperAudioEncoder()
    assert all(p.requires_grad for p in trainable.parameters())
    lora = WhisperAudioEncoder(lora={"r": 2, "alpha": 4})
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    states, _ = lora([_chirp(0.5)])
    states.sum().backward()
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="exclude"):
        WhisperAudioEncoder(freeze=True, lora={"r": 2})

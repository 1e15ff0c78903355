"""A spoken reference from what a user has at hand: a WAV file, a ``(samples, rate)`` array or an
:class:`~vlzoo.structures.AudioClip` -> a mono :class:`~vlzoo.structures.AudioClip`.

WAV files are read with ``scipy.io.wavfile`` (PCM 8 / 16 / 24 / 32-bit and float WAVs; a
dependency already), channels are averaged and integer samples scaled to [-1, 1] as the
standard library's ``wave`` reader of :func:`vlzoo.data.speech.read_wav` does for 16-bit files,
so a clip read here from a cached Spoken Shapes WAV is the clip the dataset gives.  The clip keeps
its own sample rate: the audio encoder resamples it to its rate
(:meth:`vlzoo.backbones.WhisperAudioEncoder.log_mel`), for a clip from a dataset and one given
here alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlzoo.structures import AudioClip

__all__ = ["read_audio"]


def _mono(array: Any, *, name: str) -> np.ndarray:
    """Mono float32 samples from an ``(S,)``, ``(S, C)`` or ``(C, S)`` (C <= 8) array: integer
    samples scaled by their type's range to [-1, 1] (unsigned 8-bit centred on 128), floats taken
    as they are; channels averaged."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    data = np.asarray(array)
    if data.ndim == 2 and data.shape[0] < data.shape[1] and data.shape[0] <= 8:
        data = data.T  # channels first
    if data.ndim not in (1, 2) or data.size == 0:
        raise ValueError(f"{name}: expected mono samples (S,) or (S, channels), got shape {tuple(np.shape(array))}")
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        middle = (int(info.max) + 1) // 2 if info.min == 0 else 0
        scale = float(middle) if info.min == 0 else float(-int(info.min))
        data = (data.astype(np.float64) - middle) / scale
    elif not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"{name}: samples must be integers or floats in [-1, 1], got {data.dtype}")
    if data.ndim == 2:
        data = data.astype(np.float64).mean(axis=1)
    return np.ascontiguousarray(data, dtype=np.float32)


def read_audio(audio: Any, *, name: str = "audio") -> AudioClip:
    """A mono :class:`AudioClip` from a WAV file path, an :class:`AudioClip`, or a pair of samples
    (``(S,)`` / ``(S, channels)`` array or tensor; ints scaled to [-1, 1], floats as given) and
    sample rate in either order - ``(samples, rate)``, or ``(rate, samples)`` as Gradio's audio
    component gives.  A bad file or value is a ``ValueError`` naming it (``name``) and what to give."""
    if isinstance(audio, AudioClip):
        return audio
    if isinstance(audio, (str, Path)):
        return _read_wav_file(Path(audio))
    if isinstance(audio, (tuple, list)) and len(audio) == 2:
        first, second = audio
        rate, samples = (first, second) if np.ndim(first) == 0 else (second, first)
        if not _is_rate(rate):
            raise ValueError(f"{name}: give (samples, sample rate) with the rate a positive whole number of Hz, got {rate!r}")
        return AudioClip(torch.from_numpy(_mono(samples, name=name)), int(rate))
    raise TypeError(
        f"{name}: expected a WAV file path, an AudioClip or (samples, sample rate), got {type(audio).__name__}"
    )


def _is_rate(value: Any) -> bool:
    """A sample rate: a positive whole number of Hz (``16000``, ``np.int64(16000)``, ``16000.0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return float(value).is_integer() and float(value) > 0


def _read_wav_file(path: Path) -> AudioClip:
    from scipy.io import wavfile

    if not path.is_file():
        raise ValueError(f"audio file {path} does not exist (give a WAV file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks (LIST metadata ...)
            rate, data = wavfile.read(str(path))
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"audio file {path} is not a WAV file vlzoo can read ({err}); give a PCM or float WAV "
            "(convert other formats first, e.g. `ffmpeg -i clip.mp3 clip.wav`)"
        ) from None
    if data.size == 0:
        raise ValueError(f"audio file {path} holds no samples")
    return AudioClip(torch.from_numpy(_mono(data, name=str(path))), int(rate))

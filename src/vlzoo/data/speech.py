"""Synthesized speech for spoken references: espeak-ng, a content-hashed cache on disk.

:class:`EspeakSynthesizer` renders a text with one voice and speed to a 16-bit mono WAV with
the ``espeak-ng`` program (Debian / Ubuntu: ``apt-get install espeak-ng``).  Every clip is kept
in ``cache_dir`` under the SHA-256 of ``(text, voice, speed, synthesizer version)``, beside a
small JSON record of the same key and the SHA-256 of the WAV bytes, so a second run reads the
clip instead of synthesizing it again.  A cached clip whose bytes do not match its record (a
truncated write, a changed file) or that does not parse is synthesized again and replaced,
never used as it is.  Writes are atomic (a temporary file, then a rename), so concurrent
dataloader workers never see half a clip.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch

from vlzoo.data.errors import DataError
from vlzoo.structures import AudioClip

__all__ = ["EspeakSynthesizer", "SynthesizerMissing", "read_wav", "default_speech_cache"]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install espeak-ng (Debian / Ubuntu: `apt-get install -y espeak-ng`; macOS: `brew install espeak-ng`) "
    "or point `program` at the espeak-ng executable"
)


class SynthesizerMissing(DataError):
    """The speech synthesizer program is not installed."""


def default_speech_cache() -> Path:
    """``$VLZOO_SPEECH_CACHE``, else ``$XDG_CACHE_HOME/vlzoo/speech`` (``~/.cache/vlzoo/speech``)."""
    if os.environ.get("VLZOO_SPEECH_CACHE"):
        return Path(os.environ["VLZOO_SPEECH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vlzoo" / "speech"


def read_wav(data: bytes | str | Path) -> AudioClip:
    """A 16-bit PCM WAV (bytes or a file) as a mono :class:`AudioClip` (channels averaged)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    with wave.open(source, "rb") as w:
        width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
        raw = w.readframes(frames)
    if width != 2:
        raise ValueError(f"WAV: expected 16-bit PCM samples, got {8 * width}-bit")
    if len(raw) != frames * channels * width or frames == 0:
        raise ValueError(f"WAV: {len(raw)} bytes of samples for {frames} frames x {channels} channels (truncated or empty)")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(-1, channels).mean(1) / 32768.0
    return AudioClip(torch.from_numpy(samples.copy()), rate)


@functools.cache
def _version(program: str) -> str:
    out = subprocess.run([program, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at:")[0].strip()


class EspeakSynthesizer:
    """Text -> speech with espeak-ng, cached by content hash (see the module doc).

    Args:
        cache_dir: where clips are kept (default :func:`default_speech_cache`).
        program: the espeak-ng executable (name on ``PATH`` or a path).
        pitch: espeak-ng's pitch (0-99).
    """

    def __init__(self, *, cache_dir: str | None = None, program: str = "espeak-ng", pitch: int = 50) -> None:
        found = shutil.which(program)
        if found is None:
            raise SynthesizerMissing(f"the speech synthesizer {program!r} was not found: {INSTALL_HINT}")
        self.program = found
        self.version = _version(found)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_speech_cache()
        self.pitch = int(pitch)
        self.synthesized = 0  # clips made by this object (a cache hit makes none)

    def key(self, text: str, voice: str, speed: int) -> str:
        """The SHA-256 of the clip's content: text, voice, speed, pitch and synthesizer version."""
        record = {"text": text, "voice": voice, "speed": int(speed), "pitch": self.pitch, "synthesizer": self.version}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def paths(self, text: str, voice: str, speed: int) -> tuple[Path, Path]:
        key = self.key(text, voice, speed)
        folder = self.cache_dir / key[:2]
        return folder / f"{key}.wav", folder / f"{key}.json"

    def __call__(self, text: str, *, voice: str = "en-us", speed: int = 175) -> AudioClip:
        """The clip of ``text``: from the cache when it is intact, else synthesized and cached."""
        wav_path, record_path = self.paths(text, voice, speed)
        cached = self._read_cached(wav_path, record_path)
        if cached is not None:
            return cached
        data = self._synthesize(text, voice, speed)
        clip = read_wav(data)
        record = {"key": wav_path.stem, "text": text, "voice": voice, "speed": int(speed), "pitch": self.pitch,
                  "synthesizer": self.version, "sha256": hashlib.sha256(data).hexdigest()}
        wav_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(wav_path, data)
        _atomic_write(record_path, json.dumps(record, indent=1).encode())
        return clip

    def _read_cached(self, wav_path: Path, record_path: Path) -> AudioClip | None:
        if not wav_path.is_file() and not record_path.is_file():
            return None
        try:
            record = json.loads(record_path.read_text())
            data = wav_path.read_bytes()
            if record.get("sha256") != hashlib.sha256(data).hexdigest() or record.get("key") != wav_path.stem:
                raise ValueError("its bytes do not match the cache record")
            return read_wav(data)
        except (OSError, ValueError, EOFError, wave.Error) as error:
            log.warning("speech cache: %s is corrupt (%s); synthesizing it again", wav_path, error)
            return None

    def _synthesize(self, text: str, voice: str, speed: int) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "clip.wav"
            cmd = [self.program, "-v", voice, "-s", str(int(speed)), "-p", str(self.pitch), "-w", str(out), "--", text]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                raise DataError(
                    f"espeak-ng failed on {text!r} (voice {voice!r}, speed {speed}): {done.stderr.strip() or done.returncode}; "
                    "check the voice name with `espeak-ng --voices`"
                )
            self.synthesized += 1
            return out.read_bytes()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""The audio encoder slot: waveform -> log-mel features -> a Whisper-style encoder.

The front end is transformers' :class:`~transformers.WhisperFeatureExtractor` (80 or
``num_mel_bins`` log-mel bins, 25 ms windows, 10 ms hops, the clip padded with silence or cut to
the encoder's window); a clip at another sample rate is resampled first with
``scipy.signal.resample_poly``.  The encoder is transformers' ``WhisperEncoder``: built from a
(tiny) :class:`~transformers.WhisperConfig` on CPU, or the encoder of a pretrained Whisper folder
(``from_pretrained(path)`` through :func:`vlzoo.backbones.shipped.load_pretrained`) on GPU - AnyRef's pretrained audio tower.

The window is fixed by the encoder: ``2 * max_source_positions`` mel frames
(``max_source_positions: 100`` is 2 s at 16 kHz; Whisper's own 1500 is 30 s).  A clip longer
than the window is cut to it, a shorter one padded; :meth:`WhisperAudioEncoder.forward` returns
the encoder states with the number of frames that hold the clip (the states over the padding
are not references' tokens).

Training policies as for the other encoders: ``freeze`` (all frozen), ``lora`` (PEFT LoRA on
the encoder's attention projections, the base frozen) or neither (trainable).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vlzoo.backbones.policies import lora_settings, set_trainable
from vlzoo.backbones.shipped import dry_loading_active, load_pretrained
from vlzoo.structures import AudioClip

__all__ = ["WhisperAudioEncoder", "TINY_WHISPER", "resample"]

#: A Whisper encoder small enough for CPU tests: 2 s windows, width 32, one layer.
TINY_WHISPER: dict[str, Any] = {
    "num_mel_bins": 80,
    "d_model": 32,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "max_source_positions": 100,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "vocab_size": 64,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 3,
}

_HOP = 160  # Whisper's 10 ms hop at 16 kHz


def resample(waveform: Tensor, rate: int, target: int) -> Tensor:
    """``waveform`` (S,) from ``rate`` to ``target`` Hz (polyphase filtering, scipy)."""
    if rate == target:
        return waveform
    from scipy.signal import resample_poly

    ratio = Fraction(int(target), int(rate))
    out = resample_poly(waveform.detach().cpu().double().numpy(), ratio.numerator, ratio.denominator)
    return torch.from_numpy(np.ascontiguousarray(out)).float()


class WhisperAudioEncoder(nn.Module):
    """Waveform -> Whisper log-mel features -> a Whisper encoder; ``dim`` channels out.

    Args:
        config: ``WhisperConfig`` keyword arguments (e.g. :data:`TINY_WHISPER`) for an encoder
            built from scratch; ignored with ``pretrained``.
        pretrained: a folder saved by transformers (``WhisperModel`` /
            ``WhisperForConditionalGeneration.save_pretrained``) or a hub name with a shipped
            config (``openai/whisper-base``, for ``vlzoo check --dry-run``); its encoder is used,
            the front end follows its ``num_mel_bins`` and window.
        sampling_rate: the rate the front end works at (clips are resampled to it).
        freeze: freeze the encoder.
        lora: LoRA on the encoder (``{r, alpha, dropout, target_modules}``, see
            ``policies.LORA_DEFAULTS``; default targets ``q_proj`` / ``v_proj``); the base frozen.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        sampling_rate: int = 16000,
        freeze: bool = False,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if freeze and lora is not None:
            raise ValueError("audio encoder: freeze and lora exclude each other (LoRA freezes the base itself)")
        if pretrained is not None:
            looks_local = pretrained.startswith((".", "/", "~")) or Path(pretrained).exists()
            if looks_local and not (Path(pretrained).expanduser() / "config.json").is_file() and not dry_loading_active():
                raise FileNotFoundError(
                    f"audio encoder: pretrained folder {pretrained} has no config.json; give a folder written by "
                    "transformers' save_pretrained (a Whisper model), or `config:` for an encoder built from scratch"
                )
            whisper = load_pretrained(WhisperModel, str(Path(pretrained).expanduser()) if looks_local else pretrained)
            self.encoder = whisper.get_encoder()
            wconfig = whisper.config
        else:
            wconfig = WhisperConfig(**{**TINY_WHISPER, **(config or {})})
            self.encoder = WhisperEncoder(wconfig)
        frames = 2 * int(wconfig.max_source_positions)
        seconds = frames * _HOP / int(sampling_rate)
        if abs(seconds - round(seconds)) > 1e-9 or round(seconds) < 1:
            raise ValueError(
                f"audio encoder: max_source_positions {wconfig.max_source_positions} gives a window of {seconds:g} s "
                f"at {sampling_rate} Hz; choose max_source_positions so that 2 * it * 160 / sampling_rate is a whole "
                "number of seconds (100 -> 2 s at 16 kHz)"
            )
        self.sampling_rate = int(sampling_rate)
        self.window_frames = frames
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=int(wconfig.num_mel_bins),
            sampling_rate=self.sampling_rate,
            hop_length=_HOP,
            chunk_length=int(round(seconds)),
            n_fft=400,
        )
        self.dim = int(wconfig.d_model)
        self.freeze = freeze
        set_trainable(self.encoder, not freeze)
        if lora is not None:
            self._apply_lora(lora)

    def _apply_lora(self, lora: dict[str, Any]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        settings = lora_settings({"target_modules": ["q_proj", "v_proj"], **lora})
        config = LoraConfig(
            r=settings["r"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=settings["target_modules"],
        )
        inject_adapter_in_model(config, self.encoder)
        for name, p in self.encoder.named_parameters():
            p.requires_grad_("lora_" in name)

    @property
    def window_seconds(self) -> float:
        return self.window_frames * _HOP / self.sampling_rate

    def log_mel(self, clip: AudioClip) -> Tensor:
        """``(num_mel_bins, window_frames)``: the clip's Whisper log-mel features (resampled to
        ``sampling_rate``, padded or cut to the window)."""
        wave = resample(clip.waveform, clip.sample_rate, self.sampling_rate)
        out = self.feature_extractor(
            wave.numpy().astype(np.float32),
            sampling_rate=self.sampling_rate,
            return_tensors="np",
            padding="max_length",
            truncation=True,
        )
        return torch.from_numpy(out["input_features"][0])

    def valid_frames(self, clip: AudioClip) -> int:
        """Encoder states that cover the clip (the rest cover padding): 2 mel frames each."""
        samples = math.ceil(clip.seconds * self.sampling_rate)
        mel = min(self.window_frames, samples // _HOP + 1)
        return max(1, min(self.window_frames // 2, math.ceil(mel / 2)))

    def forward(self, clips: list[AudioClip]) -> tuple[Tensor, Tensor]:
        """``(states (R, window_frames / 2, dim), valid (R,))`` for ``R`` clips."""
        weight = self.encoder.conv1.weight
        features = torch.stack([self.log_mel(c) for c in clips]).to(device=weight.device, dtype=weight.dtype)
        states = self.encoder(input_features=features).last_hidden_state
        valid = torch.tensor([self.valid_frames(c) for c in clips], device=states.device)
        return states, valid

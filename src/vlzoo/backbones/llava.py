"""Adapter: a native transformers ``LlavaForConditionalGeneration`` as a vlzoo backbone.

A LLaVA checkpoint folder (e.g. ``llava-hf/llava-1.5-7b-hf``) already holds a CLIP tower, a
projector and a LM.  :class:`LlavaBackbone` uses its parts directly and splices one ``<image>``
placeholder into the image tokens with the same code and the same outputs as
:class:`~vlzoo.backbones.MultimodalBackbone`, so every paradigm runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlzoo.backbones.multimodal import _SplicingBackbone
from vlzoo.backbones.shipped import (
    load_pretrained,
    load_pretrained_tokenizer,
    preprocessor_settings,
    read_weights,
)
from vlzoo.backbones.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _dtype

__all__ = ["LlavaBackbone"]


class LlavaBackbone(_SplicingBackbone):
    """A LLaVA folder behind the :class:`~vlzoo.backbones.MultimodalBackbone` interface.

    Args:
        name_or_path: a ``LlavaForConditionalGeneration`` name or local folder with its tokenizer.
        dtype: weight dtype name.
        attn_implementation: ``eager`` / ``sdpa`` / ...; ``None`` lets transformers choose.
        freeze_vision, freeze_projector, freeze_lm, train_new_embeddings, lora,
        gradient_checkpointing, checkpoint: as for ``MultimodalBackbone`` (LoRA never touches
            the vision tower or projector).
    """

    def __init__(
        self,
        *,
        name_or_path: str = "llava-hf/llava-1.5-7b-hf",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        freeze_vision: bool = True,
        freeze_projector: bool = False,
        freeze_lm: bool = False,
        train_new_embeddings: bool = True,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import LlavaForConditionalGeneration

        self._init_state()
        extra: dict[str, Any] = {"dtype": _dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        self.model = load_pretrained(LlavaForConditionalGeneration, name_or_path, **extra)
        self.tokenizer = load_pretrained_tokenizer(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.image_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has no token with the image id {self.image_token_id}")
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise ValueError("LlavaBackbone supports one vision_feature_layer (an int)")
        vision_config = config.vision_config
        self._vision_dim = int(vision_config.hidden_size)
        self._stride = int(vision_config.patch_size)
        self._input_size = int(vision_config.image_size)
        self._mean, self._std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        settings = preprocessor_settings(name_or_path)
        if settings is not None:
            self._mean = tuple(settings.get("image_mean", self._mean))
            self._std = tuple(settings.get("image_std", self._std))
        if checkpoint is not None and read_weights(checkpoint, "backbone checkpoint"):
            self._load_backbone(checkpoint)
        inner = self.model.model
        self._setup_policies(
            vision=inner.vision_tower,
            projector=inner.multi_modal_projector,
            language=[inner.language_model, self.model.lm_head],
            freeze_vision=freeze_vision,
            freeze_projector=freeze_projector,
            freeze_lm=freeze_lm,
            train_new_embeddings=train_new_embeddings,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            lora_exclude=r".*(vision_tower|multi_modal_projector).*",
            set_peft=self._set_peft,
        )

    def _set_peft(self, peft: Any) -> None:
        self.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.model

    # --- attributes of the layer contract ---------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.hidden_size)

    @property
    def vision_dim(self) -> int:
        return self._vision_dim

    @property
    def feature_grid(self) -> tuple[int, int]:
        side = self._input_size // self._stride
        return (side, side)

    @property
    def input_size(self) -> int:
        return self._input_size

    @property
    def data_config(self) -> dict[str, Any]:
        return {"mean": tuple(self._mean), "std": tuple(self._std), "input_size": self._input_size}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the (un-LoRA'd) LLaVA model and tokenizer to a folder."""
        self._lm().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        inner = self._lm().model
        tower = inner.vision_tower
        out = tower(pixel_values=images.to(tower.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.feature_layer]
        patches = hidden[:, 1:]
        selected = patches if self.select_strategy == "default" else hidden
        b, n, d = patches.shape
        h, w = images.shape[-2] // self._stride, images.shape[-1] // self._stride
        feature_map = patches.transpose(1, 2).reshape(b, d, h, w)
        return feature_map, inner.multi_modal_projector(selected)

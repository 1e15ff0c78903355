"""Adapter: a native transformers ``LlavaForConditionalGeneration`` as a vlzoo backbone.

A LLaVA checkpoint folder (e.g. ``llava-hf/llava-1.5-7b-hf``) already holds a CLIP tower, a
projector and a LM.  :class:`LlavaBackbone` uses its parts directly and splices one ``<image>``
placeholder into the image tokens with the same code and the same outputs as
:class:`~vlzoo.backbones.MultimodalBackbone`, so every paradigm runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlzoo.backbones.multimodal import _SplicingBackbone, _SquareFrame
from vlzoo.backbones.shipped import load_pretrained, load_pretrained_tokenizer
from vlzoo.backbones.vision import _dtype, _normalisation

__all__ = ["LlavaBackbone"]


def _llava_config(settings: dict[str, Any]) -> Any:
    """A ``transformers.LlavaConfig`` from a dict (its ``model_type``, if given, must be ``llava``;
    ``vision_config`` / ``text_config`` are dicts with their own ``model_type``)."""
    from transformers import LlavaConfig

    settings = dict(settings)
    model_type = settings.pop("model_type", LlavaConfig.model_type)
    if model_type != LlavaConfig.model_type:
        raise ValueError(f"a LlavaBackbone config has model_type {LlavaConfig.model_type!r}, not {model_type!r}")
    return LlavaConfig(**settings)


class LlavaBackbone(_SquareFrame, _SplicingBackbone):
    """A LLaVA folder behind the :class:`~vlzoo.backbones.MultimodalBackbone` interface.

    Args:
        name_or_path: a ``LlavaForConditionalGeneration`` name or local folder with its tokenizer
            (and its ``preprocessor_config.json``), e.g. ``llava-hf/llava-1.5-7b-hf``.
        config: a ``LlavaConfig`` as a dict (``vision_config`` and ``text_config`` dicts,
            ``image_token_id``, ``vision_feature_layer`` ...), to build the model untrained
            instead - its weights then come from elsewhere (a ``vlzoo export``'s safetensors).
        tokenizer: a tokenizer name or folder; ``None`` uses ``name_or_path``'s (a config-built
            backbone needs one).
        image_mean, image_std: the per-channel normalisation; ``None`` takes ``name_or_path``'s
            ``preprocessor_config.json``, else OpenAI CLIP's.  The input side is the vision
            config's ``image_size``.
        dtype: weight dtype name.
        attn_implementation: ``eager`` / ``sdpa`` / ...; ``None`` lets transformers choose.
        freeze_vision, freeze_projector, freeze_lm, train_new_embeddings, lora,
        gradient_checkpointing, references, checkpoint: as for ``MultimodalBackbone`` (LoRA
            never touches the vision tower, projector or reference encoder).
    """

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        freeze_vision: bool = True,
        freeze_projector: bool = False,
        freeze_lm: bool = False,
        train_new_embeddings: bool = True,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        references: Any = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import LlavaForConditionalGeneration

        if (name_or_path is None) == (config is None):
            raise ValueError("LlavaBackbone needs exactly one of name_or_path or config")
        if tokenizer is None and name_or_path is None:
            raise ValueError("a config-built LlavaBackbone needs a tokenizer (a tokenizer name or folder)")
        self._init_state()
        extra: dict[str, Any] = {"dtype": _dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if name_or_path is not None:
            self.model = load_pretrained(LlavaForConditionalGeneration, name_or_path, **extra)
        else:
            self.model = LlavaForConditionalGeneration._from_config(_llava_config(config), **extra)
        source = name_or_path if name_or_path is not None else "the LlavaBackbone config"
        self.tokenizer = load_pretrained_tokenizer(tokenizer or name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.image_token is None:
            raise ValueError(f"{source}: the tokenizer has no token with the image id {self.image_token_id}")
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        if not isinstance(self.feature_layer, int):
            raise ValueError("LlavaBackbone supports one vision_feature_layer (an int)")
        vision_config = config.vision_config
        self._vision_width = int(vision_config.hidden_size)
        self._grid_stride = int(vision_config.patch_size)
        self._input_size = int(vision_config.image_size)
        self._mean, self._std = _normalisation(name_or_path, image_mean, image_std, "LlavaBackbone")
        self._setup_references_and_load(references, self.model.get_input_embeddings().weight.dtype, checkpoint)
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

    # --- the backbone interface (vlzoo.backbones.interface.Backbone) ------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.hidden_size)


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
        h, w = images.shape[-2] // self._grid_stride, images.shape[-1] // self._grid_stride
        feature_map = patches.transpose(1, 2).reshape(b, d, h, w)
        return feature_map, inner.multi_modal_projector(selected)

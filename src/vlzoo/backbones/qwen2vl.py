"""Adapters: native transformers Qwen2-VL and Qwen2.5-VL checkpoints as vlzoo backbones.

A ``Qwen/Qwen2-VL-2B-Instruct`` (or ``Qwen/Qwen2.5-VL-3B-Instruct``) folder holds a ViT with 2-D
rotary positions, a patch merger (the projector: ``merge x merge`` patches -> one LM token) and a
Qwen2 LM with multimodal rotary positions (M-RoPE).  :class:`Qwen2VLBackbone` and
:class:`Qwen25VLBackbone` use those parts directly behind the backbone interface
(:class:`~vlzoo.backbones.Backbone`), so every paradigm runs on them:

* **frame** - the image processor's: each image is resized to its own ``smart_resize`` size
  (:class:`~vlzoo.data.smart_resize.SmartResizeTransform`, declared in ``data_config["transform"]``
  and injected into the datamodule by ``vlzoo.build``), so the ``qwen2.5vl`` codec's absolute
  pixels and the ``qwen2vl`` codec's 0..1000 are the real model's, and predictions map back to
  original pixels through the recorded :class:`~vlzoo.structures.ImageTransform`;
* **patching** - the processor's own ``patchify`` (the same image processor class the checkpoint
  ships) turns the ``(B, 3, H, W)`` batch into the ``(patches, C * t * p * p)`` rows and
  ``image_grid_thw`` the vision tower reads;
* **splicing** - the datamodule's ``<image>`` placeholder (inside the chat template's
  ``<|vision_start|>{image}<|vision_end|>``) becomes ``(H / factor) * (W / factor)`` merged image
  tokens, exactly where the processor would put as many ``<|image_pad|>`` tokens
  (:meth:`native_inputs` gives those ids and checks it against the native model);
* **positions** - M-RoPE ``(3, B, T)`` position ids from the model's own ``get_rope_index``
  (:meth:`position_ids`); generation continues them by one per token on every axis, which is
  what the native ``rope_deltas`` do;
* **references** - a reference encoder (``references``, :mod:`vlzoo.backbones.references`) fills
  the prompt's ``<ref_start>`` + k placeholders + ``<ref_end>`` spans before the image is spliced;
  ``get_rope_index`` sees them as text (token type 0), so each reference token is one step on all
  three axes, as the text around it, in training and in KV-cached decoding alike.  A crop
  reference is the crop resized to the batch's input size, encoded by the ViT and merger and
  pooled from its merged grid (:meth:`reference_grid`), so it needs no ``image_size``.

Sizes.  ``hidden_size`` is the LM width; ``vision_width`` too (``image_features`` is the merger's
output, the tokens the LM reads, laid out on the merged grid).  The grid depends on each image's
size, so ``feature_grid`` / ``input_size`` are fixed only when the backbone is told the side of
the (square) images it will see (``image_size``, e.g. Shapes' 64); otherwise they raise
:class:`VariableGridError` - pixel2seq and the LM passes never read them, heatmap / pixel2emb
masks / LENS do.  A batch holds images of one input size (the collate refuses a mix).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vlzoo.backbones.multimodal import _Spliced, _SplicingBackbone
from vlzoo.backbones.shipped import (
    load_pretrained,
    load_pretrained_tokenizer,
    preprocessor_settings,
)
from vlzoo.backbones.vision import _dtype
from vlzoo.data.frames import QWEN_MIN_PIXELS, QWEN_RELEASED_MAX_PIXELS, smart_resize
from vlzoo.data.smart_resize import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SmartResizeTransform
from vlzoo.data.tokenizer import IMAGE_TOKEN

__all__ = ["Qwen2VLBackbone", "Qwen25VLBackbone", "VariableGridError", "QWEN_TEMPLATE"]

#: the chat template of the Instruct checkpoints, one user turn with the image first, as a
#: :class:`~vlzoo.data.PromptTemplate` text (``data.template``)
QWEN_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
_STRUCTURE = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


class VariableGridError(ValueError):
    """``feature_grid`` / ``input_size`` of a backbone whose grid varies per image."""


def _pixel_limits(settings: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(min_pixels, max_pixels)`` of a ``preprocessor_config.json`` (either spelling)."""
    size = settings.get("size") or {}
    low = settings.get("min_pixels", size.get("shortest_edge") if isinstance(size, dict) else None)
    high = settings.get("max_pixels", size.get("longest_edge") if isinstance(size, dict) else None)
    return (None if low is None else int(low)), (None if high is None else int(high))


class _QwenVLBackbone(_SplicingBackbone):
    """What Qwen2-VL and Qwen2.5-VL share (see the module doc); subclasses name the classes."""

    model_class: ClassVar[str]
    config_class: ClassVar[str]
    family: ClassVar[str]

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
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
        references: nn.Module | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        import transformers

        name = type(self).__name__
        if (name_or_path is None) == (config is None):
            raise ValueError(f"{name} needs exactly one of name_or_path or config")
        if tokenizer is None and name_or_path is None:
            raise ValueError(f"a config-built {name} needs a tokenizer (a tokenizer name or folder)")
        self._init_state()
        model_cls = getattr(transformers, self.model_class)
        extra: dict[str, Any] = {"dtype": _dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if name_or_path is not None:
            self._check_family(name_or_path)
            self.model = load_pretrained(model_cls, name_or_path, **extra)
        else:
            self.model = model_cls._from_config(self._make_config(config), **extra)
        source = name_or_path if name_or_path is not None else f"the {name} config"
        if self.model.config.model_type != self.family:
            raise ValueError(f"{source}: {name} needs a {self.family!r} model, got model_type {self.model.config.model_type!r}")
        self.tokenizer = load_pretrained_tokenizer(tokenizer or name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in _STRUCTURE if t not in vocab]
        if missing:
            raise ValueError(f"{source}: the tokenizer lacks Qwen's vision tokens {missing}; is it a Qwen2-VL tokenizer?")
        config = self.model.config
        self.image_pad_id = int(config.image_token_id)
        if self.tokenizer.convert_ids_to_tokens(self.image_pad_id) != "<|image_pad|>":
            raise ValueError(
                f"{source}: the config's image_token_id {self.image_pad_id} is not the tokenizer's <|image_pad|> "
                f"({vocab['<|image_pad|>']})"
            )
        # the datamodule's placeholder: one token a splice replaces by the image's merged tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self.add_special_tokens([IMAGE_TOKEN])[IMAGE_TOKEN]
        self._new_token_ids = []  # the placeholder's row is never read: not a trainable new row
        vision = config.vision_config
        self.patch_size = int(vision.patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.factor = self.patch_size * self.merge_size
        settings = (preprocessor_settings(name_or_path) if name_or_path is not None else None) or {}
        for key, own in (("patch_size", self.patch_size), ("merge_size", self.merge_size),
                         ("temporal_patch_size", self.temporal_patch_size)):
            if key in settings and int(settings[key]) != own:
                raise ValueError(f"{source}: preprocessor_config.json {key}={settings[key]} disagrees with the model's {own}")
        low, high = _pixel_limits(settings)
        self.min_pixels = int(min_pixels if min_pixels is not None else low if low is not None else QWEN_MIN_PIXELS)
        self.max_pixels = int(
            max_pixels if max_pixels is not None else high if high is not None else QWEN_RELEASED_MAX_PIXELS
        )
        self._mean = tuple(float(v) for v in (image_mean or settings.get("image_mean") or OPENAI_CLIP_MEAN))
        self._std = tuple(float(v) for v in (image_std or settings.get("image_std") or OPENAI_CLIP_STD))
        self.transform = SmartResizeTransform(
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=self.factor, mean=self._mean, std=self._std
        )
        self.image_size = None if image_size is None else int(image_size)
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"{name}: image_size must be a positive side in pixels, got {image_size}")
        self._processor = transformers.Qwen2VLImageProcessor(
            patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, image_mean=list(self._mean), image_std=list(self._std),
        )
        self._setup_references_and_load(references, self.model.get_input_embeddings().weight.dtype, checkpoint)
        inner = self.model.model
        self._setup_policies(
            vision=inner.visual,
            projector=inner.visual.merger,
            language=[inner.language_model, self.model.lm_head],
            freeze_vision=freeze_vision,
            freeze_projector=freeze_projector,
            freeze_lm=freeze_lm,
            train_new_embeddings=train_new_embeddings,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            lora_exclude=r".*visual.*",
            set_peft=self._set_peft,
        )

    def _check_family(self, name_or_path: str) -> None:
        """Refuse a local folder of another model family before transformers reads its weights."""
        path = Path(name_or_path) / "config.json"
        if path.is_file():
            found = json.loads(path.read_text()).get("model_type")
            if found != self.family:
                raise ValueError(
                    f"{path}: {type(self).__name__} needs a {self.family!r} model, got model_type {found!r}"
                    + (" (use Qwen2VLBackbone)" if found == "qwen2_vl" else "")
                    + (" (use Qwen25VLBackbone)" if found == "qwen2_5_vl" else "")
                )

    def _make_config(self, settings: dict[str, Any]) -> Any:
        import transformers

        cls = getattr(transformers, self.config_class)
        settings = dict(settings)
        model_type = settings.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"a {type(self).__name__} config has model_type {cls.model_type!r}, not {model_type!r}")
        return cls(**settings)

    def _set_peft(self, peft: Any) -> None:
        self.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.model

    # --- the backbone interface (vlzoo.backbones.interface.Backbone) ------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.hidden_size)

    @property
    def vision_width(self) -> int:
        return self.hidden_size  # image_features are the merger's tokens, in the LM's width

    def _fixed_side(self, what: str) -> int:
        if self.image_size is None:
            raise VariableGridError(
                f"{type(self).__name__}.{what}: the smart_resize frame gives every image its own grid (sides multiples of "
                f"{self.factor} within {self.min_pixels}..{self.max_pixels} pixels), so there is no fixed {what}; set "
                "backbone.image_size to the side of the square images the data holds (e.g. 64 for Shapes) for paradigms "
                "whose heads need a fixed grid (heatmap, pixel2emb's mask decoder, attention_keypoints)"
            )
        h, w = smart_resize(self.image_size, self.image_size, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return h

    @property
    def feature_grid(self) -> tuple[int, int]:
        side = self._fixed_side("feature_grid") // self.factor
        return (side, side)

    @property
    def input_size(self) -> int:
        return self._fixed_side("input_size")

    @property
    def data_config(self) -> dict[str, Any]:
        side = None if self.image_size is None else self.input_size
        return {"mean": self._mean, "std": self._std, "input_size": side, "transform": self.transform}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the (un-LoRA'd) model, the tokenizer and the image processor (with this
        backbone's pixel limits) to a folder ``name_or_path`` loads."""
        self._lm().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self._processor.save_pretrained(folder)

    # --- images -----------------------------------------------------------------------------------
    def patchify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, 3, H, W)`` normalised images -> ``(pixel_values (B * gh * gw, C * t * p * p),
        image_grid_thw (B, 3))`` with the image processor's own patching."""
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"{type(self).__name__}: an input image of {w} x {h} pixels is not in the smart_resize frame (sides must "
                f"be multiples of {self.factor}); build the datamodule with this backbone's data_config['transform']"
            )
        patches, gh, gw = self._processor.patchify(images, self.patch_size, self.merge_size, self.temporal_patch_size)
        b = images.shape[0]
        grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device="cpu" if images.is_meta else images.device)
        return patches.reshape(b * gh * gw, -1), grid

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        visual = self._lm().model.visual
        pixel_values, grid = self.patchify(images)
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid)
        b = images.shape[0]
        gh, gw = images.shape[-2] // self.factor, images.shape[-1] // self.factor
        tokens = out.pooler_output.reshape(b, gh * gw, -1)
        feature_map = tokens.transpose(1, 2).reshape(b, tokens.shape[-1], gh, gw)
        return feature_map, tokens

    # --- positions ---------------------------------------------------------------------------------
    def position_ids(self, spliced: _Spliced, image_features: Tensor) -> Tensor:
        """``(3, B, T)`` M-RoPE positions of the expanded sequence from the model's ``get_rope_index``
        (text: one step per attended token on all axes; an image's tokens: (t, row, column) offset by
        the text before it; the text after continues from the largest of them + 1)."""
        b, total = spliced.attention_mask.shape
        types = torch.zeros(b, total, dtype=torch.long, device=spliced.attention_mask.device)
        types.scatter_(1, spliced.image_positions, 1)
        gh, gw = image_features.shape[-2:]
        grid = torch.tensor([[1, gh * self.merge_size, gw * self.merge_size]] * b, dtype=torch.long, device=types.device)
        if types.is_meta:  # a dry run: the shapes of the positions are what matter, not their values
            return (spliced.attention_mask.long().cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        positions, _ = self._lm().model.get_rope_index(
            types, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=spliced.attention_mask
        )
        return positions

    def reference_grid(self, images: Tensor) -> tuple[int, int]:
        """The merged grid of ``images`` (each side / ``patch_size * merge_size``): a crop
        reference is encoded at the batch's input size, whatever ``image_size`` says."""
        return (int(images.shape[-2]) // self.factor, int(images.shape[-1]) // self.factor)

    def native_inputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """What the processor gives the native model for the same rows: ``input_ids`` with the
        ``<image>`` placeholder expanded into ``<|image_pad|>`` tokens (one per merged patch), the
        attention mask, ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``."""
        pixel_values, grid = self.patchify(images)
        n = int(grid[0, 1] * grid[0, 2]) // self.merge_size**2
        fake = torch.zeros(input_ids.shape[0], n, 1, device=input_ids.device)
        sp = self.splice(input_ids[..., None].double(), input_ids, attention_mask, fake)
        ids = sp.embeds[..., 0].long()
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        ids[rows, sp.image_positions] = self.image_pad_id
        types = torch.zeros_like(ids)
        types[rows, sp.image_positions] = 1
        return {"input_ids": ids, "attention_mask": sp.attention_mask, "pixel_values": pixel_values,
                "image_grid_thw": grid, "mm_token_type_ids": types}


class Qwen2VLBackbone(_QwenVLBackbone):
    """A Qwen2-VL folder (``Qwen2VLForConditionalGeneration``, e.g. ``Qwen/Qwen2-VL-2B-Instruct``)
    behind the backbone interface; its codec is ``qwen2vl`` (0..1000 of the input image).

    Args:
        name_or_path: a model name or local folder with its tokenizer and
            ``preprocessor_config.json`` (its ``min_pixels`` / ``max_pixels``).
        config: a ``Qwen2VLConfig`` as a dict (``text_config`` / ``vision_config`` dicts,
            ``image_token_id`` ...) to build the model untrained instead; needs ``tokenizer``.
        tokenizer: a tokenizer name or folder (``None``: ``name_or_path``'s); it must hold
            ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``.
        image_size: the side of the square images the data holds, when it is fixed (Shapes): then
            ``input_size`` / ``feature_grid`` are its ``smart_resize``; ``None`` (real datasets):
            they raise :class:`VariableGridError`.
        min_pixels, max_pixels: the frame's pixel limits (``None``: the preprocessor's, else
            56 * 56 and 16384 * 28 * 28 as released).
        image_mean, image_std: normalisation (``None``: the preprocessor's, else OpenAI CLIP's).
        dtype, attn_implementation: as for :class:`~vlzoo.backbones.LlavaBackbone`.
        freeze_vision, freeze_projector (the patch merger), freeze_lm, train_new_embeddings, lora,
        gradient_checkpointing, references, checkpoint: as for
            :class:`~vlzoo.backbones.MultimodalBackbone` (LoRA never touches the vision tower,
            merger or reference encoder; reference tokens take text positions on the three M-RoPE
            axes, see the module doc).
    """

    model_class = "Qwen2VLForConditionalGeneration"
    config_class = "Qwen2VLConfig"
    family = "qwen2_vl"


class Qwen25VLBackbone(_QwenVLBackbone):
    """A Qwen2.5-VL folder (``Qwen2_5_VLForConditionalGeneration``, e.g.
    ``Qwen/Qwen2.5-VL-3B-Instruct``) behind the backbone interface; its codec is ``qwen2.5vl``
    (absolute pixels of the ``smart_resize`` input).  Arguments as for :class:`Qwen2VLBackbone`
    (``config`` is a ``Qwen2_5_VLConfig`` dict)."""

    model_class = "Qwen2_5_VLForConditionalGeneration"
    config_class = "Qwen2_5_VLConfig"
    family = "qwen2_5_vl"

"""Adapter: a native transformers Kosmos-2 checkpoint as a vlzoo backbone.

A ``microsoft/kosmos-2-patch14-224`` folder holds a CLIP ViT-L/14 tower, an image-to-text
projection (a dense layer, then ``latent_query_num`` = 64 learned queries cross-attending to the
patch features: the 64 tokens the LM reads) and a Magneto-style decoder with sinusoidal positions.
:class:`Kosmos2Backbone` uses those parts directly behind the backbone interface
(:class:`~vlzoo.backbones.Backbone`), so every paradigm that reads the vision feature map runs
on it:

* **frame** - ``Kosmos2Processor``'s image processor resizes every image straight to
  ``image_size`` x ``image_size`` (224; the aspect ratio is not kept, the centre crop that
  follows is a no-op), so the ``kosmos2`` codec's 32 x 32 patch indices are fractions of the
  *original* image on both axes; the backbone declares that resize
  (:class:`Kosmos2ResizeTransform`: bicubic, as the processor resamples) in
  ``data_config["transform"]`` and predictions map back through it;
* **splicing** - the processor writes ``<s><image>`` + 64 placeholder ids + ``</image>`` before
  the text and an ``image_embeds_position_mask`` marking the 64.  Here the datamodule's single
  ``<image>`` placeholder (which *is* Kosmos-2's begin-of-image token) becomes ``<image>``, the
  64 projected image tokens and ``</image>``: the same sequence, embeddings for embeddings
  (:meth:`native_inputs` gives the processor's ids and mask for a check against the native model);
  ``image_positions`` are the 64 tokens between the two;
* **positions** - the decoder's sinusoidal table is indexed from ``padding_idx + 1``, counting
  attended tokens only (what the native model computes from ``input_ids``), so padded batches
  decode like each row alone;
* **location tokens** - the tokenizer the processor saved holds ``<grounding>``, ``<phrase>``,
  ``<object>``, ``</object>``, ``</delimiter_of_multi_objects/>`` and ``<patch_index_0000>`` ..
  ``<patch_index_1023>``; the backbone refuses a tokenizer without them, so the codec's tokens are
  the checkpoint's rows, never new ones.

Sizes.  ``hidden_size`` is the LM width; ``vision_width`` the tower's and ``feature_grid`` its
patch grid (16 x 16 at 224 px): ``image_features`` is the tower's last layer (post layer norm)
without the class token.  The 64 image tokens are latent queries, not a grid, so
``image_hidden_states()`` cannot be laid out as a map: heads reading the LM's states at image
positions as a grid (heatmap / attention_keypoints with ``image_source`` other than ``vision``)
do not apply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.multimodal import _Spliced, _SplicingBackbone, _SquareFrame
from vlzoo.backbones.shipped import (
    load_pretrained,
    load_pretrained_tokenizer,
    preprocessor_settings,
)
from vlzoo.backbones.vision import _dtype
from vlzoo.data.smart_resize import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlzoo.data.tokenizer import IMAGE_TOKEN
from vlzoo.data.transforms import ResizeTransform
from vlzoo.structures import ImageTransform

__all__ = ["Kosmos2Backbone", "Kosmos2ResizeTransform", "KOSMOS2_TEMPLATE", "KOSMOS2_TAG_TOKENS", "KOSMOS2_PATCH_TOKENS"]

#: the processor's text after the image for a grounded answer (``<grounding>`` then the prompt),
#: as a :class:`~vlzoo.data.PromptTemplate` text (``data.template``); the collate puts ``<s>`` first
KOSMOS2_TEMPLATE = "{image}<grounding> {prompt}"
#: the tag tokens Kosmos2Processor adds, in its order (ids 64002..64012 in the released tokenizer)
KOSMOS2_TAG_TOKENS = (
    "</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>", "<object>", "</object>",
    "</delimiter_of_multi_objects/>", "<grounding>",
)
#: the location tokens it adds after them (ids 64013..65036)
KOSMOS2_PATCH_TOKENS = tuple(f"<patch_index_{k:04d}>" for k in range(1024))
_EOI = "</image>"


class Kosmos2ResizeTransform(ResizeTransform):
    """Kosmos-2's frame: every image resized straight to ``size`` x ``size`` (aspect ratio not
    kept), resampled with antialiased bicubic interpolation as the processor's ``resample=3``
    (PIL bicubic) does, then normalised.  The geometry is ``ResizeTransform(mode="resize")``'s."""

    def __init__(self, *, size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD) -> None:
        super().__init__(size=size, mode="resize", mean=mean, std=std)

    def image(self, image: Tensor) -> tuple[Tensor, ImageTransform]:
        geo = self.geometry((int(image.shape[-2]), int(image.shape[-1])))
        x = image.float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std, geo

    def __repr__(self) -> str:
        return f"Kosmos2ResizeTransform(size={self.size[0]})"


def _kosmos2_config(settings: dict[str, Any]) -> Any:
    from transformers import Kosmos2Config

    settings = dict(settings)
    model_type = settings.pop("model_type", Kosmos2Config.model_type)
    if model_type != Kosmos2Config.model_type:
        raise ValueError(f"a Kosmos2Backbone config has model_type {Kosmos2Config.model_type!r}, not {model_type!r}")
    return Kosmos2Config(**settings)


def _image_settings(name_or_path: str) -> dict[str, Any]:
    """The image processor's settings: ``preprocessor_config.json`` (or the shipped facts in a dry
    run), else the ``image_processor`` entry of a ``processor_config.json`` (what a
    ``Kosmos2Processor.save_pretrained`` of transformers 5 writes); ``{}`` when neither exists."""
    settings = preprocessor_settings(name_or_path)
    if settings is not None:
        return settings
    path = Path(name_or_path) / "processor_config.json"
    if path.is_file():
        found = json.loads(path.read_text()).get("image_processor")
        if isinstance(found, dict):
            return found
    return {}


def _square_side(settings: dict[str, Any], key: str) -> int | None:
    """The side of a ``{"height": s, "width": s}`` size entry; ``None`` when absent."""
    size = settings.get(key)
    if size is None:
        return None
    if isinstance(size, int):
        return int(size)
    if isinstance(size, dict) and "height" in size and "width" in size and int(size["height"]) == int(size["width"]):
        return int(size["height"])
    return -1


class Kosmos2Backbone(_SquareFrame, _SplicingBackbone):
    """A Kosmos-2 folder (``Kosmos2ForConditionalGeneration``, e.g.
    ``microsoft/kosmos-2-patch14-224``) behind the backbone interface (see the module doc); its
    codec is ``kosmos2`` (patch indices on a 32 x 32 grid of the image).

    Args:
        name_or_path: a model name or local folder with the tokenizer ``Kosmos2Processor`` saved
            (its tag and patch-index tokens) and its ``preprocessor_config.json``.
        config: a ``Kosmos2Config`` as a dict (``text_config`` / ``vision_config`` dicts,
            ``latent_query_num``) to build the model untrained instead; needs ``tokenizer``.
        tokenizer: a tokenizer name or folder (``None``: ``name_or_path``'s).
        image_mean, image_std: normalisation (``None``: the preprocessor's, else OpenAI CLIP's).
            The input side is the vision config's ``image_size``.
        dtype, attn_implementation: as for :class:`~vlzoo.backbones.LlavaBackbone`.
        freeze_vision, freeze_projector (the image-to-text projection), freeze_lm,
        train_new_embeddings, lora, gradient_checkpointing, references, checkpoint: as for
            :class:`~vlzoo.backbones.MultimodalBackbone` (LoRA never touches the vision tower,
            the projection or the reference encoder).  Reference tokens are text to the decoder
            (one sinusoidal position each); a crop reference is the crop's 64 latent tokens,
            pooled in query order (:meth:`reference_grid`).
    """

    family = "kosmos-2"

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
        references: nn.Module | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import Kosmos2ForConditionalGeneration

        if (name_or_path is None) == (config is None):
            raise ValueError("Kosmos2Backbone needs exactly one of name_or_path or config")
        if tokenizer is None and name_or_path is None:
            raise ValueError("a config-built Kosmos2Backbone needs a tokenizer (a Kosmos-2 tokenizer name or folder)")
        self._init_state()
        extra: dict[str, Any] = {"dtype": _dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if name_or_path is not None:
            self._check_family(name_or_path)
            self.model = load_pretrained(Kosmos2ForConditionalGeneration, name_or_path, **extra)
        else:
            self.model = Kosmos2ForConditionalGeneration._from_config(_kosmos2_config(config), **extra)
        source = name_or_path if name_or_path is not None else "the Kosmos2Backbone config"
        if self.model.config.model_type != self.family:
            raise ValueError(
                f"{source}: Kosmos2Backbone needs a {self.family!r} model, got model_type {self.model.config.model_type!r}"
            )
        self.tokenizer = load_pretrained_tokenizer(tokenizer or name_or_path)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (*KOSMOS2_TAG_TOKENS, *KOSMOS2_PATCH_TOKENS) if t not in vocab]
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... (+{len(missing) - 5})" if len(missing) > 5 else "")
            raise ValueError(
                f"{source}: the tokenizer lacks Kosmos-2's tag / location tokens ({shown}); give the tokenizer a "
                "Kosmos2Processor saved (its save_pretrained adds <grounding>, <phrase>, <object>, <patch_index_0000> ...)"
            )
        for role in ("pad_token", "eos_token", "unk_token"):
            if getattr(self.tokenizer, role) is None:
                raise ValueError(f"{source}: the Kosmos-2 tokenizer has no {role}")
        text = self.model.config.text_config
        if int(text.pad_token_id) != int(self.tokenizer.pad_token_id):
            raise ValueError(
                f"{source}: the text config's pad_token_id {text.pad_token_id} is not the tokenizer's pad id "
                f"{self.tokenizer.pad_token_id} (the decoder's positions skip that id)"
            )
        rows = self._vocab_rows()
        beyond = [t for t in (*KOSMOS2_TAG_TOKENS, *KOSMOS2_PATCH_TOKENS) if vocab[t] >= rows]
        if beyond:
            raise ValueError(
                f"{source}: the tokenizer's {beyond[0]} (id {vocab[beyond[0]]}) has no row in the model's "
                f"{rows}-row embedding; is the tokenizer this checkpoint's?"
            )
        # the datamodule's placeholder is Kosmos-2's own begin-of-image token
        self.image_token = IMAGE_TOKEN
        self.image_token_id = int(vocab[IMAGE_TOKEN])
        self.end_image_token_id = int(vocab[_EOI])
        self.num_image_tokens = int(self.model.config.latent_query_num)
        # the processor's placeholder ids inside <image> ... </image> (its first_image_token_id)
        self.first_image_token_id = int(self.tokenizer.unk_token_id) + 1
        vision = self.model.config.vision_config
        self._vision_width = int(vision.hidden_size)
        self._input_size = int(vision.image_size)
        self._grid_stride = int(vision.patch_size)
        settings = _image_settings(name_or_path) if name_or_path is not None else {}
        self._check_frame(settings, source)
        self._mean = tuple(float(v) for v in (image_mean or settings.get("image_mean") or OPENAI_CLIP_MEAN))
        self._std = tuple(float(v) for v in (image_std or settings.get("image_std") or OPENAI_CLIP_STD))
        self.transform = Kosmos2ResizeTransform(size=self._input_size, mean=self._mean, std=self._std)
        side = math.isqrt(self.num_image_tokens)
        if references is not None and "crop" in references.modalities and side * side != self.num_image_tokens:
            raise ValueError(
                f"{source}: crop references pool the crop's latent image tokens on a square, but latent_query_num is "
                f"{self.num_image_tokens}; use box or audio references (backbone.references.modalities) with this model"
            )
        self._setup_references_and_load(references, self.model.get_input_embeddings().weight.dtype, checkpoint)
        self._setup_policies(
            vision=self.model.vision_model,
            projector=self.model.image_to_text_projection,
            language=[self.model.text_model],
            freeze_vision=freeze_vision,
            freeze_projector=freeze_projector,
            freeze_lm=freeze_lm,
            train_new_embeddings=train_new_embeddings,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            lora_exclude=r".*(vision_model|image_to_text_projection).*",
            set_peft=self._set_peft,
        )

    def _check_family(self, name_or_path: str) -> None:
        """Refuse a local folder of another model family before transformers reads its weights."""
        path = Path(name_or_path) / "config.json"
        if path.is_file():
            found = json.loads(path.read_text()).get("model_type")
            if found != self.family:
                raise ValueError(f"{path}: Kosmos2Backbone needs a {self.family!r} model, got model_type {found!r}")

    def _check_frame(self, settings: dict[str, Any], source: str) -> None:
        """The preprocessor must resize straight to the tower's square input (Kosmos-2's frame)."""
        if settings.get("do_resize") is False:
            raise ValueError(f"{source}: preprocessor_config.json has do_resize false; Kosmos-2 resizes to its input side")
        side = _square_side(settings, "size")
        if side is not None and side != self._input_size:
            raise ValueError(
                f"{source}: preprocessor_config.json size {settings['size']} is not a resize to the vision tower's "
                f"{self._input_size} x {self._input_size} input (Kosmos-2's frame: every image resized straight to "
                "that square); vlzoo models that frame only"
            )
        crop = _square_side(settings, "crop_size")
        if settings.get("do_center_crop") and crop is not None and crop != self._input_size:
            raise ValueError(
                f"{source}: preprocessor_config.json centre-crops to {settings['crop_size']} after the resize, which "
                f"is not the {self._input_size} px frame the patch-index tokens are read in"
            )

    def _set_peft(self, peft: Any) -> None:
        self.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.model

    def _decoder_module(self) -> nn.Module:
        return self._lm().text_model.model

    # --- the backbone interface (vlzoo.backbones.interface.Backbone) ------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.embed_dim)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the (un-LoRA'd) model, the tokenizer and an image processor with this frame (a
        resize to ``input_size`` and this normalisation) to a folder ``name_or_path`` loads."""
        from transformers import CLIPImageProcessor

        self._lm().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        side = {"height": self._input_size, "width": self._input_size}
        CLIPImageProcessor(
            size=side, crop_size=side, do_center_crop=False, image_mean=list(self._mean), image_std=list(self._std)
        ).save_pretrained(folder)

    # --- images -----------------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_map (B, vision_width, g, g), image_tokens (B, 64, hidden_size))``: the tower's
        patch features (post layer norm, class token dropped) and the projection's latent tokens,
        computed by the model's own ``get_image_features``."""
        lm = self._lm()
        side = self._input_size
        if tuple(images.shape[-2:]) != (side, side):
            raise ValueError(
                f"Kosmos2Backbone: an input image of {images.shape[-1]} x {images.shape[-2]} pixels is not in Kosmos-2's "
                f"frame ({side} x {side}); build the datamodule with this backbone's data_config['transform']"
            )
        tower = lm.vision_model
        out = lm.get_image_features(images.to(tower.dtype), return_dict=True)
        patches = tower.model.post_layernorm(out.last_hidden_state)[:, 1:]
        b, _, d = patches.shape
        gh, gw = self.feature_grid
        feature_map = patches.transpose(1, 2).reshape(b, d, gh, gw)
        return feature_map, out.pooler_output

    def reference_grid(self, images: Tensor) -> tuple[int, int]:
        """The latent image tokens in query order on a square (8 x 8 for Kosmos-2's 64): a crop
        reference averages groups of consecutive queries down to its k tokens."""
        side = math.isqrt(self.num_image_tokens)
        return (side, side)

    # --- splicing and positions --------------------------------------------------------------------
    def splice(
        self,
        text_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor,
        labels: Tensor | None = None,
    ) -> _Spliced:
        """The ``<image>`` placeholder (Kosmos-2's begin-of-image token) followed by the image
        tokens and ``</image>``, as the processor lays them out; ``image_positions`` are the image
        tokens' (between the two)."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"every Kosmos-2 sequence needs exactly one {IMAGE_TOKEN!r} token (id {self.image_token_id}), found "
                f"counts {counts.tolist()}; the template writes {{image}} once and no literal <image> / </image> "
                f"(the backbone puts <image> ... </image> around the image tokens, e.g. {KOSMOS2_TEMPLATE!r})"
            )
        b = input_ids.shape[0]
        rows = torch.arange(b, device=input_ids.device)
        begin = text_embeds[rows, is_image.float().argmax(1)][:, None]
        end = self.embed_tokens(torch.full((b, 1), self.end_image_token_id, device=input_ids.device))
        tokens = torch.cat([begin, image_tokens.to(text_embeds.dtype), end.to(text_embeds.dtype)], 1)
        sp = super().splice(text_embeds, input_ids, attention_mask, tokens, labels)
        return _Spliced(sp.embeds, sp.attention_mask, sp.labels, sp.positions, sp.image_positions[:, 1:-1])

    def position_ids(self, spliced: _Spliced, image_features: Tensor) -> Tensor:
        """``(B, T)`` rows of the decoder's sinusoidal table: ``padding_idx + 1`` for the first
        attended token, one more per attended token, ``padding_idx`` (a zero row) for padding."""
        pad = int(self._lm().config.text_config.pad_token_id)
        mask = spliced.attention_mask.long()
        return pad + mask.cumsum(-1) * mask

    def native_inputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """What ``Kosmos2Processor`` gives the native model for the same rows: ``input_ids`` with the
        placeholder expanded into ``<image>``, the 64 placeholder ids (``unk + 1`` ...) and
        ``</image>``, the attention mask, ``image_embeds_position_mask`` and ``pixel_values``."""
        n = self.num_image_tokens
        embeds = input_ids[..., None].double()
        b = input_ids.shape[0]
        rows = torch.arange(b, device=input_ids.device)
        is_image = input_ids == self.image_token_id
        begin = embeds[rows, is_image.float().argmax(1)][:, None]
        fill = torch.arange(self.first_image_token_id, self.first_image_token_id + n, device=input_ids.device)
        fake = fill.double().expand(b, -1)[..., None]
        end = torch.full((b, 1, 1), float(self.end_image_token_id), dtype=torch.float64, device=input_ids.device)
        sp = _SplicingBackbone.splice(self, embeds, input_ids, attention_mask, torch.cat([begin, fake, end], 1))
        ids = sp.embeds[..., 0].long()
        position_mask = torch.zeros_like(ids)
        position_mask[rows[:, None], sp.image_positions[:, 1:-1]] = 1
        return {"input_ids": ids, "attention_mask": sp.attention_mask, "image_embeds_position_mask": position_mask,
                "pixel_values": images}

"""Adapter: a native transformers PaliGemma checkpoint as a vlzoo backbone.

A ``google/paligemma-3b-pt-448`` folder (``PaliGemmaForConditionalGeneration``; PaliGemma 2
folders too) holds a SigLIP vision tower, a linear projector and a Gemma LM.
:class:`PaliGemmaBackbone` uses those parts directly behind the backbone interface
(:class:`~vlzoo.backbones.Backbone`), so every paradigm runs on them, and reproduces what the
released model reads:

* **frame** - the image processor's (``SiglipImageProcessor``): a fixed square resize to the
  vision tower's side (224, 448 or 896) without padding or keeping the aspect ratio, rescale to
  ``[0, 1]``, normalise with the ``preprocessor_config.json`` mean / std (0.5 as released);
  :class:`SquareResizeTransform`, declared in ``data_config["transform"]`` and injected into the
  datamodule by ``vlzoo.build``.  The ``paligemma`` codec's bins are fractions of that whole
  image, so they are fractions of the original image too, and predictions map back to original
  pixels through the recorded :class:`~vlzoo.structures.ImageTransform`;
* **layout** - the processor's ``<image> * N <bos> prompt \\n`` then the answer and ``<eos>``:
  :data:`PALIGEMMA_TEMPLATE` (``PromptTemplate(text="{image}<bos>{prompt}\\n", verbatim=True)``)
  writes exactly that, and the splice puts the ``N`` image tokens where the processor puts as
  many ``<image>`` tokens (:meth:`PaliGemmaBackbone.native_inputs`);
* **attention** - PaliGemma is a prefix LM: the image and the prompt (through the ``\\n`` that
  ends it) attend each other bidirectionally, the answer causally - the native model's
  ``token_type_ids`` mask.  :meth:`PaliGemmaBackbone.bidirectional_prefix` marks the prefix and
  the shared LM pass builds the mask with transformers' own block-mask builder, in training, in
  the prompt pass of generation and with or without the KV cache (every generated token is
  causal);
* **positions** - 1-based, counting attended tokens (the native model's ``position_ids + 1``);
* **logits** - Gemma 2's final soft-capping, when the LM has one (PaliGemma 2).

The prefix ends at the first ``\\n`` token after the image, which is the processor's prefix when
the prompt holds no newline of its own (vlzoo's instructions never do).  Sizes: ``hidden_size``
is the Gemma width, ``vision_width`` SigLIP's, ``feature_grid`` ``side / patch`` (16 x 16 at
224 px, 32 x 32 at 448 px) and ``image_features`` the tower's last hidden states on that grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.multimodal import _Spliced, _SplicingBackbone, _SquareFrame
from vlzoo.backbones.shipped import load_pretrained, load_pretrained_tokenizer, preprocessor_settings
from vlzoo.backbones.vision import _dtype
from vlzoo.data.datamodule import PromptTemplate
from vlzoo.data.tokenizer import IMAGE_TOKEN
from vlzoo.data.transforms import ResizeTransform
from vlzoo.structures import ImageTransform

__all__ = ["PaliGemmaBackbone", "SquareResizeTransform", "PALIGEMMA_TEMPLATE", "PALIGEMMA_MEAN", "PALIGEMMA_STD"]

#: the processor's layout as a datamodule template (``data.template``): image tokens, ``<bos>``,
#: the prompt and the ``\n`` that ends the prefix, tokenized exactly as written
PALIGEMMA_TEMPLATE = PromptTemplate(text="{image}<bos>{prompt}\n", verbatim=True)
#: the released checkpoints' ``preprocessor_config.json`` normalisation
PALIGEMMA_MEAN = (0.5, 0.5, 0.5)
PALIGEMMA_STD = (0.5, 0.5, 0.5)
#: PIL resample codes of ``preprocessor_config.json`` -> torch interpolation modes
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
SEPARATOR = "\n"


class SquareResizeTransform(ResizeTransform):
    """Resize every image to one fixed square (no padding, aspect ratio not kept) and normalise it:
    SigLIP's / PaliGemma's processor frame.

    Args:
        size: the side in pixels.
        mean, std: per-channel normalisation in ``[0, 1]`` units.
        resample: ``"bicubic"`` (the released processors' ``resample: 3``) or ``"bilinear"``.
    """

    def __init__(
        self, *, size: int, mean: Sequence[float] = PALIGEMMA_MEAN, std: Sequence[float] = PALIGEMMA_STD,
        resample: str = "bicubic",
    ) -> None:
        if resample not in _RESAMPLE.values():
            raise ValueError(f"SquareResizeTransform: resample must be one of {sorted(_RESAMPLE.values())}, got {resample!r}")
        super().__init__(size=int(size), mode="resize", mean=mean, std=std)
        self.resample = resample

    def image(self, image: Tensor) -> tuple[Tensor, ImageTransform]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        geo = self.geometry((h, w))
        x = image.float().div_(255.0)
        if tuple(x.shape[-2:]) != tuple(geo.input_size):
            x = F.interpolate(x[None], size=geo.input_size, mode=self.resample, align_corners=False, antialias=True)[0]
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(3, 1, 1)
        return (x - mean) / std, geo

    def __repr__(self) -> str:
        return f"SquareResizeTransform(size={self.size[0]}, resample={self.resample!r})"


def _paligemma_config(settings: dict[str, Any]) -> Any:
    from transformers import PaliGemmaConfig

    settings = dict(settings)
    model_type = settings.pop("model_type", PaliGemmaConfig.model_type)
    if model_type != PaliGemmaConfig.model_type:
        raise ValueError(f"a PaliGemmaBackbone config has model_type {PaliGemmaConfig.model_type!r}, not {model_type!r}")
    return PaliGemmaConfig(**settings)


class PaliGemmaBackbone(_SquareFrame, _SplicingBackbone):
    """A PaliGemma folder behind the backbone interface (see the module doc); its codec is
    ``paligemma`` (``<locNNNN>`` bins, y first) and its template :data:`PALIGEMMA_TEMPLATE`.

    Args:
        name_or_path: a ``PaliGemmaForConditionalGeneration`` name or local folder with its
            tokenizer and ``preprocessor_config.json`` (size, mean / std, resample).
        config: a ``PaliGemmaConfig`` as a dict (``text_config`` / ``vision_config`` dicts,
            ``image_token_index``, ``projection_dim`` ...) to build the model untrained instead;
            needs ``tokenizer``.
        tokenizer: a tokenizer name or folder (``None``: ``name_or_path``'s); it must hold
            ``<image>`` (the config's image id), a bos token and ``\\n`` as one token.
        image_mean, image_std: normalisation (``None``: the preprocessor's, else 0.5 / 0.5).
        resample: ``"bicubic"`` or ``"bilinear"`` (``None``: the preprocessor's ``resample``, else
            bicubic as released).
        dtype, attn_implementation: as for :class:`~vlzoo.backbones.LlavaBackbone` (``eager`` or
            ``sdpa``; PaliGemma refuses flash attention, which cannot hold the prefix mask).
        freeze_vision, freeze_projector, freeze_lm, train_new_embeddings, lora,
        gradient_checkpointing, references, checkpoint: as for
            :class:`~vlzoo.backbones.MultimodalBackbone` (LoRA never touches the vision tower or
            projector; the LM head is tied to the embedding, as released).
    """

    family = "paligemma"

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resample: str | None = None,
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
        from transformers import PaliGemmaForConditionalGeneration

        if (name_or_path is None) == (config is None):
            raise ValueError("PaliGemmaBackbone needs exactly one of name_or_path or config")
        if tokenizer is None and name_or_path is None:
            raise ValueError("a config-built PaliGemmaBackbone needs a tokenizer (a tokenizer name or folder)")
        if attn_implementation is not None and "flash" in attn_implementation:
            raise ValueError(
                f"PaliGemmaBackbone: attn_implementation={attn_implementation!r} cannot hold PaliGemma's bidirectional "
                "prefix mask; use 'sdpa' or 'eager'"
            )
        self._init_state()
        extra: dict[str, Any] = {"dtype": _dtype(dtype)}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        if name_or_path is not None:
            self._check_family(name_or_path)
            self.model = load_pretrained(PaliGemmaForConditionalGeneration, name_or_path, **extra)
        else:
            self.model = PaliGemmaForConditionalGeneration._from_config(_paligemma_config(config), **extra)
        source = name_or_path if name_or_path is not None else "the PaliGemmaBackbone config"
        if self.model.config.model_type != self.family:
            raise ValueError(f"{source}: PaliGemmaBackbone needs a 'paligemma' model, got {self.model.config.model_type!r}")
        self.tokenizer = load_pretrained_tokenizer(tokenizer or name_or_path)
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if tok.bos_token is None:
            raise ValueError(f"{source}: the tokenizer has no bos token; PaliGemma's prompt is <image>... <bos> prompt \\n")
        config = self.model.config
        self.image_token_id = int(config.image_token_id)
        self.image_token = tok.convert_ids_to_tokens(self.image_token_id)
        if self.image_token != IMAGE_TOKEN:
            raise ValueError(
                f"{source}: the config's image_token_index {self.image_token_id} is {self.image_token!r} in the tokenizer, "
                f"not {IMAGE_TOKEN!r}; is it the checkpoint's own tokenizer?"
            )
        separator = tok(SEPARATOR, add_special_tokens=False)["input_ids"]
        if len(separator) != 1:
            raise ValueError(
                f"{source}: the tokenizer writes {SEPARATOR!r} as {len(separator)} tokens {separator}; PaliGemma's prefix "
                "ends at a one-token newline"
            )
        self.separator_id = int(separator[0])
        vision = config.vision_config
        self.patch_size = self._grid_stride = int(vision.patch_size)
        self._input_size = int(vision.image_size)
        self._vision_width = int(vision.hidden_size)
        settings = (preprocessor_settings(name_or_path) if name_or_path is not None else None) or {}
        size = settings.get("size")
        if isinstance(size, dict) and {"height", "width"} <= set(size):
            if int(size["height"]) != self._input_size or int(size["width"]) != self._input_size:
                raise ValueError(
                    f"{source}: preprocessor_config.json size {size} is not the vision tower's {self._input_size} x "
                    f"{self._input_size} square"
                )
        if resample is None:
            code = int(settings.get("resample", 3))
            if code not in _RESAMPLE:
                raise ValueError(
                    f"{source}: preprocessor_config.json resample={code} is not one vlzoo reproduces "
                    f"({', '.join(f'{k} ({v})' for k, v in _RESAMPLE.items())})"
                )
            resample = _RESAMPLE[code]
        #: the frame's interpolation (``vlzoo export`` keeps it)
        self.resample = str(resample)
        self._mean = tuple(float(v) for v in (image_mean or settings.get("image_mean") or PALIGEMMA_MEAN))
        self._std = tuple(float(v) for v in (image_std or settings.get("image_std") or PALIGEMMA_STD))
        self.transform = SquareResizeTransform(size=self._input_size, mean=self._mean, std=self._std,
                                               resample=self.resample)
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

    def _check_family(self, name_or_path: str) -> None:
        """Refuse a local folder of another model family before transformers reads its weights."""
        path = Path(name_or_path) / "config.json"
        if path.is_file():
            found = json.loads(path.read_text()).get("model_type")
            if found != self.family:
                raise ValueError(f"{path}: PaliGemmaBackbone needs a 'paligemma' model, got model_type {found!r}")

    def _set_peft(self, peft: Any) -> None:
        self.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.model

    # --- the backbone interface (vlzoo.backbones.interface.Backbone) ------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.hidden_size)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: ``(side / patch) ** 2`` (256 at 224 px, 1024 at 448 px)."""
        h, w = self.feature_grid
        return h * w

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the (un-LoRA'd) model, the tokenizer and the image processor (this backbone's
        size, normalisation and resampling) to a folder ``name_or_path`` loads."""
        from transformers import SiglipImageProcessor

        self._lm().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        SiglipImageProcessor(
            size={"height": self._input_size, "width": self._input_size},
            resample={v: k for k, v in _RESAMPLE.items()}[self.resample],
            image_mean=list(self._mean),
            image_std=list(self._std),
            image_seq_length=self.num_image_tokens,
        ).save_pretrained(folder)

    # --- images, prefix, positions, logits --------------------------------------------------
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        side = self._input_size
        if tuple(images.shape[-2:]) != (side, side):
            raise ValueError(
                f"PaliGemmaBackbone: an input image of {images.shape[-1]} x {images.shape[-2]} pixels is not in PaliGemma's "
                f"{side} x {side} frame; build the datamodule with this backbone's data_config['transform']"
            )
        inner = self._lm().model
        tower = inner.vision_tower
        out = inner.get_image_features(pixel_values=images.to(tower.dtype))
        patches = out.last_hidden_state  # (B, N, vision width)
        b, _, d = patches.shape
        h, w = self.feature_grid
        return patches.transpose(1, 2).reshape(b, d, h, w), out.pooler_output

    def bidirectional_prefix(self, input_ids: Tensor, spliced: _Spliced) -> Tensor:
        """The image and the prompt through the first ``\\n`` after the image: the positions the
        native model's ``token_type_ids`` mark 0."""
        b, length = input_ids.shape
        index = torch.arange(length, device=input_ids.device).expand(b, -1)
        image_at = (input_ids == self.image_token_id).float().argmax(1, keepdim=True)
        ends = (input_ids == self.separator_id) & (index > image_at)
        if input_ids.is_meta:  # a dry run: the shape is what matters
            return spliced.attention_mask.bool()
        found = ends.any(1)
        if not bool(found.all()):
            bad = (~found).nonzero().flatten().tolist()
            raise ValueError(
                f"PaliGemmaBackbone: rows {bad} have no {SEPARATOR!r} after the image, so their prefix has no end; PaliGemma "
                "reads <image>... <bos> prompt \\n answer - use data.template PALIGEMMA_TEMPLATE "
                "({_target_: vlzoo.data.PromptTemplate, text: \"{image}<bos>{prompt}\\n\", verbatim: true})"
            )
        first = ends.float().argmax(1)
        end = spliced.positions[torch.arange(b, device=input_ids.device), first]
        total = spliced.attention_mask.shape[1]
        prefix = torch.arange(total, device=input_ids.device)[None] <= end[:, None]
        return prefix & spliced.attention_mask.bool()

    def position_ids(self, spliced: _Spliced, image_features: Tensor) -> Tensor:
        """PaliGemma's positions are 1-based: one step per attended token, the first at 1."""
        return super().position_ids(spliced, image_features) + 1

    def lm_logits(self, hidden: Tensor) -> Tensor:
        logits = super().lm_logits(hidden)
        cap = getattr(self._lm().config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def native_inputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """What the processor gives the native model for the same rows: ``input_ids`` with the
        placeholder expanded into ``N`` ``<image>`` tokens, the attention mask, ``pixel_values``
        and ``token_type_ids`` (0 over the prefix, 1 after it)."""
        fake = torch.zeros(input_ids.shape[0], self.num_image_tokens, 1, device=input_ids.device)
        sp = self.splice(input_ids[..., None].double(), input_ids, attention_mask, fake)
        ids = sp.embeds[..., 0].long()
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        ids[rows, sp.image_positions] = self.image_token_id
        prefix = self.bidirectional_prefix(input_ids, sp)
        types = (~prefix & sp.attention_mask.bool()).long()
        return {"input_ids": ids, "attention_mask": sp.attention_mask, "pixel_values": images,
                "token_type_ids": types}

"""Adapter: a native transformers Florence-2 checkpoint (an encoder-decoder) as a vlzoo backbone.

A ``florence-community/Florence-2-large`` folder holds a DaViT vision tower, a projector (image
tokens in the text width, with 2-D and temporal position embeddings) and a BART-like
encoder-decoder.  :class:`Florence2Backbone` uses those parts directly behind the backbone
interface (:class:`~vlzoo.backbones.Backbone`) as far as an encoder-decoder can:

* **frame** - the image processor's: every image is resized to the fixed ``size`` of its
  ``preprocessor_config.json`` (768 x 768 as released) without keeping the aspect ratio
  (``ResizeTransform(mode="resize")``, declared in ``data_config["transform"]``), so the
  ``florence2`` codec's ``<loc_0>`` .. ``<loc_999>`` bins are fractions of the whole image, as
  the real model reads and writes them, and predictions map back through the recorded
  :class:`~vlzoo.structures.ImageTransform`.  vlzoo resamples bilinearly (antialiased), the
  processor bicubically: the geometry is the same, pixel values differ slightly;
* **the encoder's input** - what the processor builds: the image tokens first (one global
  token, then the ``h x w`` grid tokens), then ``<s> prompt </s>``.  The datamodule's row
  ``[<s>] <image> prompt`` is rearranged into that order (the template must put the image first,
  :data:`FLORENCE2_TEMPLATE` or :class:`Florence2Template`, which also expands the family's task
  tokens such as ``<OD>`` exactly as the processor does);
* **the decoder's input** - ``</s> <s>`` (``decoder_start_token_id``, then the ``<s>`` the
  released model always writes first) followed by the answer; the loss is on the answer and its
  ``</s>``.  A lone space piece before the answer (the collate writes ``" " + answer``) maps onto
  ``<s>`` and is not trained, so the decoder reads the answer as the processor's tokenizer does.

The expanded sequence of a :class:`~vlzoo.backbones.MultimodalOutput` is the encoder's sequence
followed by the decoder's: ``hidden_states`` is ``(B, T_enc + T_dec, D)`` (the encoder's last
states, then the decoder's), ``positions`` maps every ``input_ids`` index into it (prompt ids to
the encoder, answer ids to the decoder), ``image_positions`` are the encoder positions of the grid
tokens.  So what a paradigm reads at an answer or trigger token (``[LOC]``, ``[SEG]``) is the
decoder's state and ``image_hidden_states()`` are the encoder's states at the image tokens.
``logits`` are the decoder's; at encoder positions they are 0 (the encoder predicts nothing),
and their labels are -100.  ``labels`` tell the answer from the prompt in a training row
(the first labelled index starts the answer); without labels the whole row is the prompt.

What an encoder-decoder cannot offer: attention maps over the image tokens from the decoder's
self-attention (the image is only reached through cross-attention), so ``output_attentions`` and
decoding hooks that ask for attention layers are refused (pixel2emb's refocusing,
``paradigm.refocus_lambda``; attention_keypoints), and reference encoders (prompt boxes as
tokens) are not wired in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.generation import DecodingHooks, DecodingState, _eos_tensor
from vlzoo.backbones.multimodal import MultimodalOutput, _SplicingBackbone
from vlzoo.backbones.shipped import (
    load_pretrained,
    load_pretrained_tokenizer,
    preprocessor_settings,
    read_weights,
)
from vlzoo.backbones.vision import _dtype
from vlzoo.data.datamodule import PromptTemplate
from vlzoo.data.tokenizer import IMAGE_TOKEN
from vlzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ResizeTransform
from vlzoo.structures import References

__all__ = [
    "Florence2Backbone",
    "Florence2Template",
    "FLORENCE2_TEMPLATE",
    "FLORENCE2_TASK_PROMPTS",
    "expand_task_prompt",
    "AttentionUnavailableError",
]

#: the template for a Florence-2 backbone: the image first (the encoder reads it first anyway)
FLORENCE2_TEMPLATE = "{prompt}"
#: the released input side (``preprocessor_config.json`` ``size``) when a folder does not say
RELEASED_SIDE = 768

#: the processor's task tokens without an input -> the text the encoder reads
_TASKS_WITHOUT_INPUT = {
    "<OCR>": "What is the text in the image?",
    "<OCR_WITH_REGION>": "What is the text in the image, with regions?",
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<OD>": "Locate the objects with category name in the image.",
    "<DENSE_REGION_CAPTION>": "Locate the objects in the image, with their descriptions.",
    "<REGION_PROPOSAL>": "Locate the region proposals in the image.",
}
#: the processor's task tokens followed by an input -> the text, ``{input}`` the rest of the prompt
_TASKS_WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "Locate {input} in the image with mask",
    "<REGION_TO_SEGMENTATION>": "What is the polygon mask of region {input}",
    "<OPEN_VOCABULARY_DETECTION>": "Locate {input} in the image.",
    "<REGION_TO_CATEGORY>": "What is the region {input}?",
    "<REGION_TO_DESCRIPTION>": "What does the region {input} describe?",
    "<REGION_TO_OCR>": "What text is in the region {input}?",
}
#: every task token the processor expands (``{input}``: takes the rest of the prompt)
FLORENCE2_TASK_PROMPTS: dict[str, str] = {**_TASKS_WITHOUT_INPUT, **_TASKS_WITH_INPUT}


class AttentionUnavailableError(ValueError):
    """An attention map a decoder-only backbone gives and an encoder-decoder does not."""


def expand_task_prompt(prompt: str) -> str:
    """A prompt with Florence-2's task token replaced by its text, as ``Florence2Processor`` does:
    a task without input must be the whole prompt (``<OD>``); a task with input takes the rest
    of the prompt, stripped (``<CAPTION_TO_PHRASE_GROUNDING>the red circle``).  A prompt without
    a task token is returned unchanged."""
    for token, text in _TASKS_WITHOUT_INPUT.items():
        if token in prompt:
            if prompt != token:
                raise ValueError(f"Florence-2 task token {token} must be the whole prompt, got {prompt!r}")
            return text
    for token, text in _TASKS_WITH_INPUT.items():
        if token in prompt:
            return text.format(input=prompt.replace(token, "").strip())
    return prompt


class Florence2Template(PromptTemplate):
    """A :class:`~vlzoo.data.PromptTemplate` whose filled-in text goes through
    :func:`expand_task_prompt`: ``text: "<OPEN_VOCABULARY_DETECTION>{prompt}"`` gives the encoder
    ``Locate <instruction> in the image.``, the processor's wording.  The image comes first (a
    ``{image}`` after text is refused: Florence-2's encoder reads the image tokens first)."""

    def __init__(self, *, text: str = FLORENCE2_TEMPLATE) -> None:
        super().__init__(text=text)
        if "{image}" in text and text.split("{image}")[0].strip():
            raise ValueError(
                f"Florence2Template: Florence-2 reads the image before the text; put {{image}} first or leave it out, got {text!r}"
            )

    def split(self, prompt: str) -> tuple[str, str]:
        before, after = super().split(prompt)
        return before, expand_task_prompt(after)

    def __repr__(self) -> str:
        return f"Florence2Template(text={self.text!r})"


def _side(settings: dict[str, Any]) -> tuple[int, int] | None:
    size = settings.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    if isinstance(size, int):
        return size, size
    return None


def _conv_out(side: int, kernel: int, stride: int, padding: int) -> int:
    return (side + 2 * padding - kernel) // stride + 1


class Florence2Backbone(_SplicingBackbone):
    """A Florence-2 folder (``Florence2ForConditionalGeneration``, e.g.
    ``florence-community/Florence-2-large``) behind the backbone interface (see the module doc);
    its codec is ``florence2`` (``<loc_0>`` .. ``<loc_999>``, x first, of the whole image).

    Args:
        name_or_path: a model name or local folder with its tokenizer (holding ``<loc_0>`` ..
            ``<loc_999>``) and ``preprocessor_config.json`` (its ``size``, mean and std).
        config: a ``Florence2Config`` as a dict (``text_config`` / ``vision_config`` dicts,
            ``image_token_id``) to build the model untrained instead; needs ``tokenizer``.
        tokenizer: a tokenizer name or folder (``None``: ``name_or_path``'s).
        image_size: the input side (``None``: the preprocessor's ``size``, 768 as released).
        image_mean, image_std: normalisation (``None``: the preprocessor's, else ImageNet's).
        dtype, attn_implementation: as for :class:`~vlzoo.backbones.LlavaBackbone`.
        freeze_vision (DaViT), freeze_projector (the image projection and its position
            embeddings), freeze_lm (encoder, decoder, embeddings), train_new_embeddings, lora,
            gradient_checkpointing, checkpoint: as for :class:`~vlzoo.backbones.MultimodalBackbone`
            (LoRA never touches the vision tower or projector).
    """

    family = "florence2"
    model_class = "Florence2ForConditionalGeneration"
    #: no text-to-image self-attention (the decoder reads the image through cross-attention):
    #: paradigms that need those maps refuse it when built (vlzoo.backbones.interface.check_attention_maps)
    text_to_image_attention = False

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        image_size: int | None = None,
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
            settings = dict(config)
            if settings.pop("model_type", self.family) != self.family:
                raise ValueError(f"a {name} config has model_type {self.family!r}, not {config.get('model_type')!r}")
            self.model = model_cls._from_config(transformers.Florence2Config(**settings), **extra)
        source = name_or_path if name_or_path is not None else f"the {name} config"
        if self.model.config.model_type != self.family:
            raise ValueError(f"{source}: {name} needs a {self.family!r} model, got model_type {self.model.config.model_type!r}")
        self._source = source
        self.tokenizer = load_pretrained_tokenizer(tokenizer or name_or_path)
        tok = self.tokenizer
        text = self.model.config.text_config
        if tok.eos_token_id is None:
            raise ValueError(f"{source}: the tokenizer has no eos token (Florence-2's is </s>)")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        vocab = tok.get_vocab()
        missing = [f"<loc_{k}>" for k in (0, 999) if f"<loc_{k}>" not in vocab]
        if missing or any(f"<loc_{k}>" not in vocab for k in range(1000)):
            raise ValueError(
                f"{source}: the tokenizer lacks Florence-2's location tokens <loc_0> .. <loc_999> (e.g. {missing or 'some'}); "
                "is it a Florence-2 tokenizer? The florence2 codec writes those tokens"
            )
        self.native_image_id = int(self.model.config.image_token_id)
        self.decoder_start_id = int(text.decoder_start_token_id if text.decoder_start_token_id is not None else tok.eos_token_id)
        # the datamodule's placeholder: one token the encoder input replaces by the image tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self.add_special_tokens([IMAGE_TOKEN])[IMAGE_TOKEN]
        self._new_token_ids = []  # the placeholder's row is never read: not a trainable new row
        settings = (preprocessor_settings(name_or_path) if name_or_path is not None else None) or {}
        side = (int(image_size), int(image_size)) if image_size is not None else _side(settings) or (RELEASED_SIDE,) * 2
        if side[0] != side[1] or side[0] < 1:
            raise ValueError(f"{source}: {name} needs a square input side, got {side} (image_size / preprocessor size)")
        self._side = side[0]
        self._mean = tuple(float(v) for v in (image_mean or settings.get("image_mean") or IMAGENET_MEAN))
        self._std = tuple(float(v) for v in (image_std or settings.get("image_std") or IMAGENET_STD))
        self.transform = ResizeTransform(size=self._side, mode="resize", mean=self._mean, std=self._std)
        self._grid = self._grid_of(self._side)
        tokens = 1 + self._grid[0] * self._grid[1]
        seq = settings.get("image_seq_length")
        if seq is not None and image_size is None and int(seq) != tokens:
            raise ValueError(
                f"{source}: preprocessor_config.json image_seq_length={seq} but the vision tower gives {tokens} tokens "
                f"(1 + {self._grid[0]} x {self._grid[1]}) at {self._side} px"
            )
        limit = int(self.model.config.vision_config.max_position_embeddings)
        if max(self._grid) > limit:
            raise ValueError(
                f"{name}: a {self._side} px input gives a {self._grid} grid, beyond the projector's {limit} position "
                "embeddings per axis; use a smaller backbone.image_size"
            )
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

    def _check_family(self, name_or_path: str) -> None:
        path = Path(name_or_path) / "config.json"
        if path.is_file():
            found = json.loads(path.read_text()).get("model_type")
            if found != self.family:
                raise ValueError(f"{path}: {type(self).__name__} needs a {self.family!r} model, got model_type {found!r}")

    def _grid_of(self, side: int) -> tuple[int, int]:
        vision = self.model.config.vision_config
        for k, s, p in zip(vision.patch_size, vision.patch_stride, vision.patch_padding, strict=True):
            side = _conv_out(side, int(k), int(s), int(p))
        return (side, side)

    def _set_peft(self, peft: Any) -> None:
        self.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.model

    # --- the backbone interface ---------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._lm().config.text_config.d_model)

    @property
    def vision_width(self) -> int:
        return int(self._lm().config.vision_config.embed_dim[-1])  # the DaViT feature map's channels

    @property
    def feature_grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def input_size(self) -> int:
        return self._side

    @property
    def data_config(self) -> dict[str, Any]:
        return {"mean": self._mean, "std": self._std, "input_size": self._side, "transform": self.transform}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the (un-LoRA'd) model and the tokenizer to a folder ``name_or_path`` loads, with
        a ``preprocessor_config.json`` holding this backbone's size, mean, std and token count."""
        import transformers

        self._lm().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        transformers.CLIPImageProcessor(
            size={"height": self._side, "width": self._side}, do_center_crop=False, crop_size=None,
            image_mean=list(self._mean), image_std=list(self._std), resample=3,
        ).save_pretrained(folder)
        path = Path(folder) / "preprocessor_config.json"
        body = json.loads(path.read_text())
        body["image_seq_length"] = 1 + self._grid[0] * self._grid[1]
        path.write_text(json.dumps(body, indent=2))

    # --- images -------------------------------------------------------------------------------
    def _check_input(self, images: Tensor) -> None:
        if tuple(images.shape[-2:]) != (self._side, self._side):
            raise ValueError(
                f"{type(self).__name__}: an input image of {images.shape[-1]} x {images.shape[-2]} pixels is not in "
                f"Florence-2's frame ({self._side} x {self._side}); build the datamodule with this backbone's "
                "data_config['transform']"
            )

    def image_tokens_all(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_map (B, vision_width, h, w), tokens (B, 1 + h * w, D))``: the DaViT map and
        every token the encoder reads (the global token, then the grid in raster order)."""
        self._check_input(images)
        inner = self._lm().model
        out = inner.vision_tower(images.to(inner.vision_tower.convs[0].conv.weight.dtype))
        feature_map = out.last_hidden_state
        return feature_map, inner.multi_modal_projector(feature_map)

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_map, grid tokens (B, h * w, D))`` (the global token left out, so the tokens
        lie on ``feature_grid``)."""
        feature_map, tokens = self.image_tokens_all(images)
        return feature_map, tokens[:, 1:]

    # --- sequences ----------------------------------------------------------------------------
    def _split_rows(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> list[tuple[list[int], list[int]]]:
        """Per row, ``(prompt indices, answer indices)`` of attended ``input_ids``; the prompt's
        are those before the first labelled index (all of them without labels)."""
        bos = self.tokenizer.bos_token_id
        rows = []
        for b in range(input_ids.shape[0]):
            live = attention_mask[b].bool()
            index = live.nonzero().flatten()
            if labels is not None:
                labelled = ((labels[b] != -100) & live).nonzero().flatten()
                start = int(labelled[0]) if labelled.numel() else input_ids.shape[1]
            else:
                start = input_ids.shape[1]
            prompt = [int(i) for i in index if int(i) < start]
            answer = [int(i) for i in index if int(i) >= start]
            ids = input_ids[b, prompt].tolist()
            if ids.count(self.image_token_id) != 1:
                raise ValueError(
                    f"every prompt needs exactly one {self.image_token!r} token (id {self.image_token_id}); row {b} has "
                    f"{ids.count(self.image_token_id)}"
                )
            before = ids[: ids.index(self.image_token_id)]
            if any(t != bos for t in before):
                raise ValueError(
                    f"{type(self).__name__}: row {b} has text before the image; Florence-2's encoder reads the image "
                    "first: use data.template without text before {image} (vlzoo.backbones.florence2.FLORENCE2_TEMPLATE)"
                )
            rows.append((prompt, answer))
        return rows

    def _is_space(self, token_id: int) -> bool:
        """Whether ``token_id`` is a lone whitespace piece (BART's ``Ġ``, SentencePiece's ``▁``)."""
        cache = self.__dict__.setdefault("_space_ids", {})
        if token_id not in cache:
            special = set(self.tokenizer.all_special_ids)
            cache[token_id] = token_id not in special and self.tokenizer.decode([token_id]).strip() == ""
        return cache[token_id]

    def _decoder_prefix(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [self.decoder_start_id] + ([] if bos is None else [int(bos)])

    def _layout(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None, n_image: int
    ) -> dict[str, Any]:
        """Index plan of the encoder and decoder sequences (see the module doc)."""
        device = input_ids.device
        bos = self.tokenizer.bos_token_id
        eos = int(self.tokenizer.eos_token_id)
        pad = int(self.tokenizer.pad_token_id)
        rows = self._split_rows(input_ids, attention_mask, labels)
        prefix = self._decoder_prefix()
        enc_ids, enc_src, dec_ids, dec_src, dec_lead = [], [], [], [], []
        for b, (prompt, answer) in enumerate(rows):
            ids = input_ids[b].tolist()
            text = [i for i in prompt if ids[i] not in (bos, self.image_token_id)]
            # encoder: image tokens, <s>, the prompt text, </s>; -1 marks positions without an input id
            enc_ids.append([self.native_image_id] * n_image + ([] if bos is None else [int(bos)]) + [ids[i] for i in text] + [eos])
            place = {i: n_image + (0 if bos is None else 1) + j for j, i in enumerate(text)}
            for i in prompt:
                if ids[i] == self.image_token_id:
                    place[i] = 1  # the placeholder: the first grid token (after the global one)
                elif ids[i] == bos and i not in place:
                    place[i] = n_image
            enc_src.append(place)
            lead = {}
            if answer and self._is_space(ids[answer[0]]):
                # the collate writes " " + answer: a lone space token is not what the processor's
                # tokenizer gives the decoder (<s><loc_..>); it maps onto <s> and is not trained
                lead, answer = {answer[0]: len(prefix) - 1}, answer[1:]
            dec_ids.append(prefix + [ids[i] for i in answer])
            dec_src.append({i: len(prefix) + j for j, i in enumerate(answer)})
            dec_lead.append(lead)
        te = max(len(r) for r in enc_ids)
        td = max(len(r) for r in dec_ids)
        b = len(rows)
        enc = torch.full((b, te), pad, dtype=torch.long, device=device)
        enc_mask = torch.zeros((b, te), dtype=attention_mask.dtype, device=device)
        dec = torch.full((b, td), pad, dtype=torch.long, device=device)
        dec_mask = torch.zeros((b, td), dtype=attention_mask.dtype, device=device)
        positions = torch.zeros_like(input_ids)
        dec_labels = torch.full((b, td), -100, dtype=torch.long, device=device)
        for r in range(b):
            enc[r, : len(enc_ids[r])] = torch.tensor(enc_ids[r], device=device)
            enc_mask[r, : len(enc_ids[r])] = 1
            dec[r, : len(dec_ids[r])] = torch.tensor(dec_ids[r], device=device)
            dec_mask[r, : len(dec_ids[r])] = 1
            for i, p in enc_src[r].items():
                positions[r, i] = p
            for i, p in dec_lead[r].items():
                positions[r, i] = te + p
            for i, p in dec_src[r].items():
                positions[r, i] = te + p
                if labels is not None:
                    dec_labels[r, p] = labels[r, i]
            # padding ids point at the row's last position of their block (never read)
            unset = (attention_mask[r] == 0).nonzero().flatten()
            positions[r, unset] = te + td - 1
        return {"enc": enc, "enc_mask": enc_mask, "dec": dec, "dec_mask": dec_mask, "positions": positions,
                "dec_labels": dec_labels, "enc_src": enc_src, "dec_src": dec_src, "te": te}

    def _embed(
        self, ids: Tensor, input_ids: Tensor, src: list[dict[int, int]], text: Tensor | None
    ) -> Tensor:
        """Token embeddings of ``ids``, with the (possibly edited) text embeddings of ``input_ids``
        at the positions they map to."""
        embeds = self.embed_tokens(ids)
        if text is None:
            return embeds
        for r, place in enumerate(src):
            if place:
                index = torch.tensor(list(place), device=ids.device)
                where = torch.tensor(list(place.values()), device=ids.device)
                keep = input_ids[r, index] != self.image_token_id
                embeds = embeds.index_put((torch.full_like(where[keep], r), where[keep]), text[r, index[keep]].to(embeds.dtype))
        return embeds

    def _encode(self, embeds: Tensor, mask: Tensor) -> Tensor:
        encoder = self._lm().model.language_model.encoder
        return encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def _decoder(
        self, embeds: Tensor, mask: Tensor, memory: Tensor, memory_mask: Tensor, cache: Any = None
    ) -> Tensor:
        decoder = self._lm().model.language_model.decoder
        out = decoder(
            inputs_embeds=embeds, attention_mask=mask, encoder_hidden_states=memory, encoder_attention_mask=memory_mask,
            cache=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state

    def _refuse_attention(self, what: str) -> None:
        raise AttentionUnavailableError(
            f"{type(self).__name__}: {what} - an encoder-decoder's decoder reaches the image tokens only through "
            "cross-attention, so there is no text-to-image self-attention map to return; turn off the recipe key that "
            "asks for it (paradigm.refocus_lambda: 0 for pixel2emb; attention_keypoints needs a decoder-only backbone)"
        )

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        output_attentions: Sequence[int] | None = None,
        inputs_embeds_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        references: References | None = None,
    ) -> MultimodalOutput:
        """Encoder over image + prompt, decoder over ``</s> <s>`` + answer (see the module doc).

        ``inputs_embeds_fn(text_embeds (B, L, D), input_ids)`` edits the embeddings of
        ``input_ids`` before they enter the encoder (prompt ids) or the decoder (answer ids)."""
        if output_attentions:
            self._refuse_attention(f"output_attentions={list(output_attentions)}")
        self._refuse_references(references)
        feature_map, tokens = self.image_tokens_all(images)
        plan = self._layout(input_ids, attention_mask, labels, tokens.shape[1])
        text = None
        if inputs_embeds_fn is not None:
            text = inputs_embeds_fn(self.embed_tokens(input_ids), input_ids)
        enc_embeds = self._embed(plan["enc"], input_ids, plan["enc_src"], text)
        enc_embeds = self._splice_image(enc_embeds, tokens)
        memory = self._encode(enc_embeds, plan["enc_mask"])
        dec_embeds = self._embed(plan["dec"], input_ids, plan["dec_src"], text)
        hidden_dec = self._decoder(dec_embeds, plan["dec_mask"], memory, plan["enc_mask"])
        logits_dec = self._lm().get_output_embeddings()(hidden_dec)
        b, te = memory.shape[:2]
        loss = None
        out_labels = None
        if labels is not None:
            target = plan["dec_labels"][:, 1:]
            loss = F.cross_entropy(
                logits_dec[:, :-1].float().reshape(-1, logits_dec.shape[-1]), target.reshape(-1), ignore_index=-100,
                reduction="sum",
            ) / (target != -100).sum().clamp(min=1)
            out_labels = torch.cat([plan["dec_labels"].new_full((b, te), -100), plan["dec_labels"]], 1)
        logits = torch.cat([logits_dec.new_zeros(b, te, logits_dec.shape[-1]), logits_dec], 1)
        n_grid = tokens.shape[1] - 1
        image_positions = (1 + torch.arange(n_grid, device=input_ids.device)).expand(b, -1)
        return MultimodalOutput(
            loss=loss,
            logits=logits,
            hidden_states=torch.cat([memory, hidden_dec.to(memory.dtype)], 1),
            attention_mask=torch.cat([plan["enc_mask"], plan["dec_mask"]], 1),
            positions=plan["positions"],
            image_positions=image_positions,
            image_features=feature_map,
            image_tokens=tokens[:, 1:],
            labels=out_labels,
            attentions=None,
        )

    def _splice_image(self, embeds: Tensor, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        return torch.cat([tokens.to(embeds.dtype), embeds[:, n:]], 1)

    def _refuse_references(self, references: References | None) -> None:
        if references is None:
            return
        if any(a is not None for a in references.audio):
            raise ValueError(
                f"{type(self).__name__} has no reference encoder: spoken references need a decoder-only backbone "
                "with backbone.references (MultimodalBackbone, LlavaBackbone, PaliGemmaBackbone, Qwen2VLBackbone / "
                "Qwen25VLBackbone, Kosmos2Backbone)"
            )

    def splice(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a decoder-only splice has no meaning for an encoder-decoder (the shared
        :func:`~vlzoo.backbones.greedy_decode` loop would run the decoder without the encoder)."""
        raise TypeError(
            f"{type(self).__name__} is an encoder-decoder: it has no decoder-only splice; call its own forward / "
            "generate / decode (vlzoo.backbones.greedy_decode is for decoder-only backbones)"
        )

    # --- generation ---------------------------------------------------------------------------
    def native_inputs(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """What ``Florence2Processor`` gives the native model for the same rows: ``input_ids``
        (the image tokens, ``<s> prompt </s>``, right-padded), ``attention_mask``, ``pixel_values``
        and ``decoder_input_ids`` - ``</s> <s>``, followed by the answer when ``labels`` mark one
        (then with ``decoder_attention_mask``)."""
        plan = self._layout(input_ids, attention_mask, labels, 1 + self._grid[0] * self._grid[1])
        out = {"input_ids": plan["enc"], "attention_mask": plan["enc_mask"], "pixel_values": images,
               "decoder_input_ids": plan["dec"]}
        if labels is not None:
            out["decoder_attention_mask"] = plan["dec_mask"]
        return out

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        prompt_ids: Tensor,
        prompt_attention_mask: Tensor,
        max_new_tokens: int = 32,
        logits_processor: Callable[[Tensor, Tensor], Tensor] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        use_cache: bool = True,
        inputs_embeds_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        references: References | None = None,
    ) -> Tensor:
        """Greedy decoding (see :meth:`decode`); ``logits_processor(ids, scores)`` sees the prompt
        ids followed by the generated ones, like a decoder-only backbone's."""
        return self.decode(
            images, prompt_ids, prompt_attention_mask,
            hooks=DecodingHooks(logits_processor=logits_processor, inputs_embeds_fn=inputs_embeds_fn),
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, use_cache=use_cache,
            inputs_embeds_fn=inputs_embeds_fn, references=references,
        )

    @torch.no_grad()
    def decode(
        self,
        images: Tensor,
        prompt_ids: Tensor,
        prompt_attention_mask: Tensor,
        *,
        hooks: DecodingHooks,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        use_cache: bool = True,
        inputs_embeds_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        references: References | None = None,
    ) -> Tensor:
        """Greedy decoding with a paradigm's hooks: the encoder runs once over image + prompt
        (prompts may be left- or right-padded: the encoder's rows are rebuilt right-padded, as the
        processor pads them), the decoder over ``</s> <s>`` and then one token per step with an
        encoder-decoder KV cache.  The hooks' :class:`~vlzoo.backbones.DecodingState` carries the
        encoder's states as the prompt's (``image_hidden_states()`` reads them) and the decoder's
        newest state as ``hidden``; hooks asking for attention layers are refused."""
        if hooks.attention_layers(None):
            self._refuse_attention("the decoding hooks ask for attention layers")
        self._refuse_references(references)
        device = prompt_ids.device
        tok = self.tokenizer
        eos = _eos_tensor(tok.eos_token_id if eos_token_id is None else eos_token_id, device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        feature_map, tokens = self.image_tokens_all(images)
        plan = self._layout(prompt_ids, prompt_attention_mask, None, tokens.shape[1])
        text = None
        if inputs_embeds_fn is not None:
            text = inputs_embeds_fn(self.embed_tokens(prompt_ids), prompt_ids)
        enc_embeds = self._splice_image(self._embed(plan["enc"], prompt_ids, plan["enc_src"], text), tokens)
        memory_mask = plan["enc_mask"]
        memory = self._encode(enc_embeds, memory_mask)
        b = prompt_ids.shape[0]
        head = self._lm().get_output_embeddings()
        lm = self._lm()
        flag = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
        if self.training and getattr(lm, flag, False):
            use_cache = False  # transformers drops the cache under activation checkpointing: re-run instead
        cache = None
        if use_cache:
            from transformers import DynamicCache, EncoderDecoderCache

            config = self._lm().model.language_model.decoder.config
            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        embeds = self.embed_tokens(plan["dec"])  # (B, len(prefix), D)
        mask = plan["dec_mask"]
        hidden = self._decoder(embeds, mask, memory, memory_mask, cache)
        n_grid = tokens.shape[1] - 1
        image_positions = (1 + torch.arange(n_grid, device=device)).expand(b, -1)

        def state_of(step: int, ids: Tensor, hidden: Tensor, finished: Tensor, generated: list[Tensor]) -> DecodingState:
            return DecodingState(
                step=step, ids=ids, scores=head(hidden[:, -1]).float(), hidden=hidden[:, -1], finished=finished,
                attentions={}, image_features=feature_map, image_tokens=tokens[:, 1:], image_positions=image_positions,
                positions=plan["positions"], prompt_hidden=memory, generated_hidden=generated,
            )

        state = state_of(0, prompt_ids, hidden, torch.zeros(b, dtype=torch.bool, device=device), [])
        hooks.observe(state)
        new_tokens: list[Tensor] = []
        for step in range(max_new_tokens):
            token = hooks.choose(state)
            token = torch.where(state.finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            attended = (~state.finished).to(mask.dtype)[:, None]
            finished = state.finished | torch.isin(token, eos)
            last = step == max_new_tokens - 1 or bool(finished.all())
            if last and not hooks.final_pass(state, token):
                break
            token_embeds = hooks.next_embeds(state, token, self.embed_tokens(token[:, None])).to(embeds.dtype)
            mask = torch.cat([mask, attended], 1)
            if use_cache:
                hidden = self._decoder(token_embeds, mask, memory, memory_mask, cache)
            else:
                embeds = torch.cat([embeds, token_embeds], 1)
                hidden = self._decoder(embeds, mask, memory, memory_mask)
            state = state_of(step + 1, torch.cat([state.ids, token[:, None]], 1), hidden, finished,
                             [*state.generated_hidden, hidden[:, -1]])
            hooks.observe(state)
            if last:
                break
        if not new_tokens:
            return prompt_ids.new_zeros(b, 0)
        return torch.stack(new_tokens, 1)

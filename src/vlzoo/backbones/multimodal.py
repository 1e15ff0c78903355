"""LLaVA-style composition of a vision encoder and a causal LM.

The image goes through the vision encoder, a projector maps its patch tokens to the LM's hidden
size, and those tokens replace the single ``<image>`` placeholder of each sequence in the LM's
input embeddings.

Expanded-sequence layout.  A text row ``input_ids`` of length ``L`` with the placeholder at
index ``p`` becomes an expanded row of length ``T = L - 1 + N`` (``N`` image tokens)::

    input_ids:  t_0 .. t_{p-1}  <image>            t_{p+1} .. t_{L-1}
    expanded:   t_0 .. t_{p-1}  img_0 .. img_{N-1}  t_{p+1} .. t_{L-1}

``positions[b, i]`` is the expanded index of ``input_ids[b, i]`` (``i + N - 1`` after the
placeholder, ``p`` — the first image token — for the placeholder itself) and
``image_positions[b]`` is ``p + arange(N)``.  Position ids count attended tokens only
(``cumsum(mask) - 1``), so left-padded prompts and right-padded training rows both work.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.generation import DecodingHooks, greedy_decode
from vlzoo.backbones.language import CausalLM
from vlzoo.backbones.policies import (
    apply_lora,
    enable_gradient_checkpointing,
    lora_settings,
    set_trainable,
    train_rows,
)
from vlzoo.backbones.shipped import read_weights
from vlzoo.structures import References
from vlzoo.weights import load_weights

__all__ = [
    "MultimodalOutput",
    "MultimodalBackbone",
    "BackboneCheckpointError",
    "CHECKPOINT_FORMAT",
    "build_projector",
]

CHECKPOINT_FORMAT = "vlzoo-backbone/1"

InputsEmbedsFn = Callable[[Tensor, Tensor], Tensor]


class BackboneCheckpointError(ValueError):
    """A backbone checkpoint does not fit the backbone built from the recipe."""


@dataclass
class MultimodalOutput:
    """What :meth:`MultimodalBackbone.forward` returns (``T`` = expanded length)."""

    loss: Tensor | None  # LM cross-entropy over labels (image positions ignored); None without labels
    logits: Tensor  # (B, T, V)
    hidden_states: Tensor  # (B, T, D) last layer (after the final norm)
    attention_mask: Tensor  # (B, T)
    positions: Tensor  # (B, L) expanded index of every input_ids index
    image_positions: Tensor  # (B, N) expanded indices of the image tokens
    image_features: Tensor  # (B, vision_width, h, w) vision feature map before the projector
    image_tokens: Tensor  # (B, N, D) projected image tokens as fed to the LM
    labels: Tensor | None = None  # (B, T) expanded labels
    attentions: dict[int, Tensor] | None = None  # layer -> (B, heads, T, T), when asked

    def text_hidden_states(self) -> Tensor:
        """``(B, L, D)``: the last hidden state at every ``input_ids`` index."""
        index = self.positions.unsqueeze(-1).expand(-1, -1, self.hidden_states.shape[-1])
        return self.hidden_states.gather(1, index)

    def image_hidden_states(self) -> Tensor:
        """``(B, N, D)``: the last hidden state at every image token (query-aware when the
        instruction comes before the image)."""
        index = self.image_positions.unsqueeze(-1).expand(-1, -1, self.hidden_states.shape[-1])
        return self.hidden_states.gather(1, index)


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` or ``mlp2x_gelu`` (LLaVA-1.5: Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; choose 'linear' or 'mlp2x_gelu'")


@dataclass
class _Spliced:
    embeds: Tensor
    attention_mask: Tensor
    labels: Tensor | None
    positions: Tensor
    image_positions: Tensor


def _unwrap_saved(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """The real layers behind a PEFT ``ModulesToSaveWrapper`` as ``(layer, used_in_forward)``."""
    if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
        return [(module.original_module, False)] + [(m, True) for m in module.modules_to_save.values()]
    return [(module, True)]


def _plain_key(key: str) -> str | None:
    """A state-dict key without PEFT's wrapping; ``None`` for LoRA factors and frozen originals."""
    key = key.replace("base_model.model.", "", 1) if ".base_model.model." in f".{key}" else key
    parts = key.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    return key


class _SquareFrame:
    """The interface sizes of a backbone whose image is one fixed square of ``_input_size``
    pixels cut into a ``_grid_stride``-pixel patch grid (LLaVA, PaliGemma, Kosmos-2): it sets
    those two, ``_vision_width``, ``_mean`` and ``_std``, and ``transform`` when its frame is its
    own (``data_config["transform"]``, injected into the datamodule)."""

    _vision_width: int
    _input_size: int
    _grid_stride: int
    _mean: Any
    _std: Any

    @property
    def vision_width(self) -> int:
        return self._vision_width

    @property
    def feature_grid(self) -> tuple[int, int]:
        side = self._input_size // self._grid_stride
        return (side, side)

    @property
    def input_size(self) -> int:
        return self._input_size

    @property
    def data_config(self) -> dict[str, Any]:
        config = {"mean": tuple(self._mean), "std": tuple(self._std), "input_size": self._input_size}
        transform = getattr(self, "transform", None)
        if transform is not None:
            config["transform"] = transform
        return config


class _SplicingBackbone(nn.Module, metaclass=abc.ABCMeta):
    """Splicing, forward, generation, special tokens and checkpoints shared by the backbones.

    A subclass provides ``tokenizer``, ``image_token``, ``image_token_id``, ``_lm_holder()`` (the
    registered transformers causal LM — ``get_input_embeddings``, ``get_output_embeddings``,
    ``get_decoder`` — or its PEFT wrapper) and ``encode_images(images) -> (feature_map,
    image_tokens)``; it calls :meth:`_setup_policies` last in its constructor.
    """

    tokenizer: Any
    image_token: str
    image_token_id: int
    def _init_state(self) -> None:
        self.added_tokens: list[str] = []
        self._new_token_ids: list[int] = []
        self._train_new_embeddings = True
        self._row_hooks: list[tuple[nn.Parameter, Any]] = []
        self._reference_ids: dict[str, int] = {}

    # --- references (vlzoo.backbones.references) ---------------------------------------------
    def _setup_references(self, references: nn.Module | None, dtype: torch.dtype) -> None:
        """Register the reference encoder, size it to the LM and add its tokens (new rows
        trainable like any added token's)."""
        self.references = references
        if references is not None:
            references.bind(self.hidden_size, dtype)
            self._reference_ids = self.add_special_tokens(references.special_tokens)

    def embed_references(
        self, text_embeds: Tensor, input_ids: Tensor, references: References | None, images: Tensor
    ) -> Tensor:
        """``text_embeds`` with the reference placeholders replaced by the references' tokens
        (unchanged without a reference encoder or placeholders)."""
        encoder = getattr(self, "references", None)
        if encoder is None:
            return text_embeds
        return encoder.embed(
            text_embeds,
            input_ids,
            references,
            token_ids=self._reference_ids,
            images=images,
            encode_images=self.encode_images,
            grid=self.reference_grid(images),
        )

    def reference_grid(self, images: Tensor) -> tuple[int, int]:
        """``(h, w)``: how :meth:`encode_images` lays out the tokens of ``images`` (a crop
        reference is encoded at the images' size and pooled on this grid): ``feature_grid``; a
        backbone whose grid follows the image size (Qwen's smart_resize frame) overrides it."""
        return tuple(self.feature_grid)

    # --- subclass hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def _lm_holder(self) -> nn.Module:
        """The registered module holding the LM: the transformers model or its PEFT wrapper."""

    def _lm(self) -> nn.Module:
        """The transformers causal LM (inside PEFT's wrapper when LoRA is on; LoRA layers are
        injected in place, so calling its parts runs the adapters)."""
        holder = self._lm_holder()
        return holder.get_base_model() if hasattr(holder, "get_base_model") else holder

    @property
    def peft_model(self) -> Any:
        """The PEFT model when LoRA is on (e.g. for ``with backbone.peft_model.disable_adapter():``)."""
        holder = self._lm_holder()
        return holder if hasattr(holder, "get_base_model") else None

    @abc.abstractmethod
    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(feature_map (B, vision_width, h, w), image_tokens (B, N, hidden_size))``."""

    # --- embeddings and special tokens ------------------------------------------------------
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """The LM's input embeddings of ``input_ids`` (new tokens included)."""
        return self._lm().get_input_embeddings()(input_ids)

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        """Add ``tokens`` to the tokenizer (as special tokens) and their rows to the embedding and
        LM head; return every token's id.  Tokens already in the vocabulary keep their id.

        New rows start at the mean of the old ones.  When the embedding (or untied head) is
        frozen, exactly the rows of tokens added through this method become trainable (gradient
        mask); see :meth:`no_weight_decay`.
        """
        vocab = self.tokenizer.get_vocab()
        new = [t for t in dict.fromkeys(tokens) if t not in vocab]
        if new:
            self.tokenizer.add_tokens(new, special_tokens=True)
        ids = {t: int(self.tokenizer.convert_tokens_to_ids(t)) for t in tokens}
        for t in tokens:
            if t not in self.added_tokens:
                self.added_tokens.append(t)
        if new:
            self._new_token_ids = sorted(set(self._new_token_ids) | {ids[t] for t in new})
            rows = max(len(self.tokenizer), max(ids.values()) + 1)
            if rows > self._vocab_rows():
                self._resize_vocab(rows)
            self._mask_new_rows()
        return ids

    def _vocab_rows(self) -> int:
        layer, _ = _unwrap_saved(self._lm().get_input_embeddings())[0]
        return int(layer.weight.shape[0])

    def _resize_vocab(self, rows: int) -> None:
        lm = self._lm()
        inputs = _unwrap_saved(lm.get_input_embeddings())
        head = lm.get_output_embeddings()
        outputs = _unwrap_saved(head) if head is not None else []
        old_weights = [layer.weight for layer, _ in inputs]
        for layer, _ in inputs:
            old = layer.weight
            extra = old.detach().mean(0, keepdim=True).expand(rows - old.shape[0], -1)
            layer.weight = nn.Parameter(torch.cat([old.detach(), extra]), requires_grad=_trainable(old))
            layer.num_embeddings = rows
        for layer, _ in outputs:
            tied = next((i for i, w in enumerate(old_weights) if layer.weight is w), None)
            if tied is not None:
                layer.weight = inputs[tied][0].weight
            else:
                old = layer.weight
                extra = old.detach().mean(0, keepdim=True).expand(rows - old.shape[0], -1)
                layer.weight = nn.Parameter(torch.cat([old.detach(), extra]), requires_grad=_trainable(old))
                if getattr(layer, "bias", None) is not None:
                    bias = layer.bias
                    fill = bias.detach().mean().expand(rows - bias.shape[0])
                    layer.bias = nn.Parameter(torch.cat([bias.detach(), fill]), requires_grad=bias.requires_grad)
            layer.out_features = rows
        lm.config.get_text_config().vocab_size = rows
        if hasattr(lm, "vocab_size"):
            lm.vocab_size = rows

    def _mask_new_rows(self) -> None:
        """(Re)install the row masks on frozen embedding / head matrices."""
        if not self._train_new_embeddings or not self._new_token_ids:
            return
        for _, handle in self._row_hooks:
            handle.remove()
        hooks = []
        lm = self._lm()
        layers = _unwrap_saved(lm.get_input_embeddings())
        if lm.get_output_embeddings() is not None:
            layers += _unwrap_saved(lm.get_output_embeddings())
        seen: set[int] = set()
        for layer, used in layers:
            weight = layer.weight
            if not used or id(weight) in seen:
                continue
            seen.add(id(weight))
            if _trainable(weight):
                continue  # fully trainable already
            hooks.append((weight, train_rows(weight, self._new_token_ids)))
        self._row_hooks = hooks

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained only in some rows; keep them out of weight decay."""
        masked = {id(p) for p, _ in self._row_hooks}
        return {name for name, p in self.named_parameters() if id(p) in masked}

    # --- policies -----------------------------------------------------------------------------
    def _setup_policies(
        self,
        *,
        vision: nn.Module,
        projector: nn.Module,
        language: Sequence[nn.Module],
        freeze_vision: bool,
        freeze_projector: bool,
        freeze_lm: bool,
        train_new_embeddings: bool,
        lora: dict[str, Any] | None,
        gradient_checkpointing: bool,
        lora_exclude: str | None,
        set_peft: Callable[[Any], None],
    ) -> None:
        lm = self._lm()
        set_trainable(vision, not freeze_vision)
        set_trainable(projector, not freeze_projector)
        for part in language:
            set_trainable(part, not freeze_lm)
        self._train_new_embeddings = train_new_embeddings
        if gradient_checkpointing:
            enable_gradient_checkpointing(lm)
            if not freeze_vision and hasattr(vision, "set_grad_checkpointing"):
                vision.set_grad_checkpointing(True)
        if lora is not None:
            settings = lora_settings(lora)
            peft = apply_lora(lm, exclude_modules=lora_exclude, **settings)
            set_peft(peft)
            # PEFT freezes everything it wraps; restore the policy of the non-LM parts
            set_trainable(vision, not freeze_vision)
            set_trainable(projector, not freeze_projector)
        self._mask_new_rows()

    # --- splicing -------------------------------------------------------------------------------
    def splice(
        self,
        text_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor,
        labels: Tensor | None = None,
    ) -> _Spliced:
        """Replace each row's single ``<image>`` placeholder by ``image_tokens`` (see module doc)."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"every sequence needs exactly one {self.image_token!r} token (id {self.image_token_id}); "
                f"found counts {counts.tolist()}"
            )
        b, length = input_ids.shape
        n = image_tokens.shape[1]
        total = length - 1 + n
        device = input_ids.device
        p = is_image.float().argmax(1)  # (B,)
        index = torch.arange(length, device=device).expand(b, -1)
        positions = index + (n - 1) * (index > p[:, None]).long()
        image_positions = p[:, None] + torch.arange(n, device=device)
        rows = torch.arange(b, device=device)
        keep_b, keep_i = (~is_image).nonzero(as_tuple=True)
        dst = positions[keep_b, keep_i]
        embeds = text_embeds.new_zeros(b, total, text_embeds.shape[-1])
        embeds = embeds.index_put((keep_b, dst), text_embeds[keep_b, keep_i])
        embeds = embeds.index_put(
            (rows[:, None].expand(-1, n), image_positions), image_tokens.to(text_embeds.dtype)
        )
        mask = attention_mask.new_zeros(b, total)
        mask[keep_b, dst] = attention_mask[keep_b, keep_i]
        mask[rows[:, None].expand(-1, n), image_positions] = attention_mask[rows, p][:, None]
        out_labels = None
        if labels is not None:
            out_labels = labels.new_full((b, total), -100)
            out_labels[keep_b, dst] = labels[keep_b, keep_i]
        return _Spliced(embeds, mask, out_labels, positions, image_positions)

    def position_ids(self, spliced: _Spliced, image_features: Tensor) -> Tensor:
        """Position ids of the expanded sequence: ``(B, T)`` counting attended tokens only; a
        backbone whose LM places image tokens otherwise (Qwen's M-RoPE: ``(3, B, T)``) overrides it.
        Generation continues the last position by one on every axis."""
        return (spliced.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def bidirectional_prefix(self, input_ids: Tensor, spliced: _Spliced) -> Tensor | None:
        """``(B, T)`` bool: the expanded positions of each row that attend each other both ways
        (a prefix LM's prefix, PaliGemma's image + prompt); the rest attends causally.  ``None``
        (the default): causal attention everywhere.  ``input_ids`` are the text rows ``spliced``
        was made from; generation marks every generated token causal."""
        return None

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """The LM head on last-layer hidden states (a backbone whose model post-processes its
        logits, e.g. Gemma 2's soft-capping, overrides it)."""
        return self._lm().get_output_embeddings()(hidden)

    def _prefix_mask(
        self, decoder: nn.Module, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any, prefix: Tensor
    ) -> Any:
        """The decoder's attention mask with ``prefix`` bidirectional (transformers' own mask
        builder with block ids, as PaliGemma's ``token_type_ids`` do; both kinds for a LM with
        sliding-window layers)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = {
            "config": decoder.config,
            "inputs_embeds": embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
            "block_sequence_ids": torch.where(prefix, 0, -1),
            "allow_is_causal_skip": False,
        }
        if "cache" not in inspect.signature(create_causal_mask).parameters:  # transformers < 5
            kwargs["past_key_values"] = kwargs.pop("cache")
        mask = create_causal_mask(**kwargs)
        if getattr(decoder.config, "sliding_window", None) is not None:
            return {"full_attention": mask, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
        return mask

    # --- the LM ---------------------------------------------------------------------------------
    def _decoder_module(self) -> nn.Module:
        """The module :meth:`_decode` runs (embeddings in, ``last_hidden_state`` out): the LM's
        decoder; a family whose ``get_decoder()`` is the causal LM itself names its transformer."""
        return self._lm().get_decoder()

    def _decode(
        self,
        embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        *,
        past_key_values: Any = None,
        attention_layers: Sequence[int] | None = None,
        prefix: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the LM on spliced embeddings; ``prefix`` (``(B, T)`` bool over the keys, from
        :meth:`bidirectional_prefix`) makes those positions attend each other both ways."""
        decoder = self._decoder_module()
        captured: dict[int, Tensor] = {}
        with contextlib.ExitStack() as stack:
            if attention_layers:
                stack.enter_context(_eager_attention(decoder.config))
                layers = decoder.layers
                for index in attention_layers:
                    layer = layers[index]
                    attn = layer.self_attn if hasattr(layer, "self_attn") else _find_attention(layer)
                    key = index if index >= 0 else len(layers) + index

                    def _hook(_m: nn.Module, _inp: Any, output: Any, key: int = key) -> None:
                        captured[key] = output[1]

                    handle = attn.register_forward_hook(_hook)
                    stack.callback(handle.remove)
            mask: Any = attention_mask
            if prefix is not None:  # built inside the eager block: the mask's form follows the kernel
                mask = self._prefix_mask(decoder, embeds, attention_mask, position_ids, past_key_values, prefix)
            out = decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=past_key_values is not None,
                **{_cache_argument(decoder): past_key_values},
            )
        return out.last_hidden_state, captured

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        output_attentions: Sequence[int] | None = None,
        inputs_embeds_fn: InputsEmbedsFn | None = None,
        references: References | None = None,
    ) -> MultimodalOutput:
        """Run vision encoder, projector and LM on a batch (see the module doc for the layout).

        Args:
            images: ``(B, 3, S, S)`` normalised with ``data_config``.
            input_ids, attention_mask: ``(B, L)``, one ``<image>`` token per row.
            labels: ``(B, L)`` LM targets, ``-100`` where no loss is wanted.
            output_attentions: layer indices whose attention maps to return (computed with eager
                attention for this call).
            inputs_embeds_fn: ``fn(text_embeds (B, L, D), input_ids) -> (B, L, D)`` applied to the
                text embeddings before splicing (e.g. to put a box embedding at a ``<loc>``).
            references: the rows' references (``batch.references()``): their tokens replace the
                reference placeholders (see :mod:`vlzoo.backbones.references`).
        """
        image_features, image_tokens = self.encode_images(images)
        text = self.embed_references(self.embed_tokens(input_ids), input_ids, references, images)
        if inputs_embeds_fn is not None:
            text = inputs_embeds_fn(text, input_ids)
        sp = self.splice(text, input_ids, attention_mask, image_tokens, labels)
        position_ids = self.position_ids(sp, image_features)
        hidden, attentions = self._decode(
            sp.embeds,
            sp.attention_mask,
            position_ids,
            attention_layers=output_attentions,
            prefix=self.bidirectional_prefix(input_ids, sp),
        )
        logits = self.lm_logits(hidden)
        loss = None
        if sp.labels is not None:
            target = sp.labels[:, 1:]
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            ) / (target != -100).sum().clamp(min=1)
        return MultimodalOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden,
            attention_mask=sp.attention_mask,
            positions=sp.positions,
            image_positions=sp.image_positions,
            image_features=image_features,
            image_tokens=image_tokens,
            labels=sp.labels,
            attentions=attentions if output_attentions else None,
        )

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
        inputs_embeds_fn: InputsEmbedsFn | None = None,
        references: References | None = None,
    ) -> Tensor:
        """Greedy decoding from left-padded prompts; returns ``(B, new_tokens)`` token ids.

        ``logits_processor(ids, scores)`` (a transformers ``LogitsProcessorList`` works) sees the
        text ids so far — prompt then generated, without image tokens — and the next-token scores.
        After a row emits an eos token it is filled with the pad id; decoding stops when every
        row has finished.  ``use_cache=False`` recomputes the whole sequence each step.
        ``inputs_embeds_fn`` is applied to the prompt's and to every generated token's text
        embeddings.  The loop is :func:`vlzoo.backbones.generation.greedy_decode`, which
        paradigms with their own decoding steps call with their hooks (:meth:`decode`).
        """
        return self.decode(
            images,
            prompt_ids,
            prompt_attention_mask,
            hooks=DecodingHooks(logits_processor=logits_processor, inputs_embeds_fn=inputs_embeds_fn),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            inputs_embeds_fn=inputs_embeds_fn,
            references=references,
        )

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
        inputs_embeds_fn: InputsEmbedsFn | None = None,
        references: References | None = None,
    ) -> Tensor:
        """Greedy decoding with a paradigm's :class:`~vlzoo.backbones.generation.DecodingHooks`
        (see :func:`~vlzoo.backbones.generation.greedy_decode`); returns the new token ids."""
        return greedy_decode(
            self,
            images,
            prompt_ids,
            prompt_attention_mask,
            hooks=hooks,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            use_cache=use_cache,
            inputs_embeds_fn=inputs_embeds_fn,
            references=references,
        )

    # --- checkpoints ----------------------------------------------------------------------------
    def plain_state_dict(self) -> dict[str, Tensor]:
        """The state dict with LoRA merged in and PEFT's wrapping removed (what a backbone without
        LoRA has), so a checkpoint loads whatever LoRA setting the next recipe uses."""
        state = self.state_dict()
        merged: dict[str, Tensor] = {}
        if self.peft_model is not None or any("lora_" in k for k in state):  # the LM's or the audio encoder's
            from peft.tuners.lora import LoraLayer

            for name, module in self.named_modules():
                if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                    weight = module.base_layer.weight.detach()
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                    merged[f"{name}.base_layer.weight"] = weight
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            plain = _plain_key(key)
            if plain is not None:
                out[plain] = merged.get(key, value).detach().clone()
        return out

    def backbone_blob(self) -> dict[str, Any]:
        """What :meth:`save_backbone` writes: the weights (LoRA merged) and the added tokens."""
        return {
            "format": CHECKPOINT_FORMAT,
            "class": type(self).__name__,
            "added_tokens": list(self.added_tokens),
            "token_ids": {t: int(self.tokenizer.convert_tokens_to_ids(t)) for t in self.added_tokens},
            "state_dict": self.plain_state_dict(),
        }

    def save_backbone(self, path: str | Path) -> None:
        """Write the weights (LoRA merged) and the added tokens to one file, loadable with the
        ``checkpoint`` argument of a backbone built with the same architecture."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.backbone_blob(), str(path))

    def _setup_references_and_load(
        self, references: nn.Module | None, dtype: torch.dtype, checkpoint: str | Path | None
    ) -> None:
        """Register the reference encoder and load the ``checkpoint`` backbone file, in the order
        the file needs. A file saved with a reference encoder loads after the encoder is set up
        (its weights and token rows are in the file). A file saved without one - a stage-0 LMM,
        the usual start - loads first, and the encoder and its tokens are added after it, fresh:
        "start from this LMM and learn to read references"."""
        blob = None
        if checkpoint is not None and read_weights(checkpoint, "backbone checkpoint"):
            blob = self._read_backbone_file(checkpoint)
        if references is not None and blob is not None:
            if not any(k.startswith("references.") for k in blob["state_dict"]):
                self._load_backbone(checkpoint, blob=blob)
                self._setup_references(references, dtype)
                return
            # the file's tokens first, in its id order: reference tokens that were added after
            # earlier ones (a stage-0 file's [SEG]) get back the ids they were saved with
            saved_ids = blob["token_ids"]
            self.add_special_tokens(sorted(blob["added_tokens"], key=lambda t: saved_ids.get(t, -1)))
        self._setup_references(references, dtype)
        if blob is not None:
            self._load_backbone(checkpoint, blob=blob)

    @staticmethod
    def _read_backbone_file(path: str | Path) -> dict[str, Any]:
        """The contents of a :meth:`save_backbone` file; a whole run's checkpoint (``vlzoo fit``'s
        ``last.ckpt``) is refused: taking the backbone out of it means rebuilding that run's
        paradigm, an explicit step of its own (``vlzoo export CHECKPOINT FILE --backbone``,
        :func:`vlzoo.checkpoints.export_backbone`)."""
        blob = load_weights(path, what="backbone checkpoint")
        if isinstance(blob, dict) and "pytorch-lightning_version" in blob:
            raise BackboneCheckpointError(
                f"{path} is a whole run's checkpoint (a Lightning fit checkpoint such as last.ckpt), not a backbone "
                f"file. Export the run's backbone first - `vlzoo export {path} backbone.pt --backbone` (Python: "
                "vlzoo.checkpoints.export_backbone) - and give that file as backbone.checkpoint"
            )
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise BackboneCheckpointError(f"{path} is not a vlzoo backbone checkpoint (save_backbone)")
        return blob

    def _load_backbone(self, path: str | Path, *, blob: dict[str, Any] | None = None) -> None:
        """Load a :meth:`save_backbone` file (``blob``: its contents, if already read) before any
        LoRA / freezing is applied."""
        if blob is None:
            blob = self._read_backbone_file(path)
        ids = self.add_special_tokens(blob["added_tokens"])
        moved = {t: (i, blob["token_ids"][t]) for t, i in ids.items() if blob["token_ids"].get(t) != i}
        if moved:
            raise BackboneCheckpointError(
                f"{path}: the tokenizer gives different ids to the checkpoint's tokens "
                f"(token: (now, saved)) {moved}; was it saved with another tokenizer?"
            )
        saved = blob["state_dict"]
        own = self.plain_state_dict()
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        shapes = sorted(
            f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
            for k in set(own) & set(saved)
            if saved[k].shape != own[k].shape
        )
        if missing or unexpected or shapes:
            lines = [f"backbone checkpoint {path} ({blob.get('class')}) does not match this {type(self).__name__}:"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
                if items:
                    shown = ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")
                    lines.append(f"  {title} ({len(items)}): {shown}")
            lines.append("  build the backbone with the recipe the checkpoint was saved from")
            raise BackboneCheckpointError("\n".join(lines))
        # plain keys onto this module's own (an audio tower's LoRA is in place before loading:
        # the merged weight goes to its base layer, its fresh adapter stays as built)
        actual = {_plain_key(k): k for k in self.state_dict() if _plain_key(k) is not None}
        result = self.load_state_dict({actual[k]: v for k, v in saved.items()}, strict=False)
        left = [k for k in result.missing_keys if _plain_key(k) is not None] + list(result.unexpected_keys)
        if left:
            raise BackboneCheckpointError(f"backbone checkpoint {path}: keys not loaded {left[:8]}")


def _trainable(weight: nn.Parameter) -> bool:
    """Whether a weight is trainable as a whole (a row-masked weight counts as frozen)."""
    return weight.requires_grad and not getattr(weight, "_vlzoo_row_masked", False)


@functools.cache
def _cache_argument_of(forward: Any) -> str:
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_argument(decoder: nn.Module) -> str:
    """The decoder's name for its KV cache: transformers 5 calls it ``cache`` (``past_key_values``
    is deprecated until 5.40); older decoders and remote code say ``past_key_values``."""
    return _cache_argument_of(type(decoder).forward)


def _find_attention(layer: nn.Module) -> nn.Module:
    for name, child in layer.named_children():
        if "attn" in name.lower() or "attention" in type(child).__name__.lower():
            return child
    raise ValueError(f"no attention module found in {type(layer).__name__}")


@contextlib.contextmanager
def _eager_attention(config: Any) -> Iterator[None]:
    """Compute attention with the eager kernel (the only one returning weights) for a block."""
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


class MultimodalBackbone(_SplicingBackbone):
    """A vision encoder, a projector and a causal LM, LLaVA style (see the module doc).

    Args:
        vision: a built vision encoder (:class:`~vlzoo.backbones.TimmVisionEncoder`,
            :class:`~vlzoo.backbones.ClipVisionEncoder`, :class:`~vlzoo.backbones.SamImageEncoder`).
        language: a built :class:`~vlzoo.backbones.CausalLM`.
        projector: ``linear`` or ``mlp2x_gelu``.
        image_token: the placeholder token (added to the tokenizer if missing).
        freeze_vision, freeze_projector, freeze_lm: freeze those parts.
        train_new_embeddings: rows of tokens added later (``add_special_tokens``) are trainable
            even when the embedding is frozen (by ``freeze_lm`` or LoRA).
        lora: LoRA on the LM, e.g. ``{r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj,
            v_proj], modules_to_save: [lm_head]}`` (see ``policies.LORA_DEFAULTS``); the LM's
            base weights are then frozen.
        gradient_checkpointing: activation checkpointing in the LM (and a trainable encoder).
        references: a :class:`~vlzoo.backbones.ReferenceEncoder` (crop / box / audio references
            in prompts, AnyRef); its audio encoder keeps its own freeze / LoRA policy.
        checkpoint: a :meth:`save_backbone` file loaded after building and before LoRA /
            freezing; a different architecture raises :class:`BackboneCheckpointError`.
    """

    def __init__(
        self,
        *,
        vision: nn.Module,
        language: CausalLM,
        projector: str = "mlp2x_gelu",
        image_token: str = "<image>",
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
        self._init_state()
        self.vision = vision
        self.language = language
        self.tokenizer = language.tokenizer
        lm_dtype = language.model.get_input_embeddings().weight.dtype
        self.projector_kind = projector
        self.projector = build_projector(projector, vision.dim, language.hidden_size).to(lm_dtype)
        self.image_token = image_token
        self.image_token_id = self.add_special_tokens([image_token])[image_token]
        self._new_token_ids = []  # the placeholder's row is never read: not a trainable new row
        self._setup_references_and_load(references, lm_dtype, checkpoint)
        self._setup_policies(
            vision=vision,
            projector=self.projector,
            language=[language],
            freeze_vision=freeze_vision,
            freeze_projector=freeze_projector,
            freeze_lm=freeze_lm,
            train_new_embeddings=train_new_embeddings,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            lora_exclude=None,
            set_peft=self._set_peft,
        )

    def _set_peft(self, peft: Any) -> None:
        self.language.model = peft

    def _lm_holder(self) -> nn.Module:
        return self.language.model

    # --- the backbone interface (vlzoo.backbones.interface.Backbone) ------------------------
    @property
    def hidden_size(self) -> int:
        return self.language.hidden_size

    @property
    def vision_width(self) -> int:
        return int(self.vision.dim)

    @property
    def feature_grid(self) -> tuple[int, int]:
        return tuple(self.vision.feature_grid)

    @property
    def input_size(self) -> int:
        return int(self.vision.input_size)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self.vision.data_config)

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.vision(images)
        weight = next(self.projector.parameters())
        return out.feature_map, self.projector(out.tokens.to(weight.dtype))

"""The backbone interface a paradigm may rely on: its sizes, its tokenizer and its passes.

Every size a paradigm or its heads need comes from here and nowhere else (not from a recipe,
not from a hard-coded default): :class:`Backbone` is a :class:`typing.Protocol`, implemented by
:class:`~vlzoo.backbones.MultimodalBackbone` and :class:`~vlzoo.backbones.LlavaBackbone` (and the
native Qwen and Florence-2 adapters), and any class with these members works as a paradigm's
``backbone``.  For an encoder-decoder (:class:`~vlzoo.backbones.Florence2Backbone`) the hidden
states are the encoder's followed by the decoder's (see its module doc).

Sizes:

* ``hidden_size`` - width of the LM's hidden states (what a trigger / ``[LOC]`` state is);
* ``vision_width`` - channels of the vision feature map ``MultimodalOutput.image_features``;
* ``feature_grid`` - ``(h, w)`` of that map, which is also the grid of the image tokens;
* ``input_size`` - side in pixels of the (square) network input.

A backbone whose input frame varies per image (Qwen2-VL / Qwen2.5-VL's ``smart_resize``) has a
fixed ``feature_grid`` / ``input_size`` only when told the size of its images; otherwise those two
raise :class:`~vlzoo.backbones.qwen2vl.VariableGridError` (a ``ValueError``) naming the setting,
and only the paradigms whose heads need a fixed grid read them.

Decoders keep explicit size arguments (they are plain components, usable without a backbone);
a paradigm passes them from these properties, and ``vlzoo.build`` injects them into a recipe's
nested decoder nodes by parameter name (:data:`SIZE_PARAMETERS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Backbone", "SIZE_PARAMETERS", "check_backbone", "check_attention_maps"]

#: Decoder parameter name -> the :class:`Backbone` property it is filled from (``vlzoo.build``).
SIZE_PARAMETERS: dict[str, str] = {
    "hidden_size": "hidden_size",
    "vision_dim": "vision_width",
    "feature_grid": "feature_grid",
    "input_size": "input_size",
}


@runtime_checkable
class Backbone(Protocol):
    """What a paradigm reads from its backbone (see the module doc for the sizes).

    Besides the sizes: ``tokenizer`` (a transformers tokenizer), ``image_token_id``,
    ``add_special_tokens(tokens) -> {token: id}``, ``encode_images(images) -> (feature_map,
    image_tokens)``, the forward pass (``backbone(images=..., input_ids=..., attention_mask=...,
    labels=..., output_attentions=..., inputs_embeds_fn=..., references=...) -> MultimodalOutput``)
    and the KV-cached ``generate`` / ``decode`` loops, which take ``references`` too (the rows'
    :class:`~vlzoo.structures.References`, ``batch.references()``: every paradigm passes them;
    see docs/references.md and docs/architecture.md, "Backbone").
    """

    tokenizer: Any
    image_token_id: int

    @property
    def hidden_size(self) -> int: ...

    @property
    def vision_width(self) -> int: ...

    @property
    def feature_grid(self) -> tuple[int, int]: ...

    @property
    def input_size(self) -> int: ...

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]: ...

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def generate(self, *args: Any, **kwargs: Any) -> Tensor: ...

    def decode(self, *args: Any, **kwargs: Any) -> Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def check_backbone(backbone: object, paradigm: str) -> Backbone:
    """``backbone`` if it has every member of :class:`Backbone`, else a ``TypeError`` naming the
    paradigm and what is missing (a paradigm reads its sizes from these members only)."""
    if backbone is None:
        raise TypeError(f"paradigm '{paradigm}' needs a backbone (recipe slot backbone, or backbone=...)")
    members = ["hidden_size", "vision_width", "feature_grid", "input_size", "tokenizer", "image_token_id",
               "add_special_tokens", "encode_images", "generate", "decode"]
    # a property is looked up on the class: a backbone whose grid varies per image (Qwen) raises
    # from feature_grid / input_size, which only the paradigms that need a fixed grid read
    missing = [m for m in members if not hasattr(type(backbone), m) and not hasattr(backbone, m)]
    if missing:
        raise TypeError(
            f"paradigm '{paradigm}': the backbone {type(backbone).__name__} lacks {missing} of the backbone "
            "interface (vlzoo.backbones.Backbone: hidden_size, vision_width, feature_grid, input_size, ...)"
        )
    return backbone  # type: ignore[return-value]


def check_attention_maps(backbone: object, paradigm: str, key: str, fix: str) -> None:
    """Refuse, naming the recipe ``key`` and the ``fix``, a backbone without text-to-image
    self-attention maps (an encoder-decoder such as :class:`~vlzoo.backbones.Florence2Backbone`
    declares ``text_to_image_attention = False``: its decoder reaches the image only through
    cross-attention) for a paradigm setting that reads those maps."""
    if getattr(backbone, "text_to_image_attention", True) is False:
        raise ValueError(
            f"paradigm '{paradigm}' ({key}) reads text-to-image self-attention maps, which the backbone "
            f"{type(backbone).__name__} (an encoder-decoder) does not have: {fix}"
        )

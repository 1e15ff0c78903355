"""Backbones: vision encoders, causal language models and their LLaVA-style composition.

``MultimodalBackbone(vision=..., language=...)`` composes a vision encoder
(:class:`TimmVisionEncoder`, :class:`ClipVisionEncoder`, :class:`SamImageEncoder`) with a
:class:`CausalLM`; :class:`LlavaBackbone` adapts a native transformers LLaVA checkpoint to the
same interface, :class:`Qwen2VLBackbone` / :class:`Qwen25VLBackbone` native Qwen2-VL / Qwen2.5-VL
checkpoints (their ``smart_resize`` frame and M-RoPE), :class:`PaliGemmaBackbone` native PaliGemma
checkpoints (a fixed square frame and prefix-LM attention), :class:`Kosmos2Backbone` native Kosmos-2 ones, :class:`Florence2Backbone` native
Florence-2 (an encoder-decoder: encoder states at the image, decoder states at the answer).  Training policies live in :mod:`vlzoo.backbones.policies`.  :class:`Backbone`
(:mod:`vlzoo.backbones.interface`) is that interface as a typed protocol: the sizes a paradigm
reads (``hidden_size``, ``vision_width``, ``feature_grid``, ``input_size``) and its passes.
"""

from vlzoo.backbones.audio import WhisperAudioEncoder
from vlzoo.backbones.florence2 import Florence2Backbone, Florence2Template
from vlzoo.backbones.generation import DecodingHooks, DecodingState, greedy_decode
from vlzoo.backbones.interface import Backbone
from vlzoo.backbones.kosmos2 import Kosmos2Backbone
from vlzoo.backbones.language import CausalLM, load_tokenizer
from vlzoo.backbones.llava import LlavaBackbone
from vlzoo.backbones.multimodal import (
    BackboneCheckpointError,
    MultimodalBackbone,
    MultimodalOutput,
    build_projector,
)
from vlzoo.backbones.paligemma import PaliGemmaBackbone
from vlzoo.backbones.policies import (
    apply_lora,
    enable_gradient_checkpointing,
    parameter_report,
    set_trainable,
    train_rows,
)
from vlzoo.backbones.qwen2vl import Qwen2VLBackbone, Qwen25VLBackbone
from vlzoo.backbones.references import ReferenceEncoder, crop_reference_tokens
from vlzoo.backbones.vision import ClipVisionEncoder, SamImageEncoder, TimmVisionEncoder, VisionOutput

__all__ = [
    "Backbone",
    "TimmVisionEncoder",
    "ClipVisionEncoder",
    "SamImageEncoder",
    "VisionOutput",
    "CausalLM",
    "load_tokenizer",
    "MultimodalBackbone",
    "MultimodalOutput",
    "BackboneCheckpointError",
    "LlavaBackbone",
    "Qwen2VLBackbone",
    "Qwen25VLBackbone",
    "Florence2Backbone",
    "Florence2Template",
    "Kosmos2Backbone",
    "PaliGemmaBackbone",
    "build_projector",
    "ReferenceEncoder",
    "WhisperAudioEncoder",
    "crop_reference_tokens",
    "DecodingHooks",
    "DecodingState",
    "greedy_decode",
    "apply_lora",
    "enable_gradient_checkpointing",
    "parameter_report",
    "set_trainable",
    "train_rows",
]

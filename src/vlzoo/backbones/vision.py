"""Vision encoders: any timm model, a CLIP vision tower from transformers, the SAM image encoder.

Every encoder is an ``nn.Module`` whose ``forward(images)`` returns a :class:`VisionOutput` with
patch ``tokens`` ``(B, N, D)`` and the same features as a ``feature_map`` ``(B, D, h, w)`` on a
grid of known ``stride``.  Every encoder exposes ``dim`` (D), ``stride``, ``input_size`` (square
side in pixels), ``feature_grid`` ``(h, w)`` and ``data_config`` (``mean``, ``std``,
``input_size``) so the datamodule normalises images the way the encoder was trained.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones.shipped import load_pretrained, preprocessor_settings, read_weights
from vlzoo.weights import load_weights

__all__ = [
    "VisionOutput",
    "TimmVisionEncoder",
    "ClipVisionEncoder",
    "SamImageEncoder",
    "SAM_ENCODER_VARIANTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# segment_anything normalises 0-255 pixels with these; divided by 255 for 0-1 images.
SAM_PIXEL_MEAN = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)
SAM_PIXEL_STD = (58.395 / 255.0, 57.12 / 255.0, 57.375 / 255.0)


@dataclass
class VisionOutput:
    """What a vision encoder returns."""

    tokens: Tensor  # (B, N, D) patch tokens (the CLS token only if asked for, see ClipVisionEncoder)
    feature_map: Tensor  # (B, D, h, w) the patch tokens on their spatial grid


class _VisionEncoder(nn.Module):
    """Shared attributes; subclasses set ``dim``, ``stride``, ``input_size``, ``mean``, ``std``."""

    dim: int
    stride: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def feature_grid(self) -> tuple[int, int]:
        side = self.input_size // self.stride
        return (side, side)

    @property
    def num_tokens(self) -> int:
        h, w = self.feature_grid
        return h * w

    @property
    def data_config(self) -> dict[str, Any]:
        return {"mean": tuple(self.mean), "std": tuple(self.std), "input_size": int(self.input_size)}

    @staticmethod
    def _grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, d = tokens.shape
        h, w = grid
        if h * w != n:
            raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
        return tokens.transpose(1, 2).reshape(b, d, h, w)


class TimmVisionEncoder(_VisionEncoder):
    """Any timm model, by name, as a patch-token encoder.

    ViT-like models (``forward_features`` returns tokens) drop their prefix (CLS / register)
    tokens; CNNs (``forward_features`` returns a map) are flattened into tokens.

    Args:
        model_name: a ``timm.create_model`` name, e.g. ``vit_base_patch16_224`` or
            ``vit_tiny_patch16_224`` with ``model_kwargs`` making it tiny.
        pretrained: load timm's pretrained weights (from the local hub cache; vlzoo never
            downloads in tests).
        checkpoint_path: a local weight file loaded instead of the hub weights.
        img_size: input side in pixels for models that take it (ViTs); ``None`` keeps the
            model default.
        model_kwargs: further ``timm.create_model`` arguments (``embed_dim``, ``depth``,
            ``num_heads``, ``patch_size`` ...).
    """

    def __init__(
        self,
        *,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        if checkpoint_path is not None and read_weights(checkpoint_path, "TimmVisionEncoder"):
            if not Path(checkpoint_path).is_file():
                raise FileNotFoundError(f"timm checkpoint_path {checkpoint_path!r} does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
            pretrained = True
        elif pretrained and not read_weights(f"timm:{model_name}", "TimmVisionEncoder pretrained weights"):
            pretrained = False
        self.model_name = model_name
        try:
            # timm reads the file with torch.load(weights_only=True): a pickle of objects is refused
            self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except (pickle.UnpicklingError, RuntimeError) as err:
            if checkpoint_path is None:
                raise
            first = str(err).strip().splitlines()[0]
            raise ValueError(
                f"timm checkpoint_path {checkpoint_path} could not be loaded ({type(err).__name__}: {first}). A file "
                "that holds Python objects is refused: vlzoo never unpickles (it could run code); re-save it as a "
                "state dict of tensors"
            ) from err
        config = resolve_data_config({}, model=self.model)
        self.input_size = int(config["input_size"][-1])
        self.mean = tuple(float(v) for v in config["mean"])
        self.std = tuple(float(v) for v in config["std"])
        self.dim = int(self.model.num_features)
        self._is_tokens = hasattr(self.model, "patch_embed") and hasattr(self.model, "num_prefix_tokens")
        if self._is_tokens:
            patch = self.model.patch_embed.patch_size
            self.stride = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
            # the pretrained config keeps the default size; the built model knows the real one
            size = getattr(self.model.patch_embed, "img_size", None)
            if size is not None:
                self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        else:
            self.stride = int(self.model.feature_info[-1]["reduction"])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, images: Tensor) -> VisionOutput:
        features = self.model.forward_features(images)
        if features.ndim == 4:  # CNN: (B, C, h, w)
            return VisionOutput(tokens=features.flatten(2).transpose(1, 2), feature_map=features)
        tokens = features[:, self.model.num_prefix_tokens :]
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        return VisionOutput(tokens=tokens, feature_map=self._grid(tokens, grid))


class ClipVisionEncoder(_VisionEncoder):
    """A CLIP vision tower (``transformers.CLIPVisionModel``), used like LLaVA uses it.

    Args:
        name_or_path: a ``from_pretrained`` name or local folder (e.g.
            ``openai/clip-vit-large-patch14-336``).
        config: a ``CLIPVisionConfig`` as a dict (``hidden_size``, ``num_hidden_layers``,
            ``image_size``, ``patch_size`` ...), to build the tower untrained instead - its weights
            then come from elsewhere (a ``vlzoo export``'s safetensors, a backbone checkpoint).
        image_mean, image_std: the per-channel normalisation; ``None`` takes the folder's
            ``preprocessor_config.json`` (``image_mean`` / ``image_std``), else OpenAI CLIP's.
        select_layer: which hidden state feeds the projector (LLaVA: ``-2``, the penultimate).
        select_feature: ``"patch"`` drops the CLS token, ``"cls_patch"`` keeps it in ``tokens``
            (the ``feature_map`` always holds patch tokens only).
        dtype: weight dtype name (``float32``, ``bfloat16``, ``float16``).
    """

    def __init__(
        self,
        *,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        select_layer: int = -2,
        select_feature: str = "patch",
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        if (name_or_path is None) == (config is None):
            raise ValueError("ClipVisionEncoder needs exactly one of name_or_path or config")
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', not {select_feature!r}")
        torch_dtype = _dtype(dtype)
        if name_or_path is not None:
            self.model = load_pretrained(CLIPVisionModel, name_or_path, dtype=torch_dtype)
        else:
            self.model = CLIPVisionModel._from_config(_clip_vision_config(config), dtype=torch_dtype)
        self.select_layer = select_layer
        self.select_feature = select_feature
        cfg = self.model.config
        self.dim = int(cfg.hidden_size)
        self.stride = int(cfg.patch_size)
        self.input_size = int(cfg.image_size)
        self.mean, self.std = _normalisation(name_or_path, image_mean, image_std, "ClipVisionEncoder")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)

    def forward(self, images: Tensor) -> VisionOutput:
        out = self.model(pixel_values=images.to(self.model.dtype), output_hidden_states=True)
        hidden = out.hidden_states[self.select_layer]
        patches = hidden[:, 1:]
        tokens = patches if self.select_feature == "patch" else hidden
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        return VisionOutput(tokens=tokens, feature_map=self._grid(patches, grid))


#: segment_anything's official encoder settings (``build_sam.py``) plus a CPU-sized ``tiny``.
SAM_ENCODER_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,)},
}


class SamImageEncoder(_VisionEncoder):
    """The SAM image encoder (``segment_anything.modeling.ImageEncoderViT``).

    Official variants use SAM's settings (patch 16, window 14, relative positions, 256 output
    channels); ``tiny`` is a two-block encoder for CPU tests.  ``checkpoint`` is an official SAM
    file (``sam_vit_h_4b8939.pth``...) or any state dict with ``image_encoder.``-prefixed keys;
    when ``img_size`` differs from the checkpoint's, absolute and relative position tables are
    interpolated.

    Args:
        variant: ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny``.
        checkpoint: path of a SAM checkpoint file.
        img_size: input side in pixels (SAM: 1024; ``tiny`` default 64).
        out_chans: output channels of the neck (SAM: 256; ``tiny`` default 32).
        patch_size: patch side (SAM: 16; ``tiny`` default 8).
    """

    def __init__(
        self,
        *,
        variant: str = "vit_h",
        checkpoint: str | None = None,
        img_size: int | None = None,
        out_chans: int | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT

        if variant not in SAM_ENCODER_VARIANTS:
            raise ValueError(f"unknown SAM variant {variant!r}; choose from {sorted(SAM_ENCODER_VARIANTS)}")
        spec = SAM_ENCODER_VARIANTS[variant]
        tiny = variant == "tiny"
        self.variant = variant
        self.input_size = int(img_size if img_size is not None else (64 if tiny else 1024))
        self.stride = int(patch_size if patch_size is not None else (8 if tiny else 16))
        self.dim = int(out_chans if out_chans is not None else (32 if tiny else 256))
        self.mean, self.std = SAM_PIXEL_MEAN, SAM_PIXEL_STD
        self.model = ImageEncoderViT(
            img_size=self.input_size,
            patch_size=self.stride,
            embed_dim=spec["embed_dim"],
            depth=spec["depth"],
            num_heads=spec["num_heads"],
            mlp_ratio=4.0,
            out_chans=self.dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=0 if tiny else 14,
            global_attn_indexes=spec["global_attn_indexes"],
        )
        if checkpoint is not None and read_weights(checkpoint, "SamImageEncoder"):
            self.load_sam_checkpoint(checkpoint)

    def load_sam_checkpoint(self, path: str | Path) -> None:
        """Load the ``image_encoder.`` part of a SAM checkpoint file."""
        state = load_weights(path, what="SAM checkpoint")
        prefix = "image_encoder."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{path}: no 'image_encoder.' keys; is this a SAM checkpoint?")
        target = self.model.state_dict()
        for key, value in own.items():
            if key in target and value.shape != target[key].shape:
                own[key] = _resize_position_table(key, value, target[key].shape)
        try:
            self.model.load_state_dict(own, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not match SamImageEncoder(variant={self.variant!r}): {err}") from err

    def forward(self, images: Tensor) -> VisionOutput:
        feature_map = self.model(images)
        return VisionOutput(tokens=feature_map.flatten(2).transpose(1, 2), feature_map=feature_map)


def _resize_position_table(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """Interpolate SAM's absolute ``pos_embed`` (1, H, W, C) or a ``rel_pos_*`` table (L, C)."""
    if key.endswith("pos_embed") and value.ndim == 4:
        grid = F.interpolate(value.permute(0, 3, 1, 2), size=tuple(shape[1:3]), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)
    if "rel_pos" in key and value.ndim == 2:
        table = F.interpolate(value.T.unsqueeze(0), size=shape[0], mode="linear", align_corners=False)
        return table[0].T
    raise ValueError(f"cannot resize {key} from {tuple(value.shape)} to {tuple(shape)}")


def _clip_vision_config(settings: dict[str, Any]) -> Any:
    """A ``transformers.CLIPVisionConfig`` from a dict (its ``model_type``, if given, must be
    ``clip_vision_model``)."""
    from transformers import CLIPVisionConfig

    settings = dict(settings)
    model_type = settings.pop("model_type", CLIPVisionConfig.model_type)
    if model_type != CLIPVisionConfig.model_type:
        raise ValueError(f"a ClipVisionEncoder config has model_type {CLIPVisionConfig.model_type!r}, not {model_type!r}")
    return CLIPVisionConfig(**settings)


def _normalisation(
    name_or_path: str | None, mean: Sequence[float] | None, std: Sequence[float] | None, what: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)``: the explicit values, else ``name_or_path``'s ``preprocessor_config.json``,
    else OpenAI CLIP's."""
    pre = (preprocessor_settings(name_or_path) if name_or_path is not None else None) or {}
    out = []
    for given, key, default in ((mean, "image_mean", OPENAI_CLIP_MEAN), (std, "image_std", OPENAI_CLIP_STD)):
        values = tuple(float(v) for v in (given if given is not None else pre.get(key, default)))
        if len(values) != 3:
            raise ValueError(f"{what} {key} needs 3 values (one per RGB channel), got {list(values)}")
        out.append(values)
    return out[0], out[1]


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(dtypes)}")
    return dtypes[name]


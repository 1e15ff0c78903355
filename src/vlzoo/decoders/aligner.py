"""V-L aligners (Lumen): match a ``[LOC]`` hidden state densely against image features.

Both aligners take the LMM's ``[LOC]`` hidden state ``(B, hidden_size)`` and an image feature map
``(B, C, h, w)``, bring the map to their own resolution (``grid``) through their own projection,
and return an :class:`AlignerOutput`:

* ``heatmaps`` ``(B, 1 + K, H, W)`` logits - channel 0 the object-centre heatmap (``[M]``),
  channels ``1..K`` one heatmap per keypoint (pose);
* ``box_size`` ``(B, 2, H, W)`` in ``[0, 1]`` - the box ``(width, height)`` at every location as a
  fraction of the image (``[W]`` and ``[H]``), read at the peaks.

:class:`DenseAligner` is the paper's transformer: learnable ``[M]``, ``[H]``, ``[W]`` (and K
keypoint) queries, the ``[LOC]`` token and the image tokens attend to each other, then each
query's output is dotted with every location's output feature.  :class:`ConvAligner` is the
convolutional variant the paper ablates: the ``[LOC]`` vector modulates the feature map and a
small CNN predicts the maps.  Both are plain ``nn.Module`` s usable outside vlzoo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AlignerOutput", "DenseAligner", "ConvAligner", "sincos_position_2d", "IMAGE_SOURCES"]

#: where the aligner's image features come from: the vision encoder's feature map
#: (``vision_dim`` channels, as in Lumen) or the LMM's last hidden states at the image tokens
#: (``hidden_size`` channels, already contextualised by the language model)
IMAGE_SOURCES = ("vision", "language")


@dataclass
class AlignerOutput:
    """Dense outputs of an aligner at its grid ``(H, W)``."""

    heatmaps: Tensor  # (B, 1 + K, H, W) logits: centre heatmap then one per keypoint
    box_size: Tensor  # (B, 2, H, W) box (width, height) as fractions of the image, in [0, 1]

    @property
    def centre(self) -> Tensor:
        """``(B, H, W)`` centre-heatmap logits."""
        return self.heatmaps[:, 0]

    @property
    def keypoints(self) -> Tensor:
        """``(B, K, H, W)`` keypoint-heatmap logits (``K = 0`` without keypoint queries)."""
        return self.heatmaps[:, 1:]


def sincos_position_2d(dim: int, grid: tuple[int, int], *, device: torch.device | None = None) -> Tensor:
    """``(h * w, dim)`` fixed 2-D sine-cosine position codes (MAE style): half the channels code
    the row, half the column.  Fixed codes work at any grid, so ``grid`` stays a free choice."""
    if dim % 4 != 0:
        raise ValueError(f"sincos_position_2d: dim must be a multiple of 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    out = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1)


def _in_dim(image_source: str, vision_dim: int, hidden_size: int) -> int:
    if image_source not in IMAGE_SOURCES:
        raise ValueError(f"aligner image_source must be one of {IMAGE_SOURCES}, got {image_source!r}")
    return vision_dim if image_source == "vision" else hidden_size


def _resolve_grid(
    grid: tuple[int, int] | list[int] | None, feature_grid: tuple[int, int] | list[int] | None
) -> tuple[int, int] | None:
    chosen = grid if grid is not None else feature_grid
    if chosen is None:
        return None
    h, w = (int(v) for v in chosen)
    if h < 1 or w < 1:
        raise ValueError(f"aligner grid must be positive, got {chosen}")
    return h, w


class _AlignerBase(nn.Module):
    """Shared input handling: resize the feature map to ``grid`` and check shapes."""

    image_source: str
    grid: tuple[int, int] | None
    num_keypoints: int

    def _resize(self, features: Tensor) -> Tensor:
        if features.dim() != 4:
            raise ValueError(
                f"{type(self).__name__}: image features must be (B, C, h, w), got {tuple(features.shape)}"
            )
        if self.grid is not None and tuple(features.shape[-2:]) != self.grid:
            features = F.interpolate(features.float(), size=self.grid, mode="bilinear", align_corners=False)
        return features.float()


class DenseAligner(_AlignerBase):
    """Lumen's V-L dense aligner: a small transformer over ``[queries; LOC; image tokens]``.

    The ``[LOC]`` token and every image token see each other, so each location can ask "am I
    what the instruction refers to?" before the ``[M]`` query's output is matched against it.

    Args:
        hidden_size: the LMM's hidden size (``[LOC]``; injected by ``vlzoo.build``).
        vision_dim: channels of the vision feature map (injected).
        feature_grid: the vision encoder's grid (injected); the default aligner grid.
        image_source: ``"vision"`` (vision feature map, as in Lumen) or ``"language"`` (the LMM's
            hidden states at the image tokens); the paradigm feeds the matching features.
        grid: the aligner's resolution ``(H, W)``; features are bilinearly resized to it, so a
            finer grid gives finer peaks at a quadratic attention cost.
        dim, depth, heads, mlp_ratio, dropout: transformer size.
        num_keypoints: extra keypoint queries (one heatmap each) for pose; 0 otherwise.
        size_prior: initial box size (fraction of the image) the size maps start at.
        condition_queries: add the projected ``[LOC]`` to every query's input, besides keeping
            ``[LOC]`` as a token of the sequence; off is the paper's plain learnable queries.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        vision_dim: int,
        feature_grid: tuple[int, int] | None = None,
        image_source: str = "vision",
        grid: tuple[int, int] | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        num_keypoints: int = 0,
        size_prior: float = 0.2,
        condition_queries: bool = False,
    ) -> None:
        super().__init__()
        if num_keypoints < 0:
            raise ValueError(f"DenseAligner: num_keypoints must be >= 0, got {num_keypoints}")
        if not 0.0 < size_prior < 1.0:
            raise ValueError(f"DenseAligner: size_prior must be in (0, 1), got {size_prior}")
        self.image_source = image_source
        self.grid = _resolve_grid(grid, feature_grid)
        self.num_keypoints = int(num_keypoints)
        self.dim = int(dim)
        self.condition_queries = bool(condition_queries)
        in_dim = _in_dim(image_source, vision_dim, hidden_size)
        self.image_proj = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim))
        self.loc_proj = nn.Sequential(nn.Linear(hidden_size, dim), nn.LayerNorm(dim))
        # [M], [H], [W], then one query per keypoint
        self.queries = nn.Parameter(torch.randn(3 + num_keypoints, dim) * 0.02)
        self.type_embed = nn.Parameter(torch.zeros(3, dim))  # query / loc / image token types
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.query_heads = nn.Linear(dim, dim)  # query side of the dot products
        self.pixel_head = nn.Linear(dim, dim)  # location side
        # per-map affine on the dot products: a centre heatmap starts at p ~ 0.01 (CenterNet's
        # prior, so early negatives do not swamp the loss), sizes start at size_prior
        heat_bias = -math.log((1 - 0.01) / 0.01)
        size_bias = math.log(size_prior / (1 - size_prior))
        bias = torch.tensor([heat_bias, size_bias, size_bias] + [heat_bias] * num_keypoints)
        self.map_bias = nn.Parameter(bias)
        self.map_scale = nn.Parameter(torch.ones(3 + num_keypoints))

    def forward(self, image_features: Tensor, loc: Tensor) -> AlignerOutput:
        """``image_features`` ``(B, C, h, w)``, ``loc`` ``(B, hidden_size)`` -> :class:`AlignerOutput`."""
        feats = self._resize(image_features)
        b, _, h, w = feats.shape
        tokens = self.image_proj(feats.flatten(2).transpose(1, 2))  # (B, h*w, dim)
        tokens = tokens + sincos_position_2d(self.dim, (h, w), device=tokens.device) + self.type_embed[2]
        loc_token = self.loc_proj(loc.float()).unsqueeze(1) + self.type_embed[1]
        queries = (self.queries + self.type_embed[0]).unsqueeze(0).expand(b, -1, -1)
        if self.condition_queries:
            # each query starts from what [LOC] asks for, so the first cross-attention can
            # already select the matching image tokens (the [LOC] token stays in the sequence)
            queries = queries + loc_token
        nq = queries.shape[1]
        seq = self.norm(self.transformer(torch.cat([queries, loc_token, tokens], dim=1)))
        q = self.query_heads(seq[:, :nq])  # (B, nq, dim)
        pix = self.pixel_head(seq[:, nq + 1 :])  # (B, h*w, dim)
        maps = torch.einsum("bqd,bnd->bqn", q, pix) / math.sqrt(self.dim)
        maps = maps * self.map_scale[None, :, None] + self.map_bias[None, :, None]
        maps = maps.reshape(b, nq, h, w)
        heat = torch.cat([maps[:, :1], maps[:, 3:]], dim=1)
        size = torch.stack([maps[:, 2], maps[:, 1]], dim=1).sigmoid()  # (width from [W], height from [H])
        return AlignerOutput(heatmaps=heat, box_size=size)


class ConvAligner(_AlignerBase):
    """The convolutional aligner variant: ``[LOC]`` modulates the projected feature map (FiLM
    plus the elementwise product, i.e. a per-location match score), then 3x3 convolutions
    predict the centre / keypoint heatmaps and the box sizes.

    Args: as :class:`DenseAligner`; ``depth`` counts the 3x3 conv blocks.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        vision_dim: int,
        feature_grid: tuple[int, int] | None = None,
        image_source: str = "vision",
        grid: tuple[int, int] | None = None,
        dim: int = 64,
        depth: int = 3,
        num_keypoints: int = 0,
        size_prior: float = 0.2,
    ) -> None:
        super().__init__()
        if num_keypoints < 0:
            raise ValueError(f"ConvAligner: num_keypoints must be >= 0, got {num_keypoints}")
        if not 0.0 < size_prior < 1.0:
            raise ValueError(f"ConvAligner: size_prior must be in (0, 1), got {size_prior}")
        self.image_source = image_source
        self.grid = _resolve_grid(grid, feature_grid)
        self.num_keypoints = int(num_keypoints)
        self.dim = int(dim)
        in_dim = _in_dim(image_source, vision_dim, hidden_size)
        self.image_proj = nn.Conv2d(in_dim, dim, 1)
        self.loc_proj = nn.Linear(hidden_size, 3 * dim)  # scale, shift, match vector
        blocks: list[nn.Module] = []
        channels = 3 * dim + 4  # modulated, match, raw features, 4 coordinate channels
        for _ in range(depth):
            blocks += [nn.Conv2d(channels, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.GELU()]
            channels = dim
        self.body = nn.Sequential(*blocks)
        self.heat_head = nn.Conv2d(dim, 1 + num_keypoints, 1)
        self.size_head = nn.Conv2d(dim, 2, 1)
        nn.init.constant_(self.heat_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.size_head.bias, math.log(size_prior / (1 - size_prior)))

    def forward(self, image_features: Tensor, loc: Tensor) -> AlignerOutput:
        feats = self.image_proj(self._resize(image_features))
        b, d, h, w = feats.shape
        scale, shift, match = self.loc_proj(loc.float()).chunk(3, dim=-1)
        modulated = feats * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        matched = feats * match[:, :, None, None]
        ys = torch.linspace(-1, 1, h, device=feats.device)[:, None].expand(h, w)
        xs = torch.linspace(-1, 1, w, device=feats.device)[None, :].expand(h, w)
        coords = torch.stack([xs, ys, xs * ys, xs * xs + ys * ys]).unsqueeze(0).expand(b, -1, -1, -1)
        x = self.body(torch.cat([modulated, matched, feats, coords], dim=1))
        return AlignerOutput(heatmaps=self.heat_head(x), box_size=self.size_head(x).sigmoid())

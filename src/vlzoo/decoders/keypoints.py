"""Reading a frozen LMM's attention as keypoints, and turning keypoints into SAM prompts (LENS).

The pieces here are plain ``nn.Module`` s and functions, usable without the recipe system:

* :func:`text_to_image_attention` - attention from (weighted) text positions to the image-token
  positions of chosen layers and heads, reshaped to the image-token grid: one channel per
  (layer, head).
* :class:`QueryPooling` - which text positions speak for the query: a learned softmax over the
  query positions, read from the LMM's (frozen) hidden states.  It weighs the attention rows and
  pools the hidden states into the query's global semantic feature.
* :class:`AttentionRefinementHead` - a small conv head that refines the attention channels
  (optionally with the vision features, modulated by the semantic feature) into a target heatmap.
* :class:`PointDescriptor` - keypoints -> extra sparse prompt embeddings of a SAM mask decoder
  (:class:`vlzoo.decoders.sam.SamMaskDecoder`, which also takes the keypoints themselves as
  point prompts): a point descriptor per keypoint (cross-attention from the positional encoding
  at its sub-pixel location to the image features) and the global semantic feature.
* Target generation and losses: :func:`interior_point` (the keypoint of a mask) and
  :func:`box_projection_loss` (a mask supervised by a box only, for REC / detection data without
  masks); mask losses proper are :func:`vlzoo.decoders.prompt.mask_losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import Tensor, nn

from vlzoo.decoders.heatmap import find_peaks, refine_subpixel

__all__ = [
    "extract_keypoints",
    "text_to_image_attention",
    "QueryPooling",
    "AttentionRefinementHead",
    "PointDescriptor",
    "interior_point",
    "box_projection_loss",
]


def text_to_image_attention(
    attentions: Sequence[Tensor],
    weights: Tensor,
    image_positions: Tensor,
    grid: tuple[int, int],
    *,
    heads: Sequence[int] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Attention from weighted text positions to the image tokens, one channel per layer x head.

    Args:
        attentions: one ``(B, H, T, T)`` tensor per chosen layer (rows attend to columns).
        weights: ``(B, T)`` non-negative weight of each row (query position); rows of weight 0
            (image tokens, padding, the template) do not contribute.  Need not sum to one.
        image_positions: ``(N,)`` or ``(B, N)`` indices of the ``N = h * w`` image tokens in the
            sequence, in raster order of the grid.
        grid: ``(h, w)`` of the image-token grid.
        heads: which heads to keep (all when ``None``).
        normalize: renormalise each map over the image tokens and scale so that a uniform map
            is 1.  Why: the share of attention a head gives to the image at all varies by orders
            of magnitude between heads and layers; the head should see *where*, not *how much*.

    Returns:
        ``(B, len(attentions) * len(heads), h, w)``, layer-major.
    """
    if not attentions:
        raise ValueError("text_to_image_attention: no attention maps given (choose at least one layer)")
    h, w = grid
    b, t = weights.shape
    if image_positions.dim() == 1:
        image_positions = image_positions.unsqueeze(0).expand(b, -1)
    n = image_positions.shape[1]
    if n != h * w:
        raise ValueError(f"text_to_image_attention: {n} image positions do not fill a {h}x{w} grid")
    maps = []
    for layer, att in enumerate(attentions):
        if att.dim() != 4 or att.shape[0] != b or att.shape[-1] != att.shape[-2] or att.shape[-1] != t:
            raise ValueError(
                f"text_to_image_attention: attention of chosen layer #{layer} has shape "
                f"{tuple(att.shape)}, expected (B={b}, heads, T={t}, T={t})"
            )
        if heads is not None:
            att = att[:, list(heads)]
        # rows: weighted sum over query positions; columns: the image tokens
        pooled = torch.einsum("bhts,bt->bhs", att.float(), weights.float())
        idx = image_positions.to(pooled.device).unsqueeze(1).expand(-1, pooled.shape[1], -1)
        maps.append(torch.gather(pooled, 2, idx))
    out = torch.cat(maps, dim=1)  # (B, C, N)
    if normalize:
        out = out / out.sum(dim=-1, keepdim=True).clamp_min(1e-12) * n
    return out.view(b, -1, h, w)


class QueryPooling(nn.Module):
    """A learned softmax over the query positions, from the LMM's hidden states.

    Why learned: of the words of "the small red circle left of the square", some name the target
    and some do not; a frozen LMM cannot be told which, so the head learns which rows to read.
    """

    def __init__(self, *, hidden_size: int = 64) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.score = nn.Linear(hidden_size, 1)
        # start from the plain mean over the query positions
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden_states: Tensor, query_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden_states (B, T, hidden)``, ``query_mask (B, T)`` bool -> (weights ``(B, T)``
        summing to one over the query positions, pooled feature ``(B, hidden)``)."""
        if not bool(query_mask.any(dim=1).all()):
            empty = (~query_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"QueryPooling: sample(s) {empty} have no query text position")
        x = self.norm(hidden_states.float())
        logits = self.score(x).squeeze(-1).masked_fill(~query_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        pooled = torch.einsum("bt,btd->bd", weights, x)
        return weights, pooled


class AttentionRefinementHead(nn.Module):
    """Attention channels (layers x heads) -> heatmap logits, with a few convolutions.

    Args:
        in_channels: number of attention channels (chosen layers x chosen heads).
        vision_dim: channels of the vision features to add (0: attention maps only, as LENS).
            Why optional: a small frozen LMM's attention is coarse; letting the head see the image
            features, gated by the query's semantic feature, sharpens the map without touching
            the LMM.
        query_dim: size of the semantic feature that modulates the features (0: none).
        hidden_channels: width of the conv stack.
        num_layers: 3x3 convolutions before the 1x1 output.
        upsample: the heatmap is ``upsample`` times the token grid (bilinear, before the last
            two convolutions) so that peaks are finer than a token.
        match_heads: number of query-to-location similarity maps added to the features (0:
            none): each is the scaled dot product of a projection of the semantic feature with a
            projection of the image feature at every cell - a direct "where does the query
            match" signal that FiLM (a per-channel scale and shift) cannot express.  Needs
            ``vision_dim`` and ``query_dim``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 16,
        vision_dim: int = 0,
        query_dim: int = 0,
        hidden_channels: int = 64,
        num_layers: int = 3,
        upsample: int = 2,
        match_heads: int = 0,
    ) -> None:
        super().__init__()
        if match_heads < 0 or (match_heads and (vision_dim <= 0 or query_dim <= 0)):
            raise ValueError(
                "AttentionRefinementHead: match_heads needs image features and a query "
                "(vision_dim > 0 and query_dim > 0)"
            )
        if in_channels <= 0:
            raise ValueError("AttentionRefinementHead: in_channels must be positive (layers x heads)")
        if num_layers < 1 or upsample < 1:
            raise ValueError("AttentionRefinementHead: num_layers and upsample must be >= 1")
        self.upsample = upsample
        self.attention_in = nn.Sequential(nn.Conv2d(in_channels, hidden_channels, 1), nn.GELU())
        self.vision_in = nn.Conv2d(vision_dim, hidden_channels, 1) if vision_dim > 0 else None
        self.film = nn.Linear(query_dim, 2 * hidden_channels) if query_dim > 0 else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        blocks = []
        for _ in range(num_layers):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                    nn.GroupNorm(min(8, hidden_channels), hidden_channels),
                    nn.GELU(),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.match_heads = match_heads
        if match_heads:
            self.match_query = nn.Linear(query_dim, match_heads * hidden_channels)
            self.match_key = nn.Conv2d(vision_dim, match_heads * hidden_channels, 1)
            self.match_in = nn.Conv2d(match_heads, hidden_channels, 1)
        self.out = nn.Conv2d(hidden_channels, 1, 1)
        # a low prior everywhere: one peak among many cells (as CenterNet's focal-loss init)
        nn.init.constant_(self.out.bias, -2.19)

    def forward(
        self, attention_maps: Tensor, *, image_features: Tensor | None = None, query: Tensor | None = None
    ) -> Tensor:
        """``(B, C, h, w)`` attention (+ ``(B, vision_dim, h, w)``, ``(B, query_dim)``) ->
        ``(B, h * upsample, w * upsample)`` logits."""
        x = self.attention_in(attention_maps.float())
        if self.vision_in is not None:
            if image_features is None:
                raise ValueError("AttentionRefinementHead was built with vision_dim > 0: pass image_features")
            v = self.vision_in(image_features.float())
            if v.shape[-2:] != x.shape[-2:]:
                v = F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + v
        if self.film is not None:
            if query is None:
                raise ValueError("AttentionRefinementHead was built with query_dim > 0: pass query")
            scale, shift = self.film(query.float()).chunk(2, dim=-1)
            x = x * (1 + scale[..., None, None]) + shift[..., None, None]
        if self.match_heads:
            x = x + self.match_in(self._match(image_features, query, x.shape[-2:]))
        split = max(0, len(self.blocks) - 2)
        for i, block in enumerate(self.blocks):
            if i == split and self.upsample > 1:
                x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
            x = x + block(x)
        return self.out(x).squeeze(1)

    def _match(self, image_features: Tensor, query: Tensor, size: tuple[int, int]) -> Tensor:
        """``(B, match_heads, h, w)`` scaled dot products of the query with every cell."""
        b = query.shape[0]
        k = self.match_key(image_features.float())
        if k.shape[-2:] != size:
            k = F.interpolate(k, size=size, mode="bilinear", align_corners=False)
        k = k.view(b, self.match_heads, -1, *size)
        q = self.match_query(query.float()).view(b, self.match_heads, -1, 1, 1)
        return (q * k).sum(2) / k.shape[2] ** 0.5


class PointDescriptor(nn.Module):
    """Keypoints -> extra sparse prompt tokens for a SAM mask decoder (LENS' point descriptors).

    Per keypoint one *descriptor*: cross-attention from the random-Fourier positional encoding at
    its sub-pixel location (plus the query's semantic feature) to the image features, added to the
    semantic feature.  One more token carries the global semantic feature alone.  Output
    ``(B, P + 1, embed_dim)``; the keypoint itself goes to the decoder as a positive point prompt.

    Why a descriptor and not the click alone: a point says *where*, the descriptor says *what is
    there* as the query understands it, so the decoder can pick the right extent (the whole
    shape, not the part under the click).

    Args:
        embed_dim: the SAM decoder's transformer dim.
        vision_dim: channels of the image features the descriptors attend to.
        query_dim: size of the semantic feature (the LMM hidden size).
        num_heads: attention heads of the cross-attention.
        positional_encoding: share the decoder's own ``PositionEmbeddingRandom``
            (``prompt_encoder.pe_layer``) so that descriptors and the decoder's point prompts and
            ``image_pe`` speak the same coordinates; a new one is made when ``None``.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 64,
        vision_dim: int = 64,
        query_dim: int = 64,
        num_heads: int = 4,
        positional_encoding: PositionEmbeddingRandom | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % 2 or embed_dim % num_heads:
            raise ValueError(
                f"PointDescriptor: embed_dim {embed_dim} must be even and divisible by num_heads {num_heads}"
            )
        self.embed_dim = embed_dim
        self.pe = positional_encoding if positional_encoding is not None else PositionEmbeddingRandom(embed_dim // 2)
        self.vision_proj = nn.Conv2d(vision_dim, embed_dim, 1)
        self.query_proj = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, embed_dim))
        self.cross = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))

    def encode_points(self, points: Tensor) -> Tensor:
        """``(B, P, 2)`` normalised ``(x, y)`` in [0, 1] -> ``(B, P, embed_dim)`` encodings."""
        return self.pe._pe_encoding(points.float())

    def forward(self, points: Tensor, image_features: Tensor, query: Tensor) -> Tensor:
        """``points (B, P, 2)`` normalised (x, y) in [0, 1]; ``image_features (B, vision_dim,
        h, w)``; ``query (B, query_dim)`` -> tokens ``(B, P + 1, embed_dim)``."""
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(f"PointDescriptor: points must be (B, P, 2) normalised x, y; got {tuple(points.shape)}")
        _, _, h, w = image_features.shape
        pos = self.encode_points(points)  # (B, P, D)
        feats = self.vision_proj(image_features.float())  # (B, D, h, w)
        grid_pe = self.pe((h, w)).unsqueeze(0)  # (1, D, h, w)
        keys = (feats + grid_pe).flatten(2).transpose(1, 2)  # (B, hw, D)
        values = feats.flatten(2).transpose(1, 2)
        sem = self.query_proj(query.float()).unsqueeze(1)  # (B, 1, D)
        attended, _ = self.cross(pos + sem, keys, values, need_weights=False)
        desc = self.norm(attended + sem)
        desc = desc + self.mlp(desc)
        return torch.cat([desc, sem], dim=1)


def extract_keypoints(
    heatmap: Tensor,
    *,
    image_size: tuple[int, int],
    k: int = 1,
    threshold: float = 0.0,
    kernel: int = 3,
    refine: str = "quadratic",
) -> tuple[Tensor, Tensor]:
    """Keypoints of one ``(h, w)`` heatmap of probabilities: the top ``k`` peaks above
    ``threshold``, refined below the cell (``"quadratic"`` log-parabola fit or
    ``"soft_argmax"``, see :func:`vlzoo.decoders.heatmap.refine_subpixel`).

    Returns ``(points (P, 2) xy in pixels of image_size, scores (P,))``, best first.  With
    ``threshold=0`` and ``k=1`` there is always one point (the referred object of REC / RES is
    never absent); ``P`` may be 0 with a positive threshold.
    """
    if heatmap.dim() != 2:
        raise ValueError(f"extract_keypoints: heatmap must be (h, w), got {tuple(heatmap.shape)}")
    scores, ys, xs = find_peaks(heatmap, k, threshold, kernel)
    if scores.numel() == 0 and threshold <= 0:
        # a flat map has no strict local maximum above 0: fall back to its arg-max
        flat = int(heatmap.flatten().argmax())
        ys = torch.tensor([flat // heatmap.shape[1]], device=heatmap.device)
        xs = torch.tensor([flat % heatmap.shape[1]], device=heatmap.device)
        scores = heatmap.flatten()[flat : flat + 1]
    cx, cy = refine_subpixel(heatmap, ys, xs, method=refine)
    h, w = heatmap.shape
    big_h, big_w = image_size
    points = torch.stack([(cx * big_w / w).clamp(0, big_w), (cy * big_h / h).clamp(0, big_h)], dim=-1)
    return points, scores.float()


# ----------------------------------------------------------------------------- targets & losses
def interior_point(mask: Tensor) -> Tensor:
    """The keypoint of a mask: ``(x, y)`` pixel centre of the point deepest inside it.

    Why not the centroid: the centroid of a ring or a crescent lies outside the shape, and a
    click outside the object prompts SAM for the wrong thing.  The mask is eroded (3x3) until
    one more step would empty it; the pixel of the remaining core nearest to the core's centroid
    is returned.  An empty mask raises.
    """
    if mask.dim() != 2:
        raise ValueError(f"interior_point: mask must be (H, W), got {tuple(mask.shape)}")
    core = mask.bool()
    if not bool(core.any()):
        raise ValueError("interior_point: empty mask has no interior point")
    x = core.float()[None, None]
    while True:
        eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
        # pixels outside the image count as background
        eroded[..., 0, :] = 0
        eroded[..., -1, :] = 0
        eroded[..., :, 0] = 0
        eroded[..., :, -1] = 0
        if not bool((eroded > 0.5).any()):
            break
        x = eroded
    ys, xs = (x[0, 0] > 0.5).nonzero(as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    i = ((ys.float() - cy) ** 2 + (xs.float() - cx) ** 2).argmin()
    return torch.stack([xs[i].float() + 0.5, ys[i].float() + 0.5])


def _dice(logits: Tensor, target: Tensor, dims: tuple[int, ...]) -> Tensor:
    p = logits.sigmoid()
    inter = (p * target).sum(dims)
    return 1 - (2 * inter + 1) / (p.sum(dims) + target.sum(dims) + 1)


def box_projection_loss(logits: Tensor, boxes: Tensor) -> Tensor:
    """Supervise masks with boxes only (BoxInst): the mask's projections on the x and y axes
    must match the box's extent (dice on each projection).

    Why: REC / detection samples carry boxes but no masks; the box derived from the predicted
    mask is what REC is scored on, so this is exactly the supervision that REC needs.

    Args:
        logits: ``(N, H, W)`` mask logits in the pixels of the boxes.
        boxes: ``(N, 4)`` xyxy pixels.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0
    n, h, w = logits.shape
    xs = torch.arange(w, device=logits.device, dtype=torch.float32) + 0.5
    ys = torch.arange(h, device=logits.device, dtype=torch.float32) + 0.5
    b = boxes.to(logits.device).float()
    tx = ((xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])).float()  # (N, W)
    ty = ((ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])).float()  # (N, H)
    # max over an axis of the probabilities, written on logits (sigmoid is monotone)
    px = logits.amax(dim=1)  # (N, W)
    py = logits.amax(dim=2)  # (N, H)
    return 0.5 * (_dice(px, tx, (1,)) + _dice(py, ty, (1,))).mean()

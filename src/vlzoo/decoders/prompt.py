"""From an LM hidden state to a SAM prompt (NExT-Chat, LISA), and the mask losses of that path.

* :class:`PromptMLP` maps a trigger / ``[SEG]`` hidden state to ``num_tokens`` sparse prompt
  embeddings of a ``segment_anything`` mask decoder (LISA's ``text_hidden_fcs``: hidden ->
  hidden -> 256).
* :class:`TriggerImageAttention` is an *optional* light cross-attention from the trigger state
  to the image tokens before the box / prompt heads.  Why: a box MLP that reads only the trigger
  state must find the referred object through the LM's own attention, which a small LMM trained
  for minutes does not learn (it plateaus at the mean box, see docs/paradigms/pixel2emb.md);
  matching the trigger state against every image token is what NExT-Chat's decoder variants and
  dense heads do, and makes *selecting* the object a direct, well-conditioned function.
* :func:`mask_losses` - sigmoid BCE or focal loss, Dice, and the IoU-prediction MSE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["PromptMLP", "TriggerImageAttention", "IMAGE_SOURCES", "mask_losses", "sincos_grid_encoding"]

#: where :class:`TriggerImageAttention` reads image tokens from (see its ``source`` argument)
IMAGE_SOURCES = ("projected", "lm", "vision")


class PromptMLP(nn.Module):
    """``hidden -> hidden -> num_tokens x prompt_dim``: sparse prompt embeddings for SAM.

    Args:
        hidden_size: LM hidden width (injected from the backbone).
        prompt_dim: the mask decoder's transformer width (256 for every released SAM; the
            paradigm fills it from its mask decoder when the recipe leaves it out).
        num_tokens: sparse prompt tokens per trigger (LISA uses 1).
        dropout: dropout after the last layer (LISA: 0.0).
    """

    def __init__(
        self, *, hidden_size: int = 256, prompt_dim: int = 256, num_tokens: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"PromptMLP: num_tokens must be >= 1, got {num_tokens}")
        self.hidden_size = hidden_size
        self.prompt_dim = prompt_dim
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, prompt_dim * num_tokens),
            nn.Dropout(dropout),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """``(N, hidden_size)`` -> ``(N, num_tokens, prompt_dim)``."""
        return self.mlp(hidden).view(*hidden.shape[:-1], self.num_tokens, self.prompt_dim)


def sincos_grid_encoding(grid: tuple[int, int], dim: int, *, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine/cosine encoding ``(h * w, dim)`` of cell centres in ``[0, 1]`` (x then y),
    with the lowest frequency spanning the image so that a linear map can read a position."""
    h, w = grid
    quarter = max(1, dim // 4)
    freqs = torch.pow(2.0, torch.arange(quarter, dtype=torch.float32, device=device)) * math.pi / 2
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    parts = []
    for coord in (xx.reshape(-1), yy.reshape(-1)):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    enc = torch.cat(parts, dim=-1)
    if enc.shape[-1] < dim:
        enc = F.pad(enc, (0, dim - enc.shape[-1]))
    return enc[:, :dim]


class TriggerImageAttention(nn.Module):
    """Cross-attention from trigger states (queries) to image tokens (keys / values) carrying a
    2-D position encoding, then a feed-forward block; residual, post-norm.  The result replaces
    the trigger state as the input of the box decoder and the prompt MLP.

    Args:
        hidden_size: LM hidden width (injected); queries and output have this width.
        vision_dim: width of the image tokens when they are the vision encoder's features
            (injected); used only when ``source="vision"``.
        feature_grid: ``(h, w)`` of the image tokens (injected).
        source: which image tokens the paradigm passes: ``"projected"`` - the projected image
            tokens as fed to the LM; ``"lm"`` - the LM's last-layer hidden states at the image
            positions (after the LM read them); ``"vision"`` - the vision encoder's feature map,
            projected to ``hidden_size`` here.
        num_heads: attention heads (must divide ``hidden_size``).
        layers: stacked cross-attention blocks.
        dropout: attention / feed-forward dropout.
    """

    def __init__(
        self,
        *,
        hidden_size: int = 256,
        vision_dim: int = 256,
        feature_grid: tuple[int, int] = (16, 16),
        source: str = "projected",
        num_heads: int = 4,
        layers: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if source not in IMAGE_SOURCES:
            raise ValueError(f"TriggerImageAttention: source must be one of {IMAGE_SOURCES}, got {source!r}")
        if hidden_size % num_heads:
            raise ValueError(f"TriggerImageAttention: num_heads={num_heads} must divide hidden_size={hidden_size}")
        self.hidden_size = hidden_size
        self.source = source
        self.feature_grid = (int(feature_grid[0]), int(feature_grid[1]))
        self.project = nn.Linear(vision_dim, hidden_size) if source == "vision" else nn.Identity()
        self.position = nn.Linear(hidden_size, hidden_size)
        self.register_buffer(
            "grid_encoding", sincos_grid_encoding(self.feature_grid, hidden_size), persistent=False
        )
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True),
                    "norm1": nn.LayerNorm(hidden_size),
                    "ffn": nn.Sequential(
                        nn.Linear(hidden_size, 2 * hidden_size),
                        nn.GELU(),
                        nn.Dropout(dropout),
                        nn.Linear(2 * hidden_size, hidden_size),
                    ),
                    "norm2": nn.LayerNorm(hidden_size),
                }
            )
            for _ in range(layers)
        )

    def image_tokens(self, tokens: Tensor) -> Tensor:
        """``(B, P, D)`` image tokens -> keys/values ``(B, P, hidden)`` with the grid encoding added."""
        h, w = self.feature_grid
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"TriggerImageAttention: got {tokens.shape[1]} image tokens, expected {h}x{w}={h * w} "
                "(feature_grid is injected from the backbone; check the recipe's backbone)"
            )
        return self.project(tokens) + self.position(self.grid_encoding.to(tokens.dtype))

    def forward(self, queries: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``queries (B, N, hidden)``, ``tokens (B, P, D)`` -> refined queries ``(B, N, hidden)``
        and the last block's attention ``(B, N, P)`` averaged over heads (kept as evidence)."""
        kv = self.image_tokens(tokens)
        x = queries
        weights = queries.new_zeros(queries.shape[0], queries.shape[1], kv.shape[1])
        for block in self.blocks:
            attended, weights = block["attn"](x, kv, kv, need_weights=True, average_attn_weights=True)
            x = block["norm1"](x + attended)
            x = block["norm2"](x + block["ffn"](x))
        return x, weights


def _dice(logits: Tensor, target: Tensor) -> Tensor:
    prob = logits.sigmoid().flatten(1)
    tgt = target.flatten(1)
    inter = (prob * tgt).sum(-1)
    return 1.0 - (2.0 * inter + 1.0) / (prob.sum(-1) + tgt.sum(-1) + 1.0)


def mask_losses(
    logits: Tensor,
    target: Tensor,
    *,
    iou_pred: Tensor | None = None,
    kind: str = "bce",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """Mask loss parts, unweighted, averaged over masks (LISA: 2.0 BCE + 0.5 Dice; SAM /
    NExT-Chat: focal + Dice + IoU MSE).

    Returns ``{kind: ..., "dice": ..., "iou": ...}``; ``iou`` (MSE between the decoder's
    predicted IoU and the IoU of the thresholded mask with the target) only when ``iou_pred`` is
    given.  The pixel loss and Dice vanish as the logits agree with the target with growing
    confidence; ``iou`` is zero when the IoU prediction is exact.

    Args:
        logits: ``(N, H, W)`` mask logits.
        target: ``(N, H, W)`` bool / {0, 1} masks of the same size.
        iou_pred: ``(N,)`` predicted IoU.
        kind: ``"bce"`` or ``"focal"``.
    """
    if kind not in ("bce", "focal"):
        raise ValueError(f"mask_losses: kind must be 'bce' or 'focal', got {kind!r} (recipe key paradigm.mask_loss)")
    if logits.shape != target.shape:
        raise ValueError(f"mask_losses: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    tgt = target.to(logits.dtype)
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        parts = {kind: zero, "dice": zero}
        if iou_pred is not None:
            parts["iou"] = iou_pred.sum() * 0.0
        return parts
    if kind == "bce":
        pixel = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").flatten(1).mean(-1).mean()
    else:
        pixel = sigmoid_focal_loss(logits, tgt, alpha=focal_alpha, gamma=focal_gamma, reduction="none")
        pixel = pixel.flatten(1).mean(-1).mean()
    parts = {kind: pixel, "dice": _dice(logits, tgt).mean()}
    if iou_pred is not None:
        with torch.no_grad():
            hard = (logits > 0).flatten(1)
            t = tgt.flatten(1) > 0.5
            inter = (hard & t).sum(-1).float()
            union = (hard | t).sum(-1).float()
            actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        parts["iou"] = F.mse_loss(iou_pred.to(logits.dtype), actual.to(logits.dtype))
    return parts

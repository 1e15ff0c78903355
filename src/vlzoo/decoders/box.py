"""Box heads of the embedding paradigm (NExT-Chat): a box *decoder* reading a location out of one
hidden vector, a box *encoder* writing a location into one input embedding, and their losses.

Boxes here are normalised ``xyxy`` in ``[0, 1]`` of the (square) network input; the paradigm
converts from and to the input pixels of :class:`vlzoo.structures.Targets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

__all__ = [
    "BoxDecoder",
    "BoxEncoder",
    "box_losses",
    "box_cycle_losses",
    "normalise_boxes",
    "denormalise_boxes",
    "valid_boxes",
]


def normalise_boxes(boxes: Tensor, input_size: tuple[int, int]) -> Tensor:
    """Input-pixel ``xyxy`` -> ``[0, 1]`` ``xyxy`` (clamped: a box may touch the border)."""
    h, w = input_size
    scale = boxes.new_tensor([w, h, w, h])
    return (boxes.float() / scale).clamp(0.0, 1.0)


def denormalise_boxes(boxes: Tensor, input_size: tuple[int, int]) -> Tensor:
    """``[0, 1]`` ``xyxy`` -> input-pixel ``xyxy``, with corners ordered so that x1 <= x2, y1 <= y2
    (the decoder's raw output need not be ordered; NExT-Chat only scores ordered boxes)."""
    h, w = input_size
    b = boxes.float().clamp(0.0, 1.0)
    x1 = torch.minimum(b[..., 0], b[..., 2])
    x2 = torch.maximum(b[..., 0], b[..., 2])
    y1 = torch.minimum(b[..., 1], b[..., 3])
    y2 = torch.maximum(b[..., 1], b[..., 3])
    return torch.stack([x1 * w, y1 * h, x2 * w, y2 * h], dim=-1)


def valid_boxes(boxes: Tensor) -> Tensor:
    """``(N,)`` bool: rows with x2 > x1 and y2 > y1 (where GIoU is defined)."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


class BoxDecoder(nn.Module):
    """MLP ``hidden -> hidden/2 -> 4`` with a sigmoid: one trigger hidden state to a normalised
    ``xyxy`` box, as NExT-Chat's ``box_decoder``.

    The output is *not* forced to be ordered (x1 < x2): forcing it (e.g. predicting a centre and
    a size) changes the method; the loss scores GIoU only on ordered predictions instead.

    Args:
        hidden_size: width of the LM hidden state (injected from the backbone by ``vlzoo.build``).
        dropout: dropout between the two layers.
    """

    def __init__(self, *, hidden_size: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size < 2:
            raise ValueError(f"BoxDecoder: hidden_size must be >= 2, got {hidden_size}")
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size // 2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size // 2, 4),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """``(..., hidden_size)`` -> ``(..., 4)`` in ``(0, 1)``."""
        return self.mlp(hidden).sigmoid()


class BoxEncoder(nn.Module):
    """MLP ``4 -> hidden/2 -> hidden``: a normalised ``xyxy`` box to the input embedding of a
    ``<loc>`` token, as NExT-Chat's ``box_encoder``, so that a box can be *referred to*.

    Args:
        hidden_size: width of the LM input embedding (injected from the backbone).
    """

    def __init__(self, *, hidden_size: int = 256) -> None:
        super().__init__()
        if hidden_size < 2:
            raise ValueError(f"BoxEncoder: hidden_size must be >= 2, got {hidden_size}")
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(4, hidden_size // 2),
            nn.ReLU(),
            nn.Linear(hidden_size // 2, hidden_size),
        )

    def forward(self, boxes: Tensor) -> Tensor:
        """``(..., 4)`` in ``[0, 1]`` -> ``(..., hidden_size)``."""
        if boxes.shape[-1] != 4:
            raise ValueError(f"BoxEncoder expects (..., 4) boxes, got shape {tuple(boxes.shape)}")
        return self.mlp(boxes.to(self.mlp[0].weight.dtype))


def box_losses(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """NExT-Chat's box loss parts, unweighted (the paradigm weighs them; defaults 2.0 and 0.2).

    ``l1``: mean absolute error over all coordinates.  ``giou``: mean generalised-IoU loss over
    the rows whose *prediction* is an ordered box (GIoU is undefined otherwise); zero, with a
    gradient path, when no row is.  Both are zero when ``pred`` equals ``target``.

    Args:
        pred: ``(N, 4)`` normalised predictions.
        target: ``(N, 4)`` normalised targets.
    """
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"box_losses: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, 4)")
    target = target.to(pred.dtype)
    if pred.shape[0] == 0:
        zero = pred.sum() * 0.0
        return {"l1": zero, "giou": zero}
    l1 = F.l1_loss(pred, target)
    ok = valid_boxes(pred) & valid_boxes(target)
    if ok.any():
        giou = generalized_box_iou_loss(pred[ok], target[ok], reduction="mean")
    else:
        giou = pred.sum() * 0.0
    return {"l1": l1, "giou": giou}


def box_cycle_losses(
    encoder: BoxEncoder,
    decoder: BoxDecoder,
    *,
    hidden: Tensor,
    decoded: Tensor,
    boxes: Tensor,
) -> dict[str, Tensor]:
    """The two cycle losses tying encoder and decoder together (NExT-Chat).

    ``embedding``: MSE between ``encoder(decoded)`` and the trigger ``hidden`` it was decoded
    from - both detached on the input side, so it teaches the encoder to invert the decoder
    without pulling the LM's hidden states towards the encoder.  ``box``: L1 between
    ``decoder(encoder(boxes))`` and ``boxes`` (ground-truth boxes), training both.

    Args:
        hidden: ``(N, hidden_size)`` trigger hidden states.
        decoded: ``(N, 4)`` boxes decoded from ``hidden``.
        boxes: ``(M, 4)`` normalised boxes (the targets, or boxes referred to in prompts).
    """
    if hidden.shape[0] == 0:
        emb = encoder.mlp[0].weight.sum() * 0.0
    else:
        emb = F.mse_loss(encoder(decoded.detach()), hidden.detach())
    if boxes.shape[0] == 0:
        box = decoder.mlp[0].weight.sum() * 0.0 + encoder.mlp[0].weight.sum() * 0.0
    else:
        box = F.l1_loss(decoder(encoder(boxes)), boxes.to(hidden.dtype))
    return {"embedding": emb, "box": box}

"""Tiny components for testing the recipe system, build, runs and the CLI: a backbone with a
tokenizer and data config, a paradigm (LightningModule) that regresses one box, a datamodule of
synthetic squares.  Recipes name them as ``support.tiny.*`` with ``allow_targets: [support]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vlzoo.structures import Batch, ImageTransform, Predictions, Targets

__all__ = ["TinyTokenizer", "TinyBackbone", "TinyAnswerFormat", "TinyEvaluator", "TinyParadigm", "TinyData"]


class TinyTokenizer:
    """A vocabulary and nothing else."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<pad>": 0, "<image>": 1}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


class TinyBackbone(nn.Module):
    """Mean colour of the image -> a ``hidden_size`` feature."""

    def __init__(self, *, hidden_size: int = 8, image_size: int = 16) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_size = image_size
        self.data_config = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": image_size}
        self.tokenizer = TinyTokenizer()
        self.proj = nn.Linear(3 * 4 * 4, hidden_size)
        self.added: list[str] = []

    def add_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        for token in tokens:
            self.tokenizer.vocab.setdefault(token, len(self.tokenizer.vocab))
            self.added.append(token)
        return {t: self.tokenizer.vocab[t] for t in tokens}

    def forward(self, images: Tensor) -> Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return torch.relu(self.proj(pooled))


class TinyAnswerFormat:
    special_tokens: tuple[str, ...] = ("<box>",)


class TinyEvaluator:
    def __init__(self, *, tasks: Sequence[str] = ("rec",)) -> None:
        self.tasks = list(tasks)


class TinyParadigm(L.LightningModule):
    """Regresses the square's box (normalised) from the backbone feature."""

    name = "tiny"
    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        *,
        backbone: TinyBackbone,
        hidden_size: int = 4,
        box_loss_weight: float = 1.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        evaluator: TinyEvaluator | None = None,
        add_tokens_itself: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_size = hidden_size
        self.head = nn.Linear(hidden_size, 4)
        self.box_loss_weight = box_loss_weight
        self.optimizer_factory = optimizer
        self.evaluator = evaluator
        self.answer_format = TinyAnswerFormat()
        if add_tokens_itself:
            backbone.add_special_tokens(list(self.answer_format.special_tokens))

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.backbone(images)))

    def _loss(self, batch: Batch) -> Tensor:
        size = float(batch.images.shape[-1])
        boxes = torch.stack([t.boxes[0] for t in batch.targets]).to(batch.images) / size
        return self.box_loss_weight * nn.functional.l1_loss(self(batch.images), boxes)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=len(batch))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), batch_size=len(batch))

    def predict_step(self, batch: Batch, batch_idx: int) -> list[Predictions]:
        size = float(batch.images.shape[-1])
        boxes = self(batch.images) * size
        out = []
        for i, transform in enumerate(batch.transforms):
            h, w = transform.original_size
            heat = torch.zeros(h, w)
            heat[: h // 2, : w // 2] = 1.0
            out.append(
                Predictions(
                    boxes=transform.boxes_to_original(boxes[i : i + 1].detach()),
                    scores=torch.ones(1),
                    labels=torch.zeros(1, dtype=torch.long),
                    masks=torch.zeros(1, h, w, dtype=torch.bool),
                    keypoints=torch.tensor([[[2.0, 3.0, 1.0]]]),
                    text="a square",
                    image_id=batch.image_ids[i],
                    image_size=(h, w),
                    evidence={"heatmap": heat, "points": torch.tensor([[4.0, 5.0]])},
                )
            )
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is None:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return self.optimizer_factory(self.parameters())


class _Squares(Dataset):
    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        s = self.size
        x0, y0 = (int(v) for v in torch.randint(0, s // 2, (2,), generator=g))
        image = torch.zeros(3, s, s, dtype=torch.uint8)
        image[:, y0 : y0 + s // 2, x0 : x0 + s // 2] = 255
        return image, torch.tensor([x0, y0, x0 + s // 2, y0 + s // 2], dtype=torch.float32), i


class TinyData(L.LightningDataModule):
    """Synthetic bright squares on black; one ``rec`` box per image."""

    def __init__(
        self,
        *,
        num_samples: int = 16,
        batch_size: int = 4,
        image_size: int = 16,
        image_mean: Sequence[float] = (0.0, 0.0, 0.0),
        image_std: Sequence[float] = (1.0, 1.0, 1.0),
        tokenizer: TinyTokenizer | None = None,
        answer_format: TinyAnswerFormat | None = None,
        seed: int = 0,
        keep_raw_images: bool = False,
    ) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.image_size = image_size
        self.image_mean = torch.tensor(image_mean).view(3, 1, 1)
        self.image_std = torch.tensor(image_std).view(3, 1, 1)
        self.tokenizer = tokenizer
        self.answer_format = answer_format
        self.seed = seed
        self.keep_raw_images = keep_raw_images

    def _collate(self, items: list[tuple[Tensor, Tensor, int]]) -> Batch:
        s = self.image_size
        images = torch.stack([(im.float() / 255 - self.image_mean) / self.image_std for im, _, _ in items])
        n = len(items)
        targets = [Targets(boxes=box[None], labels=torch.zeros(1, dtype=torch.long), image_id=i, image_size=(s, s))
                   for _, box, i in items]
        ids = torch.ones(n, 2, dtype=torch.long)
        return Batch(
            images=images, input_ids=ids, attention_mask=ids, labels=ids, prompt_ids=ids,
            prompt_attention_mask=ids, tasks=["rec"] * n, prompts=["square"] * n, answers=[""] * n,
            targets=targets, original_targets=targets,
            transforms=[ImageTransform((s, s), (s, s), (1.0, 1.0)) for _ in items],
            image_ids=[i for _, _, i in items],
            raw_images=[im for im, _, _ in items] if self.keep_raw_images else None,
        )

    def _loader(self, offset: int) -> DataLoader:
        return DataLoader(_Squares(self.num_samples, self.image_size, self.seed + offset),
                          batch_size=self.batch_size, collate_fn=self._collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(2)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(3)

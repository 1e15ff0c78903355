"""The shared base paradigm, through the stage-0 LanguageModeling paradigm on a tiny LMM."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from vlzoo.backbones import CausalLM, MultimodalBackbone, TimmVisionEncoder
from vlzoo.data import ShapesDataset, VLDataModule
from vlzoo.evaluation import Evaluator
from vlzoo.paradigms import BaseParadigm, LanguageModeling, warmup_cosine
from vlzoo.structures import Predictions

IMAGE = 32
LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 256}
VIT = {"model_name": "vit_tiny_patch16_224", "img_size": IMAGE,
       "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}


def backbone() -> MultimodalBackbone:
    torch.manual_seed(0)
    return MultimodalBackbone(vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"),
                              freeze_vision=False)


def datamodule(bb: MultimodalBackbone, *, train_size: int = 64) -> VLDataModule:
    tasks = {"caption": 1.0, "vqa": 1.0}
    return VLDataModule(
        train=ShapesDataset(split="train", size=train_size, image_size=IMAGE, tasks=tasks),
        val=ShapesDataset(split="val", size=6, image_size=IMAGE, tasks=tasks),
        test={"test": ShapesDataset(split="test", size=4, image_size=IMAGE, tasks=tasks),
              "comp_test": ShapesDataset(split="comp_test", size=4, image_size=IMAGE, tasks=tasks)},
        batch_size=8,
        tokenizer=bb.tokenizer,
        image_mean=bb.data_config["mean"],
        image_std=bb.data_config["std"],
        image_size=IMAGE,
    )


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_steps_metrics_per_named_split_and_loss_falls():
    bb = backbone()
    model = LanguageModeling(backbone=bb, evaluator=Evaluator(tasks=["caption", "vqa"]), max_new_tokens=4,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    dm = datamodule(bb)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = model.loss(batch)["lm"].item()
    t = trainer(max_steps=24, val_check_interval=8, limit_val_batches=1)
    t.fit(model, datamodule=dm)
    with torch.no_grad():
        after = model.loss(batch)["lm"].item()
    assert after < 0.7 * before
    assert "val/vqa/exact_match" in t.callback_metrics
    assert "val/caption/cider" in t.callback_metrics
    t.test(model, datamodule=dm, verbose=False)
    metrics = t.callback_metrics
    # every named test split is scored under its own name, every task has its parse-failure rate
    for split in ("test", "comp_test"):
        assert f"{split}/vqa/exact_match" in metrics
        assert f"{split}/caption/parse_fail_rate" in metrics
    preds = model.predict(batch)
    assert len(preds) == len(batch) and all(isinstance(p, Predictions) and isinstance(p.text, str) for p in preds)


def test_unknown_loss_weight_unsupported_task_and_non_finite_loss_are_clear_errors():
    bb = backbone()
    with pytest.raises(ValueError, match=r"does not support task\(s\) \['rec'\]"):
        LanguageModeling(backbone=bb, tasks=["rec"])
    model = LanguageModeling(backbone=bb, loss_weights={"lm_typo": 2.0})
    batch = next(iter(datamodule(bb, train_size=8).train_dataloader()))
    with pytest.raises(ValueError, match=r"loss_weights names \['lm_typo'\].*loss parts are \['lm'\]"):
        model.training_step(batch, 0)

    class Exploding(LanguageModeling):
        def loss(self, batch):
            return {"lm": super().loss(batch)["lm"], "box": torch.tensor(float("nan"))}

    with pytest.raises(FloatingPointError, match=r"loss part\(s\) \['box'\]"):
        Exploding(backbone=bb).training_step(batch, 0)


def test_a_paradigm_without_loss_or_predict_is_refused():
    class Half(BaseParadigm):
        name = "half"

        def loss(self, batch):
            return {}

    with pytest.raises(TypeError, match="must define predict"):
        Half()


def test_warmup_cosine_and_no_decay_on_row_masked_embeddings():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2, min_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))
    bb = MultimodalBackbone(vision=TimmVisionEncoder(**VIT), language=CausalLM(config=dict(LLAMA), tokenizer="shapes"),
                            freeze_lm=True)
    bb.add_special_tokens(["<new>"])
    model = LanguageModeling(backbone=bb)
    groups = model.param_groups()
    no_decay = [g for g in groups if g.get("weight_decay") == 0.0]
    assert len(no_decay) == 1
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("embed" in names[id(p)] or "lm_head" in names[id(p)] for p in no_decay[0]["params"])


def test_stage0_generation_same_with_and_without_cache_and_batched_as_alone():
    """LanguageModeling generates through the backbone's shared loop: the KV cache gives the
    re-run's texts, and a left-padded batch of four prompts of different lengths each one's alone."""
    bb = backbone()
    model = LanguageModeling(backbone=bb, max_new_tokens=6).eval()
    dm = datamodule(bb)
    ds = ShapesDataset(split="val", size=12, image_size=IMAGE, tasks={"caption": 1.0, "vqa": 1.0})
    collate = dm.collate()
    samples = [ds[i] for i in range(12)]
    by_length: dict[int, object] = {}
    for s in samples:  # four prompts of different tokenized lengths
        by_length.setdefault(int(collate([s]).prompt_attention_mask.sum()), s)
    chosen = list(by_length.values())[:4]
    assert len(chosen) == 4
    batch = collate(chosen)
    with torch.no_grad():
        cached = [p.text for p in model.predict(batch)]
        model.use_cache = False
        full = [p.text for p in model.predict(batch)]
        model.use_cache = True
        alone = [model.predict(collate([s]))[0].text for s in chosen]
    assert cached == full == alone and all(cached)


class _LossesAndLogs(L.Callback):
    """Records every step's training loss and what reaches the logger (step -> train/loss)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class _RecordingLogger(L.pytorch.loggers.Logger):
    name, version = "recording", "0"

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.setdefault(int(step), {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _MonitorTrainLoss(L.Callback):
    monitor = "train/loss"

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "train/loss" in trainer.callback_metrics:
            self.seen.append(float(trainer.callback_metrics["train/loss"]))


def test_training_losses_reach_the_logger_at_the_same_steps_with_the_same_values():
    """The training losses are logged only on the steps a logger writes (issue 19): the logger
    gets every log_every_n_steps-th step's own loss, as when every step was logged, and a
    callback monitoring train/loss still sees every step's value."""
    every = 3
    bb = backbone()
    model = LanguageModeling(backbone=bb, max_new_tokens=4)
    record, logger, monitor = _LossesAndLogs(), _RecordingLogger(), _MonitorTrainLoss()
    t = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=7,
                  log_every_n_steps=every, callbacks=[record])
    t.fit(model, datamodule=datamodule(bb))
    logged = {step: row["train/loss"] for step, row in logger.rows.items() if "train/loss" in row}
    assert sorted(logged) == [s for s in range(7) if (s + 1) % every == 0]
    for step, value in logged.items():
        assert value == pytest.approx(record.losses[step], abs=1e-6)
        assert logger.rows[step]["train/loss_lm"] == pytest.approx(value, abs=1e-6)

    bb = backbone()
    model = LanguageModeling(backbone=bb, max_new_tokens=4)
    t = L.Trainer(accelerator="cpu", logger=_RecordingLogger(), enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=5,
                  log_every_n_steps=every, callbacks=[record := _LossesAndLogs(), monitor])
    t.fit(model, datamodule=datamodule(bb))
    assert monitor.seen == pytest.approx(record.losses[:-1], abs=1e-6)  # each step's loss, read at the next

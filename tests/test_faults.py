"""Faults (docs/faults.md): a run killed with SIGKILL resumes to the same end as an uninterrupted
run; a non-finite loss or weights stop the run with a clear message and keep the last good
checkpoint; an unreachable tracking store fails before anything is built."""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from vlzoo.cli import main
from vlzoo.data.datamodule import ResumableShuffle, VLDataModule
from vlzoo.paradigms.base import BaseParadigm
from vlzoo.structures import Batch, Predictions
from vlzoo.tracking import tracking_uri_for

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = TESTS / "support" / "recipes" / "tiny.yaml"


# ---------------------------------------------------------------------------------------------
# test-only components (named in recipes as test_faults.*, with allow_targets: [test_faults])


class FlakyBoxes(BaseParadigm):
    """Regresses the Tiny square's box with two loss parts, ``box`` and ``extent``.  At global step
    ``nan_loss_at_step`` the ``box`` part is NaN; at ``nan_grad_at_step`` the loss is finite but
    the gradients are NaN, so the optimizer step makes the weights NaN."""

    name = "flaky"
    supported_tasks = ("rec",)

    def __init__(
        self,
        *,
        backbone: nn.Module,
        hidden_size: int = 8,
        optimizer: object = None,
        nan_loss_at_step: int | None = None,
        nan_grad_at_step: int | None = None,
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, tasks=["rec"])
        self.head = nn.Linear(hidden_size, 4)
        self.nan_loss_at_step = nan_loss_at_step
        self.nan_grad_at_step = nan_grad_at_step

    def _boxes(self, batch: Batch) -> tuple[Tensor, Tensor]:
        size = float(batch.images.shape[-1])
        truth = torch.stack([t.boxes[0] for t in batch.targets]).to(batch.images) / size
        return torch.sigmoid(self.head(self.backbone(batch.images))), truth

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        pred, truth = self._boxes(batch)
        box = nn.functional.l1_loss(pred, truth)
        extent = nn.functional.l1_loss(pred[:, 2:] - pred[:, :2], truth[:, 2:] - truth[:, :2])
        if self.training and self.global_step == self.nan_loss_at_step:
            box = box * float("nan")
        return {"box": box, "extent": extent}

    def predict(self, batch: Batch) -> list[Predictions]:
        pred, _ = self._boxes(batch)
        size = float(batch.images.shape[-1])
        return [Predictions(boxes=p[None] * size, scores=torch.ones(1)) for p in pred.detach()]

    def on_after_backward(self) -> None:
        if self.global_step == self.nan_grad_at_step:
            for p in self.head.parameters():
                p.grad.fill_(float("nan"))


def _flaky_recipe(tmp_path: Path, **paradigm: int) -> Path:
    recipe = {
        "allow_targets": ["support", "test_faults"],
        "seed": 7,
        "name": "flaky",
        "backbone": {"_target_": "support.tiny.TinyBackbone", "hidden_size": 8},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01},
        "paradigm": {"_target_": "test_faults.FlakyBoxes", **paradigm},
        "data": {"_target_": "support.tiny.TinyData", "num_samples": 8, "batch_size": 4},
        "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 1, "max_epochs": 3,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "enable_model_summary": False},
        "checkpoint": {"every_n_train_steps": 1},
    }
    path = tmp_path / "flaky.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _last_checkpoint(out: Path) -> Path:
    (last,) = (out / "checkpoints").glob("*/last.ckpt")
    return last


def _all_finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# non-finite loss / weights


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the in-process runs of this module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, store: str
) -> None:
    recipe = _flaky_recipe(tmp_path, nan_loss_at_step=3)
    out = tmp_path / "out"
    assert main(["fit", str(recipe), "--output-dir", str(out), "--tracking-uri", store]) == 1
    err = capsys.readouterr().err
    assert "non-finite training loss at global step 3" in err
    assert "['box']" in err and "extent" not in err  # names the bad part only
    assert "last good checkpoint" in err and "Traceback" not in err and "--debug" in err
    last = _last_checkpoint(out)
    assert str(last) in err
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3 and _all_finite(checkpoint["state_dict"])
    assert MlflowClient(tracking_uri=store).get_run(last.parent.name).info.status == "FAILED"
    with pytest.raises(FloatingPointError, match="global step 3"):
        main(["fit", str(recipe), "--output-dir", str(tmp_path / "debug"), "--tracking-uri", store, "--debug"])


def test_nan_weights_are_never_checkpointed(tmp_path: Path, capsys: pytest.CaptureFixture, store: str) -> None:
    # the loss stays finite, the gradients of step 2 are NaN: the weights after it must not be saved
    recipe = _flaky_recipe(tmp_path, nan_grad_at_step=2)
    out = tmp_path / "out"
    assert main(["fit", str(recipe), "--output-dir", str(out), "--tracking-uri", store]) == 1
    err = capsys.readouterr().err
    assert "weights became non-finite at global step 3 (head." in err and "Traceback" not in err
    checkpoint = torch.load(_last_checkpoint(out), weights_only=True)
    assert checkpoint["global_step"] == 2 and _all_finite(checkpoint["state_dict"])
    assert not list((out / "checkpoints").glob("*/.*tmp*"))  # no half-written file either


# ---------------------------------------------------------------------------------------------
# tracking store unreachable at start


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_fails_before_anything_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import support.tiny

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built although the run cannot be tracked")

    monkeypatch.setattr(support.tiny.TinyBackbone, "__init__", refuse)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port = _closed_port()
    for uri in (f"http://127.0.0.1:{port}", f"sqlite:///{blocker}/mlflow.db"):
        for extra in ([], ["--resume"]):
            started = time.monotonic()
            assert main(["fit", str(TINY), "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri, *extra]) == 2
            err = capsys.readouterr().err
            assert f"MLflow tracking at {uri} cannot be used" in err and "Nothing was built" in err, err
            assert "Traceback" not in err
            assert time.monotonic() - started < 30  # no minutes of MLflow retries
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# exact resume


def test_checkpoint_every_n_train_steps(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vlzoo.build import build
    from vlzoo.config import RecipeError

    built = build(TINY, overrides=["checkpoint.every_n_train_steps=3"], output_dir=tmp_path, with_logger=False)
    periodic = [c for c in built.callbacks if isinstance(c, ModelCheckpoint) and c._every_n_train_steps == 3]
    assert len(periodic) == 1 and periodic[0].save_last and periodic[0].dirpath == str(built.checkpoint_dir)
    with pytest.raises(RecipeError, match="checkpoint.every_n_train_steps .* whole number"):
        build(TINY, overrides=["checkpoint.every_n_train_steps=-3"], output_dir=tmp_path, with_logger=False)
    with pytest.raises(RecipeError, match="every_n_train_steps"):  # a typo lists the settings
        build(TINY, overrides=["checkpoint.every_n_train_step=3"], output_dir=tmp_path, with_logger=False)


def test_resumable_shuffle_is_keyed_on_seed_and_epoch_and_skips_done_batches() -> None:
    data = list(range(10))
    sampler = ResumableShuffle(data, seed=3, batch_size=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == data and epoch0 != epoch1
    fresh = ResumableShuffle(data, seed=3, batch_size=3)
    fresh.resume_at(1, 2)  # two batches of epoch 1 were trained on
    assert list(fresh) == epoch1[6:]
    assert list(fresh) == epoch1  # the skip applies once
    fresh.set_epoch(0)
    assert list(fresh) == epoch0


def test_datamodule_state_restores_the_training_position() -> None:
    dm = VLDataModule(train=list(range(10)), batch_size=3)
    assert dm.state_dict() == {}  # no trainer: nothing to save
    dm.load_state_dict({"train_epoch": 2, "train_batches_done": 1})
    sampler = dm.train_dataloader().sampler
    reference = ResumableShuffle(list(range(10)), seed=0, batch_size=3)
    reference.set_epoch(2)
    assert isinstance(sampler, ResumableShuffle) and sampler.epoch == 2
    assert list(sampler) == list(reference)[3:]


SHAPES = ROOT / "recipes" / "shapes" / "pixel2seq_rec.yaml"
#: 48 samples / batch 4 = 12 steps an epoch, 3 epochs; last.ckpt every 6 steps (half-way through
#: each epoch, and at its end); dropout on, so the random state matters as much as the data order
RESUME_OVERRIDES = [
    "data.train.size=48", "data.batch_size=4", "data.val.size=4", "data.eval_batch_size=4",
    "trainer.max_epochs=3", "trainer.max_steps=-1", "trainer.val_check_interval=1.0", "trainer.log_every_n_steps=1",
    "trainer.deterministic=true", "checkpoint.every_n_train_steps=6", "backbone.language.config.attention_dropout=0.1",
    "paradigm.max_new_tokens=4",
    "logger.flush_seconds=0",  # the test picks the moment to kill from the store: every step written at once
]
TOTAL_STEPS = 36
MID_EPOCH_CHECKPOINTS = (6, 18, 30)


def _fit(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CI="1", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONHASHSEED="0")
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "vlzoo.cli", "fit", str(SHAPES), *RESUME_OVERRIDES, "--output-dir", str(out), *extra],
        env=env, stdout=open(out / "stdout.txt", "a"), stderr=open(out / "stderr.txt", "a"), cwd=out,
    )


def _logged_step(db: Path) -> int:
    """The latest step of train/loss the run wrote to its MLflow store (-1 before the first)."""
    try:
        with sqlite3.connect(db, timeout=1) as con:  # not read-only: a killed writer leaves a journal to roll back
            row = con.execute("SELECT MAX(step) FROM metrics WHERE key = 'train/loss'").fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


def _history(out: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=tracking_uri_for(out))
    (run,) = client.search_runs([client.get_experiment_by_name("vlzoo").experiment_id])
    return client, run.info.run_id


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_end_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # a random step shortly after a mid-epoch checkpoint, well before the next one: the resumed run
    # restarts half-way through an epoch (Lightning restarts that epoch's dataloader) and redoes steps
    rng = random.Random(int(os.environ.get("VLZOO_FAULTS_SEED", "11")))
    checkpoint_step = rng.choice(MID_EPOCH_CHECKPOINTS)
    kill_at = checkpoint_step + rng.randint(0, 1)  # train/loss of step s is logged once global step s + 1 is done
    reference = _fit(tmp_path / "reference")
    victim = _fit(tmp_path / "victim")
    db = tmp_path / "victim" / "mlflow.db"
    deadline = time.monotonic() + 300
    killed_step = -1
    while victim.poll() is None and time.monotonic() < deadline:
        killed_step = _logged_step(db)
        if killed_step >= kill_at and list((tmp_path / "victim" / "checkpoints").glob("*/last.ckpt")):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert victim.wait() == -signal.SIGKILL, (tmp_path / "victim" / "stderr.txt").read_text()[-3000:]
    saved_step = torch.load(_last_checkpoint(tmp_path / "victim"), weights_only=True)["global_step"]
    assert saved_step == checkpoint_step and killed_step >= saved_step  # killed mid-epoch, steps to redo

    resumed = _fit(tmp_path / "victim", "--resume")
    assert resumed.wait() == 0, (tmp_path / "victim" / "stderr.txt").read_text()[-3000:]
    assert reference.wait() == 0, (tmp_path / "reference" / "stderr.txt").read_text()[-3000:]

    ref = torch.load(_last_checkpoint(tmp_path / "reference"), weights_only=True)
    end = torch.load(_last_checkpoint(tmp_path / "victim"), weights_only=True)
    assert ref["global_step"] == end["global_step"] == TOTAL_STEPS
    assert ref["state_dict"].keys() == end["state_dict"].keys()
    for name, value in ref["state_dict"].items():
        assert torch.allclose(value.float(), end["state_dict"][name].float(), rtol=0, atol=1e-6), name

    ref_client, ref_run = _history(tmp_path / "reference")
    end_client, end_run = _history(tmp_path / "victim")  # one run: the resumed run continued it
    ref_metrics = ref_client.get_run(ref_run).data.metrics
    end_metrics = end_client.get_run(end_run).data.metrics
    assert ref_metrics.keys() == end_metrics.keys() and "val/rec/acc_0.5" in ref_metrics
    for key, value in ref_metrics.items():
        assert end_metrics[key] == pytest.approx(value, abs=1e-6), key
    # every step's training loss - before the kill, redone after it, and after - is the reference's
    ref_loss = {m.step: m.value for m in ref_client.get_metric_history(ref_run, "train/loss")}
    end_loss = end_client.get_metric_history(end_run, "train/loss")
    assert {m.step for m in end_loss} == set(ref_loss) and len(end_loss) >= len(ref_loss)
    for m in end_loss:
        assert m.value == pytest.approx(ref_loss[m.step], abs=1e-6), m.step

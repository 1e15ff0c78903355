"""`vlzoo fit` against a team tracking server (a real `mlflow server` started here), and what
happens when that server dies in the middle of a run (docs/faults.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from vlzoo.cli import main
from vlzoo.tracking import upload_offline_run

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@dataclass
class Server:
    uri: str
    process: subprocess.Popen
    store: str  # the server's own backend store, readable after the server is gone
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = folder / "server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    process = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=folder, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    yield Server(uri=uri, process=process, store=f"sqlite:///{folder / 'server.db'}", log=log)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


class KillServerAt(Callback):
    """Test-only: kills the tracking server (its whole process group) once training reaches
    ``step``, and waits until its port refuses connections."""

    def __init__(self, *, pid: int, port: int, step: int) -> None:
        self.pid, self.port, self.step = pid, port, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.05)
        raise AssertionError("the tracking server did not go away")


def _recipe(tmp_path: Path, *, samples: int, callbacks: list | None = None) -> Path:
    recipe = yaml.safe_load((TESTS / "support" / "recipes" / "tiny.yaml").read_text())
    recipe["trainer"] = {"_base_": str(TESTS / "support" / "recipes" / "trainer" / "quick.yaml"), "max_epochs": 1}
    recipe["data"]["num_samples"] = samples
    if callbacks:
        recipe["trainer"]["callbacks"] = callbacks
        recipe["allow_targets"] = ["support", "test_tracking_server"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_fit_against_a_team_tracking_server(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["fit", str(_recipe(tmp_path, samples=8)), "--output-dir", str(out), "--tracking-uri", server.uri]) == 0
    assert not (out / "mlflow.db").exists()  # nothing tracked locally
    client = MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vlzoo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["data.num_samples"] == "8"
    assert {"train/loss", "val/loss"} <= run.data.metrics.keys()
    folder = Path(run.data.tags["vlzoo.checkpoint_dir"])
    assert folder.parent == (out / "checkpoints").resolve() and (folder / "last.ckpt").is_file()
    # artifacts go through the server to its store, not to a path on the machine that trained
    local = client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(local).read_text())["name"] == "tiny"
    assert not (out / "mlruns").exists()
    # --resume finds the run on the server
    assert main(["fit", str(_recipe(tmp_path, samples=8)), "--output-dir", str(out), "--tracking-uri", server.uri,
                 "--resume", "trainer.max_epochs=2"]) == 0
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4


def test_losing_the_server_mid_run_keeps_training_and_metrics(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's default retries would wait minutes before giving up on the dead server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = int(server.uri.rsplit(":", 1)[1])
    kill = {"_target_": "test_tracking_server.KillServerAt", "pid": server.process.pid, "port": port, "step": 3}
    recipe = _recipe(tmp_path, samples=40, callbacks=[kill])  # 10 steps; the server dies after 3 (0, 1, 2)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="lost the MLflow tracking server") as caught:
        # every call written at once, so the step the server is lost at is exact (batches: test_metric_batches.py)
        assert main(["fit", str(recipe), "--output-dir", str(out), "--tracking-uri", server.uri,
                     "logger.flush_seconds=0"]) == 0
    assert len([w for w in caught if "lost the MLflow tracking server" in str(w.message)]) == 1
    assert server.process.wait(timeout=30) is not None

    (folder,) = (out / "offline").iterdir()
    run_id = folder.name
    metrics = folder / "metrics.jsonl"
    stdout = capsys.readouterr().out
    assert "the tracking server was lost at step 2" in stdout and str(metrics) in stdout
    local = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sorted(m["step"] for m in local if m["key"] == "train/loss") == list(range(2, 10))  # step 2 was logged after the kill
    assert json.loads((folder / "run.json").read_text())["status"] == "FINISHED"
    checkpoint = torch.load(out / "checkpoints" / run_id / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10  # training went on to the end

    # the dead server's store has the steps before the loss; uploading the local file completes the run
    store = MlflowClient(tracking_uri=server.store)
    assert [m.step for m in store.get_metric_history(run_id, "train/loss")] == [0, 1]
    assert store.get_run(run_id).info.status == "RUNNING"
    assert upload_offline_run(folder, tracking_uri=server.store) == run_id
    assert sorted(m.step for m in store.get_metric_history(run_id, "train/loss")) == list(range(10))
    assert store.get_run(run_id).info.status == "FINISHED"

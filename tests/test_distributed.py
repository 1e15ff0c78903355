"""DDP on CPU (gloo, 2 processes) through the real command line: the run is logged and
checkpointed once, by rank 0, and its validation / test metrics equal a single-process
evaluation of the same checkpoint.

The evaluation splits hold 5 and 7 samples on 2 ranks, so ranks evaluate unequal numbers of
samples and batches (3 + 2, 4 + 3): Lightning's default DistributedSampler
would repeat a sample to even them out and the metrics would differ (see docs/scaling.md).
Every subprocess runs in its own session with a deadline; on timeout the whole process group
(the launcher and the rank it started) is killed and the test fails with the output's tail.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from vlzoo.cli import main
from vlzoo.tracking import tracking_uri_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shapes" / "pixel2emb_rec.yaml"  # has heads a REC batch leaves unused
SETTINGS = [
    "trainer=ddp_cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.log_every_n_steps=1",
    "data.train.size=32",
    "data.batch_size=4",
    "data.val.size=5",
    "data.test.size=7",
    # one sample per evaluation batch: the loss of a batch is a mean over its answer tokens, so only
    # then does the evaluation loss not depend on how samples are grouped (the metrics never do)
    "data.eval_batch_size=1",
]
DEADLINE = 420  # seconds for one command (two ranks); a hang fails the test instead of the suite


def _vlzoo(args: list[str], cwd: Path) -> str:
    """Run ``python -m vlzoo.cli ARGS`` in its own process group; its output, or a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlzoo.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"vlzoo {args[0]} did not finish within {DEADLINE} s (hung?); last output:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"vlzoo {' '.join(args)} exited {proc.returncode}:\n{out[-5000:]}")
    return out


def _runs(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("vlzoo")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _metrics(run, prefix: str) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(prefix)}


def _single_process(verb: str, checkpoint: Path, out: Path) -> dict[str, float]:
    """``vlzoo VERB --checkpoint CKPT`` on one process (in this process); its logged metrics."""
    out.mkdir(parents=True, exist_ok=True)
    assert main([verb, "--checkpoint", str(checkpoint), "trainer.devices=1", "trainer.strategy=auto",
                 "--output-dir", str(out)]) == 0
    (run,) = _runs(tracking_uri_for(out))
    return _metrics(run, "val/" if verb == "validate" else "test/")


def _assert_same(distributed: dict[str, float], single: dict[str, float]) -> None:
    assert set(distributed) == set(single) and len(single) >= 5, (sorted(distributed), sorted(single))
    for name, value in single.items():
        assert math.isfinite(value), name
        # the loss is a float32 sum in another order; the box metrics are float64 counts and IoUs
        tolerance = 1e-5 if name.endswith("/loss") else 1e-6
        assert distributed[name] == pytest.approx(value, rel=tolerance, abs=1e-7), name


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    log = _vlzoo(["fit", str(RECIPE), *SETTINGS, "--output-dir", str(out)], cwd=out)
    uri = tracking_uri_for(out)
    (run,) = _runs(uri)  # one MLflow run: rank 1 did not open a second one
    folders = list((out / "checkpoints").iterdir())
    assert len(folders) == 1, folders  # checkpoints written by rank 0 only, in the run's folder
    return {"out": out, "uri": uri, "run": run, "folder": folders[0], "log": log}


def test_ddp_fit_runs_two_ranks_and_logs_once(ddp_fit: dict) -> None:
    run, folder, log = ddp_fit["run"], ddp_fit["folder"], ddp_fit["log"]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    assert run.data.tags["vlzoo.checkpoint_dir"] == str(folder) and folder.name == run.info.run_id
    assert int(run.data.params["params_total"]) > 0 and run.data.params["trainer.devices"] == "2"
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in names and len([n for n in names if n.startswith("best-")]) == 1, names
    assert not [n for n in names if ".tmp-" in n]
    client = MlflowClient(tracking_uri=ddp_fit["uri"])
    # 32 samples, 2 ranks, batches of 4: 4 optimizer steps, each logged once
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "val/rec/miou")) == 1
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["vlzoo_mlflow_run_id"] == run.info.run_id


def test_ddp_validation_equals_single_process(ddp_fit: dict, tmp_path: Path) -> None:
    # the last validation ran on the weights last.ckpt holds (end of the only epoch)
    distributed = _metrics(ddp_fit["run"], "val/")
    _assert_same(distributed, _single_process("validate", ddp_fit["folder"] / "last.ckpt", tmp_path))


def test_ddp_test_equals_single_process(ddp_fit: dict, tmp_path: Path) -> None:
    checkpoint = ddp_fit["folder"] / "last.ckpt"
    out = tmp_path / "ddp"
    out.mkdir()
    _vlzoo(["test", "--checkpoint", str(checkpoint), "--output-dir", str(out)], cwd=out)  # its recipe: ddp_cpu
    (run,) = _runs(tracking_uri_for(out))
    assert run.data.params["trainer.devices"] == "2"
    _assert_same(_metrics(run, "test/"), _single_process("test", checkpoint, tmp_path / "single"))


@pytest.mark.parametrize("name", ["ddp_cpu", "gpu_fsdp", "gpu_deepspeed"])
def test_trainer_recipes_name_strategies_lightning_knows(name: str) -> None:
    """A strategy string must be one Lightning registers (checked without building the trainer, so
    without deepspeed or a GPU); a strategy node must build."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    from vlzoo.config import instantiate, recipe_from_dict

    recipe = recipe_from_dict({"trainer": {"_base_": str(ROOT / "recipes" / "trainer" / f"{name}.yaml")}})
    strategy = recipe.slot("trainer")["strategy"]
    if isinstance(strategy, str):
        assert strategy in StrategyRegistry.available_strategies(), strategy
    else:
        assert isinstance(instantiate(strategy, allow=recipe.allowed_prefixes, key="trainer.strategy"), Strategy)


def test_fsdp_recipes_load_the_backbone_in_float32() -> None:
    # FSDP flattens each wrapped unit into one tensor of one dtype; LoRA adapters are fp32
    from vlzoo.config import load_recipe

    paths = sorted((ROOT / "recipes" / "gpu").glob("*_fsdp.yaml"))
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.get("trainer.strategy._target_").endswith("FSDPStrategy"), path
        backbone = recipe.slot("backbone")
        dtypes = [backbone.get("dtype")] + [(backbone.get(k) or {}).get("dtype") for k in ("vision", "language")]
        assert [d for d in dtypes if d is not None] and all(d in (None, "float32") for d in dtypes), (path, dtypes)

"""End to end through the real CLI: `vlzoo fit` logged in MLflow, resumed from its last
checkpoint, reloaded with load_checkpoint; checkpoints load with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from vlzoo.callbacks import RECIPE_KEY, RUN_ID_KEY, count_parameters
from vlzoo.checkpoints import load_checkpoint, read_checkpoint
from vlzoo.cli import main
from vlzoo.config import RecipeError
from vlzoo.tracking import tracking_uri_for

TINY = Path(__file__).parent / "support" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real fit, then one resumed fit of the same run (shared by the tests below)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["fit", str(TINY), "--output-dir", str(out)]) == 0
    uri = tracking_uri_for(out)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vlzoo").experiment_id])
    folder = Path(run.data.tags["vlzoo.checkpoint_dir"])
    first = torch.load(folder / "last.ckpt", weights_only=True)
    first_step = first["global_step"]
    assert main(["fit", str(TINY), "--output-dir", str(out), "--resume", "trainer.max_epochs=2"]) == 0
    return {"out": out, "uri": uri, "client": client, "run_id": run.info.run_id, "folder": folder, "first_step": first_step}


def test_fit_is_logged_in_mlflow(fitted: dict) -> None:
    client: MlflowClient = fitted["client"]
    run = client.get_run(fitted["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["optimizer.lr"] == "0.01" and params["paradigm._target_"] == "support.tiny.TinyParadigm"
    assert params["seed"] == "7" and params["trainer.max_epochs"] == "1"
    assert int(params["params_total"]) == int(params["params_trainable"]) > 0
    assert tags["paradigm"] == "tiny" and tags["backbone"] == "TinyBackbone" and tags["data"] == "TinyData"
    assert tags["task"] == "rec" and tags["vlzoo.version"]
    assert tags["resume.trainer.max_epochs"] == "2"  # the resumed run's change, recorded
    for metric in ("train/loss", "val/loss"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "recipe-resumed.yaml"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "recipe.yaml", str(fitted["out"] / "dl"))
    stored = yaml.safe_load(Path(local).read_text())
    assert stored["paradigm"]["_target_"] == "support.tiny.TinyParadigm" and stored["name"] == "tiny"


def test_resume_continues_the_same_run_and_step(fitted: dict) -> None:
    client: MlflowClient = fitted["client"]
    runs = client.search_runs([client.get_experiment_by_name("vlzoo").experiment_id])
    assert [r.info.run_id for r in runs] == [fitted["run_id"]]  # no second run
    last = torch.load(fitted["folder"] / "last.ckpt", weights_only=True)
    assert fitted["first_step"] == 2  # 8 samples / batch 4
    assert last["global_step"] == 2 * fitted["first_step"] and last["epoch"] == 1
    steps = [m.step for m in client.get_metric_history(fitted["run_id"], "train/loss")]
    assert max(steps) >= fitted["first_step"]  # metrics carry on after the resumed step


def test_checkpoint_embeds_recipe_and_loads_weights_only(fitted: dict) -> None:
    checkpoint, recipe = read_checkpoint(fitted["folder"] / "last.ckpt")
    assert isinstance(checkpoint[RECIPE_KEY], str) and checkpoint[RUN_ID_KEY] == fitted["run_id"]
    assert recipe.data["trainer"]["max_epochs"] == 2 and recipe.data["allow_targets"] == ["support"]
    assert sorted(p.name for p in fitted["folder"].iterdir())[-1] == "last.ckpt"
    assert any(p.name.startswith("best-") for p in fitted["folder"].iterdir())


def test_load_checkpoint_rebuilds_the_model(fitted: dict) -> None:
    path = fitted["folder"] / "last.ckpt"
    with pytest.raises(RecipeError, match="asks to trust support"):
        load_checkpoint(path)  # the checkpoint's own allowlist is not trusted blindly
    model = load_checkpoint(path, allow_targets=["support"])
    state = torch.load(path, weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    again = load_checkpoint(path, allow_targets=["support"])
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(images), again(images))
    assert not model.training


def test_resume_without_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit", str(TINY), "--output-dir", str(tmp_path), "--resume-from", str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({RECIPE_KEY: "paradigm: {}", "payload": Path("x")}, path)  # a pickled Python object
    with pytest.raises(RecipeError, match="weights_only=True"):
        read_checkpoint(path)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(RecipeError, match="holds no vlzoo recipe"):
        read_checkpoint(plain)


def test_count_parameters_counts_shared_once_and_trainable() -> None:
    shared = torch.nn.Linear(2, 2)
    module = torch.nn.Sequential(shared, shared, torch.nn.Linear(2, 1))
    module[2].weight.requires_grad_(False)
    assert count_parameters(module) == (6 + 1, 6 + 3)


def test_test_verb_uses_the_checkpoint_and_its_recipe(fitted: dict, capsys: pytest.CaptureFixture) -> None:
    ckpt = str(fitted["folder"] / "last.ckpt")
    out = str(fitted["out"])
    assert main(["test", "--checkpoint", ckpt, "--output-dir", out]) == 2
    assert "--allow-target support" in capsys.readouterr().err
    assert main(["test", "--checkpoint", ckpt, "--allow-target", "support", "--output-dir", out]) == 0
    client: MlflowClient = fitted["client"]
    runs = client.search_runs([client.get_experiment_by_name("vlzoo").experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.run_id != fitted["run_id"] and "test/loss" in runs[0].data.metrics


def test_checkpoints_are_written_atomically(fitted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.plugins.io import torch_io

    from vlzoo.build import build
    from vlzoo.callbacks import AtomicCheckpointIO

    # every trainer vlzoo builds writes through the atomic checkpoint IO; the fitted run left no temporary file
    built = build(TINY, output_dir=tmp_path, with_logger=False)
    assert isinstance(built.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not [p for p in fitted["folder"].iterdir() if ".tmp-" in p.name]

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_half_way(checkpoint, filepath):  # a crash in the middle of writing the file
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch_io, "_atomic_save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["step"].item() == 1  # the previous checkpoint survives
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith("ckpt") or ".tmp-" in p.name] == ["last.ckpt"]


def test_backbone_of_a_checkpoint_without_a_vlzoo_backbone_is_a_clear_error(fitted: dict) -> None:
    from vlzoo.checkpoints import backbone_of_checkpoint

    path = fitted["folder"] / "last.ckpt"
    with pytest.raises(RecipeError, match="asks to trust support"):
        backbone_of_checkpoint(path)
    with pytest.raises(RecipeError, match="its model has no vlzoo backbone to take the weights from"):
        backbone_of_checkpoint(path, allow_targets=["support"])

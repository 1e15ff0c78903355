"""A recipe is data: code-execution attempts through recipes and overrides are refused at
``vlzoo check`` time, with no side effect (the canary file is never created); the reviewed
constructors that read files never unpickle or import code from a folder."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from vlzoo.cli import main
from vlzoo.config import RecipeError, locate
from vlzoo.config.targets import NOT_FOR_RECIPES, THIRD_PARTY, is_reviewed, reviewed_names

BASE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "heatmap_rec.yaml"
CANARY = "CANARY"  # replaced by the canary file's path in every case


def _cmd() -> str:
    return f"touch {CANARY}"


# (name, recipe body or None for the base recipe, overrides); every one must be refused.
ATTEMPTS: list[tuple[str, dict[str, Any] | None, list[str]]] = [
    ("os.system", {"trainer": {"_target_": "os.system", "command": _cmd()}}, []),
    ("posix.system", {"trainer": {"_target_": "posix.system", "command": _cmd()}}, []),
    ("builtins.eval", {"trainer": {"_target_": "builtins.eval", "source": f"__import__('os').system('{_cmd()}')"}}, []),
    ("builtins.exec", {"trainer": {"_target_": "builtins.exec", "source": "x=1"}}, []),
    ("subprocess.run", {"trainer": {"_target_": "subprocess.run", "args": ["touch", CANARY]}}, []),
    ("subprocess.Popen", {"trainer": {"_target_": "subprocess.Popen", "args": ["touch", CANARY]}}, []),
    ("alias through vlzoo: vlzoo.build.os.system", {"trainer": {"_target_": "vlzoo.build.os.system", "command": _cmd()}}, []),
    ("alias through torch: torch.os.system", {"trainer": {"_target_": "torch.os.system", "command": _cmd()}}, []),
    ("importer through vlzoo", {"trainer": {"_target_": "vlzoo.config.targets.importlib.import_module", "name": "antigravity"}}, []),
    ("torch.load unpickles", {"optimizer": {"_target_": "torch.load", "f": "evil.pt"}}, []),
    ("torch.serialization.load, a second path to torch.load", {"optimizer": {"_target_": "torch.serialization.load", "f": "evil.pt"}}, []),
    ("torch.hub.load runs hubconf code", {"optimizer": {"_target_": "torch.hub.load", "repo_or_dir": ".", "model": "x"}}, []),
    ("torch.jit.load", {"optimizer": {"_target_": "torch.jit.load", "f": "evil.pt"}}, []),
    ("torch.package importer", {"optimizer": {"_target_": "torch.package.PackageImporter", "file_or_buffer": "evil.pt"}}, []),
    ("cpp_extension compiles and imports", {"optimizer": {"_target_": "torch.utils.cpp_extension.load_inline", "name": "x", "cpp_sources": ""}}, []),
    ("torch.compile", {"optimizer": {"_target_": "torch.compile", "model": None}}, []),
    ("numpy.load with pickles", {"optimizer": {"_target_": "numpy.load", "file": "evil.npy", "allow_pickle": True}}, []),
    ("pickle.loads", {"optimizer": {"_target_": "pickle.loads", "data": "x"}}, []),
    ("AutoModel.from_pretrained", {"backbone": {"_target_": "transformers.AutoModel.from_pretrained", "pretrained_model_name_or_path": "."}}, []),
    ("AutoConfig.from_pretrained", {"backbone": {"_target_": "transformers.AutoConfig.from_pretrained", "pretrained_model_name_or_path": "."}}, []),
    ("a config class's from_pretrained", {"backbone": {"_target_": "transformers.LlamaConfig.from_pretrained", "pretrained_model_name_or_path": "."}}, []),
    ("transformers.pipeline", {"backbone": {"_target_": "transformers.pipeline", "model": "."}}, []),
    ("dynamic module loader", {"backbone": {"_target_": "transformers.dynamic_module_utils.get_class_from_dynamic_module", "class_reference": "evil.X", "pretrained_model_name_or_path": "."}}, []),
    ("timm factory with a checkpoint file", {"backbone": {"_target_": "timm.create_model", "model_name": "resnet18", "checkpoint_path": "evil.pth"}}, []),
    ("mlflow.pyfunc", {"logger": {"_target_": "mlflow.pyfunc.load_model", "model_uri": "."}}, []),
    ("resolver registration", {"logger": {"_target_": "omegaconf.OmegaConf.register_new_resolver", "name": "x", "resolver": None}}, []),
    ("LambdaCallback", {"trainer": {"_target_": "lightning.Trainer", "callbacks": [{"_target_": "lightning.pytorch.callbacks.LambdaCallback"}]}}, []),
    ("an unbound method of a reviewed class", {"trainer": {"_target_": "lightning.Trainer.fit"}}, []),
    ("a private path", {"trainer": {"_target_": "torch.optim.AdamW.__init__.__globals__.get", "key": "os"}}, []),
    ("vlzoo's command line", {"trainer": {"_target_": "vlzoo.cli.main", "argv": ["fit", "x.yaml"]}}, []),
    ("vlzoo checkpoint loader", {"trainer": {"_target_": "vlzoo.checkpoints.load_checkpoint", "path": "evil.ckpt"}}, []),
    ("vlzoo file writer", {"trainer": {"_target_": "vlzoo.data.export_shapes_coco", "output_dir": "/tmp"}}, []),
    ("_partial_ of os.system", {"optimizer": {"_target_": "os.system", "_partial_": True}}, []),
    ("_partial_ of torch.load as an optimizer", {"optimizer": {"_target_": "torch.load", "_partial_": True}}, []),
    ("_args_ to os.system", {"trainer": {"_target_": "os.system", "_args_": [_cmd()]}}, []),
    ("nested in a list", None, ["trainer.callbacks=[{_target_: os.system, command: 'touch CANARY'}]"]),
    ("nested in a dict", None, ["paradigm.aligner.extra={inner: {_target_: subprocess.run, args: [touch, CANARY]}}"]),
    ("nested in a list inside a dict", None, ["data.train.extra={steps: [1, {_target_: os.system, command: x}]}"]),
    ("a _target_ under a plain key", None, ["tags={evil: {_target_: os.system, command: x}}"]),
    ("trust_remote_code on a reviewed class", None, ["backbone.language.trust_remote_code=true"]),
    ("weights_only: false", None, ["backbone.weights_only=false"]),
    ("allow_pickle", None, ["data.train.allow_pickle=true"]),
    ("a slot override that swaps in a target", None, ["trainer={_target_: os.system, command: 'touch CANARY'}"]),
    ("an eval-like resolver registered by some package", None, ["trainer.max_steps=${vlzoo_test_shell:CANARY}"]),
    ("an eval-like resolver in the recipe file", {"name": "${vlzoo_test_shell:CANARY}"}, []),
    ("a built-in resolver that is not listed", None, ["name=${oc.create:x}"]),
    ("a resolver nested in an allowed one", None, ["name=${oc.env:HOME,${vlzoo_test_shell:CANARY}}"]),
    # OmegaConf reads \\ as an escaped backslash, so the ${...} after it is a real call
    ("a resolver after an escaped backslash", None, ["name=\\\\${vlzoo_test_shell:CANARY}"]),
    ("a resolver after an escaped backslash in the file", {"name": "\\\\${vlzoo_test_shell:CANARY}"}, []),
    ("a module whose import has side effects", {"trainer": {"_target_": "vlzoo_test_evilmod.Thing"}}, []),
    ("antigravity-style import", {"trainer": {"_target_": "antigravity.geohash"}}, []),
]


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "canary"
    # a resolver that would run a command, as another package could register one
    if not OmegaConf.has_resolver("vlzoo_test_shell"):
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("vlzoo_test_shell", lambda p: Path(p).touch() or 1)
    # a module whose import creates the canary
    (tmp_path / "vlzoo_test_evilmod.py").write_text(
        f"from pathlib import Path\nPath({str(path)!r}).touch()\nclass Thing: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield path
    sys.modules.pop("vlzoo_test_evilmod", None)


def _replace_canary(node: Any, path: Path) -> Any:
    if isinstance(node, dict):
        return {k: _replace_canary(v, path) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace_canary(v, path) for v in node]
    return node.replace(CANARY, str(path)) if isinstance(node, str) else node


def test_the_battery_has_at_least_30_attempts() -> None:
    assert len(ATTEMPTS) >= 30
    assert len({name for name, _, _ in ATTEMPTS}) == len(ATTEMPTS)


@pytest.mark.parametrize(("body", "overrides"), [(b, o) for _, b, o in ATTEMPTS], ids=[n for n, _, _ in ATTEMPTS])
def test_code_execution_through_a_recipe_is_refused_at_check_time(
    body: dict[str, Any] | None, overrides: list[str], canary: Path, capsys: pytest.CaptureFixture
) -> None:
    if body is None:
        recipe = BASE
    else:
        recipe = canary.parent / "attempt.yaml"
        recipe.write_text(yaml.safe_dump({"_base_": [str(BASE)], **_replace_canary(body, canary)}))
    args = [o.replace(CANARY, str(canary)) for o in overrides]
    for verb in ("check", "fit"):
        extra = ["--output-dir", str(canary.parent / "out")] if verb == "fit" else []
        assert main([verb, str(recipe), *args, *extra]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err
        assert "recipe key" in err, err  # names where the attempt is
        assert not canary.exists(), f"vlzoo {verb} ran the attempt"
    assert not (canary.parent / "out" / "checkpoints").exists()


def test_yaml_tags_that_build_python_objects_are_refused(canary: Path, capsys: pytest.CaptureFixture) -> None:
    evil = canary.parent / "tag.yaml"
    evil.write_text(f"trainer: !!python/object/apply:os.system ['touch {canary}']\n")
    assert main(["check", str(evil)]) == 2
    assert "not valid YAML" in capsys.readouterr().err and not canary.exists()
    assert main(["check", str(BASE), f"trainer=!!python/object/apply:os.system ['touch {canary}']"]) == 2
    assert not canary.exists()


def test_identity_not_spelling_decides() -> None:
    import lightning
    import torch

    assert locate("torch.optim.sgd.SGD") is torch.optim.SGD
    assert locate("lightning.pytorch.Trainer") is lightning.Trainer
    assert is_reviewed(torch.nn.Linear) and is_reviewed(torch.optim.lr_scheduler.LambdaLR)
    assert not is_reviewed(torch.load) and not is_reviewed(os.system)
    with pytest.raises(RecipeError, match="not on the reviewed list"):
        locate("torch.serialization.load")


def test_the_vlzoo_part_of_the_reviewed_list_is_pinned() -> None:
    """A new public vlzoo name becomes constructible only when someone adds it here on purpose."""
    vlzoo_names = [n for n in reviewed_names() if n.startswith("vlzoo.")]
    assert "vlzoo.tracking.ResilientMLFlowLogger" in vlzoo_names
    assert not set(vlzoo_names) & NOT_FOR_RECIPES
    pinned = Path(__file__).with_name("reviewed_vlzoo_targets.txt").read_text().split()
    assert vlzoo_names == pinned, (
        "the public vlzoo callables changed: review the new ones (do they run code, unpickle, write files?), "
        "then update tests/reviewed_vlzoo_targets.txt (or vlzoo.config.targets.NOT_FOR_RECIPES)"
    )
    for path in THIRD_PARTY:
        assert locate(path)  # every listed third-party path still exists


def test_vlzoo_targets_is_the_same_list() -> None:
    import vlzoo.config.targets as canonical
    import vlzoo.targets as kept

    for name in kept.__all__:
        assert getattr(kept, name) is getattr(canonical, name), name


# --- the reviewed constructors that read files -------------------------------------------------
class _Evil:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _evil_pickle(path: Path, canary: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil(canary)}, f)
    return path


def test_backbone_and_sam_checkpoints_are_never_unpickled(canary: Path) -> None:
    evil = _evil_pickle(canary.parent / "evil.pt", canary)
    for overrides in (
        [f"backbone.checkpoint={evil}"],
        [f"backbone.vision.checkpoint_path={evil}"],
    ):
        with pytest.raises(RecipeError):
            from vlzoo.build import build

            build(BASE, overrides=overrides, with_trainer=False, with_data=False)
        assert not canary.exists()
    from vlzoo.decoders import SamMaskDecoder

    with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
        SamMaskDecoder(variant="tiny", checkpoint=str(evil))
    assert not canary.exists()


def test_a_model_folder_with_a_pickle_or_remote_code_runs_nothing(canary: Path) -> None:
    from transformers import LlamaConfig

    from vlzoo.backbones import CausalLM
    from vlzoo.data import save_shapes_tokenizer

    folder = canary.parent / "model"
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    config.auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    folder.mkdir()
    config.save_pretrained(folder)
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(canary)!r}).touch()\n")
    _evil_pickle(folder / "pytorch_model.bin", canary)
    save_shapes_tokenizer(folder)
    with pytest.raises(Exception):  # noqa: B017 - any refusal, as long as nothing ran
        CausalLM(name_or_path=str(folder))
    assert not canary.exists()


def test_the_generalized_readers_never_unpickle_code(canary: Path, tmp_path: Path) -> None:
    """GRefCocoDataset reads a ``grefs(*).p`` through the plain-data unpickler (as RefCocoDataset
    does); ReasonSegDataset reads JSON only.  Reviewed into the recipe list with that check."""
    from vlzoo.data import DataError, GRefCocoDataset

    evil = _evil_pickle(tmp_path / "grefs(unc).p", canary)
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(DataError):
        GRefCocoDataset(refs_file=evil, instances_file=tmp_path / "instances.json", image_dir=tmp_path)
    assert not canary.exists()

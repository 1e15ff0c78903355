"""The recipe rules of DESIGN.md, one or more tests each: loading, merging, overrides,
interpolation, provenance, validation, the allowlist and instantiate."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from vlzoo.config import (
    Recipe,
    RecipeError,
    flatten,
    instantiate,
    is_trusted,
    load_recipe,
    locate,
    recipe_from_dict,
    recipe_from_yaml,
    validate,
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    root = tmp_path / "recipes"
    write(root, "a.yaml", "seed: 1\noptimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 0.1, betas: [0.9, 0.99]}\n")
    write(root, "b.yaml", "seed: 2\noptimizer: {lr: 0.2}\ntags: {who: b}\n")
    write(root, "trainer/fast.yaml", "# fast\n_target_: lightning.Trainer\nmax_steps: 3\n")
    write(root, "optimizer/sgd.yaml", "_target_: torch.optim.SGD\n_partial_: true\nlr: 0.5\n")
    return root


# --- rule 1: _base_ merges left to right, then the body; lists replace ---------------------
def test_bases_merge_left_to_right_then_body(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: [a.yaml, b.yaml]\noptimizer: {weight_decay: 0.01}\n")
    recipe = load_recipe(main)
    assert recipe.data["seed"] == 2  # b after a
    assert recipe.data["optimizer"] == {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 0.2,
        "betas": [0.9, 0.99],
        "weight_decay": 0.01,
    }
    assert "_base_" not in recipe.data
    reversed_ = write(recipes, "rev.yaml", "_base_: [b.yaml, a.yaml]\n")
    assert load_recipe(reversed_).data["seed"] == 1


def test_lists_replace_instead_of_merging(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\noptimizer: {betas: [0.5]}\n")
    assert load_recipe(main).data["optimizer"]["betas"] == [0.5]


def test_base_paths_are_relative_to_the_file(recipes: Path) -> None:
    write(recipes, "deep/child.yaml", "_base_: [../a.yaml]\nname: child\n")
    recipe = load_recipe(recipes / "deep" / "child.yaml")
    assert recipe.data["seed"] == 1 and recipe.data["name"] == "child"


def test_node_level_base_takes_a_slot_file(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "trainer: {_base_: trainer/fast.yaml, max_epochs: 4}\n")
    assert load_recipe(main).data["trainer"] == {"_target_": "lightning.Trainer", "max_steps": 3, "max_epochs": 4}


def test_base_cycle_and_missing_base_are_errors(recipes: Path) -> None:
    write(recipes, "x.yaml", "_base_: y.yaml\n")
    write(recipes, "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(recipes / "x.yaml")
    missing = write(recipes, "m.yaml", "_base_: nope.yaml\n")
    with pytest.raises(RecipeError, match=r"_base_ \(in .*m.yaml\) names nope.yaml"):
        load_recipe(missing)


def test_yaml_floats_in_exponent_notation_are_floats(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\noptimizer: {lr: 1e-4}\n")
    assert load_recipe(main).data["optimizer"]["lr"] == pytest.approx(1e-4)
    assert load_recipe(main, ["optimizer.lr=3e-5"]).data["optimizer"]["lr"] == pytest.approx(3e-5)


MERGE_CASES = [
    ({"a": {"x": 1, "y": {"z": 2}}, "b": 3}, {"a": {"y": {"w": 4}, "v": 5}, "c": 6}),  # key by key, new keys last
    ({"a": [1, 2, 3], "b": {"l": [1]}}, {"a": [4], "b": {"l": []}}),  # lists replace
    ({"a": {"x": 1}, "b": 2, "c": {"d": 1}}, {"a": 5, "b": {"y": 1}, "c": None}),  # scalar <-> mapping, null
    ({"a": None, "b": {"x": 1}}, {"a": {"x": 2}, "b": {}}),  # a mapping over null; an empty one changes nothing
    ({"a": "${b}", "b": 1}, {"b": 2, "c": "${oc.env:HOME,x}", "d": "\\${kept}"}),  # interpolations stay text
    ({"o": {"_target_": "torch.optim.AdamW", "lr": 1}}, {"o": {"_target_": "torch.optim.AdamW", "betas": [1]}}),
]


@pytest.mark.parametrize(("base", "over"), MERGE_CASES)
def test_merging_agrees_with_omegaconf_merge(base: dict, over: dict) -> None:
    """Where vlzoo has no rule of its own, a merge is exactly OmegaConf.merge (values and key order)."""
    from omegaconf import OmegaConf

    from vlzoo.config.layers import Layer, merge

    ours = merge(Layer.of(base, "base"), Layer.of(over, "over")).data
    theirs = OmegaConf.to_container(OmegaConf.merge(base, over), resolve=False)
    assert ours == theirs and yaml.safe_dump(ours, sort_keys=False) == yaml.safe_dump(theirs, sort_keys=False)


def test_a_mapping_and_a_list_replace_each_other(recipes: Path) -> None:
    # OmegaConf.merge refuses to merge a list into a mapping (and back); a recipe replaces
    write(recipes, "m.yaml", "tags: {a: 1}\ntrainer: {callbacks: [1, 2]}\n")
    main = write(recipes, "main.yaml", "_base_: m.yaml\ntags: [x]\ntrainer: {callbacks: {first: 1}}\n")
    recipe = load_recipe(main)
    assert recipe.data["tags"] == ["x"] and recipe.data["trainer"] == {"callbacks": {"first": 1}}
    assert recipe.source("tags") == str(main) and recipe.source("trainer.callbacks.first") == str(main)


def test_question_marks_are_text_that_replaces_like_any_value(recipes: Path) -> None:
    # OmegaConf's merge would keep the old value under its "missing" marker ???; a recipe does not
    recipe = load_recipe(recipes / "b.yaml", ["tags.who=???", "seed=???"])
    assert recipe.data["tags"] == {"who": "???"} and recipe.data["seed"] == "???"


def test_yaml_that_is_not_plain_data_is_refused(recipes: Path) -> None:
    twice = write(recipes, "twice.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(RecipeError, match=r"(?s)twice.yaml: not valid YAML.*duplicate key seed"):
        load_recipe(twice)
    path = write(recipes, "path.yaml", "name: !!python/object/apply:pathlib.Path [x]\n")
    with pytest.raises(RecipeError, match=r"path.yaml: not valid YAML for a recipe: key name holds a PosixPath"):
        load_recipe(path)
    dated = write(recipes, "dated.yaml", "name: 2024-01-02\n")
    assert load_recipe(dated).data["name"] == "2024-01-02"  # dates stay text


# --- rule 2: a changed _target_ replaces the node whole -----------------------------------
def test_changed_target_replaces_node_whole(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\noptimizer: {_target_: torch.optim.SGD, lr: 0.3}\n")
    assert load_recipe(main).data["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.3}
    same = write(recipes, "same.yaml", "_base_: a.yaml\noptimizer: {_target_: torch.optim.AdamW, lr: 0.3}\n")
    assert load_recipe(same).data["optimizer"]["betas"] == [0.9, 0.99]


def test_changed_target_in_dotted_override_replaces_node(recipes: Path) -> None:
    recipe = load_recipe(recipes / "a.yaml", ["optimizer={_target_: torch.optim.SGD, lr: 0.4}"])
    assert recipe.data["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.4}


# --- rule 3: overrides and precedence ------------------------------------------------------
def test_slot_swap_replaces_the_slot_with_the_named_file(recipes: Path) -> None:
    recipe = load_recipe(recipes / "a.yaml", ["optimizer=sgd"])
    assert recipe.data["optimizer"] == {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5}
    assert "slot swap optimizer=sgd" in recipe.source("optimizer.lr")


def test_precedence_bases_file_slot_swap_dotted(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\noptimizer: {lr: 0.7}\n")
    assert load_recipe(main).data["optimizer"]["lr"] == 0.7  # file over base
    assert load_recipe(main, ["optimizer=sgd"]).data["optimizer"]["lr"] == 0.5  # swap over file
    # dotted over swap, whatever the order on the command line
    for order in (["optimizer.lr=0.9", "optimizer=sgd"], ["optimizer=sgd", "optimizer.lr=0.9"]):
        recipe = load_recipe(main, order)
        assert recipe.data["optimizer"]["_target_"] == "torch.optim.SGD"
        assert recipe.data["optimizer"]["lr"] == 0.9


def test_slot_null_removes_and_unknown_slot_file_suggests(recipes: Path) -> None:
    assert "optimizer" not in load_recipe(recipes / "a.yaml", ["optimizer=null"]).data
    with pytest.raises(RecipeError, match="Did you mean sgd"):
        load_recipe(recipes / "a.yaml", ["optimizer=sgdd"])


def test_dotted_override_creates_and_types_values(recipes: Path) -> None:
    recipe = load_recipe(recipes / "a.yaml", ["trainer.max_epochs=3", "name=exp", "optimizer.betas=[0.1,0.2]"])
    assert recipe.data["trainer"] == {"max_epochs": 3}
    assert recipe.data["name"] == "exp"
    assert recipe.data["optimizer"]["betas"] == [0.1, 0.2]
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(recipes / "a.yaml", ["justaword"])


# --- interpolation ---------------------------------------------------------------------------
def test_interpolation_is_resolved_after_overrides(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\nname: run-${seed}\ndata: {_target_: x.Y, seed: '${seed}'}\n")
    recipe = load_recipe(main, ["seed=5"])
    assert recipe.data["name"] == "run-5" and recipe.data["data"]["seed"] == 5
    bad = write(recipes, "bad.yaml", "name: ${nothing.here}\n")
    with pytest.raises(RecipeError, match="interpolation"):
        load_recipe(bad)


# --- provenance --------------------------------------------------------------------------------
def test_sources_name_the_file_or_override_of_each_key(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: [a.yaml, b.yaml]\noptimizer: {weight_decay: 0.1}\n")
    recipe = load_recipe(main, ["optimizer.lr=0.3"])
    assert recipe.source("seed").endswith("b.yaml")
    assert recipe.source("optimizer._target_").endswith("a.yaml")
    assert recipe.source("optimizer.weight_decay").endswith("main.yaml")
    assert recipe.source("optimizer.lr") == "override optimizer.lr=0.3"
    text = recipe.annotated()
    assert "lr: 0.3  # override optimizer.lr=0.3" in text
    assert f"seed: 2  # {recipes / 'b.yaml'}" in text


# --- rule 4: validation ------------------------------------------------------------------------
def test_typo_names_key_file_and_nearest_name(recipes: Path) -> None:
    main = write(recipes, "main.yaml", "_base_: a.yaml\noptimizer: {weight_decy: 0.1}\n")
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(main))
    message = str(info.value)
    assert "optimizer.weight_decy" in message and str(main) in message and "Did you mean weight_decay?" in message


def test_missing_required_argument_unless_injectable(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"paradigm": {"_target_": "torch.nn.Linear", "in_features": 2}})
    with pytest.raises(RecipeError, match="needs out_features"):
        validate(recipe)
    validate(recipe, injectable={"paradigm": {"out_features"}})
    partial = recipe_from_dict({"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True}})
    validate(partial)  # a partial may leave required parameters for later


def test_unimportable_and_unknown_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match="torch.optim has no attribute AdamWW.*Did you mean AdamW"):
        validate(recipe_from_dict({"optimizer": {"_target_": "torch.optim.AdamWW"}}))
    with pytest.raises(RecipeError, match="vlzoo has no attribute no_such_module"):
        validate(recipe_from_dict({"optimizer": {"_target_": "vlzoo.no_such_module.Thing"}}))
    write(tmp_path, "needs_missing_dep.py", "import vlzoo_not_installed_dependency\nclass Thing: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_from_dict(
        {"allow_targets": ["needs_missing_dep"], "optimizer": {"_target_": "needs_missing_dep.Thing"}},
        allow_targets=["needs_missing_dep"],
    )
    with pytest.raises(RecipeError, match="cannot be imported: ModuleNotFoundError.*vlzoo_not_installed_dependency"):
        validate(recipe)
    with pytest.raises(RecipeError, match="has no _target_"):
        validate(recipe_from_dict({"trainer": {"max_epochs": 1}}))


def test_unknown_top_level_key_suggests_a_slot() -> None:
    with pytest.raises(RecipeError, match="trainr.*Did you mean trainer"):
        recipe_from_dict({"trainr": {"_target_": "lightning.Trainer"}})


def test_nested_nodes_are_validated_with_their_path() -> None:
    recipe = recipe_from_dict(
        {"trainer": {"_target_": "lightning.Trainer", "callbacks": [{"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "monitr": "x"}]}}
    )
    with pytest.raises(RecipeError, match=r"trainer\.callbacks\.0\.monitr.*Did you mean monitor"):
        validate(recipe)


# --- rule 5: the allowlist -------------------------------------------------------------------
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.run", "posix.system"])
def test_dangerous_targets_are_refused(target: str) -> None:
    recipe = recipe_from_dict({"trainer": {"_target_": target, "command": "echo hacked"}})
    with pytest.raises(RecipeError, match=rf"trainer._target_.*{target} is not allowed.*allow_targets"):
        validate(recipe)
    with pytest.raises(RecipeError, match="not allowed"):
        instantiate(recipe.data["trainer"])


def test_a_path_through_a_reviewed_package_is_judged_by_the_object_it_reaches() -> None:
    # vlzoo.config.targets imports importlib; reaching it through vlzoo does not make it reviewed
    with pytest.raises(RecipeError, match="not allowed.*not on the reviewed list.*importlib"):
        locate("vlzoo.config.targets.importlib.import_module")
    with pytest.raises(RecipeError, match="not allowed"):
        locate("torch.load")
    with pytest.raises(RecipeError, match="not allowed"):
        locate("torch.hub.load")
    # identity: a reviewed class is reviewed under every path that reaches it
    assert locate("torch.optim.adamw.AdamW") is locate("torch.optim.AdamW") is torch.optim.AdamW
    assert locate("lightning.Trainer") is locate("lightning.pytorch.trainer.trainer.Trainer")


def test_allow_targets_extends_the_list_on_purpose_and_a_stored_recipe_needs_confirmation() -> None:
    data = {"paradigm": {"_target_": "collections.OrderedDict"}}
    with pytest.raises(RecipeError, match="not allowed"):
        validate(recipe_from_dict(data))
    validate(recipe_from_dict({**data, "allow_targets": ["collections"]}))  # the caller's own recipe says so
    recipe = recipe_from_dict(data, allow_targets=["collections"])  # the --allow-target flag
    validate(recipe)
    assert recipe.data["allow_targets"] == ["collections"] and recipe.source("allow_targets") == "--allow-target collections"
    assert "collections" in recipe.to_yaml()
    assert recipe.allowed_prefixes == ("collections",) and recipe.confirmed == ("collections",)
    assert is_trusted("collections.OrderedDict", recipe.allowed_prefixes)
    assert not is_trusted("collectionsX.Y", recipe.allowed_prefixes)
    # the stored recipe (as a checkpoint holds it) trusts nothing until the caller confirms it
    stored = recipe_from_yaml(recipe.to_yaml(), source="checkpoint c.ckpt")
    assert stored.allowed_prefixes == () and stored.unconfirmed_targets == ("collections",)
    with pytest.raises(RecipeError, match=r"allow_targets \(set in checkpoint c.ckpt\) asks to trust collections.*--allow-target collections"):
        validate(stored)
    again = recipe_from_dict(stored.data, trust_own_allow_targets=False, allow_targets=["collections"])
    validate(again)


# --- instantiate -----------------------------------------------------------------------------
def test_instantiate_partial_nested_and_injection() -> None:
    node = {
        "_target_": "torch.nn.Sequential",
        "_args_unused": None,
    }
    with pytest.raises(RecipeError):
        instantiate(node)  # Sequential takes *args only: an unknown keyword is a recipe error
    opt = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5})
    assert isinstance(opt, functools.partial)
    param = torch.nn.Parameter(torch.zeros(1))
    assert opt([param]).defaults["lr"] == 0.5
    built = instantiate(
        {"layers": [{"_target_": "torch.nn.Linear", "in_features": 2}, {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 1}]},
        inject={"out_features": 7, "not_a_parameter": 1},
    )
    first, second = built["layers"]
    assert first.out_features == 7  # injected where the signature has it and the recipe did not set it
    assert second.out_features == 1  # never over what the recipe set


def test_constructor_errors_become_recipe_errors_with_the_key() -> None:
    with pytest.raises(RecipeError, match=r"recipe key paradigm: building torch.nn.Linear failed") as info:
        instantiate({"_target_": "torch.nn.Linear", "in_features": "two", "out_features": 1}, key="paradigm")
    assert isinstance(info.value.__cause__, TypeError)


def test_recipe_round_trips_through_yaml(recipes: Path) -> None:
    recipe = load_recipe(recipes / "a.yaml", ["optimizer.lr=1e-5"])
    again = recipe_from_yaml(recipe.to_yaml())
    assert isinstance(again, Recipe) and again.data == recipe.data
    assert flatten(again.data)["optimizer.lr"] == pytest.approx(1e-5)
    assert again.name == "a"  # the file name travels with the recipe

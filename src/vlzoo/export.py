"""``vlzoo export CHECKPOINT DIR``: a self-contained folder a model hub can take as is.

The folder holds::

    README.md            model card: what the model does, how to use it, its training figures
    model.safetensors    every weight of the paradigm (safetensors: nothing to unpickle)
    recipe.yaml          the resolved recipe, made self-contained (below)
    tokenizer/           the tokenizer with the tokens the paradigm (and a stage-0 LMM) added
    vlzoo_export.json    manifest: format, vlzoo version, tasks, special-token ids, the recipe
                         keys that name files of this folder

Self-contained means the recipe rebuilds the *architecture* only: every pretrained-loading path
is neutralised - ``checkpoint`` files (a stage-0 backbone, another run's ``last.ckpt``, SAM
weights) become ``null``, ``pretrained: true`` (timm) becomes ``false``, a language model, CLIP vision tower or LLaVA
backbone named by ``name_or_path`` becomes the ``config`` of the loaded model (a tower or LLaVA
also keeps its loaded ``image_mean`` / ``image_std``, so images are read as in training), a
pretrained Whisper audio encoder (``pretrained:`` a folder or hub name) becomes the ``config`` of
the loaded encoder, and the tokenizer is the exported folder - and the full state dict is loaded over it.  :func:`vlzoo.load` and ``vlzoo infer`` read
the folder without the training run, MLflow or any file it came from.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlzoo.config import Recipe, RecipeError
from vlzoo.inference import EXPORT_MANIFEST, RECIPE_FILE, TOKENIZER_DIR, WEIGHTS_FILE, TrainedModel, load
from vlzoo.version import __version__

__all__ = ["export", "self_contained_recipe", "training_figures", "EXPORT_FORMAT"]

EXPORT_FORMAT = "vlzoo-export-1"
#: transformers config keys that describe a saved file, not the architecture
_CONFIG_FILE_KEYS = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                     "quantization_config", "_commit_hash", "auto_map")


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def _module_at(model: Any, key: str) -> Any:
    """The built module of the recipe node at ``key`` (``backbone.language`` -> ``model.backbone.language``)."""
    parts = key.split(".")
    node = model if parts[0] == "paradigm" else getattr(model, parts[0], None)
    for part in parts[1:]:
        node = getattr(node, part, None)
    return node


def _scrubbed(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers config dict without the keys that describe a saved file (also inside its
    sub-configs: a LLaVA config's ``vision_config`` and ``text_config``)."""
    return {k: _scrubbed(v) if isinstance(v, Mapping) else v for k, v in settings.items() if k not in _CONFIG_FILE_KEYS}


def _built_config(built: Any, key: str, what: str) -> Any:
    """The transformers config of ``built`` (a transformers model), or a clear error."""
    config = getattr(built, "config", None)
    if config is None:
        raise RecipeError(f"vlzoo export: recipe key {key} names a pretrained {what}, but the built model has "
                          "no transformers config there to rebuild it from")
    return config


def _lm_config(module: Any, key: str) -> dict[str, Any]:
    config = _built_config(getattr(module, "model", None), key, "language model")
    settings = _scrubbed(config.to_dict())
    settings["model_type"] = config.model_type
    settings["vocab_size"] = int(module.model.get_input_embeddings().num_embeddings)
    return settings


def _vision_config(module: Any, key: str) -> dict[str, Any]:
    config = _built_config(getattr(module, "model", None), key, "vision tower")
    settings = _scrubbed(config.to_dict())
    settings["model_type"] = config.model_type
    return settings


def _llava_config(module: Any, key: str) -> dict[str, Any]:
    config = _built_config(module._lm() if hasattr(module, "_lm") else None, key, "LLaVA model")
    settings = _scrubbed(config.to_dict())
    settings["model_type"] = config.model_type
    # tokens added by the paradigm (or a stage-0 run) grew the embedding beyond the saved config
    settings["text_config"]["vocab_size"] = int(module._vocab_rows())
    return settings


def _normalisation(module: Any) -> dict[str, list[float]]:
    """The built module's input normalisation, so the export reads images as training did."""
    frame = module.data_config
    return {"image_mean": [float(v) for v in frame["mean"]], "image_std": [float(v) for v in frame["std"]]}


def self_contained_recipe(recipe: Recipe, model: Any) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """``(recipe data, {key: path inside the export folder}, [what was changed])``: the recipe
    with its pretrained-loading paths neutralised (see the module doc).  ``model`` is the built
    paradigm, whose loaded models' configs replace each ``name_or_path``."""
    data = copy.deepcopy(recipe.data)
    paths: dict[str, str] = {}
    changes: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{key}.{i}")
            return
        if not isinstance(node, dict):
            return
        target = node.get("_target_")
        if target is not None:
            name = _short(target)
            if isinstance(node.get("checkpoint"), str):
                changes.append(f"{key}.checkpoint: {node['checkpoint']} -> null (its weights are in {WEIGHTS_FILE})")
                node["checkpoint"] = None
            if node.get("pretrained") is True:
                changes.append(f"{key}.pretrained: true -> false (the weights are in {WEIGHTS_FILE})")
                node["pretrained"] = False
            if name == "CausalLM":
                if node.get("name_or_path") is not None:
                    node["config"] = _lm_config(_module_at(model, key), key)
                    changes.append(f"{key}.name_or_path: {node['name_or_path']} -> config of the loaded model")
                    node["name_or_path"] = None
                    node.pop("gguf_file", None)
                node["tokenizer"] = TOKENIZER_DIR
                paths[f"{key}.tokenizer"] = TOKENIZER_DIR
            elif name == "ClipVisionEncoder":
                if node.get("name_or_path") is not None:
                    module = _module_at(model, key)
                    node["config"] = _vision_config(module, key)
                    node.update(_normalisation(module))
                    changes.append(f"{key}.name_or_path: {node['name_or_path']} -> config and normalisation of the "
                                   "loaded vision tower")
                    node["name_or_path"] = None
            elif name in ("LlavaBackbone", "Qwen2VLBackbone", "Qwen25VLBackbone", "PaliGemmaBackbone", "Kosmos2Backbone", "Florence2Backbone"):
                module = _module_at(model, key)
                if node.get("name_or_path") is not None:
                    node["config"] = _llava_config(module, key)
                    node.update(_normalisation(module))
                    if hasattr(module, "min_pixels"):  # Qwen's frame: the loaded preprocessor's limits
                        node.update(min_pixels=int(module.min_pixels), max_pixels=int(module.max_pixels))
                    if isinstance(getattr(module, "resample", None), str):  # PaliGemma's frame: its interpolation
                        node["resample"] = module.resample
                    if name == "Florence2Backbone":  # Florence-2's frame: the loaded preprocessor's side
                        node["image_size"] = int(module.input_size)
                    changes.append(f"{key}.name_or_path: {node['name_or_path']} -> config and normalisation of the "
                                   "loaded LLaVA model")
                    node["name_or_path"] = None
                node["tokenizer"] = TOKENIZER_DIR
                paths[f"{key}.tokenizer"] = TOKENIZER_DIR
            elif name == "WhisperAudioEncoder" and isinstance(node.get("pretrained"), str):
                encoder = getattr(_module_at(model, key), "encoder", None)
                settings = _scrubbed(_built_config(encoder, key, "audio encoder").to_dict())
                settings.pop("model_type", None)
                node["config"] = settings
                changes.append(f"{key}.pretrained: {node['pretrained']} -> config of the loaded audio encoder")
                node["pretrained"] = None
            elif isinstance(node.get("name_or_path"), str):
                raise RecipeError(
                    f"vlzoo export: recipe key {key}.name_or_path ({node['name_or_path']}, a {name}) loads pretrained "
                    "files that the export cannot rebuild from a config yet; only CausalLM language models, CLIP vision "
                    "towers, LLaVA, Qwen, PaliGemma, Kosmos-2 and Florence-2 backbones, timm encoders and checkpoint files are made self-contained"
                )
        for child_key, child in node.items():
            if child_key != "_target_":
                walk(child, f"{key}.{child_key}" if key else child_key)

    for slot, node in data.items():
        walk(node, slot)
    if not paths and getattr(getattr(model, "backbone", None), "tokenizer", None) is not None:
        raise RecipeError(
            "vlzoo export: the recipe's backbone has a tokenizer but no CausalLM node to point at the exported one; "
            "this backbone cannot be exported self-contained yet"
        )
    return data, paths, changes


def training_figures(checkpoint_path: str | Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """What the model card reports: step and epoch of the checkpoint, its monitored metric, and
    - when the run's MLflow store is found (``tracking_uri``, else ``mlflow.db`` of the run's
    output folder) - the run's last logged metrics."""
    path = Path(checkpoint_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    figures: dict[str, Any] = {
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "vlzoo_version": checkpoint.get("vlzoo_version"),
        "mlflow_run_id": checkpoint.get("vlzoo_mlflow_run_id"),
        "metrics": {},
    }
    for name, state in (checkpoint.get("callbacks") or {}).items():
        if name.startswith("ModelCheckpoint") and isinstance(state, Mapping) and state.get("monitor"):
            score = state.get("best_model_score")
            if score is not None:
                figures["monitor"] = {"metric": state["monitor"], "best": float(score)}
                break
    run_id = figures["mlflow_run_id"]
    if run_id:
        uri = tracking_uri
        if uri is None:
            store = path.resolve().parent.parent.parent / "mlflow.db"  # OUTPUT_DIR/checkpoints/<run>/x.ckpt
            uri = f"sqlite:///{store.as_posix()}" if store.is_file() else None
        if uri is not None:
            try:
                from vlzoo.tracking import tracking_client

                run = tracking_client(uri).get_run(run_id)
                figures["metrics"] = {k: float(v) for k, v in sorted(run.data.metrics.items()) if k != "epoch"}
                figures["run_name"] = run.info.run_name
            except Exception:  # noqa: BLE001 - the card is written without the run's figures
                figures["metrics"] = {}
    return figures


def _card(trained: TrainedModel, figures: Mapping[str, Any], changes: Sequence[str], folder_name: str) -> str:
    recipe = trained.recipe
    paradigm = getattr(trained.model, "name", _short(recipe.get("paradigm._target_")))
    tasks = ", ".join(trained.tasks)
    lines = [
        "---",
        "library_name: vlzoo",
        "tags:",
        "  - vlzoo",
        f"  - {paradigm}",
        *[f"  - {t}" for t in trained.tasks],
        "---",
        "",
        f"# {recipe.name}",
        "",
        f"A vlzoo `{paradigm}` model for {tasks}, exported with `vlzoo export` (vlzoo {__version__}).",
        "",
        "## Use it",
        "",
        "```python",
        "import vlzoo",
        "",
        f'model = vlzoo.load("{folder_name}")',
        f'pred = model("image.png", "the red circle", task="{trained.tasks[0]}")  # Predictions, image pixels',
        "```",
        "",
        "```bash",
        f'vlzoo infer {folder_name} image.png "the red circle" --task {trained.tasks[0]} --overlay answer.png',
        f"vlzoo demo {folder_name}",
        "```",
        "",
        "## Training figures",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    for key in ("run_name", "mlflow_run_id", "global_step", "epoch", "vlzoo_version"):
        if figures.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {figures[key]} |")
    if figures.get("monitor"):
        lines.append(f"| best {figures['monitor']['metric']} | {figures['monitor']['best']:.4f} |")
    for key, value in (figures.get("metrics") or {}).items():
        lines.append(f"| {key} | {value:.4f} |")
    lines += [
        "",
        "## Files",
        "",
        f"- `{WEIGHTS_FILE}`: every weight of the model (safetensors).",
        f"- `{RECIPE_FILE}`: the resolved recipe, rebuilding the architecture without any pretrained file.",
        f"- `{TOKENIZER_DIR}/`: the tokenizer with its added tokens "
        + (f"({', '.join(f'`{t}` = {i}' for t, i in trained.special_token_ids.items())})." if trained.special_token_ids else "."),
        f"- `{EXPORT_MANIFEST}`: what `vlzoo.load` reads first.",
    ]
    if changes:
        lines += ["", "Made self-contained (recipe keys changed from the training run):", ""]
        lines += [f"- `{c.split(':', 1)[0]}`:{c.split(':', 1)[1]}" for c in changes]
    return "\n".join(lines) + "\n"


def export(
    checkpoint: str | Path, folder: str | Path, *, allow_targets: Sequence[str] = (), tracking_uri: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the export folder of a ``vlzoo fit`` checkpoint (see the module doc); returns it.

    The folder is written beside its destination and renamed into place, so a failed export
    leaves nothing half-written; an existing non-empty folder is refused unless ``overwrite``."""
    from safetensors.torch import save_model

    checkpoint, folder = Path(checkpoint), Path(folder)
    if not checkpoint.is_file():
        raise RecipeError(f"vlzoo export: checkpoint {checkpoint} does not exist (give a last.ckpt or best-*.ckpt)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise RecipeError(f"vlzoo export: {folder} already exists and is not empty; choose another folder or remove it")
    trained = load(checkpoint, allow_targets=allow_targets)
    data, paths, changes = self_contained_recipe(trained.recipe, trained.model)
    tmp = folder.with_name(f".{folder.name}.tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        backbone = getattr(trained.model, "backbone", None)
        tokenizer = getattr(backbone, "tokenizer", None)
        if paths and tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        save_model(trained.model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "vlzoo": EXPORT_FORMAT},
                   force_contiguous=True)
        (tmp / RECIPE_FILE).write_text(Recipe(data=data).to_yaml())
        figures = training_figures(checkpoint, tracking_uri=tracking_uri)
        manifest = {
            "format": EXPORT_FORMAT,
            "vlzoo_version": __version__,
            "recipe": trained.recipe.name,
            "paradigm": getattr(trained.model, "name", None),
            "tasks": trained.tasks,
            "special_token_ids": trained.special_token_ids,
            "paths": paths,
            "changed": changes,
            "source_checkpoint": checkpoint.name,
            "training": figures,
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / "README.md").write_text(_card(trained, figures, changes, folder.name))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder

"""``vlzoo export``: a self-contained folder (safetensors, resolved recipe, tokenizer, model card)
that ``vlzoo.load`` and ``vlzoo infer`` use without the run, MLflow or the stage-0 file; the
predictions and the special-token ids survive the round trip."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import vlzoo
from support.trained import RECIPES, fit_tiny
from vlzoo.build import build
from vlzoo.callbacks import RECIPE_KEY
from vlzoo.cli import main
from vlzoo.config import RecipeError, instantiate, load_recipe
from vlzoo.data import ShapesDataset
from vlzoo.export import export, self_contained_recipe
from vlzoo.inference import EXPORT_MANIFEST, RECIPE_FILE, TOKENIZER_DIR, WEIGHTS_FILE

STAGE0_TOKENS = ["<stage0_a>", "<stage0_b>"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """pixel2emb (NExT-Chat) on REG and REC, started from a stage-0 backbone file that added
    tokens of its own (so the paradigm's tokens get ids after them), fitted for one step."""
    assert RECIPES is not None
    root = tmp_path_factory.mktemp("export")
    recipe = load_recipe(RECIPES / "shapes" / "pixel2emb_reg.yaml")
    backbone = instantiate(recipe.slot("backbone"), allow=recipe.allowed_prefixes, key="backbone")
    backbone.add_special_tokens(STAGE0_TOKENS)
    stage0 = root / "stage0" / "backbone.pt"
    backbone.save_backbone(stage0)
    ckpt = fit_tiny(root / "run", "shapes/pixel2emb_reg", [f"backbone.checkpoint={stage0}"])
    return {"root": root, "ckpt": ckpt, "stage0": stage0}


def _samples() -> list:
    reg = ShapesDataset(split="test", size=2, image_size=64, tasks=["reg"])[0]
    rec = ShapesDataset(split="test", size=2, image_size=64, tasks=["rec"])[1]
    return [reg, rec]


def _answers(model) -> list:
    reg, rec = _samples()
    return [model(reg.image, task="reg", box=reg.prompt_boxes[0].tolist()),
            model(rec.image, rec.targets.expressions[0], task="rec")]


@pytest.mark.slow
def test_export_reloads_alone_with_the_same_answers_and_token_ids(run: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    original = vlzoo.load(run["ckpt"])
    before = _answers(original)
    folder = tmp_path / "hub" / "pixel2emb-reg"
    assert main(["export", str(run["ckpt"]), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", EXPORT_MANIFEST, RECIPE_FILE, TOKENIZER_DIR, WEIGHTS_FILE])
    assert not [p for p in folder.rglob("*") if p.suffix in (".pt", ".ckpt", ".bin", ".pkl")]  # nothing to unpickle
    # the stage-0 file, the run and its MLflow store are gone: the export alone must do
    shutil.rmtree(run["stage0"].parent)
    with pytest.raises(RecipeError, match="backbone.checkpoint names .* no longer exists.*vlzoo export"):
        vlzoo.load(run["ckpt"])  # the checkpoint itself needs it (it fixes the ids of the tokens it added)
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), str(moved))
    reloaded = vlzoo.load(moved)
    after = _answers(reloaded)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and a.text == b.text
    assert reloaded.special_token_ids == original.special_token_ids
    tokenizer, own = reloaded.model.backbone.tokenizer, original.model.backbone.tokenizer
    for token in [*STAGE0_TOKENS, *original.special_token_ids]:
        assert tokenizer.convert_tokens_to_ids(token) == own.convert_tokens_to_ids(token)
    assert min(original.special_token_ids.values()) > max(own.convert_tokens_to_ids(t) for t in STAGE0_TOKENS)
    # the recipe rebuilds the architecture only; every weight is in the safetensors file
    recipe = yaml.safe_load((moved / RECIPE_FILE).read_text())
    assert recipe["backbone"]["checkpoint"] is None and recipe["backbone"]["language"]["tokenizer"] == TOKENIZER_DIR
    with safe_open(str(moved / WEIGHTS_FILE), framework="pt") as weights:
        assert any(k.startswith("backbone.") for k in weights.keys())
    manifest = json.loads((moved / EXPORT_MANIFEST).read_text())
    assert manifest["tasks"] == ["reg", "rec"] and manifest["special_token_ids"] == original.special_token_ids
    assert any(c.startswith("backbone.checkpoint") for c in manifest["changed"])
    card = (moved / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vlzoo") and "| global step | 1 |" in card and "val/loss" in card
    # the command line reads the folder too, and gives what the API gives
    reg = _samples()[0]
    image = tmp_path / "reg.png"
    from PIL import Image

    Image.fromarray(reg.image.permute(1, 2, 0).numpy()).save(image)
    box = ",".join(str(v) for v in reg.prompt_boxes[0].tolist())
    capsys.readouterr()
    assert main(["infer", str(moved), str(image), "--task", "reg", "--box", box]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["text"] == after[0].text and answer["box"] == [float(v) for v in reg.prompt_boxes[0].tolist()]
    # an existing folder is not overwritten by accident
    assert main(["export", str(run["ckpt"]), str(moved)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrained_language_model_is_exported_as_its_config(tmp_path: Path) -> None:
    """A recipe naming a language model folder (``name_or_path``) exports its config instead:
    the folder is not needed to load the export."""
    assert RECIPES is not None
    lm = instantiate(load_recipe(RECIPES / "shapes" / "pixel2seq_rec.yaml").get("backbone.language"),
                     allow=("vlzoo",), key="backbone.language")
    pretrained = tmp_path / "lm"
    lm.save_pretrained(pretrained)
    overrides = [f"backbone.language.name_or_path={pretrained}", "backbone.language.config=null",
                 "backbone.language.tokenizer=null", "data.train.size=2", "data.val.size=2", "data.test.size=2"]
    built = build(RECIPES / "shapes" / "pixel2seq_rec.yaml", overrides=overrides, with_data=False,
                        with_trainer=False)
    data, paths, changes = self_contained_recipe(built.recipe, built.model)
    language = data["backbone"]["language"]
    assert language["name_or_path"] is None and language["config"]["model_type"] == "llama"
    assert language["config"]["vocab_size"] == built.model.backbone.language.vocab_size
    assert paths == {"backbone.language.tokenizer": TOKENIZER_DIR} and any("name_or_path" in c for c in changes)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": built.model.state_dict(), RECIPE_KEY: built.recipe.to_yaml()}, ckpt)
    folder = export(ckpt, tmp_path / "export")
    shutil.rmtree(pretrained)
    reloaded = vlzoo.load(folder)
    for key, value in built.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    assert reloaded.special_token_ids == built.model.special_token_ids


# --- pretrained vision towers and LLaVA backbones named by a folder ---------------------------------------
#: a normalisation no default has, so the export must carry the folder's preprocessor_config.json
FOLDER_MEAN, FOLDER_STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]
CLIP_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 16}


def _preprocessor(folder: Path) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": FOLDER_MEAN, "image_std": FOLDER_STD,
         "crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 64}}))


def _clip_folder(root: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = root / "clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION)).save_pretrained(folder)
    _preprocessor(folder)
    return folder


def _llava_folder(root: Path) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vlzoo.data.tokenizer import shapes_tokenizer

    folder = root / "llava"
    tok = shapes_tokenizer()
    tok.save_pretrained(folder)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **CLIP_VISION},
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "max_position_embeddings": 256},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    _preprocessor(folder)
    return folder


def _recipe_with_backbone(root: Path, recipe: str, backbone: dict, name: str) -> Path:
    data = load_recipe(RECIPES / "shapes" / f"{recipe}.yaml").data
    data["backbone"] = backbone
    data["name"] = name
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _fit(root: Path, recipe: Path) -> Path:
    from support.trained import SMALL

    out = root / "run"
    assert main(["fit", str(recipe), *SMALL, "trainer.max_steps=1", "--output-dir", str(out)]) == 0
    (ckpt,) = out.rglob("last.ckpt")
    return ckpt


def _rec_answers(model) -> list:
    samples = ShapesDataset(split="test", size=2, image_size=64, tasks=["rec"])
    return [model(s.image, s.targets.expressions[0], task="rec") for s in (samples[0], samples[1])]


def _check_round_trip(ckpt: Path, folder_to_delete: Path, export_dir: Path, node: str) -> dict:
    original = vlzoo.load(ckpt)
    before = _rec_answers(original)
    folder = export(ckpt, export_dir)
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    shutil.rmtree(folder_to_delete)  # the pretrained folder is gone: the export alone must do
    reloaded = vlzoo.load(folder)
    after = _rec_answers(reloaded)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
    assert reloaded.special_token_ids == original.special_token_ids and reloaded.special_token_ids
    tokenizer, own = reloaded.model.backbone.tokenizer, original.model.backbone.tokenizer
    assert tokenizer.get_vocab() == own.get_vocab()
    # the input frame of training: the folder's normalisation and the tower's input side
    assert reloaded.model.backbone.data_config == original.model.backbone.data_config
    assert list(reloaded.model.backbone.data_config["mean"]) == FOLDER_MEAN
    for key, value in original.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[key], value), key
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    assert any(c.startswith(f"{node}.name_or_path") for c in manifest["changed"])
    text = (folder / RECIPE_FILE).read_text()
    assert str(folder_to_delete) not in text and "transformers_version" not in text
    return recipe


@pytest.mark.slow
def test_llava_backbone_named_by_a_folder_is_exported_as_its_config(tmp_path: Path) -> None:
    """A LlavaBackbone loaded from a folder (the GPU recipes' llava-hf/llava-1.5-7b-hf) exports its
    config, tokenizer and normalisation; with the folder deleted the export answers the same."""
    from vlzoo.backbones import LlavaBackbone

    pretrained = _llava_folder(tmp_path)
    backbone = {"_target_": "vlzoo.backbones.LlavaBackbone", "name_or_path": str(pretrained), "freeze_vision": True,
                "freeze_lm": True, "checkpoint": None,  # as the GPU recipes: LoRA on a frozen LM
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    ckpt = _fit(tmp_path, _recipe_with_backbone(tmp_path, "heatmap_rec", backbone, "heatmap_rec_llava"))
    from_folder = LlavaBackbone(name_or_path=str(pretrained))
    recipe = _check_round_trip(ckpt, pretrained, tmp_path / "export", "backbone")
    node = recipe["backbone"]
    assert node["name_or_path"] is None and node["tokenizer"] == TOKENIZER_DIR and node["config"]["model_type"] == "llava"
    assert (node["image_mean"], node["image_std"]) == (FOLDER_MEAN, FOLDER_STD)
    # the heatmap paradigm added its tokens: the exported config has their embedding rows
    added = node["config"]["text_config"]["vocab_size"] - len(from_folder.tokenizer)
    exported = vlzoo.load(tmp_path / "export")
    assert added == len(exported.special_token_ids)
    assert any("lora_A" in k for k in exported.model.state_dict())  # the adapters came back with their weights
    # the config-built backbone is the loaded one's architecture (before the paradigm's tokens)
    config = copy.deepcopy(node["config"])
    config["text_config"]["vocab_size"] = len(from_folder.tokenizer)
    built = LlavaBackbone(config=config, tokenizer=str(tmp_path / "export" / TOKENIZER_DIR))
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in from_folder.state_dict().items()}
    assert built.feature_grid == from_folder.feature_grid and built.input_size == from_folder.input_size == 64


@pytest.mark.slow
def test_clip_vision_tower_named_by_a_folder_is_exported_as_its_config(tmp_path: Path) -> None:
    """A MultimodalBackbone whose ClipVisionEncoder is loaded from a folder exports the tower's
    config and normalisation; with the folder deleted the export answers the same."""
    from vlzoo.backbones import ClipVisionEncoder

    pretrained = _clip_folder(tmp_path)
    backbone = copy.deepcopy(load_recipe(RECIPES / "shapes" / "pixel2emb_rec.yaml").data["backbone"])
    backbone["vision"] = {"_target_": "vlzoo.backbones.ClipVisionEncoder", "name_or_path": str(pretrained),
                          "select_layer": -2}
    ckpt = _fit(tmp_path, _recipe_with_backbone(tmp_path, "pixel2emb_rec", backbone, "pixel2emb_rec_clip"))
    from_folder = ClipVisionEncoder(name_or_path=str(pretrained))
    recipe = _check_round_trip(ckpt, pretrained, tmp_path / "export", "backbone.vision")
    node = recipe["backbone"]["vision"]
    assert node["name_or_path"] is None and node["config"]["model_type"] == "clip_vision_model"
    assert (node["image_mean"], node["image_std"]) == (FOLDER_MEAN, FOLDER_STD)
    built = ClipVisionEncoder(config=node["config"], image_mean=node["image_mean"], image_std=node["image_std"])
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in from_folder.state_dict().items()}
    assert built.data_config == from_folder.data_config


def test_config_built_llava_and_clip_refuse_both_or_neither_source(tmp_path: Path) -> None:
    from vlzoo.backbones import ClipVisionEncoder, LlavaBackbone

    with pytest.raises(ValueError, match="exactly one of name_or_path or config"):
        LlavaBackbone()
    with pytest.raises(ValueError, match="exactly one of name_or_path or config"):
        LlavaBackbone(name_or_path="x", config={})
    with pytest.raises(ValueError, match="config-built LlavaBackbone needs a tokenizer"):
        LlavaBackbone(config={"model_type": "llava"})
    with pytest.raises(ValueError, match="exactly one of name_or_path or config"):
        ClipVisionEncoder()
    with pytest.raises(ValueError, match="model_type 'clip_vision_model', not 'llama'"):
        ClipVisionEncoder(config={"model_type": "llama"})
    with pytest.raises(ValueError, match="image_mean needs 3 values"):
        ClipVisionEncoder(config=CLIP_VISION, image_mean=[0.5])


def test_the_gpu_recipes_llava_and_clip_rebuild_from_their_exported_config() -> None:
    """The configs ``vlzoo export`` writes for llava-hf/llava-1.5-7b-hf and the CLIP-L/336 tower
    (built on the meta device from the shipped configs) rebuild the same architecture."""
    from vlzoo.backbones import ClipVisionEncoder, LlavaBackbone
    from vlzoo.backbones.shipped import dry_loading
    from vlzoo.export import _llava_config, _normalisation, _vision_config

    def shapes(module: torch.nn.Module) -> dict:
        return {k: v.shape for k, v in module.state_dict().items()}

    with dry_loading():
        llava = LlavaBackbone(name_or_path="llava-hf/llava-1.5-7b-hf", dtype="bfloat16")
        rebuilt = LlavaBackbone(config=_llava_config(llava, "backbone"), tokenizer="llava-hf/llava-1.5-7b-hf",
                                dtype="bfloat16", **_normalisation(llava))
        assert shapes(rebuilt) == shapes(llava) and rebuilt.data_config == llava.data_config
        assert rebuilt.model.config.image_token_id == llava.model.config.image_token_id
        tower = ClipVisionEncoder(name_or_path="openai/clip-vit-large-patch14-336")
        again = ClipVisionEncoder(config=_vision_config(tower, "backbone.vision"), **_normalisation(tower))
        assert shapes(again) == shapes(tower) and again.data_config == tower.data_config
        assert again.input_size == 336 and again.stride == 14

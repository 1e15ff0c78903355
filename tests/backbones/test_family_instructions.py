"""``data.instructions``: a family's own task wording in place of vlzoo's ("detect {expr}" for
PaliGemma, "<phrase> {expr}</phrase>" for Kosmos-2, Florence-2's task tokens), validated as data,
applied to every split, written token for token as the family's processor writes that prompt,
and used by ``vlzoo.load`` for a model trained with it."""

from __future__ import annotations

import pytest
import torch

from support.trained import fit_tiny
from vlzoo.build import build
from vlzoo.config import recipe_from_dict
from vlzoo.data import ShapesDataset, VLDataModule
from vlzoo.data.errors import DataError
from vlzoo.data.templates import FAMILY_INSTRUCTIONS, INSTRUCTIONS, instruction_table, plural, reword
from vlzoo.paradigms.codecs import ShikraCodec
from vlzoo.paradigms.pixel2seq import Pixel2SeqAnswerFormat
from vlzoo.structures import Sample, Targets

from .kosmos2_tiny import QUERIES, RECIPES, make_kosmos2_folder
from .kosmos2_tiny import SIDE as KOSMOS_SIDE
from .kosmos2_tiny import shapes_recipe as kosmos2_recipe
from .paligemma_tiny import make_paligemma_folder
from .paligemma_tiny import shapes_pixel2seq as paligemma_pixel2seq
from .paligemma_tiny import shapes_recipe as paligemma_recipe


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"rec": "detect {expr.__class__}"}, "names {expr.__class__}"),  # no attribute access
        ({"rec": "detect {expr[0]}"}, "names {expr[0]}"),  # no indexing
        ({"rec": "detect {expr!r}"}, "names {expr!r}"),  # no conversions
        ({"rec": "detect {expr:>99}"}, "names {expr:>99}"),  # no format specs
        ({"rec": "detect {}"}, "a rec wording takes {expr}"),
        ({"det": "find {expr}"}, "a det wording takes {category}, {plural}"),
        ({"rec": "detect it"}, "leaves out the expression"),
        ({"rec": "detect {"}, "is not a valid wording"),
        ({"locate": "find {expr}"}, "unknown task 'locate'"),
        ({"rec": ["detect {expr}"]}, "expected one non-empty wording"),
        ("qwen2vl", "unknown family 'qwen2vl'"),
        (["detect {expr}"], "expected a family name or a mapping"),
    ],
)
def test_bad_tables_are_refused_naming_the_key(value, message):
    with pytest.raises(ValueError, match="data.instructions") as err:
        instruction_table(value)
    assert message in str(err.value)


def test_every_family_table_is_valid_and_null_keeps_vlzoos_wording():
    for family, table in FAMILY_INSTRUCTIONS.items():
        assert instruction_table(family) == table, family
    assert instruction_table(None) == {}
    # the default wording is untouched by an empty table
    sample = ShapesDataset(split="val", size=2, image_size=64, tasks=["rec"])[0]
    assert reword(sample, {}) is sample


def test_the_datamodule_rewords_every_split_from_the_samples_expression_and_category():
    rec = ShapesDataset(split="train", size=6, image_size=64, tasks=["rec"])
    det = ShapesDataset(split="val", size=6, image_size=64, tasks=["det"])
    dm = VLDataModule(train=rec, val=det, predict=rec, batch_size=6, answer_format=Pixel2SeqAnswerFormat(codec=ShikraCodec()),
                      instructions={"rec": "detect {expr}", "det": "find each {plural}"})
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    # the wrapper is transparent to what scripts and the loader read from the dataset
    inner = loader.dataset.dataset
    assert inner.scene(3).image.tobytes() == rec.scene(3).image.tobytes() and not hasattr(inner, "num_skipped")
    expected = [f"detect {rec[i].targets.expressions[0]}" for i in range(6)]
    assert sorted(batch.prompts) == sorted(expected)
    assert not any(p.startswith(INSTRUCTIONS["rec"][0].split("{")[0]) for p in batch.prompts)
    assert next(iter(dm.predict_dataloader())).prompts == expected  # the predict split too, in order
    batch = next(iter(dm.val_dataloader()))
    assert batch.prompts == [f"find each {plural(det[i].category_name)}" for i in range(6)]


def test_a_sample_without_the_field_is_a_data_error_naming_the_key():
    bare = Sample(torch.zeros(3, 8, 8, dtype=torch.uint8), "rec", "where is it?", Targets(image_size=(8, 8)))
    dm = VLDataModule(train=[bare], batch_size=1, instructions="paligemma")
    with pytest.raises(DataError, match=r"data.instructions.rec needs the referring expression"):
        next(iter(dm.train_dataloader()))


def test_kosmos2_rewording_is_the_processors_grounding_prompt_token_for_token(tmp_path):
    """``data.instructions: kosmos2`` writes the released model's REC prompt: the collate's
    prompt ids are Kosmos2Processor's for ``<grounding><phrase> {expr}</phrase>`` with the image
    span the splice fills taken out."""
    from transformers import AutoProcessor

    folder = make_kosmos2_folder(tmp_path / "kosmos2")
    recipe = kosmos2_recipe(folder, {"_base_": str(RECIPES / "paradigm" / "pixel2seq.yaml"), "tasks": ["rec"],
                                     "codec": {"_target_": "vlzoo.paradigms.codecs.Kosmos2Codec"}})
    recipe["data"]["instructions"] = "kosmos2"
    built = build(recipe_from_dict(recipe))
    dm = built.datamodule
    batch = next(iter(dm.train_dataloader()))
    processor = AutoProcessor.from_pretrained(folder)
    image = torch.randint(0, 256, (KOSMOS_SIDE, KOSMOS_SIDE, 3), dtype=torch.uint8).numpy()
    for row in range(2):
        expr = batch.original_targets[row].expressions[0]
        enc = processor(text=[f"<grounding><phrase> {expr}</phrase>"], images=[image], num_image_tokens=QUERIES,
                        return_tensors="pt")
        native = enc["input_ids"][0].tolist()
        # <s> <image> [image ids] </image> <grounding> ...: the collate writes <s> <image> <grounding> ...
        native = native[:2] + native[2 + QUERIES + 1:]
        prompt = batch.input_ids[row][(batch.labels[row] == -100) & batch.attention_mask[row].bool()].tolist()
        assert prompt == native, (expr, prompt, native)


def test_paligemma_rewording_is_the_processors_detect_prompt_token_for_token(tmp_path):
    """``data.instructions: paligemma`` writes ``detect {expr}``: the prompt rows the backbone
    splices are PaliGemmaProcessor's for ``<image>detect {expr}`` (its ``<bos>`` and ``\n``)."""
    from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

    folder = make_paligemma_folder(tmp_path / "paligemma")
    recipe = paligemma_recipe(folder, paligemma_pixel2seq())
    recipe["data"]["instructions"] = "paligemma"
    built = build(recipe_from_dict(recipe))
    bb, batch = built.backbone, next(iter(built.datamodule.train_dataloader()))
    processor = PaliGemmaProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                   tokenizer=AutoTokenizer.from_pretrained(folder))
    rows = bb.native_inputs(batch.images, batch.prompt_ids, batch.prompt_attention_mask)
    for row in range(2):
        expr = batch.original_targets[row].expressions[0]
        assert batch.prompts[row] == f"detect {expr}"
        alone = processor(images=[torch.zeros(3, 60, 60, dtype=torch.uint8)], text=[f"<image>detect {expr}"],
                          return_tensors="pt")
        mine = rows["input_ids"][row][rows["attention_mask"][row].bool()]
        assert mine.tolist() == alone["input_ids"][0].tolist(), expr


def test_a_model_trained_with_a_wording_is_asked_in_it_by_vlzoo_load(tmp_path):
    from vlzoo.inference import load

    ckpt = fit_tiny(tmp_path / "run", "shapes/pixel2seq_rec", ["data.instructions={rec: 'detect {expr}'}"])
    model = load(ckpt)
    assert model.datamodule.instructions == {"rec": "detect {expr}"}
    assert model.instruction("the red circle", "rec") == "detect the red circle"
    assert model.sample(torch.zeros(3, 64, 64, dtype=torch.uint8), "the red circle").prompt == "detect the red circle"
    # an explicit prompt is the user's: it is not reworded
    assert model.sample(torch.zeros(3, 64, 64, dtype=torch.uint8), "x", prompt="where is x?").prompt == "where is x?"


def test_vlzoo_check_refuses_a_bad_wording_before_anything_is_built():
    from vlzoo.config import RecipeError, load_recipe
    from vlzoo.config.validation import validate

    recipe = RECIPES / "shapes" / "pixel2seq_rec.yaml"
    validate(load_recipe(recipe, ["data.instructions=paligemma"]))
    with pytest.raises(RecipeError, match=r"data.instructions.rec.*\{expr.__class__\}.*set in override"):
        validate(load_recipe(recipe, ["data.instructions={rec: 'where {expr.__class__}'}"]))

"""Zero-shot cells: an off-the-shelf model (a tiny PaliGemma folder saved with save_pretrained)
is a study cell next to a trained one, scored by the same evaluator and harness, never trained
and never given the stage-0 checkpoint; bad combinations are errors naming the key."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from support.studies import write_study
from vlzoo.study.spec import StudyError, expand_grid, load_study

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


def _tiny(name: str):
    """A tiny-model helper of tests/backbones (tests/study is no package, so it is loaded by path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "backbones" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the study file
def test_a_zero_shot_part_has_no_budget_and_its_cells_are_marked(tmp_path):
    path = write_study(tmp_path, f"""study:
  name: zs
  budget: {{steps: 7}}
  parts:
    trained:
      recipe: {RECIPES}/shapes/pixel2seq_{{task}}.yaml
      grid: {{task: [rec]}}
    released:
      zero_shot: true
      recipe: {RECIPES}/shapes/pixel2seq_{{task}}.yaml
      grid: {{task: [rec]}}
""")
    spec = load_study(path)
    assert [p.zero_shot for p in spec.parts] == [False, True] and spec.trains
    trained, released = expand_grid(spec)
    assert not trained.zero_shot and "trainer.max_steps=7" in trained.overrides
    # the study's budget is not inherited: a zero-shot cell trains nothing
    assert released.zero_shot and not any(o.startswith("trainer.max_") for o in released.overrides)
    assert released.key == "part=released,task=rec"


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("  zero_shot: true\n  recipe: {r}\n  grid: {{task: [rec]}}\n  budget: {{steps: 3}}\n", "study.budget"),
        ("  zero_shot: yes please\n  recipe: {r}\n  grid: {{task: [rec]}}\n", "study.zero_shot"),
        ("  zero_shot: true\n  stage0: {s}\n  recipe: {r}\n  grid: {{task: [rec]}}\n", "study.stage0"),
        ("  budget: {{steps: 3}}\n  parts:\n    a:\n      zero_shot: true\n      recipe: {r}\n"
         "      grid: {{task: [rec], budget: [1, 2]}}\n", "study.parts.a.grid.budget"),
        ("  parts:\n    a:\n      zero_shot: true\n      recipe: {r}\n      grid: {{task: [rec]}}\n"
         "      budget: {{steps: 2}}\n", "study.parts.a.budget"),
        ("  zero_shot: true\n  parts:\n    a:\n      recipe: {r}\n      grid: {{task: [rec]}}\n", "study.zero_shot"),
    ],
)
def test_bad_zero_shot_combinations_name_the_key(tmp_path, body, key):
    recipe, stage0 = RECIPES / "shapes" / "pixel2seq_rec.yaml", RECIPES / "shapes" / "base_lmm.yaml"
    path = write_study(tmp_path, "study:\n  name: zs\n" + body.format(r=recipe, s=stage0))
    with pytest.raises(StudyError, match=f"key '{key}'"):
        load_study(path)


@pytest.mark.parametrize(
    ("recipe", "fixed", "key"),
    [
        ("heatmap", "[]", "paradigm._target_"),
        ("pixel2seq", "[backbone.checkpoint=/some/stage0/backbone.pt]", "backbone.checkpoint"),
        ("pixel2seq", "[data.test=null]", "data.test"),
    ],
)
def test_a_recipe_that_is_not_the_model_as_it_is_is_refused(tmp_path, recipe, fixed, key):
    from vlzoo.study.zeroshot import check_zero_shot

    path = write_study(tmp_path, f"""study:
  name: zs
  zero_shot: true
  recipe: {RECIPES}/shapes/{recipe}_{{task}}.yaml
  grid: {{task: [rec]}}
  fixed: {fixed}
""")
    with pytest.raises(StudyError, match=rf"zero-shot cell 0 \[task=rec\].*key '{key}'"):
        check_zero_shot(expand_grid(load_study(path)))


# --------------------------------------------------------------------------- end to end
def _paligemma_with_loc_tokens(folder: Path, *, locs: bool = True, seed: int = 0) -> str:
    """The tiny PaliGemma of tests/backbones, with the released model's <loc0000>..<loc1023> in
    its vocabulary (as in the real checkpoints), so the codec's tokens are the model's own."""
    tiny = _tiny("paligemma_tiny")
    base = tiny.paligemma_tokenizer

    def with_locs():
        tok = base()
        if locs:
            tok.add_tokens([f"<loc{k:04d}>" for k in range(1024)], special_tokens=True)
        return tok

    tiny.paligemma_tokenizer = with_locs
    return tiny.make_paligemma_folder(folder, layers=1, seed=seed)


TINY_DATA = [
    "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", "data.train.size=16", "data.val.size=4",
    "data.test.size=6",
]


@pytest.mark.slow
def test_a_zero_shot_cell_runs_next_to_a_trained_one_and_scores_like_the_evaluator(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from vlzoo.build import build
    from vlzoo.paradigms.base import to_original
    from vlzoo.study.measure import inference_cost
    from vlzoo.study.runner import StudyRun, run_cell

    folder = _paligemma_with_loc_tokens(tmp_path / "paligemma")
    zero_recipe = write_study(tmp_path, f"""seed: 0
name: paligemma_zero_shot
backbone: {{_target_: vlzoo.backbones.PaliGemmaBackbone, name_or_path: {folder}}}
data:
  _base_: {RECIPES}/data/shapes_rec.yaml
  template: {{_target_: vlzoo.data.PromptTemplate, text: "{{image}}<bos>{{prompt}}\\n", verbatim: true}}
paradigm:
  _base_: {RECIPES}/paradigm/pixel2seq.yaml
  tasks: [rec]
  max_new_tokens: 12
  coordinate_sigma: 0.0
  codec: {{_target_: vlzoo.paradigms.codecs.PaliGemmaCodec}}
evaluator: {{_base_: {RECIPES}/evaluator/default.yaml, tasks: [rec]}}
trainer: {{_base_: {RECIPES}/trainer/cpu.yaml}}
""", "paligemma_rec.yaml")
    fixed = "\n".join(f"      - {o}" for o in TINY_DATA)
    study = write_study(tmp_path, f"""# a trained cell and a zero-shot cell
study:
  name: zs
  stage0: {RECIPES}/shapes/base_lmm.yaml
  primary: {{rec: acc_0.5}}
  gallery: {{samples: 1}}
  baselines: false
  parts:
    trained:
      recipe: {RECIPES}/shapes/pixel2seq_{{task}}.yaml
      grid: {{task: [rec]}}
      budget: {{steps: 2}}
      fixed:
{fixed}
      - trainer.val_check_interval=2
    released:
      zero_shot: true
      recipe: {zero_recipe.parent}/paligemma_{{task}}.yaml
      grid: {{task: [rec]}}
      fixed:
{fixed}
""")
    # stage 0 is asked for by the trained cell only (and given as none, to stay fast)
    asked = []
    monkeypatch.setattr(StudyRun, "stage0_checkpoint", lambda self: asked.append(1))
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir()
    zero_run = run_cell(study, 1, tracking_uri=uri, output_dir=out)
    assert asked == []
    trained_run = run_cell(study, 0, tracking_uri=uri, output_dir=out)
    assert asked == [1]

    client = MlflowClient(tracking_uri=uri)
    zero, trained = client.get_run(zero_run), client.get_run(trained_run)
    assert zero.data.tags["vlzoo.zero_shot"] == "true" and "vlzoo.zero_shot" not in trained.data.tags
    zm = zero.data.metrics
    assert zm["cost/train_steps"] == 0 and zm["params/trainable"] == 0 and zm["params/total"] > 0
    assert trained.data.metrics["cost/train_steps"] == 2 and trained.data.metrics["params/trainable"] > 0
    assert zm["cost/latency_ms_per_query"] > 0 and zm["cost/tokens_per_object"] > 0
    assert not any(k.startswith("retention/") for k in zm)

    # the same figures as the evaluator on the model's own predictions, sample by sample
    cell = expand_grid(load_study(study))[1]
    built = build(cell.recipe, overrides=list(cell.overrides), with_trainer=False, with_logger=False)
    model, dm = built.model.eval(), built.datamodule
    dm.setup("test")
    collection = built.evaluator.collection("rec")
    with torch.no_grad():
        for batch in dm.test_dataloader():
            preds = model.predict(batch)
            collection.update([to_original(p, batch, i) for i, p in enumerate(preds)], batch.original_targets)
    direct = {f"test/rec/{k}": float(v) for k, v in collection.compute().items()}
    assert direct and all(not math.isnan(v) for v in direct.values())
    # every constrained answer parses into a box (an untrained model's boxes miss: IoU 0), so the
    # cell went through generation, parsing and the frame like the direct call
    assert direct["test/rec/parse_fail_rate"] == 0 and direct["test/rec/by_kind/attribute/count"] == 2
    for key, value in direct.items():
        assert zm[key] == pytest.approx(value, abs=1e-6), key
    assert zm["cost/tokens_per_object"] == pytest.approx(inference_cost(model, dm)["cost/tokens_per_object"])

    report = StudyRun(load_study(study), tracking_uri=uri, output_dir=out).report().read_text()
    assert "| part=released,task=rec (zero-shot) | zero-shot (no training) |" in report
    assert "| part=trained,task=rec | finished |" in report
    assert "released: zero-shot (no training)" in report


def test_a_task_outside_the_recipe_pattern_only_labels_the_cells(tmp_path):
    path = write_study(tmp_path, f"""study:
  name: zs
  zero_shot: true
  recipe: {RECIPES}/gpu/pixel2seq_{{model}}_refcoco.yaml
  grid: {{model: [qwen2vl, paligemma], task: [rec]}}
""")
    cells = expand_grid(load_study(path))
    assert [c.key for c in cells] == ["model=qwen2vl,task=rec", "model=paligemma,task=rec"]
    assert all(c.task == "rec" and not any(o.startswith("task=") for o in c.overrides) for c in cells)
    assert cells[1].recipe.name == "pixel2seq_paligemma_refcoco.yaml"


def test_vlzoo_study_refuses_a_zero_shot_cell_before_any_run_exists(tmp_path, capsys):
    from vlzoo.cli import EXIT_USER_ERROR, main

    path = write_study(tmp_path, f"""study:
  name: zs
  parts:
    released:
      zero_shot: true
      recipe: {RECIPES}/shapes/heatmap_{{task}}.yaml
      grid: {{task: [rec]}}
""")
    out = tmp_path / "out"
    assert main(["study", str(path), "--output-dir", str(out)]) == EXIT_USER_ERROR
    printed = capsys.readouterr()
    assert "zero-shot cell 0 [part=released,task=rec]" in printed.out + printed.err
    assert "key 'paradigm._target_'" in printed.out + printed.err
    assert not out.exists()


def test_a_codec_whose_tokens_the_model_lacks_is_refused(tmp_path):
    from vlzoo.build import build
    from vlzoo.study.zeroshot import check_vocabulary

    recipes = {}
    for locs in (True, False):
        folder = _paligemma_with_loc_tokens(tmp_path / f"paligemma_{locs}", locs=locs)
        recipes[locs] = write_study(tmp_path, f"""backbone: {{_target_: vlzoo.backbones.PaliGemmaBackbone, name_or_path: {folder}}}
data: {{_base_: {RECIPES}/data/shapes_rec.yaml, num_workers: 0}}
paradigm:
  _base_: {RECIPES}/paradigm/pixel2seq.yaml
  tasks: [rec]
  coordinate_sigma: 0.0
  codec: {{_target_: vlzoo.paradigms.codecs.PaliGemmaCodec}}
""", f"paligemma_{locs}_rec.yaml")
    path = write_study(tmp_path, f"""study:
  name: zs
  zero_shot: true
  recipe: {tmp_path}/paligemma_{{locs}}_{{task}}.yaml
  grid: {{locs: [true, false], task: [rec]}}
""")
    own, foreign = expand_grid(load_study(path))
    for cell in (own, foreign):
        assert cell.recipe == recipes[cell.values["locs"]]
    check_vocabulary(own, build(own.recipe, with_trainer=False, with_logger=False).model)
    model = build(foreign.recipe, with_trainer=False, with_logger=False).model
    with pytest.raises(StudyError, match=r"zero-shot cell 1 .*key 'paradigm.codec'.*<loc0000>, <loc0001>.* and 1020 more"):
        check_vocabulary(foreign, model)


@pytest.mark.slow
def test_the_released_rows_of_the_gpu_study_write_with_their_own_tokens():
    # built at full size on the meta device with the shipped configs and tokenizers (no weights)
    from vlzoo.build import build
    from vlzoo.config import load_recipe
    from vlzoo.dryrun import dry_loading
    from vlzoo.study.zeroshot import check_vocabulary

    cells = [c for c in expand_grid(load_study(RECIPES / "studies" / "gpu_refcoco_zeroshot.yaml")) if c.zero_shot]
    assert {c.values.get("model", "llava") for c in cells} == {"qwen2vl", "qwen25vl", "paligemma", "kosmos2", "llava"}
    for cell in cells:
        with dry_loading():
            built = build(load_recipe(cell.recipe, list(cell.overrides)), with_data=False, with_trainer=False)
        check_vocabulary(cell, built.model)
    # the families with a task syntax are asked in it
    from vlzoo.data.templates import FAMILY_INSTRUCTIONS, instruction_table

    for cell in cells:
        family = cell.values.get("model")
        wording = instruction_table(load_recipe(cell.recipe, list(cell.overrides)).get("data.instructions"))
        assert wording == FAMILY_INSTRUCTIONS.get(family, {}), cell.key
    # the same LLaVA with Pix2Seq bins would add 1000 untrained tokens: not a zero-shot row
    llava = cells[-1]
    with dry_loading():
        built = build(load_recipe(llava.recipe, [*llava.overrides, "paradigm.codec={_target_: vlzoo.paradigms.codecs.BinsCodec, bins: 1000}"]),
                      with_data=False, with_trainer=False)
    with pytest.raises(StudyError, match="key 'paradigm.codec'"):
        check_vocabulary(llava, built.model)

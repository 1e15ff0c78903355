"""Bad input anywhere on the command line: malformed or mistyped recipes, refused targets, bad
overrides, damaged or foreign checkpoints, broken COCO / RefCOCO files and study files.

Each case must end with exit status 2 and one paragraph on stderr that names the key, file or
record and says what to do - no traceback unless ``--debug`` - and must leave nothing in the
output folder that a later run could take for a finished result (no checkpoint, no
``predictions.json``, no report, no finished MLflow run).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from vlzoo.cli import main
from vlzoo.config import RecipeError, shipped_recipes_dir
from vlzoo.data import DataError, ShapesDataset, export_shapes_coco
from vlzoo.study.spec import StudyError
from vlzoo.tracking import tracking_uri_for

RECIPES = shipped_recipes_dir()
assert RECIPES is not None
REC = RECIPES / "shapes" / "pixel2seq_rec.yaml"  # the checkpoint below is trained with this one
DET = RECIPES / "shapes" / "pixel2seq_det.yaml"
OTHER = RECIPES / "shapes" / "heatmap_rec.yaml"  # another paradigm: its weights do not fit
SMALL = [
    "trainer=smoke",
    "data.train.size=4",
    "data.val.size=4",
    "data.test.size=4",
    "data.batch_size=4",
    "data.eval_batch_size=64",
    "data.num_workers=0",
]
USER_ERRORS = (RecipeError, StudyError, DataError)
RUN_VERBS = ("fit", "validate", "test", "predict")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty MLflow SQLite store.  Creating one takes seconds, and every run
    command opens (creates) OUTPUT_DIR/mlflow.db before building anything, so the cases start
    from a copy of this one - an output folder that already has a store, as after any run."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def _seed_store(out: Path, store: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store, out / "mlflow.db")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> dict:
    """One tiny vlzoo checkpoint (one smoke step of ``REC``), shared by the checkpoint cases."""
    out = tmp_path_factory.mktemp("trained")
    _seed_store(out, empty_store)
    assert main(["fit", str(REC), *SMALL, "trainer.max_steps=1", "--output-dir", str(out)]) == 0
    (ckpt,) = out.rglob("last.ckpt")
    return {"ckpt": ckpt, "out": out, "uri": tracking_uri_for(out)}


class Ctx:
    """What a case builds its bad input in: ``tmp`` (its own folder), ``out`` (the output
    folder of the command, checked afterwards) and, on demand, the shared checkpoint and an
    export of a few Shapes scenes as COCO / RefCOCO files."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp = tmp
        self.out = tmp / "out"
        self._request = request
        self._files: dict[str, Path] | None = None

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def seed_store(self) -> None:
        """Give the output folder an empty MLflow store (see ``empty_store``)."""
        _seed_store(self.out, self._request.getfixturevalue("empty_store"))

    @property
    def trained(self) -> dict:
        return self._request.getfixturevalue("trained")

    @property
    def files(self) -> dict[str, Path]:
        """Two Shapes scenes as ``images/*.png``, ``annotations/instances.json`` and a refs pickle."""
        if self._files is None:
            ds = ShapesDataset(split="val", size=2, image_size=64, num_objects=(2, 2))
            self._files = export_shapes_coco(ds, self.tmp / "coco", refs_split="val")
        return self._files

    def edit_instances(self, fn: Callable[[dict], None]) -> Path:
        path = self.files["instances"]
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))
        return path

    def coco(self, split: str = "val", **kw: object) -> str:
        """An override putting a COCO det dataset of the export into ``data.<split>``."""
        node = {
            "_target_": "vlzoo.data.CocoDataset",
            "annotation_file": str(self.files["instances"]),
            "image_dir": str(self.files["image_dir"]),
            "tasks": ["det"],
            **kw,
        }
        return f"data.{split}={json.dumps(node)}"

    def refcoco(self, split: str = "val", **kw: object) -> str:
        node = {
            "_target_": "vlzoo.data.RefCocoDataset",
            "refs_file": str(self.files["refs"]),
            "instances_file": str(self.files["instances"]),
            "image_dir": str(self.files["image_dir"]),
            "split": "val",
            "tasks": ["rec"],
            **kw,
        }
        return f"data.{split}={json.dumps(node)}"

    def study(self, body: str, name: str = "s.yaml") -> Path:
        return self.write(name, body.replace("RECIPES", str(RECIPES)))

    def run_args(self) -> list[str]:
        return ["--output-dir", str(self.out)]


@dataclass
class Case:
    """``make(ctx) -> (argv, words the error must contain)``.  ``tracked``: the mistake is
    only seen once the run is built or its tracking store read, so the output folder may hold
    an MLflow store - but no finished run, checkpoint, prediction file or report.  Otherwise the
    output folder must not even exist."""

    make: Callable[[Ctx], tuple[list[str], list[str]]]
    tracked: bool = False


# ------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------
def _recipe_file(ctx: Ctx, body: str, name: str = "r.yaml") -> Path:
    return ctx.write(name, f"_base_: {REC}\n" + body)


def _base_cycle(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.write("a.yaml", "_base_: b.yaml\nseed: 1\n")
    ctx.write("b.yaml", "_base_: a.yaml\nseed: 2\n")
    return ["check", str(ctx.tmp / "a.yaml")], ["cycle", "a.yaml", "b.yaml"]


def _evil_target(ctx: Ctx) -> tuple[list[str], list[str]]:
    evil = _recipe_file(ctx, f"trainer:\n  _target_: os.system\n  command: touch {ctx.tmp / 'hacked'}\n")
    return ["fit", str(evil), *ctx.run_args()], ["trainer._target_", "os.system is not allowed", "--allow-target"]


def _truncated(ctx: Ctx) -> tuple[list[str], list[str]]:
    raw = ctx.trained["ckpt"].read_bytes()
    bad = ctx.write("half.ckpt", raw[: len(raw) // 2])
    return ["validate", str(REC), *SMALL, "--checkpoint", str(bad), *ctx.run_args()], ["half.ckpt", "truncated"]


def _foreign_torch(ctx: Ctx) -> tuple[list[str], list[str]]:
    path = ctx.tmp / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, path)
    return ["test", str(REC), *SMALL, "--checkpoint", str(path), *ctx.run_args()], ["foreign.pt", "no vlzoo recipe"]


def _pickled_object(ctx: Ctx) -> tuple[list[str], list[str]]:
    path = ctx.tmp / "objects.ckpt"
    torch.save({"state_dict": {}, "hparams": Path("x")}, path)  # needs unpickling a class
    return ["predict", str(REC), *SMALL, "--checkpoint", str(path), *ctx.run_args()], ["objects.ckpt", "never unpickles"]


def _recipe_in_ckpt_only(ctx: Ctx) -> tuple[list[str], list[str]]:
    path = ctx.tmp / "bare.ckpt"
    torch.save({"vlzoo_recipe": torch.load(ctx.trained["ckpt"], weights_only=True)["vlzoo_recipe"]}, path)
    return ["validate", str(REC), *SMALL, "--checkpoint", str(path), *ctx.run_args()], ["bare.ckpt", "state_dict"]


def _resume_other_recipe(ctx: Ctx) -> tuple[list[str], list[str]]:
    # the checkpoint's own tracking store, so that only the weights are wrong
    argv = ["fit", str(OTHER), *SMALL, "--resume-from", str(ctx.trained["ckpt"]), "--tracking-uri", ctx.trained["uri"],
            *ctx.run_args()]
    return argv, ["does not fit recipe", "heatmap_rec.yaml", "'pixel2seq_rec'", "resume with the recipe"]


def _annotation_file(name: str, text: str, says: list[str]) -> Callable[[Ctx], tuple[list[str], list[str]]]:
    def make(ctx: Ctx) -> tuple[list[str], list[str]]:
        node = ctx.coco(annotation_file=str(ctx.write(name, text)))
        return ["validate", str(DET), *SMALL, node, *ctx.run_args()], says

    return make


def _coco_missing_field(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.edit_instances(lambda d: d["images"][1].pop("file_name"))
    return ["validate", str(DET), *SMALL, ctx.coco(), *ctx.run_args()], ["instances.json images[1]", "'file_name'"]


def _coco_bad_bbox(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.edit_instances(lambda d: d["annotations"][2].update(bbox=[10, 10, -4, 5]))
    return ["validate", str(DET), *SMALL, ctx.coco(), *ctx.run_args()], [
        "instances.json annotation 3", "degenerate bbox", "on_bad_sample: skip"]


def _coco_bbox_type(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.edit_instances(lambda d: d["annotations"][0].update(bbox="10 10 4 5"))
    return ["fit", str(DET), *SMALL, ctx.coco("train"), *ctx.run_args()], ["annotation 1", "bbox must be [x, y, w, h]"]


def _coco_image_missing(ctx: Ctx) -> tuple[list[str], list[str]]:
    (ctx.files["image_dir"] / "000001.png").unlink()
    return ["fit", str(DET), *SMALL, ctx.coco("train"), *ctx.run_args()], [
        "000001.png", "image 2 of", "image file not found", "image_dir"]


def _coco_image_corrupt(ctx: Ctx) -> tuple[list[str], list[str]]:
    (ctx.files["image_dir"] / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return ["predict", str(DET), *SMALL, ctx.coco("predict"), *ctx.run_args()], [
        "000000.png", "image 1 of", "cannot read image", "data.on_bad_sample=skip"]


def _coco_image_corrupt_worker(ctx: Ctx) -> tuple[list[str], list[str]]:
    (ctx.files["image_dir"] / "000001.png").write_bytes(os.urandom(64))
    argv = ["validate", str(DET), *SMALL, "data.num_workers=1", ctx.coco(), *ctx.run_args()]
    return argv, ["000001.png", "cannot read image"]


def _coco_image_size(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.edit_instances(lambda d: d["images"][0].update(height=65))
    return ["test", str(DET), *SMALL, ctx.coco("test"), *ctx.run_args()], ["000000.png", "differs from the annotation"]


def _refs_missing_sentences(ctx: Ctx) -> tuple[list[str], list[str]]:
    refs = pickle.loads(ctx.files["refs"].read_bytes())
    refs[1]["sentences"] = []
    ctx.files["refs"].write_bytes(pickle.dumps(refs))
    return ["validate", str(REC), *SMALL, ctx.refcoco(), *ctx.run_args()], [
        f"ref {refs[1]['ref_id']}", "'sentences'", "on_bad_sample"]


def _refs_missing_ann_id(ctx: Ctx) -> tuple[list[str], list[str]]:
    refs = pickle.loads(ctx.files["refs"].read_bytes())
    del refs[0]["ann_id"]
    ctx.files["refs"].write_bytes(pickle.dumps(refs))
    return ["validate", str(REC), *SMALL, ctx.refcoco(), *ctx.run_args()], [f"ref {refs[0]['ref_id']}", "'ann_id'"]


def _refs_not_pickle(ctx: Ctx) -> tuple[list[str], list[str]]:
    ctx.files["refs"].write_bytes(os.urandom(100))
    return ["validate", str(REC), *SMALL, ctx.refcoco(), *ctx.run_args()], ["refs(shapes).p", "not a readable REFER"]


STUDY = """\
# a study for the hardening tests
study:
  name: hardening
  recipe: RECIPES/shapes/{paradigm}_{task}.yaml
  grid:
    paradigm: [pixel2seq]
    task: [rec]
  fixed:
    - data.train.size=4
"""


def _study(body: str, says: list[str], *extra: str) -> Callable[[Ctx], tuple[list[str], list[str]]]:
    def make(ctx: Ctx) -> tuple[list[str], list[str]]:
        path = ctx.study(body)
        return ["study", *extra, str(path), *ctx.run_args()], ["s.yaml", *says]

    return make


def _study_report_first(ctx: Ctx) -> tuple[list[str], list[str]]:
    path = ctx.study(STUDY)
    return ["study", "report", str(path), *ctx.run_args()], ["no runs of study 'hardening'", "run `vlzoo study"]


def _study_report_other_store(ctx: Ctx) -> tuple[list[str], list[str]]:
    path = ctx.study(STUDY)
    ctx.seed_store()  # a store, but without this study's runs
    return ["study", "report", str(path), *ctx.run_args()], ["study-hardening", "run `vlzoo study", "--output-dir"]


CASES = {
    # --- recipes: YAML, keys, types, files -----------------------------------------------
    "yaml-malformed": Case(lambda c: (["check", str(c.write("r.yaml", "data: [1, 2\nseed: 3\n"))], ["r.yaml", "not valid YAML"])),
    "yaml-not-a-mapping": Case(lambda c: (["print", str(c.write("r.yaml", "- a\n- b\n"))], ["r.yaml", "must be a mapping"])),
    "recipe-missing": Case(lambda c: (["fit", str(c.tmp / "nope.yaml"), *c.run_args()], ["nope.yaml", "not found", "vlzoo recipes"])),
    "base-missing": Case(lambda c: (["check", str(c.write("r.yaml", "_base_: gone.yaml\n"))], ["_base_", "gone.yaml", "does not exist"])),
    "base-cycle": Case(_base_cycle),
    "unknown-top-key": Case(lambda c: (["check", str(_recipe_file(c, "trainr: {max_steps: 3}\n"))],
                                       ["trainr", "r.yaml", "Did you mean trainer?"])),
    "unknown-parameter": Case(lambda c: (["fit", str(REC), "paradigm.max_new_tokenz=3", *c.run_args()],
                                         ["paradigm.max_new_tokenz", "Did you mean max_new_tokens?"])),
    "slot-not-a-mapping": Case(lambda c: (["check", str(_recipe_file(c, "paradigm: 5\n"))], ["paradigm", "r.yaml", "_target_"])),
    "wrong-type-in-file": Case(lambda c: (["fit", str(_recipe_file(c, "data: {batch_size: many}\n")), *c.run_args()],
                                          ["data.batch_size", "r.yaml", "an integer", "'many'"])),
    "wrong-type-override": Case(lambda c: (["fit", str(REC), *SMALL, "trainer.max_steps=ten", *c.run_args()],
                                           ["trainer.max_steps", "override trainer.max_steps=ten", "an integer"])),
    "wrong-type-bool": Case(lambda c: (["validate", str(REC), "data.val.compositional=sometimes", *c.run_args()],
                                       ["data.val.compositional", "true or false"])),
    "wrong-type-number": Case(lambda c: (["fit", str(REC), "optimizer.lr=fast", *c.run_args()], ["optimizer.lr", "a number"])),
    "wrong-type-list": Case(lambda c: (["test", str(REC), "data.test.size=[3]", *c.run_args()], ["data.test.size", "list"])),
    "wrong-choice": Case(lambda c: (["fit", str(REC), "trainer.precision=33", *c.run_args()], ["trainer.precision", "'bf16-mixed'"])),
    "wrong-type-seed": Case(lambda c: (["fit", str(REC), "seed=abc", *c.run_args()], ["seed", "integer"])),
    "bad-value-rejected-by-component": Case(lambda c: (["fit", str(REC), *SMALL, "data.resize=zoom", *c.run_args()],
                                                       ["recipe key data.resize", "resize must be one of"])),
    "endless-run-with-a-schedule": Case(lambda c: (["fit", str(REC), *SMALL, "trainer.max_steps=-1", "trainer.max_epochs=-1",
                                                    *c.run_args()], ["recipe key scheduler", "trainer.max_steps", "-1"]),
                                        tracked=True),
    "bad-value-rejected-by-trainer": Case(lambda c: (["fit", str(REC), *SMALL, "trainer.max_steps=-5", *c.run_args()],
                                                     ["max_steps", "-5"]), tracked=True),
    "no-predict-dataset": Case(lambda c: (["predict", str(REC), *SMALL, *c.run_args()],
                                          ["key data.predict", "'data.predict="])),
    "no-test-dataset": Case(lambda c: (["test", str(REC), *SMALL, "data.test=null", *c.run_args()],
                                       ["key data.test", "'data.test="])),
    "data-size-negative": Case(lambda c: (["fit", str(REC), *SMALL, "data.train.size=-1", *c.run_args()],
                                          ["recipe key data.train.size", "override data.train.size=-1", "at least 1",
                                           "got -1"])),
    "data-size-zero": Case(lambda c: (["check", str(REC), "data.train.size=0"],
                                      ["recipe key data.train.size", "at least 1", "got 0", "data.train=null"])),
    "data-size-zero-in-named-split": Case(lambda c: (["validate", str(REC), "data.val=null", "data.val.easy={"
                                                      "_target_: vlzoo.data.ShapesDataset, split: val, size: 0}",
                                                      *c.run_args()], ["data.val.easy.size", "at least 1"])),
    "data-batch-size-zero": Case(lambda c: (["test", str(REC), "data.eval_batch_size=0", *c.run_args()],
                                            ["recipe key data.eval_batch_size", "at least 1"])),
    "data-workers-negative": Case(lambda c: (["fit", str(REC), "data.num_workers=-2", *c.run_args()],
                                             ["recipe key data.num_workers", "at least 0"])),
    "val-interval-longer-than-counted-epoch": Case(lambda c: (
        ["fit", str(REC), *SMALL, "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=1", *c.run_args()],
        ["recipe key trainer.val_check_interval (3", "gets 1 training batches per epoch",
         "trainer.check_val_every_n_epoch (1", "Leave check_val_every_n_epoch out"]), tracked=True),
    "missing-weights-file": Case(lambda c: (["fit", str(REC), f"backbone.checkpoint={c.tmp / 'base.pt'}", *c.run_args()],
                                            ["recipe key backbone.checkpoint", "base.pt", "does not exist"])),
    "run-checkpoint-as-backbone-file": Case(lambda c: (
        ["fit", str(REC), *SMALL, f"backbone.checkpoint={c.trained['ckpt']}", *c.run_args()],
        ["recipe key backbone.checkpoint", "not a backbone file", f"vlzoo export {c.trained['ckpt']} backbone.pt --backbone"])),
    # --- targets ------------------------------------------------------------------------
    "target-denied-in-file": Case(_evil_target),
    "target-denied-override": Case(lambda c: (["check", str(REC), "trainer._target_=torch.load"], ["torch.load is not allowed"])),
    "target-through-allowed-module": Case(lambda c: (["check", str(REC), "trainer._target_=vlzoo.tracking.os.system"],
                                                     ["vlzoo.tracking.os.system", "not allowed"])),
    "target-not-importable": Case(lambda c: (["check", str(REC), "paradigm._target_=vlzoo.paradigms.Pixel2Sek"],
                                             ["paradigm._target_", "has no attribute Pixel2Sek", "Did you mean"])),
    "target-not-dotted": Case(lambda c: (["check", str(REC), "paradigm._target_=not a path"], ["not a dotted import path"])),
    # --- overrides ----------------------------------------------------------------------
    "override-no-equals": Case(lambda c: (["check", str(REC), "trainer.max_steps"], ["trainer.max_steps", "key=value"])),
    "override-bad-key": Case(lambda c: (["check", str(REC), "trainer..max_steps=3"], ["is not a key path"])),
    "override-bad-yaml": Case(lambda c: (["check", str(REC), "data.train.tasks=[rec,"], ["override data.train.tasks", "not valid YAML"])),
    "override-unknown-slot-file": Case(lambda c: (["check", str(REC), "trainer=smok"], ["trainer/smok.yaml", "Did you mean smoke?"])),
    "override-unknown-top-key": Case(lambda c: (["fit", str(REC), "trainr.max_steps=3", *c.run_args()], ["trainr", "Did you mean trainer?"])),
    "override-into-scalar": Case(lambda c: (["check", str(REC), "seed.value=3"], ["seed.value=3", "seed is not a mapping"])),
    "override-braces-not-yaml": Case(lambda c: (["check", str(REC), "data.train.template={a"],
                                            ["override data.train.template={a", "not valid YAML",
                                             "quote it", "'data.train.template=\"{a\"'"])),
    "override-bad-interpolation": Case(lambda c: (["check", str(REC), "data.batch_size=${nowhere}"], ["data.batch_size", "interpolation"])),
    # --- checkpoints --------------------------------------------------------------------
    "ckpt-missing": Case(lambda c: (["validate", str(REC), "--checkpoint", str(c.tmp / "gone.ckpt"), *c.run_args()],
                                    ["gone.ckpt", "does not exist"])),
    "ckpt-truncated": Case(_truncated),
    "ckpt-random-bytes": Case(lambda c: (["predict", str(REC), "--checkpoint", str(c.write("noise.ckpt", os.urandom(4096))),
                                          *c.run_args()], ["noise.ckpt", "cannot be loaded"])),
    "ckpt-random-bytes-no-recipe": Case(lambda c: (["predict", "--checkpoint", str(c.write("noise.ckpt", os.urandom(4096))),
                                                    *c.run_args()], ["noise.ckpt", "cannot be loaded"])),
    "ckpt-foreign-torch-file": Case(_foreign_torch),
    "ckpt-pickled-objects": Case(_pickled_object),
    "ckpt-recipe-without-weights": Case(_recipe_in_ckpt_only),
    "ckpt-of-another-recipe": Case(lambda c: (["validate", str(OTHER), *SMALL, "--checkpoint", str(c.trained["ckpt"]),
                                               *c.run_args()],
                                              ["does not fit recipe", "heatmap_rec.yaml", "not in the checkpoint",
                                               "leave RECIPE out"])),
    "ckpt-of-another-size": Case(lambda c: (["test", str(REC), *SMALL, "backbone.language.config.intermediate_size=96",
                                             "--checkpoint", str(c.trained["ckpt"]), *c.run_args()],
                                            ["does not fit recipe", "differ in shape", "in the checkpoint"])),
    "resume-from-another-recipe": Case(_resume_other_recipe),
    "resume-from-another-store": Case(lambda c: (["fit", str(REC), *SMALL, "--resume-from", str(c.trained["ckpt"]),
                                                  *c.run_args()], ["not in the tracking store", "--output-dir"])),
    "resume-from-random-bytes": Case(lambda c: (["fit", str(REC), "--resume-from", str(c.write("x.ckpt", os.urandom(999))),
                                                 *c.run_args()], ["x.ckpt", "cannot be loaded"])),
    "resume-nothing-to-resume": Case(lambda c: (["fit", str(REC), "--resume", *c.run_args()], ["--resume", "no"])),
    # --- data: COCO / RefCOCO files, images ---------------------------------------------
    "coco-annotation-file-missing": Case(lambda c: (["validate", str(DET), *SMALL, c.coco(annotation_file=str(c.tmp / "no.json")),
                                                     *c.run_args()], ["no.json", "annotation file not found"])),
    "coco-malformed-json": Case(_annotation_file("cut.json", '{"images": [', ["cut.json", "malformed JSON"])),
    "coco-not-coco": Case(_annotation_file("x.json", '{"images": []}', ["x.json", "not a COCO file"])),
    "coco-missing-field": Case(_coco_missing_field),
    "coco-bad-bbox": Case(_coco_bad_bbox),
    "coco-bbox-not-a-list": Case(_coco_bbox_type),
    "coco-image-missing": Case(_coco_image_missing, tracked=True),
    "coco-image-corrupt": Case(_coco_image_corrupt, tracked=True),
    "coco-image-corrupt-in-worker": Case(_coco_image_corrupt_worker, tracked=True),
    "coco-image-size-mismatch": Case(_coco_image_size, tracked=True),
    "refcoco-missing-sentences": Case(_refs_missing_sentences),
    "refcoco-missing-ann-id": Case(_refs_missing_ann_id),
    "refcoco-refs-not-a-pickle": Case(_refs_not_pickle),
    "refcoco-refs-missing": Case(lambda c: (["validate", str(REC), *SMALL, c.refcoco(refs_file=str(c.tmp / "refs(unc).p")),
                                             *c.run_args()], ["refs(unc).p", "refs file not found"])),
    # --- study files --------------------------------------------------------------------
    "study-missing": Case(lambda c: (["study", str(c.tmp / "s.yaml"), *c.run_args()], ["s.yaml", "does not exist"])),
    "study-malformed-yaml": Case(_study("study: {name: [x\n", ["not valid YAML"])),
    "study-unknown-key": Case(_study(STUDY + "  grd: {a: [1]}\n", ["study.grd", "unknown key"])),
    "study-grid-not-a-list": Case(_study(STUDY.replace("task: [rec]", "task: rec"), ["study.grid.task", "non-empty list"])),
    "study-budget-wrong-type": Case(_study(STUDY + "  budget: 300\n", ["study.budget", "mapping"])),
    "study-budget-bad-value": Case(_study(STUDY + "  budget: {steps: many}\n", ["study.budget.steps", "positive integer"])),
    "study-primary-wrong-type": Case(_study(STUDY + "  primary: [acc_0.5]\n", ["study.primary", "mapping"])),
    "study-unknown-placeholder": Case(_study(STUDY.replace("{task}.yaml", "{tsk}.yaml"), ["study.recipe", "{tsk}"])),
    "study-fixed-unknown-key": Case(_study(STUDY + "    - data.batch_sise=3\n", ["cell 0", "data.batch_sise", "Did you mean batch_size?"])),
    "study-fixed-bad-value": Case(_study(STUDY + "    - data.batch_size=abc\n", ["cell 0", "data.batch_size", "an integer"])),
    "study-fixed-not-an-override": Case(_study(STUDY + "    - data.batch_size\n", ["study.fixed", "key=value"])),
    "study-grid-unknown-slot-file": Case(_study(STUDY.replace("task: [rec]", "task: [rec]\n    trainer: [smok]"),
                                                ["cell 0", "trainer/smok.yaml", "Did you mean smoke?"])),
    "study-grid-bad-override-value": Case(_study(STUDY.replace("task: [rec]", "task: [rec]\n    trainer.max_steps: [5, lots]"),
                                                 ["cell 1", "trainer.max_steps", "'lots'"])),
    "study-no-runnable-cell": Case(_study(STUDY.replace("paradigm: [pixel2seq]", "paradigm: [pixel3seq]"),
                                          ["none of its 1 cells can run", "pixel3seq_rec.yaml", "study.recipe"])),
    "study-stage0-missing": Case(_study(STUDY + "  stage0: nowhere.yaml\n", ["study.stage0", "nowhere.yaml"])),
    "study-stage0-bad-override": Case(_study(STUDY + "  stage0: RECIPES/shapes/base_lmm.yaml\n"
                                             "  stage0_overrides: [trainer.max_step=3]\n",
                                             ["study.stage0", "trainer.max_step", "Did you mean max_steps?"])),
    "study-prepare-checks-too": Case(_study(STUDY + "    - data.batch_size=abc\n", ["cell 0", "data.batch_size"], "--prepare")),
    "study-report-before-any-run": Case(_study_report_first),
    "study-report-from-another-store": Case(_study_report_other_store),
    "study-usage": Case(lambda c: (["study", "one.yaml", "two.yaml", *c.run_args()], ["usage: vlzoo study"])),
}


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------
def _error_paragraph(err: str, verb: str) -> str:
    """The error vlzoo printed (between ``vlzoo VERB: error:`` and the --debug hint)."""
    assert "Traceback" not in err, err
    found = re.findall(rf"vlzoo {verb}: error: (.*?)\n\(run again with --debug for the full traceback\)", err, re.S)
    assert len(found) == 1, err
    paragraph = found[0]
    assert paragraph.strip() and "\n\n" not in paragraph and "\n \n" not in paragraph, paragraph
    return paragraph


def _runs(out: Path) -> list:
    if not (out / "mlflow.db").is_file():
        return []
    client = MlflowClient(tracking_uri=tracking_uri_for(out))
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _assert_nothing_complete(out: Path, *, tracked: bool) -> None:
    if not tracked:
        # refused before anything was built: at most the (empty) tracking store was opened
        assert not out.exists() or {p.name for p in out.iterdir()} <= {"mlflow.db"}, sorted(out.iterdir())
        assert _runs(out) == []
        return
    assert not list(out.rglob("*.ckpt")), list(out.rglob("*.ckpt"))
    assert not list(out.rglob("predictions.json")) and not list(out.rglob(".*.tmp*"))
    assert not (out / "report").exists()
    # a run this command opened is marked failed: neither finished nor left running
    assert [r.info.status for r in _runs(out) if r.info.status != "FAILED"] == []
    assert not [r for r in _runs(out) if r.data.tags.get("vlzoo.cell_status") == "finished"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_paragraph(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "1")
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory either
    case = CASES[name]
    ctx = Ctx(tmp_path, request)
    argv, says = case.make(ctx)
    if argv[0] in RUN_VERBS:
        ctx.seed_store()
    capsys.readouterr()
    assert main(argv) == 2
    paragraph = _error_paragraph(capsys.readouterr().err, argv[0])
    for words in says:
        assert words in paragraph, f"{words!r} not in: {paragraph}"
    _assert_nothing_complete(ctx.out, tracked=case.tracked)
    for name in ("hacked", "mlflow.db", "mlruns", "checkpoints", "studies", "predictions.json"):
        assert not (tmp_path / name).exists(), name  # nothing lands in the working directory either


@pytest.mark.parametrize(
    "name",
    ["yaml-malformed", "wrong-type-override", "target-denied-override", "ckpt-random-bytes", "study-fixed-bad-value",
     "coco-bad-bbox"],
)
def test_debug_shows_the_traceback(name: str, tmp_path: Path, request: pytest.FixtureRequest,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, request)
    argv, says = CASES[name].make(ctx)
    if argv[0] in RUN_VERBS:
        ctx.seed_store()
    with pytest.raises(USER_ERRORS) as caught:
        main([*argv, "--debug"])
    assert says[-1] in str(caught.value) or says[-1] in str(caught.value.__cause__)


def test_resume_from_another_recipe_leaves_the_original_run_alone(trained: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    # (the command's own store is the checkpoint's: --tracking-uri)
    client = MlflowClient(tracking_uri=trained["uri"])
    run_id = torch.load(trained["ckpt"], weights_only=True)["vlzoo_mlflow_run_id"]
    before = client.get_run(run_id).info.status
    assert main(["fit", str(OTHER), *SMALL, "--resume-from", str(trained["ckpt"]), "--tracking-uri", trained["uri"],
                 "--output-dir", str(tmp_path)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert client.get_run(run_id).info.status == before == "FINISHED"
    assert sorted(p.name for p in trained["ckpt"].parent.iterdir()) == sorted(["last.ckpt", *[
        p.name for p in trained["ckpt"].parent.glob("best-*.ckpt")]])


@pytest.mark.parametrize("verb", ["validate", "test", "predict"])
def test_a_refused_checkpoint_leaves_no_run(verb: str, trained: dict, tmp_path: Path, empty_store: Path) -> None:
    # the weights are checked against the built model before the logger opens a run
    _seed_store(tmp_path, empty_store)
    assert main([verb, str(OTHER), *SMALL, "--checkpoint", str(trained["ckpt"]), "--output-dir", str(tmp_path)]) == 2
    assert _runs(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_genuine_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import vlzoo.cli as cli

    def broken(args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_check", broken)
    with pytest.raises(KeyError):
        main(["check", str(REC)])

    def wrapped(args: object) -> int:
        try:
            raise DataError("images/7.png (image 7): cannot read image")
        except DataError as err:
            raise RuntimeError("loader failed") from err

    monkeypatch.setattr(cli, "_cmd_check", wrapped)
    assert main(["check", str(REC)]) == 2  # an explicit cause that is a user error is reported as one
    assert "images/7.png (image 7)" in _error_paragraph(capsys.readouterr().err, "check")


def test_parser_mistakes_exit_2(capsys: pytest.CaptureFixture) -> None:
    for argv in (["fit", str(REC), "--frobnicate"], ["nonsense"], ["study", "s.yaml", "--jobs", "many"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


def test_module_entry_point_exit_status_and_debug(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    env = {**os.environ, "CI": "1"}
    quiet = subprocess.run([sys.executable, "-m", "vlzoo.cli", "check", str(bad)], capture_output=True, text=True,
                           env=env, check=False)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert "bad.yaml: not valid YAML" in _error_paragraph(quiet.stderr, "check")
    loud = subprocess.run([sys.executable, "-m", "vlzoo.cli", "check", str(bad), "--debug"], capture_output=True,
                          text=True, env=env, check=False)
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr and "RecipeError" in loud.stderr


# ------------------------------------------------------------------------------------------
# the command line tried by hand (issue 16): options, validation schedule, Ctrl-C, split tables
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "flag", "nearest"), [
    (["test", str(REC), "--ckpt", "x.ckpt"], "--ckpt", "--checkpoint"),
    (["predict", "--ckpt=x.ckpt"], "--ckpt", "--checkpoint"),
    (["fit", str(REC), "--ckpt", "x.ckpt"], "--ckpt", "--resume-from"),  # what fit calls a checkpoint to continue
    (["validate", str(REC), "--traking-uri", "http://x"], "--traking-uri", "--tracking-uri"),
    (["study", "s.yaml", "--no-reprot"], "--no-reprot", "--no-report"),
])
def test_an_unknown_option_is_named_with_the_nearest(argv: list[str], flag: str, nearest: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown option {flag}. Did you mean {nearest}?" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing ran: the option was not taken for an override


def test_an_unknown_option_without_a_near_one_lists_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["check", str(REC), "--frobnicate"])
    err = capsys.readouterr().err
    assert "unknown option --frobnicate. The options of `vlzoo check` are: --allow-target, --debug, --dry-run, --help, --memory" in err


def test_shapes_dataset_refuses_an_empty_size() -> None:
    for size in (0, -1):
        with pytest.raises(ValueError, match="size must be at least 1"):
            ShapesDataset(split="train", size=size)


SHAPES_RECIPES = sorted((RECIPES / "shapes").glob("*.yaml"))
DDP_OVERRIDES = {"documented": ["trainer.devices=2", "trainer.strategy=ddp"], "ddp_cpu": ["trainer=ddp_cpu"]}


@pytest.mark.parametrize("how", list(DDP_OVERRIDES))
@pytest.mark.parametrize("path", SHAPES_RECIPES, ids=[p.stem for p in SHAPES_RECIPES])
def test_ddp_overrides_validate_by_step_on_every_shapes_recipe(path: Path, how: str) -> None:
    """The trainer each shipped Shapes recipe gets with the documented DDP overrides counts its
    validation interval across epochs, so an epoch shorter than the interval once it is split
    over the processes is no error (Lightning's fit-time check, fit_loop.setup_data, only
    applies when check_val_every_n_epoch is set).  Checked without building the model."""
    import lightning as L

    from vlzoo.build import step_based_validation
    from vlzoo.config import instantiate, load_recipe, validate

    recipe = load_recipe(path, DDP_OVERRIDES[how])
    validate(recipe)
    node = step_based_validation(dict(recipe.slot("trainer")))
    trainer = instantiate({**node, "logger": False, "enable_checkpointing": False}, allow=recipe.allowed_prefixes)
    assert isinstance(trainer, L.Trainer) and trainer.world_size == 2
    interval = recipe.get("trainer.val_check_interval")
    if isinstance(interval, int):
        assert trainer.check_val_every_n_epoch is None and trainer.val_check_interval == interval
        train = recipe.get("data.train.size")
        if path.stem == "heatmap_rec":  # the case of the issue: 20,000 / 32 / 2 = 313 batches per process < 500
            assert math.ceil(train / recipe.get("data.batch_size") / 2) == 313 < interval
    else:
        assert trainer.check_val_every_n_epoch == 1


def test_a_recipe_that_counts_validation_in_epochs_keeps_it() -> None:
    from vlzoo.build import step_based_validation

    kept = {"_target_": "lightning.Trainer", "val_check_interval": 50, "check_val_every_n_epoch": 2}
    assert step_based_validation(kept) == kept
    assert "check_val_every_n_epoch" not in step_based_validation({"_target_": "x", "val_check_interval": 0.5})


def _run_cli(args: list[str], cwd: Path, *, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlzoo.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"vlzoo {args[0]} did not finish within {timeout} s; last output:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_with_an_interval_longer_than_the_epoch_of_a_process(tmp_path: Path) -> None:
    """The documented overrides on a shipped recipe, 2 CPU processes (gloo): 8 samples in
    batches of 2 are 2 batches per process per epoch; validating every 3 batches across epochs
    validates at steps 3 and 6 of a 6-step run."""
    recipe = RECIPES / "shapes" / "heatmap_rec.yaml"
    args = ["fit", str(recipe), "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
            "data.train.size=8", "data.batch_size=2", "data.val.size=2", "data.test.size=2",
            "data.eval_batch_size=2", "--output-dir", str(tmp_path / "out")]
    done = _run_cli(args, tmp_path)
    assert done.returncode == 0, done.stdout[-5000:]
    assert "Traceback" not in done.stdout
    client = MlflowClient(tracking_uri=tracking_uri_for(tmp_path / "out"))
    (run,) = _runs(tmp_path / "out")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [2, 5]  # after batches 3, 6
    assert (Path(run.data.tags["vlzoo.checkpoint_dir"]) / "last.ckpt").is_file()


_PRISTINE_ENV = dict(os.environ)


def _default_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fit_until_interrupted(out: Path, *extra: str) -> tuple[int, str]:
    """Start a long tiny fit in a subprocess, send it SIGINT (Ctrl-C) once it trains - after its
    first checkpoint when ``checkpoint.every_n_train_steps`` is given - and return its exit
    status and output."""
    import threading
    import time

    args = [sys.executable, "-m", "vlzoo.cli", "fit", str(REC), *SMALL, "trainer.max_steps=100000",
            "trainer.max_epochs=-1", "trainer.val_check_interval=100000", *extra, "--output-dir", str(out)]
    # the child is what a user's terminal starts: the environment as this module found it (not what
    # earlier in-process tests left in os.environ), SIGINT at its default and not blocked
    env = {**_PRISTINE_ENV, "OMP_NUM_THREADS": "1", "CI": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    try:
        while not any("trainable of" in line for line in lines):  # on_fit_start: training begins
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        while extra and not list(out.rglob("last.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            reader.join(timeout=10)
            raise AssertionError("the run did not end within 240 s of Ctrl-C; its output:\n" + "".join(lines)[-4000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


def _no_traceback_of_ours(out: str) -> None:
    """vlzoo's message is the last word and no traceback is printed - except one case seen once
    in many runs on a loaded machine: Ctrl-C landing inside an SQLite write of MLflow makes
    sqlite3 fail the query as "interrupted", and SQLAlchemy's OperationalError (its error page
    sqlalche.me/e/<version>/e3q8) is printed before vlzoo's message."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].startswith("vlzoo fit: interrupted (Ctrl-C)"), out[-3000:]
    assert "Traceback" not in out or ("/e3q8" in out and "sqlalche.me/e/" in out), out[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path: Path) -> None:
    status, out = _fit_until_interrupted(tmp_path / "out")
    assert status == 130, out[-3000:]
    assert "vlzoo fit: interrupted (Ctrl-C) at global step" in out
    assert "nothing was saved" in out and "checkpoint.every_n_train_steps=N" in out
    _no_traceback_of_ours(out)
    assert not list((tmp_path / "out").rglob("*.ckpt"))
    assert [r.info.status for r in _runs(tmp_path / "out")] == ["KILLED"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_after_a_checkpoint_says_how_to_resume(tmp_path: Path) -> None:
    status, out = _fit_until_interrupted(tmp_path / "out", "checkpoint.every_n_train_steps=2")
    assert status == 130, out[-3000:]
    (last,) = (tmp_path / "out").rglob("last.ckpt")
    found = re.search(r"the last checkpoint is (\S+) \(step (\d+)\); continue the run with: (vlzoo fit .*--resume-from "
                      r"\S+)", out)
    assert found, out[-3000:]
    assert Path(found[1]) == last
    _no_traceback_of_ours(out)
    step = int(found[2])
    assert step == torch.load(last, weights_only=True)["global_step"] and step % 2 == 0
    (run,) = _runs(tmp_path / "out")
    assert run.info.status == "KILLED"
    # the command it gives continues the same run (two more steps)
    again = found[3].split()[2:]
    assert again[-2:] == ["--resume-from", str(last)]
    assert main(["fit", *again[:-4], f"trainer.max_steps={step + 2}", *again[-4:]]) == 0
    (resumed,) = _runs(tmp_path / "out")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


def test_split_results_keep_each_split_in_its_own_column() -> None:
    from vlzoo.terminal import evaluation_table, split_results

    # what Trainer.test returns for two dataloaders: every epoch-end metric in both mappings
    logged = {"testA/rec/acc_0.5": 0.75, "testB/rec/acc_0.5": 0.25, "epoch": 3.0}
    results = [{**logged, "testA/loss": 1.5, "own/dataloader_idx_0": 7.0},
               {**logged, "testB/loss": 2.5, "own/dataloader_idx_1": 8.0}]
    assert split_results(results, ["testA", "testB"]) == {
        "testA": {"rec/acc_0.5": 0.75, "loss": 1.5, "epoch": 3.0, "own": 7.0},
        "testB": {"rec/acc_0.5": 0.25, "loss": 2.5, "epoch": 3.0, "own": 8.0},
    }
    table = evaluation_table(results, ["testA", "testB"], "test")
    assert re.search(r"rec/acc_0\.5\s+0\.75\s+0\.25\n", table) and "testA/" not in table, table


def test_refcoco_test_table_lists_each_split_under_its_own_dataloader(
    trained: dict, tmp_path: Path, empty_store: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CI", "1")
    splits = {}
    for name, size, seed in (("testA", 3, 1), ("testB", 2, 2)):
        ds = ShapesDataset(split="val", size=size, image_size=64, num_objects=(2, 2), seed=seed)
        files = export_shapes_coco(ds, tmp_path / name, refs_split=name)
        splits[name] = {"_target_": "vlzoo.data.RefCocoDataset", "refs_file": str(files["refs"]),
                        "instances_file": str(files["instances"]), "image_dir": str(files["image_dir"]),
                        "split": name, "tasks": ["rec"]}
    out = tmp_path / "out"
    _seed_store(out, empty_store)
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(trained["ckpt"]), *SMALL, "data.test=null",
                 f"data.test={json.dumps(splits)}", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    header = re.search(r"^test metric\s+testA\s+testB$", printed, re.M)
    assert header, printed
    (run,) = _runs(out)
    rows = {}
    for line in printed[header.end():].strip().splitlines():
        if line.startswith("---"):
            if rows:
                break
            continue
        metric, a, b = line.split()
        rows[metric] = (float(a), float(b))
    assert "loss" in rows and "rec/acc_0.5" in rows and not [m for m in rows if m.startswith("test")]
    logged = run.data.metrics
    for metric, (a, b) in rows.items():
        assert a == pytest.approx(logged[f"testA/{metric}"], rel=1e-5)
        assert b == pytest.approx(logged[f"testB/{metric}"], rel=1e-5)
    assert logged["testA/loss"] != logged["testB/loss"]  # the columns could not agree by chance


def test_ctrl_c_outside_training_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import vlzoo.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    for verb, name, says in (("check", "_cmd_check", "before training or evaluation started; nothing was saved"),
                             ("study", "_cmd_study", "finished cells are kept, run the same command again")):
        monkeypatch.setattr(cli, name, interrupted)
        assert main([verb, str(REC)]) == 130
        err = capsys.readouterr().err
        assert err.startswith(f"vlzoo {verb}: interrupted (Ctrl-C)") and says in err and "Traceback" not in err

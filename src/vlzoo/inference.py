"""Use a trained model on your own images: ``vlzoo.load(path)`` and ``vlzoo infer``.

``load`` takes a ``vlzoo fit`` checkpoint (``last.ckpt``, ``best-*.ckpt``) or a folder written by
``vlzoo export`` (:mod:`vlzoo.export`) and returns a :class:`TrainedModel`: call it with an image
(a path, a PIL image, an ``(H, W, 3)`` array or a ``(3, H, W)`` uint8 tensor), an expression and a
task, and it answers with :class:`~vlzoo.structures.Predictions` in the pixels of that image.

The image goes through the transform and the collate of the recipe's own datamodule (built from
its ``data`` slot without its datasets), and the model through the ``predict_step`` that
``vlzoo predict`` runs, so one image answered here and the same sample answered by ``vlzoo
predict`` agree.  How the instruction is written from the expression is the datasets' one
(:func:`vlzoo.data.templates.instruction`, its first phrasing): ``rec`` "where is {expr}?",
``res`` "segment {expr}.", ``det`` "detect every {category}." ...; ``prompt=`` gives the
instruction verbatim instead.

A model whose backbone has a reference encoder (``backbone.references``, :mod:`vlzoo.backbones.references`)
is asked about a *reference* in place of the expression: a spoken clip (``audio=``: a WAV file or
``(samples, rate)``) or a region of the image as a crop / box reference (``reference_box=``).  The
instruction is the task's with the reference span :func:`~vlzoo.structures.reference_text` where
the expression goes ("segment <ref_start><ref_audio> x k<ref_end>."), as Spoken Shapes writes it,
so the sample is the one a dataset gives.  A model without that modality refuses it, naming what
it takes.
"""

from __future__ import annotations

import copy
import glob
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlzoo.config import Recipe, RecipeError, check_trust, recipe_from_dict
from vlzoo.structures import CATEGORY_TASKS, ImageTransform, Predictions, Sample, Targets, reference_text

__all__ = [
    "TrainedModel",
    "load",
    "read_image",
    "image_files",
    "predictions_to_json",
    "read_export",
    "run_infer",
    "json_text",
    "CATEGORY_TASKS",
    "recipe_categories",
    "REFERRING_TASKS",
    "EXPORT_MANIFEST",
    "WEIGHTS_FILE",
    "RECIPE_FILE",
    "TOKENIZER_DIR",
]

#: Files of a ``vlzoo export`` folder.
EXPORT_MANIFEST = "vlzoo_export.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_DIR = "tokenizer"
#: The dataset slots of a datamodule: left out when only its transform and collate are needed.
DATASET_KEYS = ("train", "val", "test", "predict")
#: The tasks whose instruction names its referent with an expression - which a spoken, crop or
#: box reference can take the place of.
REFERRING_TASKS = ("rec", "res", "grec", "gres")
#: The reference modalities ``reference_box=`` can write.
SPATIAL_REFERENCES = ("crop", "box")


def read_image(image: Any, *, name: str = "image") -> Tensor:
    """``(3, H, W)`` uint8 RGB from a path (any file PIL reads, EXIF orientation honoured), a PIL
    image, an ``(H, W)`` / ``(H, W, 3|4)`` array (uint8, or floats in [0, 1]) or a ``(3, H, W)``
    uint8 tensor."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        from vlzoo.data.images import load_image

        return load_image(image)
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        return torch.from_numpy(np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, Tensor):
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.dtype == torch.uint8:
            return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image.contiguous()
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"{name}: an image array must be uint8 or floats in [0, 1], got {array.dtype}")
            array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"{name}: an image array must be (H, W) or (H, W, 3|4), got shape {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).contiguous()
    raise TypeError(
        f"{name}: expected a file path, a PIL image, an (H, W, 3) array or a (3, H, W) uint8 tensor, "
        f"got {type(image).__name__}"
    )


def image_files(spec: str | Path) -> list[Path]:
    """The images ``spec`` names: one file, every image file of a directory (sorted), or the
    files a glob pattern matches.  :class:`RecipeError` when it names none."""
    from PIL import Image

    text = str(spec)
    path = Path(text)
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise RecipeError(f"image folder {path} holds no image file (looked for {', '.join(sorted(extensions)[:8])} ...)")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise RecipeError(f"image pattern {text!r} matches no file")
        return files
    raise RecipeError(f"image {text} does not exist (give an image file, a folder of images or a glob pattern)")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _stored_recipe(data: Mapping[str, Any], allow_targets: Sequence[str], source: str) -> Recipe:
    """A recipe from a checkpoint or an export (not written by the caller): its own
    ``allow_targets`` are trusted only as far as ``allow_targets`` confirms them (``validate``)."""
    return recipe_from_dict(data, allow_targets=list(allow_targets), source=source, trust_own_allow_targets=False)


def _without_datasets(recipe: Recipe, allow_targets: Sequence[str], source: str) -> Recipe:
    """The recipe with the data slot's datasets left out: its transform, template and collate
    stay, and no dataset file is needed."""
    data = copy.deepcopy(recipe.data)
    node = data.get("data")
    if isinstance(node, dict):
        for key in DATASET_KEYS:
            node.pop(key, None)
    return _stored_recipe(data, allow_targets, source)


class TrainedModel:
    """A trained vlzoo model ready to answer about images (what :func:`load` returns).

    Call it: ``model(image, expression, task="rec")`` -> :class:`Predictions` in the image's
    pixels; with lists of images (and optionally of expressions / tasks / boxes) it answers a
    list, in batches of ``batch_size``.

    Attributes:
        model: the paradigm (a LightningModule in eval mode).
        recipe: the recipe it was built from.
        tasks: the tasks the model was trained for; ``tasks[0]`` is the default.
        special_token_ids: the ids of the tokens the paradigm added to the tokenizer.
        source: the checkpoint file or export folder it was loaded from.
    """

    def __init__(self, model: Any, datamodule: Any, recipe: Recipe, *, source: Path, batch_size: int = 8) -> None:
        collate = getattr(datamodule, "collate", None)
        if collate is None or getattr(datamodule, "transform", None) is None:
            raise RecipeError(
                f"{source}: the recipe's data slot ({recipe.get('data._target_')}) has no collate() / transform, "
                "so an image cannot be prepared as in training; use vlzoo.data.VLDataModule"
            )
        self.model = model
        self.datamodule = datamodule
        self.recipe = recipe
        self.source = Path(source)
        self.batch_size = int(batch_size)
        self.collate = collate(require_answers=False)
        self.transform = datamodule.transform
        supported = tuple(getattr(model, "supported_tasks", ()) or ())
        self.tasks: list[str] = list(getattr(model, "tasks", None) or supported)
        self.supported_tasks: tuple[str, ...] = supported or tuple(self.tasks)
        self.special_token_ids: dict[str, int] = dict(getattr(model, "special_token_ids", {}) or {})
        self._categories: dict[str, int] | None = None

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TrainedModel:
        self.model.to(device)
        return self

    def geometry(self, image_size: tuple[int, int]) -> ImageTransform:
        """The map from an image of ``image_size`` ``(H, W)`` to the network input."""
        return self.transform.geometry(tuple(int(v) for v in image_size))

    def instruction(self, expression: str | None, task: str, *, box: Sequence[float] | None = None) -> str:
        """The instruction the datasets write for ``task`` around ``expression`` (in the recipe's
        ``data.instructions`` wording when it gives one for ``task``)."""
        from vlzoo.data.templates import instruction, worded

        table = getattr(self.datamodule, "instructions", None) or {}
        if expression and task not in ("reg", "caption"):
            text = worded(table, task, expr=expression, category=expression)
            if text is not None:
                return text
        if task in ("reg",):
            if box is None:
                raise ValueError("task 'reg' describes a region: give its box (box=[x1, y1, x2, y2], --box x1,y1,x2,y2)")
            return instruction("reg")
        if task == "caption":
            return instruction("caption")
        if not expression:
            what = "a category name" if task in CATEGORY_TASKS else "an expression"
            raise ValueError(f"task '{task}' needs {what} (e.g. 'red circle')")
        if task in CATEGORY_TASKS:
            return instruction(task, category=expression)
        if task in ("rec", "res", "grec", "gres"):
            return instruction(task, expr=expression)
        return expression  # vqa: the expression is the question

    def sample(
        self,
        image: Any,
        expression: str | None = None,
        *,
        task: str | None = None,
        box: Sequence[float] | None = None,
        prompt: str | None = None,
        image_id: int = 0,
        category_id: int | None = None,
        audio: Any = None,
        reference_box: Sequence[float] | None = None,
        reference_kind: str | None = None,
    ) -> Sample:
        """The :class:`Sample` a dataset would give for this image and expression (no targets).

        For det / seg / pose the expression is a category name; its id (the label of the
        predictions) is ``category_id`` when given, else the name's id in :attr:`categories`.

        ``audio`` (a WAV file, ``(samples, rate)`` or an :class:`~vlzoo.structures.AudioClip`) or
        ``reference_box`` (``x1, y1, x2, y2`` in the image's pixels, referred to as a ``crop`` or
        ``box`` reference: ``reference_kind``, default the one the model has) takes the place of
        the expression of a referring task (:data:`REFERRING_TASKS`); the model's backbone must
        have that reference modality."""
        task = task or self.tasks[0]
        if task not in self.tasks:
            raise ValueError(
                f"model {self.name} ({self.source}) does not do task '{task}': it was trained for {self.tasks} "
                "(choose one with --task / task=)"
            )
        pixels = read_image(image)
        h, w = int(pixels.shape[1]), int(pixels.shape[2])
        clip = None
        reference_boxes = torch.zeros(0, 4)
        if audio is not None or reference_box is not None:
            modality = self.reference_modality(audio=audio, reference_box=reference_box, reference_kind=reference_kind)
            text = self._reference_prompt(modality, expression, task, box=box, prompt=prompt)
            if modality == "audio":
                from vlzoo.data.audio_files import read_audio

                clip = read_audio(audio)
            else:
                reference_boxes = torch.tensor([_checked_box(reference_box, "reference_box")], dtype=torch.float32)
        else:
            text = prompt if prompt is not None else self.instruction(expression, task, box=box)
        prompt_boxes = reference_boxes
        if box is not None:
            values = _checked_box(box, "box")
            from vlzoo.data.answers import BOX_PLACEHOLDER

            if BOX_PLACEHOLDER in text:
                prompt_boxes = torch.tensor([values], dtype=torch.float32)
            elif prompt is not None:
                raise ValueError(f"a box is given but the prompt has no '{BOX_PLACEHOLDER}' where it goes: {prompt!r}")
        name = expression if task in CATEGORY_TASKS and expression else None
        if task in CATEGORY_TASKS:
            category_id = self._category_id(name, category_id)
        targets = Targets(image_id=int(image_id), image_size=(h, w))
        if expression and task in ("rec", "res", "grec", "gres"):
            targets = targets.replace(expressions=[expression])
        return Sample(
            pixels, task, text, targets, image_id=int(image_id), category_id=category_id, category_name=name,
            prompt_boxes=prompt_boxes, reference_audio=clip,
        )

    # ------------------------------------------------------------------ references
    @property
    def reference_modalities(self) -> tuple[str, ...]:
        """The references the model's backbone turns into tokens (``backbone.references.modalities``:
        ``crop``, ``box``, ``audio``); empty when it has no reference encoder."""
        encoder = getattr(getattr(self.model, "backbone", None), "references", None)
        return tuple(getattr(encoder, "modalities", ()) or ())

    @property
    def reference_tokens(self) -> int | None:
        """k, the tokens per reference (``backbone.references.tokens``); ``None`` without references."""
        encoder = getattr(getattr(self.model, "backbone", None), "references", None)
        return None if encoder is None else int(encoder.tokens)

    def accepts(self) -> str:
        """What the model can be asked about, in words (for error messages)."""
        have = self.reference_modalities
        if not have:
            return ("its backbone has no reference encoder (backbone.references), so it takes text expressions "
                    "(and a task's {box}) only")
        spoken = ["a spoken clip (audio= / --audio FILE.wav)"] if "audio" in have else []
        spatial = [m for m in SPATIAL_REFERENCES if m in have]
        regions = [f"a region as a {' or '.join(spatial)} reference (reference_box= / --ref-box x1,y1,x2,y2)"] if spatial else []
        return f"its backbone's references are {list(have)}: it takes text expressions, " + " and ".join(spoken + regions)

    def reference_modality(self, *, audio: Any = None, reference_box: Sequence[float] | None = None,
                           reference_kind: str | None = None) -> str:
        """The modality of the reference given (``audio``, or ``crop`` / ``box`` for
        ``reference_box``), checked against what the model's backbone takes."""
        have = self.reference_modalities
        where = f"model {self.name} ({self.source})"
        if audio is not None and reference_box is not None:
            raise ValueError("give one reference at a time: a spoken clip (audio) or a region (reference_box), not both")
        if audio is not None:
            if reference_kind not in (None, "audio"):
                raise ValueError(f"reference_kind {reference_kind!r} is for reference_box; a clip is an audio reference")
            if "audio" not in have:
                raise ValueError(f"{where} takes no spoken reference (audio): {self.accepts()}")
            return "audio"
        if reference_kind is not None and reference_kind not in SPATIAL_REFERENCES:
            raise ValueError(f"reference_kind must be one of {list(SPATIAL_REFERENCES)} for a reference_box, got {reference_kind!r}")
        spatial = [m for m in SPATIAL_REFERENCES if m in have]
        if reference_kind is None:
            if len(spatial) > 1:
                raise ValueError(f"{where} takes crop and box references: choose one with reference_kind= / --ref-kind")
            if not spatial:
                raise ValueError(f"{where} takes no crop or box reference (reference_box): {self.accepts()}")
            return spatial[0]
        if reference_kind not in have:
            raise ValueError(f"{where} takes no {reference_kind} reference: {self.accepts()}")
        return reference_kind

    def _reference_prompt(self, modality: str, expression: str | None, task: str, *,
                          box: Sequence[float] | None, prompt: str | None) -> str:
        """The instruction with the reference span where the expression goes (or ``prompt``,
        which must hold the span)."""
        from vlzoo.data.templates import instruction

        span = reference_text(modality, int(self.reference_tokens or 0))
        what = "a spoken clip (audio)" if modality == "audio" else f"a {modality} reference (reference_box)"
        if prompt is not None:
            if span not in prompt:
                raise ValueError(f"{what} is given but the prompt does not hold its span {span!r} where it goes: {prompt!r}")
            return prompt
        if task not in REFERRING_TASKS:
            raise ValueError(
                f"{what} takes the place of a referring expression, and task '{task}' has none; use one of "
                f"{[t for t in REFERRING_TASKS if t in self.tasks] or list(REFERRING_TASKS)}"
            )
        if expression:
            raise ValueError(f"give an expression or {what}, not both: the reference says what to find")
        if modality != "audio" and box is not None:
            raise ValueError("give a region as reference_box (a reference) or as box (a task's {box}), not both")
        return instruction(task, expr=span)

    @property
    def categories(self) -> dict[str, int]:
        """``{category name: id}`` of the model's training data, for labelling det / seg / pose
        answers: the Shapes categories for a Shapes recipe, a COCO recipe's annotation file's
        categories when that file is still there; empty otherwise (pass ``category_id=``)."""
        if self._categories is None:
            self._categories = recipe_categories(self.recipe)
        return self._categories

    def _category_id(self, name: str | None, given: int | None) -> int:
        if given is not None:
            return int(given)
        table = self.categories
        if name is not None and name in table:
            return table[name]
        known = f"its training data's categories are {sorted(table)}" if table else "it knows no category table"
        raise ValueError(
            f"model {self.name}: category {name!r} has no id ({known}); give the id its training data uses "
            "with category_id= (the label its detections get)"
        )

    @torch.inference_mode()
    def predict_samples(self, samples: Sequence[Sample]) -> list[Predictions]:
        """Answer prepared samples (original pixels), in batches of ``batch_size``."""
        out: list[Predictions] = []
        device = self.device
        for start in range(0, len(samples), self.batch_size):
            batch = self.collate(list(samples[start : start + self.batch_size])).to(device)
            out.extend(self.model.predict_step(batch, start // self.batch_size))
        return out

    def __call__(
        self,
        image: Any,
        expression: str | Sequence[str | None] | None = None,
        *,
        task: str | Sequence[str] | None = None,
        box: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
        prompt: str | Sequence[str | None] | None = None,
        category_id: int | Sequence[int | None] | None = None,
        audio: Any = None,
        reference_box: Sequence[float] | Sequence[Sequence[float] | None] | None = None,
        reference_kind: str | Sequence[str | None] | None = None,
    ) -> Predictions | list[Predictions]:
        """Answer about one image (-> :class:`Predictions`) or a list of images (-> a list).

        With a list of images, ``audio`` is one clip for all or a *list* of one per image (a
        ``(samples, rate)`` pair is a tuple)."""
        batched = isinstance(image, (list, tuple))
        images = list(image) if batched else [image]
        n = len(images)

        def spread(value: Any, *, nested: bool = False) -> list[Any]:
            if batched and isinstance(value, (list, tuple)) and (
                not nested or (len(value) > 0 and (value[0] is None or isinstance(value[0], (list, tuple))))
            ):
                if len(value) != n:
                    raise ValueError(f"{len(value)} values for {n} images")
                return list(value)
            return [value] * n

        exprs, tasks, prompts, ids = spread(expression), spread(task), spread(prompt), spread(category_id)
        boxes, ref_boxes, kinds = spread(box, nested=True), spread(reference_box, nested=True), spread(reference_kind)
        if batched and isinstance(audio, list):
            if len(audio) != n:
                raise ValueError(f"{len(audio)} audio clips for {n} images")
            clips = list(audio)
        else:
            clips = [audio] * n
        samples = [
            self.sample(img, exprs[i], task=tasks[i], box=boxes[i], prompt=prompts[i], image_id=i, category_id=ids[i],
                        audio=clips[i], reference_box=ref_boxes[i], reference_kind=kinds[i])
            for i, img in enumerate(images)
        ]
        preds = self.predict_samples(samples)
        return preds if batched else preds[0]

    def answer(self, image: Any, expression: str | None = None, *, task: str | None = None,
               box: Sequence[float] | None = None, prompt: str | None = None,
               overlay: str | Path | None = None, category_id: int | None = None, audio: Any = None,
               reference_box: Sequence[float] | None = None, reference_kind: str | None = None) -> dict[str, Any]:
        """One image's answer as JSON-ready data (:func:`predictions_to_json`); with ``overlay``
        also draws it into that PNG.  A reference is recorded as ``reference`` (its modality),
        ``audio`` (the file, or its length and rate) and ``reference_box``."""
        sample = self.sample(image, expression, task=task, box=box, prompt=prompt, category_id=category_id,
                             audio=audio, reference_box=reference_box, reference_kind=reference_kind)
        (pred,) = self.predict_samples([sample])
        geo = self.geometry((int(sample.image.shape[1]), int(sample.image.shape[2])))
        result = predictions_to_json(pred, task=sample.task, prompt=sample.prompt, transform=geo)
        if expression is not None:
            result["expression"] = expression
        if box is not None:
            result["box"] = [float(v) for v in box]
        if audio is not None or reference_box is not None:
            result["reference"] = self.reference_modality(audio=audio, reference_box=reference_box,
                                                          reference_kind=reference_kind)
        if sample.reference_audio is not None:
            clip = sample.reference_audio
            result["audio"] = (str(audio) if isinstance(audio, (str, Path))
                               else {"seconds": round(clip.seconds, 4), "sample_rate": clip.sample_rate})
        if reference_box is not None:
            result["reference_box"] = [float(v) for v in reference_box]
        if isinstance(image, (str, Path)):
            result["image"] = str(image)
        if overlay is not None:
            from vlzoo.visualize import draw_overlay

            title = f"{sample.task}: {sample.prompt}" + (f"\n-> {pred.text}" if pred.text else "")
            shown = [v for v in (result.get("box"), result.get("reference_box")) if v is not None]
            boxes = torch.tensor(shown) if shown else torch.zeros(0, 4)
            given = Targets(boxes=boxes, image_size=pred.image_size) if shown else None
            result["overlay"] = str(draw_overlay(sample.image, given, pred, overlay, title[:200], transform=geo))
        return result

    def __repr__(self) -> str:
        return f"TrainedModel({self.name!r}, paradigm={getattr(self.model, 'name', '?')}, tasks={self.tasks}, source={str(self.source)!r})"


def recipe_categories(recipe: Recipe) -> dict[str, int]:
    """``{category name: id}`` the datasets of ``recipe`` label det / seg / pose targets with,
    found without building them: the Shapes categories (ids 1-5) for a ``ShapesDataset``, the
    ``categories`` of a ``CocoDataset``'s annotation file when the file exists.  Empty when no
    dataset says."""
    table: dict[str, int] = {}
    for key in DATASET_KEYS:
        nodes = recipe.get(f"data.{key}")
        if isinstance(nodes, Mapping) and "_target_" not in nodes:
            nodes = list(nodes.values())  # named splits
        for node in nodes if isinstance(nodes, list) else [nodes]:
            if not isinstance(node, Mapping):
                continue
            target = str(node.get("_target_", ""))
            if target.endswith("ShapesDataset"):
                from vlzoo.data.shapes.world import CATEGORY_NAMES

                table.update({n: i + 1 for i, n in enumerate(CATEGORY_NAMES)})
            elif target.endswith("CocoDataset") and node.get("annotation_file"):
                path = Path(str(node["annotation_file"]))
                if path.is_file():
                    from vlzoo.data.coco import index_categories, load_coco_json

                    for cat_id, cat in index_categories(load_coco_json(path), path).items():
                        table.setdefault(str(cat["name"]), int(cat_id))
    return table


def _peak(heatmap: Tensor, transform: ImageTransform | None) -> dict[str, float]:
    """The heatmap's top cell: its value and its centre in original pixels."""
    heat = heatmap.detach().float().cpu()
    h, w = int(heat.shape[-2]), int(heat.shape[-1])
    index = int(torch.argmax(heat))
    row, col = divmod(index, w)
    if transform is not None:
        ih, iw = transform.input_size
        point = torch.tensor([[(col + 0.5) * iw / w, (row + 0.5) * ih / h]])
        x, y = (float(v) for v in transform.points_to_original(point)[0])
    else:
        x, y = float(col + 0.5), float(row + 0.5)
    return {"x": x, "y": y, "value": float(heat.reshape(-1)[index]), "grid": [h, w]}


def predictions_to_json(
    pred: Predictions, *, task: str | None = None, prompt: str | None = None, transform: ImageTransform | None = None
) -> dict[str, Any]:
    """One sample's :class:`Predictions` (original pixels) as JSON-ready data: ``boxes`` (``xyxy``),
    ``scores``, ``labels``, ``masks`` (COCO RLE, text ``counts``), ``mask_scores``, ``keypoints``
    (``[x, y, score]`` per keypoint), ``text``, ``parsed`` and the paradigm's ``evidence``: the
    heatmap's peak (``{x, y, value, grid}``, original pixels with ``transform``) and point
    prompts (original pixels)."""
    from vlzoo.predictions import encode_rle

    def floats(t: Tensor) -> list[Any]:
        return [[round(float(v), 4) for v in row] for row in t.tolist()] if t.ndim > 1 else [round(float(v), 4) for v in t.tolist()]

    out: dict[str, Any] = {}
    if task is not None:
        out["task"] = task
    if prompt is not None:
        out["prompt"] = prompt
    out["image_size"] = [int(v) for v in pred.image_size]
    out["boxes"] = floats(pred.boxes.reshape(-1, 4))
    out["scores"] = floats(pred.scores.reshape(-1))
    out["labels"] = [int(v) for v in pred.labels.reshape(-1).tolist()]
    if pred.masks is not None:
        out["masks"] = [encode_rle(m) for m in pred.masks]
    if pred.mask_scores is not None:
        out["mask_scores"] = floats(pred.mask_scores.reshape(-1))
    if pred.keypoints is not None:
        out["keypoints"] = [floats(k) for k in pred.keypoints]
    out["text"] = pred.text
    out["parsed"] = bool(pred.parsed)
    evidence: dict[str, Any] = {}
    if "heatmap" in pred.evidence:
        evidence["heatmap_peak"] = _peak(pred.evidence["heatmap"], transform)
    points = pred.evidence.get("points")
    if points is not None and points.numel():
        pts = points.detach().float().cpu().reshape(-1, points.shape[-1])[:, :2]
        if transform is not None:
            pts = transform.points_to_original(pts)
        evidence["points"] = floats(pts)
    if evidence:
        out["evidence"] = evidence
    return out


def _build(recipe: Recipe, allow_targets: Sequence[str], source: str) -> Any:
    from vlzoo.build import build

    built = build(_without_datasets(recipe, allow_targets, source), with_data=True, with_trainer=False,
                  with_logger=False)
    if built.model is None:
        raise RecipeError(f"{source}: its recipe has no paradigm slot, so there is no model to load")
    if built.datamodule is None:
        raise RecipeError(f"{source}: its recipe has no data slot, so it does not say how an image is prepared")
    if getattr(built.datamodule, "collate", None) is None or getattr(built.datamodule, "transform", None) is None:
        raise RecipeError(
            f"{source}: the recipe's data slot ({recipe.get('data._target_')}) has no collate() / transform, "
            "so an image cannot be prepared as in training; use vlzoo.data.VLDataModule"
        )
    return built


def _checkpoint_files(node: Any, key: str = "") -> list[tuple[str, str]]:
    """``(recipe key, file)`` of every ``checkpoint`` file a recipe's nodes load."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if "_target_" in node and isinstance(node.get("checkpoint"), str):
            found.append((f"{key}.checkpoint", node["checkpoint"]))
        for k, v in node.items():
            found += _checkpoint_files(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _checkpoint_files(v, f"{key}.{i}")
    return found


def _load_checkpoint_file(path: Path, allow_targets: Sequence[str]) -> tuple[Any, Any, Recipe]:
    from vlzoo.checkpoints import read_checkpoint

    checkpoint, recipe = read_checkpoint(path)
    recipe = _stored_recipe(recipe.data, allow_targets, f"checkpoint {path}")
    check_trust(recipe)
    for key, file in _checkpoint_files(recipe.data):
        if not Path(file).is_file():
            raise RecipeError(
                f"checkpoint {path}: its recipe key {key} names {file}, which no longer exists. The trained weights "
                "are in the checkpoint, but the model is rebuilt as it was trained, from that file (it also fixes the "
                "ids of the tokens it added). Put the file back, or - while you have it - write a self-contained "
                "folder with `vlzoo export`"
            )
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise RecipeError(f"checkpoint {path} holds no 'state_dict'; use a last.ckpt or best-*.ckpt written by `vlzoo fit`")
    built = _build(recipe, allow_targets, f"checkpoint {path}")
    built.model.load_state_dict(state, strict=True)
    return built.model, built.datamodule, recipe


def read_export(folder: str | Path, *, allow_targets: Sequence[str] = ()) -> tuple[dict[str, Any], Recipe]:
    """The manifest and the recipe of a ``vlzoo export`` folder, with the recipe's paths into the
    folder (the tokenizer) made absolute.  The recipe's ``allow_targets`` count only where
    ``allow_targets`` repeats them."""
    from vlzoo.config import recipe_from_yaml

    folder = Path(folder)
    manifest_path = folder / EXPORT_MANIFEST
    if not manifest_path.is_file():
        raise RecipeError(
            f"{folder} is not a vlzoo export folder (it has no {EXPORT_MANIFEST}); write one with "
            "`vlzoo export CHECKPOINT DIR`, or give a checkpoint file"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"{manifest_path} is damaged ({err}); export the checkpoint again") from None
    for name in (RECIPE_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise RecipeError(f"export folder {folder} has no {name}; export the checkpoint again")
    recipe = recipe_from_yaml((folder / RECIPE_FILE).read_text(), source=f"export {folder / RECIPE_FILE}")
    data = copy.deepcopy(recipe.data)
    for key, relative in (manifest.get("paths") or {}).items():
        _set_dotted(data, key, str((folder / relative).resolve()))
    stored = _stored_recipe(data, allow_targets, f"export {folder}")
    check_trust(stored)
    return manifest, stored


def _load_export(folder: Path, allow_targets: Sequence[str]) -> tuple[Any, Any, Recipe]:
    from safetensors.torch import load_model

    manifest, recipe = read_export(folder, allow_targets=allow_targets)
    built = _build(recipe, allow_targets, f"export {folder}")
    missing, unexpected = load_model(built.model, str(folder / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        parts = [f"{len(v)} {what} (e.g. {sorted(v)[0]})" for what, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise RecipeError(
            f"export {folder}: {WEIGHTS_FILE} does not fit the model its recipe builds ({'; '.join(parts)}); "
            "export the checkpoint again with this vlzoo version"
        )
    saved_ids = manifest.get("special_token_ids") or {}
    own = dict(getattr(built.model, "special_token_ids", {}) or {})
    moved = {t: (own.get(t), i) for t, i in saved_ids.items() if own.get(t) != i}
    if moved:
        raise RecipeError(
            f"export {folder}: the tokenizer gives other ids to the model's special tokens (token: (now, exported)) "
            f"{moved}; its {TOKENIZER_DIR}/ folder does not belong to these weights - export again"
        )
    return built.model, built.datamodule, recipe


def load(
    path: str | Path, *, allow_targets: Sequence[str] = (), device: str | torch.device | None = None,
    batch_size: int = 8,
) -> TrainedModel:
    """A trained model from a ``vlzoo fit`` checkpoint file or a ``vlzoo export`` folder.

    Nothing is unpickled (checkpoints load with ``weights_only=True``, exports are safetensors).
    A recipe asking for targets beyond vlzoo's allowlist needs those prefixes in
    ``allow_targets`` (your consent).  ``device`` defaults to the CPU."""
    path = Path(path)
    if path.is_dir():
        model, datamodule, recipe = _load_export(path, allow_targets)
    elif path.is_file():
        model, datamodule, recipe = _load_checkpoint_file(path, allow_targets)
    else:
        raise RecipeError(f"{path} does not exist: give a checkpoint file (last.ckpt) or a `vlzoo export` folder")
    model.eval()
    trained = TrainedModel(model, datamodule, recipe, source=path, batch_size=batch_size)
    if device is not None:
        trained.to(device)
    return trained


def _checked_box(box: Sequence[float] | None, name: str) -> list[float]:
    values = [float(v) for v in box] if box is not None else []
    if len(values) != 4 or not (values[2] > values[0] and values[3] > values[1]):
        raise ValueError(f"{name} must be x1,y1,x2,y2 with x2 > x1 and y2 > y1 (original pixels), got {box}")
    return values


def _parse_box(text: str | None, flag: str = "--box") -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise RecipeError(f"{flag} {text!r}: give four numbers x1,y1,x2,y2 in the image's pixels")
    return values


def run_infer(
    model_path: str | Path,
    images: str | Path,
    expression: str | None = None,
    *,
    task: str | None = None,
    box: str | Sequence[float] | None = None,
    prompt: str | None = None,
    overlay: str | Path | None = None,
    allow_targets: Sequence[str] = (),
    audio: str | Path | None = None,
    reference_box: str | Sequence[float] | None = None,
    reference_kind: str | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """What ``vlzoo infer`` prints: one image's answer, or a list for a folder / glob.  With
    several images ``overlay`` is a folder receiving ``<image stem>.png`` each.  ``audio`` (a WAV
    file) or ``reference_box`` is the reference every image is asked about."""
    files = image_files(images)
    values = _parse_box(box) if isinstance(box, str) or box is None else [float(v) for v in box]
    ref_values = (_parse_box(reference_box, "--ref-box") if isinstance(reference_box, str) or reference_box is None
                  else [float(v) for v in reference_box])
    if audio is not None and not Path(audio).is_file():
        raise RecipeError(f"--audio {audio}: no such file (give a WAV file)")
    trained = load(model_path, allow_targets=allow_targets)
    clip = None
    if audio is not None:
        from vlzoo.data.audio_files import read_audio

        try:
            trained.reference_modality(audio=audio, reference_box=ref_values, reference_kind=reference_kind)
            clip = read_audio(audio)  # read once, asked about every image
        except ValueError as err:
            raise RecipeError(f"--audio {audio}: {err}") from None
    several = len(files) > 1 or Path(str(images)).is_dir() or glob.has_magic(str(images))
    results = []
    for file in files:
        target = None
        if overlay is not None:
            target = Path(overlay) / f"{file.stem}.png" if several else Path(overlay)
        try:
            result = trained.answer(file, expression, task=task, box=values, prompt=prompt, overlay=target,
                                    audio=clip, reference_box=ref_values, reference_kind=reference_kind)
        except ValueError as err:
            raise RecipeError(f"{file}: {err}") from None
        if audio is not None:
            result["audio"] = str(audio)
        results.append(result)
    return results if several else results[0]


def json_text(result: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """The answer as JSON text (what ``vlzoo infer`` prints): indented, with each list of
    numbers (a box, a keypoint) on one line."""
    import re

    text = json.dumps(result, indent=1)
    def one_line(match: re.Match[str]) -> str:
        return "[" + ", ".join(v.strip() for v in match.group(1).split(",")) + "]"

    return re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", one_line, text)

"""``ShapesDataset``: a deterministic, random-access procedural referring dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from vlzoo.data.errors import DataError
from vlzoo.data.shapes.language import (
    Ref,
    SetRef,
    absent_references,
    caption,
    choose_reference,
    render,
    resolve,
    set_references,
    vqa_question,
)
from vlzoo.data.shapes.world import COMPOSITIONAL_HOLDOUT, Scene, generate_scene
from vlzoo.data.templates import instruction
from vlzoo.structures import EXPRESSION_KINDS, GENERALIZED_TASKS, TASKS, Sample, Targets

__all__ = ["ShapesDataset", "SPLITS", "RUNGS", "RUNG_KINDS", "REFERENT_SETS", "DEFAULT_REFERENTS"]

#: split name -> seed stream; disjoint streams give disjoint scenes for the same index
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "comp_test": 3}

#: The difficulty ladder, easiest first (docs/data.md).  ``one``: one object per image, pure
#: localization (the positive control); ``attribute``: several objects, expressions that name
#: attributes only; ``spatial``: ordinal, superlative and relational expressions only; ``full``:
#: every kind, drawn uniformly among those available (the default).
RUNGS: tuple[str, ...] = ("one", "attribute", "spatial", "full")
#: rung -> the expression kinds its referring samples (rec, res, reg) may use.  ``one`` keeps
#: every kind, so it is exactly ``full`` with ``num_objects=(1, 1)``: with a lone object only
#: attribute expressions exist.
RUNG_KINDS: dict[str, tuple[str, ...]] = {
    "one": EXPRESSION_KINDS,
    "attribute": ("attribute",),
    "spatial": ("ordinal", "superlative", "relation"),
    "full": EXPRESSION_KINDS,
}

#: The referent sets of a generalized referring sample (``grec`` / ``gres``): an expression
#: that denotes no object ("the purple cross" when there is none), exactly one, or several
#: ("every red shape").
REFERENT_SETS: tuple[str, ...] = ("none", "one", "several")
#: The share of each referent set when a recipe does not give ``referents``; on one-object
#: scenes (``num_objects`` up to 1) ``several`` is left out and the other shares renormalised.
DEFAULT_REFERENTS: dict[str, float] = {"none": 0.2, "one": 0.6, "several": 0.2}


class ShapesDataset(Dataset):
    """Procedural scenes of coloured shapes with referring expressions, captions and questions.

    Every item is generated from ``(seed, split, index)``: workers and ranks see the same data,
    and no file is read.  Each sample holds the original pixels and only the targets its task
    asks for:

    * ``rec`` / ``res``: the referred object (``res`` also its mask); ``expressions`` the
      expression, ``Sample.expression_kind`` (and ``expression_kinds``) its kind, ``meta["ref"]``
      its :class:`~vlzoo.data.shapes.language.Ref` program;
    * ``det`` / ``seg`` / ``pose``: every instance of the category ``Sample.category_id`` /
      ``category_name`` (``seg`` masks, ``pose`` keypoints ``(N, 5, 3)``);
    * ``reg``: the region (box) in ``Sample.prompt_boxes`` and a ``{box}`` placeholder in the
      prompt; ``answer`` = ``text`` = ``captions[0]`` = a unique expression of the region;
    * ``caption`` / ``vqa``: text answers only (``meta["vqa_kind"]`` for vqa);
    * ``grec`` / ``gres`` (generalized referring): the *set* of objects the expression denotes,
      drawn per item from ``referents``: none (``Targets`` with N = 0 boxes, ``gres`` masks
      ``(0, H, W)``), one (a unique expression of the rung's kinds, as rec / res) or several
      (a :class:`~vlzoo.data.shapes.language.SetRef`, "every red shape", N >= 2).
      ``meta["referents"]`` names the set, ``meta["object_ids"]`` the referents and
      ``meta["ref"]`` the program (:func:`~vlzoo.data.shapes.language.resolve` gives the ids
      back).  No-target and set expressions are attribute expressions.

    Args:
        split: ``train`` / ``val`` / ``test`` (disjoint seed streams) or ``comp_test``, whose
            referred object is always a held-out colour x category combination.
        size: number of items.
        image_size: side of the square image in pixels.
        tasks: task names (drawn uniformly) or ``{task: weight}``; the task of an item is drawn
            from ``(seed, split, index)``.
        rung: the difficulty ladder's rung (:data:`RUNGS`): ``one`` object per image,
            ``attribute``-only expressions, ``spatial``-only expressions or the ``full`` mix.
        num_objects: inclusive range of objects per scene; by default ``(1, 1)`` on the
            ``one`` rung and ``(2, 4)`` otherwise (``attribute`` and ``spatial`` need >= 2).
        occlusion: largest fraction of an object later objects may cover (0: none).
        noise: standard deviation of Gaussian pixel noise, as a fraction of 255.
        texture: striped background texture.
        twin_prob: chance an object copies the attributes of an earlier one (needs spatial
            expressions to be told apart).
        compositional: keep held-out combinations out of this split (use for ``train``).
        referents: the share of each referent set (:data:`REFERENT_SETS`) among the ``grec`` /
            ``gres`` items, e.g. ``{none: 0.2, one: 0.6, several: 0.2}`` (default
            :data:`DEFAULT_REFERENTS`); it changes no other task, and giving it without a
            ``grec`` / ``gres`` task is an error.
        seed: base seed (injected by ``vlzoo.build``).
    """

    def __init__(
        self,
        *,
        split: str = "train",
        size: int = 10000,
        image_size: int = 64,
        tasks: Mapping[str, float] | Sequence[str] = ("rec",),
        rung: Literal["one", "attribute", "spatial", "full"] = "full",
        num_objects: tuple[int, int] | Sequence[int] | None = None,
        occlusion: float = 0.0,
        noise: float = 0.0,
        texture: bool = False,
        twin_prob: float = 0.35,
        compositional: bool = False,
        referents: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesDataset: unknown split {split!r}; choose from {sorted(SPLITS)}")
        if isinstance(tasks, str):
            tasks = [tasks]
        weights = dict(tasks) if isinstance(tasks, Mapping) else {t: 1.0 for t in tasks}
        unknown = [t for t in weights if t not in TASKS]
        if unknown or not weights:
            raise ValueError(f"ShapesDataset: unknown tasks {unknown}; choose from {list(TASKS)}")
        total = float(sum(weights.values()))
        if total <= 0 or any(w < 0 for w in weights.values()):
            raise ValueError(f"ShapesDataset: task weights must be >= 0 and not all 0, got {weights}")
        if rung not in RUNGS:
            raise ValueError(f"ShapesDataset: unknown rung {rung!r}; choose from {list(RUNGS)}")
        if num_objects is None:
            num_objects = (1, 1) if rung == "one" else (2, 4)
        lo, hi = (int(v) for v in num_objects)
        if not 1 <= lo <= hi <= 10:
            raise ValueError(f"ShapesDataset: num_objects must satisfy 1 <= lo <= hi <= 10, got {num_objects}")
        if rung == "one" and (lo, hi) != (1, 1):
            raise ValueError(
                f"ShapesDataset: rung 'one' has one object per image, but num_objects is {list(num_objects)}; "
                "leave num_objects out (or [1, 1]), or use another rung"
            )
        if rung in ("attribute", "spatial") and lo < 2:
            raise ValueError(
                f"ShapesDataset: rung {rung!r} needs several objects per image (num_objects >= 2), got "
                f"{list(num_objects)}; use rung 'one' for a lone object"
            )
        if not 0.0 <= occlusion < 1.0:
            raise ValueError(f"ShapesDataset: occlusion must be in [0, 1), got {occlusion}")
        if isinstance(size, bool) or int(size) < 1:
            raise ValueError(f"ShapesDataset: size must be at least 1 (the number of scenes), got {size!r}")
        if image_size < 16:
            raise ValueError(f"ShapesDataset: image_size must be >= 16, got {image_size}")
        self.split = split
        self.size = int(size)
        self.image_size = int(image_size)
        self.tasks = list(weights)
        self._cum = np.cumsum([weights[t] / total for t in self.tasks])
        self.rung = rung
        self.kinds = RUNG_KINDS[rung]
        self.num_objects = (lo, hi)
        self.occlusion = float(occlusion)
        self.noise = float(noise)
        self.texture = bool(texture)
        self.twin_prob = float(twin_prob)
        self.compositional = bool(compositional)
        self.referents = self._referent_shares(referents, weights, hi)
        self._referent_cum = np.cumsum([self.referents[k] for k in REFERENT_SETS])
        self.seed = int(seed)

    @staticmethod
    def _referent_shares(referents: Mapping[str, float] | None, weights: Mapping[str, float], hi: int) -> dict[str, float]:
        generalized = [t for t in weights if t in GENERALIZED_TASKS]
        if referents is None:
            shares = dict(DEFAULT_REFERENTS)
            if hi < 2:
                shares["several"] = 0.0
        else:
            if not generalized:
                raise ValueError(
                    f"ShapesDataset: referents {dict(referents)} apply to the grec / gres tasks only, and tasks are "
                    f"{list(weights)}; add grec or gres to tasks or leave referents out"
                )
            if not isinstance(referents, Mapping):
                raise ValueError(f"ShapesDataset: referents must be a mapping like {DEFAULT_REFERENTS}, got {referents!r}")
            unknown = [k for k in referents if k not in REFERENT_SETS]
            if unknown:
                raise ValueError(f"ShapesDataset: unknown referent sets {unknown} in referents; choose from {list(REFERENT_SETS)}")
            shares = {k: float(referents.get(k, 0.0)) for k in REFERENT_SETS}
            if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
                raise ValueError(f"ShapesDataset: referents shares must be >= 0 and not all 0, got {dict(referents)}")
            if shares["several"] > 0 and hi < 2:
                raise ValueError(
                    f"ShapesDataset: referents asks for 'several' referents but scenes have at most {hi} object; "
                    "raise num_objects or set several: 0"
                )
        total = sum(shares.values())
        return {k: v / total for k, v in shares.items()}

    def __len__(self) -> int:
        return self.size

    def _key(self, index: int) -> list[int]:
        return [self.seed, SPLITS[self.split], int(index)]

    def _task_rng(self, index: int) -> np.random.Generator:
        """The item's stream for its task and language (its scene has a stream of its own)."""
        return np.random.default_rng(self._key(index) + [1])

    def _draw_task(self, rng: np.random.Generator) -> str:
        u = rng.random()
        return self.tasks[min(int(np.searchsorted(self._cum, u, side="right")), len(self.tasks) - 1)]

    def scene(self, index: int) -> Scene:
        """The scene graph of item ``index`` (the same one ``self[index]`` is drawn from)."""
        rng = self._task_rng(index)
        task = self._draw_task(rng)
        if task in GENERALIZED_TASKS:
            return self._generalized(index, rng)[0]
        return self._referable(index, task, rng)[0]

    def referents_of(self, index: int) -> str | None:
        """The referent set (:data:`REFERENT_SETS`) of a ``grec`` / ``gres`` item, else ``None``."""
        rng = self._task_rng(index)
        if self._draw_task(rng) not in GENERALIZED_TASKS:
            return None
        return self._draw_referents(rng)

    def _draw_referents(self, rng: np.random.Generator) -> str:
        u = rng.random()
        k = min(int(np.searchsorted(self._referent_cum, u, side="right")), len(REFERENT_SETS) - 1)
        while self.referents[REFERENT_SETS[k]] == 0.0:  # u at the very top of the last share
            k -= 1
        return REFERENT_SETS[k]

    def _generalized(self, index: int, rng: np.random.Generator) -> tuple[Scene, str, list[int], Ref]:
        """``(scene, referent set, referent ids, program)`` of a grec / gres item.  ``rng`` is the
        item's task stream just after the task draw.  A scene without an expression of the drawn
        set (no two objects share an attribute, every expression is ambiguous) is redrawn from a
        derived seed, as for rec / res."""
        kind = self._draw_referents(rng)
        key = self._key(index)
        # held-out (category, colour) pairs stay unnamed outside comp_test, in no-target expressions too
        exclude = frozenset(COMPOSITIONAL_HOLDOUT) if self.compositional and self.split != "comp_test" else frozenset()
        for attempt in range(self.MAX_SCENE_ATTEMPTS):
            scene_rng = np.random.default_rng(key + ([0] if attempt == 0 else [2, attempt]))
            scene = self._scene(scene_rng)
            if kind == "one":
                focus = 0 if self.split == "comp_test" else int(rng.integers(len(scene.objects)))
                picked = self._reference(scene, focus, rng, self.kinds)
                if picked is not None:
                    return scene, kind, [picked[0]], picked[1]
                continue
            refs = set_references(scene) if kind == "several" else absent_references(scene, exclude=exclude)
            if not refs:
                continue
            ref = refs[int(rng.integers(len(refs)))]
            if kind == "none" and rng.random() < 0.5:  # "every purple cross": the set form denotes nothing too
                ref = SetRef(size=ref.size, colour=ref.colour, category=ref.category)
            return scene, kind, resolve(ref, scene), ref
        raise DataError(
            f"ShapesDataset({self.split}) item {index}: no expression with {kind!r} referents in "
            f"{self.MAX_SCENE_ATTEMPTS} scenes; use more object variety (num_objects, twin_prob) or change referents"
        )

    def _generalized_sample(self, index: int, task: str, rng: np.random.Generator) -> Sample:
        scene, kind, ids, ref = self._generalized(index, rng)
        expr = render(ref, rng)
        h, w = scene.size
        base = Targets(image_id=int(index), image_size=(h, w))
        t = self._targets(scene, ids, base, masks=task == "gres", keypoints=False)
        t = t.replace(expressions=[expr], expression_kinds=[ref.kind])
        meta = {"object_ids": ids, "ref": ref, "referents": kind}
        return Sample(
            torch.from_numpy(scene.image), task, instruction(task, rng, expr=expr), t, image_id=index,
            expression_kind=ref.kind, meta=meta,
        )

    #: scenes redrawn (deterministically) before a referring sample gives up
    MAX_SCENE_ATTEMPTS = 16

    def _referable(self, index: int, task: str, rng: np.random.Generator):
        """``(scene, focus, picked)`` of item ``index``.  A referring task (rec/res/reg) needs an
        object that an expression can single out; a scene without one is redrawn from a derived
        seed, so the item keeps its task (a silent change of task would break task-specific
        runs).  ``rng`` is the item's task stream, just after the task draw."""
        key = self._key(index)
        for attempt in range(self.MAX_SCENE_ATTEMPTS):
            scene_rng = np.random.default_rng(key + ([0] if attempt == 0 else [2, attempt]))
            scene = self._scene(scene_rng)
            n = len(scene.objects)
            focus = 0 if self.split == "comp_test" else int(rng.integers(n))
            if task not in ("rec", "res", "reg"):
                return scene, focus, None
            picked = self._reference(scene, focus, rng, self.kinds)
            if picked is not None:
                return scene, focus, picked
        raise DataError(
            f"ShapesDataset({self.split}) item {index}: no object could be referred to uniquely in "
            f"{self.MAX_SCENE_ATTEMPTS} scenes with {self.rung!r}-rung expressions; use more object variety "
            "(num_objects, twin_prob)"
        )

    def _scene(self, rng: np.random.Generator) -> Scene:
        return generate_scene(
            rng,
            image_size=self.image_size,
            num_objects=self.num_objects,
            occlusion=self.occlusion,
            noise=self.noise,
            texture=self.texture,
            twin_prob=self.twin_prob,
            exclude_holdout=self.compositional and self.split != "comp_test",
            force_holdout=self.split == "comp_test",
        )

    def task_of(self, index: int) -> str:
        """The task of item ``index`` (deterministic in ``(seed, split, index)``)."""
        return self._draw_task(self._task_rng(index))

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(f"ShapesDataset index {index} out of range [0, {self.size})")
        rng = self._task_rng(index)
        task = self._draw_task(rng)
        if task in GENERALIZED_TASKS:
            return self._generalized_sample(index, task, rng)
        scene, focus, picked = self._referable(index, task, rng)
        image = torch.from_numpy(scene.image)
        h, w = scene.size
        base = Targets(image_id=int(index), image_size=(h, w))

        if picked is not None:  # rec / res / reg
            target, ref = picked
            expr = render(ref, rng)
            t = self._targets(scene, [target], base, masks=task == "res", keypoints=False)
            t = t.replace(expression_kinds=[ref.kind])
            meta = {"object_ids": [target], "ref": ref}
            if task == "reg":
                box = [float(v) for v in scene.objects[target].box]
                t = t.replace(captions=[expr], text=expr, expressions=[expr])
                return Sample(
                    image, task, instruction("reg", rng), t, answer=expr, image_id=index,
                    prompt_boxes=torch.tensor([box]), expression_kind=ref.kind, meta=meta,
                )
            t = t.replace(expressions=[expr])
            return Sample(
                image, task, instruction(task, rng, expr=expr), t, image_id=index, expression_kind=ref.kind, meta=meta
            )

        if task in ("det", "seg", "pose"):
            cat = scene.objects[focus].category
            ids = [i for i, o in enumerate(scene.objects) if o.category == cat]
            t = self._targets(scene, ids, base, masks=task == "seg", keypoints=task == "pose")
            name = scene.objects[focus].category_name
            return Sample(
                image, task, instruction(task, rng, category=name), t, image_id=index,
                category_id=cat + 1, category_name=name, meta={"object_ids": ids},
            )

        if task == "vqa":
            question, answer, kind = vqa_question(scene, rng, focus=focus if self.split == "comp_test" else None)
            t = base.replace(text=answer)
            return Sample(image, task, question, t, answer=answer, image_id=index, meta={"vqa_kind": kind})

        text = caption(scene, rng)
        t = base.replace(text=text, captions=[text])
        return Sample(image, "caption", instruction("caption", rng), t, answer=text, image_id=index, meta={})

    @staticmethod
    def _reference(
        scene: Scene, focus: int, rng: np.random.Generator, kinds: tuple[str, ...] = EXPRESSION_KINDS
    ) -> tuple[int, Ref] | None:
        order = [focus] + [i for i in range(len(scene.objects)) if i != focus]
        for i in order:
            ref = choose_reference(i, scene, rng, kinds)
            if ref is not None:
                return i, ref
        return None

    @staticmethod
    def _targets(scene: Scene, ids: list[int], base: Targets, *, masks: bool, keypoints: bool) -> Targets:
        objs = [scene.objects[i] for i in ids]
        boxes = torch.from_numpy(np.array([o.box for o in objs], dtype=np.float32).reshape(-1, 4))
        labels = torch.tensor([o.category + 1 for o in objs], dtype=torch.long)
        areas = torch.tensor([float(o.area) for o in objs], dtype=torch.float32)
        out = base.replace(
            boxes=boxes,
            labels=labels,
            areas=areas,
            iscrowd=torch.zeros(len(objs), dtype=torch.bool),
        )
        if masks:
            h, w = scene.size
            stacked = np.stack([scene.owner == i for i in ids]) if ids else np.zeros((0, h, w), dtype=bool)
            out.masks = torch.from_numpy(stacked)
        if keypoints:
            out.keypoints = torch.from_numpy(np.array([o.keypoints for o in objs], dtype=np.float32))
        return out

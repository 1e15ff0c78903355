"""One LightningDataModule for every dataset and task, and the collate that builds a ``Batch``.

Sequence layout (docs/architecture.md, "Data flow of one batch")::

    [bos] <image> template(prompt) | answer [eos] [pad ...]
    labels: -100 ...             -100 | answer ids, eos | -100 ...

``template(prompt)`` is :class:`PromptTemplate` (default ``"user: {prompt} assistant:"``; a
template with ``{image}`` places the image tokens there instead of first), the
answer is tokenized as ``" " + answer`` so the boundary is a word boundary for BPE and word
tokenizers alike.  ``prompt_ids`` holds ``[bos] <image> template(prompt)`` LEFT-padded, for
generation.  ``bos`` is left out when the tokenizer has none.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vlzoo.data.answers import AnswerFormat
from vlzoo.data.errors import DataError
from vlzoo.data.templates import instruction_table, reword
from vlzoo.data.tokenizer import IMAGE_TOKEN
from vlzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, ResizeTransform
from vlzoo.structures import CATEGORY_TASKS, EXPRESSION_KINDS, QUERY_META_KEYS, Batch, Sample, Targets

__all__ = [
    "PromptTemplate",
    "VLCollate",
    "VLDataModule",
    "SkippedBatch",
    "ResumableShuffle",
    "DEFAULT_TEMPLATE",
    "check_query",
]

DEFAULT_TEMPLATE = "user: {prompt} assistant:"
IGNORE_INDEX = -100


class PromptTemplate:
    """Wraps an instruction into the text the language model sees around ``<image>``.

    ``text`` must contain ``{prompt}`` once and may contain ``{image}`` once: where the image
    tokens go.  Without ``{image}`` the image comes first, right after ``bos`` (LLaVA's order);
    ``"user: {prompt} {image} assistant:"`` puts the instruction first, so the image tokens
    (causal attention) can attend to it.  The text is tokenized in two parts, before and after
    ``{image}``.  The default uses only words the Shapes tokenizer knows and reads naturally to
    chat models; use e.g. ``"USER: {prompt} ASSISTANT:"`` for a Vicuna-style model.

    ``verbatim=True`` tokenizes the text exactly as written: nothing is stripped (a trailing
    ``\n`` stays), no ``bos`` is put in front (write it where the model wants it) and the answer
    follows the text's last character directly, without the usual space.  PaliGemma's layout
    ``<image> <bos> prompt \n answer <eos>`` is ``PromptTemplate(text="{image}<bos>{prompt}\n",
    verbatim=True)`` (``vlzoo.backbones.paligemma.PALIGEMMA_TEMPLATE``).
    """

    def __init__(self, *, text: str = DEFAULT_TEMPLATE, verbatim: bool = False) -> None:
        if text.count("{prompt}") != 1:
            raise ValueError(f"PromptTemplate: text must contain '{{prompt}}' exactly once, got {text!r}")
        if text.count("{image}") > 1:
            raise ValueError(f"PromptTemplate: text may contain '{{image}}' at most once, got {text!r}")
        self.text = text
        self.verbatim = bool(verbatim)

    @property
    def image_first(self) -> bool:
        """Whether the image tokens come before all of the template's text."""
        return "{image}" not in self.text or not self.text.split("{image}")[0].strip()

    def __call__(self, prompt: str) -> str:
        """The whole text with the instruction filled in (``{image}`` left out)."""
        return ("" if self.verbatim else " ").join(part for part in self.split(prompt) if part)

    def split(self, prompt: str) -> tuple[str, str]:
        """``(text before the image, text after it)`` with the instruction filled in."""
        before, _, after = self.text.partition("{image}") if "{image}" in self.text else ("", "", self.text)
        before, after = before.replace("{prompt}", prompt), after.replace("{prompt}", prompt)
        return (before, after) if self.verbatim else (before.strip(), after.strip())

    def __repr__(self) -> str:
        return f"PromptTemplate(text={self.text!r}" + (", verbatim=True)" if self.verbatim else ")")


class SkippedBatch:
    """What the collate returns when every sample of a batch was bad (``on_bad_sample="skip"``)."""

    def __init__(self, count: int) -> None:
        self.count = count


class VLCollate:
    """Picklable collate: transform, format prompt/answer, tokenize, pad -> :class:`Batch`.

    ``None`` items (bad samples a skipping dataset dropped) are removed and counted in
    ``batch.skipped``.  ``require_answers=False`` (predict) tolerates samples without a
    reference answer (their answer text is empty).
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        answer_format: AnswerFormat,
        transform: ResizeTransform,
        template: PromptTemplate,
        max_length: int = 256,
        keep_raw_images: bool = False,
        require_answers: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.answer_format = answer_format
        self.transform = transform
        self.template = template
        self.max_length = int(max_length)
        self.keep_raw_images = keep_raw_images
        self.require_answers = require_answers

    def _special_ids(self) -> tuple[int | None, int, int, int]:
        tok = self.tokenizer
        image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id is None or image_id == tok.unk_token_id:
            raise ValueError(
                f"the tokenizer has no '{IMAGE_TOKEN}' token; add it (the backbone does) before collating"
            )
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the answer must end with one")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return tok.bos_token_id, image_id, tok.eos_token_id, pad

    def __call__(self, items: Sequence[Sample | None]) -> Batch | SkippedBatch:
        samples = [s for s in items if s is not None]
        skipped = len(items) - len(samples)
        if not samples:
            return SkippedBatch(skipped)
        bos, image_tok, eos, pad = self._special_ids()
        images, targets, originals, transforms, prompts, answers, metas = [], [], [], [], [], [], []
        prompt_boxes = []
        for s in samples:
            check_query(s)
            original = _with_kind(s.targets, s.expression_kind)
            x, t_in, geo = self.transform(s.image, original)
            boxes_in = geo.boxes_to_input(s.prompt_boxes)
            s_in = replace(s, targets=t_in, prompt_boxes=boxes_in)
            prompts.append(self.answer_format.format_prompt(s_in, geo.input_size))
            try:
                answers.append(self.answer_format.format_answer(s_in, geo.input_size))
            except ValueError:
                if self.require_answers:
                    raise
                answers.append("")
            images.append(x)
            targets.append(t_in)
            originals.append(original)
            transforms.append(geo)
            prompt_boxes.append(boxes_in)
            metas.append(s.meta)
        parts = [self.template.split(p) for p in prompts]
        enc_before = self.tokenizer([b for b, _ in parts], add_special_tokens=False)["input_ids"]
        enc_p = self.tokenizer([a for _, a in parts], add_special_tokens=False)["input_ids"]
        space = "" if self.template.verbatim else " "
        enc_a = self.tokenizer([space + a for a in answers], add_special_tokens=False)["input_ids"]
        head = [bos] if bos is not None and not self.template.verbatim else []
        seqs, labs, prompt_seqs = [], [], []
        for b_ids, p_ids, a_ids in zip(enc_before, enc_p, enc_a, strict=True):
            prompt = head + list(b_ids) + [image_tok] + list(p_ids)
            answer = list(a_ids) + [eos]
            seq = (prompt + answer)[: self.max_length]
            lab = ([IGNORE_INDEX] * len(prompt) + answer)[: self.max_length]
            seqs.append(seq)
            labs.append(lab)
            prompt_seqs.append(prompt[: self.max_length])
        b = len(samples)
        length = max(len(s) for s in seqs)
        input_ids = torch.full((b, length), pad, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        plen = max(len(s) for s in prompt_seqs)
        prompt_ids = torch.full((b, plen), pad, dtype=torch.long)
        prompt_attention = torch.zeros((b, plen), dtype=torch.long)
        for i, (seq, lab, pr) in enumerate(zip(seqs, labs, prompt_seqs, strict=True)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(seq)] = 1
            prompt_ids[i, plen - len(pr) :] = torch.tensor(pr)
            prompt_attention[i, plen - len(pr) :] = 1
        sizes = sorted({tuple(x.shape[-2:]) for x in images})
        if len(sizes) > 1:
            raise DataError(
                f"images {[s.image_id for s in samples]} have different input sizes {sizes} in one batch: the transform "
                f"({self.transform!r}) gives each image its own frame; use batch_size: 1 / eval_batch_size: 1 (with "
                "trainer.accumulate_grad_batches) or images of one size"
            )
        batch = Batch(
            images=torch.stack(images),
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            prompt_ids=prompt_ids,
            prompt_attention_mask=prompt_attention,
            tasks=[s.task for s in samples],
            prompts=prompts,
            answers=answers,
            targets=targets,
            original_targets=originals,
            transforms=transforms,
            image_ids=[int(s.image_id) for s in samples],
            category_ids=[None if s.category_id is None else int(s.category_id) for s in samples],
            category_names=[s.category_name for s in samples],
            prompt_boxes=prompt_boxes,
            expression_kinds=[s.expression_kind for s in samples],
            reference_audio=[s.reference_audio for s in samples],
            meta=metas,
            raw_images=[s.image for s in samples] if self.keep_raw_images else None,
        )
        batch.skipped = skipped  # read by the loader to count bad samples per epoch
        return batch


def check_query(sample: Sample) -> None:
    """Refuse a sample whose query is not in its typed fields: a det / seg / pose sample without
    ``category_id``, or a ``meta`` that still carries a query key (``category``, ``prompt_boxes``
    ...; :data:`~vlzoo.structures.QUERY_META_KEYS`), which no paradigm reads any more."""
    where = f"sample {sample.image_id} ({sample.task})"
    moved = [key for key in QUERY_META_KEYS if key in sample.meta]
    if moved:
        fields = ", ".join(f"meta[{k!r}] -> Sample.{QUERY_META_KEYS[k]}" for k in moved)
        raise DataError(
            f"{where}: the query belongs in the Sample's typed fields, not in meta ({fields}); "
            "see docs/data.md, 'The query'"
        )
    if sample.task in CATEGORY_TASKS and sample.category_id is None:
        raise DataError(
            f"{where}: a {sample.task} sample must name its category: set Sample.category_id (the id its "
            "targets' labels use) and Sample.category_name (the name its instruction says)"
        )
    if sample.expression_kind is not None and sample.expression_kind not in EXPRESSION_KINDS:
        raise DataError(
            f"{where}: expression_kind {sample.expression_kind!r} is not one of {list(EXPRESSION_KINDS)}"
        )


def _with_kind(targets: Targets, kind: str | None) -> Targets:
    """The targets with the query's expression kind filled in for the evaluator (which reads
    ``Targets.expression_kinds``); a dataset that already names it there must agree."""
    if kind is None:
        return targets
    if not targets.expression_kinds:
        return targets.replace(expression_kinds=[kind] * max(1, len(targets.expressions)))
    if any(k != kind for k in targets.expression_kinds):
        raise DataError(
            f"sample {targets.image_id}: Sample.expression_kind {kind!r} disagrees with its "
            f"targets.expression_kinds {targets.expression_kinds}"
        )
    return targets


class _Reworded(Dataset):
    """Wraps a dataset: each sample's instruction in the table's wording for its task.  Other
    attributes are the dataset's (``num_skipped``, Shapes' ``scene`` ...)."""

    def __init__(self, dataset: Dataset, table: Mapping[str, str]) -> None:
        self.dataset = dataset
        self.table = dict(table)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "table") or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample | None:
        sample = self.dataset[index]
        if sample is None:
            return None
        try:
            return reword(sample, self.table)
        except ValueError as err:
            raise DataError(f"{type(self.dataset).__name__} item {index}: {err}") from None


class _SkipTolerant(Dataset):
    """Wraps a dataset: with ``on_bad_sample="skip"`` a :class:`DataError` becomes ``None``."""

    def __init__(self, dataset: Dataset, on_bad_sample: str) -> None:
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample | None:
        try:
            return self.dataset[index]
        except DataError:
            if self.on_bad_sample == "skip":
                return None
            raise


class _CountingLoader(DataLoader):
    """A DataLoader that drops all-bad batches and warns once per pass with the skip count."""

    def state_dict(self) -> dict[str, Any]:
        """Empty: the training position is the datamodule's state (:meth:`VLDataModule.state_dict`,
        restored before any loader exists).  Defined so that Lightning knows the loader resumes
        mid-epoch and does not warn that it cannot."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: see :meth:`state_dict`."""

    def __iter__(self):  # type: ignore[override]
        skipped = 0
        for batch in super().__iter__():
            if isinstance(batch, SkippedBatch):
                skipped += batch.count
                continue
            skipped += getattr(batch, "skipped", 0)
            yield batch
        dataset = self.dataset.dataset if isinstance(self.dataset, _SkipTolerant) else self.dataset
        # bad records the reader already dropped while loading its annotations
        skipped += int(getattr(dataset, "num_skipped", 0))
        if skipped:
            warnings.warn(
                f"{type(dataset).__name__}: skipped {skipped} bad sample(s) in this pass "
                "(on_bad_sample='skip'); set on_bad_sample='error' to see each one",
                stacklevel=2,
            )


def _unrepeated_sampler(dataset: Dataset) -> Any:
    """Under ``torch.distributed`` (DDP, FSDP, ...) an evaluation sampler that gives each rank every
    ``world``-th sample and repeats none; ``None`` in a single process.

    Lightning would otherwise insert a ``DistributedSampler``, which pads the split with repeated
    samples until it divides by the world size, so metrics would count some samples twice.  Here
    ranks may run one batch more or fewer; the metrics sum their states across ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    world = dist.get_world_size()
    if len(dataset) < world:  # type: ignore[arg-type]
        raise ValueError(
            f"VLDataModule: an evaluation split has {len(dataset)} sample(s), fewer than the {world} "  # type: ignore[arg-type]
            "distributed ranks; give it at least one sample per rank or evaluate with trainer.devices=1"
        )
    return UnrepeatedDistributedSampler(dataset, shuffle=False)


class ResumableShuffle(DistributedSampler):
    """The training order: each epoch a permutation keyed on ``(seed, epoch)``, that can start
    part-way into an epoch.

    It is torch's :class:`~torch.utils.data.DistributedSampler` (one replica in a single process,
    this rank's share under ``torch.distributed``; Lightning keeps it and calls ``set_epoch``),
    so the order of an epoch never depends on how many epochs this process has run.  Lightning
    restarts the epoch's dataloader when a run resumes from a mid-epoch checkpoint;
    :meth:`resume_at` makes the next pass over that epoch leave out the batches already trained
    on, so the resumed run sees the samples an uninterrupted run would, in the same order.
    """

    def __init__(
        self, dataset: Dataset, *, seed: int, batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start at ``epoch``, leaving out its first ``batches_done`` batches (once)."""
        self.set_epoch(epoch)
        self._resume = (int(epoch), int(batches_done))

    def __iter__(self):  # type: ignore[override]
        indices = list(super().__iter__())
        if self._resume is not None and self.epoch >= self._resume[0]:
            if self.epoch == self._resume[0]:
                indices = indices[self._resume[1] * self.batch_size :]
            self._resume = None
        return iter(indices)


DatasetArg = Dataset | Mapping[str, Dataset] | None


class VLDataModule(L.LightningDataModule):
    """Every vlzoo dataset and task behind one datamodule.

    Args:
        train: the training dataset (optional).
        val, test: a dataset, or ``{name: dataset}`` for several evaluation splits (e.g. ``val``
            and ``comp_test``); several give several dataloaders in that order (``val_names``).
        predict: a dataset for ``predict`` (reference answers optional).
        batch_size: training batch size; ``eval_batch_size`` for the others (default: same).
        num_workers: dataloader worker processes.
        tokenizer: the backbone's tokenizer (injected by ``vlzoo.build``; default: the Shapes
            word tokenizer).
        answer_format: the paradigm's :class:`AnswerFormat` (injected; default the base one).
        image_mean, image_std, image_size: the vision backbone's input (injected).
        resize: ``"pad_square"`` (expand2square) or ``"resize"``.
        image_transform: the backbone's own transform (injected from its ``data_config["transform"]``,
            e.g. Qwen's :class:`~vlzoo.data.smart_resize.SmartResizeTransform`); replaces
            ``resize`` / ``image_size``.
        template: :class:`PromptTemplate` or its text (with ``{prompt}``, optionally ``{image}``).
        instructions: the instructions' wording per task in place of vlzoo's own
            (:func:`~vlzoo.data.templates.instruction_table`): a family's documented task syntax
            (``paligemma``, ``kosmos2``, ``florence2``) or ``{task: wording}``, e.g.
            ``{rec: "detect {expr}"}``; every split's samples of those tasks are reworded.
        max_length: longest tokenized sequence; longer ones are cut at the end.
        on_bad_sample: ``"error"`` raises :class:`DataError`; ``"skip"`` drops the sample and
            warns once per pass with the count.
        keep_raw_images: keep the original uint8 images in ``batch.raw_images`` (overlays).
        seed: seed of the training shuffle (injected); epoch ``e`` is a permutation keyed on
            ``(seed, e)`` that a resumed run continues mid-epoch (:class:`ResumableShuffle`, the
            position travels in the checkpoint through :meth:`state_dict`).
    """

    def __init__(
        self,
        *,
        train: Dataset | None = None,
        val: DatasetArg = None,
        test: DatasetArg = None,
        predict: Dataset | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        tokenizer: Any = None,
        answer_format: AnswerFormat | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        image_size: int | Sequence[int] = 224,
        resize: str = "pad_square",
        image_transform: ResizeTransform | None = None,
        template: PromptTemplate | str = DEFAULT_TEMPLATE,
        instructions: Mapping[str, str] | str | None = None,
        max_length: int = 256,
        on_bad_sample: str = "error",
        keep_raw_images: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"VLDataModule: on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"VLDataModule: resize must be one of {RESIZE_MODES}, got {resize!r}")
        if tokenizer is None:
            from vlzoo.data.tokenizer import shapes_tokenizer

            tokenizer = shapes_tokenizer()
        self.train_dataset = train
        self.val_datasets = self._named(val, "val")
        self.test_datasets = self._named(test, "test")
        self.predict_dataset = predict
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.tokenizer = tokenizer
        self.answer_format = answer_format if answer_format is not None else AnswerFormat()
        self.transform = image_transform or ResizeTransform(size=image_size, mode=resize, mean=image_mean, std=image_std)
        self.template = template if isinstance(template, PromptTemplate) else PromptTemplate(text=template)
        self.instructions = instruction_table(instructions)
        self.max_length = int(max_length)
        self.on_bad_sample = on_bad_sample
        self.keep_raw_images = bool(keep_raw_images)
        self.seed = int(seed)
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    @staticmethod
    def _named(value: DatasetArg, default: str) -> dict[str, Dataset]:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        return {default: value}

    @property
    def val_names(self) -> list[str]:
        """Names of the validation dataloaders, in dataloader-index order."""
        return list(self.val_datasets)

    @property
    def test_names(self) -> list[str]:
        """Names of the test dataloaders, in dataloader-index order."""
        return list(self.test_datasets)

    def collate(self, *, require_answers: bool = True) -> VLCollate:
        """The collate this datamodule uses (also handy outside Lightning)."""
        return VLCollate(
            tokenizer=self.tokenizer,
            answer_format=self.answer_format,
            transform=self.transform,
            template=self.template,
            max_length=self.max_length,
            keep_raw_images=self.keep_raw_images,
            require_answers=require_answers,
        )

    def _loader(self, dataset: Dataset, *, train: bool, batch_size: int, require_answers: bool = True) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if train else None
        wrapped = _SkipTolerant(_Reworded(dataset, self.instructions) if self.instructions else dataset, self.on_bad_sample)
        return _CountingLoader(
            wrapped,
            batch_size=batch_size,
            sampler=self._train_sampler(wrapped, batch_size) if train else _unrepeated_sampler(wrapped),
            num_workers=self.num_workers,
            collate_fn=self.collate(require_answers=require_answers),
            generator=generator,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    @staticmethod
    def missing_split(split: str) -> DataError:
        """The error for a ``split`` (``train``, ``val``, ``test``, ``predict``) the recipe does not give."""
        shapes_split = split if split in ("train", "val") else "test"
        example = f"{{_target_: vlzoo.data.ShapesDataset, split: {shapes_split}, size: 16}}"
        return DataError(
            f"the recipe's data slot has no '{split}' dataset (key data.{split}); add one to the recipe "
            f"or on the command line, e.g. 'data.{split}={example}'"
        )

    def _need(self, dataset: Any, split: str) -> Any:
        if not dataset:
            raise self.missing_split(split)
        return dataset

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._need(self.train_dataset, "train"), train=True, batch_size=self.batch_size)

    def _train_sampler(self, dataset: Dataset, batch_size: int) -> ResumableShuffle:
        import torch.distributed as dist

        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        sampler = ResumableShuffle(dataset, seed=self.seed, batch_size=batch_size, num_replicas=world, rank=rank)
        if self._resume_at is not None:
            sampler.resume_at(*self._resume_at)
            self._resume_at = None
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data (saved in every checkpoint by Lightning): the epoch
        and how many of its batches were trained on; empty outside ``fit``."""
        trainer = self.trainer
        if trainer is None or self.train_dataset is None or trainer.state.fn != "fit":
            return {}
        epoch = int(trainer.current_epoch)
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        total = trainer.num_training_batches
        if isinstance(total, int) and done >= total:  # saved at the end of an epoch: the next one is due
            epoch, done = epoch + 1, 0
        return {"train_epoch": epoch, "train_batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where the checkpoint left it (Lightning calls this before
        it asks for the train dataloader)."""
        if "train_epoch" in state_dict:
            self._resume_at = (int(state_dict["train_epoch"]), int(state_dict.get("train_batches_done", 0)))

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [
            self._loader(d, train=False, batch_size=self.eval_batch_size)
            for d in self._need(self.val_datasets, "val").values()
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [
            self._loader(d, train=False, batch_size=self.eval_batch_size)
            for d in self._need(self.test_datasets, "test").values()
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def predict_dataloader(self) -> DataLoader:
        dataset = self._need(self.predict_dataset, "predict")
        return self._loader(dataset, train=False, batch_size=self.eval_batch_size, require_answers=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Batch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

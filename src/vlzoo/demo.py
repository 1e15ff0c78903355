"""``vlzoo demo CHECKPOINT|DIR [...]``: ask trained models about an image in the browser.

A Gradio app (the optional ``demo`` extra: ``pip install -e '.[demo]'``) served on 127.0.0.1:
upload an image or pick one of the examples (scenes of the Shapes test split), type an
expression, choose the task, and see each model's overlay and its JSON answer
(:func:`vlzoo.inference.predictions_to_json`).  Several models answer side by side - the
head-to-head study, live.  The answer is the one :func:`vlzoo.load` gives (the endpoint
``/answer`` serves it to ``gradio_client`` as well).

When a model has an audio reference slot (``backbone.references`` with ``audio``) the page also
takes a spoken reference - a WAV upload or a microphone recording - in place of the expression
(``/answer`` then has a fifth input, the clip), and the examples include the Shapes scenes with
their expressions spoken by espeak-ng when it is installed.  When a model takes a region as a
reference (``crop`` or ``box`` in ``backbone.references``) the page also takes a referred region
(``x1,y1,x2,y2`` in the image's pixels) and the kind to write it as (the model's default, crop or
box): ``/answer``'s last two inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlzoo.config import RecipeError
from vlzoo.inference import CATEGORY_TASKS, SPATIAL_REFERENCES, TrainedModel, load

__all__ = ["make_app", "shapes_examples", "spoken_examples", "hears", "region_kinds", "serve", "API_NAME"]

#: The endpoint of the answer (``gradio_client``: ``client.predict(..., api_name="/answer")``).
API_NAME = "answer"


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise RecipeError(
            "vlzoo demo needs Gradio, an optional dependency: pip install -e '.[demo]' (or pip install gradio)"
        ) from None
    return gr


def hears(models: Sequence[TrainedModel]) -> bool:
    """Whether any of ``models`` takes a spoken reference (an audio reference slot)."""
    return any("audio" in m.reference_modalities for m in models)


#: The referred-region kind that leaves the choice to each model (its backbone's first spatial one).
MODEL_DEFAULT = "model default"


def region_kinds(models: Sequence[TrainedModel]) -> list[str]:
    """The region references (``crop``, ``box``) any of ``models`` takes, in that order."""
    return [kind for kind in SPATIAL_REFERENCES if any(kind in m.reference_modalities for m in models)]


def shapes_examples(models: Sequence[TrainedModel], folder: str | Path, *, count: int = 4) -> list[list[Any]]:
    """``[[image.png, expression, task, box], ...]``: scenes of the Shapes test split (the
    first model recipe's own test split when it is Shapes) saved as PNG files in ``folder``, one
    per task the models do, taken in turn.  When the models :func:`hears`, every row has a fifth
    column, the spoken clip (``None`` for a text row), and the rec / res scenes come again with
    their expression spoken (:func:`spoken_examples`)."""
    from PIL import Image

    from vlzoo.data import ShapesDataset

    tasks = [t for t in dict.fromkeys(t for m in models for t in m.tasks) if t in ("rec", "res", "det", "seg", "pose", "reg")]
    if not tasks:
        return []
    node = models[0].recipe.get("data.test")
    image_size = 64
    if isinstance(node, dict) and str(node.get("_target_", "")).endswith("ShapesDataset"):
        image_size = int(node.get("image_size", image_size))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        sample = ShapesDataset(split="test", size=count, image_size=image_size, tasks=[task], seed=0)[i]
        path = folder / f"shapes-test-{i}-{task}.png"
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(path)
        box = ""
        if task in CATEGORY_TASKS:
            expression = str(sample.category_name)
        elif task == "reg":
            expression = ""
            box = ",".join(f"{v:.0f}" for v in sample.prompt_boxes[0].tolist())
        else:
            expression = sample.targets.expressions[0]
        rows.append([str(path), expression, task, box])
    if hears(models):
        rows = [row + [None] for row in rows] + spoken_examples(rows, folder)
    return rows


def spoken_examples(rows: Sequence[Sequence[Any]], folder: Path) -> list[list[Any]]:
    """The rec / res rows of ``rows`` with the expression spoken instead
    (``[image.png, "", task, "", clip.wav]``, espeak-ng's first Spoken Shapes voice, cached as
    Spoken Shapes caches); none when espeak-ng is not installed."""
    import shutil

    from vlzoo.data.speech import EspeakSynthesizer, SynthesizerMissing
    from vlzoo.data.spoken import DEFAULT_SPEEDS, DEFAULT_VOICES

    spoken = [row for row in rows if row[2] in ("rec", "res") and row[1]]
    if not spoken:
        return []
    try:
        synthesizer = EspeakSynthesizer()
    except SynthesizerMissing:
        return []
    out: list[list[Any]] = []
    for index, (image, expression, task, *_rest) in enumerate(spoken):
        synthesizer(expression, voice=DEFAULT_VOICES[0], speed=DEFAULT_SPEEDS[1])
        cached, _ = synthesizer.paths(expression, DEFAULT_VOICES[0], DEFAULT_SPEEDS[1])
        clip = folder / f"spoken-{index}-{task}.wav"
        shutil.copyfile(cached, clip)
        out.append([image, "", task, "", str(clip)])
    return out


def _box(text: str | None, name: str = "box") -> list[float] | None:
    if not text or not str(text).strip():
        return None
    values = [v for v in str(text).replace(" ", "").split(",") if v]
    try:
        box = [float(v) for v in values]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"{name} {text!r}: give four numbers x1,y1,x2,y2 in the image's pixels")
    return box


def make_app(models: Sequence[TrainedModel], *, examples_dir: str | Path | None = None, title: str = "vlzoo demo") -> Any:
    """The Gradio ``Blocks`` app answering with every model in ``models`` side by side."""
    gr = _gradio()
    if not models:
        raise RecipeError("vlzoo demo needs at least one checkpoint or export folder")
    work = Path(examples_dir) if examples_dir is not None else Path(tempfile.mkdtemp(prefix="vlzoo-demo-"))
    overlays = work / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(t for m in models for t in m.tasks))  # what the models were trained for
    counter = {"n": 0}

    spoken, kinds = hears(models), region_kinds(models)

    def answer(image: str | None, expression: str, task: str, box: str, *rest: Any) -> list[Any]:
        if image is None:
            raise gr.Error("upload an image or pick an example first")
        rest_list = list(rest)
        audio = rest_list.pop(0) if spoken else None
        region, kind = (rest_list[0], rest_list[1]) if kinds else (None, None)
        out: list[Any] = []
        counter["n"] += 1
        for index, model in enumerate(models):
            target = overlays / f"answer-{counter['n']}-{index}.png"
            try:
                result = model.answer(image, expression or None, task=task, box=_box(box), overlay=target,
                                      audio=audio or None, reference_box=_box(region, "referred region"),
                                      reference_kind=None if kind in (None, "", MODEL_DEFAULT) else kind)
                for key in ("image", "overlay", "audio"):  # the server's copies of the uploads
                    result.pop(key, None)
                out += [str(target), result]
            except ValueError as err:
                out += [None, {"error": str(err)}]
        return out

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nAsk {'these models' if len(models) > 1 else 'a trained model'} where things are: "
                    "upload an image or pick an example, type an expression (a category name for det / seg / pose), "
                    "choose the task. For reg, give the region as x1,y1,x2,y2."
                    + (" Or say what to find: upload or record a spoken reference and leave the expression empty."
                       if spoken else "")
                    + (" Or point at what to find: give a region as x1,y1,x2,y2 (referred to as a "
                       + " or ".join(kinds) + ") and leave the expression empty." if kinds else ""))
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", format="png", label="image", sources=["upload", "clipboard"])
                expression = gr.Textbox(label="expression", placeholder="the red circle", elem_id="expression")
                task = gr.Dropdown(choices=tasks, value=tasks[0], label="task", elem_id="task")
                box = gr.Textbox(label="box (x1,y1,x2,y2, for reg)", value="", elem_id="box")
                inputs = [image, expression, task, box]
                if spoken:
                    inputs.append(gr.Audio(type="filepath", format="wav", sources=["upload", "microphone"],
                                           label="spoken reference (in place of the expression)", elem_id="audio"))
                if kinds:
                    inputs.append(gr.Textbox(label="referred region (x1,y1,x2,y2, in place of the expression)",
                                             value="", elem_id="ref-box"))
                    inputs.append(gr.Dropdown(choices=[MODEL_DEFAULT, *kinds], value=MODEL_DEFAULT,
                                              label="refer to the region as", elem_id="ref-kind"))
                button = gr.Button("Answer", variant="primary", elem_id="answer-button")
        outputs: list[Any] = []
        with gr.Row():
            for index, model in enumerate(models):
                with gr.Column():
                    gr.Markdown(f"### {model.name}\n`{getattr(model.model, 'name', '')}` · {', '.join(model.tasks)} · "
                                f"`{model.source.name}`")
                    outputs.append(gr.Image(label=f"overlay ({model.name})", show_label=False, type="filepath",
                                            interactive=False))
                    outputs.append(gr.JSON(label=f"answer ({model.name})", elem_id=f"answer-{index}"))
        rows = shapes_examples(models, work / "examples")
        if kinds:  # the examples ask with text or speech: no referred region
            rows = [[*row, "", MODEL_DEFAULT] for row in rows]
        if rows:
            gr.Examples(examples=rows, inputs=inputs, label="Shapes test scenes")
        button.click(answer, inputs=inputs, outputs=outputs, api_name=API_NAME)
    return app


def serve(
    paths: Sequence[str | Path],
    *,
    port: int | None = None,
    allow_targets: Sequence[str] = (),
    block: bool = True,
) -> Any:
    """Load every model in ``paths`` and serve the app on ``127.0.0.1:port`` (Gradio picks a free
    port from 7860 when ``port`` is ``None``).  With ``block=False`` it returns the running app
    (``app.close()`` stops it)."""
    _gradio()
    models = [load(p, allow_targets=allow_targets) for p in paths]
    app = make_app(models)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=not block, share=False,
               show_error=True, quiet=not block)
    return app

"""Training overhead of vlzoo against a hand-written loop, and utilisation against the matmul peak.

For each tiny Shapes recipe, one ``vlzoo.build(recipe)`` gives the model, the datamodule and the
trainer.  The model is copied (``copy.deepcopy``, before ``fit``) for a hand-written loop:
``model.loss(batch)`` -> ``weighted_total`` -> ``backward`` -> gradient clipping as the recipe's
trainer (``gradient_clip_val``) -> the recipe's optimizer step -> the recipe's scheduler step.

Both sides train on the same pre-collated batches in the same order.  The vlzoo side keeps its
whole data path (``VLDataModule``'s loader, ``ResumableShuffle``, the skip-tolerant wrapper)
except the Shapes rendering and collation: its dataset yields indices and its collate hands out
the pre-collated batches.  The two are interleaved: ``trainer.fit`` runs, and every ``--chunk``
steps a callback runs the hand loop for as many steps, so each ratio sees the same machine load;
the first chunk of each side is a warm-up and not counted.  The losses of both sides are
compared step by step (the same model, batches and optimizer give the same losses).

Utilisation: FLOPs of one training step (forward + backward, ``FlopCounterMode``) times the hand
loop's steps/s, against the fp32 matmul peak of this core measured here (``--peak-size`` square
matmuls, one thread), measured in a short burst after every hand-loop chunk (the best burst
is the peak under the run's load; the line at the start is a quieter 2 s measurement).  ``data/step`` is the time the recipe's own loader takes to render and
collate a batch (``num_workers: 0``: on the training thread), as a share of a hand-loop step -
what ``vlzoo fit`` adds on top of the framework when the data is generated on the fly.
``--profile`` prints torch.profiler's top ops by self CPU time of a few
hand-loop steps.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py                      # every tiny recipe
    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py heatmap_rec --steps 300 --profile
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset

from vlzoo.build import build  # not vlzoo.build: importing the submodule replaces that name

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
#: recipes that need another run's checkpoint (a trained LMM to read): not benchmarked
NEEDS_CHECKPOINT = ("attention_keypoints_res_grounded",)


def tiny_recipes() -> list[str]:
    return [p.stem for p in sorted(RECIPES.glob("*.yaml")) if p.stem not in NEEDS_CHECKPOINT]


class _Indices(Dataset):
    """The vlzoo side's training set: index ``i`` stands for the i-th pre-collated sample slot."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class _Precollated:
    """A collate function that ignores its items and hands out the pre-collated batches in turn."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches
        self.position = 0

    def __call__(self, items: list[Any]) -> Any:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch


class HandLoop:
    """``loss -> weighted total -> backward -> clip -> optimizer step -> scheduler step``."""

    def __init__(self, model: Any, *, total_steps: int, clip: float | None, batches: list[Any]) -> None:
        self.model = model
        self.batches = batches
        self.position = 0
        groups = [g for g in model.param_groups() if g["params"]]
        factory = model.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.optimizer = factory(groups)
        self.params = [p for g in groups for p in g["params"]]
        self.scheduler = None
        if model.scheduler_factory is not None:
            kwargs = {}
            bound = getattr(model.scheduler_factory, "keywords", {}) or {}
            func = getattr(model.scheduler_factory, "func", model.scheduler_factory)
            if "total_steps" not in bound and "total_steps" in inspect.signature(func).parameters:
                kwargs["total_steps"] = total_steps
            self.scheduler = model.scheduler_factory(self.optimizer, **kwargs)
        self.clip = clip
        self.losses: list[torch.Tensor] = []

    def step(self, batch: Any) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        total = self.model.weighted_total(self.model.loss(batch))
        total.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return total.detach()

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            self.losses.append(self.step(batch))


class Interleave(Callback):
    """Times ``trainer.fit`` in chunks of ``chunk`` steps and runs the hand loop for a chunk
    between them (the hand loop's time is not counted on the vlzoo side)."""

    def __init__(self, hand: HandLoop, chunk: int, peak_size: int) -> None:
        self.hand = hand
        self.chunk = chunk
        self.peak_size = peak_size
        self.peaks: list[float] = []
        self.vlzoo_times: list[float] = []
        self.hand_times: list[float] = []
        self.losses: list[torch.Tensor] = []
        self._mark: float | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.chunk:
            return
        now = time.perf_counter()
        if self._mark is not None:
            self.vlzoo_times.append(now - self._mark)
            start = time.perf_counter()
            self.hand.run(self.chunk)
            self.hand_times.append(time.perf_counter() - start)
            self.peaks.append(matmul_peak(self.peak_size, seconds=0.3, rounds=1))  # under the same load
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach())


def build_pair(name: str, *, steps: int, chunk: int, distinct: int, output_dir: str, overrides: list[str]) -> tuple:
    recipe = RECIPES / f"{name}.yaml"
    built = build(
        recipe,
        overrides=[
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=-1",
            "trainer.max_time=null",
            f"trainer.val_check_interval={10 * steps}",  # no validation: the hand loop does not validate
            "data.num_workers=0",
            *overrides,
        ],
        output_dir=output_dir,
    )
    dm = built.datamodule
    dm.setup("fit")
    batches = []
    start = time.perf_counter()
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == distinct:
            break
    built.data_seconds = (time.perf_counter() - start) / len(batches)  # render + collate, per batch
    batch_size = len(batches[0])
    hand = HandLoop(
        copy.deepcopy(built.model),
        total_steps=steps,
        clip=built.trainer.gradient_clip_val,
        batches=batches,
    )
    feeder = _Precollated(batches)
    dm.train_dataset = _Indices(steps * batch_size)  # enough for all steps in one epoch
    dm.collate = lambda require_answers=True: feeder  # the loader, sampler and wrapper stay vlzoo's
    return built, hand, batches


def step_flops(hand: HandLoop, batch: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(hand.model)
    model.train()
    with FlopCounterMode(display=False) as counter:
        total = model.weighted_total(model.loss(batch))
        total.backward()
    return counter.get_total_flops()


def matmul_peak(size: int, seconds: float = 2.0, rounds: int = 3) -> float:
    """fp32 GFLOP/s of repeated ``size x size`` matmuls on this thread (best of ``rounds``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            torch.mm(a, b, out=out)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start) / 1e9)
    return best


def compiled_speedup(hand: HandLoop, *, clip: float | None, total_steps: int, chunks: int, chunk: int) -> str:
    """Eager hand loop against the same loop with every submodule of the paradigm compiled in place
    (``nn.Module.compile``: inductor; the loss code around them stays eager), same batches,
    interleaved; the compiled copy starts from the eager one's weights and optimizer state."""
    eager = HandLoop(copy.deepcopy(hand.model), total_steps=total_steps, clip=clip, batches=hand.batches)
    compiled_model = copy.deepcopy(hand.model)
    compiled = HandLoop(compiled_model, total_steps=total_steps, clip=clip, batches=hand.batches)
    for _, child in compiled_model.named_children():
        if any(True for _ in child.parameters()):
            child.compile()
    start = time.perf_counter()
    compiled.run(2)
    compile_seconds = time.perf_counter() - start
    eager.run(2)
    t_eager = t_compiled = 0.0
    for _ in range(chunks):
        start = time.perf_counter()
        eager.run(chunk)
        t_eager += time.perf_counter() - start
        start = time.perf_counter()
        compiled.run(chunk)
        t_compiled += time.perf_counter() - start
    dloss = max(abs(float(a) - float(b)) for a, b in zip(eager.losses, compiled.losses, strict=True))
    n = chunks * chunk
    return (f"compiled submodules: first 2 steps {compile_seconds:.0f} s (compilation); then eager {n / t_eager:.2f} "
            f"steps/s, compiled {n / t_compiled:.2f} steps/s: {t_eager / t_compiled:.2f}x; max |loss difference| "
            f"over {len(eager.losses)} steps {dloss:.1e}")


def profile_table(hand: HandLoop, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    hand.run(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hand.run(steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names under recipes/shapes (default: every tiny one)")
    parser.add_argument("--steps", type=int, default=240, help="training steps per side (default 240)")
    parser.add_argument("--chunk", type=int, default=20, help="steps per interleaved chunk (default 20)")
    parser.add_argument("--distinct", type=int, default=20, help="distinct pre-collated batches, cycled")
    parser.add_argument("--peak-size", type=int, default=1024)
    parser.add_argument("--profile", action="store_true", help="print the top ops by self CPU time")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true",
                        help="also time the hand loop with the paradigm's submodules compiled (inductor)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every recipe (e.g. trainer.log_every_n_steps=1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CI", "1")  # no progress bar: the per-validation line, as `vlzoo fit` piped
    names = args.recipes or tiny_recipes()
    peak = matmul_peak(args.peak_size)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 matmul peak "
          f"({args.peak_size}^2) {peak:.1f} GFLOP/s; {args.steps} steps per side in chunks of {args.chunk}, "
          f"first chunk not counted")
    header = (f"{'recipe':34s} {'vlzoo st/s':>10s} {'hand st/s':>10s} {'overhead':>9s} {'GFLOP/step':>10s} "
              f"{'GFLOP/s':>8s} {'peak':>6s} {'% peak':>7s} {'max|dloss|':>10s} {'data/step':>9s}")
    print(header)
    tables = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                built, hand, batches = build_pair(name, steps=args.steps, chunk=args.chunk, distinct=args.distinct,
                                                  output_dir=tmp, overrides=args.set)
            except Exception as err:  # noqa: BLE001 - report and go on with the other recipes
                print(f"{name:34s} not built: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            flops = step_flops(hand, batches[0])
            inter = Interleave(hand, args.chunk, args.peak_size)
            built.trainer.callbacks.append(inter)
            built.trainer.fit(built.model, datamodule=built.datamodule)
            n = min(len(inter.vlzoo_times), len(inter.hand_times))
            t_vlzoo, t_hand = sum(inter.vlzoo_times[:n]), sum(inter.hand_times[:n])
            counted = n * args.chunk
            vlzoo_rate, hand_rate = counted / t_vlzoo, counted / t_hand
            overhead = t_vlzoo / t_hand - 1.0
            k = min(len(inter.losses), len(hand.losses))
            dloss = max(abs(float(a) - float(b)) for a, b in zip(inter.losses[:k], hand.losses[:k], strict=True))
            gflops = flops / 1e9
            achieved = gflops * hand_rate
            peak = max(inter.peaks)  # the best burst between the chunks: the core's peak under this load
            print(f"{name:34s} {vlzoo_rate:10.2f} {hand_rate:10.2f} {100 * overhead:8.1f}% {gflops:10.3f} "
                  f"{achieved:8.1f} {peak:6.1f} {100 * achieved / peak:6.1f}% {dloss:10.1e} {100 * built.data_seconds * hand_rate:8.1f}%",
                  flush=True)
            if args.compile:
                try:
                    line = compiled_speedup(hand, clip=built.trainer.gradient_clip_val, total_steps=args.steps,
                                            chunks=4, chunk=args.chunk // 2 or 1)
                except Exception as err:  # noqa: BLE001 - inductor may refuse a model: say so, go on
                    line = f"compiled submodules failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"  {name}: {line}", flush=True)
            if args.profile:
                tables.append((name, profile_table(hand, 5, args.profile_rows)))
            if built.logger is not None:
                built.logger.finalize("success")
    for name, table in tables:
        print(f"\n{name}: top ops by self CPU time, 5 hand-loop steps\n{table}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

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
the first chunk pair is both sides' warm-up and not counted.  The losses of both sides are
compared step by step (the same model, batches and optimizer give the same losses).

Overhead, two ways: ``wall ovh`` is the total wall time of the vlzoo chunks over the hand
chunks', minus 1; ``CPU ovh`` is the median over chunk pairs of the main thread's CPU time
(``time.thread_time``: the time another process holds the core is not in it) of the vlzoo chunk
over the hand chunk, minus 1, with its quartiles - on a shared machine the median of pairs is
the figure to read.  ``--phases`` splits both sides' CPU time per step into phases (forward,
backward, optimizer, Lightning's hooks, between steps).

Utilisation: FLOPs of one training step (forward + backward, ``FlopCounterMode``) times the hand
loop's steps per CPU second, against the fp32 matmul peak of this core per CPU second
(``--peak-size`` square matmuls, one thread), measured in a short burst after every hand-loop
chunk (the best burst is the peak under the run's load; the line at the start is a 2 s
measurement).  ``data/step`` is the time the recipe's own loader takes to render and collate a
batch (``num_workers: 0``: on the training thread), as a share of a hand-loop step - what
``vlzoo fit`` adds on top of the framework when the data is generated on the fly.
``--closure-order N`` times the hand loop against itself in Lightning's order (the forward inside
``optimizer.step(closure)``, ``zero_grad`` between forward and backward), with no Lightning in
either, over N chunk pairs.  ``--profile`` prints torch.profiler's top ops by self CPU time of a
few hand-loop steps;
``--set`` overrides every recipe (e.g. a wider model, for utilisation against model size).

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py                      # every tiny recipe
    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py pixel2emb_rec --steps 300 --phases
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

from vlzoo.allocator import keep_freed_memory
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
        self.phases: PhaseClock | None = None  # set by --phases

    def step(self, batch: Any) -> torch.Tensor:
        clock = self.phases
        if clock is not None:
            clock.mark()
        self.optimizer.zero_grad(set_to_none=True)
        if clock is not None:
            clock.mark("zero_grad")
        total = self.model.weighted_total(self.model.loss(batch))
        if clock is not None:
            clock.mark("forward")
        total.backward()
        if clock is not None:
            clock.mark("backward")
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if clock is not None:
            clock.mark("clip + optimizer + scheduler")
            clock.steps += 1
        return total.detach()

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            self.losses.append(self.step(batch))


class PhaseClock:
    """CPU time (``time.thread_time``) of the phases of a training step, summed over steps:
    ``mark(name)`` charges the time since the previous mark to ``name``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0
        self._last: float | None = None

    def mark(self, name: str | None = None) -> None:
        now = time.thread_time()
        if name is not None and self._last is not None:
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1000 * v / max(self.steps, 1) for k, v in self.seconds.items()}


class VlzooPhases(Callback):
    """The vlzoo side's phases, from Lightning's hooks (this callback runs after ``Interleave``,
    so a hand-loop chunk is never inside a phase): from the start of the step to
    ``training_step``, ``training_step`` itself, to ``on_before_backward``, the backward, to
    ``on_before_optimizer_step``, from there to this callback's ``on_train_batch_end`` (gradient
    clipping, the optimizer and scheduler steps, Lightning's bookkeeping) and from there to the
    next step's start (the module's ``on_train_batch_end``, the loggers, the next batch)."""

    BETWEEN = "end of step -> next step (logging, next batch)"

    def __init__(self, model: Any, chunk: int, hand: HandLoop) -> None:
        self.clock = PhaseClock()
        self.chunk = chunk
        self.hand = hand
        self.between_steps = 0  # steps the between-steps phase was measured on
        inner = model.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self.clock.mark("start -> training_step (optimizer, closure)")
            out = inner(*args, **kwargs)
            self.clock.mark("training_step (forward)")
            return out

        model.training_step = training_step  # on the instance: Lightning calls it by name

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.chunk:  # both sides' first chunk is a warm-up: start counting now
            self.clock, self.between_steps = PhaseClock(), 0
            self.hand.phases = PhaseClock()
        if trainer.global_step % self.chunk and self.clock.steps:
            self.clock.mark(self.BETWEEN)  # not across a hand-loop chunk
            self.between_steps += 1
        else:
            self.clock.mark()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        self.clock.mark("training_step -> backward (closure, zero_grad)")

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.clock.mark("backward")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.clock.mark("backward -> optimizer hooks")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.mark("clip + optimizer + scheduler + Lightning")
        self.clock.steps += 1


def phase_table(vlzoo: VlzooPhases, hand: PhaseClock) -> str:
    """Both sides' phases in ms of CPU time per step (the between-steps phase per step it was
    measured on: every step but the first of a chunk)."""
    v, h = vlzoo.clock.per_step_ms(), hand.per_step_ms()
    if VlzooPhases.BETWEEN in v:
        v[VlzooPhases.BETWEEN] = 1000 * vlzoo.clock.seconds[VlzooPhases.BETWEEN] / max(vlzoo.between_steps, 1)
    lines = [f"  {'vlzoo phase':48s} {'ms/step':>8s}    {'hand-loop phase':30s} {'ms/step':>8s}"]
    left, right = list(v.items()), list(h.items())
    for i in range(max(len(left), len(right))):
        a = f"  {left[i][0]:48s} {left[i][1]:8.2f}" if i < len(left) else f"  {'':48s} {'':8s}"
        b = f"    {right[i][0]:30s} {right[i][1]:8.2f}" if i < len(right) else ""
        lines.append(a + b)
    lines.append(f"  {'total':48s} {sum(v.values()):8.2f}    {'total':30s} {sum(h.values()):8.2f}")
    return "\n".join(lines)


class Interleave(Callback):
    """Times ``trainer.fit`` in chunks of ``chunk`` steps and runs the hand loop for a chunk
    between them (the hand loop's time is not counted on the vlzoo side).  Each chunk's wall time
    and the main thread's CPU time (``time.thread_time``: the time another process takes the core
    is not in it) are kept per side."""

    def __init__(self, hand: HandLoop, chunk: int, peak_size: int) -> None:
        self.hand = hand
        self.chunk = chunk
        self.peak_size = peak_size
        self.peaks: list[float] = []
        self.vlzoo_times: list[float] = []
        self.hand_times: list[float] = []
        self.vlzoo_cpu: list[float] = []
        self.hand_cpu: list[float] = []
        self.losses: list[torch.Tensor] = []
        self._mark: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.chunk:
            return
        now, cpu = time.perf_counter(), time.thread_time()
        if self._mark is not None:
            self.vlzoo_times.append(now - self._mark[0])
            self.vlzoo_cpu.append(cpu - self._mark[1])
            start, start_cpu = time.perf_counter(), time.thread_time()
            self.hand.run(self.chunk)
            self.hand_times.append(time.perf_counter() - start)
            self.hand_cpu.append(time.thread_time() - start_cpu)
            self.peaks.append(matmul_peak(self.peak_size, seconds=0.3, rounds=1))  # under the same load
        self._mark = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach())

    def overheads(self) -> dict[str, float]:
        """Over every chunk pair but the first (both sides' warm-up): ``wall``: total vlzoo wall
        time over total hand-loop wall time, minus 1; ``cpu``: the median over chunk pairs of vlzoo CPU time / hand CPU time, minus 1,
        with ``cpu_q1`` / ``cpu_q3`` its quartiles (a chunk that another process slowed moves the
        sum, not the median)."""
        n = min(len(self.vlzoo_times), len(self.hand_times))
        ratios = sorted(v / h - 1.0 for v, h in zip(self.vlzoo_cpu[1:n], self.hand_cpu[1:n], strict=True))

        def quantile(q: float) -> float:
            at = q * (len(ratios) - 1)
            low = int(at)
            high = min(low + 1, len(ratios) - 1)
            return ratios[low] + (ratios[high] - ratios[low]) * (at - low)

        vlzoo_wall, hand_wall = sum(self.vlzoo_times[1:n]), sum(self.hand_times[1:n])
        return {
            "chunks": n - 1,  # the first pair is both sides' warm-up
            "wall": vlzoo_wall / hand_wall - 1.0,
            "cpu": quantile(0.5),
            "cpu_q1": quantile(0.25),
            "cpu_q3": quantile(0.75),
            "vlzoo_rate": (n - 1) * self.chunk / vlzoo_wall,
            "hand_rate": (n - 1) * self.chunk / hand_wall,
            "hand_cpu_rate": (n - 1) * self.chunk / sum(self.hand_cpu[1:n]),
        }


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
    """fp32 GFLOP per second of this thread's CPU time of repeated ``size x size`` matmuls (best of
    ``rounds``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(rounds):
        n, start, start_cpu = 0, time.perf_counter(), time.thread_time()
        while time.perf_counter() - start < seconds / rounds:
            torch.mm(a, b, out=out)
            n += 1
        best = max(best, 2 * size**3 * n / (time.thread_time() - start_cpu) / 1e9)  # per CPU second, as the steps
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


class ClosureLoop(HandLoop):
    """The hand loop in Lightning's order: ``optimizer.step(closure)``, the closure running the
    forward, then ``zero_grad``, then the backward and the clipping (Lightning's automatic
    optimization), then the scheduler step."""

    def step(self, batch: Any) -> torch.Tensor:
        def closure() -> torch.Tensor:
            total = self.model.weighted_total(self.model.loss(batch))
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            return total

        total = self.optimizer.step(closure)
        if self.scheduler is not None:
            self.scheduler.step()
        return total.detach()


def closure_order(hand: HandLoop, *, clip: float | None, total_steps: int, chunks: int, chunk: int) -> str:
    """The hand loop against the same loop in Lightning's order (``ClosureLoop``), no Lightning
    in either: same batches, copies of the same model, interleaved chunks, CPU time."""
    plain = HandLoop(copy.deepcopy(hand.model), total_steps=total_steps, clip=clip, batches=hand.batches)
    lightning_order = ClosureLoop(copy.deepcopy(hand.model), total_steps=total_steps, clip=clip, batches=hand.batches)
    plain.run(chunk)
    lightning_order.run(chunk)
    ratios = []
    t_plain = t_closure = 0.0
    for _ in range(chunks):
        start = time.thread_time()
        plain.run(chunk)
        a = time.thread_time() - start
        start = time.thread_time()
        lightning_order.run(chunk)
        b = time.thread_time() - start
        t_plain, t_closure = t_plain + a, t_closure + b
        ratios.append(b / a - 1.0)
    ratios.sort()
    dloss = max(abs(float(x) - float(y)) for x, y in zip(plain.losses, lightning_order.losses, strict=True))
    n = chunks * chunk
    return (f"hand loop {1000 * t_plain / n:.2f} ms CPU/step, in Lightning's closure order "
            f"{1000 * t_closure / n:.2f} ms CPU/step: {100 * ratios[len(ratios) // 2]:+.1f} % (median of {chunks} "
            f"chunk pairs; quartiles {100 * ratios[len(ratios) // 4]:+.1f} / {100 * ratios[(3 * len(ratios)) // 4]:+.1f} %); "
            f"max |loss difference| {dloss:.1e}")


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
    parser.add_argument("--closure-order", type=int, default=0, metavar="CHUNKS",
                        help="also time the hand loop against itself in Lightning's closure order, CHUNKS chunk pairs")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's allocator defaults (vlzoo fit sets it to keep freed memory: vlzoo.allocator)")
    parser.add_argument("--phases", action="store_true",
                        help="print both sides' CPU time per step by phase (forward, backward, optimizer, between steps)")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true",
                        help="also time the hand loop with the paradigm's submodules compiled (inductor)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override for every recipe (e.g. trainer.log_every_n_steps=1)")
    args = parser.parse_args()
    if args.steps < 3 * args.chunk:
        parser.error(f"--steps ({args.steps}) must be at least 3 x --chunk ({args.chunk}): the first chunk pair is a "
                     "warm-up, and the last chunk of vlzoo steps has no hand chunk after it")
    torch.set_num_threads(1)
    if not args.system_malloc:
        keep_freed_memory()  # as `vlzoo fit` (process-wide: both sides)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CI", "1")  # no progress bar: the per-validation line, as `vlzoo fit` piped
    names = args.recipes or tiny_recipes()
    peak = matmul_peak(args.peak_size)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 matmul peak "
          f"({args.peak_size}^2) {peak:.1f} GFLOP/s; {args.steps} steps per side in chunks of {args.chunk}, "
          f"first chunk not counted")
    header = (f"{'recipe':34s} {'vlzoo st/s':>10s} {'hand st/s':>10s} {'wall ovh':>9s} {'CPU ovh [quartiles]':>22s} "
              f"{'GFLOP/step':>10s} {'GFLOP/s':>8s} {'peak':>6s} {'% peak':>7s} {'max|dloss|':>10s} {'data/step':>9s}")
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
            phases = None
            if args.phases:
                phases = VlzooPhases(built.model, args.chunk, hand)
                built.trainer.callbacks.append(phases)  # after Interleave: no hand-loop chunk inside a phase
                hand.phases = PhaseClock()
            built.trainer.fit(built.model, datamodule=built.datamodule)
            o = inter.overheads()
            vlzoo_rate, hand_rate = o["vlzoo_rate"], o["hand_rate"]
            k = min(len(inter.losses), len(hand.losses))
            dloss = max(abs(float(a) - float(b)) for a, b in zip(inter.losses[:k], hand.losses[:k], strict=True))
            gflops = flops / 1e9
            achieved = gflops * o["hand_cpu_rate"]  # per second of the core's time given to this thread
            peak = max(inter.peaks)  # the best burst between the chunks: the core's peak under this load
            print(f"{name:34s} {vlzoo_rate:10.2f} {hand_rate:10.2f} {100 * o['wall']:8.1f}% "
                  f"{100 * o['cpu']:7.1f}% [{100 * o['cpu_q1']:5.1f},{100 * o['cpu_q3']:5.1f}] {gflops:10.3f} "
                  f"{achieved:8.1f} {peak:6.1f} {100 * achieved / peak:6.1f}% {dloss:10.1e} "
                  f"{100 * built.data_seconds * hand_rate:8.1f}%",
                  flush=True)
            if args.compile:
                try:
                    line = compiled_speedup(hand, clip=built.trainer.gradient_clip_val, total_steps=args.steps,
                                            chunks=4, chunk=args.chunk // 2 or 1)
                except Exception as err:  # noqa: BLE001 - inductor may refuse a model: say so, go on
                    line = f"compiled submodules failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"  {name}: {line}", flush=True)
            if args.closure_order:
                line = closure_order(hand, clip=built.trainer.gradient_clip_val, total_steps=args.steps,
                                     chunks=args.closure_order, chunk=args.chunk)
                print(f"  {name}: {line}", flush=True)
            if phases is not None:
                print(f"  {name}: CPU time per step by phase ({phases.clock.steps} vlzoo steps, {hand.phases.steps} "
                      f"hand-loop steps after the warm-up chunk)\n{phase_table(phases, hand.phases)}", flush=True)
                hand.phases = None
            if args.profile:
                tables.append((name, profile_table(hand, 5, args.profile_rows)))
            if built.logger is not None:
                built.logger.finalize("success")
    for name, table in tables:
        print(f"\n{name}: top ops by self CPU time, 5 hand-loop steps\n{table}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Shapes generation speed on one core: prints samples/s per task and for the full mix.

    OMP_NUM_THREADS=1 python benchmarks/bench_shapes.py [--image-size 64] [--n 3000]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlzoo.data.shapes import ShapesDataset
from vlzoo.structures import TASKS


def rate(ds: ShapesDataset, n: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process).

    The CPU figure is what one dedicated core delivers even when the machine is shared.
    """
    for i in range(50):  # warm-up
        ds[i]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Shapes @ {args.image_size}px, one core, {args.n} samples each")
    for task in TASKS:
        ds = ShapesDataset(tasks=[task], size=args.n + 50, image_size=args.image_size)
        wall, cpu = rate(ds, args.n)
        print(f"  {task:8s} {wall:8.0f} samples/s wall  {cpu:8.0f} samples/s cpu")
    ds = ShapesDataset(tasks=list(TASKS), size=args.n + 50, image_size=args.image_size)
    wall, cpu = rate(ds, args.n)
    print(f"  {'mix':8s} {wall:8.0f} samples/s wall  {cpu:8.0f} samples/s cpu  (all tasks, equal weights)")


if __name__ == "__main__":
    main()

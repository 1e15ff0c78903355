"""Two gloo CPU processes that split the same samples compute the figures of a single process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from evalgen import caption_samples, detection_samples, pose_samples, rec_samples, res_samples

from vlzoo.evaluation import Evaluator

# name -> samples; the task is the name up to "_"; "caption_one" leaves rank 1 without any sample
TASK_SAMPLES = {
    "rec": lambda: rec_samples(5, 40),
    "res": lambda: res_samples(5, 30),
    "det": lambda: detection_samples(5, 21, size=(120, 160)),
    "seg": lambda: detection_samples(6, 13, segm=True, size=(60, 80)),
    "pose": lambda: pose_samples(5, 25),
    "caption": lambda: caption_samples(5, 31),
    "caption_one": lambda: tuple(x[1:2] for x in caption_samples(7, 3)),
}


def _figures(rank: int, world: int) -> dict[str, dict[str, float]]:
    evaluator = Evaluator()
    out = {}
    for name, make in TASK_SAMPLES.items():
        preds, targets = make()
        collection = evaluator.collection(name.split("_")[0])
        # uneven shards on purpose (odd sample counts), in batches of 4
        mine = list(range(rank, len(preds), world))
        for start in range(0, len(mine), 4):
            idx = mine[start : start + 4]
            collection.update([preds[i] for i in idx], [targets[i] for i in idx])
        out[name] = {k: float(v) for k, v in collection.compute().items()}
    return out


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_figures(rank, world), os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    # fork: the workers inherit the imported modules instead of re-importing torchmetrics (slow)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    single = _figures(0, 1)
    for rank in range(2):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared.keys() == single.keys()
        for task in single:
            assert shared[task].keys() == single[task].keys()
            for key, value in single[task].items():
                assert shared[task][key] == pytest.approx(value, abs=1e-6), (task, key)
    assert single["det"]["map"] > 0 and single["pose"]["ap"] > 0 and single["rec"]["miou"] > 0

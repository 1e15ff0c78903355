"""Cost of logging training metrics to MLflow: one write per call against writes in batches.

``ResilientMLFlowLogger`` logs ``--calls`` calls of ``--metrics`` metrics each (as Lightning
hands a logger the training losses every ``log_every_n_steps`` steps), once with
``flush_seconds=0`` (a ``log_batch`` per call, as Lightning's MLFlowLogger) and once with
``--flush-seconds`` (vlzoo's default: a write at most every 5 s, and at the end), each to a new
run of the same store.  Prints the wall and CPU time per call, including the final write, and the
number of writes (each setting runs twice, alternating, and the second run is shown); then checks
that both runs hold every metric.

    python benchmarks/bench_tracking.py                                   # a SQLite store in a temporary folder
    python benchmarks/bench_tracking.py --tracking-uri http://mlflow.lab:5000
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

from vlzoo.tracking import ResilientMLFlowLogger, tracking_client, tracking_uri_for


def run(uri: str, offline: str, *, flush_seconds: float, calls: int, metrics: int) -> tuple[float, float, int, str]:
    logger = ResilientMLFlowLogger(experiment_name="bench_tracking", tracking_uri=uri, offline_dir=offline,
                                   flush_seconds=flush_seconds)
    logger.log_hyperparams({"flush_seconds": flush_seconds})  # opens the run: not timed
    writes = [0]
    inner = logger.experiment.log_batch

    def counted(*args: object, **kwargs: object) -> object:
        writes[0] += 1
        return inner(*args, **kwargs)

    logger.experiment.log_batch = counted  # type: ignore[method-assign]
    wall, cpu = time.perf_counter(), time.thread_time()
    for step in range(calls):
        logger.log_metrics({f"train/loss_{k}": 1.0 / (step + k + 1) for k in range(metrics)}, step=10 * step)
    logger.finalize("success")
    return (time.perf_counter() - wall) / calls, (time.thread_time() - cpu) / calls, writes[0], logger.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="log_metrics calls (default 200)")
    parser.add_argument("--metrics", type=int, default=10, help="metrics per call (default 10: pixel2emb's losses)")
    parser.add_argument("--flush-seconds", type=float, default=5.0)
    parser.add_argument("--tracking-uri", default=None, help="default: a SQLite store in a temporary folder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or tracking_uri_for(tmp)
        rows: dict[float, tuple[float, float, int, str]] = {}
        for flush in (0.0, args.flush_seconds, 0.0, args.flush_seconds):  # each twice, alternating: the second counts
            rows[flush] = run(uri, f"{tmp}/offline", flush_seconds=flush, calls=args.calls, metrics=args.metrics)
        print(f"{args.calls} calls of {args.metrics} metrics to {uri.split('://')[0]}://...")
        for flush, (wall, cpu, writes, run_id) in rows.items():
            history = tracking_client(uri).get_metric_history(run_id, "train/loss_0")
            complete = [m.step for m in history] == [10 * s for s in range(args.calls)]
            print(f"flush_seconds={flush:<4g} {1000 * wall:7.2f} ms wall, {1000 * cpu:7.2f} ms CPU per call; "
                  f"{writes:4d} writes; every metric in the store: {complete}")
        zero, batched = rows[0.0], rows[args.flush_seconds]
        print(f"per call saved: {1000 * (zero[0] - batched[0]):.2f} ms wall, {1000 * (zero[1] - batched[1]):.2f} ms CPU")


if __name__ == "__main__":
    main()

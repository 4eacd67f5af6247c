"""How long rank 0 holds the other ranks at the ``report`` barrier with MLflow I/O, per epoch.

Before (up to commit 23f10a3) rank 0 logged each epoch's metrics synchronously and then redrew
``training_curves.png`` from the run's whole metric history (``RunTracker.log_metrics`` +
``RunTracker.log_curves``) before it reached ``ray.train.report``; every other rank waited. Now
rank 0 queues its metrics on a :class:`ran.tracking.RunLogger` (a background thread writes them)
and the driver draws the curves once, after training.

Both are timed here on the same store, epoch by epoch, with the step metrics a run logs between
epochs (``train/step_loss``/``train/step_lr`` every ``--log-every`` of ``--steps`` steps): the stall grows with
the history when the curves are redrawn each epoch.

    python benchmarks/tracking_stall.py [--epochs 30] [--steps 200] [--log-every 20]

Prints JSON: per-epoch stall (median, last epoch, total) before and after, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ran import tracking


def _epoch_metrics(epoch: int) -> dict[str, float]:
    return {"train/loss": 2.0 / epoch, "eval/loss": 2.1 / epoch, "eval/top1": 1 - 1 / (epoch + 1),
            "eval/top5": 0.99, "train/lr": 0.1, "perf/img_per_s": 500.0, "perf/data_wait_frac": 0.01,
            "train/skipped": 0.0, "perf/epoch_time_s": 60.0}


def run(mode: str, uri: str, args: argparse.Namespace) -> list[float]:
    """Seconds rank 0 spends on MLflow at the end of each epoch, in ``mode`` before or after."""
    tracker = tracking.RunTracker.create("stall", run_name=mode, tags={}, uri=uri)
    writer = tracking.RunLogger(tracker.run_id, uri) if mode == "after" else None
    stalls = []
    step = 0
    for epoch in range(1, args.epochs + 1):
        for _ in range(args.steps // args.log_every):  # during the epoch, on the log cadence
            step += args.log_every
            metrics = {"train/step_loss": 1.0, "train/step_lr": 0.1}
            writer.log_metrics(metrics, step) if writer else tracker.log_metrics(metrics, step)
        start = time.perf_counter()
        if writer is not None:  # now: at the global step, with the epoch beside them
            writer.log_metrics({**_epoch_metrics(epoch), "epoch": epoch}, step)
        else:  # before: at step = epoch, then the curves from the whole history
            tracker.log_metrics(_epoch_metrics(epoch), epoch)
            tracker.log_curves()
        stalls.append(time.perf_counter() - start)
    if writer is not None:
        writer.close()
        assert len(tracker.history("eval/top1")) == args.epochs  # everything reached MLflow
    return stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per epoch")
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        results = {mode: run(mode, uri, args) for mode in ("before", "after")}
    summary = {mode: {"median_s": statistics.median(s), "last_epoch_s": s[-1], "total_s": sum(s)}
               for mode, s in results.items()}
    print(json.dumps({
        "epochs": args.epochs, "store": "sqlite", **summary,
        "median_stall_after_vs_before": summary["after"]["median_s"] / summary["before"]["median_s"],
        "total_stall_after_vs_before": summary["after"]["total_s"] / summary["before"]["total_s"],
    }, indent=2))


if __name__ == "__main__":
    main()

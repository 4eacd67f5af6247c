"""What Ray Train costs: a plain single-process torch loop vs `ran train` with 1 and 2 workers.

Same model (CIFAR-stem Attention-56), same synthetic shards, same loader, same batch per worker and
the same number of steps. Step time is an epoch's time over its steps, including waiting for data
as a training run does; the first epoch pays for warm-up and is left out. The plain loop runs
before and after the `ran train` runs, so that a change of load on a shared machine shows as a
spread between the two. Each side's step time is the median of its timed epochs (the plain loop's
two runs pooled); the fastest epoch is reported too. A median does not favour the side with more
epochs, as a minimum does: on a noisy machine, the minimum of more samples is lower. For
`ran train` the numbers come from its own MLflow metrics (``epoch_time_s`` and ``startup_s``:
seconds from the command's start to the first optimizer step). Each training process gets one CPU thread, as a Ray worker with
``cpus_per_worker=1`` does, so the 1-worker ratio isolates the framework's overhead.

Goals (issue 4): 1 worker within 10% of the plain loop; first step within 15 s of the command.

    python benchmarks/train_overhead.py [--size 32] [--train 1536] [--batch 32] [--epochs 4]

Prints one JSON object. The machine's load average is included: on a shared machine, timings are
only comparable with others taken at a similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def job_yaml(data: str, args: argparse.Namespace, workers: int) -> str:
    """The benchmark job (no model logging: it is not part of a training step)."""
    from ran.config import load_config

    cfg = load_config(None, {
        "name": f"overhead{workers}", "model.name": "attention56", "model.stem": "cifar",
        "data.path": data, "data.batch_size": args.batch, "data.workers": 1,
        "optim.reference_batch_size": args.batch, "schedule.kind": "constant",
        "train.epochs": args.epochs, "train.log_every": 1000, "train.precision": args.precision,
        "scaling.num_workers": workers, "scaling.max_failures": 0,
        "tracking.experiment": "overhead", "tracking.registered_model": None,
        "tracking.log_model": False,
    })
    return cfg.to_yaml()


def plain_loop(data: str, args: argparse.Namespace) -> dict[str, float]:
    """The same steps in one process, no Ray, no DDP, no MLflow."""
    import torch

    from ran.data.read import make_loader
    from ran.data.transforms import normalizer
    from ran.models import create_model
    from ran.runtime import resolve_precision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("attention56", stem="cifar", num_classes=args.classes)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loader = make_loader(data, "train", train=True, batch_size=args.batch, recipe="cifar", workers=1)
    norm = normalizer("cifar")
    bf16 = resolve_precision(args.precision, torch.device("cpu")) == "bf16"
    times = []  # seconds per epoch
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            x = norm(batch.images).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return {"epoch_times_s": times, "steps_per_epoch": len(loader)}


def summarize(timed: list[float], steps: int, images_per_step: int) -> dict[str, float]:
    """Median and fastest step time over ``timed`` epoch times (warm-up epochs left out)."""
    median = statistics.median(timed)
    return {"step_time_s": median / steps, "step_time_min_s": min(timed) / steps,
            "img_per_s": steps * images_per_step / median, "timed_epochs": len(timed)}


def ran_train(data: str, args: argparse.Namespace, workers: int, root: Path) -> dict[str, float]:
    """`ran train` as a user runs it (a subprocess starting its own local Ray)."""
    from mlflow.tracking import MlflowClient

    job = root / f"overhead{workers}.yaml"
    job.write_text(job_yaml(data, args, workers))
    uri = f"sqlite:///{root}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "ran.cli", "train", str(job)], cwd=root, env=env,
                          capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f"ran train ({workers} workers) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("overhead")
    run = client.search_runs([experiment.experiment_id], f"tags.`ran.job` = 'overhead{workers}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    steps = int(run.data.params["plan.steps_per_epoch"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch_time_s"))
    startup = client.get_metric_history(run.info.run_id, "startup_s")[0].value
    return {**summarize([v for _, v in history][1:], steps, args.batch * workers),
            "steps_per_epoch": steps, "first_step_s": startup, "wall_s": wall}


BARE_RAY_TRAIN = """
import time
from pathlib import Path
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def train_fn(config):
    Path(config["out"]).write_text(str(time.time()))

ray.init()
TorchTrainer(train_fn, train_loop_config={{"out": {out!r}}},
             scaling_config=ScalingConfig(num_workers={workers}),
             run_config=RunConfig(storage_path={storage!r})).fit()
ray.shutdown()
"""


def bare_ray_train(root: Path, workers: int) -> float:
    """Seconds from a script's start to the entry of an empty train function: Ray Train's own
    hello world (stock ``ray.init()`` and ``TorchTrainer``), the floor under any Ray Train job here."""
    out = root / f"bare{workers}.txt"
    script = BARE_RAY_TRAIN.format(out=str(out), workers=workers, storage=str(root / "bare-runs"))
    from ran.train.launch import process_start_time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    launched = process_start_time(proc.pid)  # the clock `ran train` reports startup_s on
    output, _ = proc.communicate()
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"bare Ray Train run failed:\n{output[-3000:]}")
    return float(out.read_text()) - launched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32, help="image side (px)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=1536, help="train images")
    parser.add_argument("--batch", type=int, default=32, help="batch per worker")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="train.precision of both loops (auto: bf16 only on bf16 hardware)")
    args = parser.parse_args()

    from ran.data.synth import write_synthetic

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ran-overhead-") as tmp:
        root = Path(tmp)
        data = str(root / "data")
        write_synthetic(data, classes=args.classes, train=args.train, val=args.batch * 4,
                        size=args.size, progress=False)
        first = plain_loop(data, args)
        results: dict[str, Any] = {}
        for workers in (1, 2):
            results[f"ran_{workers}_worker{'s' if workers > 1 else ''}"] = ran_train(data, args, workers, root)
        results["bare_ray_train_first_step_s"] = {f"{w}_worker{'s' if w > 1 else ''}": bare_ray_train(root, w)
                                                  for w in (1, 2)}
        last = plain_loop(data, args)
        steps = first["steps_per_epoch"]
        before, after = first["epoch_times_s"][1:], last["epoch_times_s"][1:]
        results["plain"] = {
            **summarize(before + after, steps, args.batch),
            "before_step_time_s": summarize(before, steps, args.batch)["step_time_s"],
            "after_step_time_s": summarize(after, steps, args.batch)["step_time_s"],
            "steps_per_epoch": steps}
    plain, one, two = results["plain"], results["ran_1_worker"], results["ran_2_workers"]
    results["ratios"] = {
        "step_time_1_worker_vs_plain": one["step_time_s"] / plain["step_time_s"],
        "step_time_2_workers_vs_plain": two["step_time_s"] / plain["step_time_s"],
        "throughput_2_workers_vs_plain": two["img_per_s"] / plain["img_per_s"],
        "first_step_1_worker_vs_bare_ray_train":
            one["first_step_s"] / results["bare_ray_train_first_step_s"]["1_worker"],
        "first_step_2_workers_vs_bare_ray_train":
            two["first_step_s"] / results["bare_ray_train_first_step_s"]["2_workers"],
    }
    results["goals"] = {
        "1_worker_within_10pct": one["step_time_s"] <= 1.10 * plain["step_time_s"],
        "first_step_within_15s": max(one["first_step_s"], two["first_step_s"]) <= 15.0,
    }
    results["setup"] = {**vars(args), "model": "attention56 (cifar stem)", "cpus": os.cpu_count(),
                        "threads_per_process": 1, "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""What Ray Train costs: a plain single-process torch loop vs `ran train` with 1 and 2 workers;
and what the team's tracking server costs: `ran train` (1 worker) against MLflow on PostgreSQL
with S3 artifacts and basic-auth, system metrics on, vs the same run on the embedded sqlite store.

Same model (CIFAR-stem Attention-56), same synthetic shards, same loader, same batch per worker and
the same number of steps. Step time is an epoch's time over its steps, including waiting for data
as a training run does; the first epoch pays for warm-up and is left out. The plain loop runs
before and after the `ran train` runs, so that a change of load on a shared machine shows as a
spread between the two. Each side's step time is the median of its timed epochs (the plain loop's
two runs pooled); the fastest epoch is reported too. A median does not favour the side with more
epochs, as a minimum does: on a noisy machine, the minimum of more samples is lower. For
`ran train` the numbers come from its own MLflow metrics (``perf/epoch_time_s`` and ``perf/startup_s``:
seconds from the command's start to the first optimizer step). Each training process gets one CPU thread, as a Ray worker with
``cpus_per_worker=1`` does, so the 1-worker ratio isolates the framework's overhead.

Goals (issue 4): 1 worker within 10% of the plain loop; first step within 15 s of the command.
Goal (issue 13): the team-server run's step time within 2% of the sqlite run's (both 1 worker).
The sqlite runs sample no system metrics (as before issue 13); the team-server run samples them
every 10 s (the default). Its stack is started from cluster/tracking/ (postgres.sh,
mlflow-server.sh) on 127.0.0.1 with a moto_server bucket for artifacts, and stopped at the end.

    python benchmarks/train_overhead.py [--size 32] [--train 1536] [--batch 32] [--epochs 4]
    python benchmarks/train_overhead.py --team-only    # sqlite, team, team without system
                                                       # metrics, and back: ~6 min on an idle machine

Prints one JSON object. The machine's load average is included: on a shared machine, timings are
only comparable with others taken at a similar load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import psutil


TRACKING = Path(__file__).resolve().parents[1] / "cluster" / "tracking"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import free_port, local_server, postgres_server  # noqa: E402 - the tests' harness
BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "benchmark-admin-1"


def job_yaml(data: str, args: argparse.Namespace, workers: int, name: str,
             system_metrics_s: float) -> str:
    """The benchmark job (no model logging: it is not part of a training step)."""
    from ran.config import load_config

    cfg = load_config(None, {
        "name": name, "model.name": "attention56", "model.stem": "cifar",
        "data.path": data, "data.batch_size": args.batch, "data.workers": 1,
        "optim.reference_batch_size": args.batch, "schedule.kind": "constant",
        "train.epochs": args.epochs, "train.log_every": 1000, "train.precision": args.precision,
        "scaling.num_workers": workers, "scaling.max_failures": 0,
        "tracking.experiment": "overhead", "tracking.registered_model": None,
        "tracking.log_model": False, "tracking.system_metrics_every_s": system_metrics_s,
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


SERVER_STACK = ("postgres", "mlflow", "gunicorn", "uvicorn", "moto_server", "huey")


def server_stack_cpu_s() -> float:
    """CPU seconds used so far by this machine's tracking-server processes (PostgreSQL, the
    MLflow server and its workers, moto_server): what a colocated server takes from training."""
    total = 0.0
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.info["cpu_times"] and any(word in line for word in SERVER_STACK) \
                and "ran.cli" not in line:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def ran_train(data: str, args: argparse.Namespace, workers: int, root: Path,
              server: dict[str, str] | None = None,
              system_metrics_s: float | None = None) -> dict[str, float]:
    """`ran train` as a user runs it (a subprocess starting its own local Ray), on the sqlite
    store, or with ``server`` (the MLFLOW_* environment of the team server) against it with
    system metrics every ``system_metrics_s`` seconds (default: 10 with a server, else off)."""
    from mlflow.tracking import MlflowClient

    if system_metrics_s is None:
        system_metrics_s = 10.0 if server else 0.0
    name = f"overhead{workers}" + ("_team" if server else "") + ("" if system_metrics_s else "_nosys")
    job = root / f"{name}.yaml"
    job.write_text(job_yaml(data, args, workers, name, system_metrics_s))
    tracking = server or {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **tracking}
    start, stack_before = time.time(), server_stack_cpu_s()
    done = subprocess.run([sys.executable, "-m", "ran.cli", "train", str(job)], cwd=root, env=env,
                          capture_output=True, text=True)
    wall, stack_cpu = time.time() - start, server_stack_cpu_s() - stack_before
    if done.returncode != 0:
        raise RuntimeError(f"ran train ({name}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with mock.patch.dict(os.environ, tracking):  # the server's login, for reading the run back
        client = MlflowClient(tracking["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("overhead")
        run = client.search_runs([experiment.experiment_id], f"tags.`ran.job` = '{name}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        steps = int(run.data.tags["ran.plan.steps_per_epoch"])
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "perf/epoch_time_s"))
        startup = client.get_metric_history(run.info.run_id, "perf/startup_s")[0].value
        system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    return {**summarize([v for _, v in history][1:], steps, args.batch * workers),
            "steps_per_epoch": steps, "first_step_s": startup, "wall_s": wall,
            "system_metrics": len(system), "epoch_times_s": [v for _, v in history],
            "server_stack_cpu_s": stack_cpu, "server_stack_cores": stack_cpu / wall}


def team_only(data: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """sqlite, team server with system metrics, team server without, and back in reverse order
    (1 worker each; the mirrored order cancels a steady drift of the machine's load); each side's
    step time is the median of its timed epochs, its two runs pooled. The server stack runs on
    this machine, so its CPU use while each run trains is reported beside the step times."""
    sides = {"sqlite": (None, 0.0), "team_server": ("team", 10.0),
             "team_server_no_system_metrics": ("team", 0.0)}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with team_server(root) as server:
        order = list(sides)
        for side in order + order[::-1]:
            where, every = sides[side]
            runs[side].append(ran_train(data, args, 1, root, server if where else None, every))
    results: dict[str, Any] = {}
    for side, done in runs.items():
        timed = [t for run in done for t in run["epoch_times_s"][1:]]
        results[side] = {**summarize(timed, done[0]["steps_per_epoch"], args.batch),
                         "step_time_per_run_s": [run["step_time_s"] for run in done],
                         "first_step_s": [run["first_step_s"] for run in done],
                         "system_metrics": [run["system_metrics"] for run in done],
                         "server_stack_cores": [run["server_stack_cores"] for run in done]}
    sqlite, team = results["sqlite"], results["team_server"]
    quiet = results["team_server_no_system_metrics"]
    results["ratios"] = {
        "step_time_team_server_vs_sqlite": team["step_time_s"] / sqlite["step_time_s"],
        "step_time_min_team_server_vs_sqlite": team["step_time_min_s"] / sqlite["step_time_min_s"],
        "step_time_team_server_no_system_metrics_vs_sqlite": quiet["step_time_s"] / sqlite["step_time_s"],
        "step_time_system_metrics_on_vs_off": team["step_time_s"] / quiet["step_time_s"]}
    results["goals"] = {"team_server_within_2pct": team["step_time_s"] <= 1.02 * sqlite["step_time_s"]}
    return results


@contextlib.contextmanager
def team_server(root: Path) -> Iterator[dict[str, str]]:
    """PostgreSQL (postgres.sh), a moto_server bucket and mlflow-server.sh (basic-auth) on
    127.0.0.1; yields the MLFLOW_* environment of a client logged in as the admin."""
    import boto3

    s3_port, port = free_port(), free_port()
    s3_env = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
              "AWS_DEFAULT_REGION": "us-east-1"}
    with postgres_server("benchmark-db-1", root / "postgres.log") as db, \
            local_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                         port=s3_port, ready="/moto-api/", log=root / "moto.log") as s3:
        boto3.client("s3", endpoint_url=s3, **{k.lower(): v for k, v in s3_env.items()
                                               if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket="overhead")
        env = {**os.environ, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3,
               "MLFLOW_BACKEND_STORE_URI": f"{db}/mlflow",
               "MLFLOW_AUTH_DATABASE_URI": f"{db}/mlflow_auth",
               "MLFLOW_ARTIFACTS_DESTINATION": "s3://overhead/mlflow",
               "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "RAN_MLFLOW_PORT": str(port),
               "RAN_MLFLOW_WORKERS": "2", "RAN_MLFLOW_BIN": str(BIN / "mlflow"), "TMPDIR": str(root)}
        with local_server([str(TRACKING / "mlflow-server.sh")], port=port, ready="/health",
                          log=root / "mlflow-server.log", env=env, timeout=300) as url:
            yield {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin",
                   "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}


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
    parser.add_argument("--team-only", action="store_true",
                        help="only `ran train` on sqlite vs the team server (system metrics on "
                             "and off), in mirrored order")
    args = parser.parse_args()

    from ran.data.synth import write_synthetic

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ran-overhead-") as tmp:
        root = Path(tmp)
        data = str(root / "data")
        write_synthetic(data, classes=args.classes, train=args.train, val=args.batch * 4,
                        size=args.size, progress=False)
        if args.team_only:
            results = team_only(data, args, root)
            results["setup"] = {**vars(args), "cpus": os.cpu_count(), "loadavg_before": load_before,
                                "loadavg_after": os.getloadavg()}
            print(json.dumps(results, indent=2))
            return
        first = plain_loop(data, args)
        results: dict[str, Any] = {}
        results["ran_1_worker"] = ran_train(data, args, 1, root)
        with team_server(root) as server:  # right after the sqlite run it is compared with
            results["ran_1_worker_team_server"] = ran_train(data, args, 1, root, server)
        results["ran_2_workers"] = ran_train(data, args, 2, root)
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
    team = results["ran_1_worker_team_server"]
    results["ratios"] = {
        "step_time_team_server_vs_sqlite": team["step_time_s"] / one["step_time_s"],
        "step_time_min_team_server_vs_sqlite": team["step_time_min_s"] / one["step_time_min_s"],
        "first_step_team_server_vs_sqlite": team["first_step_s"] / one["first_step_s"],
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
        "team_server_within_2pct": team["step_time_s"] <= 1.02 * one["step_time_s"],
    }
    results["setup"] = {**vars(args), "model": "attention56 (cifar stem)", "cpus": os.cpu_count(),
                        "threads_per_process": 1, "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""What checkpointing costs a training step: Attention-92 (ImageNet stem, 52.5M parameters, a
420 MB checkpoint with its SGD momentum) trained by `ran train`'s own code on a local Ray,
checkpointed every ``--every`` steps to S3 on a local ``moto_server``, with
``train.checkpoint_upload: sync`` (the training thread writes and uploads each checkpoint) against
``async`` (Ray Train's asynchronous upload: the training thread only copies the state to host
memory), and without step checkpoints, side by side in one invocation.

How it measures: every configuration is a 2-epoch run of ``--steps`` optimizer steps an epoch on
one worker, ``--steps`` not a multiple of ``--every``, so the step checkpoints fall inside the
epochs. The step time is epoch 2's ``perf/epoch_time_s`` (its steps and the checkpoint stalls inside
it; the final checkpoint comes after it) over its steps; epoch 1 pays for warm-up and is left out.
``perf/step_ckpt_wait_s`` is each checkpoint's stall of the training thread (host copy, Ray's report
barrier, waiting for the previous checkpoint to be registered, and in sync mode writing and
uploading). The configurations run in turn (none, sync, async), ``--repeats`` times, so that drift
in a shared machine's load hits each of them.

Goal (issue 14): the async step time within 5% of the run without checkpoints. On a CPU-only
machine the background write and upload (and the moto_server receiving it) share the CPU cores
with training; ``--cpus-per-worker 1`` (the default) leaves training one core of two and the rest
to the I/O, as a GPU host's spare CPU cores would be.

    .venv/bin/python benchmarks/checkpoint_stall.py [--crop 224] [--batch 2] [--steps 7] \\
        [--every 3] [--cpus-per-worker 1] [--repeats 1]

Prints one JSON object (with the machine's load average: on a shared machine timings are only
comparable with others taken at a similar load).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import free_port, local_server  # noqa: E402 - the tests' server harness
BUCKET = "stall"
S3_ENV = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
          "AWS_DEFAULT_REGION": "us-east-1"}
MODES = ("none", "sync", "async")


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 with the bucket; AWS_* set in this process (and so in the
    local Ray it starts) while it runs."""
    import boto3

    port = free_port()
    with local_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port=port,
                      ready="/moto-api/", log=log) as url, \
            mock.patch.dict(os.environ, {**S3_ENV, "AWS_ENDPOINT_URL": url}):
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        yield url


def empty_bucket(url: str) -> dict[str, int]:
    """Delete every object (moto keeps them in memory); returns their sizes by key."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=url)
    sizes = {o["Key"]: o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
             for o in page.get("Contents", [])}
    keys = list(sizes)
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})
    return sizes


def write_data(output: str, train: int, size: int) -> None:
    """``train`` synthetic images (and 2 for validation) labelled with 1000 classes, as ImageNet:
    the model's classifier, and so its checkpoint, has ImageNet's size."""
    import numpy as np

    from ran.data.synth import class_names, synthesize
    from ran.data.write import Source, write_dataset

    rng = np.random.default_rng(0)
    splits = {"train": synthesize(10, train, size, rng, "train"),
              "val": synthesize(10, 2, size, rng, "val")}
    write_dataset(Source("synthetic", class_names(1000), splits), output, source="synth",
                  samples_per_shard=1000, seed=0, workers=1, progress=False,
                  options={"size": size})


def job(data: str, args: argparse.Namespace, mode: str, run: int) -> Any:
    """The benchmark job: one worker, 2 epochs, step checkpoints to S3 unless ``mode`` is none."""
    from ran.config import load_config

    return load_config(None, {
        "name": f"stall-{mode}-{run}", "model.name": "attention92", "model.stem": "imagenet",
        "data.path": data, "data.recipe": "imagenet", "data.crop": args.crop,
        "data.eval_crop": args.crop, "data.batch_size": args.batch, "data.workers": 1,
        "optim.reference_batch_size": args.batch, "schedule.kind": "cosine",
        "train.epochs": 2, "train.log_every": 1, "train.eval_every": 1000,
        "train.checkpoint_every": 1000, "train.keep_checkpoints": 1,
        "train.checkpoint_every_steps": None if mode == "none" else args.every,
        "train.checkpoint_upload": "sync" if mode == "sync" else "async",
        "scaling.num_workers": 1, "scaling.cpus_per_worker": args.cpus_per_worker,
        "scaling.max_failures": 0, "storage.path": f"s3://{BUCKET}/runs",
        "tracking.experiment": "checkpoint-stall", "tracking.registered_model": None,
        "tracking.log_model": False,
    })


def measure(cfg: Any, uri: str, steps: int) -> dict[str, Any]:
    """Train; epoch 2's step time and the checkpoint stalls from the run's MLflow metrics."""
    from mlflow.tracking import MlflowClient

    from ran.train.launch import run_training

    outcome = run_training(cfg)
    client = MlflowClient(uri)

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(outcome.run_id, key))

    end2 = next(step for step, epoch in history("epoch") if epoch == 2)  # epoch metrics' step
    epoch2 = dict(history("perf/epoch_time_s"))[end2]
    stalled = dict(history("perf/ckpt_wait_s")).get(end2, 0.0)
    waits = history("perf/step_ckpt_wait_s")
    return {"step_time_s": epoch2 / steps, "epoch2_time_s": epoch2, "epoch2_ckpt_wait_s": stalled,
            # the share of epoch 2 the training thread stood still for checkpoints: unlike the
            # step time, not moved by other processes' load on a shared machine
            "ckpt_stall_frac": stalled / epoch2,
            "ckpt_wait_s_by_step": {str(s): round(v, 3) for s, v in waits}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per epoch")
    parser.add_argument("--every", type=int, default=3, help="train.checkpoint_every_steps")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.steps % args.every == 0:
        parser.error("--steps must not be a multiple of --every (the step checkpoints must fall "
                     "inside the epochs)")

    import torch

    from ran.models import create_model
    from ran.train.localray import LocalRay

    with tempfile.TemporaryDirectory(prefix="ran-stall-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root}/mlflow.db"
        data = str(root / "data")
        write_data(data, args.steps * args.batch, args.crop)
        params = sum(p.numel() for p in create_model("attention92", stem="imagenet",
                                                      num_classes=1000).parameters())
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        checkpoint_mb = 0.0
        # Ray's and ran train's lines go to stderr: stdout is the JSON alone.
        with contextlib.redirect_stdout(sys.stderr), moto_server(root / "moto.log") as url, \
                LocalRay(lean=True):
            for run in range(args.repeats):
                for mode in MODES:
                    runs[mode].append(measure(job(data, args, mode, run), uri, args.steps))
                    sizes = empty_bucket(url)
                    checkpoint_mb = max([checkpoint_mb, *(v / 1e6 for k, v in sizes.items()
                                                          if k.endswith("/checkpoint.pt"))])
                    print(f"{mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
    step = {m: statistics.median(r["step_time_s"] for r in runs[m]) for m in MODES}
    stall = {m: statistics.median(r["ckpt_stall_frac"] for r in runs[m]) for m in MODES}
    print(json.dumps({
        "model": "attention92 (imagenet stem)", "params_m": round(params / 1e6, 2),
        "checkpoint_mb": round(checkpoint_mb, 1),  # checkpoint.pt on S3: model, momentum, RNG
        "crop": args.crop, "batch": args.batch, "steps_per_epoch": args.steps,
        "checkpoint_every_steps": args.every, "cpus_per_worker": args.cpus_per_worker,
        "torch_threads_per_worker": int(args.cpus_per_worker),
        "storage": "s3 (moto_server on 127.0.0.1)", "repeats": args.repeats,
        "step_time_s": {m: round(v, 3) for m, v in step.items()},
        "sync_vs_none": round(step["sync"] / step["none"], 3),
        "async_vs_none": round(step["async"] / step["none"], 3),
        "goal_async_vs_none_at_most": 1.05,
        "goal_met": step["async"] / step["none"] <= 1.05,
        "ckpt_stall_frac": {m: round(v, 4) for m, v in stall.items()},
        "runs": runs, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()

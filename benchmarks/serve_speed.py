"""Serving speed of a registered model on JPEGs, as JSON: what ``ran.serving`` adds to a forward pass.

For each model (Attention-56 with the ImageNet stem at 224, from ``jobs/imagenet_attention56.yaml``;
the demo model, CIFAR-stem Attention-56 at 32, from ``jobs/demo.yaml``; both freshly initialised,
speed does not depend on the weights) the model is logged and registered as ``ran train`` does it
(``ran.tracking.log_final_model``, a throw-away sqlite store) and, for 1 and 8 JPEGs per request,
timed three ways in the same run:

- ``plain_forward``: the model alone on the already decoded, transformed and normalised batch
  (``model(x)`` under the same precision and memory format the pyfunc uses): the baseline;
- ``pyfunc``: ``mlflow.pyfunc.load_model(...).predict(list_of_jpeg_bytes)`` in this process, so
  decoding, the eval transform, the model and the top-5 answer;
- ``scoring_handler``: MLflow's scoring server's own request handler (``invocations``: the JSON
  body parsed, base64 decoded, ``predict``, the answer serialised) called in this process, which
  separates what the server's code adds from what HTTP and uvicorn add;
- ``http``: a POST of ``{"inputs": [base64 JPEGs]}`` to ``mlflow models serve -m models:/... 
  --env-manager local`` on 127.0.0.1 (one keep-alive connection; the request bodies are built
  before timing, as a client would hold them).

The three run interleaved, one request each per round, so that a busy machine slows them alike.
Each reports images per second and the p50/p95 latency of one request (wall clock), and the median
CPU time of one request with the images per CPU second it implies (this process's CPU time; for
``http`` the server's processes' plus this client's): on a shared machine the CPU figures are the
fair comparison. The goals of issue 12: ``pyfunc`` at least 0.8x ``plain_forward``'s images per
second at 8 images per request, and the HTTP server adding at most 20 ms to the p50 latency of
``pyfunc``; both are reported on wall clock and on CPU time.

    .venv/bin/python benchmarks/serve_speed.py                   # both models: ~4 min on 2 cores
    .venv/bin/python benchmarks/serve_speed.py --models demo --iters 40
    .venv/bin/python benchmarks/serve_speed.py --threads 1   # a machine shared with other work

JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CASES = {  # name -> (job file, classes, side of the source JPEGs)
    "attention56_imagenet_224": ("jobs/imagenet_attention56.yaml", 1000, 400),
    "demo": ("jobs/demo.yaml", 10, 32),
}
BATCHES = (1, 8)
GOAL_RATIO = 0.8  # pyfunc img/s >= 0.8 x plain forward img/s at 8 images per request
GOAL_HTTP_MS = 20.0  # HTTP adds <= 20 ms to the p50 latency


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def jpegs(side: int, count: int) -> list[bytes]:
    """``count`` distinct photograph-like JPEGs (the synthetic dataset's shapes and
    textures, quality 90) of ``side`` x ``side`` pixels."""
    from ran.data.synth import render

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(render(i % 10, side, rng)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def register(name: str, job: str, classes: int) -> Any:
    """Log and register a fresh model of ``job`` as ``name`` version 1; returns its config."""
    from ran.config import load_config
    from ran.data.transforms import normalizer
    from ran.runtime import build_model, eval_crop
    from ran.tracking import RunTracker, log_final_model

    cfg = load_config(REPO / job, {"model.num_classes": classes, "tracking.registered_model": name,
                                   "tracking.experiment": "serve-speed"})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    crop = eval_crop(cfg)
    example = normalizer(cfg.data.recipe)(torch.randint(0, 256, (2, 3, crop, crop), dtype=torch.uint8))
    tracker = RunTracker.create_training(cfg, run_name=name, tags={})
    version = log_final_model(tracker, model, cfg, [f"class {i}" for i in range(classes)],
                              example.numpy().astype(np.float32), {"eval/top1": 0.0})
    tracker.finish()
    assert version == f"{name}/1", version
    return cfg


def interleaved(modes: dict[str, tuple[Callable[[], Any], Callable[[], float]]], batch: int,
                iters: int, warmup: int) -> dict[str, dict[str, float]]:
    """Time every mode once per round, ``iters`` rounds after ``warmup`` (so that a busy machine
    slows all modes alike). Each mode is ``(call, cpu_seconds)``, ``cpu_seconds()`` a clock of the
    CPU time spent on it (this process's, or the server's plus this process's).

    Per mode: images per second (wall), p50/p95 latency of one call (ms), and the median CPU time
    of one call (ms) with the images per CPU second it implies (a load-independent figure)."""
    for _ in range(warmup):
        for call, _ in modes.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(iters):
        for name, (call, clock) in modes.items():
            c0, t0 = clock(), time.perf_counter()
            call()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(clock() - c0)
    out = {}
    for name in modes:
        w = sorted(wall[name])
        p95 = w[min(len(w) - 1, int(round(0.95 * (len(w) - 1))))]
        cpu_ms = statistics.median(cpu[name])
        out[name] = {"img_per_s": round(batch * len(w) / sum(w), 2),
                     "p50_ms": round(1000 * statistics.median(w), 2), "p95_ms": round(1000 * p95, 2),
                     "cpu_ms_p50": round(1000 * cpu_ms, 2),
                     "img_per_cpu_s": round(batch / max(cpu_ms, 1e-9), 2), "iters": len(w)}
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1, in its own process group."""

    def __init__(self, model_uri: str, log_path: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow models serve did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        self.root = psutil.Process(self.proc.pid)

    def _ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def post(self, body: bytes) -> dict[str, Any]:
        try:
            response = self._send(body)
        except (ConnectionError, http.client.HTTPException):
            # uvicorn closes a connection idle for 5 s (while the other modes run): reconnect.
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            response = self._send(body)
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)

    def cpu_seconds(self) -> float:
        """CPU time of the server's processes so far, plus this (client) process's."""
        total = time.process_time()
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _send(self, body: bytes) -> http.client.HTTPResponse:
        self.connection.request("POST", "/invocations", body=body,
                                headers={"Content-Type": "application/json"})
        return self.connection.getresponse()

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own child's process group
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def measure(name: str, job: str, classes: int, side: int, iters: int, warmup: int,
            root: Path) -> list[dict[str, Any]]:
    """The rows of one model: register it, start its server, time the three ways per batch."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    from ran.runtime import autocast
    from ran.serving import ImageClassifier

    log(f"{name}: logging and registering the model")
    register(name, job, classes)
    uri = f"models:/{name}/1"
    pyfunc = mlflow.pyfunc.load_model(uri)
    classifier: ImageClassifier = pyfunc._model_impl.classifier
    bundle = classifier.bundle
    images = jpegs(side, max(BATCHES))
    schema = pyfunc.metadata.get_input_schema()

    def handler(body: bytes) -> None:  # the scoring server's request handler, without HTTP
        response = scoring_server.invocations(body, "application/json", pyfunc, schema)
        assert response.status == 200, response.response
    log(f"{name}: starting mlflow models serve")
    server = Server(uri, root / f"{name}-serve.log")
    rows = []
    try:
        for batch in BATCHES:
            batch_jpegs = images[:batch]
            x = bundle.normalize(classifier.images(batch_jpegs).to(bundle.device))
            if bundle.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            def forward() -> None:
                with torch.inference_mode(), autocast(bundle.precision, bundle.device):
                    bundle.model(x).float().softmax(1)

            body = json.dumps({"inputs": [base64.b64encode(j).decode() for j in batch_jpegs]}).encode()
            assert len(server.post(body)["predictions"]) == batch
            n = iters if batch == 1 else max(4, iters // 2)
            log(f"{name}: batch {batch}: plain forward, pyfunc, scoring handler, http, "
                f"interleaved ({n} rounds)")
            load = os.getloadavg()[0]
            t = interleaved({"plain_forward": (forward, time.process_time),
                             "pyfunc": (lambda: pyfunc.predict(batch_jpegs), time.process_time),
                             "scoring_handler": (lambda: handler(body), time.process_time),
                             "http": (lambda: server.post(body), server.cpu_seconds)},
                            batch, n, warmup)
            plain, in_process, over_http = t["plain_forward"], t["pyfunc"], t["http"]
            rows.append({
                "model": name, "images_per_request": batch, "eval_crop": bundle.crop,
                "source_jpeg": f"{side}x{side}", "precision": bundle.precision,
                "device": str(bundle.device), "load_avg_1min": [load, os.getloadavg()[0]],
                "plain_forward": plain, "pyfunc": in_process,
                "scoring_handler": t["scoring_handler"], "http": over_http,
                "pyfunc_vs_plain_img_per_s": round(in_process["img_per_s"] / plain["img_per_s"], 3),
                "pyfunc_vs_plain_img_per_cpu_s": round(in_process["img_per_cpu_s"]
                                                       / plain["img_per_cpu_s"], 3),
                "http_added_p50_ms": round(over_http["p50_ms"] - in_process["p50_ms"], 2),
                "http_added_cpu_ms_p50": round(over_http["cpu_ms_p50"] - in_process["cpu_ms_p50"], 2),
            })
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--iters", type=int, default=20, help="timed requests at batch 1 "
                        "(half as many at batch 8; default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads here and in the server "
                        "(OMP_NUM_THREADS); default: torch's own. On a machine shared with other "
                        "work, 1 avoids OpenMP threads waiting for each other's descheduled peers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch reads it at start
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="serve-speed-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        os.chdir(root)
        rows = []
        for name in args.models.split(","):
            job, classes, side = CASES[name]
            rows += measure(name, job, classes, side, args.iters, args.warmup, root)
    at8 = [r for r in rows if r["images_per_request"] == 8]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "server_omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": rows,
        "goals": {  # wall-clock figures, and the same on CPU time (what a busy machine leaves fair)
            "pyfunc_ge_0.8x_plain_img_per_s_at_8": {
                r["model"]: r["pyfunc_vs_plain_img_per_s"] >= GOAL_RATIO for r in at8},
            "pyfunc_ge_0.8x_plain_img_per_cpu_s_at_8": {
                r["model"]: r["pyfunc_vs_plain_img_per_cpu_s"] >= GOAL_RATIO for r in at8},
            "http_adds_le_20ms_p50": {f"{r['model']}@{r['images_per_request']}":
                                      r["http_added_p50_ms"] <= GOAL_HTTP_MS for r in rows},
            "http_adds_le_20ms_cpu_p50": {f"{r['model']}@{r['images_per_request']}":
                                          r["http_added_cpu_ms_p50"] <= GOAL_HTTP_MS for r in rows},
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

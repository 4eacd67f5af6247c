"""The GPU check (issue 16): model speed and MFU, the data path, and a short ``ran train`` on one GPU.

Run it through ``benchmarks/gpu_check.sh`` (which caps it at 8 minutes); it prints one JSON object
on stdout, progress on stderr. Three parts:

1. model: training steps (forward, cross-entropy, backward, fused SGD) of torchvision's
   ``resnet50``, Attention-56 and Attention-92 (ImageNet stems, 224 px) in bf16 autocast +
   channels_last, eager and under ``torch.compile``; img/s, peak memory and model FLOP utilisation
   ``3 x 2 x forward MACs x img/s / peak``, against the GPU's datasheet bf16 peak (where known) and a
   measured bf16 matmul; the figure the issue asks for is each model's MFU relative to ResNet-50's.
   Each model runs in its own process; all three compile at once, and the timed steps take turns
   under a lock (``fcntl``), so nothing else runs on the GPU while one is timed.
2. data: ImageNet-size synthetic JPEGs (about 500x375, quality 90, 10 learnable classes): bare
   libjpeg-turbo full-size decode per core, the CPU path's training transform per core (goal: at
   least 90% of the bare decode), the CPU path's loader with every core, and the device path
   (``data.decode: gpu``) with 1 and 3 loader workers: img/s and the CPU cores it used (CPU seconds
   of the training process and its loader workers per second; goal: 2,500 img/s with at most 4).
   Runs first, alone on the machine.
3. train: ``ran train`` of Attention-56 with 1 GPU worker on those shards for 2 short epochs
   (``data.decode: auto``, so the GPU decodes); checks it finishes, checkpoints, logs to MLflow and
   registers the model, then evaluates the registered model on the CPU (``ran eval``, the CPU
   decode path) and compares top-1 with the run's own validation. Runs while part 1 compiles.

``--cpu-only`` runs every part on the CPU at CI size (fewer images, 64 px models, no compile, the
device path in its CPU form), so the script and its JSON are tested where there is no GPU. Fields
that only a GPU fills are then null, and ``not_measured`` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
RESULT_TAG = "GPU_CHECK_RESULT "
MODELS = ("resnet50", "attention56", "attention92")
MODES = ("eager", "compile")
CLASSES = 10
# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s (SXM parts; first match wins).
SPEC_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0),
                    ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0))
GOAL_DATA_IMG_S = 2500  # per GPU
GOAL_DATA_CORES = 4  # CPU cores per GPU
GOAL_CPU_TRANSFORM_VS_DECODE = 0.9
GOAL_MFU_VS_RESNET50 = {"attention56": 1.0, "attention92": 0.9}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings


def settings(cpu_only: bool) -> dict[str, Any]:
    """Sizes of every part: GPU (default) or CI size on the CPU."""
    if cpu_only:
        return {"train_images": 96, "val_images": 32, "model_batch": 2, "model_size": 64,
                "model_steps": 2, "model_warmup": 1, "compile": False, "loader_batch": 32,
                "loader_epochs": 2, "gpu_path_workers": [1], "train_crop": 64, "train_batch": 16,
                "train_workers": 1, "matmul_size": 1024}
    return {"train_images": 2048, "val_images": 256, "model_batch": 128, "model_size": 224,
            "model_steps": 10, "model_warmup": 3, "compile": True, "loader_batch": 256,
            "loader_epochs": 3, "gpu_path_workers": [1, 3], "train_crop": 224, "train_batch": 64,
            "train_workers": 3, "matmul_size": 8192}


# ---------------------------------------------------------------------------------------------
# Synthetic ImageNet-size JPEGs


def _make_jpeg(args: tuple[int, int]) -> tuple[int, bytes]:
    """One ~500x375 quality-90 JPEG of class ``label``: a synth shape (ran.data.synth) over a
    photo-like background with sensor noise, so it compresses like a photo and can be learnt."""
    import numpy as np
    from PIL import Image

    from data_speed import natural_image
    from ran.data.synth import render

    index, label = args
    rng = np.random.default_rng([16, index])
    width, height = int(rng.integers(440, 561)), int(rng.integers(330, 421))
    photo = np.asarray(natural_image(rng, width, height), dtype=np.float32)
    shape = Image.fromarray(render(label, 256, rng)).resize((width, height), Image.BILINEAR)
    pixels = 0.5 * np.asarray(shape, dtype=np.float32) + 0.5 * photo + rng.normal(0, 12, photo.shape)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return label, out.getvalue()


def write_jpeg_shards(work: Path, train: int, val: int) -> dict[str, Any]:
    """``work/images/{train,val}/<class>/*.jpg`` -> shards in ``work/shards``; returns sizes."""
    from ran.data.write import build_shards

    cores = os.cpu_count() or 1
    total_bytes = 0
    with ProcessPoolExecutor(cores) as pool:
        for split, count, offset in (("train", train, 0), ("val", val, train)):
            jobs = [(offset + i, i % CLASSES) for i in range(count)]
            for i, (label, data) in enumerate(pool.map(_make_jpeg, jobs, chunksize=8)):
                folder = work / "images" / split / f"class{label:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i:06d}.jpg").write_bytes(data)
                total_bytes += len(data)
    build_shards("imagefolder", str(work / "images"), str(work / "shards"), samples_per_shard=256,
                 workers=cores, progress=False)
    return {"train": train, "val": val, "mean_kb": round(total_bytes / (train + val) / 1024, 1),
            "mean_size": "500x375 (width 440-560, height 330-420)", "quality": 90,
            "classes": CLASSES}


# ---------------------------------------------------------------------------------------------
# Part 2: the data path


def per_core_rates(jpegs: list[bytes], crop: int) -> dict[str, float]:
    """One thread: bare full-size decode (libjpeg-turbo through torchvision) and the CPU path's
    training transform (reduced-size decode + random-resized crop + flip, lighting per batch)."""
    import random

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from ran.data.transforms import ImageNetTrain

    torch.set_num_threads(1)
    buffers = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    transform, rng = ImageNetTrain(crop), random.Random(0)
    rates: dict[str, list[float]] = {"bare": [], "transform": []}
    for _ in range(3):  # interleaved rounds: background load hits both alike; best round counts
        start = time.perf_counter()
        for buffer in buffers:
            decode_jpeg(buffer, mode=ImageReadMode.RGB)
        rates["bare"].append(len(buffers) / (time.perf_counter() - start))
        start = time.perf_counter()
        images = torch.stack([transform.sample(j, rng) for j in jpegs])
        transform.batch(images, rng)
        rates["transform"].append(len(jpegs) / (time.perf_counter() - start))
    return {k: max(v) for k, v in rates.items()}


def process_tree_cpu(pids: list[int]) -> float:
    from data_speed import process_cpu

    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += process_cpu(pid)
    return total


def time_loader(loader: Any, device: Any, epochs: int, normalize: Any) -> dict[str, float]:
    """img/s and CPU cores used over ``epochs`` epochs after a warm-up epoch, counting the
    training process (all its threads) and its loader workers; batches normalised on ``device``."""
    import torch

    def run_epoch(epoch: int) -> int:
        loader.set_epoch(epoch)
        images = 0
        for batch in loader:
            normalize(batch.images.to(device, non_blocking=True))
            images += len(batch.labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images

    run_epoch(0)
    workers = [w.pid for w in getattr(loader.dataloader._iterator, "_workers", [])]
    cpu0 = time.process_time() + process_tree_cpu(workers)
    start, images = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        images += run_epoch(epoch)
    wall = time.perf_counter() - start
    cpu = time.process_time() + process_tree_cpu(workers) - cpu0
    return {"img_s": round(images / wall, 1), "cpu_cores_used": round(cpu / wall, 2),
            "images": images, "wall_s": round(wall, 2)}


def data_part(shards: str, jpegs: list[bytes], cfg: dict[str, Any], cpu_only: bool) -> dict[str, Any]:
    import torch

    from ran.data.read import make_loader
    from ran.data.transforms import normalizer

    cores = len(os.sched_getaffinity(0))
    device = torch.device("cpu" if cpu_only else "cuda")
    normalize = normalizer("imagenet")
    log("data: per-core decode and transform")
    rates = per_core_rates(jpegs, 224)
    ratio = rates["transform"] / rates["bare"]
    out: dict[str, Any] = {
        "cpu_bare_decode_img_s_per_core": round(rates["bare"], 1),
        "cpu_train_transform_img_s_per_core": round(rates["transform"], 1),
        "cpu_train_transform_vs_bare_decode": round(ratio, 3),
    }
    common = dict(train=True, batch_size=cfg["loader_batch"], recipe="imagenet", crop=224, seed=0)
    log(f"data: CPU path, {cores} loader workers")
    torch.set_num_threads(1)  # the training process only receives batches on the CPU path
    loader = make_loader(shards, "train", workers=cores, decode="cpu", pin_memory=device.type == "cuda",
                         **common)
    out["cpu_path"] = {"workers": cores, **time_loader(loader, device, cfg["loader_epochs"], normalize)}
    loader.close()
    torch.set_num_threads(cores)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["gpu_path"] = []
    for workers in cfg["gpu_path_workers"]:
        log(f"data: device path on {device}, {workers} loader workers")
        loader = make_loader(shards, "train", workers=workers, decode="gpu", device=device, **common)
        result = time_loader(loader, device, cfg["loader_epochs"], normalize)
        loader.close()
        out["gpu_path"].append({"workers": workers, "device": str(device), **result})
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the model part
    gpu_runs = [r for r in out["gpu_path"] if r["device"].startswith("cuda")]
    fitting = [r for r in gpu_runs if r["cpu_cores_used"] <= GOAL_DATA_CORES]
    best = max(fitting, key=lambda r: r["img_s"]) if fitting else None
    out["goals"] = {
        "gpu_img_s_per_gpu": {"goal": GOAL_DATA_IMG_S, "max_cpu_cores": GOAL_DATA_CORES,
                              "measured": best["img_s"] if best else None,
                              "cpu_cores_used": best["cpu_cores_used"] if best else None,
                              "met": bool(best and best["img_s"] >= GOAL_DATA_IMG_S)
                              if gpu_runs else None},
        "cpu_transform_vs_bare_decode": {"goal": GOAL_CPU_TRANSFORM_VS_DECODE,
                                         "measured": round(ratio, 3),
                                         "met": ratio >= GOAL_CPU_TRANSFORM_VS_DECODE},
    }
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: model speed (children, one per model)


@contextlib.contextmanager
def gpu_lock(path: str) -> Iterator[None]:
    """Exclusive use of the GPU for timing, between the processes of this check."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def emit(result: dict[str, Any]) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


def model_child(spec: dict[str, Any]) -> None:
    """Time one model's training steps; prints a tagged JSON line after each stage, so a child
    stopped at the deadline still reports what it measured."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from ran.models import count_macs, create_model

    name, size, batch = spec["model"], spec["size"], spec["batch"]
    device = torch.device(spec["device"])
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = (torchvision.models.resnet50() if name == "resnet50"
             else create_model(name, stem="imagenet", num_classes=1000))
    result: dict[str, Any] = {"model": name, "forward_gmacs": round(count_macs(model, size) / 1e9, 3),
                              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                fused=device.type == "cuda" or None)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(forward: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(forward: Any) -> dict[str, Any]:
        """img/s over ``steps`` steps with no host sync between them (as the training loop runs);
        per-step times from CUDA events (on the CPU, from the clock: it runs synchronously)."""
        for _ in range(spec["warmup"]):
            step(forward)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(spec["steps"] + 1)]
        times, start = [], time.perf_counter()
        for i in range(spec["steps"]):
            if device.type == "cuda":
                events[i].record()
                step(forward)
            else:
                begin = time.perf_counter()
                step(forward)
                times.append(time.perf_counter() - begin)
        if device.type == "cuda":
            events[-1].record()
        sync()
        total = time.perf_counter() - start
        if device.type == "cuda":
            times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(spec["steps"])]
        out = {"img_per_s": round(batch * spec["steps"] / total, 2),
               "step_ms_median": round(statistics.median(times) * 1e3, 2),
               "step_ms_min": round(min(times) * 1e3, 2)}
        if device.type == "cuda":
            out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        return out

    compiled = None
    if spec["compile"]:  # compile (mostly CPU work) before taking the GPU lock
        compiled = torch.compile(model)
        start = time.perf_counter()
        try:
            step(compiled)
            sync()
            result["compile_first_step_s"] = round(time.perf_counter() - start, 1)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # hold only weights and optimizer state while waiting
        except Exception as exc:  # noqa: BLE001 - report, and still time eager
            result["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            compiled = None
    with gpu_lock(spec["lock"]):
        if spec.get("matmul_size"):
            result["bf16_matmul_tflops"] = matmul_tflops(device, spec["matmul_size"])
        result["eager"] = timed(model)
        emit(result)
        if compiled is not None:
            result["compile"] = timed(compiled)
            result["compile"]["compile_s"] = round(
                result.pop("compile_first_step_s") - result["compile"]["step_ms_median"] / 1e3, 1)
    emit(result)


def matmul_tflops(device: Any, size: int) -> float:
    """Best bf16 matmul rate of ``size`` x ``size`` matrices, TFLOP/s."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 10 * 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return round(best, 2)


def start_model_child(spec: dict[str, Any], work: Path) -> tuple[subprocess.Popen, Path]:
    output = work / f"model-{spec['model']}.out"
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache")}
    with open(output, "w") as stdout:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=stdout, cwd=REPO, env=env)
    return proc, output


def collect_model_child(proc: subprocess.Popen, output: Path, deadline: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
        stopped = None
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        stopped = "stopped at the time budget"
    lines = [line for line in output.read_text().splitlines() if line.startswith(RESULT_TAG)]
    result = json.loads(lines[-1][len(RESULT_TAG):]) if lines else {}
    if proc.returncode not in (0, None) and stopped is None:
        stopped = f"exit code {proc.returncode} (its stderr is above)"
    if stopped:
        result["incomplete"] = stopped
    return result


def achieved(result: dict[str, Any], modes: Any) -> float:
    """Training FLOP/s of a model result in the fastest of ``modes`` (0 if none ran)."""
    rates = [(result.get(m) or {}).get("img_per_s", 0.0) for m in modes]
    return 3 * 2 * result.get("forward_gmacs", 0.0) * 1e9 * max(rates, default=0.0)


def _ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 3) if ours and theirs else None


def summarise_models(results: dict[str, dict[str, Any]], cfg: dict[str, Any], device_name: str,
                     cpu_only: bool) -> dict[str, Any]:
    spec = None if cpu_only else next((v for k, v in SPEC_BF16_TFLOPS if k in device_name), None)
    matmul = results.get("resnet50", {}).get("bf16_matmul_tflops")
    for res in results.values():
        flop_per_img = 3 * 2 * res.get("forward_gmacs", 0) * 1e9
        for mode in MODES:
            entry = res.get(mode)
            if not entry:
                res[mode] = None
                continue
            tflops = flop_per_img * entry["img_per_s"] / 1e12
            entry["achieved_tflops"] = round(tflops, 4)
            entry["mfu_vs_spec"] = round(tflops / spec, 4) if spec else None
            entry["mfu_vs_bf16_matmul"] = round(tflops / matmul, 4) if matmul else None
    relative: dict[str, Any] = {}
    goals: dict[str, Any] = {}
    base = results.get("resnet50", {})
    for name in ("attention56", "attention92"):
        res = results.get(name, {})
        entry = {}
        for mode in MODES:
            entry[mode] = _ratio(achieved(res, [mode]), achieved(base, [mode]))
        # Each model in its faster mode against ResNet-50 in its faster mode.
        entry["best_vs_best"] = _ratio(achieved(res, MODES), achieved(base, MODES))
        relative[name] = entry
        goal = GOAL_MFU_VS_RESNET50[name]
        goals[f"{name}_mfu_vs_resnet50"] = {
            "goal": goal, "measured": entry["best_vs_best"],
            "met": None if cpu_only or entry["best_vs_best"] is None else entry["best_vs_best"] >= goal}
    faster = {name: (None if not (r.get("eager") and r.get("compile"))
                     else r["compile"]["img_per_s"] > r["eager"]["img_per_s"])
              for name, r in results.items()}
    return {"batch_size": cfg["model_batch"], "image_size": cfg["model_size"], "precision": "bf16",
            "channels_last": True, "optimizer": "SGD momentum 0.9, fused on CUDA",
            "peak_tflops": {"spec_bf16_dense": spec, "bf16_matmul_measured": matmul},
            "mfu_formula": "3 x 2 x forward MACs x img/s / peak", "results": results,
            "mfu_relative_to_resnet50": relative, "compile_faster": faster, "goals": goals}


# ---------------------------------------------------------------------------------------------
# Part 3: ran train on those shards


def train_job(shards: str, cfg: dict[str, Any], cpu_only: bool) -> dict[str, Any]:
    return {
        "name": "gpu_check",
        "model": {"name": "attention56", "stem": "imagenet"},
        "data": {"path": shards, "recipe": "imagenet", "crop": cfg["train_crop"],
                 "eval_crop": cfg["train_crop"], "batch_size": cfg["train_batch"],
                 "workers": cfg["train_workers"], "decode": "gpu" if cpu_only else "auto"},
        "optim": {"lr": 0.1, "reference_batch_size": 256},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.3},
        "train": {"epochs": 2, "precision": "auto", "channels_last": True, "log_every": 5},
        "scaling": {"num_workers": 1, "use_gpu": not cpu_only,
                    "cpus_per_worker": 1 if cpu_only else cfg["train_workers"] + 1, "max_failures": 0},
        "storage": {"path": "runs"},
        "tracking": {"experiment": "gpu-check", "registered_model": "gpu-check-attention56"},
    }


def run_command(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, stdout); stderr streams through, stdout is echoed to stderr. Out of time, the
    command gets SIGINT (``ran train`` then stops its local Ray), then SIGKILL; the code is 124."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        sys.stderr.write(out or "")
        return 124, out or ""
    sys.stderr.write(out)
    return proc.returncode, out


def train_part(work: Path, shards: str, cfg: dict[str, Any], cpu_only: bool,
               deadline: float) -> dict[str, Any]:
    import yaml

    ran = str(Path(sys.executable).with_name("ran"))
    job = work / "gpu_check_job.yaml"
    job.write_text(yaml.safe_dump(train_job(shards, cfg, cpu_only), sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = uri
    log("train: ran train (Attention-56, 1 worker, 2 epochs)")
    start = time.time()
    code, out = run_command([ran, "train", str(job)], work, env, deadline - time.time() - 30)
    result: dict[str, Any] = {"command": f"ran train {job.name}", "exit_code": code,
                              "finished": code == 0, "wall_s": round(time.time() - start, 1),
                              "decode": "gpu" if cpu_only else "auto (gpu on the GPU worker)"}
    run_id = _search(r"MLflow run:\s+([0-9a-f]{32})", out)
    registered = _search(r"\(models:/([^)]+)\)", out)
    run_dir = _search(r"checkpoints:\s+(\S+)", out)
    checkpoints = sorted(p.parent.name for p in Path(run_dir).glob("*/checkpoint.pt")) if run_dir else []
    result.update(checkpoints=checkpoints, mlflow_run_id=run_id,
                  registered_model=f"models:/{registered}" if registered else None)
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "val_top1")
        result.update(mlflow_status=run.info.status,
                      mlflow_metrics=sorted(run.data.metrics),
                      val_top1_by_epoch=[round(m.value, 4) for m in sorted(history, key=lambda m: m.step)],
                      train_img_per_s=run.data.metrics.get("img_per_s"))
    result.update(top1_training_validation=result.get("val_top1_by_epoch", [None])[-1]
                  if result.get("val_top1_by_epoch") else None,
                  top1_registered_model_on_cpu=None, eval_images=None, top1_equal=None)
    if registered:
        log(f"train: ran eval models:/{registered} on the CPU")
        cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}
        code, out = run_command([ran, "eval", f"models:/{registered}", "--data", shards], work, cpu_env,
                                deadline - time.time() - 5)
        top1, images = _search(r"top-1\s+([0-9.]+)", out), _search(r"(\d+) images", out)
        result["eval_exit_code"] = code
        if top1 and images and result["top1_training_validation"] is not None:
            n = result["eval_images"] = int(images)
            result["top1_registered_model_on_cpu"] = float(top1)
            # Compare counts of correct samples (the printed top-1 has 4 decimals).
            result["top1_equal"] = (round(float(top1) * n) ==
                                    round(result["top1_training_validation"] * n))
    return result


def _search(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# Orchestration


def machine(cpu_only: bool) -> dict[str, Any]:
    """Cores, versions and the GPU (its name starts CUDA in this process)."""
    import torch
    import torchvision

    info: dict[str, Any] = {"cpu_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                            "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "cuda_available": torch.cuda.is_available(), "gpu": None,
                            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true",
                        help="skip the GPU: every part at CI size on the CPU")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="stop measuring after this many seconds and report (default 450)")
    parser.add_argument("--parts", default="data,model,train", help="comma-separated subset")
    parser.add_argument("--keep", help="keep the work directory (shards, runs, mlflow.db) here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model_child(json.loads(args.child))
        return 0
    started = time.time()
    deadline = started + args.budget_s
    parts = set(args.parts.split(","))
    import torch

    if not args.cpu_only and not torch.cuda.is_available():
        print("error: no CUDA device here; run benchmarks/gpu_check.sh --cpu-only", file=sys.stderr)
        return 2
    cfg = settings(args.cpu_only)
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ran-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    not_measured: list[str] = []
    if args.cpu_only:
        not_measured.append("GPU figures (--cpu-only): model MFU on a GPU, torch.compile, nvJPEG "
                            "decode and the GPU training run; the same code ran on the CPU at CI size")
    report: dict[str, Any] = {"benchmark": "gpu_check", "cpu_only": args.cpu_only, "machine": None,
                              "settings": cfg}
    try:
        log(f"writing {cfg['train_images'] + cfg['val_images']} synthetic JPEGs and shards in {work}")
        report["dataset"] = write_jpeg_shards(work, cfg["train_images"], cfg["val_images"])
        report["machine"] = info = machine(args.cpu_only)  # after the generator's forks: it starts CUDA
        shards = str(work / "shards")
        jpegs = [p.read_bytes() for p in sorted((work / "images" / "train").glob("*/*.jpg"))][:256]
        report["data"] = data_part(shards, jpegs, cfg, args.cpu_only) if "data" in parts else None
        lock = str(work / "gpu.lock")
        running, results = {}, {}
        if "model" in parts:
            for name in MODELS:
                spec = {"model": name, "device": "cpu" if args.cpu_only else "cuda",
                        "size": cfg["model_size"], "batch": cfg["model_batch"],
                        "steps": cfg["model_steps"], "warmup": cfg["model_warmup"],
                        "compile": cfg["compile"], "lock": lock,
                        "matmul_size": cfg["matmul_size"] if name == "resnet50" else 0}
                log(f"model: {name} ({'on the CPU' if args.cpu_only else 'compiling in the background'})")
                running[name] = start_model_child(spec, work)
                if args.cpu_only:  # nothing to compile: one model at a time
                    results[name] = collect_model_child(*running.pop(name), deadline)
        report["train"] = None
        if "train" in parts:
            with gpu_lock(lock):  # the models compile meanwhile; their timed steps wait
                report["train"] = train_part(work, shards, cfg, args.cpu_only,
                                             deadline - (60 if running else 0))
        report["model"] = None
        if "model" in parts:
            for name, child in running.items():
                results[name] = collect_model_child(*child, deadline)
            results = {name: results[name] for name in MODELS}
            report["model"] = summarise_models(results, cfg, info["gpu"] or "", args.cpu_only)
            incomplete = [f"{n}: {r['incomplete']}" for n, r in results.items() if r.get("incomplete")]
            not_measured += [f"model {text}" for text in incomplete]
        else:
            report["model"] = None
    finally:
        report["not_measured"] = not_measured
        report["wall_s"] = round(time.time() - started, 1)
        report["budget_s"] = args.budget_s
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check (issues 16, 21, 25): the training step, the data path, and a short ``ran train`` on one GPU.

Run it through ``benchmarks/gpu_check.sh`` (which caps it at 8 minutes); it prints one JSON object
on stdout, progress on stderr. Three parts:

1. bench: ``ran bench`` (ran/bench.py) of Attention-56 beside torchvision's ResNet-50 and of
   Attention-92 (ImageNet stems, 224 px, batch 256; bf16 and fp16, eager, compiled and as a
   whole-step CUDA graph) and of CIFAR-stem Attention-92 at the paper's batch 64 (bf16, eager,
   compiled, CUDA graph, both); each bench reports img/s, MFU against a bf16 matmul measured in
   the same run, peak memory, compile or capture time, the 20-step loss check and the layout walk
   (every activation channels_last and in the autocast dtype); Attention-56's also the profile by
   op family of its fastest setting. The goals of issue 25 are summarised as ratios from this run.
   Each bench runs in its own process; they compile at once, and the timed steps take turns under
   a lock (``RAN_BENCH_LOCK``), so nothing else runs on the GPU while one is timed.
2. data: ImageNet-size synthetic JPEGs (about 500x375, quality 90, 10 learnable classes): bare
   libjpeg-turbo full-size decode per core, the CPU path's training transform per core (goal: at
   least 90% of the bare decode), the CPU path's loader with every core, and the device path
   (``data.decode: gpu``) with 1 and 3 loader workers: img/s and the CPU cores it used (CPU seconds
   of the training process and its loader workers per second; goal: 2,500 img/s with at most 4).
   Then issue 21's figures, each against its goal as a ratio from this run: the device path's
   decode alone (``DeviceDecoder``'s nvJPEG list decode of one batch of JPEG bytes; img/s, CPU
   cores, progressive JPEGs in it) and place alone (``place()``: crop + resize + flip of that
   batch, already decoded on the device), each against the device path's goal (7,000 img/s on at
   most 2 cores), and Attention-56 training fed by the device path (4 workers, batch 256, bf16)
   over the same step on device-resident synthetic batches (goal: 0.97).
   Runs first, alone on the machine.
3. train: ``ran train`` of Attention-56 with 1 GPU worker on those shards for 2 short epochs
   (``data.decode: auto``, so the GPU decodes); checks it finishes, checkpoints, logs to MLflow and
   registers the model, then evaluates the registered model on the CPU (``ran eval``, the CPU
   decode path) and compares top-1 with the run's own validation. Runs while part 1 compiles.

``--cpu-only`` runs every part on the CPU at CI size (fewer images, 64 px models, fp32 eager, the
device path in its CPU form), so the script and its JSON are tested where there is no GPU. Fields
that only a GPU fills are then null, and ``not_measured`` says why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
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
CLASSES = 10
# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s (SXM parts; first match wins).
GOAL_DATA_IMG_S = 2500  # per GPU
GOAL_DATA_CORES = 4  # CPU cores per GPU
GOAL_CPU_TRANSFORM_VS_DECODE = 0.9
GOAL_DEVICE_IMG_S = 7000  # issue 21: the device path alone, per GPU ...
GOAL_DEVICE_CORES = 2  # ... on at most this many CPU cores
GOAL_FED_VS_SYNTHETIC = 0.97  # issue 21: training fed by the device path / on synthetic batches


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Settings


def settings(cpu_only: bool) -> dict[str, Any]:
    """Sizes of every part: GPU (default) or CI size on the CPU."""
    if cpu_only:
        return {"train_images": 96, "val_images": 32, "loader_batch": 32,
                "loader_epochs": 2, "gpu_path_workers": [1], "train_crop": 64, "train_batch": 16,
                "train_workers": 1, "device_batch": 16, "device_crop": 64, "device_rounds": 2,
                "fed_batch": 4, "fed_crop": 64, "fed_workers": 1, "fed_steps": 2, "fed_warmup": 1}
    return {"train_images": 2048, "val_images": 256, "loader_batch": 256,
            "loader_epochs": 3, "gpu_path_workers": [1, 3], "train_crop": 224, "train_batch": 64,
            "train_workers": 3, "device_batch": 256, "device_crop": 224, "device_rounds": 10,
            "fed_batch": 256, "fed_crop": 224, "fed_workers": 4, "fed_steps": 30, "fed_warmup": 3}


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


def _timed(work: Any, rounds: int, images: int, device: Any,
           other_cpu: Any = lambda: 0.0) -> dict[str, float]:
    """img/s and CPU cores (this process, all its threads, plus ``other_cpu()`` seconds: other
    processes') of ``rounds`` calls of ``work`` after one warm-up call, ``images`` images a call,
    the device synchronised before each clock."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    sync()
    cpu0, start = time.process_time() + other_cpu(), time.perf_counter()
    for _ in range(rounds):
        work()
    sync()
    wall, cpu = time.perf_counter() - start, time.process_time() + other_cpu() - cpu0
    return {"img_s": round(rounds * images / wall, 1), "cpu_cores_used": round(cpu / wall, 2),
            "images": rounds * images, "wall_s": round(wall, 3)}


def device_decode_and_place(jpegs: list[bytes], cfg: dict[str, Any], device: Any) -> dict[str, Any]:
    """The device path's two stages alone, on one batch of ``cfg["device_batch"]`` JPEGs:

    - decode: :class:`ran.data.gpu.DeviceDecoder`'s decode of a list of JPEG bytes (nvJPEG's
      batched call on a GPU: baseline JPEGs in one list, progressive ones in a second);
    - place: :func:`ran.data.gpu.place` (crop + resize + flip) of the already-decoded images on
      the device, with training crop boxes, in the groups the decoder uses.
    """
    import random

    import torch

    from ran.data.gpu import DeviceDecoder, jpeg_params, place, place_groups
    from ran.data.transforms import ImageNetTrain

    batch, crop, rounds = cfg["device_batch"], cfg["device_crop"], cfg["device_rounds"]
    jpegs = (jpegs * (batch // len(jpegs) + 1))[:batch]
    pieces = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    keys = [str(i) for i in range(batch)]
    decoder = DeviceDecoder(crop, device)
    decode = _timed(lambda: decoder._decode(pieces, keys), rounds, batch, device)
    before = decoder.progressive
    decoded = decoder._decode(pieces, keys)
    progressive = decoder.progressive - before
    transform, rng = ImageNetTrain(crop), random.Random(0)
    params = [jpeg_params(transform, image.shape[2], image.shape[1], rng) for image in decoded]
    boxes = [list(box) for box, _ in params]
    calls = []
    for group in place_groups(list(range(batch)), boxes):
        images = [decoded[i] for i in group]
        geometry = DeviceDecoder._geometry([images], torch.tensor([boxes[i] for i in group]),
                                           torch.tensor([params[i][1] for i in group]),
                                           torch.arange(len(group)))[:, :8].to(device)
        box_max = (max(boxes[i][3] for i in group), max(boxes[i][2] for i in group))
        calls.append((images, geometry, box_max))
    placed = _timed(lambda: [place(images, geometry, box_max, crop)
                             for images, geometry, box_max in calls], rounds, batch, device)
    return {"decode": {"device": str(device), "batch": batch, **decode,
                       "progressive_in_batch": progressive},
            "place": {"device": str(device), "batch": batch, "crop": crop, "groups": len(calls),
                      **placed}}


def repeated_shards(shards: str, times: int) -> str:
    """``shards`` with its train split listed ``times`` times (links to the same files, in a
    folder beside it), so that a timed run of many steps stays within one epoch, as on ImageNet."""
    if times <= 1:
        return shards
    source = Path(shards).resolve()
    out = source.with_name(f"{source.name}_x{times}")
    out.mkdir(exist_ok=True)
    manifest = json.loads((source / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    listed = []
    for k in range(times):
        for shard in train["shards"]:
            name = f"{k}-{shard['name']}"
            with contextlib.suppress(FileExistsError):
                (out / name).symlink_to(source / shard["name"])
            listed.append({**shard, "name": name})
    manifest["splits"] = {"train": {**train, "shards": listed, "total": train["total"] * times}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


def fed_vs_synthetic(shards: str, cfg: dict[str, Any], device: Any, deadline: float) -> dict[str, Any]:
    """Training Attention-56 (bf16 autocast on a GPU, fp32 on a CPU; channels_last, SGD) fed by
    the device path (``data.decode: gpu``, ``cfg["fed_workers"]`` loader workers) against the
    same step on device-resident synthetic uint8 batches, timed before and, on a GPU, after the
    fed run (the better counts); the ratio is the issue's fed/synthetic figure."""
    import torch
    import torch.nn.functional as F

    from ran.data.read import make_loader, read_manifest
    from ran.data.transforms import normalizer
    from ran.models import create_model

    cuda = device.type == "cuda"
    batch, crop, steps = cfg["fed_batch"], cfg["fed_crop"], cfg["fed_steps"]
    torch.backends.cudnn.benchmark = cuda
    threads = torch.get_num_threads()
    if not cuda:  # one thread: intra-op threads of a step on a shared CI machine stall each other
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("attention56", stem="imagenet", num_classes=CLASSES).to(
        device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=cuda or None)
    normalize = normalizer("imagenet")

    def step(images: Any, labels: Any) -> None:
        x = normalize(images).contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    synthetic = [torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=device)
                 for _ in range(4)]
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    turn = iter(range(1 << 30))

    def synthetic_step() -> None:
        step(synthetic[next(turn) % 4], labels)

    ceiling = [_timed(synthetic_step, steps, batch, device)]
    warm = cfg["fed_warmup"]  # steps while the workers start and the decoder warms up (then _timed's)
    per_epoch = read_manifest(shards)["splits"]["train"]["total"] // batch
    shards = repeated_shards(shards, -(-(warm + 1 + steps) // per_epoch))  # all in one epoch
    loader = make_loader(shards, "train", train=True, batch_size=batch, recipe="imagenet", crop=crop,
                         workers=cfg["fed_workers"], decode="gpu", device=device, seed=0)

    def batches() -> Iterator[Any]:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            epoch += 1
            yield from loader

    feed = batches()

    def fed_step() -> None:
        b = next(feed)
        step(b.images.to(device, non_blocking=True), b.labels.to(device, non_blocking=True))

    for _ in range(warm):
        fed_step()
    workers = [w.pid for w in getattr(loader.dataloader._iterator, "_workers", [])]
    fed = _timed(fed_step, steps, batch, device, lambda: process_tree_cpu(workers))
    progressive = loader.progressive
    feed.close()
    loader.close()
    if cuda and time.time() < deadline:  # again after the fed run (CI's CPU form: once)
        ceiling.append(_timed(synthetic_step, steps, batch, device))
    best = max(c["img_s"] for c in ceiling)
    del model, optimizer, synthetic
    torch.set_num_threads(threads)
    if cuda:
        torch.cuda.empty_cache()
    return {"model": "attention56", "device": str(device), "precision": "bf16" if cuda else "fp32",
            "batch": batch, "crop": crop, "steps": steps, "workers": cfg["fed_workers"],
            "synthetic_img_s": [c["img_s"] for c in ceiling], "fed_img_s": fed["img_s"],
            "fed_cpu_cores_used": fed["cpu_cores_used"], "progressive": progressive,
            "fed_vs_synthetic": round(fed["img_s"] / best, 3)}


def data_part(shards: str, jpegs: list[bytes], cfg: dict[str, Any], cpu_only: bool,
              deadline: float = float("inf")) -> dict[str, Any]:
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
    log(f"data: the device path's decode alone and place alone on {device}")
    stages = device_decode_and_place(jpegs, cfg, device)
    out["device_decode"], out["device_place"] = stages["decode"], stages["place"]
    log(f"data: Attention-56 fed by the device path vs on synthetic batches, on {device}")
    out["fed"] = fed_vs_synthetic(shards, cfg, device, deadline)
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
        # issue 21, each a ratio from this run ("met" is judged on a GPU only)
        "device_decode_alone": device_goal(out["device_decode"], cpu_only),
        "device_place_alone": device_goal(out["device_place"], cpu_only),
        "device_path_alone": device_goal(max(out["gpu_path"], key=lambda r: r["img_s"]), cpu_only),
        "fed_vs_synthetic": {"goal": GOAL_FED_VS_SYNTHETIC, "measured": out["fed"]["fed_vs_synthetic"],
                             "met": None if cpu_only else
                             out["fed"]["fed_vs_synthetic"] >= GOAL_FED_VS_SYNTHETIC},
    }
    return out


def device_goal(run: dict[str, Any], cpu_only: bool) -> dict[str, Any]:
    """One device-path figure against issue 21's goal for the whole device path (a stage alone
    must reach it too): img/s, its ratio to the goal, and the CPU cores it used."""
    return {"goal": GOAL_DEVICE_IMG_S, "max_cpu_cores": GOAL_DEVICE_CORES, "measured": run["img_s"],
            "vs_goal": round(run["img_s"] / GOAL_DEVICE_IMG_S, 3),
            "cpu_cores_used": run["cpu_cores_used"],
            "met": None if cpu_only else (run["img_s"] >= GOAL_DEVICE_IMG_S
                                          and run["cpu_cores_used"] <= GOAL_DEVICE_CORES)}


# ---------------------------------------------------------------------------------------------
# Part 1: the training step (`ran bench`, one process per model)


def gpu_lock(path: str) -> Any:
    """Exclusive use of the GPU for timing, between the processes of this check (the benches
    take the same lock through RAN_BENCH_LOCK)."""
    from ran.bench import file_lock

    return file_lock(path)


# The benches of the step (issue 25): name -> (model, stem, crop, batch, precisions, modes, baseline).
# On a GPU the modes are those the goals need (eager, compiled, a whole-step CUDA graph);
# every other mode is a `ran bench --modes` away. On the CPU: fp32 eager at CI size.
BENCHES = {
    "attention56": ("attention56", "imagenet", 224, 256, "bf16,fp16", "eager,default,cuda_graph", "resnet50"),
    "attention92": ("attention92", "imagenet", 224, 256, "bf16,fp16", "eager,default,cuda_graph", "none"),
    "attention92_cifar": ("attention92", "cifar", 32, 64, "bf16",
                          "eager,default,cuda_graph,default+cuda_graph", "none"),
}
GOALS = {"attention56_mfu_vs_resnet50": 1.0, "attention92_mfu_vs_resnet50": 0.9,
         "attention56_img_per_s": 3600, "attention92_cifar_b64_img_per_s": 6000}


def bench_job(work: Path, name: str, cpu_only: bool) -> tuple[Path, list[str]]:
    """The job file and the `ran bench` arguments of one bench."""
    import yaml

    model, stem, crop, batch, precisions, modes, baseline = BENCHES[name]
    if cpu_only:
        crop, batch, precisions, modes = (64 if stem == "imagenet" else 32), 2, "fp32", "eager"
    job = {"name": f"bench-{name}", "model": {"name": model, "stem": stem, "num_classes": CLASSES},
           "data": {"recipe": stem, "crop": crop, "batch_size": batch},
           "train": {"epochs": 1, "channels_last": True},
           "scaling": {"num_workers": 1, "use_gpu": not cpu_only}}
    path = work / f"bench-{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    args = [str(path), "--precision", precisions, "--modes", modes, "--baseline", baseline,
            "--steps", "3" if cpu_only else "30", "--json"]
    if name == "attention56":
        args.append("--profile")
    return path, args


def start_bench(work: Path, name: str, cpu_only: bool, budget_s: float, lock: str) -> tuple[subprocess.Popen, Path]:
    """`ran bench` of one model in its own process: the benches compile at once (CPU work) and
    take turns on the GPU (RAN_BENCH_LOCK, shared with the training part)."""
    _, args = bench_job(work, name, cpu_only)
    output = work / f"bench-{name}.json"
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "RAN_BENCH_LOCK": lock, "RAN_CACHE_DIR": str(work / "cache")}
    ran = str(Path(sys.executable).with_name("ran"))
    with open(output, "w") as stdout:
        proc = subprocess.Popen([ran, "bench", *args, "--budget-s", str(int(budget_s))],
                                stdout=stdout, cwd=REPO, env=env)
    return proc, output


def collect_bench(proc: subprocess.Popen, output: Path, deadline: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"incomplete": "stopped at the time budget"}
    try:
        return json.loads(output.read_text())
    except ValueError:
        return {"incomplete": f"exit code {proc.returncode} (its stderr is above)"}


def _best(report: dict[str, Any], model: str, **match: Any) -> dict[str, Any] | None:
    rows = [r for r in report.get("rows", []) if r["model"] == model and r.get("img_per_s")
            and all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["img_per_s"]) if rows else None


def summarise_benches(benches: dict[str, dict[str, Any]], cpu_only: bool) -> dict[str, Any]:
    """The issue's goals, each as a ratio from this one run."""
    a56, a92, cifar = (benches.get(n, {}) for n in ("attention56", "attention92", "attention92_cifar"))
    base = _best(a56, "resnet50")
    goals: dict[str, Any] = {}

    def goal(name: str, measured: float | None) -> None:
        target = GOALS[name]
        goals[name] = {"goal": target, "measured": measured,
                       "met": None if cpu_only or measured is None else measured >= target}

    for key, report, model in (("attention56", a56, "attention56"), ("attention92", a92, "attention92")):
        mine = _best(report, model)
        goal(f"{key}_mfu_vs_resnet50",
             round(mine["mfu"] / base["mfu"], 3) if mine and base and base["mfu"] else None)
    best56 = _best(a56, "attention56")
    goal("attention56_img_per_s", best56["img_per_s"] if best56 else None)
    best_cifar = _best(cifar, "attention92")
    goal("attention92_cifar_b64_img_per_s", best_cifar["img_per_s"] if best_cifar else None)
    compile_vs_eager = {}
    for name, report in benches.items():
        model = BENCHES[name][0]
        eager = _best(report, model, compile="off", cuda_graph=False)
        comp = _best(report, model, compile="default", cuda_graph=False)
        compile_vs_eager[name] = round(comp["img_per_s"] / eager["img_per_s"], 3) if eager and comp else None
    return {"goals": goals, "compile_over_eager": compile_vs_eager,
            "fastest": {n: (r.get("fastest") or {}).get("set") for n, r in benches.items()},
            "layout_detours": {n: (r.get("layout") or {}).get("detours") for n, r in benches.items()}}


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
        history = client.get_metric_history(run_id, "eval/top1")
        result.update(mlflow_status=run.info.status,
                      mlflow_metrics=sorted(run.data.metrics),
                      val_top1_by_epoch=[round(m.value, 4) for m in sorted(history, key=lambda m: m.step)],
                      train_img_per_s=run.data.metrics.get("perf/img_per_s"))
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
    parser.add_argument("--parts", default="data,bench,train", help="comma-separated subset")
    parser.add_argument("--keep", help="keep the work directory (shards, runs, mlflow.db) here")
    args = parser.parse_args(argv)
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
        not_measured.append("GPU figures (--cpu-only): the step's settings on a GPU (bf16/fp16, "
                            "torch.compile, CUDA graphs), nvJPEG decode and the GPU training run; "
                            "the same code ran on the CPU at CI size")
    report: dict[str, Any] = {"benchmark": "gpu_check", "cpu_only": args.cpu_only, "machine": None,
                              "settings": cfg}
    try:
        log(f"writing {cfg['train_images'] + cfg['val_images']} synthetic JPEGs and shards in {work}")
        report["dataset"] = write_jpeg_shards(work, cfg["train_images"], cfg["val_images"])
        report["machine"] = info = machine(args.cpu_only)  # after the generator's forks: it starts CUDA
        shards = str(work / "shards")
        jpegs = [p.read_bytes() for p in sorted((work / "images" / "train").glob("*/*.jpg"))][:256]
        report["data"] = (data_part(shards, jpegs, cfg, args.cpu_only, deadline - 60)
                          if "data" in parts else None)
        lock = str(work / "gpu.lock")
        running: dict[str, Any] = {}
        if "bench" in parts:
            for name in BENCHES:
                log(f"bench: ran bench {name} ({'on the CPU' if args.cpu_only else 'compiling in the background'})")
                running[name] = start_bench(work, name, args.cpu_only, deadline - time.time() - 60, lock)
                if args.cpu_only:  # nothing to compile: one at a time
                    running[name] = collect_bench(*running[name], deadline)
        report["train"] = None
        if "train" in parts:
            with gpu_lock(lock):  # the benches compile meanwhile; their timed steps wait
                report["train"] = train_part(work, shards, cfg, args.cpu_only,
                                             deadline - (60 if running else 0))
        report["bench"] = None
        if "bench" in parts:
            benches = {name: (child if isinstance(child, dict) else collect_bench(*child, deadline))
                       for name, child in running.items()}
            report["bench"] = {"reports": benches, **summarise_benches(benches, args.cpu_only)}
            not_measured += [f"bench {n}: {r['incomplete']}" for n, r in benches.items()
                             if r.get("incomplete")]
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

"""Training-pipeline throughput: ``ran.data`` shards vs torchvision ImageFolder, same files and workers.

Generates ImageNet-like JPEGs (about 500x375, quality 90) and CIFAR-size PNGs (32x32), builds
shards from the same files, then times one epoch of each training pipeline after a warm-up epoch
(persistent workers on both sides, so worker start-up is not timed). Reports images per second
and images per CPU-second (main process + loader workers), which stays meaningful on a machine
shared with other jobs:

- ours: ``ran.data.make_loader(train=True)``: random-resized crop (or pad + crop for CIFAR), flip,
  lighting; uint8 batches (the float conversion and normalisation run later, on the GPU). Also
  timed with that normalisation done on the CPU in the main process, for a like-for-like figure.
- baseline: ``torchvision.datasets.ImageFolder`` + ``DataLoader`` + RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, Normalize (CIFAR: RandomCrop(32, padding=4) instead).

``--scaling`` measures instead how the CPU path scales: ``make_loader(train=True)`` on the JPEG
shards at 1, 2, 4, ... loader workers up to the cores (``--max-workers``), each after a warm-up
epoch, with images per second, the main process's CPU seconds per batch (the training process:
its pin-memory thread included) and the workers' CPU seconds per batch, and the ratios against
1 worker (``img_s_vs_1_worker``; ideal: the worker count while cores are free).

Prints one JSON object. ``--images``/``--cifar-images`` trade run time for steadier figures; the
default run takes about a minute on 2 idle cores.

    python benchmarks/data_speed.py [--workers 2] [--images 512] [--cifar-images 5120]
    python benchmarks/data_speed.py --scaling [--max-workers 16] [--images 1024]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from ran.data.read import make_loader
from ran.data.transforms import normalizer
from ran.data.write import build_shards


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour regions plus detail and sensor-like noise: compresses like a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8))
    detail = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
    pixels = (np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32) * 0.65
              + np.asarray(detail.resize((width, height), Image.BILINEAR), dtype=np.float32) * 0.35
              + rng.normal(0, 8, (height, width, 3)))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_folder(root: str, count: int, classes: int, size: tuple[int, int] | None, fmt: str,
                 seed: int) -> int:
    """``root/<class>/<i>.<ext>``; ``size=None`` varies sizes around 500x375. Returns total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        width, height = size or (int(rng.integers(440, 560)), int(rng.integers(330, 420)))
        out = io.BytesIO()
        natural_image(rng, width, height).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        path = os.path.join(folder, f"{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}")
        with open(path, "wb") as f:
            f.write(out.getvalue())
        total += len(out.getvalue())
    return total


_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def time_epochs(make_iter, workers_of, epochs: int, normalize=None) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the best of ``epochs`` epochs after a warm-up epoch.

    CPU seconds count the main process and the loader workers, so the second figure holds even
    when other jobs share the machine; the first is what a training loop would see.
    """
    best_rate = best_per_cpu = 0.0
    for epoch in range(epochs + 1):
        pids = workers_of() if epoch > 0 else []
        cpu_start = time.process_time() + sum(process_cpu(p) for p in pids)
        start, images = time.perf_counter(), 0
        for batch in make_iter(epoch):
            x = batch[0]
            if normalize is not None:
                x = normalize(x)
            images += len(x)
        wall = time.perf_counter() - start
        cpu = time.process_time() + sum(process_cpu(p) for p in pids) - cpu_start
        if epoch > 0:
            best_rate = max(best_rate, images / wall)
            best_per_cpu = max(best_per_cpu, images / max(cpu, 1e-9))
    return best_rate, best_per_cpu


def _worker_pids(dataloader: DataLoader):
    return lambda: [w.pid for w in getattr(dataloader._iterator, "_workers", [])]


def compare(name: str, folder: str, shards: str, *, recipe: str, crop: int, batch_size: int,
            workers: int, epochs: int, baseline_transform) -> dict:
    ours = make_loader(shards, "train", train=True, batch_size=batch_size, recipe=recipe, crop=crop,
                       workers=workers, seed=0)

    def ours_epoch(epoch):
        ours.set_epoch(epoch)
        return ours

    normalize = normalizer(recipe)
    dataset = datasets.ImageFolder(folder, transform=baseline_transform)
    baseline = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                          num_workers=workers, persistent_workers=workers > 0)
    runs = {
        "baseline": lambda: time_epochs(lambda e: baseline, _worker_pids(baseline), epochs),
        "ours": lambda: time_epochs(ours_epoch, _worker_pids(ours.dataloader), epochs),
        "ours_cpu_normalize": lambda: time_epochs(ours_epoch, _worker_pids(ours.dataloader), epochs,
                                                  normalize),
    }
    rates: dict[str, list[tuple[float, float]]] = {}
    for _ in range(2):  # interleaved rounds: load from other processes hits every pipeline alike
        for key, run in runs.items():
            rates.setdefault(key, []).append(run())
    ours.close()
    wall = {k: max(r for r, _ in v) for k, v in rates.items()}
    per_cpu = {k: max(c for _, c in v) for k, v in rates.items()}
    return {
        "case": name,
        "images": len(dataset),
        "batch_size": batch_size,
        "workers": workers,
        "output": f"{crop}x{crop}",
        "ours_img_s": round(wall["ours"], 1),
        "ours_img_s_per_worker": round(wall["ours"] / max(workers, 1), 1),
        "baseline_img_s": round(wall["baseline"], 1),
        "baseline_img_s_per_worker": round(wall["baseline"] / max(workers, 1), 1),
        "speedup": round(wall["ours"] / wall["baseline"], 2),
        "ours_img_per_cpu_s": round(per_cpu["ours"], 1),
        "baseline_img_per_cpu_s": round(per_cpu["baseline"], 1),
        "speedup_per_cpu_s": round(per_cpu["ours"] / per_cpu["baseline"], 2),
        "ours_with_cpu_normalize_img_s": round(wall["ours_cpu_normalize"], 1),
        "ours_with_cpu_normalize_img_per_cpu_s": round(per_cpu["ours_cpu_normalize"], 1),
    }


def worker_counts(max_workers: int) -> list[int]:
    """1, 2, 4, ... below ``max_workers``, then ``max_workers`` itself."""
    counts, n = [], 1
    while n < max_workers:
        counts.append(n)
        n *= 2
    return counts + [max_workers]


def scaling(shards: str, *, recipe: str, crop: int, batch_size: int, max_workers: int,
            epochs: int, pin_memory: bool) -> list[dict]:
    """The CPU path at each worker count: img/s, CPU seconds per batch in the main process and in
    the workers, and img/s relative to 1 worker."""
    rows = []
    for workers in worker_counts(max_workers):
        loader = make_loader(shards, "train", train=True, batch_size=batch_size, recipe=recipe,
                             crop=crop, workers=workers, seed=0, pin_memory=pin_memory)
        best = None
        for epoch in range(epochs + 1):  # epoch 0 starts the workers and warms up
            loader.set_epoch(epoch)
            pids = _worker_pids(loader.dataloader)() if epoch else []
            main_start = time.process_time()
            workers_start = sum(process_cpu(p) for p in pids)
            start, images, batches = time.perf_counter(), 0, 0
            for batch in loader:
                images += len(batch.labels)
                batches += 1
            wall = time.perf_counter() - start
            main_cpu = time.process_time() - main_start
            workers_cpu = sum(process_cpu(p) for p in pids) - workers_start
            if epoch and (best is None or images / wall > best["img_s"]):
                best = {"workers": workers, "img_s": round(images / wall, 1),
                        "main_cpu_ms_per_batch": round(1e3 * main_cpu / batches, 2),
                        "workers_cpu_ms_per_batch": round(1e3 * workers_cpu / batches, 1),
                        "main_cpu_share": round(main_cpu / max(main_cpu + workers_cpu, 1e-9), 4),
                        "batches": batches}
        loader.close()
        rows.append(best)
    for row in rows:
        row["img_s_vs_1_worker"] = round(row["img_s"] / rows[0]["img_s"], 3)
        row["main_cpu_per_batch_vs_1_worker"] = round(
            row["main_cpu_ms_per_batch"] / max(rows[0]["main_cpu_ms_per_batch"], 1e-9), 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="ImageNet-like JPEGs")
    parser.add_argument("--cifar-images", type=int, default=5120, help="32x32 PNGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per round (best counts)")
    parser.add_argument("--scaling", action="store_true",
                        help="only the CPU path at 1, 2, 4, ... workers (see the module docstring)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to workers
    if args.scaling:
        with tempfile.TemporaryDirectory(prefix="ran-data-scaling-") as tmp:
            jpeg_dir = os.path.join(tmp, "jpeg")
            write_folder(jpeg_dir, args.images, 10, None, "JPEG", seed=0)
            build_shards("imagefolder", jpeg_dir, os.path.join(tmp, "shards"), samples_per_shard=100,
                         workers=min(2, args.max_workers), progress=False)
            rows = scaling(os.path.join(tmp, "shards"), recipe="imagenet", crop=224,
                           batch_size=args.batch_size, max_workers=args.max_workers,
                           epochs=args.epochs, pin_memory=torch.cuda.is_available())
        print(json.dumps({
            "benchmark": "data_speed --scaling",
            "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                     "python": platform.python_version(), "torch": torch.__version__},
            "case": "imagenet-like jpeg ~500x375 q90 -> 224, train transform",
            "images": args.images, "batch_size": args.batch_size, "scaling": rows,
        }, indent=1))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="ran-data-speed-") as tmp:
        jpeg_dir, png_dir = os.path.join(tmp, "jpeg"), os.path.join(tmp, "png")
        jpeg_bytes = write_folder(jpeg_dir, args.images, 10, None, "JPEG", seed=0)
        write_folder(png_dir, args.cifar_images, 10, (32, 32), "PNG", seed=1)
        build_shards("imagefolder", jpeg_dir, os.path.join(tmp, "jpeg-shards"), samples_per_shard=100,
                     workers=args.workers, progress=False)
        build_shards("imagefolder", png_dir, os.path.join(tmp, "png-shards"), samples_per_shard=1000,
                     workers=args.workers, progress=False)

        imagenet_baseline = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        results.append(compare("imagenet-like jpeg ~500x375 q90 -> 224", jpeg_dir,
                               os.path.join(tmp, "jpeg-shards"), recipe="imagenet", crop=224, batch_size=64,
                               workers=args.workers, epochs=args.epochs,
                               baseline_transform=imagenet_baseline))
        results[-1]["mean_jpeg_kb"] = round(jpeg_bytes / args.images / 1024, 1)
        cifar_baseline = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
        results.append(compare("cifar-size png 32x32 -> 32", png_dir, os.path.join(tmp, "png-shards"),
                               recipe="cifar", crop=32, batch_size=128, workers=args.workers,
                               epochs=args.epochs, baseline_transform=cifar_baseline))

    print(json.dumps({
        "benchmark": "data_speed",
        "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                 "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()

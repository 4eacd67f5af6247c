"""ran's tar reader against webdataset's, on the same shards, in one run.

Why it exists: ``ran.data.read`` keeps its own small tar reader (``iter_tar``) instead of
``webdataset.WebDataset``; that choice stands only while this benchmark measures it faster.

Writes ImageNet-like JPEGs (about 500x375, quality 90; or CIFAR-size 32x32 PNGs with ``--png``)
into shards with ``ran data build``'s writer, then times, in alternating rounds (best round counts,
so load from other processes hits both readers alike):

- ``read``: every sample of every shard as (key, {extension: bytes}): ``ran.data.read.iter_tar``
  over the shard files vs ``webdataset.WebDataset(urls)`` (its tarfile-based expander and
  grouping). Microseconds per sample.
- ``decode``: the same, each sample then decoded by ran's eval transform (the same work for every
  sample on both sides: centre crop, DCT-scaled decode, resize to 224; CIFAR: the 32 px image) in
  this one process: ``ShardDataset`` (``make_loader(train=False, workers=0)``, so the figure also
  includes ran's label parsing and batch assembly) vs ``WebDataset(urls).map(transform)``.
  Microseconds per sample, end to end.

Prints one JSON object; ratios are webdataset / ran (above 1: ran's reader is faster).

    python benchmarks/tar_reader.py [--images 2000] [--rounds 3] [--png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time

import torch
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_speed import write_folder  # noqa: E402  (a sibling script)

from ran.data.read import iter_tar, make_loader, read_manifest, split_shards  # noqa: E402
from ran.data.transforms import make_transform  # noqa: E402
from ran.data.write import build_shards  # noqa: E402


def ran_read(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with open(url, "rb") as stream:
            for _key, _sample in iter_tar(stream):
                n += 1
    return n


def wds_read(urls: list[str]) -> int:
    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def ran_decode(path: str, batch_size: int, crop: int, recipe: str) -> int:
    loader = make_loader(path, "train", train=False, batch_size=batch_size, recipe=recipe,
                         crop=crop, workers=0)
    with contextlib.closing(loader):
        return sum(len(b.labels) for b in loader)


def wds_decode(urls: list[str], crop: int, recipe: str, ext: str) -> int:
    transform = make_transform(recipe, train=False, crop=crop)
    rng = random.Random(0)
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(
        lambda s: (transform.sample(s[ext], rng), int(s["cls"])))
    return sum(1 for _ in pipeline)


def us_per_sample(run) -> tuple[float, int]:
    """(microseconds per sample, samples) of one call of ``run``."""
    start = time.perf_counter()
    count = run()
    return (time.perf_counter() - start) / max(count, 1) * 1e6, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts")
    parser.add_argument("--png", action="store_true", help="32x32 PNGs (CIFAR-size) instead of JPEGs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe, crop, ext = ("cifar", 32, "png") if args.png else ("imagenet", 224, "jpg")

    with tempfile.TemporaryDirectory(prefix="ran-tar-reader-") as tmp:
        folder, shards = os.path.join(tmp, "src"), os.path.join(tmp, "shards")
        size = (32, 32) if args.png else None
        total_bytes = write_folder(folder, args.images, 10, size, "PNG" if args.png else "JPEG", seed=0)
        build_shards("imagefolder", folder, shards, samples_per_shard=500, workers=1, progress=False)
        urls = [url for url, _ in split_shards(shards, read_manifest(shards), "train")]
        with open(urls[0], "rb") as f:  # warm the page cache and both code paths
            f.read()
        ran_read(urls), wds_read(urls)

        runs = {
            "ran_read": lambda: ran_read(urls),
            "wds_read": lambda: wds_read(urls),
            "ran_decode": lambda: ran_decode(shards, 64, crop, recipe),
            "wds_decode": lambda: wds_decode(urls, crop, recipe, ext),
        }
        figures: dict[str, list[float]] = {key: [] for key in runs}
        counts = {}
        for _ in range(args.rounds):
            for key, run in runs.items():
                us, counts[key] = us_per_sample(run)
                figures[key].append(us)
        best = {k: min(v) for k, v in figures.items()}

    print(json.dumps({
        "benchmark": "tar_reader",
        "host": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "webdataset": wds.__version__ if hasattr(wds, "__version__") else "?"},
        "images": args.images, "kind": "png 32x32" if args.png else "jpeg ~500x375 q90",
        "mean_kb": round(total_bytes / args.images / 1024, 1), "rounds": args.rounds,
        "samples_counted": counts,
        "us_per_sample": {k: round(v, 1) for k, v in best.items()},
        "read_wds_over_ran": round(best["wds_read"] / best["ran_read"], 2),
        "decode_wds_over_ran": round(best["wds_decode"] / best["ran_decode"], 3),
        "note": "decode: eval transform (centre crop, DCT-scaled decode), single process; "
                "ran's side includes batch assembly",
    }, indent=1))


if __name__ == "__main__":
    main()

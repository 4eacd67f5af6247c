"""Sources -> WebDataset shards + ``manifest.json`` (ImageNet folders, image folders, CIFAR pickles).

Layout of an output directory or ``s3://`` prefix::

    train-000000.tar ... train-00NNNN.tar   samples: <key>.jpg|.png (source bytes), <key>.cls
    val-000000.tar ...
    manifest.json                            written last, atomically
    .build/<shard>.json                      per-shard record, lets a re-run skip finished shards

Samples are shuffled across shards with a seed; shards are written in parallel processes, each
one atomically (a reader never sees half a shard). Images that cannot be read or decoded are left
out and listed in the manifest with the reason.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import pickle
import random
import re
import sys
import tarfile
from typing import Any, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ran.data import DataError, storage

SOURCES = ("imagenet", "imagefolder", "cifar10", "cifar100")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
MANIFEST = "manifest.json"
STATE_DIR = ".build"
MANIFEST_FORMAT = 1
DEFAULT_SAMPLES_PER_SHARD = 2000  # about 220 MB of ImageNet JPEGs
REENCODE_QUALITY = 90


@dataclasses.dataclass
class Item:
    """One sample to write: a source image file, or raw HWC uint8 pixels to encode as PNG."""

    key: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    nbytes: int = 0  # source size, for size-capped shards
    mtime_ns: int = 0  # source modification time, part of the shard fingerprint

    @classmethod
    def file(cls, key: str, label: int, path: str) -> "Item":
        st = os.stat(path)
        return cls(key, label, path=path, nbytes=st.st_size, mtime_ns=st.st_mtime_ns)

    def fingerprint(self) -> str:
        if self.path is not None:
            return f"{self.key}|{self.label}|{self.path}|{self.nbytes}|{self.mtime_ns}"
        digest = hashlib.sha1(np.ascontiguousarray(self.pixels).tobytes()).hexdigest()
        return f"{self.key}|{self.label}|{digest}"


@dataclasses.dataclass
class Source:
    """A scanned dataset: class names and the items of each split."""

    dataset: str
    classes: list[str]
    splits: dict[str, list[Item]]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)


class _Skip(Exception):
    """An image that is left out; the message is the reason recorded in the manifest."""


# ---------------------------------------------------------------------------------------------
# Scanning sources


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(root: str) -> list[str]:
    """Image files under ``root`` (recursively), as sorted paths relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in filenames if _is_image(f)]
    return sorted(found)


class _Keys:
    """Unique WebDataset keys from relative paths (no dots in the basename; webdataset splits there)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, rel_path: str) -> str:
        stem = os.path.splitext(rel_path)[0].replace(os.sep, "/")
        head, _, base = stem.rpartition("/")
        base = re.sub(r"[.\s]", "_", base) or "_"
        key = f"{head}/{base}" if head else base
        unique, n = key, 1
        while unique in self.seen:
            unique, n = f"{key}_{n}", n + 1
        self.seen.add(unique)
        return unique


def _class_items(root: str, classes: list[str], keys: _Keys) -> list[Item]:
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for name in _subdirs(root):
        if name not in index:
            raise DataError(f"{os.path.join(root, name)}: class {name!r} is not among the training classes")
        class_dir = os.path.join(root, name)
        for rel in _image_files(class_dir):
            path = os.path.join(class_dir, rel)
            items.append(Item.file(keys(os.path.join(name, rel)), index[name], path))
    return items


def scan_imagefolder(root: str) -> Source:
    """``root/<class>/*.jpg`` (one split) or ``root/train/<class>/``, ``root/val/<class>/``."""
    _check_dir(root)
    if os.path.isdir(os.path.join(root, "train")) and _subdirs(os.path.join(root, "train")):
        classes = _subdirs(os.path.join(root, "train"))
        splits = {"train": _class_items(os.path.join(root, "train"), classes, _Keys())}
        if os.path.isdir(os.path.join(root, "val")):
            splits["val"] = _class_items(os.path.join(root, "val"), classes, _Keys())
    else:
        classes = _subdirs(root)
        if not classes:
            raise DataError(f"{root}: unknown layout: expected <class>/ folders of images "
                            "(or train/<class>/ and val/<class>/)")
        splits = {"train": _class_items(root, classes, _Keys())}
    return Source(os.path.basename(os.path.normpath(root)), classes, splits)


def _find_val_solution(candidates: Iterable[str]) -> str | None:
    for folder in candidates:
        path = os.path.join(folder, "LOC_val_solution.csv")
        if os.path.isfile(path):
            return path
    return None


def scan_imagenet(root: str) -> Source:
    """ILSVRC-2012: ``train/<wnid>/*.JPEG``; ``val/<wnid>/`` or flat ``val/`` + LOC_val_solution.csv.

    Accepts the Kaggle download root too (``ILSVRC/Data/CLS-LOC/...`` beside the CSV). Class
    index = position of the wnid in sorted order, as torchvision's ImageNet.
    """
    _check_dir(root)
    data_root = root
    kaggle = os.path.join(root, "ILSVRC", "Data", "CLS-LOC")
    if os.path.isdir(kaggle):
        data_root = kaggle
    train_dir = os.path.join(data_root, "train")
    if not os.path.isdir(train_dir) or not _subdirs(train_dir):
        raise DataError(f"{root}: unknown layout: expected train/<wnid>/*.JPEG "
                        "(and val/<wnid>/ or val/ with LOC_val_solution.csv)")
    classes = _subdirs(train_dir)
    source = Source("imagenet", classes, {"train": _class_items(train_dir, classes, _Keys())})
    val_dir = os.path.join(data_root, "val")
    if not os.path.isdir(val_dir):
        return source
    if _subdirs(val_dir):
        source.splits["val"] = _class_items(val_dir, classes, _Keys())
        return source
    parents = [val_dir, data_root, root, os.path.dirname(os.path.normpath(root))]
    solution = _find_val_solution(parents)
    files = sorted(f for f in os.listdir(val_dir) if _is_image(f))
    if files and solution is None:
        raise DataError(f"{val_dir}: flat val/ folder needs LOC_val_solution.csv "
                        f"(Kaggle) beside it or in {root}")
    source.splits["val"], source.skipped = _flat_val_items(val_dir, files, solution, classes)
    return source


def _flat_val_items(val_dir: str, files: list[str], solution: str | None,
                    classes: list[str]) -> tuple[list[Item], list[dict[str, str]]]:
    labels: dict[str, str] = {}
    if solution is not None:
        with open(solution, newline="") as f:
            for row in csv.DictReader(f):
                prediction = (row.get("PredictionString") or "").split()
                if row.get("ImageId") and prediction:
                    labels[row["ImageId"]] = prediction[0]
    index = {name: i for i, name in enumerate(classes)}
    items, skipped, keys = [], [], _Keys()
    for name in files:
        path = os.path.join(val_dir, name)
        wnid = labels.get(os.path.splitext(name)[0])
        if wnid is None:
            skipped.append({"path": path, "reason": "no label in LOC_val_solution.csv"})
        elif wnid not in index:
            skipped.append({"path": path, "reason": f"label {wnid} is not a training class"})
        else:
            items.append(Item.file(keys(name), index[wnid], path))
    return items, skipped


def _unpickle(path: str) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR batch file") from None
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR pickle ({type(exc).__name__}: {exc})") from None


def scan_cifar(root: str, variant: str) -> Source:
    """The python-pickle CIFAR folders (``cifar-10-batches-py/``, ``cifar-100-python/``)."""
    _check_dir(root)
    folder, train_files, test_files, meta_file, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                    "batches.meta", b"labels", b"label_names"),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
    }[variant]
    if not os.path.exists(os.path.join(root, train_files[0])):
        if not os.path.exists(os.path.join(root, folder, train_files[0])):
            raise DataError(f"{root}: unknown layout: expected {folder}/ with {train_files[0]} "
                            f"(the python version of {variant.upper()})")
        root = os.path.join(root, folder)
    meta_path = os.path.join(root, meta_file)
    classes = [n.decode() if isinstance(n, bytes) else str(n)
               for n in _unpickle(meta_path)[names_key]] if os.path.exists(meta_path) else None
    splits = {}
    for split, files in (("train", train_files), ("val", test_files)):
        if split == "val" and not os.path.exists(os.path.join(root, files[0])):
            continue
        items = []
        for name in files:
            batch = _unpickle(os.path.join(root, name))
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for label, image in zip(batch[label_key], pixels):
                items.append(Item(f"{len(items):06d}", int(label), pixels=image))
        splits[split] = items
    if classes is None:
        num = 1 + max(item.label for items in splits.values() for item in items)
        classes = [f"class_{i}" for i in range(num)]
    return Source(variant, classes, splits)


def _check_dir(root: str) -> None:
    if not os.path.exists(root):
        raise DataError(f"{root}: no such directory")
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory")


def scan_source(source: str, input_path: str) -> Source:
    """Scan ``input_path`` as ``source``; DataError for unknown sources, layouts or no images."""
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "imagenet":
        scanned = scan_imagenet(input_path)
    elif source == "imagefolder":
        scanned = scan_imagefolder(input_path)
    else:
        scanned = scan_cifar(input_path, source)
    if not scanned.splits.get("train"):
        raise DataError(f"{input_path}: no images found for the train split "
                        f"({', '.join(IMAGE_EXTS)} under <class>/ folders)")
    return scanned


def split_off_val(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Stratified, seeded split of ``fraction`` of each class into a val split."""
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    rng = random.Random(f"val-{seed}")
    train, val = [], []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        n_val = int(round(len(group) * fraction))
        val += group[:n_val]
        train += group[n_val:]
    return train, val


# ---------------------------------------------------------------------------------------------
# Writing shards


def plan_shards(items: list[Item], samples_per_shard: int, max_shard_bytes: int | None,
                seed: int, split: str) -> list[list[Item]]:
    """Shuffle (seeded) and cut into shards of at most ``samples_per_shard`` / ``max_shard_bytes``."""
    items = list(items)
    random.Random(f"{seed}-{split}").shuffle(items)
    shards: list[list[Item]] = []
    current: list[Item] = []
    current_bytes = 0
    for item in items:
        full = len(current) >= samples_per_shard or (
            max_shard_bytes is not None and current and current_bytes + item.nbytes > max_shard_bytes)
        if full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += item.nbytes
    if current:
        shards.append(current)
    return shards


def _encode(item: Item, max_size: int | None) -> tuple[bytes, str]:
    """(bytes, extension) for one sample: the source bytes unless it must be downsized."""
    if item.pixels is not None:
        image = Image.fromarray(item.pixels)
        if max_size and max(image.size) > max_size:
            image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), ".png"
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror or exc}") from None
    try:
        image = Image.open(io.BytesIO(data))
        fmt, size = image.format, image.size
        if fmt == "JPEG":  # entropy-decode everything, but at 1/8 scale: catches truncation cheaply
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    except UnidentifiedImageError:
        raise _Skip("cannot decode: not a recognised image format") from None
    except Exception as exc:
        raise _Skip(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if max_size and max(size) > max_size:
        return _downsize(data, max_size), ".jpg"
    return data, FORMAT_EXT.get(fmt, "." + (fmt or "img").lower())


def _downsize(data: bytes, max_size: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (max_size, max_size))  # DCT-scaled decode, never below the target size
    image = image.convert("RGB")
    image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclasses.dataclass
class ShardTask:
    dest: str
    name: str
    items: list[Item]
    max_size: int | None
    fingerprint: str


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically, then its build record; returns the record."""
    samples, skipped = 0, []
    with storage.AtomicWriter(storage.join(task.dest, task.name)) as f:
        with tarfile.open(fileobj=f, mode="w|") as tar:
            for item in task.items:
                try:
                    data, ext = _encode(item, task.max_size)
                except _Skip as exc:
                    skipped.append({"path": item.path or item.key, "reason": str(exc)})
                    continue
                _add_member(tar, item.key + ext, data)
                _add_member(tar, item.key + ".cls", str(item.label).encode())
                samples += 1
        nbytes = f.tell()
    record = {"name": task.name, "samples": samples, "bytes": nbytes, "skipped": skipped,
              "fingerprint": task.fingerprint}
    storage.write_bytes_atomic(_state_path(task.dest, task.name), json.dumps(record).encode())
    return record


def _state_path(dest: str, name: str) -> str:
    return storage.join(storage.join(dest, STATE_DIR), name + ".json")


def _finished(task: ShardTask) -> dict[str, Any] | None:
    """The build record of a shard already written with the same content plan, else None."""
    try:
        record = json.loads(storage.read_bytes(_state_path(task.dest, task.name)))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    if storage.size(storage.join(task.dest, task.name)) != record.get("bytes"):
        return None
    return record


def _fingerprint(items: list[Item], max_size: int | None) -> str:
    digest = hashlib.sha1(f"v{MANIFEST_FORMAT}|{max_size}".encode())
    for item in items:
        digest.update(item.fingerprint().encode())
    return digest.hexdigest()


def _run_tasks(tasks: list[ShardTask], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t.items) for t in tasks), unit="img", desc="writing shards",
               disable=not progress, file=sys.stderr)
    records: dict[str, dict[str, Any]] = {}
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                records[task.name] = write_shard(task)
                bar.update(len(task.items))
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(write_shard, task): task for task in tasks}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        task = futures[future]
                        records[task.name] = future.result()
                        bar.update(len(task.items))
                except BaseException:
                    for future in futures:  # fail fast: do not write the rest first
                        future.cancel()
                    raise
    finally:
        bar.close()
    return [records[task.name] for task in tasks]


def build_shards(source: str, input_path: str, output: str, *,
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, max_shard_mb: float | None = None,
                 max_size: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                 workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build shards of ``input_path`` (a ``source`` layout) in ``output`` and return the manifest.

    ``source`` is one of imagenet, imagefolder, cifar10, cifar100. ``output`` is a directory or an
    ``s3://bucket/prefix``. Shards already written by an earlier run with the same plan are kept.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    scanned = scan_source(source, input_path)
    if val_fraction > 0:
        if "val" in scanned.splits:
            raise DataError(f"{input_path}: already has a val split; --val-fraction applies only "
                            "to sources without one")
        scanned.splits["train"], scanned.splits["val"] = split_off_val(
            scanned.splits["train"], val_fraction, seed)
    return write_dataset(scanned, output, source=source, samples_per_shard=samples_per_shard,
                         max_shard_mb=max_shard_mb, max_size=max_size, seed=seed, workers=workers,
                         progress=progress, options={"val_fraction": val_fraction})


def write_dataset(scanned: Source, output: str, *, source: str, samples_per_shard: int,
                  max_shard_mb: float | None = None, max_size: int | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool = True,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the splits of a scanned source as shards, then the manifest (last, atomically)."""
    storage.check_writable(output)
    manifest_path = storage.join(output, MANIFEST)
    storage.remove(manifest_path)  # a manifest must never describe shards of a half-done build
    max_bytes = int(max_shard_mb * 1024 * 1024) if max_shard_mb else None
    tasks: dict[str, list[ShardTask]] = {}
    for split, items in scanned.splits.items():
        shards = plan_shards(items, samples_per_shard, max_bytes, seed, split)
        tasks[split] = [ShardTask(output, f"{split}-{i:06d}.tar", shard, max_size,
                                  _fingerprint(shard, max_size)) for i, shard in enumerate(shards)]
    all_tasks = [t for split_tasks in tasks.values() for t in split_tasks]
    done = {t.name: r for t in all_tasks if (r := _finished(t)) is not None}
    todo = [t for t in all_tasks if t.name not in done]
    if progress and done:
        print(f"{len(done)} of {len(all_tasks)} shards already complete; writing {len(todo)}",
              file=sys.stderr)
    done.update({r["name"]: r for r in _run_tasks(todo, workers or os.cpu_count() or 1, progress)})

    skipped = list(scanned.skipped)
    splits = {}
    for split, split_tasks in tasks.items():
        records = [done[t.name] for t in split_tasks]
        skipped += [dict(s, split=split) for r in records for s in r["skipped"]]
        splits[split] = {"shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]}
                                    for r in records],
                         "total": sum(r["samples"] for r in records)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": scanned.dataset,
        "source": source,
        "classes": scanned.classes,
        "num_classes": len(scanned.classes),
        "splits": splits,
        "skipped": skipped,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {"samples_per_shard": samples_per_shard, "max_shard_mb": max_shard_mb,
                    "max_size": max_size, "seed": seed, **(options or {})},
    }
    storage.write_bytes_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    if progress:
        counts = ", ".join(f"{s} {v['total']} in {len(v['shards'])} shards" for s, v in splits.items())
        print(f"wrote {output}: {counts}", file=sys.stderr)
        if skipped:
            print(f"skipped {len(skipped)} unreadable images (listed in {MANIFEST} 'skipped')",
                  file=sys.stderr)
    return manifest

"""Sources -> WebDataset shards + ``manifest.json`` (ImageNet folders or archives, image folders, CIFAR).

Layout of an output directory or ``s3://`` prefix::

    train-000000.tar ... train-00NNNN.tar   samples: <key>.<ext> (image), <key>.cls (class index)
    val-000000.tar ...
    manifest.json                            written last, atomically
    .build/<shard>.json                      per-shard record, lets a re-run skip finished shards

Samples are shuffled across shards with a seed; shards are written in parallel processes, each
one atomically (a reader never sees half a shard). No single file can stop a build: every file
under a class folder (or in an archive) becomes a sample or is listed in the manifest's
``skipped`` with its path and reason (unsupported format, empty, unreadable, not an image, cannot
be decoded, pixels without an 8-bit form), and the build prints both counts.

Images are stored as the source bytes where the readers decode them as they are (JPEG, PNG, WebP,
BMP, PPM/PGM: ``STORED_AS_IS``); other formats (TIFF, GIF, ...) are re-encoded losslessly as PNG.
Keys and manifest paths are valid UTF-8 whatever the file names (:func:`printable`).
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
import posixpath
import random
import re
import stat
import sys
import tarfile
from typing import IO, Any, Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from ran.data import DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES, DataError, storage
from ran.data.transforms import ImageTooLarge, PixelRangeError, check_image, to_rgb
from ran.progress import Progress

SOURCES = ("imagenet", "imagefolder", "cifar10", "cifar100")
# File names taken as images: torchvision ImageFolder's IMG_EXTENSIONS, plus GIF. Any other file
# under a class folder is listed in the manifest's ``skipped`` as an unsupported format.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Formats (as Pillow detects them from the bytes) stored byte for byte, with their shard extension.
# Anything else Pillow opens (TIFF, GIF, an image under a wrong extension) is re-encoded as PNG:
# its first frame, losslessly (see _lossless_png).
STORED_AS_IS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "PPM": ".ppm"}
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})  # what PNG stores as it is
MANIFEST = "manifest.json"
# The ILSVRC-2012 downloads (image-net.org, and what torchvision's ImageNet dataset reads).
TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"  # .tar.gz as downloaded, or the folder it unpacks to
VAL_SOLUTION = "LOC_val_solution.csv"  # Kaggle's validation labels
STATE_DIR = ".build"
MANIFEST_FORMAT = 1
DEFAULT_SAMPLES_PER_SHARD = 2000  # about 220 MB of ImageNet JPEGs
REENCODE_QUALITY = 90


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\udc80-\udcff]")


def printable(name: str) -> str:
    """``name`` as valid, printable UTF-8: each byte that was not UTF-8 (a surrogate escape, as
    ``os`` decodes such file names) and each control character becomes ``%XX``.

    Deterministic, so keys and manifest paths are stable between builds; ``Mu\\udcf1oz`` (the
    Latin-1 byte 0xF1) -> ``Mu%F1oz``.
    """
    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"%{code - 0xDC00 if code >= 0xDC80 else code:02X}"

    return _UNPRINTABLE.sub(escape, name)


@dataclasses.dataclass
class Item:
    """One sample to write: a source image file, a byte range of an uncompressed tar archive
    (``path`` is the archive, ``offset`` where the member's data starts), or raw HWC uint8
    pixels to encode as PNG."""

    key: str
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None
    nbytes: int = 0  # source size, for size-capped shards
    mtime_ns: int = 0  # source modification time, part of the shard fingerprint
    offset: int | None = None  # archive members: where the data starts in the file at ``path``
    source: str = ""  # where the sample comes from, as printable text (the manifest's skipped list)

    @classmethod
    def file(cls, key: str, label: int, path: str, st: os.stat_result | None = None) -> "Item":
        st = st or os.stat(path)
        return cls(key, label, path=path, nbytes=st.st_size, mtime_ns=st.st_mtime_ns, source=printable(path))

    @classmethod
    def member(cls, key: str, label: int, archive: str, offset: int, size: int, mtime_ns: int,
               where: str) -> "Item":
        """A member of the archive file ``archive``: ``size`` bytes from ``offset``; ``where``
        names it for people (``archive:member``, ``archive:nested.tar:member``)."""
        return cls(key, label, path=archive, nbytes=size, mtime_ns=mtime_ns, offset=offset,
                   source=printable(where))

    def read(self) -> bytes:
        """The encoded image: the whole file, or the member's byte range of its archive.

        OSError if the file cannot be read or the archive ends before the member does.
        """
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise OSError(f"archive ends {self.nbytes - len(data)} bytes into the member")
        return data

    def fingerprint(self) -> str:
        if self.path is not None:
            return f"{self.key}|{self.label}|{self.path}|{self.offset}|{self.nbytes}|{self.mtime_ns}"
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


def _skip(path: str, reason: str, split: str) -> dict[str, str]:
    """A manifest ``skipped`` entry: printable path, reason, split."""
    return {"path": printable(path), "reason": reason, "split": split}


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "no extension"


def _file_problem(path: str) -> tuple[str | None, os.stat_result | None]:
    """(why the file at ``path`` cannot be a sample, or None; its stat when it can)."""
    if not _is_image(path):
        return f"unsupported format ({_ext(path)})", None
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}", None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", None
    if st.st_size == 0:
        return "empty file", None
    if st.st_size > MAX_MEMBER_BYTES:
        return _too_many_bytes(st.st_size), None
    return None, st


def _too_many_bytes(size: int) -> str:
    return f"too large: {size} bytes, above the {MAX_MEMBER_BYTES}-byte cap on one image file"


def _image_files(root: str, split: str) -> tuple[list[tuple[str, os.stat_result]], list[dict[str, str]]]:
    """(relative path, stat) of the image files under ``root`` (recursively, sorted by path), and a
    ``skipped`` entry for every other file, hidden folder and unreadable folder there."""
    found, skipped = [], []

    def unreadable(exc: OSError) -> None:
        skipped.append(_skip(exc.filename or root, f"unreadable folder: {exc.strerror or exc}", split))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        skipped += [_skip(os.path.join(dirpath, d), "hidden folder: not scanned", split)
                    for d in sorted(dirnames) if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            path = os.path.join(dirpath, name)
            problem, st = _file_problem(path)
            if problem is not None:
                skipped.append(_skip(path, problem, split))
            else:
                found.append((os.path.normpath(os.path.join(rel, name)), st))
    return sorted(found, key=lambda f: f[0]), sorted(skipped, key=lambda s: s["path"])


def _loose_files(root: str, split: str) -> list[dict[str, str]]:
    """``skipped`` entries for the images lying beside the class folders instead of in one."""
    return [_skip(e.path, "not in a class folder", split)
            for e in sorted(os.scandir(root), key=lambda e: e.name) if _is_image(e.name) and not e.is_dir()]


class _Keys:
    """Unique WebDataset keys from relative paths: printable UTF-8 (see :func:`printable`), no dots
    or white space (readers split the key from the extension at the first dot), ``/``-separated."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, rel_path: str) -> str:
        stem = os.path.splitext(printable(rel_path))[0].replace(os.sep, "/")
        key = "/".join(re.sub(r"[.\s]", "_", part) or "_" for part in stem.split("/"))
        unique, n = key, 1
        while unique in self.seen:
            unique, n = f"{key}_{n}", n + 1
        self.seen.add(unique)
        return unique


def _class_items(root: str, classes: list[str], split: str,
                 tars: dict[str, str] | None = None) -> tuple[list[Item], list[dict[str, str]]]:
    """(items, skipped) of ``root/<class>/...``; every file there is one or the other.

    ``tars``: class -> a ``<class>.tar`` holding that class's images, read instead of its folder
    (which may be an unfinished extraction of it).
    """
    index = {name: i for i, name in enumerate(classes)}
    tars = tars or {}
    items, skipped, keys = [], _loose_files(root, split), _Keys()
    for name in sorted(set(_subdirs(root)) | set(tars)):
        if name not in index:
            raise DataError(f"{printable(os.path.join(root, name))}: class {printable(name)!r} is not "
                            "among the training classes: rename or remove the folder")
        class_dir = os.path.join(root, name)
        if name in tars:
            if os.path.isdir(class_dir):
                skipped.append(_skip(class_dir, f"folder not read: {name}.tar beside it is", split))
            class_items, class_skipped = _tar_class_items(tars[name], name, index[name], keys, split)
            items += class_items
            skipped += class_skipped
            continue
        files, class_skipped = _image_files(class_dir, split)
        skipped += class_skipped
        for rel, st in files:
            path = os.path.join(class_dir, rel)
            items.append(Item.file(keys(os.path.join(name, rel)), index[name], path, st))
    return items, skipped


def scan_imagefolder(root: str) -> Source:
    """``root/<class>/*.jpg`` (one split) or ``root/train/<class>/``, ``root/val/<class>/``.

    Class names are the folder names (non-UTF-8 bytes as ``%XX``), indexed in sorted order.
    """
    _check_dir(root)
    skipped: list[dict[str, str]] = []
    if os.path.isdir(os.path.join(root, "train")) and _subdirs(os.path.join(root, "train")):
        classes = _subdirs(os.path.join(root, "train"))
        splits = {}
        for split in ("train", "val"):
            if split == "train" or os.path.isdir(os.path.join(root, split)):
                splits[split], split_skipped = _class_items(os.path.join(root, split), classes, split)
                skipped += split_skipped
    else:
        classes = _subdirs(root)
        if not classes:
            raise DataError(f"{root}: unknown layout: expected <class>/ folders of images "
                            "(or train/<class>/ and val/<class>/)")
        splits = {}
        splits["train"], skipped = _class_items(root, classes, "train")
    return Source(os.path.basename(os.path.normpath(root)), [printable(c) for c in classes], splits, skipped)


def _find_val_solution(candidates: Iterable[str]) -> str | None:
    for folder in candidates:
        path = os.path.join(folder, VAL_SOLUTION)
        if os.path.isfile(path):
            return path
    return None


LabelOf = Callable[[str], "int | str"]  # a file name -> its class index, or why it has none


def _tar_members(fileobj: IO[bytes], base: int = 0) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the regular files of an uncompressed tar, sorted by name.

    Reads the headers only (tarfile mode "r:" seeks past the data, nothing is unpacked). ``offset``
    is where a member's data starts: ``base`` plus its position in ``fileobj`` (``base`` places a
    tar nested in another at its place in the outer file). tarfile.TarError if not a tar.
    """
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        return sorted((posixpath.normpath(m.name), base + m.offset_data, m.size) for m in tar if m.isfile())


def _member_items(archive: str, members: list[tuple[str, int, int]], where: str, label_of: LabelOf,
                  keys: _Keys, split: str, prefix: str = "") -> tuple[list[Item], list[dict[str, str]]]:
    """(items, skipped) of the members of a tar: images become items read by byte range from
    ``archive`` (keys as for the same files extracted under ``prefix/``)."""
    mtime_ns = os.stat(archive).st_mtime_ns
    items, skipped = [], []
    for name, offset, size in members:
        label = label_of(name)
        problem = (f"unsupported format ({_ext(name)})" if not _is_image(name) else
                   "empty file" if size == 0 else _too_many_bytes(size) if size > MAX_MEMBER_BYTES else
                   label if isinstance(label, str) else None)
        if problem is not None:
            skipped.append(_skip(f"{where}:{name}", problem, split))
            continue
        items.append(Item.member(keys(posixpath.join(prefix, name)), label, archive, offset, size,
                                 mtime_ns, f"{where}:{name}"))
    return items, skipped


def _tar_class_items(path: str, wnid: str, label: int, keys: _Keys,
                     split: str) -> tuple[list[Item], list[dict[str, str]]]:
    """(items, skipped) of a per-class ``<wnid>.tar`` file."""
    try:
        with open(path, "rb") as f:
            members = _tar_members(f)
    except (OSError, tarfile.TarError) as exc:
        return [], [_skip(path, f"unreadable class archive: {exc}", split)]
    return _member_items(path, members, path, lambda _: label, keys, split, prefix=wnid)


def _train_archive(path: str) -> tuple[list[str], list[Item], list[dict[str, str]]]:
    """ILSVRC2012_img_train.tar, a tar of one ``<wnid>.tar`` per class: (classes, items, skipped).

    Only headers are read, the outer tar's and each nested tar's (opened on its member); the
    images stay where they are and the shard writers read each one by its byte range.
    """
    try:
        f = open(path, "rb")
        outer = tarfile.open(fileobj=f, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: cannot read as an uncompressed tar ({exc}); the archive is read in "
                        "place as image-net.org serves it: re-download it, or decompress a .tar.gz") from None
    with f, outer:
        class_tars, skipped = {}, []
        for info in outer:
            stem, ext = posixpath.splitext(posixpath.basename(info.name))
            if info.isfile() and ext.lower() == ".tar":
                class_tars[stem] = info
            elif info.isfile():
                skipped.append(_skip(f"{path}:{info.name}", "not a per-class <wnid>.tar", "train"))
        classes, items, keys = sorted(class_tars), [], _Keys()
        for label, wnid in enumerate(classes):
            info = class_tars[wnid]
            where = f"{path}:{info.name}"
            try:
                members = _tar_members(outer.extractfile(info), base=info.offset_data)
            except tarfile.TarError as exc:
                skipped.append(_skip(where, f"unreadable class archive: {exc}", "train"))
                continue
            class_items, class_skipped = _member_items(path, members, where, lambda _, l=label: l, keys,
                                                       "train", prefix=wnid)
            items += class_items
            skipped += class_skipped
    return classes, items, skipped


class _ValLabels:
    """Labels of a flat val split: image file stem -> wnid (from LOC_val_solution.csv or the devkit)."""

    def __init__(self, wnids: dict[str, str], where: str, classes: list[str]):
        self.wnids, self.where = wnids, where
        self.index = {name: i for i, name in enumerate(classes)}

    def __call__(self, name: str) -> int | str:
        wnid = self.wnids.get(os.path.splitext(os.path.basename(name))[0])
        if wnid is None:
            return f"no label in {self.where}"
        if wnid not in self.index:
            return f"not a training class: {wnid}"
        return self.index[wnid]


def _solution_labels(path: str) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: ImageId -> first wnid of its PredictionString."""
    labels = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            prediction = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and prediction:
                labels[row["ImageId"]] = prediction[0]
    return labels


def _devkit_files(path: str) -> tuple[bytes, bytes]:
    """(meta.mat, ILSVRC2012_validation_ground_truth.txt) from the devkit .tar.gz or its folder."""
    wanted = ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt")
    found: dict[str, bytes] = {}
    try:
        if os.path.isdir(path):
            for name in wanted:
                with open(os.path.join(path, name), "rb") as f:
                    found[name] = f.read()
        else:
            with tarfile.open(path, mode="r|*") as tar:  # small: one pass over the stream
                for info in tar:
                    name = next((w for w in wanted if info.name.endswith(w)), None)
                    if name is not None and info.isfile():
                        found[name] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: unreadable devkit ({exc}); re-download {DEVKIT}.tar.gz") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} in the devkit; re-download {DEVKIT}.tar.gz")
    return found[wanted[0]], found[wanted[1]]


def devkit_val_labels(path: str) -> dict[str, str]:
    """Validation labels from the ILSVRC2012 devkit (``.tar.gz`` or unpacked folder at ``path``).

    Returns ``{"ILSVRC2012_val_00000001": wnid, ...}``. Line i of the ground truth holds the
    ILSVRC2012_ID of image i; meta.mat's ``synsets`` map the IDs of the 1000 leaf synsets
    (``num_children == 0``) to wnids. Those IDs are not in sorted-wnid order: the class index is
    the wnid's place among the sorted wnids, never the ID. Needs SciPy; DataError if the devkit
    is unreadable or inconsistent.
    """
    meta, truth = _devkit_files(path)
    try:
        from scipy.io import loadmat  # only the devkit needs SciPy: other layouts build without it
    except ImportError:
        raise DataError(f"{path}: reading the devkit's meta.mat needs SciPy: pip install scipy") from None
    try:
        synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = {int(i): str(w) for i, w, n in zip(np.atleast_1d(synsets["ILSVRC2012_ID"]),
                                                    np.atleast_1d(synsets["WNID"]),
                                                    np.atleast_1d(synsets["num_children"])) if int(n) == 0}
        ids = [int(token) for token in truth.split()]
    except Exception as exc:
        raise DataError(f"{path}: unreadable meta.mat or ground truth ({type(exc).__name__}: {exc}); "
                        f"re-download {DEVKIT}.tar.gz") from None
    unknown = sorted({i for i in ids if i not in leaves})
    if unknown:
        raise DataError(f"{path}: ground-truth ILSVRC2012_IDs {unknown[:5]} are not leaf synsets of "
                        f"meta.mat; the devkit files do not belong together: re-download {DEVKIT}.tar.gz")
    return {f"ILSVRC2012_val_{n:08d}": leaves[i] for n, i in enumerate(ids, 1)}


def _find_devkit(folders: Iterable[str]) -> str | None:
    for folder in folders:
        for name in (DEVKIT + ".tar.gz", DEVKIT + ".tar", DEVKIT):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _val_labels(folders: list[str], classes: list[str], what: str, root: str) -> _ValLabels:
    solution = _find_val_solution(folders)
    if solution is not None:
        return _ValLabels(_solution_labels(solution), VAL_SOLUTION, classes)
    devkit = _find_devkit(folders)
    if devkit is not None:
        return _ValLabels(devkit_val_labels(devkit), os.path.basename(devkit), classes)
    raise DataError(f"{what}: flat validation images need their labels: {DEVKIT}.tar.gz (image-net.org) "
                    f"or {VAL_SOLUTION} (Kaggle) beside them or in {root}")


def scan_imagenet(root: str) -> Source:
    """ILSVRC-2012 in every layout its users have on disk (``root`` is the folder holding it):

    - train: ``train/<wnid>/*.JPEG`` folders, ``train/<wnid>.tar`` per-class tars, or the official
      ``ILSVRC2012_img_train.tar`` (a tar of per-class tars);
    - val: ``val/<wnid>/`` folders, flat ``val/*.JPEG`` or the official ``ILSVRC2012_img_val.tar``,
      labelled by ``ILSVRC2012_devkit_t12.tar.gz`` (or its unpacked folder) or Kaggle's
      ``LOC_val_solution.csv``;
    - the Kaggle download root (``ILSVRC/Data/CLS-LOC/...`` beside the CSV).

    Archives are never unpacked: their headers are read here and the shard writers read each
    image by its byte range. Class index = position of the wnid in sorted order, as torchvision's
    ImageNet. Extracted folders are used where both they and the archive are present.
    """
    _check_dir(root)
    data_root = root
    kaggle = os.path.join(root, "ILSVRC", "Data", "CLS-LOC")
    if os.path.isdir(kaggle):
        data_root = kaggle
    train_dir, archive = os.path.join(data_root, "train"), os.path.join(root, TRAIN_ARCHIVE)
    class_tars = _class_tars(train_dir)
    if os.path.isdir(train_dir) and (_subdirs(train_dir) or class_tars):
        classes = sorted(set(_subdirs(train_dir)) | set(class_tars))
        items, skipped = _class_items(train_dir, classes, "train", tars=class_tars)
    elif os.path.isfile(archive):
        classes, items, skipped = _train_archive(archive)
    else:
        raise DataError(f"{root}: unknown layout: expected train/<wnid>/*.JPEG (and val/<wnid>/, or "
                        f"val/ with {DEVKIT}.tar.gz or {VAL_SOLUTION}), or the downloaded "
                        f"{TRAIN_ARCHIVE}, {VAL_ARCHIVE} and {DEVKIT}.tar.gz in this folder")
    source = Source("imagenet", [printable(c) for c in classes], {"train": items}, skipped)
    val = _imagenet_val(root, data_root, classes)
    if val is not None:
        source.splits["val"] = val[0]
        source.skipped += val[1]
    return source


def _imagenet_val(root: str, data_root: str,
                  classes: list[str]) -> tuple[list[Item], list[dict[str, str]]] | None:
    """(items, skipped) of the val split from ``val/<wnid>/``, a flat ``val/`` or the val archive;
    None if there is none."""
    val_dir, archive = os.path.join(data_root, "val"), os.path.join(root, VAL_ARCHIVE)
    if os.path.isdir(val_dir) and _subdirs(val_dir):
        return _class_items(val_dir, classes, "val")
    folders = [val_dir, data_root, root, os.path.dirname(os.path.normpath(root))]
    files, skipped = _image_files(val_dir, "val") if os.path.isdir(val_dir) else ([], [])
    if files:
        label_of, keys, items = _val_labels(folders, classes, val_dir, root), _Keys(), []
        for rel, st in files:
            label = label_of(rel)
            if isinstance(label, str):
                skipped.append(_skip(os.path.join(val_dir, rel), label, "val"))
            else:
                items.append(Item.file(keys(rel), label, os.path.join(val_dir, rel), st))
        return items, skipped
    if not os.path.isfile(archive):
        return ([], skipped) if os.path.isdir(val_dir) else None
    label_of = _val_labels(folders, classes, archive, root)
    try:
        with open(archive, "rb") as f:
            members = _tar_members(f)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{archive}: cannot read as an uncompressed tar ({exc}); re-download it, or "
                        "decompress a .tar.gz") from None
    return _member_items(archive, members, archive, label_of, _Keys(), "val")


def _class_tars(folder: str) -> dict[str, str]:
    """wnid -> path of the ``<wnid>.tar`` files in ``folder`` (none if it is not a folder)."""
    if not os.path.isdir(folder):
        return {}
    return {e.name[:-4]: e.path for e in os.scandir(folder) if e.name.endswith(".tar") and e.is_file()}


# What the python CIFAR batches (pickled by Python 2 and numpy) name: numpy's array
# reconstruction (numpy 2 spells numpy.core as numpy._core; protocol 5 pickles use _frombuffer).
# Dicts, lists, bytes, str and ints need no names. Anything else a pickle asks for is refused.
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """A pickle reader that builds only dicts, lists, bytes, str, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: str, keys: tuple[bytes, ...]) -> dict[bytes, Any]:
    """A CIFAR batch or meta file: the dict in ``path``, read without running any code.

    Raises:
        DataError: missing, not a pickle, a pickle that asks for anything but numpy's array
            reconstruction (it is refused before it runs), or a dict without ``keys``.
    """
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR batch file") from None
    except _RefusedGlobal as exc:
        raise DataError(f"{path}: not a CIFAR batch: the pickle asks to load {exc}, which CIFAR files "
                        "never do (they hold dicts, lists, bytes and numpy arrays); refusing to read "
                        "it: re-download the dataset") from None
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR pickle ({type(exc).__name__}: {exc})") from None
    missing = [k.decode() for k in keys if not isinstance(batch, dict) or k not in batch]
    if missing:
        raise DataError(f"{path}: not a CIFAR batch (no {', '.join(missing)}); re-download the dataset")
    return batch


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
               for n in _unpickle(meta_path, (names_key,))[names_key]] if os.path.exists(meta_path) else None
    splits = {}
    for split, files in (("train", train_files), ("val", test_files)):
        if split == "val" and not os.path.exists(os.path.join(root, files[0])):
            continue
        items = []
        for name in files:
            path = os.path.join(root, name)
            batch = _unpickle(path, (b"data", label_key))
            try:
                rows = np.asarray(batch[b"data"], dtype=np.uint8)
                pixels = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            except (TypeError, ValueError) as exc:
                raise DataError(f"{path}: not a CIFAR batch ({exc}); re-download the dataset") from None
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


def _encode(item: Item, max_size: int | None,
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """(bytes, extension) for one sample: the source bytes unless it must be downsized.

    _Skip with the reason for a file that cannot be a sample, among them an image whose header
    gives more than ``max_pixels`` (it is never decoded).
    """
    if item.pixels is not None:
        image = Image.fromarray(item.pixels)
        if max_size and max(image.size) > max_size:
            image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue(), ".png"
    try:
        data = item.read()
    except OSError as exc:
        raise _Skip(f"unreadable: {exc.strerror or exc}") from None
    if not data:
        raise _Skip("empty file")
    try:
        image, size = check_image(data, max_pixels=max_pixels)  # every byte decoded (JPEGs at 1/8)
    except ImageTooLarge as exc:
        raise _Skip(f"too large: {exc}") from None
    except UnidentifiedImageError:
        raise _Skip("cannot decode: not a recognised image format") from None
    except PixelRangeError as exc:
        raise _Skip(f"cannot convert to 8-bit RGB: {exc}") from None
    except Exception as exc:
        raise _Skip(f"cannot decode: {type(exc).__name__}: {exc}") from None
    try:
        if max_size and max(size) > max_size:
            return _downsize(data, max_size), ".jpg"
        if image.format in STORED_AS_IS:
            return data, STORED_AS_IS[image.format]
        return _lossless_png(image), ".png"
    except Exception as exc:
        raise _Skip(f"cannot re-encode: {type(exc).__name__}: {exc}") from None


def _downsize(data: bytes, max_size: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (max_size, max_size))  # DCT-scaled decode, never below the target size
    image = to_rgb(image)
    image.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


def _lossless_png(image: Image.Image) -> bytes:
    """The image (its first frame or page) as PNG, pixel for pixel.

    Modes PNG holds are kept (16-bit grey stays 16-bit, a palette keeps its transparency); ``I``
    (already checked to lie in 0..65535) and the other 16-bit layouts become 16-bit grey, ``PA``
    and the premultiplied modes become RGBA/LA; modes PNG cannot hold (CMYK, YCbCr, LAB, HSV, F)
    are stored as their :func:`to_rgb` conversion, the very pixels the readers would produce.
    """
    transparency = image.info.get("transparency")
    if image.mode in ("I", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray(np.asarray(image).astype(np.uint16))
    elif image.mode in ("PA", "RGBa", "La"):
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    elif image.mode not in PNG_MODES:
        image, transparency = to_rgb(image), None
    out = io.BytesIO()
    params = {} if transparency is None or image.mode in ("LA", "RGBA") else {"transparency": transparency}
    image.save(out, format="PNG", **params)
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
    max_pixels: int | None = DEFAULT_MAX_PIXELS


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard atomically, then its build record; returns the record."""
    samples, skipped = 0, []
    with storage.AtomicWriter(storage.join(task.dest, task.name)) as f:
        with tarfile.open(fileobj=f, mode="w|") as tar:
            for item in task.items:
                try:
                    data, ext = _encode(item, task.max_size, task.max_pixels)
                except _Skip as exc:
                    skipped.append({"path": item.source or item.key, "reason": str(exc)})
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


def _fingerprint(items: list[Item], max_size: int | None, max_pixels: int | None) -> str:
    digest = hashlib.sha1(f"v{MANIFEST_FORMAT}|{max_size}|{max_pixels}".encode())
    for item in items:
        digest.update(item.fingerprint().encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _run_tasks(tasks: list[ShardTask], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = Progress("writing shards", sum(len(t.items) for t in tasks), "img", enabled=progress)
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
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError(f"a shard writer process died (out of memory?): run the same build again with "
                        f"fewer --workers than {workers}; finished shards are kept") from None
    finally:
        bar.close()
    return [records[task.name] for task in tasks]


def build_shards(source: str, input_path: str, output: str, *,
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, max_shard_mb: float | None = None,
                 max_size: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                 workers: int | None = None, progress: bool = True,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Build shards of ``input_path`` (a ``source`` layout) in ``output`` and return the manifest.

    ``source`` is one of imagenet, imagefolder, cifar10, cifar100. ``output`` is a directory or an
    ``s3://bucket/prefix``. Shards already written by an earlier run with the same plan are kept.
    Images whose header gives more than ``max_pixels`` are skipped undecoded ("too large").
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
                         progress=progress, options={"val_fraction": val_fraction}, max_pixels=max_pixels)


def write_dataset(scanned: Source, output: str, *, source: str, samples_per_shard: int,
                  max_shard_mb: float | None = None, max_size: int | None = None, seed: int = 0,
                  workers: int | None = None, progress: bool = True,
                  options: dict[str, Any] | None = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Write the splits of a scanned source as shards, then the manifest (last, atomically);
    images over ``max_pixels`` are skipped from their header."""
    storage.check_writable(output)
    manifest_path = storage.join(output, MANIFEST)
    storage.remove(manifest_path)  # a manifest must never describe shards of a half-done build
    max_bytes = int(max_shard_mb * 1024 * 1024) if max_shard_mb else None
    tasks: dict[str, list[ShardTask]] = {}
    for split, items in scanned.splits.items():
        shards = plan_shards(items, samples_per_shard, max_bytes, seed, split)
        tasks[split] = [ShardTask(output, f"{split}-{i:06d}.tar", shard, max_size,
                                  _fingerprint(shard, max_size, max_pixels), max_pixels)
                        for i, shard in enumerate(shards)]
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
                    "max_size": max_size, "max_pixels": max_pixels, "seed": seed, **(options or {})},
    }
    storage.write_bytes_atomic(manifest_path, json.dumps(manifest, indent=1).encode())
    if progress:
        counts = ", ".join(f"{s} {v['total']} samples in {len(v['shards'])} shards"
                           for s, v in splits.items())
        print(f"wrote {output}: {counts}", file=sys.stderr)
        print(skipped_summary(skipped), file=sys.stderr)
    return manifest


def skipped_summary(skipped: list[dict[str, str]]) -> str:
    """One line: how many files were left out, by kind of reason (the text before its first ':')."""
    kinds: dict[str, int] = {}
    for entry in skipped:
        kind = entry["reason"].split(":", 1)[0].split(" (", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    listed = f" (listed in {MANIFEST} 'skipped'): {detail}" if skipped else ""
    return f"skipped {len(skipped)} files{listed}"

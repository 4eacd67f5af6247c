"""Shards -> uint8 batches, split by rank and DataLoader worker.

Training reads resampled shards (chosen at random, weighted by their sample counts) through a
shuffle buffer, and every rank yields exactly ``len(loader)`` full batches per epoch, so DDP never
waits on a rank that ran out of data. Evaluation reads every sample exactly once across all ranks
and workers: shards are dealt out to the ``world_size * workers`` readers, and when there are fewer
shards than readers, readers share a shard and keep every k-th sample of it.

A sample that fails to decode or whose label is out of range is skipped and counted in
``Batch.skipped``; so are the samples of a shard that cannot be opened (after retries with
back-off) or that ends early. Above ``max_bad_fraction`` skipped samples the loader fails with a
:class:`ran.data.DataError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import posixpath
import random
import re
import sys
from typing import Any, Iterator, NamedTuple

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ran.data import DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES, DataError, storage
from ran.data import gpu
from ran.data.batches import Batch, Health, Loader, batch_tensor
from ran.data.transforms import Transform, check_image, check_recipe, make_transform

log = logging.getLogger("ran.data")

MANIFEST = "manifest.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")

storage.register_webdataset_opener()


# ---------------------------------------------------------------------------------------------
# Manifest and tar streams


def read_manifest(path: str) -> dict[str, Any]:
    """The ``manifest.json`` under a directory, ``s3://`` prefix or ``http(s)://`` URL."""
    url = storage.join(path, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        raise DataError(f"{path}: no {MANIFEST} (build shards with `ran data build` or "
                        "`ran data synth`)") from None
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{url}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise DataError(f"{url}: cannot read ({exc})") from None
    missing = [k for k in ("classes", "num_classes", "splits") if k not in manifest]
    if missing:
        raise DataError(f"{url}: not a shard manifest (missing {', '.join(missing)})")
    return manifest


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # also catches Windows drive letters (C:)


def shard_url(path: str, name: Any) -> str:
    """The URL of the shard ``name`` (as ``manifest.json`` gives it) of the dataset at ``path``.

    A manifest is data, not instructions: a shard name is a relative path that stays inside the
    dataset root after normalising. DataError naming the shard for an absolute path, a ``..`` that
    leaves the root, a URL scheme or a name that is not a string.
    """
    where = storage.join(path, MANIFEST)
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: shard name {name!r} is not a file name; rebuild the manifest "
                        "with `ran data build`")
    text = name.replace("\\", "/")
    normal = posixpath.normpath(text)
    why = ("is an absolute path" if text.startswith("/") else
           "has a URL scheme" if _SCHEME.match(text) else
           "leaves the dataset root" if normal == ".." or normal.startswith("../") else
           "names the dataset root" if normal == "." else None)
    if why is not None:
        raise DataError(f"{where}: shard name {name!r} {why}: shard names must be relative paths "
                        f"inside {path}; refusing to read it (rebuild the manifest with `ran data build`)")
    return storage.join(path, normal)


def split_shards(path: str, manifest: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(URL, sample count) of every shard of ``split``.

    Raises:
        DataError: no such split, or a shard name outside the dataset root (:func:`shard_url`).
    """
    if split not in manifest["splits"]:
        raise DataError(f"{path}: no split {split!r} in {MANIFEST} "
                        f"(it has {', '.join(manifest['splits']) or 'none'})")
    return [(shard_url(path, s["name"]), int(s["samples"]))
            for s in manifest["splits"][split]["shards"]]


def _key_and_ext(name: str) -> tuple[str, str] | None:
    """WebDataset naming: the key runs to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


class TarFormatError(ValueError):
    """A tar stream that is truncated or not a tar archive."""


class _BufferedStream:
    """Exact-size reads over any ``read(n)`` stream (S3 bodies return short reads), 1 MiB at a time."""

    def __init__(self, stream: Any, chunk: int = 1 << 20):
        self.stream, self.chunk = stream, chunk
        self.buffer, self.pos = b"", 0

    def read(self, n: int) -> bytes:
        if self.pos + n <= len(self.buffer):
            self.pos += n
            return self.buffer[self.pos - n:self.pos]
        parts = [self.buffer[self.pos:]]
        have = len(parts[0])
        while have < n:
            data = self.stream.read(max(self.chunk, n - have))
            if not data:
                break
            parts.append(data)
            have += len(data)
        self.buffer, self.pos = b"".join(parts), min(n, have)
        return self.buffer[:self.pos]

    def skip(self, n: int) -> int:
        """Pass over ``n`` bytes, holding at most one chunk at a time; returns how many there were."""
        kept = len(self.buffer) - self.pos
        if n <= kept:
            self.pos += n
            return n
        self.buffer, self.pos = b"", 0
        done = kept
        while done < n:
            data = self.stream.read(min(self.chunk, n - done))
            if not data:
                break
            done += len(data)
        return done


class OversizeMember(NamedTuple):
    """Stands in for the data of a tar member over the size cap, which was never read."""

    size: int  # bytes
    cap: int  # bytes


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header ("<len> key=value\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def iter_tar_members(stream: Any, max_member_bytes: int = MAX_MEMBER_BYTES,
                     ) -> Iterator[tuple[str, bytes | OversizeMember]]:
    """(name, data) of the regular files in an uncompressed tar stream.

    A small reader for ustar/GNU/PAX archives, kept instead of webdataset's (tarfile-based) for a
    measured reason: ``benchmarks/tar_reader.py`` on the same shards in one run (2 shared cores,
    webdataset 1.0.2): reading alone 82 vs 183 us a sample for ~75 kB JPEGs (2.2x) and 24 vs 111 us
    for 32 px PNGs (4.7x); end to end with the eval decode 1.10x (JPEG) and 1.29x (PNG) faster.
    Rerun it before replacing either. A member over ``max_member_bytes`` is passed over
    while streaming (never held whole) and yields an :class:`OversizeMember` instead of its data.
    TarFormatError on truncation or a bad header.
    """
    reader = _BufferedStream(stream)
    long_name = None
    while True:
        header = reader.read(512)
        if header == bytes(512):
            return  # end-of-archive marker
        if len(header) < 512:
            raise TarFormatError("truncated tar header")
        checksum = sum(header) - sum(header[148:156]) + 8 * 32
        try:
            valid = checksum == _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            valid = False
        if not valid:
            raise TarFormatError("bad tar header checksum (not a tar file, or corrupt)")
        padded = size + (512 - size % 512) % 512
        if size > max_member_bytes:
            got = reader.skip(padded)
            if got < size:
                raise TarFormatError(f"unexpected end of data ({got} of {size} bytes)")
            data: bytes | OversizeMember = OversizeMember(size, max_member_bytes)
        else:
            data = reader.read(size)
            if len(data) < size:
                raise TarFormatError(f"unexpected end of data ({len(data)} of {size} bytes)")
            reader.read(padded - size)
        kind = header[156:157]
        if isinstance(data, OversizeMember) and kind not in (b"0", b"\0", b"7"):
            long_name = None  # an oversized long name or PAX header: its member keeps its own name
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX extended header for the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and header[345]:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            yield name, data
        else:
            long_name = None  # directories, links, global headers: nothing to read


def iter_tar(stream: Any, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: bytes}) for each sample of a tar stream, grouping consecutive members;
    a member over ``max_member_bytes`` is an :class:`OversizeMember` (see :func:`iter_tar_members`)."""
    key, sample = None, {}
    for name, data in iter_tar_members(stream, max_member_bytes):
        parts = _key_and_ext(name)
        if parts is None:
            continue
        if parts[0] != key:
            if key is not None:
                yield key, sample
            key, sample = parts[0], {}
        sample[parts[1]] = data
    if key is not None:
        yield key, sample


def parse_sample(sample: dict[str, Any], num_classes: int) -> tuple[bytes, int]:
    """(image bytes, label); ValueError with the reason if either is missing, invalid or was
    over the member size cap (:class:`OversizeMember`)."""
    for ext, value in sample.items():
        if isinstance(value, OversizeMember):
            raise ValueError(f".{ext} member of {value.size} bytes, above the tar member cap of "
                             f"{value.cap} bytes: not read")
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise ValueError(f"no image (has {', '.join(sorted(sample))})")
    if "cls" not in sample:
        raise ValueError("no .cls label")
    label = int(sample["cls"].decode().strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} out of range 0..{num_classes - 1}")
    return image, label


def open_shard(url: str, delays: tuple[float, ...] = storage.RETRY_DELAYS) -> Any:
    """A binary stream of the shard at ``url``. Transient failures are retried by the one layer
    that does (:func:`ran.data.storage.open_read`; ``delays`` for http(s)); OSError once they
    persist, FileNotFoundError, and DataError for what retrying cannot fix (credentials, 403)."""
    try:
        return storage.open_read(url, delays)
    except DataError:
        raise
    except Exception as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Splitting work between readers


def eval_assignment(num_shards: int, reader: int, readers: int) -> list[tuple[int, int, int]]:
    """(shard, stride, offset) for one of ``readers``: it keeps samples i with i % stride == offset.

    Together the readers cover every sample of every shard exactly once.
    """
    if num_shards >= readers:
        return [(s, 1, 0) for s in range(reader, num_shards, readers)]
    shard = reader % num_shards
    sharing = list(range(shard, readers, num_shards))
    return [(shard, len(sharing), sharing.index(reader))]


def _strided_count(samples: int, stride: int, offset: int) -> int:
    return max(0, (samples - offset + stride - 1) // stride)


def eval_counts(counts: list[int], reader: int, readers: int) -> int:
    """Number of samples one reader yields in evaluation."""
    return sum(_strided_count(counts[s], stride, offset)
               for s, stride, offset in eval_assignment(len(counts), reader, readers))


def _share(total: int, part: int, parts: int) -> int:
    return total // parts + (1 if part < total % parts else 0)


# ---------------------------------------------------------------------------------------------
# The dataset each loader worker iterates


class PixelCollector:
    """The CPU path's collector: each sample decoded and transformed here, in the loader worker,
    into one uint8 ``(batch_size, 3, crop, crop)`` tensor (shared memory); ``finish`` applies the
    transform's batch step (lighting, CIFAR crops) and returns the :class:`Batch`.

    A collector is the strategy :class:`ShardDataset` gathers a batch with: ``len()`` samples so
    far, ``add(key, data, label)`` (raises for a sample it cannot use) and ``finish(skipped)``.
    :class:`ran.data.gpu.RawCollector` is the device path's.
    """

    def __init__(self, transform: Transform, batch_size: int, rng: random.Random):
        self.transform, self.rng = transform, rng
        self.images = batch_tensor((batch_size, 3, transform.crop, transform.crop))
        self.labels: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, key: str, data: bytes, label: int) -> None:
        self.images[len(self.labels)] = self.transform.sample(data, self.rng)
        self.labels.append(label)

    def finish(self, skipped: int) -> Batch:
        n, images = len(self.labels), self.images
        if n < len(images):
            images = batch_tensor((n, *images.shape[1:]))
            images.copy_(self.images[:n])
        if n:
            images = self.transform.batch(images, self.rng)
        return Batch(images, torch.tensor(self.labels, dtype=torch.int64), skipped)


class ShardDataset(IterableDataset):
    """Batches of one split; see the module docstring for how work is split. ``collector`` is the
    strategy a worker gathers each batch with (:class:`PixelCollector` on the CPU path)."""

    def __init__(self, shards: list[tuple[str, int]], *, train: bool, batch_size: int,
                 transform: Transform, num_classes: int, rank: int, world_size: int, seed: int,
                 batches_per_rank: int, shuffle_buffer: int, max_bad_fraction: float,
                 collector: Any = PixelCollector):
        super().__init__()
        self.collector = collector
        self.urls = [url for url, _ in shards]
        self.counts = [count for _, count in shards]
        self.train, self.batch_size, self.transform = train, batch_size, transform
        self.num_classes, self.rank, self.world_size, self.seed = num_classes, rank, world_size, seed
        self.batches_per_rank, self.shuffle_buffer = batches_per_rank, shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
        self.retry_delays = storage.RETRY_DELAYS  # http(s) shards (S3: botocore's own)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch[0])
        health = Health(f"rank {self.rank} loader worker {worker}", self.max_bad_fraction)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}")
        if self.train:
            count = _share(self.batches_per_rank, worker, workers)
            return self._train_batches(count, rng, health)
        reader = self.rank * workers + worker
        return self._eval_batches(reader, self.world_size * workers, rng, health)

    # -- sample streams: yield (key, sample) or an int = number of samples lost ---------------

    def _shard_samples(self, index: int, stride: int, offset: int,
                       health: Health) -> Iterator[tuple[str, dict[str, bytes]] | int]:
        url = self.urls[index]
        expected = _strided_count(self.counts[index], stride, offset)
        try:
            stream = open_shard(url, self.retry_delays)
        except OSError as exc:
            log.warning("shard %s unreachable (%s); skipping its %d samples", url, exc, expected)
            health.last_reason = f"shard {url} unreachable ({exc})"
            yield expected
            return
        yielded = 0
        try:
            with contextlib.closing(stream):
                for i, item in enumerate(iter_tar(stream)):
                    if i % stride == offset:
                        yielded += 1
                        yield item
        except DataError:
            raise
        except Exception as exc:
            lost = max(0, expected - yielded)
            log.warning("shard %s: unreadable after %d samples (%s: %s); skipping the remaining %d",
                        url, yielded, type(exc).__name__, exc, lost)
            health.last_reason = f"shard {url}: {type(exc).__name__}: {exc}"
            yield lost
            return
        if yielded < expected:
            log.warning("shard %s: %d samples, the manifest says %d", url, yielded, expected)
            health.last_reason = f"shard {url}: {expected - yielded} samples missing"
            yield expected - yielded

    def _resampled(self, rng: random.Random, health: Health) -> Iterator[Any]:
        """Endless shuffled samples from shards drawn at random (weighted by sample count)."""
        weights = list(self.counts)
        buffer: list[Any] = []
        while True:
            if not any(weights):
                raise DataError(f"{health.where}: no readable shards left "
                                f"(last problem: {health.last_reason or 'all shards are empty'})")
            index = rng.choices(range(len(self.urls)), weights=weights)[0]
            for item in self._shard_samples(index, 1, 0, health):
                if isinstance(item, int):
                    weights[index] = 0 if item == self.counts[index] else weights[index]
                    yield item
                elif len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                else:
                    slot = rng.randrange(len(buffer))
                    yield buffer[slot]
                    buffer[slot] = item

    def _strided(self, reader: int, readers: int, health: Health) -> Iterator[Any]:
        for shard, stride, offset in eval_assignment(len(self.urls), reader, readers):
            yield from self._shard_samples(shard, stride, offset, health)

    # -- batches ----------------------------------------------------------------------------

    def _good_samples(self, items: Iterator[Any], health: Health,
                      use: Any) -> Iterator[int]:
        """Each sample of ``items`` (``(key, sample)``, or an int: that many unreadable) handed
        to ``use(key, data, label)``; yields the label of each one ``use`` took. A sample that
        cannot be parsed or that ``use`` raises on is counted in ``health`` and passed over."""
        for item in items:
            if isinstance(item, int):
                if item:
                    health.skip(item, health.last_reason or "unreadable shard", warn=True)
                continue
            key, sample = item
            try:
                data, label = parse_sample(sample, self.num_classes)
                use(key, data, label)
            except Exception as exc:
                health.skip(1, f"sample {key}: {_reason(exc)}")
                continue
            health.good()
            yield label

    def _assemble(self, items: Iterator[Any], rng: random.Random, health: Health,
                  limit: int | None) -> Iterator[Any]:
        """Samples gathered by the collector into batches of ``batch_size`` (the last one may be
        partial), at most ``limit`` of them."""
        if limit == 0:
            return
        made = 0
        collector = self.collector(self.transform, self.batch_size, rng)

        def add(key: str, data: bytes, label: int) -> None:  # to the collector of the moment
            collector.add(key, data, label)

        for _ in self._good_samples(items, health, add):
            if len(collector) == self.batch_size:
                yield collector.finish(health.take_pending())
                made += 1
                if made == limit:
                    return
                collector = self.collector(self.transform, self.batch_size, rng)
        if len(collector):
            yield collector.finish(health.take_pending())

    def _train_batches(self, count: int, rng: random.Random, health: Health) -> Iterator[Batch]:
        return self._assemble(self._resampled(rng, health), rng, health, limit=count)

    def _eval_batches(self, reader: int, readers: int, rng: random.Random,
                      health: Health) -> Iterator[Batch]:
        # Hold one batch back so that samples skipped after it are reported with it.
        held = None
        for batch in self._assemble(self._strided(reader, readers, health), rng, health, limit=None):
            if held is not None:
                yield held
            held = batch
        health.check()
        pending = health.take_pending()
        if held is not None:
            yield held._replace(skipped=held.skipped + pending)
        elif pending:  # no batch left to carry the count: an empty one does
            yield self.collector(self.transform, self.batch_size, rng).finish(pending)


# ---------------------------------------------------------------------------------------------
# The loader


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image data"
    return f"{type(exc).__name__}: {exc}"


def make_loader(path: str, split: str, *, train: bool, batch_size: int, recipe: str,
                crop: int | None = None, rank: int = 0, world_size: int = 1, workers: int = 2,
                seed: int = 0, pin_memory: bool = False, max_bad_fraction: float = 0.01,
                shuffle_buffer: int = 500, prefetch: int = 2, decode: str = "cpu",
                device: torch.device | str | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Loader:
    """Batches of ``split`` of the shards at ``path`` (directory, ``s3://`` prefix or URL) for one rank.

    ``train=True``: resampled shards, ``total // (batch_size * world_size)`` full batches on every
    rank. ``train=False``: every sample exactly once across ranks and workers (counts to be
    reduced by the caller). ``recipe`` ("imagenet" or "cifar") picks the transforms; ``crop`` the
    output size (224 / 32 by default). ``decode`` (``data.decode``, :func:`ran.data.gpu.resolve_decode`)
    applies to training batches: ``cpu``, the loader workers decode and batches come as uint8 CPU
    tensors; ``gpu``, ``device`` decodes JPEGs and batches come on ``device`` (:mod:`ran.data.gpu`);
    ``auto``, gpu on a CUDA device with the imagenet recipe. Evaluation batches always come from
    the eval transform in the loader workers, the one ``ran eval`` and the served model use, so a
    run's validation top-1 is the one they reproduce whichever decode trained it.
    ``max_pixels`` (``data.max_pixels``): an image whose header says more is a bad sample, never
    decoded, on every path. DataError for bad arguments, a manifest or a shard name outside ``path``.
    """
    check_recipe(recipe)
    on_device = gpu.resolve_decode(decode, recipe, device, train=train) == "gpu"
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1}")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    manifest = read_manifest(path)
    shards = split_shards(path, manifest, split)
    counts = [count for _, count in shards]
    total = sum(counts)
    readers = max(workers, 1)
    if train:
        num_batches = total // (batch_size * world_size)
        if num_batches == 0:
            raise DataError(f"{path}: split {split!r} has {total} samples, fewer than one batch of "
                            f"{batch_size} for each of {world_size} ranks")
        num_samples = num_batches * batch_size
    else:
        per_reader = [eval_counts(counts, rank * readers + w, world_size * readers) for w in range(readers)]
        num_batches = sum(math.ceil(n / batch_size) for n in per_reader)
        num_samples = sum(per_reader)
    dataset = ShardDataset(
        shards, train=train, batch_size=batch_size,
        transform=make_transform(recipe, train=train, crop=crop, max_pixels=max_pixels),
        num_classes=int(manifest["num_classes"]), rank=rank, world_size=world_size, seed=seed,
        batches_per_rank=num_batches, shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction,
        collector=gpu.RawCollector if on_device else PixelCollector)
    # Device decoding: the decoder stages what it uploads in pinned buffers of its own.
    dataloader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            pin_memory=pin_memory and not on_device, persistent_workers=workers > 0,
                            prefetch_factor=prefetch if workers > 0 else None)
    if on_device:
        return gpu.DeviceLoader(dataset, dataloader, num_batches, num_samples, manifest, device)
    return Loader(dataset, dataloader, num_batches, num_samples, manifest)


# ---------------------------------------------------------------------------------------------
# Verification


def verify_shard(url: str, expected: int, num_classes: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, list[str]]:
    """(samples found, problems) for one shard: readable tar, decodable images no larger than
    ``max_pixels`` (judged from the header, never decoded), labels in range."""
    problems, samples = [], 0
    name = url.rsplit("/", 1)[-1]
    try:
        stream = storage.open_read(url)
    except FileNotFoundError:
        return 0, [f"{name}: missing"]
    except (OSError, DataError) as exc:
        return 0, [f"{name}: cannot open ({exc})"]
    try:
        with contextlib.closing(stream):
            for key, sample in iter_tar(stream):
                samples += 1
                try:
                    data, _ = parse_sample(sample, num_classes)
                    check_image(data, max_pixels=max_pixels)  # as the build: every byte decoded
                except Exception as exc:
                    problems.append(f"{name}: sample {key}: {_reason(exc)}")
    except Exception as exc:
        problems.append(f"{name}: unreadable tar after {samples} samples ({type(exc).__name__}: {exc})")
    if samples != expected:
        problems.append(f"{name}: {samples} samples, manifest says {expected}")
    return samples, problems


def verify_shards(path: str, *, workers: int | None = None, progress: bool = True,
                  out: Any = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> bool:
    """Check every shard under ``path`` against its manifest; print a summary; True if all is well.

    Raises:
        DataError: no readable manifest, or a shard name outside ``path`` (nothing is opened then).
    """
    from tqdm import tqdm

    out = out or sys.stdout
    manifest = read_manifest(path)
    num_classes = int(manifest["num_classes"])
    jobs = [(split, url, count) for split in manifest["splits"]
            for url, count in split_shards(path, manifest, split)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    bar = tqdm(total=len(jobs), unit="shard", desc="verifying", disable=not progress, file=sys.stderr)
    results: dict[str, tuple[int, list[str]]] = {}
    with concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        calls = [(url, (pool.submit if pool else _now)(verify_shard, url, count, num_classes, max_pixels))
                 for _, url, count in jobs]
        for url, call in calls:
            results[url] = call.result()
            bar.update()
    bar.close()
    ok = True
    for split, info in manifest["splits"].items():
        urls = [url for s, url, _ in jobs if s == split]
        found = sum(results[u][0] for u in urls)
        problems = [p for u in urls for p in results[u][1]]
        expected = int(info.get("total", 0))
        if found != expected:
            problems.append(f"{split}: {found} samples, manifest total says {expected}")
        ok &= not problems
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        print(f"{split}: {len(urls)} shards, {found} samples, {num_classes} classes: {status}", file=out)
        for problem in problems[:50]:
            print(f"  {problem}", file=out)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=out)
    return ok


class _Done:
    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


def _now(fn: Any, *args: Any) -> _Done:
    return _Done(fn(*args))

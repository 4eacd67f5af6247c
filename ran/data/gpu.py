"""Device decoding (``data.decode: gpu``): loader workers read shard bytes, the training device
decodes JPEGs and runs the ImageNet transforms on whole batches.

Why: a GPU trains Attention-56 faster than 15-25 CPU cores decode ImageNet JPEGs for it. nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``; A100-class GPUs and newer decode baseline
JPEGs on their hardware JPEG engines) takes the decode off the CPU, and the crops, resizes, flips
and lighting run on the device as well.

The split of work:

- Loader workers (:class:`RawShardDataset`, in their own processes as on the CPU path) read the
  shards, split them between ranks and workers, shuffle and count skipped samples exactly as
  :class:`ran.data.read.ShardDataset` does, and draw every random choice with the same generator
  calls in the same order (crop box, flip, lighting). For a JPEG the device decoder takes (8-bit,
  3 components, baseline/extended/progressive) they read only its frame header, for the image size
  that the crop box needs, and pass its bytes on. Every other sample (PNG and the rest, grey, CMYK
  and arithmetic-coded JPEGs) is decoded and transformed on the CPU as the CPU path does, so a
  corrupt or unreadable one is skipped and counted there. A worker yields a :class:`RawBatch`.
- The training process (:class:`DeviceLoader`, a :class:`ran.data.read.Loader`) hands each raw batch
  to :class:`DeviceDecoder` on a background thread (its own CUDA stream on a GPU, one batch ahead)
  and yields :class:`ran.data.read.Batch` es whose uint8 images and int64 labels are already on the
  device. A JPEG the device cannot decode is dropped from its batch and counted in ``skipped``
  (that batch is then one sample short; the CPU path fills it from the next sample instead).

Everything runs on a CPU too (``device="cpu"``: libjpeg-turbo through the same torchvision call),
which is how CI tests this pipeline. The CPU path's reduced-size JPEG decode (DCT scaling) has no
nvJPEG counterpart: the device decodes full size, then crops and resizes (bilinear, antialiased,
as the CPU path resizes).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ran.data import DataError
from ran.data.read import (MIN_SAMPLES_FOR_BAD_CHECK, Batch, Loader, ShardDataset, _batch_tensor,
                           _Health)
from ran.data.transforms import (ImageNetEval, ImageNetTrain, Transform, add_saturating, center_box,
                                 check_pixels, jpeg_header, random_resized_box)

log = logging.getLogger("ran.data")

DECODE_MODES = ("cpu", "gpu", "auto")
DEVICE_JPEG_MARKERS = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive Huffman
PREFETCH_BATCHES = 2  # device batches made ahead of the training loop


def resolve_decode(decode: str, recipe: str, device: torch.device | str | None) -> str:
    """``data.decode`` as it runs: ``"cpu"`` (workers decode) or ``"gpu"`` (the device decodes).

    ``auto`` is ``gpu`` on a CUDA device with the imagenet recipe, else ``cpu``; ``gpu`` on a CPU
    device runs the same device pipeline on the CPU.

    Raises:
        DataError: an unknown mode, or ``gpu`` with a recipe other than imagenet (CIFAR-size PNGs
            decode on the CPU faster than a device round trip).
    """
    if decode not in DECODE_MODES:
        raise DataError(f"data.decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "auto":
        on_gpu = device is not None and torch.device(device).type == "cuda"
        return "gpu" if on_gpu and recipe == "imagenet" else "cpu"
    if decode == "gpu" and recipe != "imagenet":
        raise DataError(f"data.decode=gpu decodes JPEGs for the imagenet recipe, not {recipe!r}; "
                        "set data.decode to cpu or auto")
    return decode


def with_index(device: torch.device | str) -> torch.device:
    """``device``, a CUDA one with its index (the current device's when it has none)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder takes (8-bit, 3 components, baseline,
    extended or progressive Huffman), else None: such samples are decoded on the CPU."""
    header = jpeg_header(data)
    if header is None:
        return None
    width, height, components, marker, bits = header
    if components != 3 or bits != 8 or marker not in DEVICE_JPEG_MARKERS:
        return None
    return width, height


def jpeg_params(transform: Transform, width: int, height: int,
                rng: random.Random) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (left, top, w, h) in source pixels and the flip of one JPEG, drawn with the
    same ``rng`` calls, in the same order, as ``transform.sample`` draws them on the CPU path.

    Raises:
        TypeError: a transform other than the ImageNet ones.
    """
    if isinstance(transform, ImageNetTrain):
        box = random_resized_box(width, height, rng, transform.scale, transform.ratio)
        return box, rng.random() < 0.5
    if isinstance(transform, ImageNetEval):
        return center_box(width, height, transform.fraction), False
    raise TypeError(f"device decoding has no {type(transform).__name__} transform")


class RawBatch(NamedTuple):
    """What a loader worker yields for the device: ``N`` samples, of which ``J`` are JPEG bytes to
    decode on the device and ``K = N - J`` are already decoded on the CPU."""

    jpeg_data: torch.Tensor  # uint8 (total bytes,): the J JPEG files, one after the other
    jpeg_sizes: torch.Tensor  # int64 (J,): bytes of each
    jpeg_slots: torch.Tensor  # int64 (J,): position of each in the batch
    jpeg_boxes: torch.Tensor  # int64 (J, 4): crop box (left, top, width, height), source pixels
    jpeg_flips: torch.Tensor  # bool (J,): flip horizontally after the resize
    jpeg_keys: list[str]  # sample keys, for the warning when one fails to decode
    decoded: torch.Tensor  # uint8 (K, 3, crop, crop): samples the CPU decoded and transformed
    decoded_slots: torch.Tensor  # int64 (K,): their positions in the batch
    lighting: torch.Tensor  # int16 (N, 3) lighting shift per sample and channel, or (0, 3): none
    labels: torch.Tensor  # int64 (N,)
    skipped: int  # samples dropped since the previous batch of this loader worker


class _RawCollector:
    """Samples of one raw batch as a worker gathers them."""

    def __init__(self, transform: Transform):
        self.transform = transform
        self.jpegs: list[bytes] = []
        self.keys: list[str] = []
        self.slots: list[int] = []
        self.boxes: list[tuple[int, int, int, int]] = []
        self.flips: list[bool] = []
        self.decoded: list[torch.Tensor] = []
        self.decoded_slots: list[int] = []
        self.labels: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, key: str, data: bytes, label: int, rng: random.Random) -> None:
        """Queue a JPEG for the device, or decode anything else here (exceptions: unreadable;
        ImageTooLarge when the header is over ``data.max_pixels``, before any decode)."""
        size = device_jpeg_size(data)
        if size is None:
            self.decoded.append(self.transform.sample(data, rng))
            self.decoded_slots.append(len(self.labels))
        else:
            check_pixels(size[0], size[1], self.transform.max_pixels)
            box, flip = jpeg_params(self.transform, size[0], size[1], rng)
            self.jpegs.append(data)
            self.keys.append(key)
            self.slots.append(len(self.labels))
            self.boxes.append(box)
            self.flips.append(flip)
        self.labels.append(label)

    def batch(self, rng: random.Random, skipped: int) -> RawBatch:
        """The raw batch; draws the lighting shifts as ``transform.batch`` does on the CPU path."""
        t, n = self.transform, len(self.labels)
        offsets = ([t.lighting_offsets(rng) for _ in range(n)]
                   if isinstance(t, ImageNetTrain) and t.lighting > 0 else [])
        data = _batch_tensor((sum(len(j) for j in self.jpegs),))
        array, pos = data.numpy(), 0
        for jpeg in self.jpegs:
            array[pos:pos + len(jpeg)] = np.frombuffer(jpeg, dtype=np.uint8)
            pos += len(jpeg)
        decoded = _batch_tensor((len(self.decoded), 3, t.crop, t.crop))
        if self.decoded:
            torch.stack(self.decoded, out=decoded)
        return RawBatch(
            data, torch.tensor([len(j) for j in self.jpegs], dtype=torch.int64),
            torch.tensor(self.slots, dtype=torch.int64),
            torch.tensor(self.boxes, dtype=torch.int64).view(-1, 4),
            torch.tensor(self.flips, dtype=torch.bool), list(self.keys),
            decoded, torch.tensor(self.decoded_slots, dtype=torch.int64),
            torch.tensor(offsets, dtype=torch.int16).view(-1, 3),
            torch.tensor(self.labels, dtype=torch.int64), skipped)


class RawShardDataset(ShardDataset):
    """:class:`ShardDataset` whose workers yield :class:`RawBatch` es (see the module docstring):
    the same shards, order, random draws and skipped-sample accounting."""

    def _assemble(self, items: Iterator[Any], rng: random.Random, health: _Health,
                  limit: int | None) -> Iterator[RawBatch]:  # type: ignore[override]
        # The control flow of ShardDataset._assemble, collecting bytes instead of pixels.
        if limit == 0:
            return
        made = 0
        collector = _RawCollector(self.transform)

        def collect(key: str, data: bytes, label: int) -> None:
            collector.add(key, data, label, rng)

        for _ in self._good_samples(items, health, collect):
            if len(collector) == self.batch_size:
                yield collector.batch(rng, health.take_pending())
                made += 1
                if made == limit:
                    return
                collector = _RawCollector(self.transform)
        if len(collector):
            yield collector.batch(rng, health.take_pending())


class DeviceDecoder:
    """:class:`RawBatch` -> :class:`Batch` on ``device``: JPEG decode (one batched call), crop,
    resize to ``crop`` x ``crop``, flip, lighting; uint8 ``(N', 3, crop, crop)`` images and int64
    ``(N',)`` labels on the device, ``N'`` = N minus the JPEGs that failed to decode, which are
    added to ``skipped`` and logged. Call it under the CUDA stream the work should run on."""

    def __init__(self, crop: int, device: torch.device | str):
        self.crop = crop
        self.device = with_index(device)
        self.failed = 0  # JPEGs that failed to decode on the device so far

    def __call__(self, raw: RawBatch | Batch) -> Batch:
        device = self.device
        if isinstance(raw, Batch):  # an evaluation pass's empty batch that carries skipped counts
            return Batch(raw.images.to(device), raw.labels.to(device), raw.skipped)
        n, crop = len(raw.labels), self.crop
        images = torch.empty((n, 3, crop, crop), dtype=torch.uint8, device=device)
        if len(raw.decoded_slots):
            images[raw.decoded_slots.to(device)] = raw.decoded.to(device, non_blocking=True)
        keep = torch.ones(n, dtype=torch.bool)
        if len(raw.jpeg_slots):
            pieces = list(torch.split(raw.jpeg_data, raw.jpeg_sizes.tolist()))
            slots = raw.jpeg_slots.tolist()
            decoded = self._decode(pieces, raw.jpeg_keys)
            for slot, image in zip(slots, decoded):
                if image is None:
                    keep[slot] = False
            self._place(images, slots, raw.jpeg_boxes.tolist(), decoded)
            flipped = [s for s, f, d in zip(slots, raw.jpeg_flips.tolist(), decoded) if f and d is not None]
            if flipped:
                index = torch.tensor(flipped, device=device)
                images[index] = images[index].flip(-1)
        if len(raw.lighting):
            add_saturating(images, raw.lighting.to(device)[:, :, None, None])
        labels = raw.labels
        failed = n - int(keep.sum())
        if failed:
            images, labels = images[keep.to(device)], labels[keep]
        return Batch(images, labels.to(device), raw.skipped + failed)

    def _decode(self, pieces: list[torch.Tensor], keys: list[str]) -> list[torch.Tensor | None]:
        """Decoded RGB ``(3, H, W)`` uint8 images (None where decoding failed); one batched call,
        and one call per image only when the batch fails (nvJPEG returns nothing on an error)."""
        try:
            return list(decode_jpeg(pieces, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for piece, key in zip(pieces, keys):
            try:
                decoded.append(decode_jpeg([piece], mode=ImageReadMode.RGB, device=self.device)[0])
            except RuntimeError as exc:
                reason = str(exc).rsplit(", ", 1)[-1]
                self.failed += 1
                log.warning("skipped 1 sample: sample %s: corrupt JPEG (device decode): %s", key, reason)
                decoded.append(None)
        return decoded

    def _place(self, images: torch.Tensor, slots: list[int], boxes: list[list[int]],
               decoded: list[torch.Tensor | None]) -> None:
        """Crop each decoded JPEG to its box and resize it into its slot, as the CPU path does
        (bilinear, antialiased; the float result rounded to uint8)."""
        size = (self.crop, self.crop)
        for slot, (left, top, w, h), image in zip(slots, boxes, decoded):
            if image is None:
                continue
            region = image[:, top:top + h, left:left + w]
            if (h, w) != size:
                region = F.interpolate(region[None].float(), size=size, mode="bilinear",
                                       antialias=True, align_corners=False)[0].round_()
            images[slot].copy_(region)


_END = object()


class DeviceLoader(Loader):
    """A :class:`Loader` of device-ready :class:`Batch` es made from :class:`RawBatch` es by a
    :class:`DeviceDecoder` on a background thread, ``PREFETCH_BATCHES`` ahead.

    On a GPU the thread works on its own CUDA stream and the training stream waits for each
    batch's event, so the host never synchronises. Bad samples found on the device count towards
    ``max_bad_fraction`` as the workers' do; past it iteration raises :class:`DataError`.
    """

    def __init__(self, dataset: RawShardDataset, dataloader: Any, num_batches: int,
                 num_samples: int, manifest: dict[str, Any], device: torch.device | str | None):
        super().__init__(dataset, dataloader, num_batches, num_samples, manifest)
        self.device = with_index(device or "cpu")
        self.decoder = DeviceDecoder(dataset.transform.crop, self.device)

    def __iter__(self) -> Iterator[Batch]:
        items: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(items, stop), daemon=True,
                                  name="ran-device-decode")
        thread.start()
        try:
            while True:
                item = items.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    batch.images.record_stream(stream)
                    batch.labels.record_stream(stream)
                yield batch
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    items.get_nowait()
            thread.join()

    def _produce(self, items: queue.Queue, stop: threading.Event) -> None:
        cuda = self.device.type == "cuda"
        source = super().__iter__()
        seen = bad = 0
        try:
            if cuda:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device) if cuda else None
            for raw in source:
                failed_before = self.decoder.failed
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    batch = self.decoder(raw)
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                seen += len(raw.labels) + raw.skipped
                bad += raw.skipped + self.decoder.failed - failed_before
                if seen >= MIN_SAMPLES_FOR_BAD_CHECK:
                    self._check(bad, seen)
                if not _put(items, (batch, event), stop):
                    return
            if not self.dataset.train:  # as the workers check at the end of an evaluation pass
                self._check(bad, seen)
            _put(items, _END, stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(items, exc, stop)
        finally:
            source.close()

    def _check(self, bad: int, seen: int) -> None:
        limit = self.dataset.max_bad_fraction
        if bad and bad > limit * seen:
            self.close()
            raise DataError(f"{bad} of {seen} samples unreadable on rank {self.dataset.rank} "
                            f"(workers and device decode), above max_bad_fraction={limit}")


def _put(items: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped; False if it has."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False

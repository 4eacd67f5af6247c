"""Device decoding (``data.decode: gpu``): loader workers read shard bytes, the training device
decodes JPEGs and runs the ImageNet training transforms on whole batches.

Why: a GPU trains Attention-56 faster than 15-25 CPU cores decode ImageNet JPEGs for it. nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``; A100-class GPUs and newer decode baseline
JPEGs on their hardware JPEG engines) takes the decode off the CPU, and the crops, resizes, flips
and lighting run on the device as well.

The split of work:

- Loader workers run the one :class:`ran.data.read.ShardDataset` with :class:`RawCollector` as its
  collector: the same shards, split, shuffle and skipped-sample accounting as the CPU path, and
  every random choice drawn with the same generator calls in the same order (crop box, flip,
  lighting). For a JPEG the device decoder takes (8-bit, 3 components, baseline/extended/
  progressive) they read only its frame header, for the image size that the crop box needs, and
  pass its bytes on. Every other sample (PNG and the rest, grey, CMYK and arithmetic-coded JPEGs)
  is decoded and transformed on the CPU as the CPU path does, so a corrupt or unreadable one is
  skipped and counted there. A worker yields a :class:`RawBatch`.
- The training process (:class:`DeviceLoader`) hands each raw batch to :class:`DeviceDecoder` on a
  background thread (its own CUDA stream on a GPU, one batch ahead) and yields
  :class:`ran.data.batches.Batch` es whose uint8 images and int64 labels are already on the
  device. The decoder crops, resizes, flips and lights the whole batch in a fixed number of
  operations (:func:`place`: one gather of the crop boxes, two batched matrix products with
  per-image antialiasing weights), and uploads what it needs in one copy from pinned buffers it
  reuses, so the host never waits for the device. A JPEG the device cannot decode is dropped
  from its batch and counted in ``skipped`` (that batch is then one sample short; the CPU path
  fills it from the next sample instead).

Only training batches take this path: evaluation decodes with the eval transform in the workers
(:func:`resolve_decode`), so the validation pixels are the ones ``ran eval`` and serving see.

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
from torchvision.io import ImageReadMode, decode_jpeg

from ran.data import check_decode
from ran.data.batches import Batch, Health, Loader, batch_tensor
from ran.data.transforms import (ImageNetEval, ImageNetTrain, Transform, add_saturating, center_box,
                                 check_pixels, jpeg_header, random_resized_box)

log = logging.getLogger("ran.data")

DEVICE_JPEG_MARKERS = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive Huffman
PREFETCH_BATCHES = 2  # device batches made ahead of the training loop
STAGING_BUFFERS = PREFETCH_BATCHES + 1  # pinned upload buffers, reused in turn


def resolve_decode(decode: str, recipe: str, device: torch.device | str | None, *,
                   train: bool = True) -> str:
    """``data.decode`` as it runs for a loader: ``"cpu"`` (workers decode) or ``"gpu"`` (the
    device decodes).

    ``auto`` is ``gpu`` on a CUDA device with the imagenet recipe, else ``cpu``; ``gpu`` on a CPU
    device runs the same device pipeline on the CPU. Evaluation (``train=False``) is always
    ``cpu``: its pixels come from the model's eval transform, the one ``ran eval`` and the served
    model use, so the top-1 a run records is the one they reproduce.

    Raises:
        DataError: :func:`ran.data.check_decode` (an unknown mode, ``gpu`` with the cifar recipe).
    """
    check_decode(decode, recipe)
    if not train:
        return "cpu"
    if decode == "auto":
        on_gpu = device is not None and torch.device(device).type == "cuda"
        return "gpu" if on_gpu and recipe == "imagenet" else "cpu"
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


class RawCollector:
    """The device path's collector for :class:`ran.data.read.ShardDataset` (see
    :class:`ran.data.read.PixelCollector` for the protocol): JPEG bytes with their crop box and
    flip for the device, anything else decoded here; ``finish`` returns a :class:`RawBatch`."""

    def __init__(self, transform: Transform, batch_size: int, rng: random.Random):
        self.transform, self.rng = transform, rng
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

    def add(self, key: str, data: bytes, label: int) -> None:
        """Queue a JPEG for the device, or decode anything else here (exceptions: unreadable;
        ImageTooLarge when the header is over ``data.max_pixels``, before any decode)."""
        size = device_jpeg_size(data)
        if size is None:
            self.decoded.append(self.transform.sample(data, self.rng))
            self.decoded_slots.append(len(self.labels))
        else:
            check_pixels(size[0], size[1], self.transform.max_pixels)
            box, flip = jpeg_params(self.transform, size[0], size[1], self.rng)
            self.jpegs.append(data)
            self.keys.append(key)
            self.slots.append(len(self.labels))
            self.boxes.append(box)
            self.flips.append(flip)
        self.labels.append(label)

    def finish(self, skipped: int) -> RawBatch:
        """The raw batch; draws the lighting shifts as ``transform.batch`` does on the CPU path."""
        t, n = self.transform, len(self.labels)
        offsets = ([t.lighting_offsets(self.rng) for _ in range(n)]
                   if isinstance(t, ImageNetTrain) and t.lighting > 0 else [])
        data = batch_tensor((sum(len(j) for j in self.jpegs),))
        array, pos = data.numpy(), 0
        for jpeg in self.jpegs:
            array[pos:pos + len(jpeg)] = np.frombuffer(jpeg, dtype=np.uint8)
            pos += len(jpeg)
        decoded = batch_tensor((len(self.decoded), 3, t.crop, t.crop))
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


# ---------------------------------------------------------------------------------------------
# Crop, resize and flip a whole batch


GEOMETRY = ("offset", "height", "width", "left", "top", "box_w", "box_h", "flip")  # columns
# Padded box pixels one place() call holds (x 4 bytes as float32, plus the index of each row):
# 256 crops of up to 500 x 500 px fit in one call; a batch with a huge image is cut in groups.
PLACE_BUDGET = 1 << 28


def resize_weights(sizes: torch.Tensor, length: int, out: int,
                   flips: torch.Tensor | None = None) -> torch.Tensor:
    """Antialiased bilinear resampling weights, float32 ``(J, out, length)``: row ``x`` of image
    ``j`` weighs source pixels ``0 .. sizes[j] - 1`` of a line (pixels at ``sizes[j]`` and beyond,
    padding, weigh 0) into output pixel ``x`` (``out - 1 - x`` where ``flips[j]``).

    The triangle filter widened by the downscale factor, normalised per output pixel, as
    ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` computes it (ATen's
    ``_compute_indices_min_size_weights_aa``). ``sizes``: int64 ``(J,)`` on the target device.
    """
    size = sizes.to(torch.float32)[:, None, None]  # (J, 1, 1)
    scale = size / out
    support = scale.clamp(min=1.0)
    x = torch.arange(out, device=sizes.device, dtype=torch.float32)[None, :, None]  # (1, out, 1)
    if flips is not None:
        x = torch.where(flips[:, None, None], out - 1 - x, x)
    center = scale * (x + 0.5)  # (J, out, 1)
    low = (center - support + 0.5).floor().clamp(min=0)
    high = torch.minimum((center + support + 0.5).floor(), size)
    src = torch.arange(length, device=sizes.device, dtype=torch.float32)  # (length,)
    weights = (1 - ((src - center + 0.5) / support).abs()).clamp(min=0)
    weights = weights * ((src >= low) & (src < high))
    return weights / weights.sum(-1, keepdim=True)


def _flat_layout(decoded: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """Each ``(3, H, W)`` image as a flat view of its memory, and whether that memory is HWC
    (libjpeg on a CPU) rather than CHW (nvJPEG); an image in the other layout is copied."""
    hwc = decoded[0].permute(1, 2, 0).is_contiguous()
    flat = []
    for image in decoded:
        view = image.permute(1, 2, 0) if hwc else image
        flat.append(view.contiguous().view(-1))  # a view, unless the layout differs
    return flat, hwc


def place(decoded: list[torch.Tensor], geometry: torch.Tensor, box_max: tuple[int, int],
          crop: int) -> torch.Tensor:
    """Crop each decoded image to its box, resize it to ``crop`` x ``crop`` (bilinear,
    antialiased, rounded to uint8) and flip it where asked, in a fixed number of operations
    whatever the batch size: uint8 ``(J, 3, crop, crop)`` on the images' device.

    ``decoded``: J uint8 ``(3, H_j, W_j)`` images (CHW or HWC memory, all alike). ``geometry``:
    int64 ``(J, 8)`` on the same device, columns :data:`GEOMETRY` (``offset`` is where the image
    starts in the concatenation of all of them). ``box_max``: the largest box (height, width).

    How: the images are concatenated once; a strided window view over them gives every box row
    by one index operation (a ``(J, 3, Hb, Wb)`` uint8 tensor, rows and columns padded to the
    largest box); two batched matrix products with per-image weights (:func:`resize_weights`,
    the flip folded into the horizontal ones) resize all boxes at once.
    """
    device = geometry.device
    hb, wb = box_max
    flat_views, hwc = _flat_layout(decoded)
    step = 3 if hwc else 1  # between horizontally adjacent pixels of one channel
    total = sum(v.numel() for v in flat_views)
    flat = torch.cat([*flat_views, torch.zeros((wb - 1) * step, dtype=torch.uint8, device=device)])
    windows = flat.as_strided((total, wb), (1, step))  # row i: wb pixels of one channel from i
    offset, height, width, left, top, box_w, box_h, flip = geometry.unbind(1)
    channel_stride = torch.ones_like(offset) if hwc else height * width
    row_stride = width * step
    rows = torch.arange(hb, device=device)[None, None, :]  # (1, 1, Hb)
    rows = torch.minimum(rows, (box_h - 1)[:, None, None])  # padding rows repeat the last one
    channels = torch.arange(3, device=device)[None, :, None]
    starts = (offset[:, None, None] + channels * channel_stride[:, None, None]
              + (top[:, None, None] + rows) * row_stride[:, None, None] + (left * step)[:, None, None])
    boxes = windows[starts.view(-1)].view(len(decoded), 3 * hb, wb).to(torch.float32)
    j = len(decoded)  # both axes' weights in one call: widths (flipped where asked), then heights
    weights = resize_weights(torch.cat([box_w, box_h]), max(wb, hb), crop,
                             torch.cat([flip.bool(), torch.zeros_like(flip, dtype=torch.bool)]))
    across, down = weights[:j, :, :wb], weights[j:, :, :hb]  # (J, crop, Wb), (J, crop, Hb)
    lines = torch.bmm(boxes, across.transpose(1, 2)).view(j, 3, hb, crop)
    out = torch.matmul(down[:, None], lines)  # (J, 3, crop, crop)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def place_groups(indices: list[int], boxes: list[list[int]], budget: int | None = None) -> list[list[int]]:
    """``indices`` split into the groups :func:`place` resizes together: sorted by box area, so
    that boxes of a like size share their padding, and cut where a group's padded boxes
    (``len(group) * 3 * max height * max width``) would pass ``budget`` (``PLACE_BUDGET``). A
    batch of ImageNet-size crops is one group; a huge image only splits its batch in a few."""
    budget = PLACE_BUDGET if budget is None else budget
    groups: list[list[int]] = []
    group: list[int] = []
    high = wide = 0
    for i in sorted(indices, key=lambda i: boxes[i][2] * boxes[i][3]):
        h, w = max(high, boxes[i][3]), max(wide, boxes[i][2])
        if group and (len(group) + 1) * 3 * h * w > budget:
            groups.append(group)
            group, h, w = [], boxes[i][3], boxes[i][2]
        group.append(i)
        high, wide = h, w
    return groups + [group] if group else groups


# ---------------------------------------------------------------------------------------------
# The device side


class _Staging:
    """Pinned host buffers (on a CUDA device) that carry each batch's small tensors to the device
    in one copy; reused in turn, each only once the copy out of it has finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * STAGING_BUFFERS
        self.events: list[Any] = [None] * STAGING_BUFFERS
        self.turn = 0

    def upload(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``parts`` (CPU tensors) as tensors on the device, in the same order, shapes and dtypes."""
        if self.device.type != "cuda":
            return parts
        raw = [p.contiguous().view(-1).view(torch.uint8) for p in parts]
        sizes = [(r.numel() + 7) // 8 * 8 for r in raw]  # each part starts 8-byte aligned
        need = sum(sizes)
        slot = self.turn % STAGING_BUFFERS
        self.turn += 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # its copy, STAGING_BUFFERS batches ago, is long done
        buffer = self.buffers[slot]
        if buffer is None or buffer.numel() < need:
            buffer = self.buffers[slot] = torch.empty(max(need, 1 << 16), dtype=torch.uint8,
                                                      pin_memory=True)
        pos = 0
        for r, size in zip(raw, sizes):
            buffer[pos:pos + r.numel()].copy_(r)
            pos += size
        on_device = buffer[:need].to(self.device, non_blocking=True)
        event = self.events[slot] = torch.cuda.Event()
        event.record()
        out, pos = [], 0
        for p, r, size in zip(parts, raw, sizes):
            out.append(on_device[pos:pos + r.numel()].view(p.dtype).view(p.shape))
            pos += size
        return out


class DeviceDecoder:
    """:class:`RawBatch` -> :class:`Batch` on ``device``: JPEG decode (one batched call), then crop,
    resize to ``crop`` x ``crop``, flip and lighting for the whole batch (:func:`place`); uint8
    ``(N', 3, crop, crop)`` images and int64 ``(N',)`` labels on the device, ``N'`` = N minus the
    JPEGs that failed to decode, which are added to ``skipped`` and logged. Call it under the
    CUDA stream the work should run on; it never waits for the device."""

    def __init__(self, crop: int, device: torch.device | str):
        self.crop = crop
        self.device = with_index(device)
        self.failed = 0  # JPEGs that failed to decode on the device so far
        self.last_reason = ""  # why the last one failed
        self.staging = _Staging(self.device)

    def __call__(self, raw: RawBatch) -> Batch:
        n, crop = len(raw.labels), self.crop
        pieces = list(torch.split(raw.jpeg_data, raw.jpeg_sizes.tolist()))
        decoded = self._decode(pieces, raw.jpeg_keys) if pieces else []
        keep = torch.ones(n, dtype=torch.bool)
        keep[raw.jpeg_slots[[i for i, image in enumerate(decoded) if image is None]]] = False
        position = keep.cumsum(0) - 1  # each kept sample's slot in the output
        boxes = raw.jpeg_boxes.tolist()
        groups = place_groups([i for i, image in enumerate(decoded) if image is not None], boxes)
        order = [i for group in groups for i in group]
        geometry = self._geometry([[decoded[i] for i in group] for group in groups],
                                  raw.jpeg_boxes[order], raw.jpeg_flips[order],
                                  position[raw.jpeg_slots[order]])
        lighting = raw.lighting[keep] if len(raw.lighting) else raw.lighting
        geometry, decoded_dest, labels, lighting, cpu_images = self.staging.upload(
            [geometry, position[raw.decoded_slots], raw.labels[keep], lighting, raw.decoded])
        images = torch.empty((int(keep.sum()), 3, crop, crop), dtype=torch.uint8, device=self.device)
        start = 0
        for group in groups:
            rows = geometry[start:start + len(group)]
            start += len(group)
            box_max = (max(boxes[i][3] for i in group), max(boxes[i][2] for i in group))
            images.index_copy_(0, rows[:, 8], place([decoded[i] for i in group], rows[:, :8], box_max, crop))
        if len(cpu_images):
            images.index_copy_(0, decoded_dest, cpu_images)
        if len(lighting):
            add_saturating(images, lighting[:, :, None, None])
        return Batch(images, labels, raw.skipped + n - len(labels))

    @staticmethod
    def _geometry(groups: list[list[torch.Tensor]], boxes: torch.Tensor, flips: torch.Tensor,
                  dest: torch.Tensor) -> torch.Tensor:
        """int64 ``(J, 9)``: :data:`GEOMETRY` of each decoded image (offsets counted within its
        group), then its output slot; rows in the order of ``groups``."""
        sizes = torch.tensor([image.shape[1:] for group in groups for image in group],
                             dtype=torch.int64).view(-1, 2)
        counts = sizes[:, 0] * sizes[:, 1] * 3
        offsets, start = counts.cumsum(0) - counts, 0
        for group in groups:  # each group's concatenation starts at 0
            offsets[start:start + len(group)] -= offsets[start].clone()
            start += len(group)
        return torch.cat([offsets[:, None], sizes, boxes.view(-1, 4), flips.view(-1, 1).long(),
                          dest.view(-1, 1)], dim=1)

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
                self.last_reason = f"sample {key}: corrupt JPEG (device decode): {reason}"
                log.warning("skipped 1 sample: %s", self.last_reason)
                decoded.append(None)
        return decoded


_END = object()


class DeviceLoader(Loader):
    """A :class:`Loader` of device-ready :class:`Batch` es made from :class:`RawBatch` es by a
    :class:`DeviceDecoder` on a background thread, ``PREFETCH_BATCHES`` ahead.

    On a GPU the thread works on its own CUDA stream and the training stream waits for each
    batch's event, so the host never synchronises. Bad samples found on the device count towards
    ``max_bad_fraction`` together with the workers' (one :class:`Health` for the rank); past it
    iteration raises :class:`DataError`.
    """

    def __init__(self, dataset: Any, dataloader: Any, num_batches: int,
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
        health = Health(f"rank {self.dataset.rank} (workers and device decode)",
                        self.dataset.max_bad_fraction)
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
                failed = self.decoder.failed - failed_before
                if failed:
                    health.last_reason = self.decoder.last_reason
                try:
                    health.tally(len(raw.labels) - failed, raw.skipped + failed)
                except Exception:
                    self.close()
                    raise
                if not _put(items, (batch, event), stop):
                    return
            _put(items, _END, stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(items, exc, stop)
        finally:
            source.close()


def _put(items: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has stopped; False if it has."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False

"""Device decoding (data.decode: gpu) in its CPU form: the same training batches as the CPU path,
evaluation through the eval transform whatever the decode, the same skipped-sample accounting,
which samples go where, and a batch transform whose operation count does not grow with the batch."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.io import decode_jpeg

from ran.config import ConfigError, parse_config
from ran.data import DataError, batches, gpu
from ran.data.gpu import (DeviceDecoder, DeviceLoader, RawBatch, device_jpeg_size, jpeg_params, place,
                          resolve_decode)
from ran.data.batches import Loader
from ran.data.read import Batch, iter_tar, make_loader, parse_sample, read_manifest, split_shards
from ran.data.transforms import CifarTrain, ImageNetEval, ImageNetTrain, make_transform

CROP = 16  # every test image is under 2 x CROP a side, so the CPU path decodes it at full size too


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_shards(root, samples, per_shard, num_classes, split="train"):
    """Shards + manifest from ``(key, ext, data, label)`` samples, as ``ran data build`` lays
    them out (written directly, so that broken images get in)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), per_shard):
        name = f"{split}-{len(shards):06d}.tar"
        chunk = samples[start:start + per_shard]
        with tarfile.open(root / name, "w") as tar:
            for key, ext, data, label in chunk:
                for member, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append({"name": name, "samples": len(chunk)})
    manifest = {"format": 1, "dataset": "test", "classes": [f"c{i}" for i in range(num_classes)],
                "num_classes": num_classes,
                "splits": {split: {"shards": shards, "total": len(samples)}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def jpeg_samples(count, num_classes, seed=0, label_of=None):
    """RGB JPEGs of 17..31 px a side, some progressive."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        image = noise(rng, int(rng.integers(17, 32)), int(rng.integers(17, 32)))
        data = encode(image, quality=90, progressive=i % 5 == 0)
        samples.append((f"s{i:04d}", "jpg", data, label_of(i) if label_of else i % num_classes))
    return samples


def other_samples(num_classes):
    """One of each kind the device does not decode: PNG, grey JPEG, CMYK JPEG."""
    rng = np.random.default_rng(7)
    return [("png", "png", encode(noise(rng, 24, 20), "PNG"), 1 % num_classes),
            ("grey", "jpg", encode(noise(rng, 22, 25).convert("L"), quality=90), 2 % num_classes),
            ("cmyk", "jpg", encode(noise(rng, 20, 23).convert("CMYK"), quality=90), 0)]


def broken_samples():
    """A JPEG cut inside its headers (the worker finds it) and one cut inside its scan (the
    decoder finds it)."""
    data = encode(noise(np.random.default_rng(9), 28, 28), quality=95)
    return [("cut-header", "jpg", data[:60], 0), ("cut-scan", "jpg", data[:len(data) // 2], 1)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """44 samples in 4 classes over 5 shards: JPEGs, a PNG, a grey and a CMYK JPEG."""
    samples = jpeg_samples(41, 4)
    samples[5:5] = other_samples(4)
    return write_shards(tmp_path_factory.mktemp("mixed"), samples, 9, 4)


def _samples(url):
    with open(url, "rb") as stream:
        return list(iter_tar(stream))


def load(path, decode, **kw):
    epoch = kw.pop("epoch", 0)
    kw = {"batch_size": 8, "recipe": "imagenet", "crop": CROP, "workers": 0, "seed": 5,
          "train": False, **kw}
    loader = make_loader(path, "train", decode=decode, **kw)
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return loader, batches


@pytest.mark.parametrize("workers", [0, 2])
def test_device_training_batches_match_the_cpu_path(mixed, workers):
    cpu_loader, cpu = load(mixed, "cpu", train=True, workers=workers)
    dev_loader, dev = load(mixed, "gpu", train=True, workers=workers)

    assert isinstance(dev_loader, DeviceLoader) and not isinstance(cpu_loader, DeviceLoader)
    assert len(dev) == len(cpu) == len(dev_loader) == 5
    for c, d in zip(cpu, dev):
        assert isinstance(d, Batch)
        assert d.images.shape == c.images.shape and d.images.dtype == c.images.dtype == torch.uint8
        assert d.labels.dtype == torch.int64 and d.labels.tolist() == c.labels.tolist()
        assert d.skipped == c.skipped == 0
        # Same crop boxes, flips and lighting; resizing in float instead of uint8 rounds apart by 1 at most.
        assert (d.images.int() - c.images.int()).abs().max() <= 1
    assert sum(len(b.labels) for b in dev) == 40


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_pixels_are_the_eval_transforms_whatever_the_decode(mixed, workers):
    """One number: validation under data.decode=gpu sees exactly the pixels ran eval and serving
    see (the eval transform in the loader workers), not the device decoder's."""
    cpu_loader, cpu = load(mixed, "cpu", workers=workers)
    dev_loader, dev = load(mixed, "gpu", workers=workers)
    assert type(dev_loader) is type(cpu_loader) is Loader
    assert len(dev) == len(cpu) == 6 + workers // 2
    assert torch.equal(torch.cat([b.images for b in dev]), torch.cat([b.images for b in cpu]))
    assert torch.equal(torch.cat([b.labels for b in dev]), torch.cat([b.labels for b in cpu]))


def test_evaluation_under_device_decode_is_the_served_transform_sample_by_sample(mixed):
    _, dev = load(mixed, "gpu", workers=0)  # one reader: the samples in shard order
    served = make_transform("imagenet", train=False, crop=CROP)  # the serving pyfunc's transform
    expected = [served.sample(parse_sample(sample, 4)[0], random.Random(0))
                for url, _ in split_shards(mixed, read_manifest(mixed), "train")
                for _, sample in _samples(url)]
    assert len(expected) == 44
    assert torch.equal(torch.cat([b.images for b in dev]), torch.stack(expected))


def test_a_second_epoch_draws_new_crops_as_the_cpu_path_does(mixed):
    first = load(mixed, "gpu", train=True)[1]
    second = load(mixed, "gpu", train=True, epoch=1)[1]
    cpu_second = load(mixed, "cpu", train=True, epoch=1)[1]
    assert [b.labels.tolist() for b in second] == [b.labels.tolist() for b in cpu_second]
    assert [b.labels.tolist() for b in first] != [b.labels.tolist() for b in second]


def test_broken_jpegs_and_a_png_are_skipped_and_counted_as_on_the_cpu_path(tmp_path, caplog):
    # One shard read in order (a one-sample shuffle buffer keeps it), the PNG before the broken
    # JPEGs, so both paths draw the same crops for it.
    samples = jpeg_samples(12, 4)
    samples[2:2] = other_samples(4)[:1]  # the PNG
    samples[5:5] = broken_samples()
    path = write_shards(tmp_path, samples, 15, 4)
    kw = {"train": True, "batch_size": 5, "max_bad_fraction": 0.5, "shuffle_buffer": 1}
    _, cpu = load(path, "cpu", **kw)
    with caplog.at_level(logging.WARNING, logger="ran.data"):
        _, dev = load(path, "gpu", **kw)

    labels = [label for b in dev for label in b.labels.tolist()]
    assert labels == [label for b in cpu for label in b.labels.tolist()][:len(labels)]
    # The worker skips the JPEG with broken headers and fills its batch; the decoder finds the
    # other in its batch, which is one sample short.
    assert [len(b.labels) for b in cpu] == [5, 5, 5]
    assert [len(b.labels) for b in dev] == [5, 4, 5]
    assert [b.skipped for b in cpu] == [0, 2, 0]
    assert [b.skipped for b in dev] == [0, 2, 0]
    assert any("sample cut-scan: corrupt JPEG (device decode)" in r.message for r in caplog.records)
    png_at = 2
    assert torch.equal(dev[0].images[png_at], cpu[0].images[png_at])  # decoded on the CPU either way


def test_device_decode_failures_count_towards_max_bad_fraction(tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "MIN_SAMPLES_FOR_BAD_CHECK", 1)  # judge from the first batch
    samples = jpeg_samples(6, 2)
    samples.append(broken_samples()[1])
    path = write_shards(tmp_path, samples, 7, 2)
    kw = {"train": True, "batch_size": 7, "shuffle_buffer": 1}
    with pytest.raises(DataError, match=r"^1 of 7 samples unreadable in rank 0 \(workers and device "
                                        r"decode\), above max_bad_fraction=0.1 \(last: sample cut-scan: "
                                        r"corrupt JPEG \(device decode\)"):
        load(path, "gpu", max_bad_fraction=0.1, **kw)
    assert [b.skipped for b in load(path, "gpu", max_bad_fraction=0.2, **kw)[1]] == [1]


def test_an_abandoned_epoch_stops_its_decode_thread_and_the_next_epoch_is_whole(mixed):
    loader = make_loader(mixed, "train", train=True, batch_size=4, recipe="imagenet", crop=CROP,
                         workers=1, decode="gpu")
    batches = iter(loader)
    next(batches)
    batches.close()  # what dropping the iterator does
    assert not [t for t in threading.enumerate() if t.name == "ran-device-decode"]
    loader.set_epoch(1)
    assert [len(b.labels) for b in loader] == [4] * 11
    loader.close()


def test_worker_errors_reach_the_training_loop(tmp_path):
    path = write_shards(tmp_path, jpeg_samples(8, 2), 8, 2)
    (tmp_path / "train-000000.tar").write_bytes(b"not a tar" * 100)
    loader = make_loader(path, "train", train=True, batch_size=4, recipe="imagenet", crop=CROP,
                         workers=1, decode="gpu", max_bad_fraction=0.5)
    assert isinstance(loader, DeviceLoader)
    with pytest.raises(DataError, match=r"^rank 0 loader worker 0: no readable shards left"):
        list(loader)


# -- which samples the device decodes, and with which parameters ---------------------------------


def test_the_device_takes_8_bit_colour_huffman_jpegs_and_nothing_else():
    rgb = Image.new("RGB", (30, 20), (10, 20, 30))
    assert device_jpeg_size(encode(rgb)) == (30, 20)
    assert device_jpeg_size(encode(rgb, progressive=True)) == (30, 20)
    assert device_jpeg_size(encode(rgb.convert("L"))) is None
    assert device_jpeg_size(encode(rgb.convert("CMYK"))) is None
    assert device_jpeg_size(encode(rgb, "PNG")) is None
    assert device_jpeg_size(encode(rgb)[:60]) is None
    assert device_jpeg_size(b"GIF89a") is None


def test_crop_boxes_and_flips_are_the_cpu_transforms_own():
    # Judged by their effect: the CPU transform's output for a noise JPEG (small enough to decode
    # at full size) is the full decode cropped to the box, resized and flipped as jpeg_params
    # says; a box one pixel off would differ by far more than the 1 level of rounding.
    train = ImageNetTrain(crop=CROP)
    data = encode(noise(np.random.default_rng(1), 30, 27), quality=95)
    full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).float()
    flips = 0
    for seed in range(20):
        rng, cpu_rng = random.Random(seed), random.Random(seed)
        (left, top, w, h), flip = jpeg_params(train, 30, 27, rng)
        region = full[None, :, top:top + h, left:left + w]
        expected = F.interpolate(region, size=(CROP, CROP), mode="bilinear", antialias=True,
                                 align_corners=False)[0].round()
        expected = expected.flip(-1) if flip else expected
        assert (train.sample(data, cpu_rng).float() - expected).abs().max() <= 1
        assert rng.random() == cpu_rng.random()  # the same number of draws
        flips += flip
    assert 0 < flips < 20
    assert jpeg_params(ImageNetEval(crop=224), 400, 300, random.Random(0)) == ((69, 19, 262, 262), False)
    with pytest.raises(TypeError, match="no CifarTrain transform"):
        jpeg_params(CifarTrain(), 32, 32, random.Random(0))


def test_decoder_places_every_sample_and_applies_flips_and_lighting():
    rng = np.random.default_rng(3)
    images = [noise(rng, 20, 18) for _ in range(3)]
    jpegs = [encode(im, quality=95) for im in images]
    raw = _raw_batch(jpegs, boxes=[(0, 0, 16, 16), (2, 1, 16, 16), (0, 0, 20, 18)],
                     flips=[False, True, False], lighting=[[0, 0, 0], [0, 0, 0], [5, -5, 300]])
    batch = DeviceDecoder(16, "cpu")(raw)

    assert batch.images.shape == (3, 3, 16, 16) and batch.labels.tolist() == [0, 1, 2]
    full = [decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpegs]
    assert torch.equal(batch.images[0], full[0][:, 0:16, 0:16])
    assert torch.equal(batch.images[1], full[1][:, 1:17, 2:18].flip(-1))
    shifted = batch.images[2].int()
    assert int(shifted[2].min()) == 255  # +300 saturates the blue channel
    assert batch.skipped == 0


def test_decoder_drops_a_jpeg_it_cannot_decode_and_counts_it():
    good = encode(noise(np.random.default_rng(4), 20, 20), quality=95)
    raw = _raw_batch([good, good[:len(good) // 2], good], boxes=[(0, 0, 16, 16)] * 3,
                     flips=[False] * 3, skipped=2)
    decoder = DeviceDecoder(16, "cpu")
    batch = decoder(raw)
    assert batch.labels.tolist() == [0, 2]
    assert batch.images.shape == (2, 3, 16, 16)
    assert torch.equal(batch.images[0], batch.images[1])
    assert batch.skipped == 3 and decoder.failed == 1


def _raw_batch(jpegs, boxes, flips, lighting=(), skipped=0):
    n = len(jpegs)
    return RawBatch(
        torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8),
        torch.tensor([len(j) for j in jpegs]), torch.arange(n), torch.tensor(boxes).view(-1, 4),
        torch.tensor(flips), [f"k{i}" for i in range(n)],
        torch.empty((0, 3, 16, 16), dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
        torch.tensor(list(lighting), dtype=torch.int16).view(-1, 3), torch.arange(n), skipped)


# -- choosing the decoder ---------------------------------------------------------------------


def test_auto_decodes_on_the_device_only_for_imagenet_on_a_gpu():
    assert resolve_decode("auto", "imagenet", torch.device("cuda", 0)) == "gpu"
    assert resolve_decode("auto", "imagenet", "cpu") == "cpu"
    assert resolve_decode("auto", "imagenet", None) == "cpu"
    assert resolve_decode("auto", "cifar", "cuda") == "cpu"
    assert resolve_decode("gpu", "imagenet", "cpu") == "gpu"
    assert resolve_decode("cpu", "imagenet", "cuda") == "cpu"
    with pytest.raises(DataError, match="data.decode=gpu decodes JPEGs for the imagenet recipe"):
        resolve_decode("gpu", "cifar", "cuda")
    with pytest.raises(DataError, match=r"data.decode='tpu': expected one of cpu, gpu, auto"):
        resolve_decode("tpu", "imagenet", "cpu")


def test_data_decode_is_a_config_key_checked_against_the_recipe():
    assert parse_config({}).data.decode == "cpu"
    assert parse_config({"data": {"decode": "auto", "recipe": "cifar"}}).data.decode == "auto"
    assert parse_config({"data": {"decode": "gpu", "recipe": "imagenet"}}).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode=gpu decodes JPEGs for the imagenet recipe"):
        parse_config({"data": {"decode": "gpu", "recipe": "cifar"}})
    with pytest.raises(ConfigError, match="data.decode"):
        parse_config({"data": {"decode": "nvjpeg"}})


# -- the batch transform: a fixed number of operations, the per-image result -------------------


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that compute something (views only relabel memory)."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _varied_batch(n, seed=0, crop=CROP):
    """``n`` noise JPEGs of 12..70 px a side with training crop boxes (some smaller than the crop:
    upscaled), every other one flipped, and lighting shifts that saturate some pixels."""
    rng, draw = np.random.default_rng(seed), random.Random(seed)
    jpegs, boxes = [], []
    for _ in range(n):
        width, height = int(rng.integers(12, 71)), int(rng.integers(12, 71))
        jpegs.append(encode(noise(rng, width, height), quality=92))
        boxes.append(jpeg_params(ImageNetTrain(crop=crop), width, height, draw)[0])
    lighting = rng.integers(-40, 41, (n, 3)).tolist()
    lighting[0] = [300, -300, 0]
    return _raw_batch(jpegs, boxes, [i % 2 == 1 for i in range(n)], lighting), jpegs, boxes


def _reference(jpegs, boxes, flips, lighting, crop=CROP):
    """The per-image path the batched transform replaced: crop, resize (float, antialiased,
    rounded), flip, saturating lighting, one image at a time."""
    out = []
    for data, (left, top, w, h), flip, shift in zip(jpegs, boxes, flips, lighting):
        full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        region = full[None, :, top:top + h, left:left + w].float()
        image = F.interpolate(region, size=(crop, crop), mode="bilinear", antialias=True,
                              align_corners=False)[0].round()
        image = image.flip(-1) if flip else image
        out.append((image + torch.tensor(shift, dtype=torch.float32)[:, None, None]).clamp(0, 255))
    return torch.stack(out)


class _CountedDecoder(DeviceDecoder):
    """A DeviceDecoder whose JPEG decode (one call per image on a CPU) is left out of the count."""

    counter = None

    def _decode(self, pieces, keys):
        self.counter.paused = True
        try:
            return super()._decode(pieces, keys)
        finally:
            self.counter.paused = False


def test_the_batch_transform_takes_as_many_operations_for_8_images_as_for_2():
    counts = {}
    for n in (2, 8):
        raw = _varied_batch(n)[0]
        decoder = _CountedDecoder(CROP, "cpu")
        with _OpCounter() as counter:
            decoder.counter = counter
            batch = decoder(raw)
        assert batch.images.shape == (n, 3, CROP, CROP)
        counts[n] = counter.count
    # 93 today, host-side bookkeeping included; the per-image path it replaced: 49 at 8 images, 1,029 at 256
    assert counts[2] == counts[8] < 120


def test_the_batch_transform_equals_the_per_image_path_within_one_level():
    raw, jpegs, boxes = _varied_batch(12, seed=3)
    assert any(w < CROP for _, _, w, _ in boxes) and any(w > 2 * CROP for _, _, w, _ in boxes)
    batch = DeviceDecoder(CROP, "cpu")(raw)
    expected = _reference(jpegs, boxes, raw.jpeg_flips.tolist(), raw.lighting.tolist())
    assert (batch.images.float() - expected).abs().max() <= 1
    assert batch.labels.tolist() == list(range(12))


def test_place_reads_chw_and_hwc_images_alike():
    raw, jpegs, boxes = _varied_batch(5, seed=4)
    hwc = [decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in jpegs]
    assert hwc[0].permute(1, 2, 0).is_contiguous()  # libjpeg's memory layout on a CPU
    chw = [image.contiguous() for image in hwc]  # nvJPEG's
    sizes = torch.tensor([image.shape[1:] for image in hwc])
    counts = sizes[:, 0] * sizes[:, 1] * 3
    geometry = torch.cat([(counts.cumsum(0) - counts)[:, None], sizes, torch.tensor(boxes),
                          raw.jpeg_flips[:, None].long()], dim=1)
    box_max = (max(b[3] for b in boxes), max(b[2] for b in boxes))
    expected = _reference(jpegs, boxes, raw.jpeg_flips.tolist(), [[0, 0, 0]] * 5)
    for images in (hwc, chw):
        assert (place(images, geometry, box_max, CROP).float() - expected).abs().max() <= 1


def test_a_batch_over_the_padding_budget_is_placed_in_groups_with_the_same_result(monkeypatch):
    raw, jpegs, boxes = _varied_batch(12, seed=3)
    monkeypatch.setattr(gpu, "PLACE_BUDGET", 3 * 40 * 40 * 3)  # three 40 px boxes a group
    groups = gpu.place_groups(list(range(12)), [list(b) for b in boxes])
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(12))
    assert all(len(g) == 1 or len(g) * 3 * max(boxes[i][3] for i in g) * max(boxes[i][2] for i in g)
               <= gpu.PLACE_BUDGET for g in groups)
    batch = DeviceDecoder(CROP, "cpu")(raw)
    expected = _reference(jpegs, boxes, raw.jpeg_flips.tolist(), raw.lighting.tolist())
    assert (batch.images.float() - expected).abs().max() <= 1
    assert batch.labels.tolist() == list(range(12))

"""Device decoding (data.decode: gpu) in its CPU form: the same batches as the CPU path, the same
exactly-once evaluation, the same skipped-sample accounting, and which samples go where."""

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
from PIL import Image
from torchvision.io import decode_jpeg

from ran.config import ConfigError, parse_config
from ran.data import DataError
from ran.data.gpu import (DeviceDecoder, DeviceLoader, RawBatch, device_jpeg_size, jpeg_params,
                          resolve_decode)
from ran.data.read import Batch, make_loader
from ran.data.transforms import CifarTrain, ImageNetEval, ImageNetTrain, random_resized_box

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


def load(path, decode, **kw):
    epoch = kw.pop("epoch", 0)
    kw = {"batch_size": 8, "recipe": "imagenet", "crop": CROP, "workers": 0, "seed": 5,
          "train": False, **kw}
    loader = make_loader(path, "train", decode=decode, **kw)
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return loader, batches


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("workers", [0, 2])
def test_device_batches_match_the_cpu_path(mixed, train, workers):
    cpu_loader, cpu = load(mixed, "cpu", train=train, workers=workers)
    dev_loader, dev = load(mixed, "gpu", train=train, workers=workers)

    assert isinstance(dev_loader, DeviceLoader) and not isinstance(cpu_loader, DeviceLoader)
    assert len(dev) == len(cpu) == len(dev_loader) == (5 if train else 6 + workers // 2)
    for c, d in zip(cpu, dev):
        assert isinstance(d, Batch)
        assert d.images.shape == c.images.shape and d.images.dtype == c.images.dtype == torch.uint8
        assert d.labels.dtype == torch.int64 and d.labels.tolist() == c.labels.tolist()
        assert d.skipped == c.skipped == 0
        # Same crop boxes, flips and lighting; resizing in float instead of uint8 rounds apart by 1 at most.
        assert (d.images.int() - c.images.int()).abs().max() <= 1
    labels = [label for b in dev for label in b.labels.tolist()]
    assert len(labels) == (40 if train else 44)


def test_a_second_epoch_draws_new_crops_as_the_cpu_path_does(mixed):
    first = load(mixed, "gpu", train=True)[1]
    second = load(mixed, "gpu", train=True, epoch=1)[1]
    cpu_second = load(mixed, "cpu", train=True, epoch=1)[1]
    assert [b.labels.tolist() for b in second] == [b.labels.tolist() for b in cpu_second]
    assert [b.labels.tolist() for b in first] != [b.labels.tolist() for b in second]


@pytest.mark.parametrize("world_size,workers", [(1, 2), (2, 0), (3, 2)])
def test_evaluation_reads_every_sample_once_across_ranks_and_workers(tmp_path, world_size, workers):
    # 37 samples, each its own class, so a label names its sample; 4 shards of 10 (the last 7).
    samples = jpeg_samples(34, 37, label_of=lambda i: i)
    samples += [(k, e, d, 34 + n) for n, (k, e, d, _) in enumerate(other_samples(37))]
    path = write_shards(tmp_path, samples, 10, 37)
    seen = []
    for rank in range(world_size):
        loader, batches = load(path, "gpu", batch_size=4, rank=rank, world_size=world_size,
                               workers=workers)
        mine = [label for b in batches for label in b.labels.tolist()]
        assert len(mine) == loader.num_samples
        assert sum(b.skipped for b in batches) == 0
        seen += mine
    assert sorted(seen) == list(range(37))


def test_broken_jpegs_and_a_png_are_skipped_and_counted_as_on_the_cpu_path(tmp_path, caplog):
    samples = jpeg_samples(12, 4)
    samples[3:3] = broken_samples()
    samples[8:8] = other_samples(4)[:1]  # the PNG
    path = write_shards(tmp_path, samples, 17, 4)
    _, cpu = load(path, "cpu", batch_size=5, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="ran.data"):
        _, dev = load(path, "gpu", batch_size=5, max_bad_fraction=0.5)

    labels = [label for b in dev for label in b.labels.tolist()]
    assert labels == [label for b in cpu for label in b.labels.tolist()]
    assert len(labels) == 13  # 12 JPEGs and the PNG
    assert sum(b.skipped for b in dev) == sum(b.skipped for b in cpu) == 2
    # The worker skips the JPEG with broken headers and fills its batch; the decoder finds the
    # other in its batch, which is one sample short.
    assert [len(b.labels) for b in cpu] == [5, 5, 3]
    assert [len(b.labels) for b in dev] == [4, 5, 4]
    assert any("sample cut-scan: corrupt JPEG (device decode)" in r.message for r in caplog.records)
    png_at = 8 - 2  # its position once the two broken samples are gone
    cpu_images = torch.cat([b.images for b in cpu])
    dev_images = torch.cat([b.images for b in dev])
    assert torch.equal(dev_images[png_at], cpu_images[png_at])  # decoded on the CPU either way


def test_device_decode_failures_count_towards_max_bad_fraction(tmp_path):
    samples = jpeg_samples(6, 2)
    samples.append(broken_samples()[1])
    path = write_shards(tmp_path, samples, 7, 2)
    with pytest.raises(DataError, match=r"1 of 7 samples unreadable on rank 0 \(workers and device "
                                        r"decode\), above max_bad_fraction=0.1"):
        load(path, "gpu", max_bad_fraction=0.1)
    assert sum(b.skipped for b in load(path, "gpu", max_bad_fraction=0.2)[1]) == 1


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
    loader = make_loader(path, "train", train=False, batch_size=4, recipe="imagenet", crop=CROP,
                         workers=1, decode="gpu", max_bad_fraction=0.5)
    with pytest.raises(DataError, match="8 of 8 samples unreadable"):
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
    train = ImageNetTrain(crop=CROP)
    for seed in range(20):
        rng, expected = random.Random(seed), random.Random(seed)
        box, flip = jpeg_params(train, 300, 200, rng)
        assert box == random_resized_box(300, 200, expected, train.scale, train.ratio)
        assert flip == (expected.random() < 0.5)
        assert rng.random() == expected.random()  # no extra draws
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

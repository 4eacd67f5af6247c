"""Reading shards: exactly-once evaluation, equal training epochs per rank, bad data, URLs."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import multiprocessing
import os
import tarfile
import threading
from collections import Counter

import pytest
import torch
from PIL import Image

from ran.data import DataError
from ran.data.read import Batch, eval_assignment, iter_tar, make_loader, read_manifest
from ran.data.write import build_shards

NUM_CLASSES = 3


def coded_png(index, label, size=16):
    """A PNG whose pixels spell out its sample index (R, G) and label (B)."""
    image = Image.new("RGB", (size, size), (index % 256, index // 256, label))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _png_id(data):
    r, g, _ = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
    return r + 256 * g


def decode_ids(batch):
    """Sample indices and labels encoded in a batch of coded PNGs (cifar eval keeps pixels)."""
    pixels = batch.images[:, :, 0, 0].long()
    return [int(r + 256 * g) for r, g in zip(pixels[:, 0], pixels[:, 1])], pixels[:, 2].tolist()


@pytest.fixture
def coded(tmp_path):
    """An image folder of 40 coded PNGs in 3 classes, built into shards; returns a builder."""
    src = tmp_path / "src"
    for index in range(40):
        label = index % NUM_CLASSES
        path = src / f"class{label}" / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(coded_png(index, label))

    def build(samples_per_shard, name="out"):
        out = tmp_path / name
        build_shards("imagefolder", str(src), str(out), samples_per_shard=samples_per_shard, workers=1,
                     progress=False)
        return str(out)

    return build


def eval_loader(path, **kw):
    kw.setdefault("workers", 0)
    return make_loader(path, "train", train=False, batch_size=kw.pop("batch_size", 8), recipe="cifar",
                       crop=16, **kw)


def test_eval_yields_every_sample_once_with_its_label(coded):
    path = coded(samples_per_shard=6)
    loader = eval_loader(path, workers=2)
    ids, labels, skipped, batches = [], [], 0, 0
    for batch in loader:
        assert isinstance(batch, Batch)
        assert batch.images.dtype == torch.uint8 and batch.labels.dtype == torch.int64
        batch_ids, pixel_labels = decode_ids(batch)
        ids += batch_ids
        labels += batch.labels.tolist()
        assert batch.labels.tolist() == pixel_labels
        skipped += batch.skipped
        batches += 1
    assert sorted(ids) == list(range(40))
    assert all(label == i % NUM_CLASSES for i, label in zip(ids, labels))
    assert skipped == 0
    assert batches == len(loader)
    assert loader.num_samples == 40 and loader.classes == ["class0", "class1", "class2"]


@pytest.mark.parametrize("samples_per_shard", [7, 15])  # 6 shards (>= 4 readers) and 3 shards (< 4)
def test_eval_split_over_two_ranks_and_two_workers_is_exact(coded, samples_per_shard):
    path = coded(samples_per_shard)
    seen = Counter()
    for rank in range(2):
        loader = eval_loader(path, rank=rank, world_size=2, workers=2, batch_size=4)
        rank_ids = [i for batch in loader for i in decode_ids(batch)[0]]
        assert len(rank_ids) == loader.num_samples
        seen.update(rank_ids)
    assert sorted(seen) == list(range(40))
    assert set(seen.values()) == {1}


def test_eval_assignment_covers_every_sample_once():
    for shards in (1, 3, 4, 9):
        for readers in (1, 2, 4, 8):
            counts = [5 + s for s in range(shards)]
            covered = Counter()
            for reader in range(readers):
                for shard, stride, offset in eval_assignment(shards, reader, readers):
                    covered.update((shard, i) for i in range(counts[shard]) if i % stride == offset)
            assert len(covered) == sum(counts) and set(covered.values()) == {1}


def test_train_gives_every_rank_the_same_number_of_full_batches(coded):
    path = coded(samples_per_shard=9)  # uneven shards: 9, 9, 9, 9, 4
    per_rank = []
    for rank in range(2):
        loader = make_loader(path, "train", train=True, batch_size=6, recipe="cifar", crop=16, rank=rank,
                             world_size=2, workers=2)
        assert len(loader) == 40 // (6 * 2)
        batches = list(loader)
        assert all(b.images.shape == (6, 3, 16, 16) for b in batches)
        per_rank.append(len(batches))
    assert per_rank == [3, 3]


def test_set_epoch_reshuffles_deterministically(coded):
    path = coded(samples_per_shard=10)
    loader = make_loader(path, "train", train=True, batch_size=4, recipe="cifar", crop=16, workers=2,
                         shuffle_buffer=8, seed=5)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append([tuple(b.labels.tolist()) + tuple(b.images[:, 0, 8, 8].tolist()) for b in loader])
    assert orders[0] == orders[2]
    assert orders[0] != orders[1]


def test_imagenet_recipe_crops_jpegs_to_the_requested_size(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        path = src / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (90 + 10 * i, 60), (200, 30 * i, 10)).save(path, quality=90)
    build_shards("imagefolder", str(src), str(tmp_path / "out"), workers=1, progress=False)
    train = make_loader(str(tmp_path / "out"), "train", train=True, batch_size=3, recipe="imagenet",
                        crop=24, workers=0)
    evaluate = make_loader(str(tmp_path / "out"), "train", train=False, batch_size=4, recipe="imagenet",
                           crop=24, workers=0)
    assert [b.images.shape for b in train] == [(3, 3, 24, 24)] * 2
    assert [b.images.shape for b in evaluate] == [(4, 3, 24, 24), (2, 3, 24, 24)]
    red = next(iter(evaluate)).images[:, 0].float().mean()
    assert abs(red - 200) < 8  # eval has no colour augmentation


# -- bad data -------------------------------------------------------------------------------


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, ext, data, label in samples:
            add_member(tar, f"{key}.{ext}", data)
            add_member(tar, f"{key}.cls", str(label).encode())


def add_shard_to_manifest(out, name, split, samples):
    manifest_path = os.path.join(out, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["splits"][split]["shards"].append({"name": name, "samples": samples})
    manifest["splits"][split]["total"] += samples
    json.dump(manifest, open(manifest_path, "w"))


@pytest.fixture
def damaged(coded):
    """40 good samples in 4 shards + a shard with a corrupt JPEG and an out-of-range label + one
    shard cut in half (5 of 10 samples lost)."""
    path = coded(samples_per_shard=10)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(jpeg, format="JPEG")
    bad = [("bad/corrupt", "jpg", jpeg.getvalue()[:60], 0),
           ("bad/label", "png", coded_png(100, 0), NUM_CLASSES + 4),
           ("bad/fine", "png", coded_png(101, 1), 1)]
    write_shard(os.path.join(path, "extra-000000.tar"), bad)
    add_shard_to_manifest(path, "extra-000000.tar", "train", 3)
    shard = os.path.join(path, "train-000001.tar")
    with tarfile.open(shard) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    with open(shard, "r+b") as f:
        f.truncate(offsets[11] + 700)  # sample 5's image header plus part of its data
    return path


def test_corrupt_truncated_and_out_of_range_are_skipped_and_counted(damaged):
    loader = eval_loader(damaged, workers=2, max_bad_fraction=0.5)
    ids, skipped = [], 0
    for batch in loader:
        ids += decode_ids(batch)[0]
        skipped += batch.skipped
    assert len(ids) == 41 - 5  # 40 coded + 1 fine sample, minus 5 lost to the cut
    assert len(set(ids)) == len(ids) and 101 in ids
    assert skipped == 2 + 5
    assert len(ids) + skipped == 43  # everything in the manifest is accounted for


def test_training_counts_skipped_samples(damaged):
    loader = make_loader(damaged, "train", train=True, batch_size=4, recipe="cifar", crop=16, workers=0,
                         shuffle_buffer=4, max_bad_fraction=0.5)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 43 // 4
    # Seeded resampling draws the corrupt, out-of-range and cut samples 15 times in this epoch.
    assert sum(b.skipped for b in batches) == 15
    assert all(len(b.labels) == 4 and int(b.labels.max()) < NUM_CLASSES for b in batches)


def test_too_many_bad_samples_is_a_clear_error(damaged):
    loader = eval_loader(damaged, workers=2, max_bad_fraction=0.01)
    with pytest.raises(DataError, match=r"samples unreadable in rank 0 loader worker \d, above "
                                        r"max_bad_fraction=0.01") as info:
        list(loader)
    assert "\n" not in str(info.value)


def test_a_missing_shard_is_skipped_at_once_with_a_warning(coded, caplog):
    path = coded(samples_per_shard=10)
    os.remove(os.path.join(path, "train-000002.tar"))
    loader = eval_loader(path, max_bad_fraction=0.5)
    loader.dataset.retry_delays = (60.0,)  # a retry would hang the test: a missing file stays missing
    with caplog.at_level(logging.WARNING, logger="ran.data"):
        batches = list(loader)
    assert sum(len(b.labels) for b in batches) == 30
    assert sum(b.skipped for b in batches) == 10
    assert any("train-000002.tar unreachable (FileNotFoundError" in r.message for r in caplog.records)


# -- manifests and URLs ----------------------------------------------------------------------


def test_missing_manifest_and_split_are_clear_errors(coded, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(tmp_path / "nowhere"))
    path = coded(samples_per_shard=50)
    with pytest.raises(DataError, match="no split 'val'"):
        make_loader(path, "val", train=False, batch_size=4, recipe="cifar")
    with pytest.raises(DataError, match="unknown recipe"):
        make_loader(path, "train", train=False, batch_size=4, recipe="mnist")
    with pytest.raises(DataError, match="fewer than one batch"):
        make_loader(path, "train", train=True, batch_size=64, recipe="cifar")


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_reads_shards_over_http(coded, http_root):
    coded(samples_per_shard=16, name="served")
    url = f"{http_root}/served"
    assert read_manifest(url)["splits"]["train"]["total"] == 40
    ids = [i for batch in eval_loader(url, workers=0) for i in decode_ids(batch)[0]]
    assert sorted(ids) == list(range(40))


def test_http_shards_are_retried_in_one_layer_then_skipped(coded, tmp_path, caplog):
    coded(samples_per_shard=10, name="flaky")
    busy = {"/flaky/train-000001.tar": 2, "/flaky/train-000002.tar": 99}  # 503s left to answer
    tries: dict[str, int] = {}

    class Flaky(_QuietHandler):
        def do_GET(self):
            tries[self.path] = tries.get(self.path, 0) + 1
            if busy.get(self.path, 0):
                busy[self.path] -= 1
                self.send_error(503, "Slow Down")
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Flaky, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        loader = eval_loader(f"http://127.0.0.1:{server.server_address[1]}/flaky", max_bad_fraction=0.5)
        loader.dataset.retry_delays = (0.01, 0.01, 0.01)
        with caplog.at_level(logging.WARNING, logger="ran.data"):
            batches = list(loader)
    finally:
        server.shutdown()
        server.server_close()
    ids = sorted(i for b in batches for i in decode_ids(b)[0])
    with open(tmp_path / "flaky" / "train-000002.tar", "rb") as stream:  # shard 2's samples
        lost = {_png_id(sample["png"]) for _, sample in iter_tar(stream)}
    assert len(lost) == 10
    assert ids == sorted(set(range(40)) - lost)  # shard 1 read after two 503s, shard 2 never
    assert sum(b.skipped for b in batches) == 10
    assert tries["/flaky/train-000001.tar"] == 3 and tries["/flaky/train-000002.tar"] == 4
    assert any("train-000002.tar unreachable (OSError" in r.message and "HTTP 503" in r.message
               and "after 4 attempts" in r.message for r in caplog.records)


def test_training_with_no_readable_shard_fails_clearly(coded):
    path = coded(samples_per_shard=20)
    for name in ("train-000000.tar", "train-000001.tar"):
        os.remove(os.path.join(path, name))
    loader = make_loader(path, "train", train=True, batch_size=4, recipe="cifar", crop=16, workers=0)
    loader.dataset.retry_delays = (0.01,)
    # Seeded: shard 0 is tried first, then shard 1, whose error is the last problem reported.
    with pytest.raises(DataError, match=r"^rank 0 loader worker 0: no readable shards left \(last "
                                        r"problem: shard \S+/train-000001.tar unreachable "
                                        r"\(FileNotFoundError"):
        list(loader)


def test_the_main_process_does_no_per_sample_work(coded, monkeypatch):
    """Decode, crop, flip, lighting and batch assembly happen in the loader workers: counted per
    process (forked workers inherit the counting wrappers), the main process makes no such call."""
    from ran.data import read, transforms

    main = os.getpid()
    in_workers = multiprocessing.get_context("fork").Value("l", 0)
    in_main: list[str] = []

    def counted(name, fn):
        def call(*args, **kwargs):
            if os.getpid() == main:
                in_main.append(name)
            else:
                with in_workers.get_lock():
                    in_workers.value += 1
            return fn(*args, **kwargs)
        return call

    for owner, name in ((read, "parse_sample"), (transforms, "decode_region"),
                        (transforms, "add_saturating")):
        monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
    for cls, name in ((transforms.ImageNetTrain, "sample"), (transforms.ImageNetTrain, "lighting_offsets"),
                      (read.PixelCollector, "add"), (read.PixelCollector, "finish")):
        monkeypatch.setattr(cls, name, counted(f"{cls.__name__}.{name}", getattr(cls, name)))
    path = coded(samples_per_shard=10)
    loader = make_loader(path, "train", train=True, batch_size=4, recipe="imagenet", crop=16,
                         workers=2, pin_memory=False)
    loader.set_epoch(0)
    batches = list(loader)
    loader.close()
    assert len(batches) == 10 and all(b.images.shape == (4, 3, 16, 16) for b in batches)
    assert in_main == []
    # per sample: parse, add, sample, decode_region, lighting draw; per batch: finish, lighting
    assert in_workers.value >= 40 * 5 + 10 * 2

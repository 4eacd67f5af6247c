"""Building shards: image folders, ImageNet layouts, CIFAR pickles, resumable builds, bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ran.data import DataError
from ran.data import write
from ran.data.write import build_shards


def save_image(path, colour, size=(12, 10), fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def image_folder(root, classes=("cat", "dog", "eel"), per_class=5):
    """root/<class>/<i>.{png,jpg}; returns {relative path: label}."""
    truth = {}
    for label, name in enumerate(classes):
        for i in range(per_class):
            ext = ".png" if i % 2 else ".jpg"
            rel = f"{name}/img.{i}{ext}"  # a dot in the stem: keys must not keep it
            save_image(os.path.join(root, rel), (40 * label, 20 * i, 99))
            truth[rel] = label
    return truth


def tar_samples(path):
    """{key: {ext: bytes}} of a shard read with the standard library only."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out, split):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    merged = {}
    for shard in manifest["splits"][split]["shards"]:
        merged.update(tar_samples(os.path.join(out, shard["name"])))
    return merged


def test_image_folder_round_trip_keeps_bytes_and_labels(tmp_path):
    truth = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=4,
                            workers=2, progress=False)

    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["num_classes"] == 3
    shards = manifest["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["samples"] for s in shards] == [4, 4, 4, 3]
    assert manifest["splits"]["train"]["total"] == 15
    samples = all_samples(out, "train")
    assert len(samples) == 15
    for rel, label in truth.items():
        key = rel.rsplit(".", 1)[0].replace("img.", "img_")
        ext = "png" if rel.endswith(".png") else "jpg"
        assert samples[key][ext] == (tmp_path / "src" / rel).read_bytes()
        assert samples[key]["cls"] == str(label).encode()


def test_plain_webdataset_reads_the_shards(tmp_path):
    image_folder(tmp_path / "src")
    build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=8,
                 workers=1, progress=False)
    urls = str(tmp_path / "out" / "train-{000000..000001}.tar")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls")
    items = list(dataset)
    assert len(items) == 15
    assert all(isinstance(image, Image.Image) and label in (0, 1, 2) for image, label in items)


def test_shuffle_is_seeded_and_mixes_classes(tmp_path):
    image_folder(tmp_path / "src", per_class=6)
    keys = []
    for run, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"out{run}"
        build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=100, seed=seed,
                     workers=1, progress=False)
        with tarfile.open(out / "train-000000.tar") as tar:
            keys.append([m.name for m in tar.getmembers() if m.name.endswith(".cls")])
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]
    first_six = {k.split("/")[0] for k in keys[0][:6]}
    assert len(first_six) > 1  # not class after class


def test_train_and_val_subfolders_give_two_splits(tmp_path):
    image_folder(tmp_path / "src" / "train", per_class=3)
    image_folder(tmp_path / "src" / "val", classes=("cat", "eel"), per_class=2)
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), workers=1,
                            progress=False)
    assert manifest["classes"] == ["cat", "dog", "eel"]
    assert manifest["splits"]["train"]["total"] == 9
    assert manifest["splits"]["val"]["total"] == 4
    labels = {k: int(v["cls"]) for k, v in all_samples(tmp_path / "out", "val").items()}
    assert {k.split("/")[0]: l for k, l in labels.items()} == {"cat": 0, "eel": 2}


def test_val_fraction_is_stratified_and_seeded(tmp_path):
    image_folder(tmp_path / "src", per_class=10)
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"),
                            val_fraction=0.2, seed=3, workers=1, progress=False)
    assert manifest["splits"]["train"]["total"] == 24
    assert manifest["splits"]["val"]["total"] == 6
    val = all_samples(tmp_path / "out", "val")
    assert sorted(int(s["cls"]) for s in val.values()) == [0, 0, 1, 1, 2, 2]
    assert not set(val) & set(all_samples(tmp_path / "out", "train"))


def wnid(i):
    return f"n{1440764 + i:08d}"


def imagenet_train(root, classes=3, per_class=3):
    for c in range(classes):
        for i in range(per_class):
            save_image(os.path.join(root, "train", wnid(c), f"{wnid(c)}_{i}.JPEG"), (60 * c, 0, 0), fmt="JPEG")


def labels_by_key(out, split):
    return {k: int(s["cls"]) for k, s in all_samples(out, split).items()}


def test_imagenet_with_val_class_folders(tmp_path):
    # wnids created out of order: the class index must still follow sorted order
    imagenet_train(tmp_path / "in", classes=3)
    for c in (2, 0):
        save_image(tmp_path / "in" / "val" / wnid(c) / f"ILSVRC2012_val_{c}.JPEG", (1, 2, 3), fmt="JPEG")
    manifest = build_shards("imagenet", str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["dataset"] == "imagenet"
    assert manifest["classes"] == [wnid(0), wnid(1), wnid(2)]
    assert manifest["splits"]["train"]["total"] == 9
    train = labels_by_key(tmp_path / "out", "train")
    assert all(label == int(key.split("/")[0][1:]) - 1440764 for key, label in train.items())
    assert labels_by_key(tmp_path / "out", "val") == {f"{wnid(0)}/ILSVRC2012_val_0": 0,
                                                      f"{wnid(2)}/ILSVRC2012_val_2": 2}


def test_imagenet_flat_val_with_kaggle_solution_csv(tmp_path):
    kaggle = tmp_path / "kaggle"
    data = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    imagenet_train(data, classes=3)
    truth = {"ILSVRC2012_val_00000001": 2, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 1}
    rows = ["ImageId,PredictionString"]
    for image_id, label in truth.items():
        save_image(data / "val" / f"{image_id}.JPEG", (9, 9, 9), fmt="JPEG")
        rows.append(f"{image_id},{wnid(label)} 1 2 30 40 {wnid(label)} 5 6 70 80")
    save_image(data / "val" / "ILSVRC2012_val_00000004.JPEG", (9, 9, 9), fmt="JPEG")  # not in the CSV
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")

    manifest = build_shards("imagenet", str(kaggle), str(tmp_path / "out"), workers=1, progress=False)
    assert labels_by_key(tmp_path / "out", "val") == truth
    assert [s["reason"] for s in manifest["skipped"]] == ["no label in LOC_val_solution.csv"]


def test_imagenet_flat_val_without_csv_is_a_clear_error(tmp_path):
    imagenet_train(tmp_path / "in")
    save_image(tmp_path / "in" / "val" / "ILSVRC2012_val_00000001.JPEG", (9, 9, 9), fmt="JPEG")
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        build_shards("imagenet", str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)


def cifar_batch(rng, n, label_key, num_classes):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(x) for x in rng.integers(0, num_classes, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_pickles_become_png_shards(tmp_path, variant):
    rng = np.random.default_rng(0)
    if variant == "cifar10":
        folder, names, label_key = tmp_path / "cifar-10-batches-py", [f"c{i}" for i in range(10)], b"labels"
        folder.mkdir()
        train = [cifar_batch(rng, 3, label_key, 10) for _ in range(5)]
        for i, batch in enumerate(train):
            dump(folder / f"data_batch_{i + 1}", batch)
        dump(folder / "test_batch", test := cifar_batch(rng, 4, label_key, 10))
        dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names]})
    else:
        folder, names, label_key = tmp_path / "cifar-100-python", [f"f{i}" for i in range(100)], b"fine_labels"
        folder.mkdir()
        train = [cifar_batch(rng, 15, label_key, 100)]
        dump(folder / "train", train[0])
        dump(folder / "test", test := cifar_batch(rng, 4, label_key, 100))
        dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names]})

    manifest = build_shards(variant, str(tmp_path), str(tmp_path / "out"), samples_per_shard=6,
                            workers=1, progress=False)
    assert manifest["classes"] == names
    assert manifest["splits"]["train"]["total"] == 15
    assert manifest["splits"]["val"]["total"] == 4
    train_samples = all_samples(tmp_path / "out", "train")
    rows = np.concatenate([b[b"data"] for b in train])
    labels = [label for b in train for label in b[label_key]]
    for index in (0, 7, 14):
        sample = train_samples[f"{index:06d}"]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert np.array_equal(pixels, rows[index].reshape(3, 32, 32).transpose(1, 2, 0))
        assert int(sample["cls"]) == labels[index]
    val = all_samples(tmp_path / "out", "val")
    assert sorted(int(s["cls"]) for s in val.values()) == sorted(test[label_key])


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    image_folder(tmp_path / "src", per_class=3)
    good = (tmp_path / "src" / "cat" / "img.0.jpg").read_bytes()
    (tmp_path / "src" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "src" / "dog" / "notes.jpg").write_bytes(b"not an image at all")
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), workers=1,
                            progress=False)
    assert manifest["splits"]["train"]["total"] == 9
    reasons = {os.path.basename(s["path"]): s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"truncated.jpg", "notes.jpg"}
    assert all(r.startswith("cannot decode") for r in reasons.values())


def test_max_size_reencodes_large_images_only(tmp_path):
    save_image(tmp_path / "src" / "a" / "big.png", (200, 10, 10), size=(300, 200))
    save_image(tmp_path / "src" / "a" / "small.jpg", (10, 200, 10), size=(40, 30))
    build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), max_size=64, workers=1,
                 progress=False)
    samples = all_samples(tmp_path / "out", "train")
    big = Image.open(io.BytesIO(samples["a/big"]["jpg"]))
    assert (big.format, big.size) == ("JPEG", (64, 43))
    assert samples["a/small"]["jpg"] == (tmp_path / "src" / "a" / "small.jpg").read_bytes()


def mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_rebuild_skips_complete_shards(tmp_path):
    image_folder(tmp_path / "src")
    out = tmp_path / "out"
    first = build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=5, workers=1,
                         progress=False)
    before = mtimes(out)
    (out / "train-000001.tar").unlink()
    second = build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=5, workers=1,
                          progress=False)
    after = mtimes(out)
    assert set(after) == set(before)
    assert {n for n in after if after[n] != before[n]} == {"train-000001.tar"}
    assert second["splits"] == first["splits"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_changed_source_rewrites_the_affected_shard(tmp_path):
    image_folder(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=100, workers=1, progress=False)
    before = mtimes(out)
    save_image(tmp_path / "src" / "cat" / "new.png", (1, 1, 1))
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=100,
                            workers=1, progress=False)
    assert manifest["splits"]["train"]["total"] == 7
    assert mtimes(out)["train-000000.tar"] != before["train-000000.tar"]


def test_crashed_build_leaves_no_manifest_and_resumes(tmp_path, monkeypatch):
    image_folder(tmp_path / "src")
    out = tmp_path / "out"
    build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=5, workers=1, progress=False)
    assert (out / "manifest.json").exists()
    (out / "train-000002.tar").unlink()  # this one must be rewritten: make that crash
    real_write_shard = write.write_shard

    def crash_on_third(task):
        if task.name == "train-000002.tar":
            raise OSError("disk full")
        return real_write_shard(task)

    monkeypatch.setattr(write, "write_shard", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=5, workers=1,
                     progress=False)
    assert not (out / "manifest.json").exists()  # the old manifest would describe a missing shard

    monkeypatch.setattr(write, "write_shard", real_write_shard)
    manifest = build_shards("imagefolder", str(tmp_path / "src"), str(out), samples_per_shard=5, workers=1,
                            progress=False)
    assert json.load(open(out / "manifest.json")) == manifest
    assert (out / "train-000002.tar").exists()


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        build_shards("imagefolder", str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)


def test_unknown_layout_is_a_clear_error(tmp_path):
    save_image(tmp_path / "src" / "loose.jpg", (1, 1, 1))
    with pytest.raises(DataError, match="unknown layout"):
        build_shards("imagenet", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="unknown layout"):
        build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="unknown layout"):
        build_shards("cifar10", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match="unknown source"):
        build_shards("mnist", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)


def test_unwritable_destination_is_a_clear_error(tmp_path):
    image_folder(tmp_path / "src", per_class=1)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(DataError, match="cannot write to"):
        build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "file" / "out"), progress=False)

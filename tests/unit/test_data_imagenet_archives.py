"""ILSVRC-2012 as image-net.org hands it out: the train tar of per-class tars, the flat val tar and
the devkit, built in place (never unpacked) with the same class indices as the extracted folders."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ran.data import DataError
from ran.data.read import verify_shards
from ran.data.write import build_shards

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # sorted: class index = position
# meta.mat's ILSVRC2012_IDs follow WordNet, not sorted wnids: ID 1 is the last wnid here.
ID_OF = {"n01484850": 1, "n01491361": 2, "n01440764": 3, "n01443537": 4}
VAL_IDS = [4, 1, 3, 3, 2, 1, 4]  # ground truth: line i = ILSVRC2012_ID of ILSVRC2012_val_0000000i
PER_CLASS = 3


def jpeg(colour, size=(24, 16)):
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


def train_images():
    """{wnid: {file name: bytes}}, a different colour per image."""
    return {wnid: {f"{wnid}_{i}.JPEG": jpeg((60 * c, 40 * i, 200 - 50 * c)) for i in range(PER_CLASS)}
            for c, wnid in enumerate(WNIDS)}


def val_images():
    return {f"ILSVRC2012_val_{n:08d}.JPEG": jpeg((30 * n, 255 - 30 * n, 90)) for n in range(1, len(VAL_IDS) + 1)}


def tar_bytes(files, gz=False):
    """An in-memory tar of {name: bytes} (members in the given order)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def meta_mat():
    """The devkit's meta.mat: a synsets struct array with the leaves (num_children 0) and a parent."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(ID_OF[w], w, f"words {w}", "gloss", 0, np.zeros((1, 0)), 0, PER_CLASS)
            for w in sorted(WNIDS, key=ID_OF.get)]
    rows.append((5, "n01440000", "fish", "gloss", 4, np.array([1, 2, 3, 4]), 1, 0))  # not a leaf
    synsets = np.array(rows, dtype=[(f, "O") for f in fields]).reshape(-1, 1)
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def devkit_files(ids=VAL_IDS):
    return {"ILSVRC2012_devkit_t12/data/meta.mat": meta_mat(),
            "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                "".join(f"{i}\n" for i in ids).encode()}


def official_download(root, ids=VAL_IDS):
    """root/ILSVRC2012_img_train.tar (a tar of <wnid>.tar, not in sorted order),
    ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz, as image-net.org serves them."""
    root.mkdir(parents=True)
    images = train_images()
    class_tars = {f"{wnid}.tar": tar_bytes(images[wnid]) for wnid in reversed(WNIDS)}
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(class_tars))
    (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(val_images()))
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(devkit_files(ids), gz=True))
    return root


def extracted(root, val="folders"):
    """The same images extracted: train/<wnid>/, and val/<wnid>/ (as torchvision prepares it) or
    flat val/ with the devkit unpacked beside it."""
    for wnid, files in train_images().items():
        (root / "train" / wnid).mkdir(parents=True)
        for name, data in files.items():
            (root / "train" / wnid / name).write_bytes(data)
    wnid_of = {i: w for w, i in ID_OF.items()}
    for n, (name, data) in enumerate(val_images().items()):
        folder = root / "val" / (wnid_of[VAL_IDS[n]] if val == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if val == "flat":
        for name, data in devkit_files().items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return root


def samples(out, split):
    """{key: {ext: bytes}} of a split, read with the standard library."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def expected_val_labels():
    """ILSVRC2012_val_<n> -> class index, from the ground truth through meta.mat's ID -> wnid."""
    wnid_of = {i: w for w, i in ID_OF.items()}
    return {f"ILSVRC2012_val_{n:08d}": WNIDS.index(wnid_of[i]) for n, i in enumerate(VAL_IDS, 1)}


@pytest.fixture
def no_extraction(monkeypatch):
    """Fail if anything unpacks an archive to disk."""
    def refuse(*args, **kwargs):
        raise AssertionError("an archive was extracted to disk")

    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)


def test_official_archives_build_with_ground_truth_val_labels(tmp_path, no_extraction):
    src = official_download(tmp_path / "download")
    before = sorted(os.listdir(src))
    manifest = build_shards("imagenet", str(src), str(tmp_path / "out"), samples_per_shard=5, workers=2,
                            progress=False)
    assert sorted(os.listdir(src)) == before  # nothing unpacked beside the archives
    assert manifest["classes"] == WNIDS
    assert manifest["skipped"] == []
    assert manifest["splits"]["train"]["total"] == len(WNIDS) * PER_CLASS
    val = samples(tmp_path / "out", "val")
    assert {key: int(s["cls"]) for key, s in val.items()} == expected_val_labels()
    assert {key: s["jpg"] for key, s in val.items()} == {k[:-5]: v for k, v in val_images().items()}
    train = samples(tmp_path / "out", "train")
    images = train_images()
    assert {key: int(s["cls"]) for key, s in train.items()} == {
        f"{w}/{name[:-5]}": WNIDS.index(w) for w in WNIDS for name in images[w]}
    assert all(s["jpg"] == images[key.split("/")[0]][key.split("/")[1] + ".JPEG"] for key, s in train.items())
    assert verify_shards(str(tmp_path / "out"), workers=1, progress=False, out=io.StringIO())


@pytest.mark.parametrize("val", ["folders", "flat"])
def test_archives_and_extracted_folders_give_the_same_shards(tmp_path, val):
    build_shards("imagenet", str(official_download(tmp_path / "download")), str(tmp_path / "a"),
                 samples_per_shard=4, workers=1, progress=False)
    build_shards("imagenet", str(extracted(tmp_path / "extracted", val)), str(tmp_path / "b"),
                 samples_per_shard=4, workers=1, progress=False)
    manifests = [json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("a", "b")]
    assert manifests[0]["classes"] == manifests[1]["classes"] == WNIDS
    assert manifests[0]["splits"] == manifests[1]["splits"]  # same plan: same shards, same counts
    assert samples(tmp_path / "a", "train") == samples(tmp_path / "b", "train")
    by_image = [{key.rsplit("/", 1)[-1]: s for key, s in samples(tmp_path / out, "val").items()}
                for out in ("a", "b")]
    assert by_image[0] == by_image[1]
    assert {k: int(s["cls"]) for k, s in by_image[1].items()} == expected_val_labels()


def test_per_class_tars_in_train_folder(tmp_path):
    """train/<wnid>.tar, as left by `tar xf ILSVRC2012_img_train.tar -C train`; an unfinished
    extraction folder beside its tar is not read (the tar is)."""
    src = extracted(tmp_path / "in")
    images = train_images()
    for wnid in WNIDS[:2]:
        (src / "train" / f"{wnid}.tar").write_bytes(tar_bytes(images[wnid]))
    (src / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()  # half-extracted folder
    shutil.rmtree(src / "train" / WNIDS[1])  # not extracted yet
    manifest = build_shards("imagenet", str(src), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["classes"] == WNIDS
    assert manifest["splits"]["train"]["total"] == len(WNIDS) * PER_CLASS
    assert [(os.path.basename(s["path"]), s["reason"]) for s in manifest["skipped"]] == [
        (WNIDS[0], f"folder not read: {WNIDS[0]}.tar beside it is")]
    assert samples(tmp_path / "out", "train")[f"{WNIDS[0]}/{WNIDS[0]}_0"]["jpg"] == images[WNIDS[0]][f"{WNIDS[0]}_0.JPEG"]


def test_bad_members_are_listed_and_the_rest_builds(tmp_path):
    src = tmp_path / "download"
    src.mkdir()
    images = train_images()
    class_tars = {f"{w}.tar": tar_bytes(images[w]) for w in WNIDS}
    class_tars[f"{WNIDS[1]}.tar"] = tar_bytes({**images[WNIDS[1]], "notes.txt": b"hello", "empty.JPEG": b"",
                                              "cut.JPEG": jpeg((1, 2, 3))[:200]})
    class_tars[f"{WNIDS[2]}.tar"] = b"this is not a tar archive" * 40
    class_tars["README"] = b"readme"
    (src / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(class_tars))
    manifest = build_shards("imagenet", str(src), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["classes"] == WNIDS  # a class whose tar is broken keeps its index
    assert manifest["splits"]["train"]["total"] == 3 * PER_CLASS
    assert "val" not in manifest["splits"]
    archive = str(src / "ILSVRC2012_img_train.tar")
    assert sorted((s["path"], s["reason"].split(":")[0]) for s in manifest["skipped"]) == sorted([
        (f"{archive}:README", "not a per-class <wnid>.tar"),
        (f"{archive}:{WNIDS[1]}.tar:notes.txt", "unsupported format (.txt)"),
        (f"{archive}:{WNIDS[1]}.tar:empty.JPEG", "empty file"),
        (f"{archive}:{WNIDS[1]}.tar:cut.JPEG", "cannot decode"),
        (f"{archive}:{WNIDS[2]}.tar", "unreadable class archive"),
    ])


def test_val_archive_without_labels_says_what_to_add(tmp_path):
    src = official_download(tmp_path / "download")
    (src / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(DataError, match="ILSVRC2012_devkit_t12.tar.gz .image-net.org. or LOC_val_solution.csv"):
        build_shards("imagenet", str(src), str(tmp_path / "out"), workers=1, progress=False)


def test_devkit_ids_outside_meta_mat_are_a_clear_error(tmp_path):
    src = official_download(tmp_path / "download", ids=VAL_IDS[:-1] + [5])  # 5 is not a leaf
    with pytest.raises(DataError, match=r"ILSVRC2012_IDs \[5\] are not leaf synsets of meta.mat"):
        build_shards("imagenet", str(src), str(tmp_path / "out"), workers=1, progress=False)


def test_a_compressed_train_archive_is_refused_with_what_to_do(tmp_path):
    src = tmp_path / "download"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(
        tar_bytes({f"{w}.tar": tar_bytes(train_images()[w]) for w in WNIDS}, gz=True))
    with pytest.raises(DataError, match="cannot read as an uncompressed tar"):
        build_shards("imagenet", str(src), str(tmp_path / "out"), workers=1, progress=False)

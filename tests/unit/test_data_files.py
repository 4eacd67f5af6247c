"""Every file under a class folder is either a sample or listed in ``skipped`` with its reason; no
single file (format, name, type) can abort a build."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ran.data.read import verify_shards
from ran.data.transforms import decode_full
from ran.data.write import build_shards


def save(path, image, fmt=None, **params):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt, **params)


def shard_samples(out):
    """{key: {ext: bytes}} of every shard of every split, read with the standard library."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def noise(size=(20, 12), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_tiff_and_gif_files_are_samples_stored_losslessly(tmp_path):
    src = tmp_path / "src"
    images = {"a/1.jpg": noise(seed=1), "a/2.tif": noise(seed=2), "b/3.jpg": noise(seed=3),
              "b/4.tiff": noise(seed=4), "b/5.gif": noise(seed=5).quantize(64)}
    for rel, image in images.items():
        save(src / rel, image)
    manifest = build_shards("imagefolder", str(src), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["splits"]["train"]["total"] == 5
    assert manifest["skipped"] == []
    stored = shard_samples(tmp_path / "out")
    assert {k: sorted(v) for k, v in stored.items()} == {
        "a/1": ["cls", "jpg"], "a/2": ["cls", "png"], "b/3": ["cls", "jpg"], "b/4": ["cls", "png"],
        "b/5": ["cls", "png"]}
    for rel in ("a/2.tif", "b/4.tiff", "b/5.gif"):  # re-encoded as PNG, pixel for pixel
        png = stored[rel.rsplit(".", 1)[0]]["png"]
        source = decode_full((src / rel).read_bytes())
        assert decode_full(png).equal(source)
        assert decode_full(png).permute(1, 2, 0).numpy().tolist() == np.asarray(images[rel].convert("RGB")).tolist()


def test_every_other_file_is_listed_with_its_reason(tmp_path):
    src = tmp_path / "src"
    save(src / "a" / "good.jpg", noise())
    save(src / "a" / "deeper" / "good.png", noise())
    save(src / "b" / "good.bmp", noise())
    save(src / "b" / ".cache" / "thumb.jpg", noise())  # hidden folder
    save(src / "loose.jpg", noise())  # beside the class folders, in none
    (src / "a" / "notes.txt").write_text("not an image")
    (src / "a" / "README").write_text("no extension")
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "a" / "text.jpg").write_text("a text file named .jpg")
    (src / "b" / "cut.png").write_bytes((src / "a" / "deeper" / "good.png").read_bytes()[:60])
    os.symlink(src / "nowhere.jpg", src / "b" / "dangling.jpg")
    os.mkfifo(src / "b" / "pipe.jpg")  # opening it would block the build forever
    os.mkdir(src / "b" / "folder.jpg")  # a folder named like an image: scanned as a folder
    save(src / "b" / "folder.jpg" / "inner.webp", noise(), lossless=True)

    manifest = build_shards("imagefolder", str(src), str(tmp_path / "out"), workers=1, progress=False)
    assert sorted(shard_samples(tmp_path / "out")) == ["a/deeper/good", "a/good", "b/folder_jpg/inner", "b/good"]
    reasons = {os.path.relpath(s["path"], src): s["reason"] for s in manifest["skipped"]}
    assert {rel: reason.split(":")[0] for rel, reason in reasons.items()} == {
        "loose.jpg": "not in a class folder",
        "a/notes.txt": "unsupported format (.txt)",
        "a/README": "unsupported format (no extension)",
        "a/empty.png": "empty file",
        "a/text.jpg": "cannot decode",
        "b/.cache": "hidden folder",
        "b/cut.png": "cannot decode",
        "b/dangling.jpg": "unreadable",
        "b/pipe.jpg": "not a regular file",
    }
    assert reasons["a/text.jpg"] == "cannot decode: not a recognised image format"
    assert all(s["split"] == "train" for s in manifest["skipped"])


def test_a_file_name_that_is_not_utf8_builds_under_an_escaped_key(tmp_path):
    src = tmp_path / "src"
    save(src / "a" / "ok.jpg", noise(seed=1))
    save(src / "b" / "ok.jpg", noise(seed=2))
    data = (src / "a" / "ok.jpg").read_bytes()
    for raw in (os.fsencode(src / "a") + b"/Mu\xf1oz.jpg", os.fsencode(src) + b"/caf\xe9/x.jpg"):
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.close(fd)
    (src / "a" / "bad.jpg").write_bytes(b"\x00" * 10)
    os.rename(src / "a" / "bad.jpg", os.fsencode(src / "a") + b"/bad\xff.jpg")

    manifest = build_shards("imagefolder", str(src), str(tmp_path / "out"), workers=2, samples_per_shard=2,
                            progress=False)
    assert manifest["classes"] == ["a", "b", "caf%E9"]
    stored = shard_samples(tmp_path / "out")
    assert sorted(stored) == ["a/Mu%F1oz", "a/ok", "b/ok", "caf%E9/x"]
    assert stored["a/Mu%F1oz"]["jpg"] == data and stored["caf%E9/x"]["cls"] == b"2"
    assert [(s["path"], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [
        (f"{src}/a/bad%FF.jpg", "cannot decode")]
    text = (tmp_path / "out" / "manifest.json").read_bytes().decode("utf-8")  # strict UTF-8
    assert "\\udc" not in text and json.loads(text) == manifest
    assert verify_shards(str(tmp_path / "out"), workers=1, progress=False, out=io.StringIO())


def die(task):
    os._exit(9)  # as the kernel's out-of-memory killer would end a writer process


def test_a_writer_process_that_dies_is_an_error_saying_what_to_change(tmp_path, monkeypatch):
    from ran.data import DataError, write

    for i in range(4):
        save(tmp_path / "src" / "a" / f"{i}.png", noise(seed=i))
    monkeypatch.setattr(write, "write_shard", die)
    with pytest.raises(DataError, match="shard writer process died .* fewer --workers than 2"):
        build_shards("imagefolder", str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=2,
                     workers=2, progress=False)

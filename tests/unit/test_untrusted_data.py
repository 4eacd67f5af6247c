"""Data is untrusted (DESIGN.md, "Trust boundaries"): each attack of issue 22 performed here, on
127.0.0.1 where it needs a server, and refused in one line with nothing run, read or decoded.

- a CIFAR batch pickle that runs code when loaded;
- manifest shard names outside the dataset root (``..``, absolute, a URL);
- an image whose header claims 169 Mpx in a 165 KB file (build, CPU read, device decode, verify);
- a tar member over the size cap, which is skipped while streaming.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest
from PIL import Image

from ran.data import DEFAULT_MAX_PIXELS, DataError
from ran.data.read import (OversizeMember, _BufferedStream, iter_tar_members, make_loader, verify_shards)
from ran.data.transforms import ImageTooLarge, decode_full, open_image
from ran.data.write import build_shards
from untrusted import code_running_pickle, cifar_batch, jpeg_claiming, png_bomb, python2_pickle

REPO = Path(__file__).resolve().parents[2]


def ran_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ran.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def png(size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(out, format="JPEG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


@pytest.mark.parametrize("how, named", [("os.system", "posix.system"), ("exec", "builtins.exec")])
def test_a_cifar_pickle_that_runs_code_is_refused_before_it_runs(tmp_path, how, named):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(code_running_pickle(str(marker), how))

    result = ran_cli("data", "build", "--source", "cifar10", "--input", str(tmp_path),
                     "--output", str(tmp_path / "out"), "--workers", "1", "--quiet", cwd=tmp_path)

    assert result.returncode == 2
    err = one_line_error(result)
    assert f"{folder / 'data_batch_1'}: not a CIFAR batch: the pickle asks to load {named}" in err
    assert not marker.exists()
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("encode", [python2_pickle, functools.partial(pickle.dumps, protocol=5)],
                         ids=["python2 as the real files", "protocol 5"])
def test_cifar_batches_as_the_real_files_store_them_still_build(tmp_path, encode):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_batch(2, seed=i) for i in range(5)]
    for i, batch in enumerate(batches):
        (folder / f"data_batch_{i + 1}").write_bytes(encode(batch))
    (folder / "batches.meta").write_bytes(encode({b"label_names": [f"c{i}".encode() for i in range(10)],
                                                  b"num_vis": 3072}))
    manifest = build_shards("cifar10", str(tmp_path), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["splits"]["train"]["total"] == 10
    assert manifest["classes"] == [f"c{i}" for i in range(10)]


# ---------------------------------------------------------------------------------------------
# Shard names


def dataset_with_shard_name(root: Path, name: str) -> Path:
    """A dataset of one good shard whose manifest names ``name`` as its train shard."""
    src = root / "src"
    for label in range(2):
        (src / f"c{label}").mkdir(parents=True)
        (src / f"c{label}" / "a.png").write_bytes(png(colour=(label, 0, 0)))
    data = root / "data"
    build_shards("imagefolder", str(src), str(data), workers=1, progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


@pytest.fixture
def outside_shard(tmp_path):
    """A readable shard outside the dataset root, where a hostile manifest points."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with tarfile.open(outside / "x.tar", "w") as tar:
        for name, data in (("k.png", png()), ("k.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return outside / "x.tar"


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_shard_names_outside_the_root_are_refused_in_verify_and_preflight(tmp_path, outside_shard, kind,
                                                                         tiny_job):
    name = {"dotdot": "../outside/x.tar", "absolute": str(outside_shard)}[kind]
    why = {"dotdot": "leaves the dataset root", "absolute": "is an absolute path"}[kind]
    data = dataset_with_shard_name(tmp_path, name)

    result = ran_cli("data", "verify", str(data), "--workers", "1", "--quiet", cwd=tmp_path)
    assert result.returncode == 2
    err = one_line_error(result)
    assert f"shard name {name!r} {why}" in err and str(data) in err

    from ran.train.launch import preflight

    with pytest.raises(DataError, match=f"shard name {name!r} {why}"):
        preflight(tiny_job(data, tmp_path / "runs"), resume=False)
    with pytest.raises(DataError, match="shard name"):
        make_loader(str(data), "train", train=True, batch_size=1, recipe="cifar", workers=0)


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


def test_a_shard_name_with_a_url_is_refused_and_nothing_is_fetched(tmp_path, outside_shard):
    handler = functools.partial(_Recorder, directory=str(outside_shard.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/x.tar"
        data = dataset_with_shard_name(tmp_path, url)
        with pytest.raises(DataError, match=r"shard name 'http://127\.0\.0\.1:\d+/x\.tar' has a URL scheme"):
            verify_shards(str(data), workers=1, progress=False)
        with pytest.raises(DataError, match="has a URL scheme"):
            make_loader(str(data), "train", train=False, batch_size=1, recipe="cifar", workers=0)
    finally:
        server.shutdown()
    assert _Recorder.requests == []


# ---------------------------------------------------------------------------------------------
# The pixel cap


def test_the_cap_is_read_from_the_header_and_named_in_the_message():
    with pytest.raises(ImageTooLarge, match=r"^13000x13000 pixels \(169\.0 Mpx\), above "
                                            r"data\.max_pixels=50000000$"):
        decode_full(png_bomb())
    assert DEFAULT_MAX_PIXELS == 50_000_000
    assert open_image(png_bomb(), max_pixels=None).size == (13_000, 13_000)  # no cap: Pillow's 179 Mpx
    with pytest.raises(ImageTooLarge, match="196.0 Mpx"):  # over Pillow's own limit: still ours
        open_image(png_bomb(14_000, 14_000), max_pixels=None)


BUILD_AND_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from ran.data.write import build_shards
    manifest = build_shards("imagefolder", sys.argv[1], sys.argv[2], workers=1, progress=False)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "total": manifest["splits"]["train"]["total"], "skipped": manifest["skipped"]}))
""")


def _build_in_a_process(src: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", BUILD_AND_MEASURE, str(src), str(out)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_169_megapixel_png_is_skipped_by_the_build_without_decoding_it(tmp_path):
    for tree in ("plain", "bomb"):
        for label in range(2):
            (tmp_path / tree / f"c{label}").mkdir(parents=True)
            (tmp_path / tree / f"c{label}" / "ok.png").write_bytes(png(colour=(label, 0, 0)))
    (tmp_path / "bomb" / "c1" / "huge.png").write_bytes(png_bomb())
    assert len(png_bomb()) < 200_000

    plain = _build_in_a_process(tmp_path / "plain", tmp_path / "out-plain")
    bomb = _build_in_a_process(tmp_path / "bomb", tmp_path / "out-bomb")

    assert bomb["total"] == 2
    assert [(Path(s["path"]).name, s["reason"]) for s in bomb["skipped"]] == [
        ("huge.png", "too large: 13000x13000 pixels (169.0 Mpx), above data.max_pixels=50000000")]
    # Decoding it would cost 169 MB (grey) plus 507 MB (RGB); reading its header costs nothing.
    assert bomb["peak_mb"] < plain["peak_mb"] + 100, (bomb["peak_mb"], plain["peak_mb"])


def shards_with(tmp_path: Path, samples: list[tuple[str, bytes]]) -> str:
    """A one-shard dataset (2 classes) holding ``samples`` as (extension, image bytes), label 0."""
    data = tmp_path / "shards"
    data.mkdir()
    with tarfile.open(data / "train-000000.tar", "w") as tar:
        for i, (ext, image) in enumerate(samples):
            for name, payload in ((f"{i:04d}.{ext}", image), (f"{i:04d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    manifest = {"format": 1, "classes": ["a", "b"], "num_classes": 2,
                "splits": {"train": {"shards": [{"name": "train-000000.tar", "samples": len(samples)}],
                                     "total": len(samples)}}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    return str(data)


@pytest.mark.parametrize("recipe, decode, ext, bomb", [
    ("cifar", "cpu", "png", png_bomb),
    ("imagenet", "cpu", "png", png_bomb),
    ("imagenet", "cpu", "jpg", lambda: jpeg_claiming(13_000, 13_000, jpeg())),
    ("imagenet", "gpu", "jpg", lambda: jpeg_claiming(13_000, 13_000, jpeg())),  # the device path
], ids=["cifar", "imagenet", "imagenet-jpeg", "device-decode-jpeg"])
def test_readers_count_an_image_over_the_cap_as_bad_without_decoding(tmp_path, caplog, recipe, decode,
                                                                     ext, bomb):
    good = jpeg((40, 40)) if ext == "jpg" else png((40, 40))
    path = shards_with(tmp_path, [(ext, good), (ext, bomb()), (ext, good)])
    loader = make_loader(path, "train", train=False, batch_size=4, recipe=recipe, crop=16, workers=0,
                         max_bad_fraction=0.5, decode=decode, device="cpu")
    with caplog.at_level(logging.WARNING, logger="ran.data"):
        batches = list(loader)
    assert sum(len(b.labels) for b in batches) == 2
    assert sum(b.skipped for b in batches) == 1
    assert "sample 0001: ImageTooLarge: 13000x13000 pixels (169.0 Mpx), above data.max_pixels" in caplog.text


def test_verify_reports_an_image_over_the_cap(tmp_path, capsys):
    path = shards_with(tmp_path, [("png", png()), ("png", png_bomb())])
    assert not verify_shards(path, workers=1, progress=False)
    assert "sample 0001: ImageTooLarge: 13000x13000 pixels (169.0 Mpx)" in capsys.readouterr().out


def test_the_cap_is_a_job_setting(tmp_path):
    from ran.config import load_config

    assert load_config(None).data.max_pixels == DEFAULT_MAX_PIXELS
    small = load_config(None, ["data.max_pixels=1000"]).data.max_pixels
    path = shards_with(tmp_path, [("png", png((40, 40))), ("png", png((20, 20)))])
    loader = make_loader(path, "train", train=False, batch_size=4, recipe="cifar", crop=32, workers=0,
                         max_bad_fraction=0.9, max_pixels=small)
    assert [len(b.labels) for b in loader] == [1]  # 40x40 = 1600 pixels is over a cap of 1000


# ---------------------------------------------------------------------------------------------
# Tar members


class _CountingStream:
    def __init__(self, data: bytes):
        self.stream, self.largest = io.BytesIO(data), 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.largest = max(self.largest, len(data))
        return data


def test_a_tar_member_over_the_cap_is_skipped_while_streaming(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, size in (("a.png", 100), ("huge.png", 8 << 20), ("b.png", 100)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    stream = _CountingStream(out.getvalue())
    members = list(iter_tar_members(stream, max_member_bytes=1 << 20))
    assert [name for name, _ in members] == ["a.png", "huge.png", "b.png"]
    assert members[1][1] == OversizeMember(8 << 20, 1 << 20)
    assert members[2][1] == bytes(100)
    assert stream.largest <= _BufferedStream(None).chunk  # read 1 MiB at a time, never 8 MiB at once

    path = shards_with(tmp_path, [("png", png()), ("png", png())])
    big = Path(path) / "train-000000.tar"
    with tarfile.open(big, "a") as tar:
        for name, payload in (("0002.png", bytes(65 << 20)), ("0002.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    report = io.StringIO()
    assert not verify_shards(path, workers=1, progress=False, out=report)
    assert ("sample 0002: ValueError: .png member of 68157440 bytes, above the tar member cap"
            in report.getvalue())

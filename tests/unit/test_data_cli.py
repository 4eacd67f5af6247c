"""`ran data build|synth|verify`: exit codes, one-line errors, verify catching mismatches."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from PIL import Image



def ran(*argv):
    """``ran ARGV...`` through ran.cli.main: the one error -> exit-code mapping of every verb."""
    from ran.cli import main

    return main(list(argv))


@pytest.fixture
def synth(tmp_path):
    out = tmp_path / "synth"
    assert ran("data", "synth", "--output", str(out), "--classes", "3", "--train", "30", "--val", "9",
               "--size", "16", "--samples-per-shard", "10", "--workers", "1", "--quiet") == 0
    return out


def test_synth_then_verify_passes(synth, capsys):
    manifest = json.load(open(synth / "manifest.json"))
    assert manifest["splits"]["train"]["total"] == 30 and manifest["num_classes"] == 3
    assert ran("data", "verify", str(synth), "--workers", "1", "--quiet") == 0
    out = capsys.readouterr().out
    assert "train: 3 shards, 30 samples, 3 classes: ok" in out
    assert "val: 1 shards, 9 samples, 3 classes: ok" in out


def test_build_an_image_folder(tmp_path, capsys):
    for i in range(6):
        path = tmp_path / "src" / ("a" if i % 2 else "b") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(path)
    assert ran("data", "build", "--source", "imagefolder", "--input", str(tmp_path / "src"),
               "--output", str(tmp_path / "out"), "--val-fraction", "0.34", "--workers", "1") == 0
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert (manifest["splits"]["train"]["total"], manifest["splits"]["val"]["total"]) == (4, 2)
    assert "wrote" in capsys.readouterr().err


def test_verify_detects_a_count_mismatch(synth, capsys):
    manifest = json.load(open(synth / "manifest.json"))
    manifest["splits"]["train"]["shards"][1]["samples"] += 1
    (synth / "manifest.json").write_text(json.dumps(manifest))
    assert ran("data", "verify", str(synth), "--workers", "1", "--quiet") == 1
    captured = capsys.readouterr()
    assert "train-000001.tar: 10 samples, manifest says 11" in captured.out
    assert captured.err.startswith("error:")


def test_verify_detects_undecodable_images_and_bad_labels(synth, capsys):
    shard = synth / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for i, (member, data) in enumerate(members):
            if i == 0:
                data = data[:30]  # a broken PNG
            if i == 3:
                data = b"7"  # label out of range for 3 classes
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert ran("data", "verify", str(synth), "--workers", "2", "--quiet") == 1
    out = capsys.readouterr().out
    assert "val: 1 shards, 9 samples, 3 classes: 2 problem(s)" in out
    assert "label 7 out of range 0..2" in out
    assert "train: 3 shards, 30 samples, 3 classes: ok" in out


def test_verify_detects_a_missing_shard(synth, capsys):
    (synth / "train-000002.tar").unlink()
    assert ran("data", "verify", str(synth), "--workers", "1", "--quiet") == 1
    assert "train-000002.tar: missing" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["build", "--source", "imagefolder", "--input", "{tmp}/missing", "--output", "{tmp}/out"],
     "no such directory"),
    (["build", "--source", "imagenet", "--input", "{tmp}", "--output", "{tmp}/out"], "unknown layout"),
    (["synth", "--output", "{tmp}/file/out"], "cannot write to"),
    (["verify", "{tmp}"], "no manifest.json"),  # a folder without shards
    (["verify", "{tmp}/missing"], "missing: no such directory"),  # and no folder: told apart
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("a file where a directory should be")
    rc = ran("data", *[a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_data_layer_imports_neither_ray_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys, ran.data.commands, ran.data.read, ran.data.write, ran.data.synth, ran.data.storage; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_build_and_verify_a_folder_of_every_kind_of_file(tmp_path, capsys):
    import numpy as np

    src = tmp_path / "src"
    for folder in ("a", "b"):
        (src / folder).mkdir(parents=True)
    ramp = np.round(np.arange(64) * 65535 / 63).astype(np.uint16)
    Image.fromarray(np.repeat(ramp[None], 8, axis=0)).save(src / "a" / "ramp16.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(src / "a" / "palette.png", transparency=1)
    Image.new("CMYK", (16, 16), (0, 100, 200, 30)).save(src / "a" / "cmyk.jpg")
    Image.new("1", (16, 16), 1).save(src / "b" / "bits.png")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(src / "b" / "page.tif")
    palette.save(src / "b" / "anim.gif")
    fd = os.open(os.fsencode(src / "b") + b"/Mu\xf1oz.jpg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (src / "a" / "cmyk.jpg").read_bytes())
    os.close(fd)
    (src / "b" / "letter.jpg").write_text("Dear reader, this is not a JPEG.")
    (src / "b" / "zero.png").write_bytes(b"")

    assert ran("data", "build", "--source", "imagefolder", "--input", str(src),
               "--output", str(tmp_path / "out"), "--workers", "2", "--samples-per-shard", "3") == 0
    err = capsys.readouterr().err
    assert "wrote " + str(tmp_path / "out") + ": train 7 samples in 3 shards" in err
    assert "skipped 2 files (listed in manifest.json 'skipped'): 1 cannot decode, 1 empty file" in err
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert sorted(os.path.basename(s["path"]) for s in manifest["skipped"]) == ["letter.jpg", "zero.png"]
    assert ran("data", "verify", str(tmp_path / "out"), "--workers", "1", "--quiet") == 0
    assert "train: 3 shards, 7 samples, 2 classes: ok" in capsys.readouterr().out


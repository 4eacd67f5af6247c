"""Shards on S3: build to and read from a real S3 endpoint (``moto_server`` on loopback)."""

from __future__ import annotations

import io
import sys
import uuid
from collections import Counter
from pathlib import Path

import boto3
import pytest
import webdataset as wds
from PIL import Image

from ran.data import DataError, storage
from ran.cli import main
from ran.data.read import make_loader, read_manifest
from ran.data.write import build_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_s3 import S3_ENV, enforce_s3_auth  # noqa: E402

pytestmark = pytest.mark.integration

HINT = "check AWS credentials or AWS_ENDPOINT_URL"


@pytest.fixture
def bucket(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    name = f"ran-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def image_folder(tmp_path):
    """24 PNGs in 3 classes whose red/green channels spell the sample index."""
    for index in range(24):
        path = tmp_path / "src" / f"c{index % 3}" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (index, 0, index % 3)).save(path)
    return tmp_path / "src"


def keys_under(bucket, prefix):
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def test_build_to_s3_then_read_back_every_sample_once(bucket, image_folder, capsys):
    url = f"s3://{bucket}/sets/demo"
    manifest = build_shards("imagefolder", str(image_folder), url, samples_per_shard=5, workers=2)
    assert manifest["splits"]["train"]["total"] == 24
    keys = keys_under(bucket, "sets/demo/")
    assert [k for k in keys if k.endswith(".tar")] == [f"sets/demo/train-{i:06d}.tar" for i in range(5)]
    assert "sets/demo/manifest.json" in keys
    assert read_manifest(url) == manifest

    seen = Counter()
    for rank in range(2):
        loader = make_loader(url, "train", train=False, batch_size=4, recipe="cifar", crop=16,
                             rank=rank, world_size=2, workers=2)
        for batch in loader:
            assert batch.labels.tolist() == batch.images[:, 2, 0, 0].tolist()
            seen.update(batch.images[:, 0, 0, 0].tolist())
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}

    train = make_loader(url, "train", train=True, batch_size=4, recipe="cifar", crop=16, workers=2)
    assert [len(b.labels) for b in train] == [4] * 6

    capsys.readouterr()
    build_shards("imagefolder", str(image_folder), url, samples_per_shard=5, workers=2)
    assert "5 of 5 shards already complete; writing 0" in capsys.readouterr().err


def test_plain_webdataset_streams_s3_shards_through_our_opener(bucket, image_folder):
    url = f"s3://{bucket}/plain"
    build_shards("imagefolder", str(image_folder), url, samples_per_shard=12, workers=1, progress=False)
    dataset = wds.WebDataset(f"{url}/train-{{000000..000001}}.tar", shardshuffle=False).to_tuple("png", "cls")
    samples = list(dataset)
    assert len(samples) == 24
    assert all(Image.open(io.BytesIO(png)).size == (16, 16) for png, _ in samples)


def test_large_objects_are_uploaded_in_parts(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)  # S3's smallest part
    payload = bytes(range(256)) * (11 * 1024 * 4)  # 11 MiB
    local = tmp_path / "big.bin"
    local.write_bytes(payload)
    storage.upload(str(local), f"s3://{bucket}/big.bin")
    head = boto3.client("s3").head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
    assert storage.read_bytes(f"s3://{bucket}/big.bin") == payload
    assert not local.exists()


def test_wrong_credentials_are_a_clear_error(bucket, image_folder, moto_server, capsys):
    url = f"s3://{bucket}/denied"
    build_shards("imagefolder", str(image_folder), url, samples_per_shard=12, workers=1, progress=False)
    with enforce_s3_auth(moto_server):
        with pytest.raises(DataError, match=HINT):
            build_shards("imagefolder", str(image_folder), f"s3://{bucket}/other", workers=1, progress=False)
        with pytest.raises(DataError, match=f"403 InvalidAccessKeyId — {HINT}"):
            read_manifest(url)
        assert main(["data", "verify", url, "--quiet"]) == 2  # cli.main maps the error
    err = capsys.readouterr().err
    assert err.startswith("error: ") and HINT in err and err.count("\n") == 1


def test_missing_bucket_is_a_clear_error(bucket, image_folder):
    with pytest.raises(DataError, match="bucket 'no-such-bucket-ran' does not exist"):
        build_shards("imagefolder", str(image_folder), "s3://no-such-bucket-ran/x", workers=1, progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(f"s3://{bucket}/nothing-here")

"""The synthetic dataset: deterministic, balanced, and learnable by a tiny CNN in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ran.data import DataError
from ran.data.read import make_loader
from ran.data.synth import write_synthetic
from ran.data.transforms import normalizer


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only add contention
    yield
    torch.set_num_threads(threads)


def test_synthetic_manifest_is_balanced_and_deterministic(tmp_path):
    first = write_synthetic(str(tmp_path / "a"), classes=5, train=50, val=10, size=16,
                            samples_per_shard=20, workers=1, progress=False)
    write_synthetic(str(tmp_path / "b"), classes=5, train=50, val=10, size=16,
                    samples_per_shard=20, workers=1, progress=False)
    assert first["num_classes"] == 5 and len(set(first["classes"])) == 5
    assert [s["samples"] for s in first["splits"]["train"]["shards"]] == [20, 20, 10]
    assert first["splits"]["val"]["total"] == 10
    assert (tmp_path / "a" / "train-000001.tar").read_bytes() == (tmp_path / "b" / "train-000001.tar").read_bytes()
    assert json.load(open(tmp_path / "a" / "manifest.json"))["source"] == "synth"


def test_synthetic_rejects_impossible_sizes(tmp_path):
    with pytest.raises(DataError, match="classes >= 2"):
        write_synthetic(str(tmp_path), classes=1, progress=False)


def test_tiny_cnn_beats_chance_clearly_within_seconds(tmp_path, one_thread):
    classes = 4
    write_synthetic(str(tmp_path), classes=classes, train=480, val=160, workers=1, progress=False)
    train = make_loader(str(tmp_path), "train", train=True, batch_size=32, recipe="cifar", workers=0)
    val = make_loader(str(tmp_path), "val", train=False, batch_size=160, recipe="cifar", crop=32,
                      workers=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    norm = normalizer("cifar")
    for epoch in range(3):
        train.set_epoch(epoch)
        for batch in train:
            loss = nn.functional.cross_entropy(model(norm(batch.images)), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    correct = total = 0
    with torch.no_grad():
        for batch in val:
            correct += int((model(norm(batch.images)).argmax(1) == batch.labels).sum())
            total += len(batch.labels)
    assert total == 160
    assert correct / total > 0.6  # chance is 0.25

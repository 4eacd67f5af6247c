"""WebDataset shards: build them from image datasets, stream them as uint8 batches (no Ray, no MLflow).

``ran.data.write`` turns ImageNet (extracted folders or the official archives), image folders and
CIFAR pickles into shards plus a ``manifest.json``; ``ran.data.synth`` writes a small learnable dataset; ``ran.data.read`` streams
shards from a directory, ``s3://`` or ``http(s)://`` as batches split by rank and loader worker;
``ran.data.transforms`` holds the per-recipe augmentations and the on-device normaliser.

Heavy modules (torch, PIL, boto3) load on first use of the names below, so ``import ran.data``
stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any


class DataError(ValueError):
    """Bad input or unreachable data, with a one-line message that says what to do."""


_LAZY = {
    "Batch": "ran.data.read",
    "Loader": "ran.data.read",
    "make_loader": "ran.data.read",
    "read_manifest": "ran.data.read",
    "normalizer": "ran.data.transforms",
    "build_shards": "ran.data.write",
    "verify_shards": "ran.data.read",
    "write_synthetic": "ran.data.synth",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ran.data' has no attribute {name!r}")

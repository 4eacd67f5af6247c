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


# The one pixel cap (config ``data.max_pixels``, ``--max-pixels``): an image whose header says it
# has more pixels is never decoded (build: skipped; readers: a bad sample; serving: HTTP 400).
# Well under Pillow's bomb limits (89 Mpx warns, 179 Mpx refuses); 50 Mpx decoded to RGB is 150 MB.
DEFAULT_MAX_PIXELS = 50_000_000
# Tar members larger than this are skipped while streaming, never held in memory (ImageNet's
# largest JPEG is under 16 MB).
MAX_MEMBER_BYTES = 64 << 20

# ``data.decode``: who decodes training JPEGs (ran.data.gpu.resolve_decode says how each runs).
DECODE_MODES = ("cpu", "gpu", "auto")


def check_decode(decode: str, recipe: str) -> str:
    """The one rule between ``data.decode`` and ``data.recipe`` (the config and the loader both
    ask it): ``decode`` is one of :data:`DECODE_MODES`, and ``gpu`` needs the imagenet recipe
    (CIFAR-size PNGs decode on the CPU faster than a device round trip). Returns ``decode``.

    Raises:
        DataError: an unknown mode, or ``gpu`` with another recipe.
    """
    if decode not in DECODE_MODES:
        raise DataError(f"data.decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if decode == "gpu" and recipe != "imagenet":
        raise DataError(f"data.decode=gpu decodes JPEGs for the imagenet recipe, not {recipe!r}; "
                        "set data.decode to cpu or auto")
    return decode


_LAZY = {
    "Batch": "ran.data.batches",
    "Loader": "ran.data.batches",
    "make_loader": "ran.data.read",
    "read_manifest": "ran.data.read",
    "normalizer": "ran.data.transforms",
    "build_shards": "ran.data.write",
    "verify_shards": "ran.data.read",
    "write_synthetic": "ran.data.synth",
}

__all__ = ["DataError", "DEFAULT_MAX_PIXELS", "MAX_MEMBER_BYTES", "DECODE_MODES", "check_decode", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ran.data' has no attribute {name!r}")

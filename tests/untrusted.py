"""Hostile inputs for the trust-boundary tests (DESIGN.md, "Trust boundaries"): an image whose
header claims far more pixels than its file size suggests, pickles that run code when loaded,
and the CIFAR batch format as the real files store it."""

from __future__ import annotations

import functools
import os
import pickle
import struct
import zlib
from typing import Any

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=4)
def png_bomb(width: int = 13_000, height: int = 13_000) -> bytes:
    """A valid 8-bit greyscale PNG of ``width`` x ``height`` black pixels: 169 Mpx (169 MB once
    decoded, 507 MB as RGB) in about 165 KB, under Pillow's own refusal limit (179 Mpx)."""
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    parts = [packer.compress(row) for _ in range(height)]
    data = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int, jpeg: bytes) -> bytes:
    """``jpeg`` with its frame header rewritten to claim ``width`` x ``height`` pixels (the
    entropy-coded data is left as it is: only the header is meant to be read)."""
    data = bytearray(jpeg)
    pos = 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    raise ValueError("no frame header")


class _RunsCommand:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


class _RunsPython:
    """Unpickling this runs ``exec(code)``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (self.code,)


def code_running_pickle(marker: str, how: str = "os.system") -> bytes:
    """A pickle that, when loaded, creates the file ``marker`` (through ``os.system`` or
    ``exec``), inside a dict shaped like a CIFAR batch."""
    payload = (_RunsCommand(f"touch {marker}") if how == "os.system"
               else _RunsPython(f"open({marker!r}, 'w').close()"))
    return pickle.dumps({b"data": payload, b"labels": [0]}, protocol=4)


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's ``str`` (BINSTRING), as cPickle wrote the CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def python2_pickle(obj: Any) -> bytes:
    """``obj`` pickled as the CIFAR python batches are: protocol 2, Python 2 strings, numpy
    arrays through ``numpy.core.multiarray._reconstruct`` (numpy 1's module name)."""
    import io

    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    data = out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"_codecs" not in data and b"numpy._core" not in data
    return data


def cifar_batch(n: int, seed: int = 0, label_key: bytes = b"labels") -> dict[bytes, Any]:
    """A CIFAR batch dict of ``n`` random 32x32 images, as the real files hold them."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 5",
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(x) for x in rng.integers(0, 10, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}

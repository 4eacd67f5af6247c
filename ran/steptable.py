"""The step table: what ``ran bench`` measured fastest on each device kind, which ``auto`` reads.

``train.precision: auto`` and ``train.compile: auto`` are decided by measurement, never by belief
(the MLPerf and NVIDIA training loops keep such tables per GPU): ``ran bench`` records the fastest
setting of a model on this device kind (precision, compile mode, CUDA graph, batch, img/s, date)
in the user's table (``$RAN_CACHE_DIR/step_table.json``, default ``~/.cache/ran``); the table
shipped with ran (``ran/step_table.json``) holds the measurements committed with the code. The
user's entry wins over the shipped one. No Ray, MLflow or torch here.

Layout: ``{"<device kind>": {"<model>/<stem>": {"precision": ..., "compile": ..., "cuda_graph":
..., "batch_size": ..., "img_per_s": ..., "measured": "YYYY-MM-DD", "by": "ran bench"}}}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("step_table.json")


def cache_dir() -> Path:
    """The user cache for measurements and compiled kernels: ``RAN_CACHE_DIR`` or ``~/.cache/ran``."""
    return Path(os.environ.get("RAN_CACHE_DIR") or Path.home() / ".cache" / "ran")


def user_table() -> Path:
    """Where ``ran bench`` records its measurements."""
    return cache_dir() / "step_table.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(device_kind: str, model_key: str) -> tuple[dict[str, Any], str] | None:
    """The measured setting of ``model_key`` (``"attention56/imagenet"``) on ``device_kind`` and
    the table it came from; else the device kind's most recent measurement of any model (the
    precision that won there is the best guess for another model); None when nothing was
    measured on this kind."""
    for path in (user_table(), SHIPPED):
        entries = _read(path).get(device_kind) or {}
        if isinstance(entries.get(model_key), dict):
            return entries[model_key], str(path)
    for path in (user_table(), SHIPPED):
        entries = [e for e in (_read(path).get(device_kind) or {}).values() if isinstance(e, dict)]
        if entries:
            return max(entries, key=lambda e: str(e.get("measured", ""))), str(path)
    return None


def record(device_kind: str, model_key: str, setting: dict[str, Any]) -> Path:
    """Write ``setting`` for ``model_key`` on ``device_kind`` into the user's table (atomically:
    a concurrent reader sees the old table or the new one); returns its path.

    Raises:
        OSError: the cache directory cannot be written.
    """
    path = user_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _read(path)
    table.setdefault(device_kind, {})[model_key] = setting
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".step_table.")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path

"""Fixtures shared by unit and integration tests.

- ``tiny_job``: the one factory of small jobs over the synthetic shards,
  ``tiny_job(data, storage, **{"dotted.key": value}) -> JobConfig``; write one to a file with
  ``path.write_text(tiny_job(...).to_yaml())``.
- ``shipped_jobs``: the paths of ``jobs/*.yaml``, checked to hold every recipe the project ships.

The real services (local Ray, MLflow server, S3 server) are in tests/integration/conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from ran.config import JobConfig, load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"

# The recipes jobs/ ships (README, DESIGN): the demo and the paper's CIFAR-10 and ImageNet runs.
SHIPPED_JOBS = ("demo", "cifar10_attention56", "cifar10_attention92", "imagenet_attention56",
                "imagenet_attention92", "imagenet_attention452")

# CIFAR-stem Attention-56 on 16x16 images, batch 16 on each of 2 workers, 2 epochs: a few seconds
# an epoch on 2 cores over the synthetic shards (``synth_data``: 4 classes, 384 train, 128 val).
TINY_JOB: dict[str, Any] = {
    "name": "tiny", "model.name": "attention56", "model.stem": "cifar",
    "data.batch_size": 16, "data.workers": 1, "data.crop": 16,
    "optim.lr": 0.1, "optim.reference_batch_size": 32, "schedule.kind": "cosine",
    "train.epochs": 2, "train.log_every": 4, "scaling.num_workers": 2, "scaling.max_failures": 1,
    "tracking.registered_model": None, "tracking.log_model": False,
}


@pytest.fixture(scope="session", autouse=True)
def _own_step_table(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test (and every process it starts) sees an empty step table and inductor cache of
    its own, not what `ran bench` recorded on this machine: `auto` then follows its fixed rule."""
    import os

    os.environ["RAN_CACHE_DIR"] = str(tmp_path_factory.mktemp("ran-cache"))


@pytest.fixture(scope="session")
def tiny_job() -> Callable[..., JobConfig]:
    """Factory of tiny training jobs: ``tiny_job(data, storage, **{"dotted.key": value})``, where
    ``data`` is the shards' directory (``synth_data``) and ``storage`` the run storage path; any
    key of the job config can be overridden. Nothing is registered or logged as a model unless
    asked."""
    def make(data: str | Path, storage: str | Path, **overrides: Any) -> JobConfig:
        return load_config(None, {**TINY_JOB, "data.path": str(data), "storage.path": str(storage),
                                  **overrides})

    return make


@pytest.fixture(scope="session")
def shipped_jobs() -> list[Path]:
    """``jobs/*.yaml``, sorted; fails unless every recipe in SHIPPED_JOBS is among them (so a test
    looping over them cannot pass on an empty or moved folder)."""
    paths = sorted(JOBS.glob("*.yaml"))
    missing = set(SHIPPED_JOBS) - {p.stem for p in paths}
    assert not missing, f"{JOBS} lacks the job files {sorted(missing)}"
    return paths

"""The launcher's checks and the lean local Ray's trainer, without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from ran.config import ConfigError, load_config
from ran.train.launch import LEAN_SKIPPED_CALLBACKS, Storage, build_trainer, check_resources


def _cfg(**overrides):
    base = {"data.path": "/nonexistent", "model.num_classes": 4, "scaling.cpus_per_worker": 1}
    return load_config(None, {**base, **overrides})


def test_check_resources_counts_whole_workers_per_node():
    two_nodes = [{"CPU": 3}, {"CPU": 2}]  # 3 + 2 workers of 1 CPU; 1 + 1 of 2 CPUs
    check_resources(_cfg(**{"scaling.num_workers": 5}), two_nodes)
    with pytest.raises(ConfigError) as err:
        check_resources(_cfg(**{"scaling.num_workers": 3, "scaling.cpus_per_worker": 2}), two_nodes)
    message = str(err.value)
    assert "cannot place 3 workers x 2 CPU" in message and "5 CPUs" in message
    assert "2 node(s), room for 2 worker(s)" in message


def test_check_resources_needs_a_gpu_per_worker():
    with pytest.raises(ConfigError, match=r"3 workers x 1 CPU \+ 1 GPU.*room for 2"):
        check_resources(_cfg(**{"scaling.num_workers": 3, "scaling.use_gpu": True}),
                        [{"CPU": 8, "GPU": 2}])


def test_lean_local_ray_drops_the_callbacks_it_has_no_use_for(monkeypatch, tmp_path: Path):
    cfg = _cfg()
    storage = Storage(uri=str(tmp_path), name="run", ray_path=str(tmp_path))

    def callbacks() -> set[str]:
        trainer = build_trainer(cfg, storage, {})
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    monkeypatch.delenv("RAN_RAY_NO_DASHBOARD", raising=False)
    stock = callbacks()
    # Ray Train still has both (else this test names callbacks that no longer exist) ...
    assert set(LEAN_SKIPPED_CALLBACKS) <= stock
    monkeypatch.setenv("RAN_RAY_NO_DASHBOARD", "1")
    lean = callbacks()
    # ... and the lean trainer keeps everything else: backend setup, user callbacks.
    assert lean == stock - set(LEAN_SKIPPED_CALLBACKS)
    assert {"BackendSetupCallback", "UserCallbackHandler"} <= lean

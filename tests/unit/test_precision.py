"""train.precision=auto: bf16 only where the hardware computes it natively."""

from pathlib import Path

import pytest
import torch

from ran.config import load_config
from ran.train.worker import autocast, native_bf16, resolve_precision

CPU = torch.device("cpu")
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this platform")
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def test_auto_is_the_default_and_jobs_use_it():
    assert load_config(None, []).train.precision == "auto"
    jobs = sorted(JOBS.glob("*.yaml"))
    assert len(jobs) >= 6, JOBS  # demo, cifar10_* and imagenet_* recipes
    for job in jobs:
        assert load_config(str(job), []).train.precision == "auto", job


def test_cpu_bf16_detection_matches_the_kernel_flags():
    flags = _cpu_flags()
    assert native_bf16(CPU) == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(explicit):
    assert resolve_precision(explicit, CPU) == explicit


def test_auto_resolves_by_device():
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


def test_autocast_follows_the_resolved_precision():
    for precision in ("fp32", "bf16", "auto"):
        with autocast(resolve_precision(precision, CPU), CPU):
            enabled = torch.is_autocast_enabled("cpu")
            dtype = torch.get_autocast_dtype("cpu")
        assert enabled == (resolve_precision(precision, CPU) == "bf16"), precision
        if enabled:
            assert dtype == torch.bfloat16

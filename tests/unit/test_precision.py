"""train.precision=auto: bf16 only where the hardware computes it natively."""

from pathlib import Path

import pytest
import torch

from ran.config import load_config
from ran import runtime
from ran.runtime import autocast, native_bf16, resolve_precision

CPU = torch.device("cpu")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this platform")
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def test_auto_is_the_default_and_jobs_use_it(shipped_jobs):
    assert load_config(None, []).train.precision == "auto"
    assert {job.stem: load_config(str(job), []).train.precision for job in shipped_jobs} == \
        {job.stem: "auto" for job in shipped_jobs}


def test_cpu_bf16_detection_matches_the_kernel_flags():
    flags = _cpu_flags()
    assert native_bf16(CPU) == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(explicit):
    assert resolve_precision(explicit, CPU) == explicit


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_by_the_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU) == expected


def test_auto_on_a_device_without_bf16_is_fp32():
    assert resolve_precision("auto", torch.device("meta")) == "fp32"


@pytest.mark.parametrize(("precision", "enabled"), [("fp32", False), ("bf16", True)])
def test_autocast_follows_the_resolved_precision(precision, enabled):
    with autocast(precision, CPU):
        assert torch.is_autocast_enabled("cpu") is enabled
        if enabled:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16

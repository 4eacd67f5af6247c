"""train.precision=auto: bf16 only where the hardware computes it natively."""

import os
import re
import subprocess
import sys

import pytest
import torch

from ran.config import load_config
from ran import runtime
from ran.runtime import autocast, native_bf16, resolve_precision

CPU = torch.device("cpu")


def test_auto_is_the_default_and_jobs_use_it(shipped_jobs):
    assert load_config(None, []).train.precision == "auto"
    assert {job.stem: load_config(str(job), []).train.precision for job in shipped_jobs} == \
        {job.stem: "auto" for job in shipped_jobs}


def _onednn_isa() -> str:
    """The instruction set oneDNN (the library that runs CPU convolutions) found on this CPU, by
    its own detection: the ``isa:`` of its verbose output, from a bf16 convolution run in a
    fresh process."""
    code = ("import torch; torch.nn.Conv2d(4, 4, 3).to(torch.bfloat16)"
            "(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r"onednn_verbose,(?:v1,)?info,cpu,isa:(.*)", out)
    if not found:
        pytest.skip("this torch build runs CPU convolutions without oneDNN")
    return found.group(1)


def test_cpu_bf16_detection_agrees_with_onednn():
    """oneDNN names bf16 in its ISA ("... Intel AMX with bfloat16 ...", "... Intel DL Boost and
    bfloat16 support") exactly when it has bf16 instructions to run."""
    assert native_bf16(CPU) == ("bfloat16" in _onednn_isa())


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

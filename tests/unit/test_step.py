"""The training step (ran/train/step.py): no format or dtype detour in the forward, CUDA graphs
refused on a CPU before work, the step table that ``auto`` reads, and a checkpoint written under
one setting resumed under another."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ran import runtime, steptable
from ran.config import ConfigError, load_config, parse_config
from ran.models import create_model
from ran.train.step import MicroBatch, TrainStep, check_device, layout_walk


def test_attention56_stays_channels_last_and_bf16_through_forward_and_backward():
    model = create_model("attention56", num_classes=10).to(memory_format=torch.channels_last)
    images = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    walk = layout_walk(model, images, "bf16")
    # Every conv, BN, ReLU, pool, up-sampling and add of the trunks and masks, both directions.
    assert walk["activations"] > 900
    assert walk["detours"] == {}
    assert walk["dtype"] == "bfloat16"


def test_the_walk_catches_a_detour():
    class Detour(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x).contiguous()  # NCHW
            return y.float().mean(dim=(2, 3))  # fp32

    model = Detour().to(memory_format=torch.channels_last)
    walk = layout_walk(model, torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last),
                       "bf16", backward=False)
    assert walk["detours"] == {"aten.clone.default bfloat16 not channels_last": 1,
                               "aten._to_copy.default float32 not channels_last": 1}


def test_a_cuda_graph_on_a_cpu_is_one_error_before_work():
    cfg = load_config(None, ["train.cuda_graph=true", "scaling.use_gpu=true"])
    with pytest.raises(ConfigError) as err:
        check_device(cfg, torch.device("cpu"))
    assert str(err.value) == ("train.cuda_graph=true needs a CUDA GPU, and this step runs on cpu; "
                              "set train.cuda_graph=false (on a CPU, train.compile=default removes "
                              "most of the launch overhead)")
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                  lambda x: x.float(), device=torch.device("cpu"), precision="fp32",
                  channels_last=False, cuda_graph=True)


def test_auto_precision_and_compile_read_the_step_table(tmp_path, monkeypatch):
    monkeypatch.setenv("RAN_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    kind = runtime.device_kind(cpu)
    native = "bf16" if runtime.native_bf16(cpu) else "fp32"
    precision, why = runtime.choose_precision("auto", cpu, "attention56/cifar")
    assert precision == native and why.startswith(f"auto: no ran bench measurement for {kind}")
    assert runtime.choose_compile("auto", cpu, "attention56/cifar") == (
        "off", f"auto: no ran bench measurement of attention56/cifar on {kind}; eager")

    steptable.record(kind, "attention56/cifar", {"model": "attention56/cifar", "precision": "fp16",
                                                 "compile": "default", "measured": "2026-12-04"})
    table = tmp_path / "step_table.json"
    assert json.loads(table.read_text())[kind]["attention56/cifar"]["precision"] == "fp16"
    assert runtime.choose_precision("auto", cpu, "attention56/cifar") == (
        "fp16", f"auto: fastest in ran bench on {kind} (2026-12-04, {table})")
    # Another model on the same device kind takes the precision, but never the compile mode.
    assert runtime.choose_precision("auto", cpu, "attention92/imagenet")[0] == "fp16"
    assert runtime.choose_compile("auto", cpu, "attention92/imagenet")[0] == "off"
    assert runtime.choose_compile("auto", cpu, "attention56/cifar")[0] == "default"
    # A set precision is what runs, whatever the table says.
    assert runtime.choose_precision("fp32", cpu, "attention56/cifar") == ("fp32", "set by train.precision")


def _step(precision: str, compile_mode: str = "off", seed: int = 0):
    from ran.data.transforms import normalizer
    from ran.train.step import build_optimizer, compile_model

    cfg = parse_config({"model": {"name": "attention56", "stem": "cifar", "p": 0, "t": 1,
                                  "num_classes": 4},
                        "optim": {"lr": 0.05}, "train": {"precision": precision}})
    torch.manual_seed(seed)
    model = runtime.build_model(cfg).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, 0.05)
    step = TrainStep(compile_model(model, compile_mode), optimizer, nn.CrossEntropyLoss(),
                     normalizer("cifar"), device=torch.device("cpu"), precision=precision,
                     channels_last=True)
    return model, optimizer, step


def _batches(n=4, batch=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 4, (batch,), generator=g)) for _ in range(n)]


def _train(step, batches, steps):
    losses = []
    for i in range(steps):
        images, labels = batches[i % len(batches)]
        loss, n = step([MicroBatch(images, labels, 1.0, len(labels))])
        losses.append(float(loss) / n)
    return losses


def test_a_checkpoint_of_an_fp16_step_resumes_under_bf16_and_back_with_its_loss_scale():
    batches = _batches()
    model, optimizer, fp16 = _step("fp16")
    _train(fp16, batches, 3)
    scale = fp16.state_dict()["scale"]  # the GradScaler's state goes into checkpoints
    assert 0 < scale <= 65536.0  # its initial scale, halved at each step with an inf gradient
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "scaler": fp16.state_dict()}

    model2, optimizer2, bf16 = _step("bf16", seed=7)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    bf16.load_state_dict(saved["scaler"])  # a disabled scaler takes it as a no-op
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), saved["model"].values()))
    after = _train(bf16, batches, 3)
    assert all(torch.isfinite(torch.tensor(after)))

    model3, optimizer3, fp16_again = _step("fp16", seed=9)
    model3.load_state_dict(model2.state_dict())
    optimizer3.load_state_dict(optimizer2.state_dict())
    fp16_again.load_state_dict(saved["scaler"])
    assert fp16_again.scaler.get_scale() == scale
    _train(fp16_again, batches, 1)

"""The training step as the hardware runs it fastest: precision, torch.compile, whole-step CUDA graphs.

One optimizer step (forward, cross-entropy, backward, optimizer) over one or more micro-batches,
built from the job's ``train`` options. No Ray, MLflow or files here: the Trainer (one worker of a
Ray Train run) and ``ran bench`` (the step timed alone on this machine) run this same class.

The levers, each a config option, chosen by measurement (``ran bench`` writes what it measured
fastest per device kind into the step table, :mod:`ran.steptable`, which ``auto`` reads):

- ``train.precision``: ``bf16`` autocast, ``fp16`` autocast with a GradScaler (its loss-scale
  state goes into the checkpoint), ``fp32``. On an H200, PyTorch sends bf16 batch norm to its own
  channels-last kernels, never cuDNN's (``_select_batch_norm_backend``), and batch norm is a third
  of Attention-56's step (shared/perf/h200-2026-12-04), so fp16 is a candidate there.
- ``train.compile``: ``off`` or a ``torch.compile`` mode; inductor's cache lives under the user's
  cache (``RAN_CACHE_DIR``, default ``~/.cache/ran``) so a second run of the same model skips most
  of the compile time.
- ``train.cuda_graph``: the whole step (normalisation of the uint8 batch, forward, backward,
  optimizer, BatchNorm's running statistics) captured once with ``torch.cuda.graph`` on static
  input buffers and replayed: one launch instead of about 2,000 for eager Attention-56, which is
  what the CIFAR stem at batch 64 is bound by. ``mode="reduce-overhead"`` would skip CUDA graphs
  for BatchNorm's mutated buffers (pytorch/pytorch#139207); a graph captured by hand does not. A
  step of another shape (an epoch's smaller last step, a rank's share of 0) runs eagerly on the
  same parameters, optimizer state and gradient buffers.

Source of the capture recipe: PyTorch's CUDA semantics notes, "Whole-network capture" (warm-up on
a side stream, ``zero_grad(set_to_none=True)`` before capture, static inputs filled by ``copy_``);
with DDP, 11 warm-up iterations before capture ("Usage with DistributedDataParallel").
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from ran import runtime, steptable
from ran.config import ConfigError, JobConfig

# Warm-up iterations before a capture: allocations and the optimizer's momentum buffers are made
# on a side stream first; DDP needs 11 (PyTorch's CUDA graph notes) to settle its buckets.
WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class MicroBatch(NamedTuple):
    """One micro-batch of a step: uint8 ``(N, 3, H, W)`` images and int64 ``(N,)`` labels (on the
    CPU, pinned, or already on the device); ``weight`` multiplies its mean loss before backward
    (``count * world_size / step size``: the gradient is then the mean over the step's samples);
    ``count`` is how many of its samples count in the step's loss sum (0 for a rank's empty
    share, which still computes one sample so that DDP's all-reduce has every rank)."""

    images: torch.Tensor
    labels: torch.Tensor
    weight: float
    count: int


def check_device(cfg: JobConfig, device: torch.device) -> None:
    """Refuse, before any work, a step setting this device cannot run (the config's own rules,
    such as CUDA graphs needing bf16 or fp32, are checked when the config is read).

    Raises:
        ConfigError: ``train.cuda_graph`` on a device that is not a CUDA GPU: never a silent
            fallback to eager.
    """
    if cfg.train.cuda_graph and device.type != "cuda":
        raise ConfigError(f"train.cuda_graph=true needs a CUDA GPU, and this step runs on "
                          f"{device.type}; set train.cuda_graph=false (on a CPU, "
                          "train.compile=default removes most of the launch overhead)")


def build_optimizer(model: nn.Module, cfg: JobConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default); optionally no weight decay on BN and bias parameters.
    Fused (one kernel for all parameters) when the model is on a GPU."""
    o = cfg.optim
    if o.no_decay_bn_bias:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups: Any = [{"params": decay, "weight_decay": o.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    fused = next(model.parameters()).is_cuda or None
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                           fused=fused)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model, mode=...)`` with inductor's cache under :func:`ran.steptable.cache_dir` (unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set); ``off`` returns the model as it is."""
    if mode == "off":
        return model
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(steptable.cache_dir() / "inductor"))
    # A CUDA build of torch compiling CPU kernels warns "No CUDA runtime is found" once: noise.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model, mode=None if mode == "default" else mode)


class TrainStep:
    """One optimizer step of ``model`` (already on ``device``, DDP-wrapped and compiled as the
    caller wants it) as :func:`check_device`-checked options say.

    Args:
        model: the module to call (``ddp`` wrapped, or compiled); its parameters are the
            optimizer's.
        optimizer: built by :func:`build_optimizer`; the lr is set by the caller before each step.
        criterion: ``(logits, labels) -> mean loss``.
        normalize: uint8 ``(N, 3, H, W)`` -> float ``(N, 3, H, W)`` (the recipe's normalizer).
        device: where the step runs.
        precision: resolved ``fp32 | bf16 | fp16`` (:func:`ran.runtime.resolve_precision`).
        channels_last: NHWC input.
        cuda_graph: capture the whole step on the first full-size micro-batch and replay it.
        ddp: the DistributedDataParallel wrapper when ``model`` is (or wraps) one, for ``no_sync``
            on all but the last micro-batch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 normalize: Callable[[torch.Tensor], torch.Tensor], *, device: torch.device,
                 precision: str, channels_last: bool, cuda_graph: bool = False,
                 ddp: nn.parallel.DistributedDataParallel | None = None) -> None:
        if cuda_graph and device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=true needs a CUDA GPU, not {device.type}")
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.normalize, self.device, self.precision = normalize, device, precision
        self.channels_last, self.ddp, self.cuda_graph = channels_last, ddp, cuda_graph
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self._graph: _StepGraph | None = None
        self.capture_s: float | None = None  # seconds the warm-up and capture took

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and labels -> normalised float (channels_last if asked) and int64 labels on
        the device (:func:`ran.runtime.prepare_batch`)."""
        return runtime.prepare_batch(MicroBatch(images, labels, 1.0, len(labels)), self.device,
                                     self.normalize, self.channels_last)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = self.prepare(images, labels)
        with runtime.autocast(self.precision, self.device, cache=not self.cuda_graph):
            return self.criterion(self.model(x), y)

    def __call__(self, micro: list[MicroBatch]) -> tuple[torch.Tensor, int]:
        """Run one step; returns (loss sum over the counted samples as a 0-d float32 tensor on the
        device, so that the step never waits for the GPU; the number of counted samples)."""
        if self.cuda_graph and self._graphable(micro):
            if self._graph is None:
                start = time.perf_counter()
                self._graph = _StepGraph(self, micro[0])
                self.capture_s = time.perf_counter() - start
            return self._graph.replay(micro[0]) * micro[0].count, micro[0].count
        return self._eager(micro)

    def _graphable(self, micro: list[MicroBatch]) -> bool:
        if len(micro) != 1 or micro[0].weight != 1.0 or micro[0].count != len(micro[0].labels):
            return False
        return self._graph is None or self._graph.fits(micro[0])

    def _eager(self, micro: list[MicroBatch]) -> tuple[torch.Tensor, int]:
        loss_sum, samples = torch.zeros((), device=self.device), 0
        if self._graph is not None:  # gradients live in the graph's buffers: zero, never drop them
            self.optimizer.zero_grad(set_to_none=False)
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                loss = self._loss(mb.images, mb.labels)
                self.scaler.scale(loss * mb.weight).backward()
            loss_sum += loss.detach().float() * mb.count
            samples += mb.count
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=self._graph is None)
        return loss_sum, samples

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (loss scale, growth tracker): numbers only."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the GradScaler (a checkpoint of another precision restores a disabled one as
        a no-op). Drops a captured graph: the optimizer state it referenced may be replaced."""
        if state:
            self.scaler.load_state_dict(state)
        self._graph = None
        for group in self.optimizer.param_groups:  # a captured step's lr tensor, saved with it
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])


class _StepGraph:
    """The whole step captured on static buffers (see the module docstring)."""

    def __init__(self, step: TrainStep, mb: MicroBatch) -> None:
        self.step = step
        dev = step.device
        self.images = torch.empty_like(mb.images, device=dev)
        self.labels = torch.empty_like(mb.labels, device=dev)
        self.images.copy_(mb.images, non_blocking=True)
        self.labels.copy_(mb.labels, non_blocking=True)
        # The lr becomes a device tensor the scheduler fills in place, so replays read the new lr.
        for group in step.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=dev)
        # The warm-up steps leave no trace: weights, BatchNorm statistics and momentum are put
        # back as they were, so the first replay is the run's first step on this batch (momentum
        # buffers that did not exist are zero, which is what SGD's first step starts from).
        tensors = [*step.model.parameters(), *step.model.buffers()]
        saved = [t.detach().clone() for t in tensors]
        momentum = {p: step.optimizer.state.get(p, {}).get("momentum_buffer")
                    for group in step.optimizer.param_groups for p in group["params"]}
        momentum = {p: (b.clone() if b is not None else None) for p, b in momentum.items()}
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS_DDP if step.ddp is not None else WARMUP_STEPS):
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
            for p, before in momentum.items():
                buf = step.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.copy_(before) if before is not None else buf.zero_()
        step.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def _body(self) -> torch.Tensor:
        loss = self.step._loss(self.images, self.labels)
        loss.backward()
        self.step.optimizer.step()
        return loss.detach().float()

    def fits(self, mb: MicroBatch) -> bool:
        return mb.images.shape == self.images.shape and mb.labels.shape == self.labels.shape

    def replay(self, mb: MicroBatch) -> torch.Tensor:
        self.images.copy_(mb.images, non_blocking=True)
        self.labels.copy_(mb.labels, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()


def layout_walk(model: nn.Module, images: torch.Tensor, precision: str,
                backward: bool = True) -> dict[str, Any]:
    """Every 4-D activation of one forward (and backward) pass of ``model`` on ``images``, as the
    dispatcher sees them under ``precision``'s autocast: how many there are and which ones are
    not channels_last or not in the autocast dtype (a format or dtype detour costs a copy and can
    send batch norm to another kernel).

    Args:
        model: on ``images``' device, channels_last.
        images: float ``(N, 3, H, W)``, channels_last; N >= 2 (N=1 tensors are ambiguous).
        precision: resolved ``fp32 | bf16 | fp16``.

    Returns:
        ``{"activations": int, "detours": {"op dtype format": count}, "dtype": str}``; a tensor
        counts as an activation when its batch dimension is N and it has more than 3 channels and
        a spatial size above 1x1 (so weights, their gradients and pooled vectors are left out).
        Integer tensors (max-pool's indices) and broadcast views (a zero stride: nothing is
        written) are left out.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = images.shape[0]
    found: dict[str, Any] = {"activations": 0, "detours": {}, "dtype": str(want).replace("torch.", "")}

    class _Walk(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != n
                        or t.shape[1] <= 3 or t.shape[2] * t.shape[3] <= 1
                        or not t.is_floating_point() or 0 in t.stride()):
                    continue  # not an activation, or a broadcast view (nothing materialised)
                found["activations"] += 1
                cl = t.is_contiguous(memory_format=torch.channels_last)
                if not cl or t.dtype != want:
                    key = f"{func} {str(t.dtype).replace('torch.', '')} " \
                          f"{'channels_last' if cl else 'not channels_last'}"
                    found["detours"][key] = found["detours"].get(key, 0) + 1
            return out

    with runtime.autocast(precision, images.device), _Walk():
        out = model(images)
        if backward:
            out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return found

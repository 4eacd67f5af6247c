"""``ran bench JOB.yaml``: the job's training step timed on this machine, every setting side by side.

Without Ray, on synthetic device-resident batches at the job's crop, every candidate setting of the
step (:mod:`ran.train.step`) runs 20 steps from the same initial weights on the same batches, then
is timed: precision (fp32; bf16 and fp16 where the device computes them natively) x eager /
``torch.compile`` (each mode that applies) / whole-step CUDA graph (GPUs), each beside torchvision's
ResNet-50 (``--baseline``) under the same setting, at each ``--batch``. A row gives img/s, ms per
step, the model FLOP utilisation (3 x 2 x forward MACs x img/s against a bf16 matmul timed in the
same run; fp32 on a CPU without bf16 units), peak memory, compile or capture time, and whether its
loss over its first 20 steps (the curve's mean) matches eager's within tolerance. It ends with the fastest
setting as ``--set`` overrides that ``ran train`` accepts, and records it in the step table
(:mod:`ran.steptable`) that ``train.precision: auto`` and ``train.compile: auto`` read.

``--data`` also times the job's own loader alone and the fastest step fed by it (fed / synthetic
img/s), so a starved GPU shows. The layout walk (:func:`ran.train.step.layout_walk`) reports any
activation that leaves channels_last or the autocast dtype.

Why our own: no peer's training service measures its own step per setting like this (timm's
benchmark.py times models, not a job's step; MLPerf's tables are per submission).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ran import runtime, steptable
from ran.config import ConfigError, JobConfig, load_config
from ran.data.transforms import normalizer, train_crop
from ran.models import count_macs
from ran.train.step import MicroBatch, TrainStep, build_optimizer, check_device, compile_model, layout_walk

CHECK_STEPS = 20  # steps whose losses are compared with eager's
DISTINCT_BATCHES = 8  # synthetic batches cycled through (fixed seed)
# Relative difference allowed between a setting's mean loss over its CHECK_STEPS steps and eager's
# in the same precision (eager bf16/fp16: against eager fp32). Compile and graphs reorder
# reductions, and 20 SGD steps on fixed random batches amplify any rounding (measured here on the
# test's tiny Attention-56, fp32: gradients of eager and compiled already differ by up to 7% in
# near-degenerate BatchNorm channels, the loss of step 20 by a third, the 20-step mean by 2.4%):
# the mean of the curve is what is compared, at bf16's tolerance for every precision.
TOLERANCE = {"fp32": 0.05, "bf16": 0.08, "fp16": 0.08}
GPU_MODES = ("eager", "default", "reduce-overhead", "cuda_graph", "default+cuda_graph")
CPU_MODES = ("eager", "default")
ALL_MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
             "cuda_graph", "default+cuda_graph", "max-autotune-no-cudagraphs+cuda_graph")


@dataclass
class Variant:
    """One setting of the step: a precision, a compile mode (``off`` = eager), a CUDA graph."""

    precision: str
    compile: str
    cuda_graph: bool

    @property
    def name(self) -> str:
        parts = [self.precision, "eager" if self.compile == "off" else f"compile={self.compile}"]
        return " ".join(parts + (["cuda_graph"] if self.cuda_graph else []))

    def overrides(self) -> list[str]:
        return [f"train.precision={self.precision}", f"train.compile={self.compile}",
                f"train.cuda_graph={str(self.cuda_graph).lower()}"]


@dataclass
class Row:
    """One timed setting of one model at one batch size."""

    model: str
    variant: str
    precision: str
    compile: str
    cuda_graph: bool
    batch_size: int
    img_per_s: float | None = None
    ms_per_step: float | None = None
    mfu: float | None = None  # of the measured matmul peak
    peak_mem_mb: float | None = None
    compile_s: float | None = None  # first step's extra seconds: compile or warm-up + capture
    loss_20: float | None = None  # mean loss over the CHECK_STEPS checked steps
    loss_reference: str | None = None  # the row it is compared with
    loss_rel_diff: float | None = None
    loss_ok: bool | None = None
    error: str | None = None  # why the row has no figures (out of memory, a failed compile, ...)


@dataclass
class Report:
    device: str
    torch: str
    job: str
    model: str
    crop: int
    num_classes: int
    peak_tflops: float
    peak_dtype: str
    rows: list[Row] = field(default_factory=list)
    fastest: dict[str, Any] | None = None
    relative_to_baseline: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    step_table: str | None = None


# ---------------------------------------------------------------------------------------------
# What runs where


def native_precisions(device: torch.device) -> list[str]:
    """fp32, bf16 where ``device`` computes it in hardware (emulated, it is slower than fp32), and
    fp16 on a GPU."""
    found = ["fp32"]
    if runtime.native_bf16(device):
        found.append("bf16")
    if device.type == "cuda":
        found.append("fp16")
    # No fp16 on a CPU by default: on a Xeon with AVX512-FP16 (and AMX for bf16), fp16 autocast ran
    # the test's tiny Attention-56 at 0.10x and ResNet-18 at 0.02x of fp32 (ran bench, 2026-12-04);
    # --precision fp16 still times it.
    return found


def variants(device: torch.device, precisions: list[str] | None = None,
             modes: list[str] | None = None) -> list[Variant]:
    """Every setting to time on ``device``: ``precisions`` x ``modes`` (default: the native
    precisions x eager and compiled, plus reduce-overhead and CUDA graphs on a GPU), without the
    combinations the step refuses (a CUDA graph with fp16). Eager is always among the modes: it is
    the reference every other setting's loss is checked against.

    Raises:
        ConfigError: an unknown mode, or a CUDA graph asked for on a device that is not a GPU.
    """
    precisions = precisions or native_precisions(device)
    modes = modes or list(GPU_MODES if device.type == "cuda" else CPU_MODES)
    if "eager" not in modes:  # every setting's loss is checked against eager's
        modes = ["eager", *modes]
    for mode in modes:
        if mode not in ALL_MODES:
            raise ConfigError(f"--modes: unknown mode {mode!r}; valid: {', '.join(ALL_MODES)}")
        if "cuda_graph" in mode and device.type != "cuda":
            raise ConfigError(f"--modes {mode}: CUDA graphs need a CUDA GPU and this machine has "
                              "none; leave cuda_graph out")
    for p in precisions:
        if p not in TOLERANCE:
            raise ConfigError(f"--precision: unknown precision {p!r}; valid: fp32, bf16, fp16")
    found = []
    for p in precisions:
        for mode in modes:
            graph = mode.endswith("cuda_graph")
            compile_mode = mode.removesuffix("cuda_graph").rstrip("+") or "off"
            if compile_mode == "eager":
                compile_mode = "off"
            if graph and p == "fp16":
                continue
            found.append(Variant(p, compile_mode, graph))
    return found


def matmul_peak(device: torch.device) -> tuple[float, str]:
    """TFLOP/s of a square bf16 matmul on ``device`` (fp32 on a CPU without bf16 units), best of
    a few: the MFU denominator, measured in the same run as the steps."""
    dtype = torch.bfloat16 if runtime.native_bf16(device) else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best / 1e12, str(dtype).replace("torch.", "")


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while the block runs."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def device_lock() -> contextlib.AbstractContextManager:
    """The file lock ``RAN_BENCH_LOCK`` names (none when unset): benches run side by side
    (benchmarks/gpu_check.py) compile at once but time their steps one at a time."""
    path = os.environ.get("RAN_BENCH_LOCK")
    return file_lock(path) if path else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakRss:
    """The process's resident memory above its level at the start, sampled every 5 ms (a CPU has
    no allocator statistics like CUDA's), in MB."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return max(self.peak, 0) / 2**20


# ---------------------------------------------------------------------------------------------
# One row


def _baseline(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _batches(batch: int, crop: int, classes: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DISTINCT_BATCHES uint8 batches on ``device`` (fixed seed) that can be learnt: each class has
    a fixed random pattern, and an image is its class's pattern plus noise. Random labels on noise
    would be memorised, and memorising amplifies rounding until eager and compiled curves part for
    no fault of either; a learnable signal keeps the 20-step curves comparable."""
    g = torch.Generator().manual_seed(0)
    patterns: dict[int, torch.Tensor] = {}
    out = []
    for _ in range(DISTINCT_BATCHES):
        labels = torch.randint(0, classes, (batch,), generator=g)
        for c in labels.tolist():
            if c not in patterns:
                patterns[c] = torch.randn(3, crop, crop, generator=torch.Generator().manual_seed(c + 1))
        signal = torch.stack([patterns[c] for c in labels.tolist()])
        noise = torch.randn(batch, 3, crop, crop, generator=g)
        images = (128 + 50 * signal + 25 * noise).clamp(0, 255).to(torch.uint8)
        out.append((images.to(device), labels.to(device)))
    return out


def time_row(cfg: JobConfig, model_name: str, variant: Variant, batch: int, crop: int,
             classes: int, device: torch.device, steps: int, flops_per_image: float,
             peak_tflops: float) -> Row:
    """Time ``variant`` of the step of ``model_name`` (the job's model, or a torchvision baseline)
    at ``batch``: CHECK_STEPS steps from the seed's weights on fixed batches (losses kept), then
    ``steps`` timed steps. Errors (out of memory, a failed compile) become the row's ``error``."""
    row = Row(model=model_name, variant=variant.name, precision=variant.precision,
              compile=variant.compile, cuda_graph=variant.cuda_graph, batch_size=batch)
    rss = _PeakRss() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        torch.manual_seed(cfg.train.seed)
        model = runtime.build_model(cfg) if model_name == cfg.model.name else _baseline(model_name, classes)
        model = model.to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        lr = cfg.optim.lr * batch / cfg.optim.reference_batch_size
        optimizer = build_optimizer(model, cfg, lr)
        step = TrainStep(compile_model(model, variant.compile), optimizer,
                         nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
                         normalizer(cfg.data.recipe), device=device, precision=variant.precision,
                         channels_last=cfg.train.channels_last, cuda_graph=variant.cuda_graph)
        data = _batches(batch, crop, classes, device)
        losses, times = [], []
        lock = contextlib.ExitStack()
        with lock:
            for i in range(CHECK_STEPS + steps):
                if i == 1:  # compiled or captured: the rest runs alone on the device
                    lock.enter_context(device_lock())
                images, labels = data[i % len(data)]
                _sync(device)
                start = time.perf_counter()
                loss, n = step([MicroBatch(images, labels, 1.0, batch)])
                if i < CHECK_STEPS:
                    losses.append(loss / n)
                _sync(device)
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times[CHECK_STEPS:])
        row.ms_per_step = round(step_s * 1e3, 3)
        row.img_per_s = round(batch / step_s, 1)
        row.compile_s = round(max(times[0] - step_s, 0.0), 2)
        row.mfu = round(flops_per_image * row.img_per_s / (peak_tflops * 1e12), 4)
        row.loss_20 = round(float(torch.stack(losses).mean()), 6)
    except torch.OutOfMemoryError:
        row.error = "out of memory"
    except Exception as err:  # noqa: BLE001 - a failed variant is a row, not the end of the bench
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        if device.type == "cuda":
            row.peak_mem_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            torch.cuda.empty_cache()
        peak = rss.stop() if rss else None
        if peak is not None:
            row.peak_mem_mb = round(peak, 1)
        torch._dynamo.reset()
    return row


def check_losses(rows: list[Row]) -> None:
    """Compare each row's mean loss over CHECK_STEPS steps with the eager row of the same model, batch and
    precision (eager rows with eager fp32), within the precision's :data:`TOLERANCE`."""
    eager = {(r.model, r.batch_size, r.precision): r for r in rows
             if r.compile == "off" and not r.cuda_graph and r.loss_20 is not None}
    for r in rows:
        if r.loss_20 is None:
            continue
        is_eager = r.compile == "off" and not r.cuda_graph
        ref = eager.get((r.model, r.batch_size, "fp32" if is_eager else r.precision))
        if ref is None and is_eager:  # no fp32 eager row to compare with: eager is the reference
            ref = r
        if ref is None or ref is r:
            r.loss_ok = True if ref is r else None
            r.loss_reference = "itself" if ref is r else None
            continue
        r.loss_reference = ref.variant
        r.loss_rel_diff = round(abs(r.loss_20 - ref.loss_20) / max(abs(ref.loss_20), 1e-8), 5)
        r.loss_ok = r.loss_rel_diff <= TOLERANCE[r.precision]


def fastest(rows: list[Row], model: str) -> Row | None:
    """The job model's row with the most img/s whose loss matches eager's."""
    ok = [r for r in rows if r.model == model and r.img_per_s and r.loss_ok]
    return max(ok, key=lambda r: r.img_per_s) if ok else None


def set_line(row: Row, cfg: JobConfig, device: torch.device) -> str:
    """The fastest setting as ``--set`` overrides ``ran train`` accepts."""
    pairs = [f"train.precision={row.precision}", f"train.compile={row.compile}",
             f"train.cuda_graph={str(row.cuda_graph).lower()}", f"data.batch_size={row.batch_size}"]
    if device.type == "cuda" and not cfg.scaling.use_gpu:
        pairs.append("scaling.use_gpu=true")
    return " ".join(f"--set {p}" for p in pairs)


# ---------------------------------------------------------------------------------------------
# Where the time goes

# Op families of a step, matched on kernel or operator names, first match wins.
FAMILIES = (("batch_norm", r"batch_norm|batchnorm|bn_fw|bn_bw"),
            ("convolution", r"conv|xmma|cutlass|gemm|nvjet|sm\d+_|mm\b|addmm|matmul|linear"),
            ("upsample", r"upsample|interp"),
            ("max_pool", r"max_pool|maxpool"),
            ("copy", r"copy|to_copy|contiguous|clone"),
            ("optimizer", r"sgd|foreach|multi_tensor"),
            ("elementwise", r"elementwise|add|mul|relu|threshold|sigmoid|div|clamp|fill|reduce|sum|mean|triton"))


def family(name: str) -> str:
    """The op family of a kernel or operator ``name`` (:data:`FAMILIES`), else ``other``."""
    low = name.lower()
    return next((fam for fam, pattern in FAMILIES if re.search(pattern, low)), "other")


def profile_families(cfg: JobConfig, row: Row, crop: int, classes: int, device: torch.device,
                     steps: int = 3) -> dict[str, Any]:
    """``steps`` steps of ``row``'s setting under ``torch.profiler``: the share of device time (CPU
    time on a CPU) per op family, and the kernels (operators) launched per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(cfg.train.seed)
    model = runtime.build_model(cfg).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, cfg.optim.lr * row.batch_size / cfg.optim.reference_batch_size)
    step = TrainStep(compile_model(model, row.compile), optimizer, nn.CrossEntropyLoss(),
                     normalizer(cfg.data.recipe), device=device, precision=row.precision,
                     channels_last=cfg.train.channels_last, cuda_graph=row.cuda_graph)
    data = _batches(row.batch_size, crop, classes, device)
    for i in range(3):
        step([MicroBatch(*data[i % len(data)], 1.0, row.batch_size)])
    _sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with device_lock(), profile(activities=activities) as prof:
        for i in range(steps):
            step([MicroBatch(*data[i % len(data)], 1.0, row.batch_size)])
        _sync(device)
    totals: dict[str, float] = {}
    launches = 0
    for event in prof.key_averages():
        if cuda:
            t = getattr(event, "self_device_time_total", 0.0) or 0.0
            is_kernel = t > 0 and event.device_type.name == "CUDA"
        else:
            t = event.self_cpu_time_total
            is_kernel = event.key.startswith("aten::")
        if not is_kernel:
            continue
        launches += event.count
        totals[family(event.key)] = totals.get(family(event.key), 0.0) + t
    whole = sum(totals.values()) or 1.0
    torch._dynamo.reset()
    return {"setting": row.variant, "batch_size": row.batch_size, "steps": steps,
            "time": "device" if cuda else "cpu",
            "share": {k: round(v / whole, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "launches_per_step": round(launches / steps, 1),
            "ms_per_step": round(whole / steps / 1e3, 3)}


# ---------------------------------------------------------------------------------------------
# The data path


def time_data(cfg: JobConfig, row: Row, device: torch.device, steps: int) -> dict[str, Any]:
    """The job's own training loader alone, and the ``row``'s step fed by it: img/s of each and
    fed / synthetic (the row's own img/s)."""
    from ran.data.read import make_loader

    d = cfg.data
    loader = make_loader(d.path, d.train_split, train=True, batch_size=row.batch_size,
                         recipe=d.recipe, crop=d.crop, workers=d.workers, seed=cfg.train.seed,
                         pin_memory=device.type == "cuda", max_bad_fraction=d.max_bad_fraction,
                         decode=d.decode, device=device)

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    it = batches()
    next(it)  # workers started
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        n += len(next(it).labels)
    loader_img_s = n / (time.perf_counter() - start)

    torch.manual_seed(cfg.train.seed)
    model = runtime.build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, cfg.optim.lr * row.batch_size / cfg.optim.reference_batch_size)
    step = TrainStep(compile_model(model, row.compile), optimizer, nn.CrossEntropyLoss(),
                     normalizer(d.recipe), device=device, precision=row.precision,
                     channels_last=cfg.train.channels_last, cuda_graph=row.cuda_graph)
    for _ in range(3):  # compile, capture, warm-up
        b = next(it)
        step([MicroBatch(b.images, b.labels, 1.0, len(b.labels))])
    _sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        b = next(it)
        if len(b.labels) != row.batch_size:
            continue
        step([MicroBatch(b.images, b.labels, 1.0, len(b.labels))])
        n += len(b.labels)
    _sync(device)
    fed = n / (time.perf_counter() - start)
    torch._dynamo.reset()
    return {"loader_img_per_s": round(loader_img_s, 1), "fed_img_per_s": round(fed, 1),
            "synthetic_img_per_s": row.img_per_s, "setting": row.variant,
            "batch_size": row.batch_size, "workers": d.workers, "decode": d.decode,
            "fed_over_synthetic": round(fed / row.img_per_s, 3) if row.img_per_s else None}


# ---------------------------------------------------------------------------------------------
# The command


def _num_classes(cfg: JobConfig) -> int:
    if cfg.model.num_classes:
        return cfg.model.num_classes
    with contextlib.suppress(Exception):
        from ran.data.read import read_manifest

        return len(read_manifest(cfg.data.path)["classes"])
    return 1000 if cfg.data.recipe == "imagenet" else 10


def run_bench(cfg: JobConfig, job: str, *, batches: list[int], device: torch.device,
              precisions: list[str] | None = None, modes: list[str] | None = None,
              baseline: str | None = "resnet50", steps: int = 20, data: bool = False,
              data_steps: int = 30, budget_s: float | None = None, save: bool = True,
              profile: bool = False, progress: Any = None) -> Report:
    """Time every setting of ``cfg``'s step on ``device`` (see the module docstring).

    Args:
        batches: per-device batch sizes to time.
        precisions, modes: restrict the variants (:func:`variants`).
        baseline: a torchvision model timed beside the job's under each setting; None: none.
        steps: timed steps per row (after the CHECK_STEPS checked ones).
        data: also time the job's loader and the fastest step fed by it.
        budget_s: start no new row after this many seconds (rows not run are left out and
            counted in the report's ``skipped`` note).
        save: record the fastest setting in the user's step table.
        profile: also profile the fastest setting by op family (:func:`profile_families`).
        progress: a callable taking one line per row (``print`` to stderr by default).

    Raises:
        ConfigError: a variant the device cannot run, or an unknown precision or mode.
    """
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    check_device(cfg, device)
    todo = variants(device, precisions, modes)
    crop = cfg.data.crop or train_crop(cfg.data.recipe)
    classes = _num_classes(cfg)
    cfg = cfg.with_values({"model.num_classes": classes})
    peak, peak_dtype = matmul_peak(device)
    key = runtime.model_key(cfg)
    flops = {cfg.model.name: 6.0 * count_macs(runtime.build_model(cfg), crop)}
    if baseline:
        flops[baseline] = 6.0 * count_macs(_baseline(baseline, classes), crop)
    report = Report(device=runtime.device_kind(device), torch=torch.__version__, job=job, model=key,
                    crop=crop, num_classes=classes, peak_tflops=round(peak, 2), peak_dtype=peak_dtype)
    say(f"ran bench: {key} at {crop} px on {report.device}; {len(todo)} settings x "
        f"{len(batches)} batch sizes x {len(flops)} models; {peak_dtype} matmul {peak:.2f} TFLOP/s")
    start = time.perf_counter()
    for batch in batches:
        for variant in todo:
            for model_name in flops:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    say(f"budget of {budget_s:.0f} s spent: {model_name} {variant.name} b{batch} not run")
                    continue
                row = time_row(cfg, model_name, variant, batch, crop, classes, device, steps,
                               flops[model_name], peak)
                report.rows.append(row)
                say(f"  {model_name:<12} b{batch:<4} {variant.name:<40} "
                    + (row.error if row.error else f"{row.img_per_s:>9.1f} img/s "
                       f"{row.ms_per_step:>8.2f} ms  mfu {row.mfu:.3f}  first step +{row.compile_s} s"))
    check_losses(report.rows)
    _relative(report, cfg.model.name, baseline)
    best = fastest(report.rows, cfg.model.name)
    if best is not None:
        report.fastest = {**asdict(best), "set": set_line(best, cfg, device)}
        walk_model = runtime.build_model(cfg).to(device).to(memory_format=torch.channels_last)
        images = torch.randn(3, 3, crop, crop, device=device).contiguous(memory_format=torch.channels_last)
        report.layout = layout_walk(walk_model, images, best.precision)
        if profile:
            report.profile = profile_families(cfg, best, crop, classes, device)
        if data:
            report.data = time_data(cfg, best, device, data_steps)
        if save:
            report.step_table = str(steptable.record(report.device, key, {
                "model": key, "precision": best.precision, "compile": best.compile,
                "cuda_graph": best.cuda_graph, "batch_size": best.batch_size,
                "img_per_s": best.img_per_s, "measured": datetime.date.today().isoformat(),
                "by": "ran bench"}))
    return report


def _relative(report: Report, model: str, baseline: str | None) -> None:
    """The job model's MFU over the baseline's, each in its fastest setting, and per setting."""
    if not baseline:
        return
    mine = fastest(report.rows, model)
    # The baseline is a speed reference: its fastest row whatever its loss did (an ImageNet-stem
    # ResNet at a CIFAR crop ends at 1x1 maps, where batch norm over a small batch is unstable).
    theirs = max((r for r in report.rows if r.model == baseline and r.mfu), default=None,
                 key=lambda r: r.mfu)
    by_setting = {}
    for r in report.rows:
        if r.model == model and r.mfu:
            other = next((b for b in report.rows if b.model == baseline and b.variant == r.variant
                          and b.batch_size == r.batch_size and b.mfu), None)
            if other:
                by_setting[f"{r.variant} b{r.batch_size}"] = round(r.mfu / other.mfu, 3)
    report.relative_to_baseline = {
        "baseline": baseline,
        "mfu_best_over_best": round(mine.mfu / theirs.mfu, 3) if mine and theirs and theirs.mfu else None,
        "mfu_by_setting": by_setting,
    }


def _table(report: Report) -> str:
    lines = [f"{report.model} at {report.crop} px on {report.device} (torch {report.torch}; "
             f"{report.peak_dtype} matmul {report.peak_tflops} TFLOP/s)",
             f"{'model':<12} {'batch':>5}  {'setting':<40} {'img/s':>9} {'ms/step':>8} {'MFU':>6} "
             f"{'mem MB':>8} {'compile s':>9}  loss@20"]
    for r in report.rows:
        if r.error:
            lines.append(f"{r.model:<12} {r.batch_size:>5}  {r.variant:<40} {r.error}")
            continue
        ok = {True: "ok", False: f"OFF by {r.loss_rel_diff}", None: "-"}[r.loss_ok]
        lines.append(f"{r.model:<12} {r.batch_size:>5}  {r.variant:<40} {r.img_per_s:>9.1f} "
                     f"{r.ms_per_step:>8.2f} {r.mfu:>6.3f} {r.peak_mem_mb or 0:>8.0f} "
                     f"{r.compile_s:>9.1f}  {r.loss_20:.4f} {ok}")
    rel = report.relative_to_baseline.get("mfu_best_over_best")
    if rel is not None:
        lines.append(f"MFU of {report.model} / {report.relative_to_baseline['baseline']}, each at its "
                     f"fastest: {rel}")
    if report.layout is not None:
        detours = report.layout["detours"]
        lines.append(f"layout: {report.layout['activations']} activations, "
                     + ("all channels_last and " + report.layout["dtype"] if not detours
                        else f"detours: {detours}"))
    if report.profile:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in report.profile["share"].items())
        lines.append(f"profile ({report.profile['setting']}): {shares}; "
                     f"{report.profile['launches_per_step']} launches a step")
    if report.data:
        d = report.data
        lines.append(f"data: loader alone {d['loader_img_per_s']} img/s; fed step "
                     f"{d['fed_img_per_s']} img/s = {d['fed_over_synthetic']} of synthetic")
    if report.fastest:
        lines.append(f"fastest: {report.fastest['variant']} b{report.fastest['batch_size']}, "
                     f"{report.fastest['img_per_s']} img/s; for ran train:")
        lines.append(f"  {report.fastest['set']}")
        if report.step_table:
            lines.append(f"recorded in {report.step_table} (train.precision/compile: auto read it)")
    else:
        lines.append("no setting ran to the end with a matching loss")
    return "\n".join(lines)


def _csv(flag: str, text: str, kind: type = str) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected a comma-separated list of {kind.__name__}, got "
                          f"{text!r}") from None


def cli_bench(args: argparse.Namespace) -> int:
    """``ran bench``: see :func:`run_bench`."""
    cfg = load_config(args.job, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = _csv("--batch", args.batch, int) if args.batch else [cfg.data.batch_size]
    if any(b < 1 for b in batches):
        raise ConfigError(f"--batch: batch sizes must be at least 1, got {args.batch}")
    if args.steps < 1 or args.data_steps < 1:
        raise ConfigError(f"--steps and --data-steps must be at least 1, got {args.steps} and "
                          f"{args.data_steps}")
    if args.baseline != "none":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if args.baseline not in known:
            raise ConfigError(f"--baseline {args.baseline}: not a torchvision classification model "
                              f"(e.g. resnet50, resnet18, or none)")
    report = run_bench(cfg, args.job, batches=batches, device=device,
                       precisions=_csv("--precision", args.precision) if args.precision else None,
                       modes=_csv("--modes", args.modes) if args.modes else None,
                       baseline=None if args.baseline == "none" else args.baseline,
                       steps=args.steps, data=args.data, data_steps=args.data_steps,
                       budget_s=args.budget_s, profile=args.profile,
                       save=not args.no_save)
    if args.json:
        print(json.dumps(asdict(report), indent=1))
    else:
        print(_table(report))
    return 0 if report.fastest else 1

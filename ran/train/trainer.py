"""The per-worker training loop: a :class:`Trainer`, run once per worker (by Ray Train through
:mod:`ran.train.raytrain`, or directly in a plain process).

A Trainer owns the model (DDP-wrapped when a process group is up), the optimizer, the lr
schedule, the loaders and the counters (``step``, ``samples``, ``epoch``): ``train_step`` /
``train_epoch`` / ``validate`` / ``state_dict`` / ``load_state_dict``. It knows nothing of Ray or
MLflow and imports neither (a test walks its imports). It is handed its components: a *reporter*
(:class:`Reporter`: the checkpoint to restore from, and where metrics and checkpoints go;
:class:`LocalReporter` here, ``ran.train.raytrain.RayReporter`` on Ray Train), a *console*
(:class:`Console`: progress lines on rank 0) and, on rank 0, a *run log* (:class:`RunLog`:
MLflow off the training path, ``ran.train.raytrain.TrackedRun``). The same class runs in a plain
process (``Trainer(cfg)``), which the tests use.

Loop: restore (and re-plan, :mod:`ran.train.schedule`) -> for each epoch: train -> validate (on
cadence, always at the end) -> rank 0 queues its metrics for MLflow -> every worker reports (a
barrier), rank 0 with a checkpoint on cadence.

Progress is counted in samples, so a run restarted with another world size trains the same samples
with the lr rescaled (:func:`ran.train.schedule.plan_run`); what changed is tagged on the MLflow
run (``ran.plan.*`` for the current attempt, ``ran.replanned.step_<N>`` for each change) and, for an
elastic group, logged as per-attempt metrics (``plan/world_size``, ``plan/global_batch``,
``plan/peak_lr`` at the step where the attempt began), never as params, which MLflow would refuse
to change. Metric names follow :mod:`ran.tracking.names` (eval/, perf/, plan/, train/).

Checkpoints come on an epoch cadence (``train.checkpoint_every``), a step cadence
(``train.checkpoint_every_steps``) and on notice: a SIGTERM to any worker (how spot reclaims and
Kubernetes evictions arrive; ``ran.train.raytrain.SigtermNotice`` turns Ray's exit-at-once into
the Trainer's ``notice``) makes every rank, at the next step boundary, write a checkpoint at that
step, wait until Ray Train has registered it and stop the worker group (:class:`Interrupted`), which Ray Train restarts from it;
Ray's own preemption notice (``ray.train.get_preemption_info``, a drained node) makes a
just-in-time checkpoint and training goes on until Ray restarts the group. Rank 0 copies its state
to host memory and hands it to Ray Train's asynchronous upload (``train.checkpoint_upload``:
``async``), which writes and uploads it while the workers train on; the next checkpoint first waits
until the previous one is registered, so at most one is in flight. The seconds the training thread
spent on each checkpoint are the ``perf/step_ckpt_wait_s`` metric (summed over an epoch's mid-epoch
checkpoints: ``perf/ckpt_wait_s``).

Data order: an epoch that begins in an attempt reads the loader's stream for that epoch
(resampled shards, shuffled by ``train.seed``, the epoch and the rank); the rest of an epoch resumed
mid-way reads a new stream, keyed by the epoch and the samples seen at the resume
(:func:`data_stream`): the samples already trained in it are not replayed, and the epoch still
trains exactly ``train/epoch_samples`` samples (its loss and sample count continue from the checkpoint).

A checkpoint (``checkpoint.pt`` in the checkpoint directory) holds only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)``: model, optimizer, scheduler
and grad-scaler state, ``step``, ``samples``, ``epoch``, the progress of the epoch in progress,
the RNG states of every rank, the MLflow run id, the resolved config and the attempt's plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ran import runtime
from ran.config import JobConfig
from ran.data.read import make_loader, split_shards
from ran.data.transforms import normalizer
from ran.train.rundir import storage_full
from ran.train.schedule import RunPlan, build_scheduler, plan_run, step_shares, step_size
from ran.train.step import MicroBatch, TrainStep, build_optimizer, check_device, compile_model

# Steps between polls of Ray's preemption notice: a collective through Ray Train's synchronization
# actor (milliseconds), while a spot reclaim gives minutes.
PREEMPTION_POLL_STEPS = 10


# ---------------------------------------------------------------------------------------------
# Building blocks


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


from ran.train.console import Console  # noqa: E402 - its own module (output settings); kept here, where it was


class RunLog(Protocol):
    """Where rank 0's metrics and notes about the run go: MLflow through
    :class:`ran.train.raytrain.TrackedRun`, or a list in a test. The log names them (tags)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Metrics at optimizer step ``step``."""
        ...

    def log_attempt(self, attempt: dict[str, Any]) -> None:
        """How this attempt (a start of the worker group) runs: ``plan`` (the
        :class:`~ran.train.schedule.RunPlan` as a dict), ``precision``, ``precision_reason``,
        ``compile``; on a restart ``resumed_from`` (``epoch=E step=S``) and, when the plan
        changed, ``replanned`` (``(step, what changed)``)."""
        ...

    def log_notice(self, message: str) -> None:
        """The SIGTERM the worker group checkpointed and stopped on (one line)."""
        ...

    def unlogged(self) -> dict[str, str]:
        """For the run's last report: what the log could not write ({} when it wrote all)."""
        ...


@dataclass
class Snapshot:
    """Rank 0's state at a checkpoint, in host memory, and how to write it (``checkpoint.pt`` and
    a readable ``config.yaml``). ``release`` drops the copy once written."""

    state: dict[str, Any] | None
    config_yaml: str

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        assert self.state is not None, "snapshot already written and released"
        try:  # through a Python file: a full disk is an OSError (ENOSPC), not torch's RuntimeError
            with open(directory / runtime.CHECKPOINT_FILE, "wb") as f:
                torch.save(self.state, f)
            (directory / "config.yaml").write_text(self.config_yaml)
        except (OSError, RuntimeError) as err:  # torch ends the file even after a failed write
            cause = next((e for e in _chain(err) if isinstance(e, OSError)), None)
            if cause is None:
                raise
            raise storage_full(cause, directory) from cause
        return directory

    def release(self) -> None:
        self.state = None


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from or during, innermost last."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


class Reporter(Protocol):
    """How a Trainer talks to its launcher (Ray Train, or nothing)."""

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """The checkpoint directory to restore from, if any."""
        ...

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None, name: str) -> None:
        """Report metrics (every rank, the same number of times), with rank 0's checkpoint."""
        ...

    def wait_committed(self) -> None:
        """Return once everything reported so far is registered (a restart resumes from it)."""
        ...

    def preempted(self) -> bool:
        """Whether the launcher announced a preemption (every rank calls it equally often)."""
        ...

    def stop_requested(self) -> bool:
        """Whether the launcher asks the run to checkpoint and end (``ran train`` got SIGINT)."""
        ...


class LocalReporter:
    """Single-process runs: checkpoints go to ``directory/<name>``; metrics are kept in a list."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.metrics: list[dict[str, float]] = []

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        found = runtime.latest_checkpoint(self.directory) if self.directory else None
        yield str(found) if found else None

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None, name: str) -> None:
        self.metrics.append(dict(metrics))
        if snapshot is not None and self.directory:
            snapshot.write(self.directory / name)
            snapshot.release()

    def wait_committed(self) -> None:
        pass

    def preempted(self) -> bool:
        return False

    def stop_requested(self) -> bool:
        return False


class Diverged(RuntimeError):
    """A loss or the weights stopped being finite: every rank stops at the same step, and no
    checkpoint of this state is written (the last one written is the last finite one)."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"{reason} at step {step}")
        self.step = step


class Stopped(RuntimeError):
    """The run ended on the launcher's request (SIGINT to ``ran train``) after the checkpoint of
    the step reached was registered; the worker group ends without error (not restarted)."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped at step {step}: checkpoint {checkpoint} is registered")
        self.step, self.checkpoint = step, checkpoint


class Interrupted(RuntimeError):
    """The worker group stopped on notice after its checkpoint was registered (Ray Train restarts
    it from that checkpoint)."""


def data_stream(epoch: int, resumed_at: int | None, part: int) -> int:
    """The loader's shuffle key (``Loader.set_epoch``) for ``part`` of epoch ``epoch``: the epoch
    itself when it is read from its start, else a 56-bit hash of (epoch, the samples seen at the
    resume, part). ``part`` > 0 tops up an epoch whose last step needs more batches than one pass
    of the loader holds."""
    if resumed_at is None and part == 0:
        return epoch
    digest = hashlib.blake2b(f"{epoch}/{resumed_at}/{part}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


def _host_copy(tree: Any) -> Any:
    """``tree`` with every tensor copied to host memory (training may change the originals)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(v) for v in tree)
    return tree


# ---------------------------------------------------------------------------------------------
# The Trainer


class Trainer:
    """One worker's share of a data-parallel run.

    Args:
        cfg: the resolved job config (absolute ``data.path``, ``model.num_classes`` set).
        device: where to train; default CPU.
        run_id: the MLflow run this training belongs to (kept in checkpoints).
        run_log: where rank 0's metrics, params and tags go (None: nowhere).
        console: progress lines (default: printed on rank 0).
        launched_at: the launcher's ``time.time()``; the first epoch then reports ``perf/startup_s``,
            the seconds from launch to the first optimizer step.
        notice: set when this worker got a SIGTERM (:class:`ran.train.raytrain.SigtermNotice`):
            every rank checkpoints the step reached and stops (:class:`Interrupted`).

    Rank and world size come from ``torch.distributed`` when a process group is up (Ray Train
    sets one up); with more than one worker the model is then wrapped in DDP.
    """

    def __init__(self, cfg: JobConfig, *, device: torch.device | None = None,
                 run_id: str | None = None, run_log: RunLog | None = None,
                 console: Console | None = None, launched_at: float | None = None,
                 notice: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        group = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if group else 0
        self.world_size = dist.get_world_size() if group else 1
        self.distributed = self.world_size > 1  # one worker: no DDP, no collectives
        self.is_master = self.rank == 0
        self.run_id = run_id
        self.run_log = run_log if self.is_master else None
        self.console = console or Console(enabled=self.is_master)
        self.launched_at = launched_at  # driver's time.time() at launch, for startup_s
        self.startup_s: float | None = None  # seconds from launch to the first optimizer step
        self.step = 0  # optimizer steps done
        self.samples = 0  # training samples seen, all ranks together
        self.epoch = 0  # epochs done
        self.last_val: dict[str, float] = {}
        self.notice = notice or threading.Event()  # set on a SIGTERM: checkpoint and stop
        self.previous_plan: dict[str, Any] | None = None  # the plan of the checkpoint restored
        # Sums of the epoch in progress: this attempt's [loss (device tensor), samples, skipped]
        # on this rank, and [loss, samples, skipped] of all ranks before a mid-epoch resume.
        self._running: list[Any] = [0.0, 0, 0.0]
        self._carried: list[float] = [0.0, 0.0, 0.0]
        self._due: str | None = None  # why the step just done must be checkpointed
        self._preemption_seen = False  # Ray announced a preemption (one checkpoint per attempt)
        self._ckpt_wait = 0.0  # seconds this epoch's training waited on checkpoints

        check_device(cfg, self.device)  # before any work: no CUDA graph on a CPU
        model = runtime.model_key(cfg)
        self.precision, self.precision_reason = runtime.choose_precision(cfg.train.precision,
                                                                         self.device, model)
        self.compile_mode, self.compile_reason = runtime.choose_compile(cfg.train.compile,
                                                                        self.device, model)
        _seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.raw_model = self._build_model()
        self.model = self._wrap(self.raw_model)
        _seed_everything(cfg.train.seed + 1000 * self.rank)

        d = cfg.data
        common = dict(batch_size=d.batch_size, recipe=d.recipe, rank=self.rank,
                      world_size=self.world_size, workers=d.workers, seed=cfg.train.seed,
                      pin_memory=self.device.type == "cuda", max_bad_fraction=d.max_bad_fraction,
                      decode=d.decode, device=self.device, max_pixels=d.max_pixels)
        self.eval_crop = runtime.eval_crop(cfg)
        self.train_loader = make_loader(d.path, d.train_split, train=True, crop=d.crop, **common)
        self.val_loader = make_loader(d.path, d.val_split, train=False, crop=self.eval_crop, **common)
        self.normalize = normalizer(d.recipe)

        self.train_samples = sum(n for _, n in split_shards(d.path, self.train_loader.manifest,
                                                            d.train_split))
        self.plan: RunPlan = plan_run(cfg, self.train_samples, self.world_size)
        self.optimizer = build_optimizer(self.raw_model, cfg, self.plan.peak_lr)
        self.scheduler = build_scheduler(self.optimizer, self.plan)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.step_fn = TrainStep(self.model, self.optimizer, self.criterion, self.normalize,
                                 device=self.device, precision=self.precision,
                                 channels_last=cfg.train.channels_last,
                                 cuda_graph=cfg.train.cuda_graph, ddp=self.ddp)
        # Notices are agreed on every step: on CPU, so that a GPU run never waits for its device.
        self._cpu_group = (dist.new_group(backend="gloo")
                           if self.distributed and dist.get_backend() != "gloo" else None)

    # -- construction

    def _build_model(self) -> nn.Module:
        model = runtime.init_weights(runtime.build_model(self.cfg), self.cfg)  # model.init_from
        if self.cfg.train.sync_batchnorm and self.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _wrap(self, model: nn.Module) -> nn.Module:
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            model = self.ddp
        return compile_model(model, self.compile_mode)

    # -- one batch

    def train_step(self, micro_batches: list[Any], shares: list[int] | None = None,
                   size: int | None = None) -> tuple[torch.Tensor, int]:
        """One optimizer step over micro-batches; returns (loss sum, samples) of this rank, the
        loss sum a 0-d float32 tensor on the device, so that the step never waits for the GPU.

        ``shares``: the samples this rank trains of each micro-batch (default: all of them);
        ``size``: the step's samples on all ranks (default: the global batch). A smaller last step
        of an epoch (:func:`ran.train.schedule.step_shares`) weighs each rank's loss by its share,
        so the gradient is the mean over the step's samples, and its lr is scaled to its size. A
        rank with a share of 0 computes one sample with weight 0, as DDP needs every rank.
        """
        size = size or self.plan.global_batch
        self.scheduler.update(self.samples, size)
        micro = []
        for i, batch in enumerate(micro_batches):
            share = len(batch.labels) if shares is None else shares[i]
            if share < len(batch.labels):
                batch = batch._replace(images=batch.images[:max(share, 1)],
                                       labels=batch.labels[:max(share, 1)])
            micro.append(MicroBatch(batch.images, batch.labels, share * self.world_size / size, share))
        loss_sum, samples = self.step_fn(micro)
        self.step += 1
        self.samples += size
        self.scheduler.update(self.samples)
        if self.launched_at is not None:
            self.startup_s, self.launched_at = time.time() - self.launched_at, None
        return loss_sum, samples

    # -- one epoch

    def train_epoch(self, reporter: Reporter | None = None) -> dict[str, float]:
        """Train to the end of the epoch in progress (from where a resume left it, so that the
        epoch trains ``plan.epoch_samples`` samples in all); returns reduced metrics.

        With a ``reporter``, steps due for a checkpoint mid-epoch (step cadence, a notice) are
        checkpointed through it; a SIGTERM then stops the worker group (:class:`Interrupted`).
        The last step's due checkpoint is left to :meth:`run_epoch` (``self._due``).
        """
        self.model.train()
        plan, d = self.plan, self.cfg.data
        end = plan.epoch_end(self.samples)
        resumed_at = self.samples if self.samples > self.epoch * plan.epoch_samples else None
        batches = self._epoch_batches(resumed_at)
        self._running = [torch.zeros((), device=self.device), 0, 0.0]
        self._ckpt_wait = wait = window_n = 0.0
        window_loss: Any = 0.0
        start = last_print = time.perf_counter()
        done, warm = 0, None
        while self.samples < end:
            size = step_size(plan, self.samples)
            shares = [m[self.rank] for m in step_shares(size, self.world_size, d.batch_size,
                                                        self.cfg.train.grad_accum)]
            t0 = time.perf_counter()
            micro = [next(batches) for _ in shares]
            wait += time.perf_counter() - t0
            step_loss, n = self.train_step(micro, shares, size)
            self._running[0] += step_loss
            self._running[1] += n
            self._running[2] += sum(b.skipped for b in micro)
            window_loss, window_n, done = window_loss + step_loss, window_n + n, done + 1
            if done == 1:
                warm = time.perf_counter()
            if self.step % self.cfg.train.log_every == 0:
                self._check_finite(window_loss, "the training loss")
                if self.run_log is not None:
                    self.run_log.log_metrics({"train/step_loss": float(window_loss) / max(window_n, 1),
                                              "train/step_lr": self.scheduler.lr},
                                             self.step)
                window_loss, window_n = 0.0, 0
            self._due = self._checkpoint_due(reporter)
            if self._due and self.samples < end:
                self._checkpoint(reporter, self._due)
                if self._due == "sigterm":
                    self._stop(reporter)
                if self._due == "interrupt":
                    self._end(reporter)
            if time.perf_counter() - last_print >= self.console.every_s:
                last_print = time.perf_counter()
                self._progress(done, warm, float(self._running[0]) / max(self._running[1], 1))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        loss, samples, skipped = float(self._running[0]), self._running[1], self._running[2]
        total = self._all_reduce([loss, samples, skipped, wait, elapsed, self._ckpt_wait])
        epoch = [c + t for c, t in zip(self._carried, total[:3])]
        self._carried = [0.0, 0.0, 0.0]
        if not math.isfinite(epoch[0]):  # the same sum on every rank: all stop here
            raise Diverged(self.step, f"the training loss is {epoch[0] / max(epoch[1], 1)}")
        return {
            "train/loss": epoch[0] / max(epoch[1], 1),
            "train/epoch_samples": epoch[1],
            "perf/img_per_s": total[1] / (total[4] / self.world_size),
            "perf/data_wait_frac": total[3] / max(total[4], 1e-9),
            "train/skipped": epoch[2],
            "perf/epoch_time_s": elapsed,
            "perf/ckpt_wait_s": total[5] / self.world_size,
            "train/lr": self.scheduler.lr,
        }

    def _epoch_batches(self, resumed_at: int | None) -> Iterator[Any]:
        """The epoch's batches (:func:`data_stream`): one pass of the loader, then more if the
        epoch's last step needs them."""
        for part in itertools.count():
            self.train_loader.set_epoch(data_stream(self.epoch, resumed_at, part))
            yield from self.train_loader

    def _progress(self, done: int, warm: float | None, loss: float,
                  now: float | None = None) -> None:
        """Rank 0's progress line. ``done``: steps this process trained in the epoch so far;
        ``warm``: ``time.perf_counter()`` at the end of the first of them. The rate and the ETA
        leave that first step out: it carries the warm-up (the loader's first batch, cuDNN's
        autotuning, compilation, a CUDA graph's capture), ~15 s of an H200's first step, which
        made the first line say "17 img/s, eta 1h02m"; until a second step ends the line says
        "warming up" instead. ``now``: the time to measure to (default: now)."""
        plan = self.plan
        if warm is None or done < 2:
            speed = "warming up"
        else:
            now = time.perf_counter() if now is None else now
            rate = (done - 1) / max(now - warm, 1e-9)
            left = (plan.total_steps - self.step) / max(rate, 1e-9)
            speed = f"{rate * plan.global_batch:.0f} img/s eta {_duration(left)}"
        into = self.samples - self.epoch * plan.epoch_samples
        self.console.say(f"epoch {self.epoch + 1}/{plan.epochs} sample {into}/{plan.epoch_samples} "
                         f"(global step {self.step}/{plan.total_steps}) loss {loss:.4f} "
                         f"lr {self.scheduler.lr:.4g} {speed}")

    # -- divergence

    def _check_finite(self, loss: torch.Tensor | float, what: str) -> None:
        """Raise :class:`Diverged` on every rank when ``loss`` (a device tensor) is not finite on
        any rank: the test runs on the device, one host sync at the logging cadence, never per
        step."""
        finite = bool(torch.isfinite(torch.as_tensor(loss)).item())
        if self._agree(not finite):
            raise Diverged(self.step, f"{what} is {'not finite on another rank' if finite else float(loss)}")

    # -- checkpoints on cadence and on notice

    def _agree(self, flag: bool) -> list[int]:
        """The ranks whose ``flag`` is set (a collective on CPU: every rank calls it)."""
        if not self.distributed:
            return [0] if flag else []
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = int(flag)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self._cpu_group)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _checkpoint_due(self, reporter: Reporter | None) -> str | None:
        """Why the step just done must be checkpointed: ``sigterm`` (a rank got one),
        ``interrupt`` (the launcher asks the run to end: SIGINT), ``preemption`` (Ray announced
        one), ``steps`` (train.checkpoint_every_steps), or None. Every rank gets the same answer
        (collectives on every step, every rank)."""
        if reporter is None:
            return None
        self.notice_ranks = self._agree(self.notice.is_set())
        if self.notice_ranks:
            return "sigterm"
        if self.step % PREEMPTION_POLL_STEPS == 0 and self._agree(reporter.stop_requested()):
            return "interrupt"
        if (self.step % PREEMPTION_POLL_STEPS == 0 and not self._preemption_seen
                and reporter.preempted()):
            self._preemption_seen = True
            return "preemption"
        every = self.cfg.train.checkpoint_every_steps
        return "steps" if every and self.step % every == 0 else None

    def checkpoint_name(self) -> str:
        """``epoch=E_step=S``: E epochs done, S optimizer steps done."""
        return f"epoch={self.epoch:04d}_step={self.step:07d}"

    def _checkpoint(self, reporter: Reporter, reason: str,
                    metrics: dict[str, float] | None = None) -> None:
        """Report a checkpoint at this step (every rank: collectives and Ray's report barrier);
        the seconds it took are the ``perf/step_ckpt_wait_s`` metric (and, mid-epoch, summed into the
        epoch's ``perf/ckpt_wait_s``)."""
        t0 = time.perf_counter()
        part = self._all_reduce([float(self._running[0]), self._running[1], self._running[2]])
        if not math.isfinite(part[0]):  # a step since the last logging cadence went bad
            raise Diverged(self.step, f"the training loss is {part[0] / max(part[1], 1)}")
        if self._agree(not weights_finite(self.raw_model)):
            raise Diverged(self.step, "the weights are not finite")
        progress = [c + p for c, p in zip(self._carried, part)]
        rng = self.gather_rng()
        snapshot = self.snapshot(rng, progress) if self.is_master else None
        report = {"eval/top1": self.last_val.get("eval/top1", 0.0), **(metrics or {}),
                  "epoch": self.epoch, "step": self.step, "train/samples": self.samples}
        reporter.report(report, snapshot, self.checkpoint_name())
        waited = time.perf_counter() - t0
        self._ckpt_wait += waited
        if self.run_log is not None:
            self.run_log.log_metrics({"perf/step_ckpt_wait_s": waited}, self.step)
        if reason not in ("steps", "epoch"):
            self.console.say(f"checkpoint {self.checkpoint_name()} ({reason}) in {waited:.2f} s")

    def _stop(self, reporter: Reporter) -> None:
        """After a SIGTERM's checkpoint: wait until it is registered, then stop this group."""
        reporter.wait_committed()
        self.notice.clear()  # this process was told; the Trainer may be used again in-process
        message = (f"SIGTERM on rank(s) {', '.join(map(str, self.notice_ranks))}: checkpoint "
                   f"{self.checkpoint_name()} (sample {self.samples}) is registered; stopping "
                   "this worker group so that it restarts from it")
        self.console.say(message)
        if self.run_log is not None:
            self.run_log.log_notice(message)
        raise Interrupted(message)

    def _end(self, reporter: Reporter) -> None:
        """After the checkpoint of a stop request: wait until it is registered, then end the run
        (:class:`Stopped`; the launcher says where it stopped and how to resume)."""
        reporter.wait_committed()
        self.console.say(f"stopping on request: checkpoint {self.checkpoint_name()} (sample "
                         f"{self.samples}) is registered")
        raise Stopped(self.step, self.checkpoint_name())

    def validate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole split (:func:`ran.runtime.eval_counts`): counts
        summed across ranks, then divided."""
        self._sync_buffers()
        counts = runtime.eval_counts(self.raw_model, self.val_loader, device=self.device,
                                     precision=self.precision, normalize=self.normalize,
                                     channels_last=self.cfg.train.channels_last)
        return runtime.EvalCounts.from_list(self._all_reduce(counts.as_list())).metrics("eval/")

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics (what the checkpoint holds).

        DDP broadcasts buffers from rank 0 at each training forward, after which every rank
        updates its own copy once more; without this, ranks would validate slightly different models.
        """
        if self.distributed:
            for buffer in self.raw_model.buffers():
                dist.broadcast(buffer, src=0)

    def _all_reduce(self, values: list[float]) -> list[float]:
        """Sum numbers across ranks (float64, so counts stay exact)."""
        if not self.distributed:
            return list(values)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    # -- state

    def state_dict(self, rng: list[dict[str, Any]] | None = None,
                   epoch_progress: list[float] | None = None) -> dict[str, Any]:
        """Everything a restarted worker group needs; loads with ``weights_only=True``.
        ``epoch_progress``: [loss sum, samples, skipped] of all ranks in the epoch so far."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step_fn.state_dict(),
            "step": self.step,
            "samples": self.samples,
            "epoch": self.epoch,
            "epoch_progress": list(epoch_progress or [0.0, 0.0, 0.0]),
            "last_val": dict(self.last_val),
            "rng": rng if rng is not None else [_rng_state()],
            "run_id": self.run_id,
            "config": self.cfg.model_dump(),
            "plan": self.plan.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` and re-plan the rest of the run for this world size
        (the same samples to go, the lr schedule continuing from the same point); RNG states only
        if the world size is unchanged."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_state_dict(state.get("scaler") or {})
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.previous_plan = dict(state.get("plan") or {})
        # Checkpoints from before progress was counted in samples were all at epoch ends.
        self.samples = int(state.get("samples", self.epoch * self.train_samples))
        self._carried = [float(x) for x in state.get("epoch_progress") or [0.0, 0.0, 0.0]]
        self.plan = plan_run(self.cfg, self.train_samples, self.world_size, step=self.step,
                             samples=self.samples)
        self.scheduler = build_scheduler(self.optimizer, self.plan)  # lr from samples, not saved
        self.last_val = dict(state.get("last_val") or {})
        self.run_id = state.get("run_id") or self.run_id
        rng = state.get("rng") or []
        if len(rng) == self.world_size:
            _set_rng_state(rng[self.rank])
        else:
            _seed_everything(self.cfg.train.seed + 1000 * self.rank + self.epoch)

    def gather_rng(self) -> list[dict[str, Any]]:
        """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
        mine = _rng_state()
        if not self.distributed:
            return [mine]
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, mine)
        return states

    def save(self, directory: str | Path, rng: list[dict[str, Any]] | None = None) -> Path:
        """Write ``checkpoint.pt`` (and a readable ``config.yaml``) into ``directory``."""
        return Snapshot(self.state_dict(rng), self.cfg.to_yaml()).write(directory)

    def snapshot(self, rng: list[dict[str, Any]] | None = None,
                 epoch_progress: list[float] | None = None) -> Snapshot:
        """:meth:`state_dict` copied to host memory: training may go on while it is written."""
        return Snapshot(_host_copy(self.state_dict(rng, epoch_progress)), self.cfg.to_yaml())

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint directory written by :meth:`save`."""
        self.load_state_dict(runtime.load_checkpoint(directory))

    # -- the loop

    def fit(self, reporter: Reporter) -> dict[str, float]:
        """Run (or continue) the planned samples; returns the last epoch's metrics."""
        with reporter.checkpoint_dir() as ckpt:
            if ckpt:
                self.restore(ckpt)
                self.launched_at = None  # startup_s describes a fresh start only
                self.console.say(f"resumed from {ckpt} at epoch {self.epoch}, step {self.step} "
                                 f"(sample {self.samples} of {self.plan.total_samples})"
                                 + (f"; {self.replanned()}" if self.replanned() else ""))
        if self.cfg.train.precision == "auto":
            self.console.say(f"train.precision=auto runs as {self.precision} on {self.device.type} "
                             f"({self.precision_reason.removeprefix('auto: ')})")
        if self.run_log is not None:
            self._log_plan()
        metrics: dict[str, float] = {}
        while self.samples < self.plan.total_samples:
            metrics = self.run_epoch(reporter)
        return metrics

    def replanned(self) -> str:
        """What the restored checkpoint's plan had that this attempt's differs in ("" if nothing):
        ``2 -> 1 workers: global_batch 32 -> 16, peak_lr 0.1 -> 0.05, total_steps 36 -> 57``."""
        old, new = self.previous_plan or {}, self.plan.to_dict()
        keys = ("global_batch", "peak_lr", "total_steps", "epochs", "total_samples")
        changed = [f"{k} {old[k]:g} -> {new[k]:g}" for k in keys if k in old and old[k] != new[k]]
        if not changed:
            return ""
        workers = old.get("world_size", "?")
        return f"{workers} -> {self.world_size} workers: " + ", ".join(changed)

    def _log_plan(self) -> None:
        """This attempt's plan on rank 0's run: ``ran.plan.*`` tags (the latest attempt's), a
        ``ran.replanned.step_<N>`` tag when it differs from the checkpoint's, and per-attempt
        metrics at the step where the attempt began. Never params: they would change."""
        assert self.run_log is not None
        plan = self.plan
        attempt: dict[str, Any] = {
            "plan": plan.to_dict(), "precision": self.precision,
            "precision_reason": self.precision_reason,
            "compile": f"{self.compile_mode} ({self.compile_reason})"}
        if self.step:  # a restart: say from where, for people reading the run later
            attempt["resumed_from"] = f"epoch={self.epoch} step={self.step}"
        if self.replanned():
            attempt["replanned"] = (self.step, self.replanned())
        self.run_log.log_attempt(attempt)
        if self.cfg.scaling.elastic or self.replanned():  # the plan over time; else tags only
            old = self.previous_plan or {}
            if self.replanned() and "world_size" in old:  # where the series starts (MLflow skips
                self.run_log.log_metrics({f"plan/{k}": old[k] for k in  # it when already there)
                                          ("world_size", "global_batch", "peak_lr", "total_steps")
                                          if k in old}, 0)
            self.run_log.log_metrics({"plan/world_size": plan.world_size,
                                      "plan/global_batch": plan.global_batch,
                                      "plan/peak_lr": plan.peak_lr,
                                      "plan/total_steps": plan.total_steps}, self.step)

    def run_epoch(self, reporter: Reporter) -> dict[str, float]:
        """Train (the rest of) one epoch, validate on cadence, queue rank 0's metrics, report
        (every rank) and checkpoint on cadence or when the last step was due."""
        t = self.cfg.train
        metrics = self.train_epoch(reporter)
        self.epoch += 1
        last = self.samples >= self.plan.total_samples
        if last or self.epoch % t.eval_every == 0:
            val = self.validate()
            if not math.isfinite(val.get("eval/loss", 0.0)):  # summed across ranks: all agree
                raise Diverged(self.step, f"the validation loss is {val['eval/loss']}")
            self.last_val = val
            metrics.update(self.last_val)
        metrics["train/samples"] = self.samples  # the run's, at the epoch's end
        if self.startup_s is not None:
            metrics["perf/startup_s"], self.startup_s = self.startup_s, None
        self._print_epoch(metrics)
        if self.run_log is not None:
            # train/epoch: ran.tracking.EPOCH_METRIC (how a restart skips logged epochs)
            self.run_log.log_metrics({**{k: v for k, v in metrics.items() if k != "eval/samples"},
                                      "train/epoch": self.epoch}, self.step)
        # Ray keeps the best checkpoints by eval/top1: carry the latest value between validations.
        report = {**metrics, "eval/top1": self.last_val.get("eval/top1", 0.0),
                  "epoch": self.epoch, "step": self.step, "train/samples": self.samples}
        if last and self.run_log is not None:  # what the run log lacks, if anything
            report.update(self.run_log.unlogged())
        if last or self.epoch % t.checkpoint_every == 0 or self._due:
            self._running = [0.0, 0, 0.0]  # the epoch is whole: nothing in progress to carry
            self._checkpoint(reporter, self._due or "epoch", report)
            if self._due == "sigterm" and not last:
                self._stop(reporter)
            if self._due == "interrupt" and not last:
                self._end(reporter)
        else:
            reporter.report(report, None, self.checkpoint_name())
        return report

    def _print_epoch(self, m: dict[str, float]) -> None:
        val = (f" eval/loss {m['eval/loss']:.4f} top1 {m['eval/top1']:.4f} top5 {m['eval/top5']:.4f}"
               if "eval/top1" in m else "")
        self.console.say(f"epoch {self.epoch}/{self.plan.epochs} done: train/loss {m['train/loss']:.4f}{val} "
                         f"lr {m['train/lr']:.4g} {m['perf/img_per_s']:.0f} img/s data-wait "
                         f"{m['perf/data_wait_frac']:.1%} skipped {int(m['train/skipped'])}")


def weights_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite (one device
    sync; used before a checkpoint is written)."""
    tensors = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"

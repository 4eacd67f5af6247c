"""The per-worker training loop: a :class:`Trainer` that Ray Train runs once per worker.

A Trainer owns the model (DDP-wrapped when a process group is up), the optimizer, the lr
scheduler, the loaders and the counters (``step``, ``epoch``): ``train_step`` / ``train_epoch`` /
``validate`` / ``state_dict`` / ``load_state_dict``. It knows nothing of Ray or MLflow. It is handed
its components: a *reporter* (:class:`RayReporter`: the checkpoint to restore from, and where
metrics and checkpoints go), a *console* (:class:`Console`: progress lines on rank 0) and, on rank
0, a *run logger* (``ran.tracking.RunLogger``: MLflow, off the training path). The same class runs
in a plain process (``Trainer(cfg)``), which the tests use.

Loop: restore -> for each epoch: train -> validate (on cadence, always at the end) -> rank 0
queues its metrics for MLflow -> every worker reports (a barrier), rank 0 with a checkpoint on
cadence.

A checkpoint (``checkpoint.pt`` in the checkpoint directory) holds only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)``: model, optimizer, scheduler
and grad-scaler state, ``step``, ``epoch``, the RNG states of every rank, the MLflow run id, the
resolved config and the run plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ran import runtime, tracking
from ran.config import JobConfig, parse_config
from ran.data.read import make_loader
from ran.data.transforms import normalizer
from ran.train.schedule import RunPlan, build_scheduler, plan_run

log = logging.getLogger("ran.train")

PROGRESS_EVERY_S = 5.0  # console progress line period on rank 0


# ---------------------------------------------------------------------------------------------
# Building blocks


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


class Console:
    """Progress lines of one worker: printed on rank 0 only, straight to stdout once each.

    Inside Ray Train workers ``print`` is patched to log *and* print (every line twice) and the
    console handler filters at the run's log level, which ``ran train`` sets to WARNING to silence
    Ray Train's per-report chatter; a ``ran.train`` logger with its own stdout handler goes around
    both.
    """

    def __init__(self, enabled: bool = True, every_s: float = PROGRESS_EVERY_S) -> None:
        self.enabled = enabled
        self.every_s = every_s  # seconds between progress lines within an epoch

    @staticmethod
    def use_stdout_logger() -> None:
        """Route ``ran.train`` lines to stdout (call once per Ray Train worker)."""
        if not log.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False

    def say(self, message: str) -> None:
        """One line, on rank 0."""
        if not self.enabled:
            return
        if log.handlers:
            log.info(message)
        else:
            print(message, flush=True)


class RunLog(Protocol):
    """Where rank 0's metrics, params and tags go (``ran.tracking.RunLogger``, or a list)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...


class Reporter(Protocol):
    """How a Trainer talks to its launcher (Ray Train, or nothing)."""

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """The checkpoint directory to restore from, if any."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        """Report epoch metrics (every rank), with rank 0's checkpoint directory on cadence."""
        ...


class LocalReporter:
    """Single-process runs: checkpoints go to ``directory/<name>``; metrics are kept in a list."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.metrics: list[dict[str, float]] = []

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        found = sorted(self.directory.glob("epoch=*")) if self.directory else []
        yield str(found[-1]) if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir and self.directory:
            shutil.copytree(checkpoint_dir, self.directory / name, dirs_exist_ok=True)


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
        launched_at: the launcher's ``time.time()``; the first epoch then reports ``startup_s``,
            the seconds from launch to the first optimizer step.

    Rank and world size come from ``torch.distributed`` when a process group is up (Ray Train
    sets one up); with more than one worker the model is then wrapped in DDP.
    """

    def __init__(self, cfg: JobConfig, *, device: torch.device | None = None,
                 run_id: str | None = None, run_log: RunLog | None = None,
                 console: Console | None = None, launched_at: float | None = None) -> None:
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
        self.epoch = 0  # epochs done
        self.last_val: dict[str, float] = {}

        _seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.raw_model = self._build_model()
        self.model = self._wrap(self.raw_model)
        _seed_everything(cfg.train.seed + 1000 * self.rank)

        d = cfg.data
        common = dict(batch_size=d.batch_size, recipe=d.recipe, rank=self.rank,
                      world_size=self.world_size, workers=d.workers, seed=cfg.train.seed,
                      pin_memory=self.device.type == "cuda", max_bad_fraction=d.max_bad_fraction,
                      decode=d.decode, device=self.device)
        self.eval_crop = runtime.eval_crop(cfg)
        self.train_loader = make_loader(d.path, d.train_split, train=True, crop=d.crop, **common)
        self.val_loader = make_loader(d.path, d.val_split, train=False, crop=self.eval_crop, **common)
        self.normalize = normalizer(d.recipe)

        self.plan: RunPlan = plan_run(cfg, len(self.train_loader), self.world_size)
        self.optimizer = build_optimizer(self.raw_model, cfg, self.plan.peak_lr)
        self.scheduler = build_scheduler(self.optimizer, self.plan)
        self.precision = runtime.resolve_precision(cfg.train.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

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
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    # -- one batch

    def train_step(self, micro_batches: list[Any]) -> tuple[torch.Tensor, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss sum, samples), the
        loss sum a 0-d float32 tensor on the device, so that the step never waits for the GPU."""
        loss_sum, samples = torch.zeros((), device=self.device), 0
        for i, batch in enumerate(micro_batches):
            images, labels = runtime.prepare_batch(batch, self.device, self.normalize,
                                                   self.cfg.train.channels_last)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with runtime.autocast(self.precision, self.device):
                    loss = self.criterion(self.model(images), labels)
                self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum += loss.detach().float() * len(labels)
            samples += len(labels)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.launched_at is not None:
            self.startup_s, self.launched_at = time.time() - self.launched_at, None
        return loss_sum, samples

    # -- one epoch

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch (``plan.steps_per_epoch`` optimizer steps); returns reduced metrics."""
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        accum, plan = self.cfg.train.grad_accum, self.plan
        loss_sum = samples = skipped = 0.0
        wait = window_loss = 0.0
        window_n = 0
        start = last_print = time.perf_counter()
        batches = iter(self.train_loader)
        for i in range(plan.steps_per_epoch):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            wait += time.perf_counter() - t0
            skipped += sum(b.skipped for b in micro)
            step_loss, n = self.train_step(micro)
            loss_sum, samples = loss_sum + step_loss, samples + n
            window_loss, window_n = window_loss + step_loss, window_n + n
            if self.step % self.cfg.train.log_every == 0:
                if self.run_log is not None:
                    self.run_log.log_metrics({"step_loss": float(window_loss) / max(window_n, 1),
                                              "step_lr": self.optimizer.param_groups[0]["lr"]},
                                             self.step)
                window_loss, window_n = 0.0, 0
            if time.perf_counter() - last_print >= self.console.every_s:
                last_print = time.perf_counter()
                self._progress(i + 1, start, float(loss_sum) / max(samples, 1))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        total = self._all_reduce([float(loss_sum), samples, skipped, wait, elapsed])
        return {
            "train_loss": total[0] / max(total[1], 1),
            "img_per_s": total[1] / (total[4] / self.world_size),
            "data_wait_frac": total[3] / max(total[4], 1e-9),
            "skipped": total[2],
            "epoch_time_s": elapsed,
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def _progress(self, done: int, start: float, loss: float) -> None:
        plan = self.plan
        rate = done / (time.perf_counter() - start)
        left = (plan.total_steps - self.step) / max(rate, 1e-9)
        self.console.say(f"epoch {self.epoch + 1}/{plan.epochs} step {done}/{plan.steps_per_epoch} "
                         f"(global {self.step}/{plan.total_steps}) loss {loss:.4f} "
                         f"lr {self.optimizer.param_groups[0]['lr']:.4g} "
                         f"{rate * plan.global_batch:.0f} img/s eta {_duration(left)}")

    def validate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 over the whole split (:func:`ran.runtime.eval_counts`): counts
        summed across ranks, then divided."""
        self._sync_buffers()
        counts = runtime.eval_counts(self.raw_model, self.val_loader, device=self.device,
                                     precision=self.precision, normalize=self.normalize,
                                     channels_last=self.cfg.train.channels_last)
        return runtime.EvalCounts.from_list(self._all_reduce(counts.as_list())).metrics("val_")

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

    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything a restarted worker group needs; loads with ``weights_only=True``."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "last_val": dict(self.last_val),
            "rng": rng if rng is not None else [_rng_state()],
            "run_id": self.run_id,
            "config": self.cfg.model_dump(),
            "plan": self.plan.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; RNG states only if the world size is unchanged."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(rng), directory / runtime.CHECKPOINT_FILE)
        (directory / "config.yaml").write_text(self.cfg.to_yaml())
        return directory

    def restore(self, directory: str | Path) -> None:
        """Load a checkpoint directory written by :meth:`save`."""
        self.load_state_dict(runtime.load_checkpoint(directory))

    # -- the loop

    def fit(self, reporter: Reporter) -> dict[str, float]:
        """Run (or continue) the planned epochs; returns the last epoch's metrics."""
        with reporter.checkpoint_dir() as ckpt:
            if ckpt:
                self.restore(ckpt)
                self.launched_at = None  # startup_s describes a fresh start only
                self.console.say(f"resumed from {ckpt} at epoch {self.epoch}, step {self.step}")
        if self.cfg.train.precision == "auto":
            self.console.say(f"train.precision=auto runs as {self.precision} on {self.device.type}")
        if self.run_log is not None:
            self.run_log.log_params({f"plan.{k}": v for k, v in self.plan.to_dict().items()})
            self.run_log.set_tags({tracking.TAG_PRECISION: self.precision})
            if self.step:  # a restart: say from where, for people reading the run later
                self.run_log.set_tags({tracking.TAG_RESUMED_FROM: f"epoch={self.epoch} step={self.step}"})
        metrics: dict[str, float] = {}
        while self.epoch < self.plan.epochs:
            metrics = self.run_epoch(reporter)
        return metrics

    def run_epoch(self, reporter: Reporter) -> dict[str, float]:
        """Train one epoch, validate on cadence, queue rank 0's metrics, report (every rank) and
        checkpoint on cadence."""
        t = self.cfg.train
        metrics = self.train_epoch()
        self.epoch += 1
        last = self.epoch == self.plan.epochs
        if last or self.epoch % t.eval_every == 0:
            self.last_val = self.validate()
            metrics.update(self.last_val)
        if self.startup_s is not None:
            metrics["startup_s"], self.startup_s = self.startup_s, None
        self._print_epoch(metrics)
        if self.run_log is not None:
            self.run_log.log_metrics({k: v for k, v in metrics.items() if k != "val_samples"},
                                     self.epoch)
        # Ray keeps the best checkpoints by val_top1: carry the latest value between validations.
        report = {**metrics, "val_top1": self.last_val.get("val_top1", 0.0),
                  "epoch": self.epoch, "step": self.step}
        name = f"epoch={self.epoch:04d}_step={self.step:07d}"
        if last or self.epoch % t.checkpoint_every == 0:
            rng = self.gather_rng()
            with tempfile.TemporaryDirectory(prefix="ran-ckpt-") as tmp:
                reporter.report(report, str(self.save(tmp, rng)) if self.is_master else None, name)
        else:
            reporter.report(report, None, name)
        return report

    def _print_epoch(self, m: dict[str, float]) -> None:
        val = (f" val_loss {m['val_loss']:.4f} top1 {m['val_top1']:.4f} top5 {m['val_top5']:.4f}"
               if "val_top1" in m else "")
        self.console.say(f"epoch {self.epoch}/{self.plan.epochs} done: train_loss {m['train_loss']:.4f}{val} "
                         f"lr {m['lr']:.4g} {m['img_per_s']:.0f} img/s data-wait {m['data_wait_frac']:.1%} "
                         f"skipped {int(m['skipped'])}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# Ray Train glue


class RayReporter:
    """Checkpoints and metrics through Ray Train (``ray.train.get_checkpoint`` / ``report``).

    Every report carries the worker's ``worker_pid``, so that a Ray Train callback on the
    controller can find a worker's process (``ran.train.faults``).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "worker_pid": self.pid}, checkpoint=checkpoint,
                         checkpoint_dir_name=name if checkpoint else None)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """What Ray Train runs on every worker: build a Trainer from the launcher's
    ``train_loop_config`` (``job``, ``run_id``, ``tracking_uri``, ``launched_at``) and fit."""
    Console.use_stdout_logger()
    cfg = parse_config(config["job"], "<train_loop_config>")
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times and keeps the fastest kernels
    if config.get("tracking_uri"):  # the driver's store, for a registered model.init_from
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
    rank0 = ray.train.get_context().get_world_rank() == 0
    run_log = (tracking.RunLogger(config["run_id"], config.get("tracking_uri"))
               if rank0 and config.get("run_id") else None)
    try:
        trainer = Trainer(cfg, device=device, run_id=config.get("run_id"), run_log=run_log,
                          launched_at=config.get("launched_at"))
        trainer.fit(RayReporter())
    finally:
        if run_log is not None:
            run_log.close()

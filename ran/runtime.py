"""The inference runtime: what training, ``ran eval``, ``ran explain``, model logging and promotion
share, each defined once.

- :func:`build_model`: a config's model (``ran.models.create_model`` with the model section).
- :func:`eval_crop`: the crop a model is validated and served at.
- :func:`resolve_precision` / :func:`autocast`: ``train.precision`` as it runs on a device.
- :func:`load_checkpoint`, :func:`model_from_state`, :func:`load_model`: a checkpoint, a registered
  version or a run back into our own ``nn.Module`` with its config and class names.
- :func:`resolve_init`, :func:`init_weights`: ``model.init_from`` checked and pinned before Ray
  starts, then loaded by every worker (a classifier of another number of classes re-initialised).
- :func:`eval_counts` and :func:`evaluate`: the evaluation loop (summed counts, so ranks add up).

Layers: this module sits above :mod:`ran.tracking` (a registered model is fetched through it) and
below :mod:`ran.train`, :mod:`ran.evaluate`, :mod:`ran.explain` and :mod:`ran.promotion`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ran import steptable, tracking
from ran.config import ConfigError, JobConfig, load_yaml, parse_config
from ran.data import DataError
from ran.data import storage as data_storage
from ran.data.read import Batch, make_loader, read_manifest, split_shards
from ran.data.transforms import default_crop, normalizer
from ran.models import create_model, model_defaults
from ran.progress import Progress, counted

CHECKPOINT_FILE = "checkpoint.pt"  # inside every checkpoint directory ``ran train`` writes


# ---------------------------------------------------------------------------------------------
# Model and preprocessing


def build_model(cfg: JobConfig) -> nn.Module:
    """The model of a resolved config (``model.num_classes`` set), freshly initialised.

    Options left unset (None) are the model's own (``ran.models.create_model``).

    Raises:
        ValueError: an unknown model name or an option the model cannot use.
    """
    m = cfg.model
    options = dict(depth=m.depth, p=m.p, t=m.t, r=m.r, unit=m.unit,
                   mask_activation=m.mask_activation, combination=m.combination,
                   mask_structure=m.mask_structure)
    return create_model(m.name, stem=cfg.resolved_stem(), num_classes=m.num_classes,
                        **{k: v for k, v in options.items() if v is not None})


def eval_crop(cfg: JobConfig) -> int:
    """The side in pixels of the centre crop a model is validated, evaluated and served at.

    ``data.eval_crop`` when set; else the train crop when it is not the recipe's default (small
    images); else the model's own for its stem (Attention-92 on ImageNet: 320, PAPER.md Table 3's
    single-crop test size; AttentionInception-56: 299; CIFAR: 32).
    """
    if cfg.data.eval_crop:
        return cfg.data.eval_crop
    if cfg.data.crop and cfg.data.crop != default_crop(cfg.data.recipe):
        return cfg.data.crop
    own = model_defaults(cfg.model.name).eval_crop.get(cfg.resolved_stem())
    return own or default_crop(cfg.data.recipe)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (not emulated, which is slower than fp32).

    CPUs: AMX or AVX512-BF16 (on a CPU with neither, bf16 convolutions ran 2.3x slower than fp32
    here); GPUs: ``torch.cuda.is_bf16_supported`` (Ampere and newer).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        caps = get()
        return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))
    try:  # older torch: the kernel's own flags
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def device_kind(device: torch.device) -> str:
    """The step table's name for the kind of ``device`` (:mod:`ran.steptable`): the GPU's name
    (``NVIDIA H200``), or the CPU's name, cores and bf16 hardware (``cpu Intel Xeon, 2 cores,
    amx_bf16``), since the same model name covers CPUs with and without bf16 units."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    caps = getattr(torch.cpu, "get_capabilities", dict)()
    name = caps.get("cpu_name") or "cpu"
    unit = next((u for u in ("amx_bf16", "avx512_bf16") if caps.get(u)),
                "bf16" if native_bf16(device) else "no native bf16")
    return f"cpu {name}, {os.cpu_count()} cores, {unit}"


def model_key(cfg: JobConfig) -> str:
    """The step table's name for a job's model: ``<model.name>/<stem>``."""
    return f"{cfg.model.name}/{cfg.resolved_stem()}"


def choose_precision(precision: str, device: torch.device,
                     model: str | None = None) -> tuple[str, str]:
    """``train.precision`` as it runs on ``device``, and why (the run's ``ran.precision_reason``
    tag): ``auto`` takes what ``ran bench`` measured fastest on this device kind
    (:func:`ran.steptable.lookup`, for ``model`` (``"attention56/imagenet"``) where measured),
    else bf16 where the hardware computes it natively (:func:`native_bf16`), else fp32."""
    if precision != "auto":
        return precision, "set by train.precision"
    kind = device_kind(device)
    found = steptable.lookup(kind, model or "")
    if found and found[0].get("precision") in ("fp32", "bf16", "fp16"):
        entry, table = found
        return entry["precision"], (f"auto: fastest in ran bench on {kind} "
                                    f"({entry.get('measured', '?')}, {table})")
    if native_bf16(device):
        return "bf16", f"auto: no ran bench measurement for {kind}; bf16, which it computes natively"
    return "fp32", f"auto: no ran bench measurement for {kind}; fp32, as it has no native bf16"


def resolve_precision(precision: str, device: torch.device, model: str | None = None) -> str:
    """``train.precision`` as it runs on ``device`` (:func:`choose_precision` without the why)."""
    return choose_precision(precision, device, model)[0]


def choose_compile(mode: str, device: torch.device, model: str) -> tuple[str, str]:
    """``train.compile`` as it runs: ``auto`` takes the mode ``ran bench`` measured fastest for
    ``model`` on this device kind, else ``off`` (eager: nothing is assumed faster unmeasured)."""
    if mode != "auto":
        return mode, "set by train.compile"
    kind = device_kind(device)
    found = steptable.lookup(kind, model)
    entry = found[0] if found else {}
    if found and entry.get("model") == model and entry.get("compile"):
        return str(entry["compile"]), f"auto: fastest in ran bench on {kind} ({found[1]})"
    return "off", f"auto: no ran bench measurement of {model} on {kind}; eager"


def autocast(precision: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast on ``device``, nothing for fp32.

    ``precision`` is already resolved (:func:`resolve_precision`): callers resolve once, not per
    batch. ``cache=False`` drops autocast's cache of cast weights, which cannot live across a CUDA
    graph capture (PyTorch's CUDA graph notes).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def prepare_batch(batch: Batch, device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 3, H, W)`` images -> normalised float on ``device`` (channels_last if asked),
    and int64 ``(N,)`` labels on ``device``. Copies are non-blocking (pinned loaders)."""
    images = normalize(batch.images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch.labels.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints and registered models back into models


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file or directory with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_state(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                     source: str) -> tuple[nn.Module, JobConfig]:
    """Rebuild a trained model (eval mode, CPU) from its resolved config and weights.

    Raises:
        ConfigError: ``config`` is not a valid job config (``source`` names it).
    """
    cfg = parse_config(config, source)
    model = build_model(cfg)
    model.load_state_dict(state_dict)
    return model.eval(), cfg


@dataclass
class LoadedModel:
    """A model back from a reference, with what it was trained with."""

    model: nn.Module  # our ResidualAttentionNet (forward(x, return_masks=True) works), eval mode
    config: JobConfig  # the resolved config it was trained with
    class_names: list[str] | None  # index -> name; None when unknown (checkpoint, data gone)
    source: tracking.ModelSource  # where it came from


def resolve_model(ref: str) -> tracking.ModelSource:
    """A reference -> where the model is: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an
    MLflow run id (32 hex digits), or a checkpoint path (file, checkpoint directory, or a run
    directory: its latest checkpoint).

    Raises:
        tracking.ModelRefError: the reference names nothing loadable (one line saying what was looked for).
    """
    if tracking.MODELS_URI.match(ref):
        return tracking.registry_source(ref)
    path = Path(ref)
    if path.exists():
        return tracking.ModelSource(ref, "checkpoint", path=str(_checkpoint_file(path)))
    if tracking.RUN_ID.match(ref):
        return tracking.run_source(ref)
    raise tracking.ModelRefError(
        f"model {ref!r}: not models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id (32 hex "
        "digits) or an existing checkpoint path")


def _checkpoint_file(path: Path) -> Path:
    """``checkpoint.pt`` itself, in a checkpoint directory, or the latest under a run directory."""
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    found = sorted(path.glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.parent.name)
    if not found:
        raise tracking.ModelRefError(f"checkpoint {path}: no {CHECKPOINT_FILE} in it or in its subdirectories")
    return found[-1]


def load_model(ref: str | tracking.ModelSource) -> LoadedModel:
    """The model a reference names (see :func:`resolve_model`), ours, on the CPU, in eval mode.

    Class names come with a logged model's side files; for a checkpoint they are read from the
    manifest of the data it was trained on when that is a local directory (else None: nothing a
    checkpoint names is fetched).

    Raises:
        tracking.ModelRefError: nothing loadable there, or a file that is not a ``ran`` checkpoint.
    """
    source = ref if isinstance(ref, tracking.ModelSource) else resolve_model(ref)
    if source.kind != "checkpoint":
        files = tracking.download_model_files(source)
        state = torch.load(files.state_dict, weights_only=True, map_location="cpu")
        model, cfg = model_from_state(load_yaml(files.config.read_text()), state,
                                      source.ref)
        return LoadedModel(model, cfg, json.loads(files.classes.read_text()), source)
    try:
        state = load_checkpoint(source.path)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise tracking.ModelRefError(f"checkpoint {source.path}: cannot load it ({err})") from None
    if "model" not in state or "config" not in state:
        raise tracking.ModelRefError(f"checkpoint {source.path}: no model or config in it; "
                            "was it written by `ran train`?")
    model, cfg = model_from_state(state["config"], state["model"], str(source.path))
    source.run_id = source.run_id or state.get("run_id")
    return LoadedModel(model, cfg, _manifest_classes(cfg.data.path), source)


def _manifest_classes(path: str) -> list[str] | None:
    """Class names from the manifest of a checkpoint's training data, read only where that is a
    local directory: the config a checkpoint carries never makes ran fetch a URL."""
    if "://" in path or not Path(path).is_dir():
        return None
    try:
        return list(read_manifest(path)["classes"])
    except (DataError, OSError):
        return None


def check_classes(model: nn.Module, class_names: list[str] | None, manifest: dict[str, Any],
                  data_path: str) -> None:
    """The data's labels must mean what the model's outputs mean.

    Raises:
        ValueError: a different number of classes, or different class names.
    """
    outputs = getattr(getattr(model, "fc", None), "out_features", None)
    if outputs is not None and outputs != int(manifest["num_classes"]):
        raise ValueError(f"data {data_path} has {manifest['num_classes']} classes but the model "
                         f"has {outputs} outputs: evaluate it on the data it was trained for")
    if class_names and list(manifest["classes"]) != list(class_names):
        raise ValueError(f"data {data_path}: its class names differ from the model's "
                         f"(first: {manifest['classes'][:3]} vs {class_names[:3]})")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: model.init_from

CLASSIFIER = "fc"  # the classifier of every ran.models network: re-initialised for new classes


def init_state(ref: str) -> tuple[dict[str, torch.Tensor], tracking.ModelSource]:
    """The weights a ``model.init_from`` reference names, on the CPU, and where they are.

    ``ref``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow run id (its registered or
    logged model; for a run that logged none, such as a search trial, the latest checkpoint of its
    local Ray Train directory), a checkpoint file or directory ``ran train`` wrote (or a run
    directory: its latest checkpoint), or a file holding a plain ``state_dict``
    (``torch.save(model.state_dict(), path)``).

    Raises:
        tracking.ModelRefError: nothing loadable there (one line saying what was looked for).
    """
    try:
        source = resolve_model(ref)
    except tracking.ModelRefError:
        checkpoint = _run_checkpoint(ref)  # a run that logged no model (a search trial)
        if checkpoint is None:
            raise
        source = tracking.ModelSource(ref, "checkpoint", run_id=ref, path=str(checkpoint))
    if source.kind != "checkpoint":
        files = tracking.download_model_files(source)
        return torch.load(files.state_dict, weights_only=True, map_location="cpu"), source
    try:
        state = load_checkpoint(source.path)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise tracking.ModelRefError(
            f"model.init_from {source.path}: cannot load it ({err})") from None
    if isinstance(state.get("model"), dict):
        source.run_id = source.run_id or state.get("run_id")
        return state["model"], source
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, source
    raise tracking.ModelRefError(f"model.init_from {source.path}: neither a `ran train` checkpoint "
                                 "nor a state_dict (torch.save(model.state_dict(), path))")


def _run_checkpoint(ref: str) -> Path | None:
    """The latest checkpoint of MLflow run ``ref``, from its Ray Train directory (``ran.storage``
    tag) when that is a local directory; None otherwise."""
    if not tracking.RUN_ID.match(ref):
        return None
    try:
        storage = tracking.RunTracker(ref).tag(tracking.TAG_STORAGE)
        return _checkpoint_file(Path(storage)) if storage and Path(storage).is_dir() else None
    except Exception:  # noqa: BLE001 - no such run, store unreachable: the caller's error stands
        return None


def pinned_ref(source: tracking.ModelSource) -> str:
    """A reference that names the same weights later: a registered version instead of an alias,
    an absolute checkpoint file instead of a run directory."""
    if source.name and source.version:
        return f"models:/{source.name}/{source.version}"
    if source.path:
        return str(Path(source.path).resolve())
    return source.ref


def fit_state(model_state: dict[str, torch.Tensor], parent: dict[str, torch.Tensor], ref: str,
              what: str) -> dict[str, torch.Tensor]:
    """``parent`` made loadable into a model whose ``state_dict`` is ``model_state``: equal keys
    and shapes, except a classifier (:data:`CLASSIFIER`) with another number of classes, which
    keeps the model's own (fresh) weights. Values may be meta tensors (shapes only).

    Raises:
        ConfigError: any other difference, listing the keys (``what`` names the model).
    """
    missing = [k for k in model_state if k not in parent]
    unexpected = [k for k in parent if k not in model_state]
    reshaped = [k for k in model_state if k in parent and parent[k].shape != model_state[k].shape]
    head = [k for k in reshaped if k.startswith(CLASSIFIER + ".")
            and parent[k].shape[1:] == model_state[k].shape[1:]]
    others = [k for k in reshaped if k not in head]
    if missing or unexpected or others:
        parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
                 f"{len(others)} of another shape ({_few(others, parent, model_state)})"
                 if others else ""]
        raise ConfigError(f"model.init_from {ref}: its weights do not fit {what}: "
                          f"{'; '.join(p for p in parts if p)}. Start from a model of the same "
                          "architecture (model.name, depth, p, t, r, unit, mask options) or leave "
                          "model.init_from unset")
    return {k: model_state[k] if k in head else parent[k] for k in model_state}


def _few(keys: list[str], parent: dict[str, torch.Tensor] | None = None,
         model_state: dict[str, torch.Tensor] | None = None, n: int = 4) -> str:
    if parent is not None and model_state is not None:
        shown = [f"{k} {tuple(parent[k].shape)} vs {tuple(model_state[k].shape)}" for k in keys[:n]]
    else:
        shown = keys[:n]
    return ", ".join(shown) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def _describe(cfg: JobConfig) -> str:
    return f"{cfg.model.name} ({cfg.resolved_stem()} stem, {cfg.model.num_classes} classes)"


def resolve_init(cfg: JobConfig) -> JobConfig:
    """Pre-flight of ``model.init_from``: the weights exist and fit the model (built on the meta
    device), and the reference is pinned (:func:`pinned_ref`), so every worker and every restart
    loads the same weights even if the alias moves. A config without it is returned as is.

    Raises:
        ConfigError: no such model or file, or weights that do not fit (the keys are listed).
    """
    ref = cfg.model.init_from
    if not ref:
        return cfg
    try:
        parent, source = init_state(ref)
    except tracking.ModelRefError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    try:
        with torch.device("meta"):  # shapes only, no memory
            model_state = build_model(cfg).state_dict()
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    fit_state(model_state, parent, ref, _describe(cfg))
    return cfg.with_values({"model.init_from": pinned_ref(source)})


def init_weights(model: nn.Module, cfg: JobConfig) -> nn.Module:
    """Load ``model.init_from`` into the freshly built ``model`` (in place; returned). A classifier
    of another number of classes keeps its fresh initialisation; every other key loads strictly.
    Without ``model.init_from``, the model is returned untouched.

    Raises:
        ConfigError: the weights do not fit (see :func:`fit_state`).
        tracking.ModelRefError: the reference names nothing loadable.
    """
    if not cfg.model.init_from:
        return model
    parent, _ = init_state(cfg.model.init_from)
    ref = cfg.model.init_from
    model.load_state_dict(fit_state(model.state_dict(), parent, ref, _describe(cfg)))
    return model


def init_tags(cfg: JobConfig) -> dict[str, str]:
    """Run tags saying where a fine-tuning run started: ``ran.init_from`` (the pinned reference)
    and ``ran.init_from_run`` (the parent's training run, when the registry knows it)."""
    ref = cfg.model.init_from
    if not ref:
        return {}
    tags = {tracking.TAG_INIT_FROM: ref}
    if tracking.MODELS_URI.match(ref):
        run_id = tracking.registry_source(ref).run_id
    else:
        run_id = ref if tracking.RUN_ID.match(ref) else None
    if run_id:
        tags[tracking.TAG_INIT_FROM_RUN] = run_id
    return tags


# ---------------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class EvalCounts:
    """Sums over evaluated samples; counts of several ranks add up exactly (float64 sums)."""

    loss_sum: float = 0.0  # summed cross-entropy (nats)
    top1: float = 0.0  # samples whose top prediction is the label
    top5: float = 0.0  # samples whose label is among the top 5 (top-k, k = min(5, classes))
    samples: float = 0.0
    skipped: float = 0.0  # samples that failed to decode

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.top1, self.top5, self.samples, self.skipped]

    @classmethod
    def from_list(cls, values: Iterable[float]) -> "EvalCounts":
        return cls(*values)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """``{prefix}loss``, ``top1``, ``top5`` (fractions), ``samples`` and ``skipped``."""
        n = max(self.samples, 1)
        return {f"{prefix}loss": self.loss_sum / n, f"{prefix}top1": self.top1 / n,
                f"{prefix}top5": self.top5 / n, f"{prefix}samples": self.samples,
                f"{prefix}skipped": self.skipped}


@torch.no_grad()
def eval_counts(model: nn.Module, batches: Iterable[Batch], *, device: torch.device,
                precision: str, normalize: Callable[[torch.Tensor], torch.Tensor],
                channels_last: bool) -> EvalCounts:
    """Run ``model`` (set to eval mode, restored after) over ``batches`` and sum the counts.

    ``precision`` is resolved (:func:`resolve_precision`); logits are compared in fp32.
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts()
    try:
        for batch in batches:
            images, labels = prepare_batch(batch, device, normalize, channels_last)
            with autocast(precision, device):
                logits = model(images)
            logits = logits.float()
            counts.loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            counts.top1 += float(hits[:, 0].sum())
            counts.top5 += float(hits.any(dim=1).sum())
            counts.samples += len(labels)
            counts.skipped += batch.skipped
    finally:
        model.train(was_training)
    return counts


def evaluate(model: nn.Module, cfg: JobConfig, data_path: str, split: str = "val",
             crop: int | None = None, batch_size: int | None = None,
             workers: int | None = None, device: torch.device | None = None,
             progress: bool = False) -> dict[str, float]:
    """Top-1, top-5 and mean loss of ``model`` over every sample of ``split`` of ``data_path``,
    exactly as training validates (:func:`eval_counts` with the config's recipe, eval crop,
    precision and memory format).

    ``crop``, ``batch_size`` and ``workers`` default to the config's; ``progress``: report the
    images done on stderr (:class:`ran.progress.Progress`). Returns ``top1``, ``top5``
    (fractions), ``loss`` (nats), ``images``, ``skipped`` and ``img_per_s`` (model and data time).

    Raises:
        DataError: the shards cannot be read.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels_last = cfg.train.channels_last
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(
        data_path, split, train=False, batch_size=batch_size or cfg.data.batch_size,
        recipe=cfg.data.recipe, crop=crop or eval_crop(cfg),
        workers=cfg.data.workers if workers is None else workers,
        max_bad_fraction=cfg.data.max_bad_fraction, pin_memory=device.type == "cuda",
        decode=cfg.data.decode, device=device, max_pixels=cfg.data.max_pixels,
    )
    start = time.perf_counter()
    total = sum(n for _, n in split_shards(data_path, loader.manifest, split))
    shown = Progress(f"evaluating {split}", total, "img", enabled=progress)
    try:
        counts = eval_counts(model, counted(loader, shown, lambda b: len(b.labels) + b.skipped),
                             device=device,
                             precision=resolve_precision(cfg.train.precision, device, model_key(cfg)),
                             normalize=normalizer(cfg.data.recipe), channels_last=channels_last)
    finally:
        shown.close()
        loader.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    m = counts.metrics(prefix="")
    return {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "images": counts.samples,
            "skipped": counts.skipped, "img_per_s": counts.samples / max(elapsed, 1e-9)}


def evaluate_ref(ref: str | tracking.ModelSource, data_path: str, split: str = "val",
                 crop: int | None = None, batch_size: int | None = None,
                 workers: int | None = None,
                 progress: bool = False) -> tuple[LoadedModel, dict[str, float]]:
    """Resolve, load, check the classes against the data, and :func:`evaluate` one reference.

    Raises:
        tracking.ModelRefError, ValueError, DataError: see :func:`load_model`, :func:`check_classes`.
    """
    loaded = load_model(ref)
    data_storage.require_dir(data_path)  # no folder, told apart from a folder without shards
    check_classes(loaded.model, loaded.class_names, read_manifest(data_path), data_path)
    metrics = evaluate(loaded.model, loaded.config, data_path, split, crop, batch_size, workers,
                       progress=progress)
    return loaded, metrics

"""The inference runtime: what training, ``ran eval``, ``ran explain``, model logging and promotion
share, each defined once.

- :func:`build_model`: a config's model (``ran.models.create_model`` with the model section).
- :func:`eval_crop`: the crop a model is validated and served at.
- :func:`resolve_precision` / :func:`autocast`: ``train.precision`` as it runs on a device.
- :func:`forward`: the one forward pass (prepare, autocast) of validation, eval, serving, explain.
- :func:`load_checkpoint`: the one reader of the checkpoint schema; :func:`latest_checkpoint`.
- :func:`read_model`: the one place a reference (checkpoint, run, registered version) becomes
  weights, config and class names; :class:`ModelBundle` (``ModelBundle.load``) builds the model
  with its eval transform, normaliser, precision and memory format, and has the one
  ``predict`` and the one ``evaluate``.
- :func:`resolve_init`, :func:`init_weights`: ``model.init_from`` checked and pinned before Ray
  starts, then loaded by every worker (a classifier of another number of classes re-initialised).
- :func:`eval_counts`: the evaluation loop (summed counts, so ranks add up).

Layers: this module sits above :mod:`ran.tracking` (a registered model is fetched through it) and
below :mod:`ran.train`, :mod:`ran.evaluate`, :mod:`ran.explain` and :mod:`ran.promotion`.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ran import steptable, tracking
from ran.config import ConfigError, JobConfig, load_yaml, parse_config
from ran.data import DataError
from ran.data import storage as data_storage
from ran.data.read import Batch, make_loader, read_manifest, split_shards
from ran.data.transforms import Transform, make_transform, normalizer, to_rgb, train_crop
from ran.models import create_model, model_defaults
from ran.progress import Progress, counted
from ran.tracking.models import SIDE_FILES

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

    The one resolver of the eval crop: ``data.eval_crop`` when set; else the train crop when it is
    not the recipe's (small images); else the model's own for its stem (Attention-92 on ImageNet:
    320, PAPER.md Table 3's single-crop test size; AttentionInception-56: 299); else the recipe's
    crop (224 ImageNet, 32 CIFAR). :class:`ModelBundle` resolves it once and carries it.
    """
    if cfg.data.eval_crop:
        return cfg.data.eval_crop
    if cfg.data.crop and cfg.data.crop != train_crop(cfg.data.recipe):
        return cfg.data.crop
    own = model_defaults(cfg.model.name).eval_crop.get(cfg.resolved_stem())
    return own or train_crop(cfg.data.recipe)


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


def prepare_images(images: torch.Tensor, device: torch.device,
                   normalize: Callable[[torch.Tensor], torch.Tensor], channels_last: bool) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` images -> normalised float on ``device`` (channels_last if asked).
    The copy is non-blocking (pinned loaders)."""
    images = normalize(images.to(device, non_blocking=True))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def prepare_batch(batch: Batch, device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's images through :func:`prepare_images`, and its int64 ``(N,)`` labels on
    ``device``."""
    return (prepare_images(batch.images, device, normalize, channels_last),
            batch.labels.to(device, non_blocking=True))


def forward(model: nn.Module, images: torch.Tensor, *, device: torch.device, precision: str,
            normalize: Callable[[torch.Tensor], torch.Tensor], channels_last: bool,
            masks: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward pass of validation, ``ran eval``, serving, explain and the promotion gate:
    uint8 ``(N, 3, H, W)`` images through :func:`prepare_images` and ``model`` under
    :func:`autocast` (``precision`` resolved). Returns float32 logits ``(N, classes)`` on
    ``device`` and, with ``masks``, the soft masks (``model(x, return_masks=True)``: one
    ``(N, C, h, w)`` tensor per attention module; else ``[]``)."""
    x = prepare_images(images, device, normalize, channels_last)
    with autocast(precision, device):
        if masks:
            logits, found = model(x, return_masks=True)
        else:
            logits, found = model(x), []
    return logits.float(), list(found)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the one schema, the one reader


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The latest checkpoint directory of a run directory: the last by name of its
    subdirectories that hold a ``checkpoint.pt`` (``epoch=E_step=S`` sorts in training order);
    None when there is none."""
    found = sorted((p.parent for p in Path(directory).glob(f"*/{CHECKPOINT_FILE}")),
                   key=lambda p: p.name)
    return found[-1] if found else None


def checkpoint_file(path: str | Path) -> Path:
    """``checkpoint.pt`` itself, in a checkpoint directory, or the latest under a run directory.

    Raises:
        tracking.ModelRefError: no checkpoint there.
    """
    path = Path(path)
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    latest = latest_checkpoint(path)
    if latest is None:
        raise tracking.ModelRefError(f"checkpoint {path}: no {CHECKPOINT_FILE} in it or in its subdirectories")
    return latest / CHECKPOINT_FILE


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The one reader of ``ran train``'s checkpoint schema, on the CPU, ``weights_only``:
    ``model`` (state_dict), ``config`` (the resolved job config, a dict), ``run_id``, and for a
    resume ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``samples``,
    ``epoch_progress``, ``last_val``, ``rng`` (one state per rank) and ``plan``.

    ``path``: a checkpoint file, a checkpoint directory, or a run directory (its latest,
    :func:`latest_checkpoint`). A file holding a plain ``state_dict``
    (``torch.save(model.state_dict(), path)``) reads as ``{"model": state_dict}``: weights, no
    config (``model.init_from`` takes it).

    Raises:
        tracking.ModelRefError: no such file, a file torch cannot load, or neither a checkpoint
            nor a state_dict (one line naming the file).
    """
    if not Path(path).exists():
        raise tracking.ModelRefError(f"checkpoint {path}: no such file or directory")
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise tracking.ModelRefError(f"checkpoint {file}: cannot load it ({_first_line(err)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"model": state}
    raise tracking.ModelRefError(f"checkpoint {file}: neither a `ran train` checkpoint nor a "
                                 "state_dict (torch.save(model.state_dict(), path))")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# References: what a checkpoint, run or registered version holds


def resolve_model(ref: str) -> tracking.ModelSource:
    """A reference -> where the model is: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an
    MLflow run id (32 hex digits: its registered or logged model; for a run that logged none,
    such as a search trial, the latest checkpoint of its local Ray Train directory), a logged
    model's side-file directory (what the pyfunc is given), or a checkpoint path (file,
    checkpoint directory, or a run directory: its latest checkpoint).

    Raises:
        tracking.ModelRefError: the reference names nothing loadable (one line saying what was looked for).
    """
    if tracking.MODELS_URI.match(ref):
        return tracking.registry_source(ref)
    path = Path(ref)
    if path.is_dir() and all((path / name).is_file() for name in SIDE_FILES):
        return tracking.ModelSource(ref, "files", path=str(path))
    if path.exists():
        return tracking.ModelSource(ref, "checkpoint", path=str(checkpoint_file(path)))
    if tracking.RUN_ID.match(ref):
        try:
            return tracking.run_source(ref)
        except tracking.ModelRefError:
            checkpoint = _run_checkpoint(ref)  # a run that logged no model (a search trial)
            if checkpoint is None:
                raise
            return tracking.ModelSource(ref, "checkpoint", run_id=ref, path=str(checkpoint))
    raise tracking.ModelRefError(
        f"model {ref!r}: not models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id (32 hex "
        "digits) or an existing checkpoint path")


def _run_checkpoint(ref: str) -> Path | None:
    """The latest checkpoint file of MLflow run ``ref``, from its Ray Train directory
    (``ran.storage`` tag) when that is a local directory; None otherwise."""
    try:
        storage = tracking.RunTracker(ref).tag(tracking.TAG_STORAGE)
        latest = latest_checkpoint(storage) if storage and Path(storage).is_dir() else None
    except Exception:  # noqa: BLE001 - no such run, store unreachable: the caller's error stands
        return None
    return latest / CHECKPOINT_FILE if latest else None


@dataclass
class ModelParts:
    """What a reference holds, before a model is built from it (:func:`read_model`)."""

    state: dict[str, torch.Tensor]  # the weights (CPU)
    config: JobConfig | None  # the resolved config trained with; None for a plain state_dict file
    class_names: list[str] | None  # index -> name; None when unknown (checkpoint, data gone)
    source: tracking.ModelSource
    progress: dict[str, Any]  # a checkpoint's epoch, step, samples and last_val; {} otherwise


def read_model(ref: str | tracking.ModelSource) -> ModelParts:
    """The weights, config and class names a reference names (see :func:`resolve_model`): the
    one place a reference becomes a model (:meth:`ModelBundle.load` builds it; ``model.init_from``
    takes its weights).

    A logged or registered model is downloaded and checked to be ran's own
    (:func:`ran.tracking.download_model_files`); a checkpoint is read by :func:`load_checkpoint`,
    its class names from the manifest of the data it was trained on when that is a local directory
    (else None: nothing a checkpoint names is fetched).

    Raises:
        tracking.ModelRefError: nothing loadable there, or a model ran did not log.
        ConfigError: a config that is not a valid job config.
    """
    source = ref if isinstance(ref, tracking.ModelSource) else resolve_model(ref)
    if source.kind in ("registry", "run", "files"):
        side = (Path(source.path) if source.kind == "files"  # type: ignore[arg-type]
                else tracking.download_model_files(source).config.parent)
        state = torch.load(side / "state_dict.pt", map_location="cpu", weights_only=True)
        cfg = parse_config(load_yaml((side / "config.yaml").read_text()), source.ref)
        classes = json.loads((side / "classes.json").read_text())
        return ModelParts(state, cfg, classes, source, {})
    checkpoint = load_checkpoint(source.path)  # type: ignore[arg-type]
    source.run_id = source.run_id or checkpoint.get("run_id")
    config = checkpoint.get("config")
    cfg = parse_config(config, str(source.path)) if config is not None else None
    progress = {k: checkpoint[k] for k in ("epoch", "step", "samples", "last_val") if k in checkpoint}
    return ModelParts(checkpoint["model"], cfg, _manifest_classes(cfg.data.path) if cfg else None,
                      source, progress)


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
# The model bundle


PREDICT_BATCH = 64  # images per forward pass of predict
_RNG = random.Random(0)  # eval transforms are deterministic; the argument is part of their API


def default_device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelBundle:
    """A trained model with everything that turns images into its predictions, as training
    validated it (torchvision's ``Weights.transforms()``, timm's ``pretrained_cfg``): what
    ``ran eval``, the served pyfunc, ``ran explain``, the promotion gate, ``model.init_from`` and
    the end of training all use. Build one with :meth:`load` (a reference) or :meth:`build` (a
    model in memory)."""

    model: nn.Module  # ours (forward(x, return_masks=True) works), eval mode, on device
    config: JobConfig  # the resolved config it was trained with, data.eval_crop set to the crop
    transform: Transform  # the eval transform: encoded image -> uint8 (3, crop, crop)
    normalize: Callable[[torch.Tensor], torch.Tensor]  # uint8 NCHW -> normalised float32
    precision: str  # train.precision as it runs on device: fp32, bf16 or fp16
    channels_last: bool  # the memory format training used (train.channels_last)
    class_names: list[str] | None  # index -> name; None when unknown
    device: torch.device
    source: tracking.ModelSource | None = None  # where it came from (provenance, run tags)
    progress: dict[str, Any] = field(default_factory=dict)  # a checkpoint's epoch, step, last_val

    @property
    def crop(self) -> int:
        """The side in pixels of the eval centre crop."""
        return int(self.transform.crop)

    @property
    def has_masks(self) -> bool:
        """Whether the model has attention modules (a baseline has none)."""
        return bool(getattr(self.model, "attention_modules", None))

    @classmethod
    def build(cls, model: nn.Module, cfg: JobConfig, class_names: list[str] | None = None,
              source: tracking.ModelSource | None = None, *, device: torch.device | None = None,
              crop: int | None = None, progress: dict[str, Any] | None = None) -> "ModelBundle":
        """The bundle of ``model`` (moved to ``device``, default :func:`default_device`; eval mode;
        channels_last where the config says) trained with ``cfg``. ``crop`` overrides the
        config's eval crop (:func:`eval_crop`), which is resolved here once and pinned in
        ``config`` (``data.eval_crop``)."""
        device = device or default_device()
        crop = crop or eval_crop(cfg)
        cfg = cfg.with_values({"data.eval_crop": crop})
        model = model.eval().to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return cls(model, cfg,
                   make_transform(cfg.data.recipe, train=False, crop=crop, max_pixels=cfg.data.max_pixels),
                   normalizer(cfg.data.recipe),
                   resolve_precision(cfg.train.precision, device, model_key(cfg)),
                   cfg.train.channels_last, list(class_names) if class_names else None, device,
                   source, dict(progress or {}))

    @classmethod
    def load(cls, ref: str | tracking.ModelSource, *, device: torch.device | None = None,
             crop: int | None = None, class_names: list[str] | None = None) -> "ModelBundle":
        """The bundle a reference names (:func:`read_model`): a checkpoint file, a checkpoint
        or run directory, an MLflow run id, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
        ``class_names`` stand in for those a checkpoint cannot name.

        Raises:
            tracking.ModelRefError: nothing loadable there, weights without a config, or a
                model ran did not log.
            ConfigError: its config is not a valid job config.
        """
        parts = read_model(ref)
        if parts.config is None:
            raise tracking.ModelRefError(
                f"checkpoint {parts.source.path}: weights only (a plain state_dict), no config to "
                "build the model from; use a checkpoint `ran train` wrote or a logged model")
        model = build_model(parts.config)
        model.load_state_dict(parts.state)
        return cls.build(model, parts.config, parts.class_names or class_names, parts.source,
                         device=device, crop=crop, progress=parts.progress)

    # -- images in, probabilities out

    def pixels(self, image: bytes) -> torch.Tensor:
        """One encoded image (any format Pillow reads) through the eval transform: uint8
        ``(3, crop, crop)``.

        Raises:
            ImageTooLarge: more pixels than ``data.max_pixels`` (judged from the header).
            PIL.UnidentifiedImageError, OSError, ValueError: not a readable image.
        """
        return self.transform.sample(image, _RNG)

    def _batch(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack([self.pixels(_encoded(image)) for image in images])

    @torch.inference_mode()
    def predict(self, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Class probabilities of a batch: float32 ``(N, classes)`` on the CPU.

        ``images``: uint8 ``(N, 3, crop, crop)`` already through the eval transform
        (:meth:`pixels`), or a sequence of PIL images or encoded images, which go through it.
        Computed as training validated (:func:`forward`), :data:`PREDICT_BATCH` at a time.
        """
        return self.predict_with_masks(images, masks=False)[0]

    @torch.inference_mode()
    def predict_with_masks(self, images: torch.Tensor | Sequence[Any], masks: bool = True,
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`predict` and, with ``masks`` (and a model that has them), each attention
        module's soft mask, float32 ``(N, C, h, w)`` on the CPU (``ran explain``)."""
        pixels = self._batch(images)
        probs: list[torch.Tensor] = []
        found: list[list[torch.Tensor]] = []
        for start in range(0, len(pixels), PREDICT_BATCH):
            logits, chunk = forward(self.model, pixels[start:start + PREDICT_BATCH],
                                    device=self.device, precision=self.precision,
                                    normalize=self.normalize, channels_last=self.channels_last,
                                    masks=masks and self.has_masks)
            probs.append(logits.softmax(dim=1).cpu())
            found.append([m.float().cpu() for m in chunk])
        joined = [torch.cat(per_module) for per_module in zip(*found)] if found and found[0] else []
        return torch.cat(probs), joined

    # -- the evaluation loop

    def evaluate(self, data_path: str, split: str = "val", batch_size: int | None = None,
                 workers: int | None = None, progress: bool = False) -> dict[str, float]:
        """Top-1, top-5 and mean loss over every sample of ``split`` of ``data_path``, exactly as
        training validates (:func:`eval_counts` at the bundle's crop, precision and memory
        format), after checking the data's classes are the model's (:func:`check_classes`).

        ``batch_size`` and ``workers`` default to the config's; ``progress``: report the images
        done on stderr (:class:`ran.progress.Progress`). Returns ``top1``, ``top5``
        (fractions), ``loss`` (nats), ``images``, ``skipped`` and ``img_per_s`` (model and data
        time).

        Raises:
            ValueError: the data's classes are not the model's.
            DataError: no such folder, no shards in it, or the shards cannot be read.
        """
        cfg, device = self.config, self.device
        data_storage.require_dir(data_path)  # no folder, told apart from a folder without shards
        check_classes(self.model, self.class_names, read_manifest(data_path), data_path)
        loader = make_loader(
            data_path, split, train=False, batch_size=batch_size or cfg.data.batch_size,
            recipe=cfg.data.recipe, crop=self.crop,
            workers=cfg.data.workers if workers is None else workers,
            max_bad_fraction=cfg.data.max_bad_fraction, pin_memory=device.type == "cuda",
            decode=cfg.data.decode, device=device, max_pixels=cfg.data.max_pixels,
        )
        start = time.perf_counter()
        total = sum(n for _, n in split_shards(data_path, loader.manifest, split))
        shown = Progress(f"evaluating {split}", total, "img", enabled=progress)
        try:
            counts = eval_counts(self.model, counted(loader, shown, lambda b: len(b.labels) + b.skipped),
                                 device=device, precision=self.precision,
                                 normalize=self.normalize, channels_last=self.channels_last)
        finally:
            shown.close()
            loader.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        m = counts.metrics(prefix="")
        return {"top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "images": counts.samples,
                "skipped": counts.skipped, "img_per_s": counts.samples / max(elapsed, 1e-9)}


def _encoded(image: Any) -> bytes:
    """Encoded image bytes as they are, a PIL image losslessly as PPM (so that the eval transform
    treats it as it treats a stored image)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"an image is encoded bytes or a PIL image, not a {type(image).__name__}")
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="PPM")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Fine-tuning: model.init_from

CLASSIFIER = "fc"  # the classifier of every ran.models network: re-initialised for new classes


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
        parent = read_model(ref)
    except tracking.ModelRefError as err:
        raise ConfigError(f"model.init_from: {err}") from None
    try:
        with torch.device("meta"):  # shapes only, no memory
            model_state = build_model(cfg).state_dict()
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    fit_state(model_state, parent.state, ref, _describe(cfg))
    return cfg.with_values({"model.init_from": pinned_ref(parent.source)})


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
    ref = cfg.model.init_from
    parent = read_model(ref).state
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
    """The evaluation loop of training's validation and :meth:`ModelBundle.evaluate`: run
    ``model`` (set to eval mode, restored after) over ``batches`` through :func:`forward` and sum
    the counts. ``precision`` is resolved (:func:`resolve_precision`)."""
    was_training = model.training
    model.eval()
    counts = EvalCounts()
    try:
        for batch in batches:
            logits, _ = forward(model, batch.images, device=device, precision=precision,
                                normalize=normalize, channels_last=channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            counts.loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            counts.top1 += float(hits[:, 0].sum())
            counts.top5 += float(hits.any(dim=1).sum())
            counts.samples += len(labels)
            counts.skipped += batch.skipped
    finally:
        model.train(was_training)
    return counts

"""`ran eval`: load a trained model from wherever it lives and measure it on shards.

A model reference is one of

- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered version (the alias is resolved
  once, so the whole evaluation uses one version even if the alias moves meanwhile);
- an MLflow run id: the version that run registered (its ``ran.registered_version`` tag), else
  the model it logged;
- a checkpoint: ``checkpoint.pt``, a checkpoint directory, or a run's storage directory (its latest
  ``epoch=*`` checkpoint).

Whatever the source, the result is our own ``ResidualAttentionNet`` (not the exported graph that
``mlflow.pytorch.load_model`` returns), rebuilt from the logged config and state dict, with the
config it was trained with. :func:`evaluate` measures it exactly as the trainer validates: the eval
transform at the eval crop, the training precision (autocast) and memory format, counts summed over
the whole split. ``ran eval`` then logs an evaluation run tagged with the model version and
source run, with the logged model as the run's input.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

if TYPE_CHECKING:
    from ran.config import JobConfig

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODELS_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")

# Tags on evaluation and explanation runs: what was evaluated, and from where.
TAG_KIND = "ran.kind"  # "evaluation" or "explain"
TAG_REF = "ran.model_ref"  # the reference as given
TAG_MODEL_NAME = "ran.registered_model"
TAG_MODEL_VERSION = "ran.model_version"
TAG_SOURCE_RUN = "ran.source_run_id"  # the training run
TAG_CHECKPOINT = "ran.checkpoint"


class ModelRefError(ValueError):
    """A model reference that names nothing loadable."""


@dataclass
class ModelSource:
    """Where a model comes from, resolved from a reference."""

    ref: str  # as the user wrote it
    kind: str  # "registry", "run" or "checkpoint"
    name: str | None = None  # registered model name
    version: str | None = None  # registered version
    run_id: str | None = None  # the training run
    model_uri: str | None = None  # what to download: models:/NAME/VERSION or the logged model
    model_id: str | None = None  # MLflow 3 logged-model id (m-...), when known
    path: str | None = None  # checkpoint file

    @property
    def label(self) -> str:
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        if self.path:
            return Path(self.path).parent.name or self.path
        return self.run_id or self.ref

    def tags(self) -> dict[str, str]:
        tags = {TAG_REF: self.ref, TAG_MODEL_NAME: self.name, TAG_MODEL_VERSION: self.version,
                TAG_SOURCE_RUN: self.run_id, TAG_CHECKPOINT: self.path}
        return {k: v for k, v in tags.items() if v}


# ---------------------------------------------------------------------------------------------
# Resolving and loading


def resolve_model(ref: str) -> ModelSource:
    """Turn a reference (see the module docstring) into a :class:`ModelSource`."""
    match = MODELS_URI.match(ref)
    if match:
        return _registry_source(ref, match["name"], alias=match["alias"], version=match["version"])
    path = Path(ref)
    if path.exists():
        return ModelSource(ref, "checkpoint", path=str(_checkpoint_file(path)))
    if RUN_ID.match(ref):
        return _run_source(ref)
    raise ModelRefError(
        f"model {ref!r}: not models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id (32 hex "
        "digits) or an existing checkpoint path"
    )


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    from ran.tracking import tracking_uri

    return MlflowClient(tracking_uri=tracking_uri())


def _registry_source(ref: str, name: str, *, alias: str | None = None,
                     version: str | None = None) -> ModelSource:
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
    except MlflowException as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelRefError(f"model {ref}: registered model {name!r} has no {what} "
                            f"(see `ran registry {name}`): {err.message}") from None
    return version_source(ref, mv)


def version_source(ref: str, mv: Any) -> ModelSource:
    """The source of a registry ``ModelVersion`` entity."""
    model_id = getattr(mv, "model_id", None)
    if not model_id and str(mv.source).startswith("models:/m-"):
        model_id = str(mv.source)[len("models:/"):].split("/")[0]
    return ModelSource(ref, "registry", name=mv.name, version=str(mv.version), run_id=mv.run_id,
                       model_uri=f"models:/{mv.name}/{mv.version}", model_id=model_id)


def _run_source(run_id: str) -> ModelSource:
    from mlflow.exceptions import MlflowException

    from ran.tracking import MODEL_NAME, TAG_VERSION

    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelRefError(f"model {run_id}: no such MLflow run in the tracking store "
                            f"(MLFLOW_TRACKING_URI) and no such checkpoint path") from None
    registered = run.data.tags.get(TAG_VERSION)
    if registered and "/" in registered:
        name, version = registered.rsplit("/", 1)
        return _registry_source(run_id, name, version=version)
    logged = [m for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if m.name == MODEL_NAME]
    if not logged:
        raise ModelRefError(f"run {run_id} logged no model (did the training run finish?)")
    return ModelSource(run_id, "run", run_id=run_id, model_uri=f"models:/{logged[0].model_id}",
                       model_id=logged[0].model_id)


def _checkpoint_file(path: Path) -> Path:
    """``checkpoint.pt`` itself, in a checkpoint directory, or the latest under a run directory."""
    from ran.train.worker import CHECKPOINT_FILE

    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    found = sorted(path.glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.parent.name)
    if not found:
        raise ModelRefError(f"checkpoint {path}: no {CHECKPOINT_FILE} in it or in its subdirectories")
    return found[-1]


def load_model(ref: "str | ModelSource") -> tuple[nn.Module, "JobConfig", list[str] | None]:
    """``(model, config, class names)`` of a reference; the model is ours, on the CPU, in eval mode.

    Class names come with a logged model; for a checkpoint they are read from the manifest of the
    data it was trained on when that is still reachable (else None).
    """
    source = ref if isinstance(ref, ModelSource) else resolve_model(ref)
    if source.kind == "checkpoint":
        return _load_checkpoint(source)
    from ran.tracking import load_ran_model

    loaded = load_ran_model(source.model_uri)  # type: ignore[arg-type]
    return loaded.model, loaded.config, loaded.class_names


def _load_checkpoint(source: ModelSource) -> tuple[nn.Module, "JobConfig", list[str] | None]:
    from ran.config import parse_config
    from ran.train.worker import build_model, load_checkpoint

    try:
        state = load_checkpoint(source.path)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ModelRefError(f"checkpoint {source.path}: cannot load it ({err})") from None
    if "model" not in state or "config" not in state:
        raise ModelRefError(f"checkpoint {source.path}: no model or config in it; "
                            "was it written by `ran train`?")
    cfg = parse_config(state["config"], str(source.path))
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    source.run_id = source.run_id or state.get("run_id")
    return model.eval(), cfg, _manifest_classes(cfg.data.path)


def _manifest_classes(path: str) -> list[str] | None:
    from ran.data import DataError
    from ran.data.read import read_manifest

    try:
        return list(read_manifest(path)["classes"])
    except (DataError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Evaluating


def eval_crop(cfg: "JobConfig") -> int:
    """The crop training validated at: ``data.eval_crop``, a custom train crop, else the model's."""
    from ran.models import model_defaults

    if cfg.data.eval_crop:
        return cfg.data.eval_crop
    if cfg.data.crop:
        return cfg.data.crop
    return model_defaults(cfg.model.name).eval_crop[cfg.resolved_stem()]


def check_classes(model: nn.Module, class_names: list[str] | None, manifest: dict[str, Any],
                  data_path: str) -> None:
    """The data's labels must mean what the model's outputs mean."""
    outputs = getattr(getattr(model, "fc", None), "out_features", None)
    if outputs is not None and outputs != int(manifest["num_classes"]):
        raise ValueError(f"data {data_path} has {manifest['num_classes']} classes but the model "
                         f"has {outputs} outputs: evaluate it on the data it was trained for")
    if class_names and list(manifest["classes"]) != list(class_names):
        raise ValueError(f"data {data_path}: its class names differ from the model's "
                         f"(first: {manifest['classes'][:3]} vs {class_names[:3]})")


@torch.no_grad()
def evaluate(model: nn.Module, cfg: "JobConfig", data_path: str, split: str = "val",
             crop: int | None = None, batch_size: int | None = None,
             workers: int | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean loss of ``model`` over every sample of ``split``.

    Preprocessing, precision and memory format follow ``cfg`` (as in training's validation);
    ``crop``, ``batch_size`` and ``workers`` default to the config's. Returns ``top1``, ``top5``,
    ``loss``, ``images``, ``skipped`` and ``img_per_s`` (model and data time together).
    """
    from ran.data.read import make_loader
    from ran.data.transforms import normalizer
    from ran.train.worker import autocast, resolve_precision

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels_last = cfg.train.channels_last
    precision = resolve_precision(cfg.train.precision, device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(
        data_path, split, train=False, batch_size=batch_size or cfg.data.batch_size,
        recipe=cfg.data.recipe, crop=crop or eval_crop(cfg),
        workers=cfg.data.workers if workers is None else workers,
        max_bad_fraction=cfg.data.max_bad_fraction, pin_memory=device.type == "cuda",
    )
    normalize = normalizer(cfg.data.recipe)
    loss = top1 = top5 = images = skipped = 0.0
    start = time.perf_counter()
    try:
        for batch in loader:
            x = normalize(batch.images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            with autocast(precision, device):
                logits = model(x)
            logits = logits.float()
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            top1 += float(hits[:, 0].sum())
            top5 += float(hits.any(dim=1).sum())
            images += len(labels)
            skipped += batch.skipped
    finally:
        loader.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    n = max(images, 1)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": images,
            "skipped": skipped, "img_per_s": images / max(elapsed, 1e-9)}


def evaluate_ref(ref: "str | ModelSource", data_path: str, split: str = "val",
                 crop: int | None = None, batch_size: int | None = None,
                 workers: int | None = None) -> tuple[ModelSource, "JobConfig", dict[str, float]]:
    """Resolve, load, check the classes and evaluate one model reference."""
    from ran.data.read import read_manifest

    source = ref if isinstance(ref, ModelSource) else resolve_model(ref)
    model, cfg, class_names = load_model(source)
    check_classes(model, class_names, read_manifest(data_path), data_path)
    metrics = evaluate(model, cfg, data_path, split, crop, batch_size, workers)
    return source, cfg, metrics


# ---------------------------------------------------------------------------------------------
# Logging


@contextlib.contextmanager
def start_linked_run(source: ModelSource, cfg: "JobConfig", *, kind: str,
                     params: dict[str, Any] | None = None) -> Iterator[tuple[Any, str]]:
    """A new run in the model's experiment, tagged with where the model came from.

    Yields ``(client, run_id)``; the run ends FINISHED, or FAILED when the body raises.
    """
    from ran.tracking import ensure_experiment

    client = _client()
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    run = client.create_run(experiment_id, run_name=f"{kind} {source.label}",
                            tags={TAG_KIND: kind, **source.tags()})
    run_id = run.info.run_id
    for key, value in (params or {}).items():
        client.log_param(run_id, key, str(value))
    status = "FAILED"
    try:
        yield client, run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


def log_evaluation(source: ModelSource, cfg: "JobConfig", metrics: dict[str, float],
                   params: dict[str, Any]) -> str:
    """Log an evaluation run; its metrics are also attached to the logged model, when known."""
    import mlflow

    from ran.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    with start_linked_run(source, cfg, kind="evaluation", params=params) as (_, run_id):
        mlflow.log_metrics(metrics, run_id=run_id, model_id=source.model_id)
    return run_id


def cli_eval(args: argparse.Namespace) -> int:
    source = resolve_model(args.model)
    source, cfg, metrics = evaluate_ref(source, args.data, args.split, args.crop, args.batch_size,
                                        args.workers)
    print(f"model   {source.label}  ({cfg.model.name}, {cfg.resolved_stem()} stem)")
    print(f"data    {args.data} [{args.split}]  {int(metrics['images'])} images"
          + (f", {int(metrics['skipped'])} skipped" if metrics["skipped"] else ""))
    print(f"top-1   {metrics['top1']:.4f}")
    print(f"top-5   {metrics['top5']:.4f}")
    print(f"loss    {metrics['loss']:.4f}")
    print(f"img/s   {metrics['img_per_s']:.1f}")
    params = {"data": args.data, "split": args.split, "crop": args.crop or eval_crop(cfg),
              "batch_size": args.batch_size or cfg.data.batch_size}
    run_id = log_evaluation(source, cfg, metrics, params)
    print(f"logged  MLflow run {run_id}")
    return 0

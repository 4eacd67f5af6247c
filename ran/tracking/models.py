"""Models in MLflow: logging and registering a trained model, finding a model from a reference,
fetching its files, and the registry (versions, aliases, the promotion gate's reads and writes).

A model ``ran train`` logs is ``mlflow.pytorch.log_model`` (pt2 format, input example of batch 2,
signature) plus ``config.yaml``, ``classes.json`` and ``state_dict.pt`` as extra files, so that
:func:`ran.runtime.load_model` can rebuild our own module class. Aliases are the registry's mutable
pointers; model-version stages are deprecated and not used.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ran.tracking import store
from ran.tracking.names import (
    MODEL_NAME, TAG_CHECKPOINT, TAG_MODEL_NAME, TAG_MODEL_VERSION, TAG_REF, TAG_SOURCE_RUN,
    TAG_VERSION,
)
from ran.tracking.runs import RunTracker

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from ran.config import JobConfig

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODELS_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
SIDE_FILES = ("config.yaml", "classes.json", "state_dict.pt")


class ModelRefError(ValueError):
    """A model reference that names nothing loadable (registered model, version, alias, run,
    checkpoint)."""


# ---------------------------------------------------------------------------------------------
# Logging the trained model


def log_final_model(tracker: RunTracker, model: "nn.Module", cfg: "JobConfig",
                    class_names: list[str], input_example: "np.ndarray",
                    metrics: dict[str, float]) -> str | None:
    """Log the trained model into ``tracker``'s run and register it as
    ``cfg.tracking.registered_model``.

    ``input_example``: float32 ``(2, 3, crop, crop)``, normalised (batch 2 keeps the exported
    batch dimension dynamic). Returns ``"name/version"`` (the version tagged with ``metrics``, the
    run with ``ran.registered_version``), or None when no name is configured.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    name = cfg.tracking.registered_model
    store.use_uri(tracker.uri)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(cfg.to_yaml())
        (Path(tmp) / "classes.json").write_text(json.dumps(class_names))
        torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
        with mlflow.start_run(run_id=tracker.run_id):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, input_example=input_example,
                signature=infer_signature(input_example, output),
                extra_files=[str(Path(tmp) / n) for n in SIDE_FILES],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                registered_model_name=name,
            )
    if not name:
        return None
    version = str(info.registered_model_version)
    for key, value in {**metrics, "run_id": tracker.run_id, "model": cfg.model.name}.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))
    tracker.set_tags({TAG_VERSION: f"{name}/{version}"})
    return f"{name}/{version}"


# ---------------------------------------------------------------------------------------------
# From a reference to a model's files


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
        """``name/version``, the checkpoint directory's name, or the run id."""
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        if self.path:
            return Path(self.path).parent.name or self.path
        return self.run_id or self.ref

    def tags(self) -> dict[str, str]:
        """Tags for a run made from this model (evaluation, explanation)."""
        tags = {TAG_REF: self.ref, TAG_MODEL_NAME: self.name, TAG_MODEL_VERSION: self.version,
                TAG_SOURCE_RUN: self.run_id, TAG_CHECKPOINT: self.path}
        return {k: v for k, v in tags.items() if v}


def registry_source(ref: str) -> ModelSource:
    """The source of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Raises:
        ModelRefError: no such model, version or alias.
    """
    from mlflow.exceptions import MlflowException

    match = MODELS_URI.match(ref)
    if match is None:
        raise ModelRefError(f"{ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    mlflow_client = store.client()
    try:
        mv = (mlflow_client.get_model_version_by_alias(name, alias) if alias
              else mlflow_client.get_model_version(name, version))
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


def run_source(run_id: str) -> ModelSource:
    """The model a training run registered (or, unregistered, logged).

    Raises:
        ModelRefError: no such run, or it logged no model.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = store.client()
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ModelRefError(f"model {run_id}: no such MLflow run in the tracking store "
                            f"(MLFLOW_TRACKING_URI) and no such checkpoint path") from None
    registered = run.data.tags.get(TAG_VERSION)
    if registered and "/" in registered:
        name, version = registered.rsplit("/", 1)
        return registry_source(f"models:/{name}/{version}")
    logged = [m for m in mlflow_client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        if m.name == MODEL_NAME]
    if not logged:
        raise ModelRefError(f"run {run_id} logged no model (did the training run finish?)")
    return ModelSource(run_id, "run", run_id=run_id, model_uri=f"models:/{logged[0].model_id}",
                       model_id=logged[0].model_id)


@dataclass
class ModelFiles:
    """The side files of a logged model, downloaded to a local directory."""

    config: Path  # config.yaml: the resolved job config
    classes: Path  # classes.json: class index -> name
    state_dict: Path  # state_dict.pt: the weights (torch.load(weights_only=True))


def download_model_files(source: ModelSource) -> ModelFiles:
    """Download a logged model's side files (registered version or logged model).

    Raises:
        ModelRefError: the model has no ``state_dict.pt`` (not logged by ``ran train``).
    """
    import mlflow

    store.use_uri()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.model_uri))
    found = next((p.parent for p in local.rglob("state_dict.pt")), None)
    if found is None:
        raise ModelRefError(f"{source.model_uri}: no state_dict.pt beside the model; was it "
                            "logged by ran?")
    return ModelFiles(found / "config.yaml", found / "classes.json", found / "state_dict.pt")


# ---------------------------------------------------------------------------------------------
# The registry: versions, aliases, the promotion gate's reads and writes


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def model_version(name: str, version: str) -> Any:
    """The ``ModelVersion`` ``name/version``.

    Raises:
        ModelRefError: no such version (the message lists the versions there are).
    """
    from mlflow.exceptions import MlflowException

    try:
        return store.client().get_model_version(name, str(version))
    except MlflowException:
        known = ", ".join(sorted((str(v.version) for v in model_versions(name)), key=int)) or "none"
        raise ModelRefError(f"registered model {name!r} has no version {version} "
                            f"(versions: {known})") from None


def model_versions(name: str) -> list[Any]:
    """Every version of ``name``, newest first."""
    found = store.client().search_model_versions(f"name = {_quote(name)}")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def registered_model(name: str) -> Any:
    """The ``RegisteredModel`` ``name``.

    Raises:
        ModelRefError: no such model (the message lists the models there are).
    """
    from mlflow.exceptions import MlflowException

    try:
        return store.client().get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in registered_models()) or "none"
        raise ModelRefError(f"no registered model {name!r} (registered: {known})") from None


def registered_models() -> list[Any]:
    """Every registered model, by name."""
    mlflow_client = store.client()
    models, token = [], None
    while True:
        page = mlflow_client.search_registered_models(max_results=100, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            return sorted(models, key=lambda m: m.name)


def alias_holder(name: str, alias: str) -> Any | None:
    """The ``ModelVersion`` ``alias`` points at, or None."""
    version = registered_model(name).aliases.get(alias)
    return None if version is None else store.client().get_model_version(name, str(version))


def run_params(run_id: str | None) -> dict[str, str]:
    """The params of a run ({} for None)."""
    return dict(store.client().get_run(run_id).data.params) if run_id else {}


def move_alias(name: str, alias: str, version: str, tags: dict[str, str],
               replaced: str | None, replaced_tags: dict[str, str]) -> None:
    """Point ``alias`` at ``version`` and record the promotion: ``tags`` on the version, and
    ``replaced_tags`` on the version it replaced (``replaced``), if any.

    Raises:
        ModelRefError: MLflow refused the alias.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = store.client()
    try:
        mlflow_client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as err:
        raise ModelRefError(f"cannot set alias {alias!r} on {name}/{version}: {err.message}") from None
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, value)
    if replaced is not None:
        for key, value in replaced_tags.items():
            mlflow_client.set_model_version_tag(name, str(replaced), key, value)

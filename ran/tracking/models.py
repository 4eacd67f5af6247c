"""Models in MLflow: logging and registering a trained model, the registration gate, finding a
model from a reference, fetching its files, and the registry (versions, aliases, the promotion
gate's reads and writes).

A model ``ran train`` logs has two flavors in one MLmodel:

- ``python_function`` whose loader is :mod:`ran.serving` (imported by name, as MLflow does; ``ran``
  must be installed where the model is served): it takes image bytes (raw, or base64 in JSON) and
  uint8 HWC arrays, applies the job's eval transform and returns the top-5 classes. The signature
  and the input example (one base64 JPEG) describe that interface.
- ``pytorch`` (pt2 format, exported from a normalised float NCHW example of batch 2): for readers
  without ``ran`` (``mlflow.pytorch.load_model`` gives an ``nn.Module``, README "Serving"); ran
  itself never reads it (an exported program has no ``return_masks`` and no eval transform).

Beside them, under ``data/ran/``, everything a :class:`ran.runtime.ModelBundle` needs, and the
only files ran reads back (:func:`ran.runtime.read_model`, for every verb and for the pyfunc):
``config.yaml`` (the resolved job config, with ``data.eval_crop`` pinned to the crop the model was
validated at, so a later change of a default cannot move it), ``classes.json`` and
``state_dict.pt``. Aliases are the registry's mutable pointers; model-version stages are deprecated and
not used.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ran.progress import waiting
from ran.tracking import store
from ran.tracking.names import (
    METRIC_TAGS, MODEL_NAME, TAG_CHECKPOINT, TAG_MODEL_NAME, TAG_MODEL_VERSION, TAG_REF, TAG_REGISTRATION,
    TAG_SOURCE_RUN, TAG_VERSION, version_metric,
)
from ran.tracking.runs import RunTracker

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from ran.config import JobConfig
    from ran.tracking.basis import Basis

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODELS_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
SIDE_FILES = ("config.yaml", "classes.json", "state_dict.pt")
SIDE_DIR = "ran"  # the side files' directory, under the model's data/ (the pyfunc's data path)
SERVING_MODULE = "ran.serving"  # the pyfunc loader (``_load_pyfunc``), imported by MLflow by name


class ModelRefError(ValueError):
    """A model reference that names nothing loadable (registered model, version, alias, run,
    checkpoint)."""


# ---------------------------------------------------------------------------------------------
# Logging the trained model


# MLflow 3.17's registration notices (mlflow/tracking/_model_registry/fluent.py).
REGISTRATION_NOTICE = re.compile(r"^(Successfully registered model |Created version |Registered model "
                                 r".* already exists\. Creating a new version)")


def log_final_model(tracker: RunTracker, model: "nn.Module", cfg: "JobConfig",
                    class_names: list[str], input_example: "np.ndarray",
                    metrics: dict[str, float], register: bool = True,
                    quiet: bool = False) -> str | None:
    """Log the trained model into ``tracker``'s run (both flavors, see the module docstring) and,
    if ``register`` and a name is configured, register it as ``cfg.tracking.registered_model``.
    ``quiet``: leave out MLflow's own registration notices ("Successfully registered model",
    "Created version", "already exists. Creating a new version"), which the caller reports in its
    own words; anything else MLflow writes to stderr meanwhile is passed on.

    ``input_example``: float32 ``(2, 3, crop, crop)``, normalised (batch 2 keeps the exported
    batch dimension dynamic). Returns ``"name/version"`` (the version tagged with ``metrics``, the
    run with ``ran.registered_version``), or None when nothing was registered.
    """
    import mlflow
    import torch
    from mlflow.models import Model, infer_signature

    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    name = cfg.tracking.registered_model if register else None
    store.use_uri(tracker.uri)
    with tempfile.TemporaryDirectory() as tmp:
        side = Path(tmp) / SIDE_DIR
        side.mkdir()
        (side / "config.yaml").write_text(cfg.to_yaml())
        (side / "classes.json").write_text(json.dumps(class_names))
        torch.save(model.state_dict(), side / "state_dict.pt")
        notices = io.StringIO()
        try:
            with mlflow.start_run(run_id=tracker.run_id), \
                    (contextlib.redirect_stderr(notices) if quiet else contextlib.nullcontext()):
                # ^ MLflow prints its notices to stderr directly (mlflow.utils.logging_utils
                # .eprint), not through a logger that a level could silence. start_run: the
                # logged model joins the run's experiment.
                with waiting("logging the model to MLflow"):  # uploads can take minutes
                    info = Model.log(
                        None, name=MODEL_NAME, flavor=_ImageModelFlavor, flavor_name="pytorch",
                        registered_model_name=name,
                        pytorch_model=model, tensor_example=input_example,
                        tensor_signature=infer_signature(input_example, output),
                        side_dir=str(side),
                        image_example=[example_jpeg_base64(int(input_example.shape[-1]))],
                        signature=image_signature(),
                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                          "torchvision", "pillow"],
                    )
        finally:  # what MLflow said besides its notices, also when it failed
            for line in notices.getvalue().splitlines(keepends=True):
                if not REGISTRATION_NOTICE.search(line):
                    sys.stderr.write(line)
    if not name:
        return None
    version = str(info.registered_model_version)
    for key, value in {**metrics, "run_id": tracker.run_id, "model": cfg.model.name}.items():
        tracker.client.set_model_version_tag(name, version, key, str(value))
    tracker.set_tags({TAG_VERSION: f"{name}/{version}"})
    return f"{name}/{version}"


class _ImageModelFlavor:
    """What ``mlflow.models.Model.log`` saves with (its ``flavor.save_model``): the pyfunc that
    reads images (loader :data:`SERVING_MODULE`, data: the side files) and the pytorch flavor
    (pt2), in one model directory."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, *, pytorch_model: "nn.Module",
                   tensor_example: "np.ndarray", tensor_signature: Any, side_dir: str,
                   image_example: list[str], signature: Any, pip_requirements: list[str],
                   **_: Any) -> None:
        import mlflow.pyfunc
        import mlflow.pytorch
        from mlflow.models import Model

        mlflow.pyfunc.save_model(path, loader_module=SERVING_MODULE, data_path=side_dir,
                                 mlflow_model=mlflow_model, signature=signature,
                                 input_example=image_example, pip_requirements=pip_requirements)
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / "pytorch"
            mlflow.pytorch.save_model(pytorch_model, str(exported), signature=tensor_signature,
                                      input_example=tensor_example,
                                      pip_requirements=pip_requirements)
            flavor = Model.load(str(exported)).flavors["pytorch"]
            shutil.copytree(exported / flavor["model_data"], Path(path) / flavor["model_data"],
                            dirs_exist_ok=True)
        mlflow_model.add_flavor("pytorch", **flavor)
        mlflow_model.save(str(Path(path) / "MLmodel"))


def image_signature() -> Any:
    """The pyfunc's signature: in, image bytes (base64 strings in JSON); out, per image the top-k
    class ``indices``, ``classes`` (names) and ``probabilities``, best first.

    It is marked as checked by the model itself (MLflow's mark for a signature that comes from a
    ``PythonModel``'s type hints): MLflow's column-schema enforcement would otherwise turn a list of
    bytes into a DataFrame column named 0 and refuse uint8 arrays before the model sees them, and
    the scoring server would refuse ``{"inputs": [...]}``. The model validates every image and
    answers a bad one with a 400 that names it (:mod:`ran.serving`).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.binary)]),
        outputs=Schema([ColSpec(Array(DataType.long), "indices"),
                        ColSpec(Array(DataType.string), "classes"),
                        ColSpec(Array(DataType.double), "probabilities")]))
    signature._is_signature_from_type_hint = True
    return signature


def example_jpeg_base64(size: int) -> str:
    """A ``size`` x ``size`` JPEG (a colour gradient), base64: the pyfunc's input example."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                       np.full((size, size), 128.0)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def request_error(message: str) -> Exception:
    """The exception a served model raises for a bad request: MLflow's scoring server answers it
    with HTTP 400 and ``message`` (one line saying what to send instead), and only that.

    MLflow 3.17's scoring server rewrites the message of any ``MlflowException`` from ``predict``
    to ``Failed to predict data '<the whole request>'. \\nError: <message>``
    (``mlflow/pyfunc/scoring_server``): a 400 KB bad request came back as a 400 KB answer. This
    exception keeps the part after ``Error: ``."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    class BadRequest(MlflowException):
        @property
        def message(self) -> str:
            return self._own

        @message.setter
        def message(self, value: str) -> None:
            self._own = value.rsplit("\nError: ", 1)[-1] if hasattr(self, "_own") else value

    return BadRequest(message, error_code=INVALID_PARAMETER_VALUE)


# ---------------------------------------------------------------------------------------------
# The registration gate


@dataclass
class Registration:
    """Whether a final model is registered, and why (one line for people)."""

    register: bool
    reason: str  # "" when there is nothing to say (no registered_model configured)
    version: str | None = None  # "name/version" once registered


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of a state dict that hold a NaN or an infinity
    (in the state dict's order; empty when every one is finite)."""
    import torch

    return [key for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def nonfinite_reason(metrics: dict[str, Any], nonfinite: list[str] | None = None,
                     total: int | None = None) -> str:
    """What is not finite among the recorded validation ``metrics`` (:data:`METRIC_TAGS`, as
    numbers or text) and the weights (``nonfinite``: tensor names, of ``total``), e.g.
    ``eval/loss nan, 445 of 533 weight tensors (first stem.0.weight)``; "" when all is."""
    bad = []
    for key in METRIC_TAGS:
        value = metrics.get(key)
        if value is not None and not math.isfinite(float(value)):
            bad.append(f"{key} {float(value)}")
    if nonfinite:
        of = f" of {total}" if total else ""
        bad.append(f"{len(nonfinite)}{of} weight tensors (first {nonfinite[0]})")
    return ", ".join(bad)


def registration_gate(cfg: "JobConfig", metrics: dict[str, float],
                      nonfinite: list[str] | None = None, total: int | None = None) -> Registration:
    """Whether the final model of ``cfg`` (validation ``metrics``: ``eval/top1``) is registered.

    Never when a recorded metric or a weight is not finite (``nonfinite``: the names of the
    tensors that are not, of ``total``: :func:`nonfinite_tensors`).
    ``tracking.register_min_top1``: at least this top-1. ``tracking.register_if_beats: ALIAS``: a
    strictly higher top-1, measured on the same validation data (by content,
    :mod:`ran.tracking.basis`), than each of: the version holding ``ALIAS`` of
    ``tracking.registered_model`` (while the alias is unassigned, the best version of that model
    recorded on the same data), and the registered version the run was fine-tuned from
    (``model.init_from``), when that parent was validated on the same data. No registered model
    name: not registered, no reason.
    """
    t = cfg.tracking
    name = t.registered_model
    if not name:
        return Registration(False, "")
    bad = nonfinite_reason(metrics, nonfinite, total)
    if bad:
        return Registration(False, f"not registered: not finite: {bad}")
    top1 = metrics.get("eval/top1")
    if top1 is None and (t.register_min_top1 is not None or t.register_if_beats):
        return Registration(False, "not registered: the final epoch reported no eval/top1 to "
                                   "compare with the registration gate")
    if t.register_min_top1 is not None and top1 < t.register_min_top1:
        return Registration(False, f"not registered: eval/top1 {top1:.4f} is below "
                                   f"tracking.register_min_top1 {t.register_min_top1:.4f}")
    if not t.register_if_beats:
        return Registration(True, f"registered as {name}" + (
            f": eval/top1 {top1:.4f} >= tracking.register_min_top1 {t.register_min_top1:.4f}"
            if t.register_min_top1 is not None else ""))
    return _beats_rivals(cfg, name, t.register_if_beats, float(top1))


def _validation_basis(cfg: "JobConfig") -> "Basis":
    from ran.data import read_manifest
    from ran.tracking.basis import Basis
    from ran.tracking.runs import dataset_digest

    digest = dataset_digest(read_manifest(cfg.data.path), cfg.data.val_split)
    return Basis(digest, f"{cfg.data.path} [{cfg.data.val_split}]")


def _parent_version(ref: str | None) -> Any | None:
    """The registered version ``model.init_from`` names, None for a run, a checkpoint or none."""
    match = MODELS_URI.match(ref or "")
    if match is None:
        return None
    try:
        return (alias_holder(match["name"], match["alias"]) if match["alias"]
                else model_version(match["name"], match["version"]))
    except ModelRefError:
        return None


def _beats_rivals(cfg: "JobConfig", name: str, alias: str, top1: float) -> Registration:
    """The ``register_if_beats`` part of :func:`registration_gate`."""
    from ran.tracking.basis import best_on, recorded_top1, run_basis

    basis = _validation_basis(cfg)
    try:
        holder = alias_holder(name, alias)
        versions = model_versions(name)
    except ModelRefError:  # no such registered model yet
        holder, versions = None, []
    rivals: list[tuple[str, float]] = []
    if holder is not None:
        where = f"{name}@{alias} (version {holder.version})"
        recorded = recorded_top1(holder)
        if recorded is None or not run_basis(holder.run_id).same_data(basis):
            return Registration(False, f"not registered: {where} has no eval/top1 recorded on the "
                                       f"same data as {basis.where} to compare with; evaluate "
                                       "both with `ran eval` and register by hand if it is better")
        rivals.append((where, recorded))
    else:
        best = best_on(versions, basis)
        if best is not None:
            rivals.append((f"{name}/{best[0].version}, the best version on the same data "
                           f"({name}@{alias} is unassigned)", best[1]))
    parent = _parent_version(cfg.model.init_from)
    if parent is not None and recorded_top1(parent) is not None \
            and run_basis(parent.run_id).same_data(basis):
        rivals.append((f"the parent {parent.name}/{parent.version}", recorded_top1(parent)))
    for where, recorded in rivals:
        if top1 <= recorded:
            return Registration(False, f"not registered: eval/top1 {top1:.4f} does not beat {where}: "
                                       f"eval/top1 {recorded:.4f} on the same data")
    if not rivals:
        return Registration(True, f"registered as {name}: eval/top1 {top1:.4f}; no version of "
                                  f"{name} was validated on the same data ({name}@{alias} is "
                                  "unassigned)")
    beaten = "; ".join(f"{where}: {recorded:.4f}" for where, recorded in rivals)
    return Registration(True, f"registered as {name}: eval/top1 {top1:.4f} beats {beaten}, on the "
                              "same data")


def record_registration(tracker: RunTracker, registration: Registration) -> None:
    """Tag the run with the gate's reason (``ran.registration``), when there is one."""
    if registration.reason:
        tracker.set_tags({TAG_REGISTRATION: registration.reason})


# ---------------------------------------------------------------------------------------------
# From a reference to a model's files


@dataclass
class ModelSource:
    """Where a model comes from, resolved from a reference."""

    ref: str  # as the user wrote it
    kind: str  # "registry", "run", "checkpoint" or "files" (a logged model's side-file directory)
    name: str | None = None  # registered model name
    version: str | None = None  # registered version
    run_id: str | None = None  # the training run
    model_uri: str | None = None  # what to download: models:/NAME/VERSION or the logged model
    model_id: str | None = None  # MLflow 3 logged-model id (m-...), when known
    path: str | None = None  # checkpoint file, or the side-file directory

    @property
    def label(self) -> str:
        """``name/version``, the checkpoint directory's name, or the run id."""
        if self.name and self.version:
            return f"{self.name}/{self.version}"
        if self.path and self.kind == "files":
            return self.path
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
    uri = store.existing_store()
    mlflow_client = store.client(uri)
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        raise ModelRefError(f"model {ref}: no registered model {name!r} in {store.shown(uri)} (see "
                            "`ran registry`)") from None
    try:
        mv = (mlflow_client.get_model_version_by_alias(name, alias) if alias
              else mlflow_client.get_model_version(name, version))
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        known = ", ".join(sorted((str(v.version) for v in model_versions(name)), key=int)) or "none"
        raise ModelRefError(f"model {ref}: registered model {name!r} in {store.shown(uri)} has no {what} "
                            f"(versions: {known}; see `ran registry {name}`)") from None
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

    uri = store.existing_store()
    mlflow_client = store.client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException:
        raise ModelRefError(f"model {run_id}: no such MLflow run in {store.shown(uri)} and no such checkpoint "
                            "path") from None
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


# ---------------------------------------------------------------------------------------------
# The registry: versions, aliases, the promotion gate's reads and writes


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def model_version(name: str, version: str) -> Any:
    """The ``ModelVersion`` ``name/version``.

    Raises:
        ModelRefError: no such model, or no such version (different messages, each naming the
            tracking URI; the second lists the versions there are).
    """
    from mlflow.exceptions import MlflowException

    try:
        return store.client().get_model_version(name, str(version))
    except MlflowException:
        registered_model(name)  # a name nobody registered says so, not "no version"
        known = ", ".join(sorted((str(v.version) for v in model_versions(name)), key=int)) or "none"
        raise ModelRefError(f"registered model {name!r} in {store.shown(store.tracking_uri())} has "
                            f"no version {version} (versions: {known})") from None


def model_versions(name: str) -> list[Any]:
    """Every version of ``name``, newest first."""
    found = store.client().search_model_versions(f"name = {_quote(name)}")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def registered_model(name: str) -> Any:
    """The ``RegisteredModel`` ``name``.

    Raises:
        ModelRefError: no such model (the message names the tracking URI and lists the models
            there are).
    """
    from mlflow.exceptions import MlflowException

    try:
        return store.client().get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in registered_models()) or "none"
        raise ModelRefError(f"no registered model {name!r} in {store.shown(store.tracking_uri())} "
                            f"(registered: {known})") from None


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


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on the registered version ``name/version``."""
    mlflow_client = store.client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, str(value))


def describe_version(name: str, version: str, *, description: str, top1: float | None,
                     data_digest: str, eval_crop: int) -> None:
    """What the registry page shows of a version registered by ``ran train``: its description,
    and the tags ``top1`` (eval/top1 at registration, 4 decimals), ``data_digest`` (the
    validation split's :func:`ran.tracking.dataset_digest`) and ``eval_crop`` (pixels)."""
    store.client().update_model_version(name, str(version), description=description)
    tag_version(name, version, {"top1": "-" if top1 is None else f"{top1:.4f}",
                                "data_digest": data_digest, "eval_crop": eval_crop})


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

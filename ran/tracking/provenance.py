"""Is a logged model ran's own? The one check every verb that loads a registered or logged model
passes through (``ran eval``, ``ran promote``, ``model.init_from``, ``ran explain``, ``make serve``).

The registry is shared: anyone who can add a version can log a pyfunc whose loading runs code (a
pickled ``python_model``, a ``loader_module`` shipped with ``code_paths``, a pickled PyTorch
model) beside copies of ran's side files, which would pass an evaluation that reads only
``state_dict.pt``. A model is ran's own when its ``MLmodel`` is exactly what
:func:`ran.tracking.models.log_final_model` writes:

- the ``python_function`` flavor's loader is :data:`~ran.tracking.models.SERVING_MODULE`, its data
  ``data/ran``, with no ``python_model``, no ``code``, no models-from-code path;
- no flavor but ``python_function`` and ``pytorch``, the latter exported (pt2), not pickled;
- no ``code/`` folder and no pickle files in the model;
- the side files (``config.yaml``, ``classes.json``, ``state_dict.pt``) present and consistent: a
  valid job config, one class name per output, a classifier of that many outputs.

Anything else is refused with :class:`ProvenanceError`, one line naming the model and why.

``python -m ran.tracking MODEL --to DIR`` (:func:`main`) downloads a model, checks it and prints
the directory to serve (``make serve`` serves what was checked, not what the alias points at later).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ran.tracking.models import SIDE_DIR, SIDE_FILES, SERVING_MODULE, ModelRefError, ModelSource

PYFUNC_KEYS = frozenset({"loader_module", "data", "env", "python_version", "streamable", "code"})
PYTORCH_KEYS = frozenset({"model_data", "pytorch_version", "code"})
FLAVORS = frozenset({"python_function", "pytorch"})
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".cloudpickle")


class ProvenanceError(ModelRefError):
    """A logged model that ran did not write; the message names it and what gives it away."""


def _why_not_ran(local: Path) -> str | None:
    """Why the model directory ``local`` is not ran's own, or None when it is."""
    try:
        meta = yaml.safe_load((local / "MLmodel").read_text())
    except FileNotFoundError:
        return "it has no MLmodel"
    except (OSError, yaml.YAMLError) as err:
        return f"its MLmodel is unreadable ({type(err).__name__})"
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or not isinstance(flavors.get("python_function"), dict):
        return "its MLmodel has no python_function flavor"
    pyfunc = flavors["python_function"]
    if pyfunc.get("python_model") is not None:
        return f"its pyfunc is a pickled python_model ({pyfunc['python_model']})"
    if pyfunc.get("loader_module") != SERVING_MODULE:
        return f"its pyfunc loader is {pyfunc.get('loader_module')!r}, not {SERVING_MODULE}"
    if pyfunc.get("code") is not None or (local / "code").exists():
        return "it ships code_paths (code/)"
    extra = sorted(set(pyfunc) - PYFUNC_KEYS)
    if extra:
        return f"its pyfunc flavor sets {', '.join(extra)}, which ran never writes"
    if pyfunc.get("data") != f"data/{SIDE_DIR}":
        return f"its pyfunc data is {pyfunc.get('data')!r}, not data/{SIDE_DIR}"
    foreign = sorted(set(flavors) - FLAVORS)
    if foreign:
        return f"it has the flavor(s) {', '.join(foreign)}, which ran never writes"
    pytorch = flavors.get("pytorch")
    if not isinstance(pytorch, dict) or set(pytorch) - PYTORCH_KEYS or pytorch.get("code") is not None:
        return "its pytorch flavor is not the exported (pt2) model ran writes"
    pickles = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return f"it holds pickle files ({', '.join(pickles[:3])})"
    return _side_files_problem(local / "data" / SIDE_DIR)


def _side_files_problem(side: Path) -> str | None:
    """Why the side files in ``side`` are missing or disagree with each other, or None."""
    from ran.config import ConfigError, parse_config

    missing = [name for name in SIDE_FILES if not (side / name).is_file()]
    if missing:
        return f"data/{SIDE_DIR}/ lacks {', '.join(missing)}"
    try:
        cfg = parse_config(yaml.safe_load((side / "config.yaml").read_text()), "config.yaml")
        classes = json.loads((side / "classes.json").read_text())
    except (ConfigError, yaml.YAMLError, ValueError, OSError) as err:
        return f"its side files are unreadable ({str(err)[:200]})"
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "its classes.json is not a list of class names"
    if cfg.model.num_classes != len(classes):
        return (f"its config.yaml says {cfg.model.num_classes} classes but classes.json names "
                f"{len(classes)}")
    return _weights_problem(side / "state_dict.pt", len(classes))


def _weights_problem(path: Path, num_classes: int) -> str | None:
    import torch

    try:  # weights_only: tensors and containers, nothing that runs code; mmap: no copy
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad or hostile file
        return f"its state_dict.pt is not plain weights ({type(err).__name__})"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "its state_dict.pt is not a state_dict"
    head = state.get("fc.weight")
    if head is None or head.shape[0] != num_classes:
        outputs = "no fc.weight" if head is None else f"{head.shape[0]} outputs"
        return f"its state_dict.pt has {outputs} for {num_classes} classes"
    return None


def check_ran_model(local: str | Path, label: str) -> Path:
    """Check that the downloaded model directory ``local`` is ran's own (module docstring);
    returns its side-file directory (``data/ran``).

    Raises:
        ProvenanceError: one line, ``model LABEL is not ran's own: WHY; ...``.
    """
    local = Path(local)
    why = _why_not_ran(local)
    if why is not None:
        raise ProvenanceError(f"model {label} is not ran's own: {why}; ran loads, evaluates, promotes "
                              "and serves only models `ran train` logged (refusing it)")
    return local / "data" / SIDE_DIR


def download_checked(source: Any, dst: str | Path | None = None) -> Path:
    """Download the whole model ``source`` (a :class:`ran.tracking.models.ModelSource`) to ``dst``
    (default: MLflow's temporary directory) and check it; returns the model directory.

    Raises:
        ProvenanceError: not ran's own (see :func:`check_ran_model`).
    """
    import mlflow

    from ran.tracking import store

    store.use_uri()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.model_uri,
                                                     dst_path=None if dst is None else str(dst)))
    check_ran_model(local, source.label)
    return local


def main(argv: list[str] | None = None) -> int:
    """``python -m ran.tracking MODEL --to DIR``: download, check, print the directory.
    Exit 2 with one ``error:`` line when the model is not ran's own or cannot be found."""
    parser = argparse.ArgumentParser(prog="python -m ran.tracking",
                                     description="download a registered model and check it is ran's own")
    parser.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--to", required=True, help="directory to download it into")
    args = parser.parse_args(argv)
    from ran.tracking.models import registry_source

    try:
        print(download_checked(registry_source(args.model), args.to))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


@dataclass
class ModelFiles:
    """The side files of a logged model, downloaded to a local directory."""

    config: Path  # config.yaml: the resolved job config
    classes: Path  # classes.json: class index -> name
    state_dict: Path  # state_dict.pt: the weights (torch.load(weights_only=True))


def download_model_files(source: ModelSource) -> ModelFiles:
    """Download a logged model (registered version or logged model), check that it is ran's own
    (:func:`ran.tracking.provenance.check_ran_model`) and return its side files.

    Raises:
        ProvenanceError: (a ModelRefError) a model ``ran train`` did not log, named with why.
    """
    side = download_checked(source) / "data" / SIDE_DIR
    return ModelFiles(side / "config.yaml", side / "classes.json", side / "state_dict.pt")

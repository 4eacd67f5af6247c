"""The one provenance check (ran.tracking.provenance.check_ran_model) on model directories laid out
as ``ran train`` logs them, and on each way a shared registry's version can differ from that."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ran.config import parse_config
from ran.models import create_model
from ran.tracking.provenance import ProvenanceError, check_ran_model

# The MLmodel ran writes (MLflow 3.17, ran.tracking.models.log_final_model), trimmed to flavors.
RAN_MLMODEL = {
    "artifact_path": "model",
    "flavors": {
        "python_function": {"code": None, "data": "data/ran", "env": {"conda": "conda.yaml",
                            "virtualenv": "python_env.yaml"}, "loader_module": "ran.serving",
                            "python_version": "3.11.7", "streamable": False},
        "pytorch": {"code": None, "model_data": "data", "pytorch_version": "2.14.1"},
    },
    "mlflow_version": "3.17.2",
}


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A model directory as ran logs it: MLmodel, data/model.pt2, data/ran/ side files."""
    root = tmp_path_factory.mktemp("honest")
    side = root / "data" / "ran"
    side.mkdir(parents=True)
    cfg = parse_config({"model": {"name": "attention56", "stem": "cifar", "num_classes": 4},
                        "data": {"recipe": "cifar"}})
    (side / "config.yaml").write_text(cfg.to_yaml())
    (side / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    torch.save(create_model("attention56", stem="cifar", num_classes=4).state_dict(), side / "state_dict.pt")
    (root / "data" / "model.pt2").write_bytes(b"exported program")
    (root / "MLmodel").write_text(yaml.safe_dump(RAN_MLMODEL))
    return root


@pytest.fixture
def model(honest, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(honest, copy)
    return copy


def edit_mlmodel(root: Path, edit) -> None:
    meta = yaml.safe_load((root / "MLmodel").read_text())
    edit(meta["flavors"])
    (root / "MLmodel").write_text(yaml.safe_dump(meta))


def test_a_model_as_ran_logs_it_passes(honest):
    assert check_ran_model(honest, "m/1") == honest / "data" / "ran"


def _python_model(root: Path) -> None:
    (root / "python_model.pkl").write_bytes(pickle.dumps({"evil": True}))
    edit_mlmodel(root, lambda f: f["python_function"].update(
        loader_module="mlflow.pyfunc.model", python_model="python_model.pkl", cloudpickle_version="3.1"))


def _python_model_beside_ran_loader(root: Path) -> None:
    edit_mlmodel(root, lambda f: f["python_function"].update(python_model="python_model.pkl"))


def _code_paths(root: Path) -> None:
    (root / "code" / "ran").mkdir(parents=True)
    (root / "code" / "ran" / "serving.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    edit_mlmodel(root, lambda f: f["python_function"].update(code="code"))


def _code_folder_only(root: Path) -> None:
    (root / "code").mkdir()


def _other_loader(root: Path) -> None:
    edit_mlmodel(root, lambda f: f["python_function"].update(loader_module="evil.loader"))


def _models_from_code(root: Path) -> None:
    edit_mlmodel(root, lambda f: f["python_function"].update(model_code_path="model.py"))


def _pickled_pytorch(root: Path) -> None:
    (root / "data" / "model.pth").write_bytes(b"pickle")
    edit_mlmodel(root, lambda f: f["pytorch"].update(pickle_module_name="mlflow.pytorch.pickle_module"))


def _extra_flavor(root: Path) -> None:
    edit_mlmodel(root, lambda f: f.update(sklearn={"pickled_model": "model.pkl"}))


def _missing_state_dict(root: Path) -> None:
    (root / "data" / "ran" / "state_dict.pt").unlink()


def _classes_disagree(root: Path) -> None:
    (root / "data" / "ran" / "classes.json").write_text(json.dumps(["a", "b"]))


def _weights_disagree(root: Path) -> None:
    torch.save(create_model("attention56", stem="cifar", num_classes=10).state_dict(),
               root / "data" / "ran" / "state_dict.pt")


def _pickled_weights(root: Path) -> None:
    torch.save({"fc.weight": torch.zeros(4, 2), "extra": object()}, root / "data" / "ran" / "state_dict.pt")


def _no_mlmodel(root: Path) -> None:
    (root / "MLmodel").unlink()


@pytest.mark.parametrize("attack, why", [
    (_python_model, "its pyfunc is a pickled python_model (python_model.pkl)"),
    (_python_model_beside_ran_loader, "its pyfunc is a pickled python_model"),
    (_code_paths, "it ships code_paths (code/)"),
    (_code_folder_only, "it ships code_paths (code/)"),
    (_other_loader, "its pyfunc loader is 'evil.loader', not ran.serving"),
    (_models_from_code, "its pyfunc flavor sets model_code_path, which ran never writes"),
    (_pickled_pytorch, "its pytorch flavor is not the exported (pt2) model ran writes"),
    (_extra_flavor, "it has the flavor(s) sklearn, which ran never writes"),
    (_missing_state_dict, "data/ran/ lacks state_dict.pt"),
    (_classes_disagree, "its config.yaml says 4 classes but classes.json names 2"),
    (_weights_disagree, "its state_dict.pt has 10 outputs for 4 classes"),
    (_pickled_weights, "its state_dict.pt is not plain weights"),
    (_no_mlmodel, "it has no MLmodel"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_anything_else_is_refused_in_one_line_naming_the_version_and_why(model, attack, why):
    attack(model)
    with pytest.raises(ProvenanceError) as err:
        check_ran_model(model, "ran-demo/7")
    message = str(err.value)
    assert message.startswith(f"model ran-demo/7 is not ran's own: {why}"), message
    assert "\n" not in message
    assert isinstance(err.value, ValueError)  # the CLI's one-line error path

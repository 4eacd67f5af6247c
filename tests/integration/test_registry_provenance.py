"""A shared registry serves only ran's own models (DESIGN.md, "Trust boundaries"; issue 22 kind 2).

In one sqlite store: version 1 of ``shared-model`` is ran's own (logged by
``ran.tracking.log_final_model``, as ``ran train`` logs it). Then the attack: version 2 is a pyfunc
with a pickled ``python_model`` whose unpickling runs ``touch MARKER``, logged beside copies of
version 1's side files and tagged with a better top-1, and someone points ``champion`` at it;
version 3 declares ran's own loader ``ran.serving`` but ships ``code_paths`` with a ``ran/serving.py``
that would shadow ours (it also touches MARKER on import). ``ran eval``, ``ran promote``,
``model.init_from``, ``ran explain`` and ``make serve`` refuse both in one line naming the version
and why, and MARKER never exists; ``make serve`` still serves version 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import BIN, free_port, local_server
from ran.cli import main

pytestmark = pytest.mark.integration

MODEL = "shared-model"
REPO = Path(__file__).resolve().parents[2]


class _RunsOnLoad:
    """A pyfunc python_model whose unpickling runs a shell command (what cloudpickle stores)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


def _python_model(marker: Path) -> Any:
    import mlflow.pyfunc

    class Hostile(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

        def __reduce__(self):
            return _RunsOnLoad(f"touch {marker}").__reduce__()

    return Hostile()


@pytest.fixture(scope="module")
def registry(synth_data, tiny_job, tmp_path_factory):
    """The store with versions 1 (ran's own), 2 (pickled python_model, @champion) and 3 (ran's
    loader with code_paths)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from ran.data.read import read_manifest
    from ran.data.transforms import normalizer
    from ran.runtime import build_model
    from ran.tracking import RunTracker, log_final_model

    root = tmp_path_factory.mktemp("provenance")
    uri = f"sqlite:///{root}/mlflow.db"
    marker = root / "MARKER"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        cfg = tiny_job(synth_data, root / "runs", **{"tracking.experiment": "provenance",
                                                     "tracking.registered_model": MODEL})
        manifest = read_manifest(synth_data)
        cfg = cfg.resolve(data_path=synth_data, num_classes=manifest["num_classes"],
                          storage_path=str(root / "runs"))
        torch.manual_seed(0)
        images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
        example = normalizer(cfg.data.recipe)(images).numpy().astype(np.float32)
        tracker = RunTracker.create_training(cfg, run_name="honest", tags={"ran.model": cfg.model.name})
        assert log_final_model(tracker, build_model(cfg).eval(), cfg, manifest["classes"], example,
                               {"eval/top1": 0.3}) == f"{MODEL}/1"
        tracker.finish()

        # The attacker copies version 1's side files next to their own code.
        honest = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1"))
        side = root / "attacker" / "ran"
        shutil.copytree(honest / "data" / "ran", side)
        client = MlflowClient(uri)
        with mlflow.start_run(run_name="hostile-pickle"):
            mlflow.pyfunc.log_model(name="model", python_model=_python_model(marker),
                                    artifacts={"ran": str(side)}, registered_model_name=MODEL)
        client.set_model_version_tag(MODEL, "2", "eval/top1", "0.99")
        client.set_registered_model_alias(MODEL, "champion", "2")

        shadow = root / "attacker" / "code" / "ran"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("")
        (shadow / "serving.py").write_text(f"import os\nos.system('touch {marker}')\n")
        with mlflow.start_run(run_name="hostile-code"):
            mlflow.pyfunc.log_model(name="model", loader_module="ran.serving", data_path=str(side),
                                    code_paths=[str(shadow)], registered_model_name=MODEL)
    # MLflow loads a pyfunc to infer its pip requirements while logging it: the payload ran then,
    # so it is live. From here on, nothing may run it again.
    assert marker.exists()
    marker.unlink()
    return {"uri": uri, "root": root, "marker": marker, "data": synth_data}


@pytest.fixture
def store(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(registry["root"])
    return registry


PICKLED = f"model {MODEL}/2 is not ran's own: its pyfunc is a pickled python_model (python_model.pkl)"
CODE_PATHS = f"model {MODEL}/3 is not ran's own: it ships code_paths (code/)"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_eval_refuses_a_pickled_python_model_aliased_champion(store, capsys):
    assert main(["eval", f"models:/{MODEL}@champion", "--data", store["data"], "--workers", "0"]) == 2
    assert PICKLED in _one_error_line(capsys)
    assert main(["eval", f"models:/{MODEL}/3", "--data", store["data"], "--workers", "0"]) == 2
    assert CODE_PATHS in _one_error_line(capsys)
    assert not store["marker"].exists()


def test_ran_own_version_still_evaluates(store, capsys):
    assert main(["eval", f"models:/{MODEL}/1", "--data", store["data"], "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_promote_refuses_it_and_leaves_the_alias(store, capsys):
    from mlflow.tracking import MlflowClient

    assert main(["promote", MODEL, "--version", "2", "--alias", "production"]) == 2
    assert PICKLED in _one_error_line(capsys)
    assert main(["promote", MODEL, "--version", "3", "--alias", "production", "--eval-data",
                 store["data"]]) == 2
    assert CODE_PATHS in _one_error_line(capsys)
    assert "production" not in MlflowClient(store["uri"]).get_registered_model(MODEL).aliases
    assert not store["marker"].exists()


def test_init_from_and_explain_refuse_it(store, tmp_path, capsys):
    from PIL import Image

    from ran.runtime import read_model
    from ran.tracking import ProvenanceError

    with pytest.raises(ProvenanceError, match=CODE_PATHS.replace("(", r"\(").replace(")", r"\)")):
        read_model(f"models:/{MODEL}/3")  # what model.init_from reads
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    assert main(["explain", f"models:/{MODEL}@champion", str(image), "--out", str(tmp_path / "o")]) == 2
    assert PICKLED in _one_error_line(capsys)
    assert not store["marker"].exists()


def _make_serve(model: str, port: int) -> list[str]:
    venv = BIN.parent
    return ["make", "-C", str(REPO), "-o", f"{venv}/.installed", "serve", f"VENV={venv}",
            f"MODEL={model}", f"PORT={port}"]


def test_make_serve_refuses_it_and_runs_nothing(store):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for version, why in (("@champion", PICKLED), ("/3", CODE_PATHS)):
        result = subprocess.run(_make_serve(f"models:/{MODEL}{version}", free_port()), env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if not line.startswith("make")]
        assert lines == [f"error: {why}; ran loads, evaluates, promotes and serves only models "
                         "`ran train` logged (refusing it)"], result.stderr
    assert not store["marker"].exists()


def test_make_serve_serves_the_checked_copy_of_ran_own_version(store):
    port = free_port()
    tmp = store["root"] / "make-serve-tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    with local_server(_make_serve(f"models:/{MODEL}/1", port), port=port, ready="/ping",
                      log=store["root"] / "make-serve.log", env=env):
        from PIL import Image
        import base64
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 10, 10)).save(buffer, format="PNG")
        body = json.dumps({"inputs": [base64.b64encode(buffer.getvalue()).decode()]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert len(list(tmp.iterdir())) == 1  # the checked copy it serves
    assert len(answer["predictions"][0]["indices"]) == 4
    assert list(tmp.iterdir()) == []  # removed when the server stopped
    assert not store["marker"].exists()

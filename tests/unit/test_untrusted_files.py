"""Files do not command (DESIGN.md, "Trust boundaries"; issue 22 kind 5): a checkpoint's embedded
config names a data URL on 127.0.0.1 and another user's MLflow run; `ran eval` and `ran explain`
of it fetch nothing from that URL and `--log-mlflow` writes nothing into that run."""

from __future__ import annotations

import http.server
import re
import threading

import pytest
import torch
from PIL import Image

from ran.cli import main
from ran.config import parse_config
from ran.models import create_model


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Recorder.requests = []
    yield f"http://127.0.0.1:{httpd.server_port}/data"
    httpd.shutdown()


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def hostile_checkpoint(path, data_url: str, run_id: str) -> None:
    cfg = parse_config({"model": {"name": "attention56", "stem": "cifar", "num_classes": 4},
                        "data": {"recipe": "cifar", "crop": 16, "path": data_url},
                        "train": {"precision": "fp32"}})
    torch.manual_seed(0)
    model = create_model("attention56", stem="cifar", num_classes=4)
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(), "run_id": run_id}, path)


def test_a_checkpoint_neither_fetches_its_data_url_nor_logs_into_its_run(tmp_path, url, store, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    victim = client.create_run(client.create_experiment("someone-else")).info.run_id
    checkpoint = tmp_path / "checkpoint.pt"
    hostile_checkpoint(checkpoint, url, victim)
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(image)

    from ran.runtime import ModelBundle

    loaded = ModelBundle.load(str(checkpoint))
    assert loaded.class_names is None  # not read from the URL the checkpoint names
    assert main(["explain", str(checkpoint), str(image), "--out", str(tmp_path / "o"), "--log-mlflow"]) == 0
    logged = re.search(r"logged attention_x.png to MLflow run ([0-9a-f]{32})", capsys.readouterr().out)
    run_id = logged.group(1)
    assert run_id != victim
    assert client.list_artifacts(victim) == []  # nothing written into the run it named
    run = client.get_run(run_id)
    assert run.data.tags["ran.kind"] == "explain"
    assert [a.path for a in client.list_artifacts(run_id, "attention")] == ["attention/attention_x.png"]
    assert _Recorder.requests == []  # nothing fetched from the URL it named

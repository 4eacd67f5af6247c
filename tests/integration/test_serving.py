"""A registered model used as users use it: ``mlflow.pyfunc`` on image bytes and uint8 arrays,
``mlflow models serve`` answering HTTP on 127.0.0.1, ``mlflow.pytorch``, and ``ran explain``
logging into the model's run.

One tiny model is trained once for the module (real Ray Train run, MLflow on sqlite) and
registered as ``tiny-serve`` version 1, alias ``champion``; one ``mlflow models serve`` of
``models:/tiny-serve@champion`` answers the HTTP tests.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BIN, free_port, local_server

pytestmark = pytest.mark.integration

MODEL = "tiny-serve"
BATCH = 16  # the tiny job's data.batch_size: ran eval's batches


@pytest.fixture(scope="module")
def registered(train_registered):
    """``tiny-serve`` version 1 (2 epochs of the tiny job), alias champion, in a sqlite store."""
    from mlflow.tracking import MlflowClient

    store = train_registered("serve", MODEL)
    MlflowClient(store["uri"]).set_registered_model_alias(MODEL, "champion", "1")
    return store


@pytest.fixture
def store(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.chdir(registered["root"])
    return registered


def _val_samples(data: str) -> list[tuple[bytes, int]]:
    """Every (encoded image, label) of the val split, in shard order (ran eval's order)."""
    from ran.data.read import iter_tar, open_shard, parse_sample, read_manifest, split_shards

    manifest = read_manifest(data)
    samples = []
    for url, _ in split_shards(data, manifest, "val"):
        with open_shard(url) as stream:
            samples += [parse_sample(s, manifest["num_classes"]) for _, s in iter_tar(stream)]
    return samples


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _predict_in_batches(pyfunc: Any, items: list[Any]) -> Any:
    import pandas as pd

    return pd.concat([pyfunc.predict(items[i:i + BATCH]) for i in range(0, len(items), BATCH)],
                     ignore_index=True)


def test_pyfunc_on_image_bytes_and_arrays_gives_ran_evals_top1(store):
    import mlflow
    import mlflow.pyfunc

    from ran.runtime import ModelBundle

    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    samples = _val_samples(store["data"])
    encoded, labels = [s[0] for s in samples], np.array([s[1] for s in samples])
    assert Image.open(io.BytesIO(encoded[0])).format == "PNG" and len(encoded) == 128

    from_bytes = _predict_in_batches(pyfunc, encoded)
    top1 = np.array([row[0] for row in from_bytes["indices"]])
    evaluated = ModelBundle.load(f"models:/{MODEL}/1").evaluate(store["data"], "val",
                                                                batch_size=BATCH, workers=0)
    assert float((top1 == labels).mean()) == evaluated["top1"]  # the same 128 verdicts' count
    assert evaluated["top1"] > 0.25  # it learned (chance: 0.25), so the comparison means something

    arrays = np.stack([_pixels(data) for data in encoded])  # uint8 (128, 16, 16, 3)
    from_arrays = _predict_in_batches(pyfunc, list(arrays))
    assert from_arrays["indices"].tolist() == from_bytes["indices"].tolist()
    assert from_arrays["probabilities"].tolist() == from_bytes["probabilities"].tolist()
    one_batch = pyfunc.predict(arrays[:BATCH])  # an (N, H, W, 3) array at once
    assert one_batch["indices"].tolist() == from_bytes["indices"][:BATCH].tolist()

    classes = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"models:/{MODEL}/1/data/ran/classes.json")).read_text())
    assert from_bytes["classes"][0] == [classes[i] for i in from_bytes["indices"][0]]
    assert all(len(row) == 4 for row in from_bytes["indices"])  # top-k with k = min(5, 4 classes)


def test_pyfunc_on_jpeg_bytes_matches_the_runtime_model_on_the_same_pixels(store):
    import mlflow.pyfunc

    from ran.data.transforms import make_transform, normalizer
    from ran.runtime import ModelBundle, autocast, eval_crop, resolve_precision

    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    jpegs = [_jpeg(_pixels(data)) for data, _ in _val_samples(store["data"])[:BATCH]]
    answer = pyfunc.predict(jpegs)

    loaded = ModelBundle.load(f"models:/{MODEL}/1", device=torch.device("cpu"))
    cfg, cpu = loaded.config, torch.device("cpu")
    transform = make_transform(cfg.data.recipe, train=False, crop=eval_crop(cfg))
    import random

    images = torch.stack([transform.sample(j, random.Random(0)) for j in jpegs])
    x = normalizer(cfg.data.recipe)(images).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(resolve_precision(cfg.train.precision, cpu), cpu):
        expected = loaded.model.to(memory_format=torch.channels_last)(x).float().argmax(1)
    assert [row[0] for row in answer["indices"]] == expected.tolist()


def test_the_logged_model_has_a_signature_an_example_its_classes_and_config(store):
    import mlflow
    import mlflow.pytorch
    import yaml
    from mlflow.models import Model

    from ran.runtime import ModelBundle

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1"))
    meta = Model.load(str(local))
    assert meta.flavors["python_function"]["loader_module"] == "ran.serving"
    assert set(meta.flavors) == {"python_function", "pytorch"}
    assert meta.signature.inputs.to_dict() == [{"type": "binary", "required": True}]
    assert [c["name"] for c in meta.signature.outputs.to_dict()] == ["indices", "classes",
                                                                      "probabilities"]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert Image.open(io.BytesIO(base64.b64decode(example["inputs"][0]))).size == (16, 16)
    config = yaml.safe_load((local / "data" / "ran" / "config.yaml").read_text())
    assert config["model"]["num_classes"] == 4 and config["data"]["crop"] == 16

    module = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")  # still a plain nn.Module
    assert isinstance(module, torch.nn.Module)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = ModelBundle.load(f"models:/{MODEL}/1", device=torch.device("cpu")).model
        assert torch.allclose(module(x), ours(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# mlflow models serve


@pytest.fixture(scope="module")
def server(registered):
    """``mlflow models serve -m models:/tiny-serve@champion --env-manager local`` on 127.0.0.1.

    The scoring server runs ``uvicorn`` by name, so the venv's bin directory must be on PATH (as
    ``make serve`` puts it)."""
    port = free_port()
    argv = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registered["uri"])
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        with local_server(argv, port=port, ready="/ping", log=registered["root"] / "serve.log",
                          cwd=registered["root"]) as url:
            yield url


def _post(url: str, body: Any, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text.decode(errors="replace")}


def test_the_server_answers_a_posted_jpeg_with_its_top5(server, store):
    import mlflow.pyfunc

    from ran.runtime import ModelBundle

    samples = _val_samples(store["data"])
    classes = ModelBundle.load(f"models:/{MODEL}/1").class_names
    jpegs = [_jpeg(_pixels(data)) for data, _ in samples[:8]]
    expected = mlflow.pyfunc.load_model(f"models:/{MODEL}/1").predict(jpegs)

    status, answer = _post(server, {"inputs": [base64.b64encode(jpegs[0]).decode()]})
    assert status == 200
    [prediction] = answer["predictions"]
    assert prediction["classes"][0] == classes[expected["indices"][0][0]]
    assert prediction["indices"] == expected["indices"][0]
    assert prediction["probabilities"] == sorted(prediction["probabilities"], reverse=True)
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)

    status, answer = _post(server, {"inputs": {"image": [base64.b64encode(j).decode() for j in jpegs]}})
    assert status == 200
    assert [p["indices"] for p in answer["predictions"]] == expected["indices"].tolist()


def test_malformed_requests_get_a_400_that_says_what_is_wrong_and_the_server_keeps_serving(server, store):
    not_an_image = base64.b64encode(b"hello, world").decode()
    status, answer = _post(server, {"inputs": [not_an_image]})
    assert status == 400
    # The answer is the one line, not MLflow's "Failed to predict data '<the request>'" around it.
    assert answer["message"].startswith("image 0: 12 bytes in no image format Pillow reads; "
                                        "send JPEG or PNG"), answer["message"]
    assert not_an_image not in answer["message"] and "\n" not in answer["message"]
    big = base64.b64encode(bytes(300_000)).decode()  # 400 KB of base64 that is no image
    status, answer = _post(server, {"inputs": [big]})
    assert status == 400 and answer["message"].startswith("image 0: 300000 bytes in no image format")
    assert len(answer["message"]) < 500

    status, answer = _post(server, {"inputs": [[[1, 2], [3, 4]]]})  # pixels of the wrong shape
    assert status == 400
    assert answer["message"].startswith("image 0: an array of shape (2, 2); send (H, W, 3) uint8 RGB "
                                        "pixels"), answer["message"]

    status, answer = _post(server, {"inputs": [np.full((4, 4, 3), 300).tolist()]})
    assert status == 400 and answer["message"] == "image 0: int64 pixels; send uint8 values 0..255"

    status, answer = _post(server, {"dataframe_split": {"columns": ["image"], "data": [["x"]]}})
    assert status == 400 and "'inputs' key" in answer["message"]

    status, answer = _post(server, b"not json at all")
    assert 400 <= status < 500

    jpeg = _jpeg(_pixels(_val_samples(store["data"])[0][0]))
    status, answer = _post(server, {"inputs": [base64.b64encode(jpeg).decode()]})
    assert status == 200 and len(answer["predictions"]) == 1  # still serving


def test_an_image_over_the_pixel_cap_gets_rans_one_line_400_from_its_header(server, store):
    from untrusted import png_bomb

    status, answer = _post(server, {"inputs": [base64.b64encode(png_bomb()).decode()]})
    assert status == 400
    assert answer["message"] == ("image 0: too large: 13000x13000 pixels (169.0 Mpx), above "
                                 "data.max_pixels=50000000; send an image of at most 50000000 pixels")
    # Over Pillow's own limit (179 Mpx), which raised through MLflow as a stack trace before.
    status, answer = _post(server, {"inputs": [base64.b64encode(png_bomb(14_000, 14_000)).decode()]})
    assert status == 400
    assert answer["message"].startswith("image 0: too large: 196.0 Mpx, above data.max_pixels=")
    assert "Traceback" not in answer["message"] and "\n" not in answer["message"]


# ---------------------------------------------------------------------------------------------
# ran explain into the model's run


def test_explain_logs_its_grid_into_a_new_run_or_the_run_named(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ran.cli import main
    from ran.runtime import ModelBundle

    data, label = _val_samples(store["data"])[0]
    folder = tmp_path / ModelBundle.load(f"models:/{MODEL}/1").class_names[label]
    folder.mkdir()
    (folder / "first.png").write_bytes(data)
    out = tmp_path / "pictures"
    client = MlflowClient(store["uri"])
    training_run = store["outcome"].run_id

    assert main(["explain", f"models:/{MODEL}@champion", str(folder / "first.png"), "--out",
                 str(out), "--log-mlflow"]) == 0
    run_id = re.search(r"logged attention_first.png to MLflow run ([0-9a-f]{32}) \(attention/\)",
                       capsys.readouterr().out).group(1)
    assert run_id != training_run  # the model does not choose the run it is written into
    run = client.get_run(run_id)
    assert run.data.tags["ran.kind"] == "explain"
    assert client.get_experiment(run.info.experiment_id).name.endswith("-explanations")
    assert [a.path for a in client.list_artifacts(run_id, "attention")] == ["attention/attention_first.png"]
    assert client.list_artifacts(training_run, "attention") == []

    assert main(["explain", f"models:/{MODEL}@champion", str(folder / "first.png"), "--out",
                 str(out), "--mlflow-run", training_run]) == 0  # a run the user names
    assert f"to MLflow run {training_run}" in capsys.readouterr().out
    assert [a.path for a in client.list_artifacts(training_run, "attention")] == [
        "attention/attention_first.png"]
    assert Image.open(out / "attention_first.png").size[0] > 0

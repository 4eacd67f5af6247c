"""`ran eval`, `ran promote` and `ran registry` on a real MLflow registry (sqlite, then a server).

One short real training run registers version 1 of ``tiny-ran`` (it learns); version 2 is an
untrained model of the same config, logged and registered through the same
``ran.tracking.log_final_model`` with its own measured validation metrics, so it is the worse one.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from ran.cli import main

pytestmark = pytest.mark.integration

MODEL = "tiny-ran"


def _register_untrained(cfg: Any, classes: list[str]) -> Any:
    """Version 2: same config, initial weights, metrics measured as training would record them."""
    from ran.data.transforms import normalizer
    from ran.runtime import ModelBundle, build_model
    from ran.tracking import RunTracker, log_final_model

    torch.manual_seed(1)
    model = build_model(cfg).eval()
    m = ModelBundle.build(model, cfg, classes, device=torch.device("cpu")).evaluate(cfg.data.path, "val")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    example = normalizer(cfg.data.recipe)(images).numpy().astype(np.float32)
    from ran.data.read import read_manifest

    tracker = RunTracker.create_training(cfg, run_name="untrained", tags={"ran.model": cfg.model.name},
                                         manifest=read_manifest(cfg.data.path))  # as training does
    version = log_final_model(tracker, model, cfg, classes, example, {
        "eval/top1": m["top1"], "eval/top5": m["top5"], "eval/loss": m["loss"]})
    tracker.finish()
    return version


@pytest.fixture(scope="module")
def registry(train_registered, synth_data: str):
    """The sqlite store holding versions 1 (trained) and 2 (untrained) of ``tiny-ran``."""
    from ran.data.read import read_manifest

    store = train_registered("ops", MODEL)
    trained = store["outcome"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store["uri"])
        mp.chdir(store["root"])
        untrained = _register_untrained(trained.config, read_manifest(synth_data)["classes"])
        assert untrained == f"{MODEL}/2"
    yield {"uri": store["uri"], "root": store["root"], "trained": trained, "data": synth_data}


@pytest.fixture
def store(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    monkeypatch.chdir(registry["root"])
    return registry


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _printed(text: str, label: str) -> float:
    return float(re.search(rf"^{label}\s+([0-9.]+)", text, re.M).group(1))


def test_eval_of_the_registered_model_reproduces_the_final_validation(store, capsys, monkeypatch):
    from ran.runtime import ModelBundle

    trained = store["trained"]
    monkeypatch.setenv("RAN_PROGRESS_EVERY_S", "0")  # a line per batch: a long evaluation, in short
    assert main(["eval", f"models:/{MODEL}/1", "--data", store["data"], "--workers", "1"]) == 0
    printed = capsys.readouterr()
    out = printed.out
    # Into a pipe (capsys is not a terminal): progress lines on stderr, the result on stdout.
    assert re.search(r"^evaluating val: \d+/128 img \(\d+%\), [0-9.]+ img/s, ETA \d:\d\d:\d\d$",
                     printed.err, re.M), printed.err
    assert "evaluating" not in out
    assert _printed(out, "top-1") == pytest.approx(trained.metrics["eval/top1"], abs=5e-5)
    assert _printed(out, "top-5") == pytest.approx(trained.metrics["eval/top5"], abs=5e-5)
    assert _printed(out, "img/s") > 0

    for ref in (f"models:/{MODEL}/1", trained.run_id, trained.checkpoint):
        m = ModelBundle.load(ref).evaluate(store["data"], workers=0)
        assert m["top1"] == trained.metrics["eval/top1"], ref  # the same counts, exactly
        assert m["images"] == 128
        assert m["loss"] == pytest.approx(trained.metrics["eval/loss"], rel=2e-2)  # bf16 autocast

    run_id = re.search(r"MLflow run ([0-9a-f]{32}) \(experiment 'ops-evaluations'\)", out).group(1)
    client = _client(store["uri"])
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "ops-evaluations"
    tags = client.get_model_version(MODEL, "1").tags
    assert float(tags["eval.val.top1"]) == pytest.approx(trained.metrics["eval/top1"], abs=1e-6)
    assert (tags["eval.val.data"], tags["eval.val.run_id"]) == (store["data"], run_id)
    assert run.data.tags["ran.kind"] == "evaluation"
    assert run.data.tags["ran.registered_model"] == MODEL
    assert run.data.tags["ran.model_version"] == "1"
    assert run.data.tags["ran.source_run_id"] == trained.run_id
    assert run.data.metrics["eval/top1"] == trained.metrics["eval/top1"]
    assert run.inputs.model_inputs  # the logged model is the run's input


def test_the_worse_version_cannot_take_champion_and_the_better_can(store, capsys):
    import mlflow
    import mlflow.pytorch

    from ran.runtime import ModelBundle

    client = _client(store["uri"])
    tags = {v: client.get_model_version(MODEL, v).tags for v in ("1", "2")}
    assert float(tags["1"]["eval/top1"]) > float(tags["2"]["eval/top1"])  # 1 is the better

    assert main(["promote", MODEL, "--version", "2", "--alias", "champion"]) == 0
    assert "'champion' was unassigned" in capsys.readouterr().out
    assert main(["promote", MODEL, "--version", "1", "--reason", "trained beats untrained"]) == 0
    assert "beats 'champion' version 2" in capsys.readouterr().out
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"

    assert main(["promote", MODEL, "--version", "2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("refused: version 2 (top-1 ")
    assert "does not beat 'champion' version 1" in out and "'champion' unchanged" in out
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"
    assert main(["promote", MODEL, "--version", "2", "--eval-data", store["data"]]) == 1
    assert "(evaluated)" in capsys.readouterr().out
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"

    promoted = client.get_model_version(MODEL, "1").tags
    assert promoted["promotion.champion.reason"] == "trained beats untrained"
    assert promoted["promotion.champion.by"]
    assert promoted["promotion.champion.at"].startswith("20")
    assert promoted["promotion.champion.previous_version"] == "2"
    assert float(promoted["promotion.champion.top1"]) == pytest.approx(float(tags["1"]["eval/top1"]))
    assert client.get_model_version(MODEL, "2").tags["promotion.champion.replaced_by"] == "1"

    mlflow.set_tracking_uri(store["uri"])
    champion = mlflow.pytorch.load_model(f"models:/{MODEL}@champion")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = ModelBundle.load(f"models:/{MODEL}/1", device=torch.device("cpu")).model(x)
        other = ModelBundle.load(f"models:/{MODEL}/2", device=torch.device("cpu")).model(x)
        got = champion(x)
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, other, atol=1e-2)


def test_min_top1_and_unknown_versions_are_refused_clearly(store, capsys):
    assert main(["promote", MODEL, "--version", "1", "--alias", "gate", "--min-top1", "0.999"]) == 1
    assert "below --min-top1 0.9990" in capsys.readouterr().out
    assert main(["promote", MODEL, "--version", "9", "--alias", "gate"]) == 2
    assert capsys.readouterr().err == (f"error: registered model '{MODEL}' in {store['uri']} has no "
                                       "version 9 (versions: 1, 2)\n")
    # A model nobody registered is not "a model without that version".
    assert main(["promote", "nope", "--version", "1", "--alias", "gate"]) == 2
    assert capsys.readouterr().err == (f"error: no registered model 'nope' in {store['uri']} "
                                       f"(registered: {MODEL})\n")
    assert main(["promote", MODEL, "--version", "1", "--min-top1", "75"]) == 2
    assert "as a fraction" in capsys.readouterr().err
    assert "gate" not in _client(store["uri"]).get_registered_model(MODEL).aliases


def test_registry_lists_versions_aliases_and_metrics(store, capsys):
    client = _client(store["uri"])
    client.set_registered_model_alias(MODEL, "listed", "2")
    assert main(["registry"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["model", "version", "aliases", "eval/top1", "eval/top5", "eval/loss"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(rows) == {"1", "2"}
    assert "listed" in rows["2"][2].split(",")
    assert float(rows["2"][3]) == pytest.approx(float(client.get_model_version(MODEL, "2").tags["eval/top1"]), abs=1e-4)
    run_id = client.get_model_version(MODEL, "2").run_id
    assert rows["2"][7] == run_id  # the whole id: what `ran eval RUN_ID` takes
    assert main(["registry", "nope"]) == 2
    assert capsys.readouterr().err == (f"error: no registered model 'nope' in {store['uri']} "
                                       f"(registered: {MODEL})\n")


@pytest.fixture
def server(store, serve_mlflow, monkeypatch):
    """``mlflow server`` on 127.0.0.1 over the same store; stopped after the test."""
    url = serve_mlflow(store["uri"], store["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    return url


def test_promotion_through_an_mlflow_server(server, store, capsys):
    import mlflow
    import mlflow.pytorch

    from ran.runtime import ModelBundle

    assert main(["promote", MODEL, "--version", "2", "--alias", "staging"]) == 0
    assert main(["promote", MODEL, "--version", "1", "--alias", "staging", "--reason", "better"]) == 0
    assert main(["promote", MODEL, "--version", "2", "--alias", "staging"]) == 1
    assert "refused: version 2" in capsys.readouterr().out

    client = _client(server)
    assert str(client.get_model_version_by_alias(MODEL, "staging").version) == "1"
    assert client.get_model_version(MODEL, "1").tags["promotion.staging.reason"] == "better"
    assert main(["registry", MODEL]) == 0
    assert "staging" in capsys.readouterr().out

    mlflow.set_tracking_uri(server)
    x = torch.randn(2, 3, 16, 16)
    staging = mlflow.pytorch.load_model(f"models:/{MODEL}@staging")
    with torch.no_grad():
        ours = ModelBundle.load(f"models:/{MODEL}/1", device=torch.device("cpu")).model
        assert torch.allclose(staging(x), ours(x), atol=1e-4)


def test_explain_a_registered_model_and_log_the_pictures(store, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "shape.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "pictures"
    assert main(["explain", f"models:/{MODEL}/1", str(image), "--out", str(out), "--log-mlflow"]) == 0
    assert Image.open(out / "attention_shape.png").size == (960, 280)  # input + 3 modules, 1 row

    run_id = re.search(r"MLflow run ([0-9a-f]{32})", capsys.readouterr().out).group(1)
    assert run_id != store["trained"].run_id  # a new run, not the training run of version 1
    client = _client(store["uri"])
    assert client.get_run(run_id).data.tags["ran.kind"] == "explain"
    assert [a.path for a in client.list_artifacts(run_id, "attention")] == ["attention/attention_shape.png"]


def test_no_such_model_and_no_such_version_are_different_and_name_the_store(store, capsys):
    uri = store["uri"]
    assert main(["eval", "models:/nope/1", "--data", store["data"]]) == 2
    assert capsys.readouterr().err == (f"error: model models:/nope/1: no registered model 'nope' "
                                       f"in {uri} (see `ran registry`)\n")
    assert main(["eval", f"models:/{MODEL}/7", "--data", store["data"]]) == 2
    assert capsys.readouterr().err == (
        f"error: model models:/{MODEL}/7: registered model '{MODEL}' in {uri} has no version 7 "
        f"(versions: 1, 2; see `ran registry {MODEL}`)\n")
    assert main(["eval", f"models:/{MODEL}@gold", "--data", store["data"]]) == 2
    assert f"has no alias 'gold' (versions: 1, 2;" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["registry"], ["registry", MODEL],
                                  ["eval", f"models:/{MODEL}/1", "--data", "x"],
                                  ["promote", MODEL, "--version", "1"]])
def test_read_only_verbs_never_create_a_store(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        f"error: no MLflow store at sqlite:///{tmp_path}/mlflow.db (MLFLOW_TRACKING_URI is unset")
    assert list(tmp_path.iterdir()) == []


def test_explain_names_a_missing_image_before_touching_any_model_or_store(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "models:/does-not-exist/1", "missing.png", "--out", "o"]) == 2
    assert capsys.readouterr().err == "error: image missing.png: no such file\n"
    assert list(tmp_path.iterdir()) == []

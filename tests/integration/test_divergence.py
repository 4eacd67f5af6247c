"""A diverged run (optim.lr=1e8) stops with one line, is FAILED and tagged, registers nothing; and
`ran promote` refuses a version whose weights or recorded metrics are not finite."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ran.cli import main

pytestmark = pytest.mark.integration


def test_a_diverged_run_stops_failed_and_registers_nothing(ray_local, synth_data, tiny_job,
                                                           mlflow_sqlite, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ran.runtime import load_checkpoint
    from ran.tracking import nonfinite_tensors

    job = tmp_path / "tiny.yaml"
    job.write_text(tiny_job(synth_data, tmp_path / "runs", **{
        "tracking.registered_model": "tiny-diverged", "tracking.log_model": True,
        "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 50}).to_yaml())
    code = main(["train", str(job), "--set", "optim.lr=1e8"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
    line = re.fullmatch(
        r"error: training diverged: (the training loss is (?:nan|inf) at step (\d+)); "
        r"(?:the last finite checkpoint (\S+) is kept|no checkpoint was written before it); "
        r"nothing is registered; lower optim.lr \(1e\+08\) or check the data, and start a "
        r"fresh run", errors[0])
    assert line, errors[0]
    step, kept = int(line.group(2)), line.group(3)
    # Within epoch 1, after step 1 (its loss is the initial weights'): each step is checkpointed
    # when it is finite, so the last finite one is there, finite, and nothing later was written.
    assert 2 <= step <= 12 and kept is not None, errors[0]
    state = load_checkpoint(kept)
    assert state["step"] == step - 1 and nonfinite_tensors(state["model"]) == []
    written = sorted(p.name for p in Path(kept).parent.glob("epoch=*"))
    assert written[-1] == Path(kept).name

    client = MlflowClient(mlflow_sqlite)
    run = client.search_runs([client.get_experiment_by_name("ran").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["ran.diverged"] == errors[0].removeprefix("error: ")
    assert client.search_model_versions("name='tiny-diverged'") == []


def _register(cfg, classes: list[str], metrics: dict[str, float], poison: bool) -> str:
    """A version logged as `ran train` logs one, bypassing its gate (as another writer could)."""
    from ran.data.transforms import normalizer
    from ran.runtime import build_model
    from ran.tracking import RunTracker, log_final_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if poison:
        with torch.no_grad():
            for p in list(model.parameters())[:3]:
                p.fill_(math.nan)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    example = normalizer(cfg.data.recipe)(images).numpy().astype(np.float32)
    tracker = RunTracker.create_training(cfg, run_name="bypass", tags={"ran.model": cfg.model.name})
    version = log_final_model(tracker, model, cfg, classes, example, metrics, quiet=True)
    tracker.finish()
    return version


def test_promote_refuses_a_version_whose_weights_or_metrics_are_not_finite(
        synth_data, tiny_job, mlflow_sqlite, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from ran.train.launch import resolve_config

    cfg, manifest = resolve_config(tiny_job(synth_data, tmp_path / "runs", **{
        "tracking.registered_model": "nan-ran"}))
    classes = list(manifest["classes"])
    good = {"eval/top1": 0.5, "eval/top5": 1.0, "eval/loss": 1.2}
    assert _register(cfg, classes, good, poison=True) == "nan-ran/1"
    assert _register(cfg, classes, {**good, "eval/loss": math.nan}, poison=False) == "nan-ran/2"
    from ran.runtime import build_model

    state = build_model(cfg).state_dict()
    first = next(iter(build_model(cfg).named_parameters()))[0]

    assert main(["promote", "nan-ran", "--version", "1"]) == 1
    assert capsys.readouterr().out == (
        f"refused: version 1 of 'nan-ran' is not finite (3 of {len(state)} weight tensors (first "
        f"{first})); retrain it, a diverged model cannot hold an alias; 'champion' unchanged\n")

    assert main(["promote", "nan-ran", "--version", "2"]) == 1
    assert capsys.readouterr().out == (
        "refused: version 2 of 'nan-ran' is not finite (eval/loss nan); retrain it, a diverged "
        "model cannot hold an alias; 'champion' unchanged\n")
    assert MlflowClient(mlflow_sqlite).get_registered_model("nan-ran").aliases == {}

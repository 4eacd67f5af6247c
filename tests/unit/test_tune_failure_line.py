"""A failure of Ray Tune itself (a TuneError out of ``Tuner.fit``) is one ``error:`` line from
``ran tune``, exit 1; its traceback only with -v."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.error import TuneError

from ran.cli import main

REPO = Path(__file__).resolve().parents[2]

# A TuneError as Tune raises it: its text carries the traceback of where it happened.
TUNE_TEXT = (
    "Traceback (most recent call last):\n"
    '  File "ray/tune/execution/tune_controller.py", line 1412, in _on_training_result\n'
    "    self._validate_result_metrics(result)\n"
    "ray.tune.error.TuneError: Trial returned a result which did not include the specified "
    "metric(s) `val_acc` that `tune.TuneConfig()` expects.")


@pytest.fixture
def failing_tune(monkeypatch, tmp_path):
    """``ran tune``'s search raises TUNE_TEXT's TuneError; returns the command's arguments."""
    from ran.tune import search

    def fails(*args, **kwargs):
        raise TuneError(TUNE_TEXT)

    monkeypatch.setattr(search, "run_search", fails)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return ["tune", str(REPO / "tune_spaces" / "depth_mask.yaml"), "--job", str(REPO / "jobs" / "demo.yaml")]


def test_a_tune_error_is_one_error_line(failing_tune, capsys):
    assert main(failing_tune) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("error: the search failed in Ray Tune: Trial returned "
                   "a result which did not include the specified metric(s) `val_acc` that "
                   "`tune.TuneConfig()` expects. (every trial run is ended; ran -v tune ... shows "
                   "Tune's traceback)\n")


def test_with_v_the_tune_error_propagates_with_its_traceback(failing_tune):
    with pytest.raises(TuneError, match="Trial returned a result"):
        main(["-v", *failing_tune])

"""Rank 0's metric logger against a tracking server that goes away and comes back while MLflow's
client is still inside its own retries: the final report names nothing the server holds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import free_port, local_server, mlflow_server_argv

pytestmark = pytest.mark.integration


def test_values_written_during_the_clients_backoff_are_not_named_missing(tmp_path: Path,
                                                                        monkeypatch):
    from ran import tracking
    from ran.tracking.runs import RunLogger

    # MLflow's own retries as they are (7 tries), backing off 1 s, 2 s, 4 s ... instead of 2 s,
    # 4 s, 8 s ...: the same window shape, half as long to wait through.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    store, port = f"sqlite:///{tmp_path}/mlflow.db", free_port()

    def server(n: int):
        return local_server(mlflow_server_argv(store, port), port=port, ready="/health",
                            log=tmp_path / f"server-{n}.log", cwd=tmp_path)

    with server(1) as url:
        run = tracking.RunTracker.create("outage", run_name="r", tags={}, uri=url)
    # The server is down: the logger's write sits in the MLflow client's retries (connection
    # refused, backing off) when the final report's flush (1 s here) runs out.
    logger = RunLogger(run.run_id, url)
    logger.log_metrics({"train/loss": 0.5, "eval/top1": 0.25}, 24)
    report: dict[str, str] = {}
    final = threading.Thread(target=lambda: report.update(logger.gap_report(timeout=1.0)))
    final.start()
    with server(2):  # back within the client's backoff: its retry writes the values
        final.join(300)
        assert not final.is_alive()
        assert report == {}  # nothing named that the server holds
        client = tracking.client(url)
        assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] \
            == [(24, 0.5)]
        logger.close()
        assert "ran.metrics_gap" not in client.get_run(run.run_id).data.tags


def test_values_the_server_never_got_are_named_and_never_written_later(tmp_path: Path,
                                                                       monkeypatch):
    """The final report's decision holds: what it names is given up on (and tagged once the
    server answers), so a value the report calls missing does not appear afterwards."""
    from ran import tracking
    from ran.tracking.runs import RunLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each call fails at once

    store, port = f"sqlite:///{tmp_path}/mlflow.db", free_port()

    def server(n: int):
        return local_server(mlflow_server_argv(store, port), port=port, ready="/health",
                            log=tmp_path / f"server-{n}.log", cwd=tmp_path)

    with server(1) as url:
        run = tracking.RunTracker.create("outage", run_name="r", tags={}, uri=url)
    logger = RunLogger(run.run_id, url)
    logger.log_metrics({"train/loss": 0.5}, 24)
    # Down for the whole final report (its flush and the client's retries in flight).
    assert logger.gap_report(timeout=1.0, in_flight=600) == {
        tracking.REPORT_UNLOGGED: "train/loss at step 24"}
    with server(2):
        logger.close()
        client = tracking.client(url)
        assert client.get_metric_history(run.run_id, "train/loss") == []
        assert client.get_run(run.run_id).data.tags["ran.metrics_gap"] == \
            "1 metric values not logged"

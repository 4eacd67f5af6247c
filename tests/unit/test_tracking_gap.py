"""What a run's summary says about its data and its missing metrics: pure functions of
ran.tracking, no MLflow store."""

from __future__ import annotations

import copy

from ran import tracking

MANIFEST = {
    "dataset": "synthetic", "classes": ["a", "b"], "num_classes": 2, "created": "2026-01-01",
    "splits": {"train": {"shards": [{"name": "train-000000.tar", "samples": 4, "bytes": 10240},
                                    {"name": "train-000001.tar", "samples": 2, "bytes": 6144}],
                         "total": 6},
               "val": {"shards": [{"name": "val-000000.tar", "samples": 2, "bytes": 6144}],
                       "total": 2}},
}


def test_describe_unlogged_groups_metrics_by_their_steps():
    assert tracking.describe_unlogged({}) == ""
    assert tracking.describe_unlogged({"eval/top1": [2], "train/loss": [2], "train/step_loss": [4, 8]}) == \
        "eval/top1, train/loss at step 2; train/step_loss at steps 4, 8"
    assert tracking.describe_unlogged({"train/step_loss": list(range(1, 10))}, limit=3) == \
        "train/step_loss at steps 1, 2, 3 and 6 more"


def test_dataset_digest_follows_the_shards_not_the_build_date():
    train = tracking.dataset_digest(MANIFEST, "train")
    assert len(train) == 16 and train != tracking.dataset_digest(MANIFEST, "val")
    rebuilt = copy.deepcopy(MANIFEST)
    rebuilt["created"] = "2026-02-02"
    assert tracking.dataset_digest(rebuilt, "train") == train
    changed = copy.deepcopy(MANIFEST)
    changed["splits"]["train"]["shards"][1]["samples"] = 3
    assert tracking.dataset_digest(changed, "train") != train
    assert tracking.dataset_digest(changed, "val") == tracking.dataset_digest(MANIFEST, "val")


def test_shard_datasets_name_source_digest_and_counts(tmp_path):
    train, val = tracking.shard_datasets(str(tmp_path), MANIFEST, ["train", "val"])
    assert (train.name, val.name) == ("synthetic/train", "synthetic/val")
    assert train.digest == tracking.dataset_digest(MANIFEST, "train")
    assert train.source.to_json() == f'{{"uri": "{tmp_path}"}}'
    assert train.profile == {"num_samples": 6, "num_classes": 2, "num_shards": 2}
    assert val.profile == {"num_samples": 2, "num_classes": 2, "num_shards": 1}
    s3, = tracking.shard_datasets("s3://bucket/shards", MANIFEST, ["val"])
    assert s3.source.to_json() == '{"uri": "s3://bucket/shards"}'


def test_runs_on_the_same_shards_log_their_datasets_at_once(tmp_path):
    """The trials of a search start together on the same shards: each run links the one dataset
    row, whichever of them created it (on sqlite the store refuses a second insert of it).

    The collision is forced: each run's first insert of the dataset row waits until the other
    run reached its own, so both looked the row up before either wrote it."""
    import threading

    import sqlalchemy
    from sqlalchemy import event

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trackers = [tracking.RunTracker.create("race", run_name=f"trial-{i}", tags={}, uri=uri)
                for i in range(2)]
    both_looked = threading.Barrier(len(trackers))
    held: set[int] = set()
    inserts: list[int] = []

    def hold_first_insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS"):
            inserts.append(threading.get_ident())
            if threading.get_ident() not in held:
                held.add(threading.get_ident())
                both_looked.wait(timeout=60)

    failures: list[BaseException] = []

    def log(tracker):
        try:
            tracker.log_datasets(str(tmp_path), MANIFEST, {"train": "training", "val": "validation"})
        except BaseException as e:  # noqa: BLE001 - recorded and asserted below
            failures.append(e)

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", hold_first_insert)
    try:
        threads = [threading.Thread(target=log, args=(t,)) for t in trackers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", hold_first_insert)
    assert failures == []
    assert len(held) == 2 and len(inserts) == 2  # both runs tried to create the row, once each
    client = tracking.client(uri)
    for tracker in trackers:
        inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == ["synthetic/train", "synthetic/val"]
    digests = {i.dataset.digest for t in trackers for i in client.get_run(t.run_id).inputs.dataset_inputs
               if i.dataset.name == "synthetic/train"}
    assert digests == {tracking.dataset_digest(MANIFEST, "train")}

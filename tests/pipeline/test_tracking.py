"""MLflow calls are delivered, or counted and reported; never lost silently (issue 22, item 8).

* a call the store refuses (a param whose value a resume changed: "Changing param values is not
  allowed") is dropped, counted and logged with its reason, and the calls after it go through at once;
  the driver's own resume keeps the first value as the param and records the new one as a tag;
* a rerun whose run folder was deleted (no checkpoint: a training from step 0) gets a new MLflow run,
  not the FINISHED one of the same name and folder path, whose step axis stays as it was;
* the driver's tracker (config params, tags, data manifest) is flushed at the end of the fit: calls
  that failed at the start are delivered then; with the server down at the end they are counted in
  the summary and reported (a real ``mlflow server`` behind a fault-injecting HTTP proxy).

The first three use a real sqlite store (fast); the last a real server (slow).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

from pipeline.config import load
from pipeline.tracking import MLflowTracker
from pipeline.training import resume, tracking_run
from pipeline.training.lease import Lease
from tests.faults import FaultyS3Proxy, MLflowServer

MANIFEST = {"dataset": "mnist", "splits": {"train": {"rows": 10, "shards": []}}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One sqlite store for the module (a new database costs a second of schema migrations)."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifacts": str(root / "artifacts"), "root": root}


def config(store: dict, tmp_path: Path, name: str, *extra: str):
    return load(
        [
            "experiment=smoke",
            f"run.name={name}",
            f"run.storage_path={tmp_path / 'ray'}",
            f"tracking.uri={store['uri']}",
            f"tracking.artifact_location={store['artifacts']}",
            f"tracking.experiment={name}",
            *extra,
        ]
    )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_a_refused_call_is_dropped_counted_and_later_calls_go_through(store, caplog):
    """A worker's tracker (it knows nothing of the run's params) sends a param whose value the run
    already holds differently: the store refuses it for good. It is dropped and counted, the warning
    names the call and the key, and the tag and metric logged after it are in the store at once (a
    temporary failure would hold them back for ``retry_every`` seconds)."""
    first = MLflowTracker.start(store["uri"], "refused", "refused", artifact_location=store["artifacts"])
    first.log_params({"trainer.max_steps": 6, "optim.lr": 0.1})
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    tracker = MLflowTracker(store["uri"], first.run_id, retry_every=600.0)
    tracker.log_params({"trainer.max_steps": 12})
    tracker.set_tags({"after": "yes"})
    tracker.log_metrics({"train/loss": 0.5}, 7)
    run = client(store["uri"]).get_run(first.run_id)
    assert run.data.tags.get("after") == "yes" and run.data.metrics.get("train/loss") == 0.5
    assert run.data.params["trainer.max_steps"] == "6"
    assert tracker.lost_calls == 1 and not tracker.pending and not tracker.buffer
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MLflow refused")]
    assert len(refused) == 1 and "log_params" in refused[0] and "trainer.max_steps" in refused[0], refused
    tracker.log_params({"optim.lr": 0.2})  # the same refusal again: counted, logged once
    tracker.finish()
    refused = [r for r in caplog.records if r.getMessage().startswith("MLflow refused")]
    assert tracker.lost_calls == 2 and len(refused) == 1
    assert client(store["uri"]).get_run(first.run_id).info.status == "FINISHED"
    assert any("2 other calls were lost in all" in r.getMessage() for r in caplog.records)


def test_a_resume_that_changes_max_steps_keeps_one_run_and_records_the_new_value(store, tmp_path, caplog):
    """The driver's start_tracking on a resume with trainer.max_steps changed: the same run, the
    param keeps its first value, the new one is the tag bfn.resumed.trainer.max_steps, and the calls
    after the params (tags, the data manifest) reach the run; nothing is lost."""
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    cfg = config(store, tmp_path, "resumed")
    lease = Lease(resume.run_folder(cfg)).acquire()
    try:
        first = tracking_run.start_tracking(cfg, 123, MANIFEST, lease, resume=False)
        assert tracking_run.end_tracking(first, {"tracking_lost_calls": 0})["tracking_lost_calls"] == 0
        more_rows = {**MANIFEST, "splits": {"train": {"rows": 20, "shards": []}}}
        second = tracking_run.start_tracking(
            config(store, tmp_path, "resumed", "trainer.max_steps=12"), 123, more_rows, lease, resume=True
        )
        summary = tracking_run.end_tracking(second, {"checkpoint": "/somewhere/checkpoint_2"})
    finally:
        lease.release()
    assert second.run_id == first.run_id
    run = client(store["uri"]).get_run(first.run_id)
    assert run.data.params["trainer.max_steps"] == str(cfg.trainer.max_steps)
    assert run.data.tags["bfn.resumed.trainer.max_steps"] == "12"
    assert run.data.tags["dataset.train_rows"] == "20" and run.data.tags["final_checkpoint"].endswith("checkpoint_2")
    assert summary["tracking_lost_calls"] == 0 and summary["tracking_lost_points"] == 0
    assert any(f"trainer.max_steps: {cfg.trainer.max_steps} -> 12" in r.getMessage() for r in caplog.records)


def test_a_deleted_run_folder_gets_a_new_mlflow_run_not_the_finished_one(store, tmp_path, caplog):
    """A finished training, its run folder deleted, the same run.name again: the driver finds no
    checkpoint (a training from step 0), so a new MLflow run starts (a log line says why) and the
    finished run's step axis is left alone. A resume of the new run's folder reopens the new run."""
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    cfg = config(store, tmp_path, "deleted")
    runs = []
    for attempt in range(2):
        lease, newest = resume.claim_run(cfg)
        try:
            tracker = tracking_run.start_tracking(cfg, 123, MANIFEST, lease, resume=newest is not None)
            tracker.log_metrics({"train/loss": 1.0 + attempt}, 1)
            tracker.finish()
            tracking_run.end_tracking(tracker, {})
        finally:
            lease.release()
        runs.append(tracker.run_id)
        shutil.rmtree(resume.run_folder(cfg))  # the user deletes the run folder
    assert runs[0] != runs[1]
    history = client(store["uri"]).get_metric_history(runs[0], "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0)]  # one training on the old run's axis
    assert client(store["uri"]).get_run(runs[0]).info.status == "FINISHED"
    assert any(re.search(rf"{runs[0]}.*not continued.*holds no checkpoint", r.getMessage()) for r in caplog.records)
    lease = Lease(resume.run_folder(cfg)).acquire()
    try:  # a resume in that folder (a checkpoint of the second training): the second run again
        again = MLflowTracker.start(
            store["uri"], "deleted", "deleted", resume=True, owner={"holder": "x", "run_folder": resume.run_folder(cfg)}
        )
    finally:
        lease.release()
    assert again.run_id == runs[1]


def test_a_run_left_running_in_a_deleted_folder_is_closed_and_a_new_one_starts(store, tmp_path):
    """A writer that died before its first checkpoint left its run RUNNING; a rerun from step 0 (no
    checkpoint) marks that run KILLED and starts its own, instead of adding a second step axis to it."""
    owner = {"holder": "host a pid 1", "run_folder": str(tmp_path / "ray" / "died")}
    dead = MLflowTracker.start(store["uri"], "died", "died", owner=owner, resume=False)
    dead.log_metrics({"train/loss": 1.0}, 1)
    rerun = MLflowTracker.start(store["uri"], "died", "died", owner={**owner, "holder": "host a pid 2"}, resume=False)
    assert rerun.run_id != dead.run_id
    assert client(store["uri"]).get_run(dead.run_id).info.status == "KILLED"


def test_a_sweeps_precreated_run_is_taken_by_the_training(store, tmp_path):
    """A sweep makes its trial's run first (with its tags, no folder, no metrics); the training of
    that trial (step 0, no checkpoint) takes it rather than starting a second run."""
    made = MLflowTracker.start(store["uri"], "sweep", "trial-1", tags={"bfn.trial_id": "1"})
    owner = {"holder": "host a pid 1", "run_folder": str(tmp_path / "ray" / "trial-1")}
    fit = MLflowTracker.start(store["uri"], "sweep", "trial-1", owner=owner, resume=False)
    assert fit.run_id == made.run_id


# ------------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_driver_calls_that_failed_at_the_start_are_delivered_or_counted_at_the_end(tmp_path, caplog):
    """A real ``mlflow server`` behind an HTTP proxy that fails the run's writes (log-batch, set-tag,
    artifact uploads) while start_tracking logs the config, tags and manifest: they are queued. Run
    ``healed``: the proxy lets everything through again and end_tracking delivers every queued call.
    Run ``down``: the proxy is gone at the end (connection refused): end_tracking counts every call it
    could not deliver in the summary and reports them. The proxy's 503s and the server's own refusal
    (a changed param over HTTP) are told apart: only the 503s are retried."""
    writes = re.compile(r"/runs/(log-batch|set-tag)|/mlflow-artifacts/artifacts/")
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    with MLflowServer(tmp_path / "mlflow") as server:
        failing = {"on": True}
        with FaultyS3Proxy(
            server.url, lambda method, path: 503 if failing["on"] and writes.search(path) else None
        ) as proxy:
            cfg = load(
                [
                    "experiment=smoke",
                    "run.name=healed",
                    f"run.storage_path={tmp_path / 'ray'}",
                    "tracking=mlflow_server",
                    f"tracking.uri={proxy.url}",
                ]
            )
            tracker = tracking_run.start_tracking(cfg, 123, MANIFEST)
            assert tracker.pending  # params, tags and the manifest wait for the server
            failing["on"] = False
            summary = tracking_run.end_tracking(tracker, {"checkpoint": "/x/checkpoint_1", "tracking_lost_calls": 0})
            assert summary["tracking_lost_calls"] == 0 and not tracker.pending
            run = client(server.url).get_run(tracker.run_id)
            assert run.data.params["trainer.max_steps"] == str(cfg.trainer.max_steps)
            assert run.data.tags["dataset"] == "mnist" and run.data.tags["final_checkpoint"] == "/x/checkpoint_1"
            assert [a.path for a in client(server.url).list_artifacts(tracker.run_id, "data")] == ["data/manifest.json"]

            # a permanent refusal over HTTP (RestException INVALID_PARAMETER_VALUE) is not retried
            worker = MLflowTracker(proxy.url, tracker.run_id, retry_every=600.0)
            worker.log_params({"trainer.max_steps": 999})
            worker.log_metrics({"train/loss": 0.25}, 3)
            assert worker.lost_calls == 1 and not worker.buffer
            assert client(server.url).get_run(tracker.run_id).data.metrics["train/loss"] == 0.25

            failing["on"] = True
            cfg = load(
                [
                    "experiment=smoke",
                    "run.name=down",
                    f"run.storage_path={tmp_path / 'ray'}",
                    "tracking=mlflow_server",
                    f"tracking.uri={proxy.url}",
                ]
            )
            down = tracking_run.start_tracking(cfg, 123, MANIFEST)
            queued = len(down.pending)
            assert queued >= 3
        # the proxy is closed: the tracking server is unreachable at the end of the fit
        caplog.clear()
        summary = tracking_run.end_tracking(down, {"checkpoint": "/x/checkpoint_1", "tracking_lost_calls": 2})
    assert summary["tracking_lost_calls"] == 2 + queued + 1  # the worker's, the start's, the final_checkpoint tag
    assert down.lost_calls == queued + 1 and not down.pending
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert f"{queued + 1} other calls (log_artifact, log_params, set_tag) could not be delivered" in messages

"""Experiment tracking in MLflow, never fatal to training.

``MLflowTracker`` logs through ``MlflowClient`` against an explicit run id (no global state, so it
is safe inside Ray workers). Every call is wrapped: a failing tracking server is reported with a
warning, the metrics are kept in a buffer and sent again on the next call (up to
``max_buffer`` points; beyond that the oldest are dropped and counted as lost, and the count is
logged). Other calls (params, tags, artifacts, the final status) that fail are queued and sent
again with the metrics (up to ``max_buffer`` calls); those still undelivered at ``finish`` are
counted in ``lost_calls`` and reported. ``NullTracker`` does nothing. Secrets are masked in params,
tags and warnings (``pipeline.secrets``).

A dead server costs seconds, not minutes: MLflow's HTTP client retries a request 7 times with
exponential backoff (about 4 minutes) and waits up to 120 s per attempt by default. The tracker
retries on its own (the buffer), so unless the user set them it asks the client for one immediate
retry and a 10 s timeout (``HTTP_DEFAULTS``), and while the server is failing it tries to deliver
the buffer at most every ``retry_every`` seconds, so a hung server does not stall every step.
Points still undelivered at ``finish`` are counted in ``lost_points`` and reported.

A run is reopened by name (a resumed training keeps one run and one step axis) unless it is still
RUNNING for another writer: ``start(owner=...)`` records who writes the run (tags ``bfn.owner`` and
``bfn.run_folder``) and refuses a RUNNING run whose recorded run folder is not the caller's. The
run folder's lease (``pipeline.training.lease``) already excludes a second writer of the same
folder, so a RUNNING run with the caller's own folder was left open by a writer that died.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections import deque
from functools import partial
from pathlib import Path

from pipeline.secrets import MASK, SECRET_KEY, SECRET_VALUE, mask_params, mask_text  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
RUN_NAME_TAG = "bfn.run_name"
OWNER_TAG, RUN_FOLDER_TAG = "bfn.owner", "bfn.run_folder"
mask_secrets = mask_params  # the name the rest of the project imports
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 # MLflow prints "View run ... at: <tracking URI>" when a run ends, credentials included
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # fmt: skip


def _quick_http_defaults() -> None:
    """Short MLflow client retries and no printed run URLs (read at call time), unless the user set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class RunInUseError(RuntimeError):
    """The MLflow run of this name is RUNNING for another writer (another run folder)."""


def git_sha() -> str:
    """The commit being run: BFN_GIT_SHA (set by `bfn submit`, whose upload has no .git) or git."""
    if os.environ.get("BFN_GIT_SHA"):
        return os.environ["BFN_GIT_SHA"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class NullTracker:
    run_id = None
    lost_points = 0
    lost_calls = 0

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def flush(self) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None: ...


class MLflowTracker:
    def __init__(self, uri: str, run_id: str, *, max_buffer: int = 100_000,
                 retry_every: float = 5.0) -> None:  # fmt: skip
        from mlflow.tracking import MlflowClient

        _quick_http_defaults()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.buffer: deque = deque()
        self.pending: deque = deque()  # (what, call) of failed non-metric calls, retried in order
        self.max_buffer = max_buffer
        self.retry_every = retry_every
        self.lost_points = 0
        self.lost_calls = 0
        self._failing = False
        self._next_try = 0.0

    @staticmethod
    def start(uri: str, experiment: str, run_name: str, *, artifact_location: str | None = None,
              tags: dict | None = None, owner: dict | None = None) -> MLflowTracker:  # fmt: skip
        """Open the run named ``run_name`` (resuming it if it exists), creating the experiment on
        first use. ``owner`` (``{"holder": ..., "run_folder": ...}``): refuse a run that is RUNNING
        for another run folder (``RunInUseError``) and record this writer on the run."""
        from mlflow.tracking import MlflowClient

        _quick_http_defaults()
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = found.experiment_id
        runs = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
        owner = {key: mask_text(str(value)) for key, value in owner.items()} if owner else None
        owner_tags = {OWNER_TAG: owner["holder"], RUN_FOLDER_TAG: owner["run_folder"]} if owner else {}
        if runs:
            run_id = runs[0].info.run_id
            if owner:
                _check_not_in_use(runs[0], run_name, owner)
            client.update_run(run_id, status="RUNNING")
            for key, value in owner_tags.items():
                client.set_tag(run_id, key, value)
        else:
            all_tags = {RUN_NAME_TAG: run_name, **(tags or {}), **owner_tags}
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        return MLflowTracker(uri, run_id)

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as error:  # any tracking failure: warn, never kill training
            if not self._failing:
                log.warning("MLflow %s failed (%s: %s); buffering and retrying", what, type(error).__name__,
                            mask_text(str(error))[:200])  # fmt: skip (the URL may hold credentials)
            self._failing = True
            return False
        if self._failing:
            log.warning("MLflow is reachable again")
        self._failing = False
        return True

    def _call_or_queue(self, what: str, fn, *args, **kwargs) -> None:
        """Run a non-metric call now if nothing is queued before it, else queue it (order kept)."""
        self.pending.append((what, partial(fn, *args, **kwargs)))
        if not (self._failing and time.monotonic() < self._next_try):  # a failing server: wait for the retry time
            self._send_pending()
        while len(self.pending) > self.max_buffer:
            self.pending.popleft()
            self.lost_calls += 1

    def _send_pending(self) -> bool:
        while self.pending:
            what, call = self.pending[0]
            if not self._call(what, call):
                self._next_try = time.monotonic() + self.retry_every
                return False
            self.pending.popleft()
        return True

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in mask_params(params).items()]
        for i in range(0, len(items), 100):
            self._call_or_queue("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        for key, value in mask_params(tags).items():
            self._call_or_queue("set_tag", self.client.set_tag, self.run_id, key, str(value))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self.buffer.append(Metric(key, float(value), now, int(step)))
        while len(self.buffer) > self.max_buffer:
            self.buffer.popleft()
            self.lost_points += 1
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send queued calls and buffered metrics; True when nothing is left. While the server is
        failing, an attempt is made at most every ``retry_every`` s (unless ``force``)."""
        if (self.buffer or self.pending) and self._failing and not force and time.monotonic() < self._next_try:
            return False
        if not self._send_pending():
            return False
        while self.buffer:
            batch = [self.buffer[i] for i in range(min(len(self.buffer), 500))]
            if not self._call("log_metrics", self.client.log_batch, self.run_id, metrics=batch):
                self._next_try = time.monotonic() + self.retry_every
                return False
            for _ in batch:
                self.buffer.popleft()
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call_or_queue("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is buffered and set the final status; report everything that was lost."""
        self.pending.append(("set_terminated", partial(self.client.set_terminated, self.run_id, status)))
        if not self.flush(force=True):
            self.lost_points += len(self.buffer)
            self.lost_calls += len(self.pending)
            lost = ", ".join(sorted({what for what, _ in self.pending}))
            log.warning("MLflow: %d metric points and %d other calls (%s) could not be delivered and are lost",
                        len(self.buffer), len(self.pending), lost or "none")  # fmt: skip
            self.buffer.clear()
            self.pending.clear()
        if self.lost_points or self.lost_calls:
            log.warning("MLflow: %d metric points and %d other calls were lost in all (buffer full or server "
                        "down)", self.lost_points, self.lost_calls)  # fmt: skip


def _check_not_in_use(run, run_name: str, owner: dict) -> None:
    """RunInUseError when ``run`` is RUNNING for a writer of another run folder."""
    tags = run.data.tags
    other_folder = tags.get(RUN_FOLDER_TAG)
    if run.info.status != "RUNNING" or other_folder in (None, owner["run_folder"]):
        return
    raise RunInUseError(
        f"MLflow run {run.info.run_id} ({run_name!r}) is RUNNING for another writer: "
        f"{tags.get(OWNER_TAG, 'unknown')}, checkpoints in {other_folder}. Choose another run.name, or, "
        f"if that writer is gone, mark the run finished (MlflowClient().set_terminated("
        f"'{run.info.run_id}', 'KILLED'))"
    )

"""Experiment tracking in MLflow, never fatal to training.

``MLflowTracker`` logs through ``MlflowClient`` against an explicit run id (no global state, so it
is safe inside Ray workers). Every call is wrapped: a failing tracking server is reported with a
warning, the metrics are kept in a buffer and sent again on the next call (up to
``max_buffer`` points; beyond that the oldest are dropped and counted as lost, and the count is
logged). ``NullTracker`` does nothing. Secrets are masked in params and tags.

A dead server costs seconds, not minutes: MLflow's HTTP client retries a request 7 times with
exponential backoff (about 4 minutes) and waits up to 120 s per attempt by default. The tracker
retries on its own (the buffer), so unless the user set them it asks the client for one immediate
retry and a 10 s timeout (``HTTP_DEFAULTS``), and while the server is failing it tries to deliver
the buffer at most every ``retry_every`` seconds, so a hung server does not stall every step.
Points still undelivered at ``finish`` are counted in ``lost_points`` and reported.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("bfn.tracking")
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|(?<=://)[^/@\s:]+:[^/@\s]+(?=@))")
MASK = "***"
RUN_NAME_TAG = "bfn.run_name"
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _quick_http_defaults() -> None:
    """Short MLflow client retries (read at request time), unless the user set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def mask_secrets(params: dict[str, Any]) -> dict[str, Any]:
    """Replace values whose key looks secret, and credentials embedded in values, with ***."""
    out = {}
    for key, value in params.items():
        if SECRET_KEY.search(key) and value not in (None, ""):
            out[key] = MASK
        else:
            out[key] = SECRET_VALUE.sub(MASK, str(value)) if isinstance(value, str) else value
    return out


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
        self.max_buffer = max_buffer
        self.retry_every = retry_every
        self.lost_points = 0
        self._failing = False
        self._next_try = 0.0

    @staticmethod
    def start(uri: str, experiment: str, run_name: str, *, artifact_location: str | None = None,
              tags: dict | None = None) -> MLflowTracker:  # fmt: skip
        """Open the run named ``run_name`` (resuming it if it exists, so a resumed training
        keeps one run and one step axis), creating the experiment on first use."""
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
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        return MLflowTracker(uri, run_id)

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
        except Exception as error:  # any tracking failure: warn, never kill training
            if not self._failing:
                log.warning("MLflow %s failed (%s: %s); buffering and retrying", what, type(error).__name__,
                            SECRET_VALUE.sub(MASK, str(error))[:200])  # fmt: skip (the URL may hold credentials)
            self._failing = True
            return False
        if self._failing:
            log.warning("MLflow is reachable again")
        self._failing = False
        return True

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in mask_secrets(params).items()]
        for i in range(0, len(items), 100):
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        for key, value in mask_secrets(tags).items():
            self._call("set_tag", self.client.set_tag, self.run_id, key, str(value))

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
        """Send buffered metrics; True when the buffer is empty afterwards. While the server is
        failing, an attempt is made at most every ``retry_every`` s (unless ``force``)."""
        if self.buffer and self._failing and not force and time.monotonic() < self._next_try:
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
        self._call("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.flush(force=True):
            log.warning("MLflow: %d metric points could not be delivered and are lost", len(self.buffer))
            self.lost_points += len(self.buffer)
            self.buffer.clear()
        if self.lost_points:
            log.warning("MLflow: %d metric points were lost in all (buffer full or server down)",
                        self.lost_points)  # fmt: skip
        self._call("set_terminated", self.client.set_terminated, self.run_id, status)

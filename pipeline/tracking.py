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

Only a failure that a retry may fix is retried: connection errors, 5xx, ``TEMPORARILY_UNAVAILABLE``
and rate limits. A call the server refused (``PERMANENT_ERRORS``: a param whose value changed, a
deleted run, bad credentials, ...) is dropped at once, counted in ``lost_calls`` (``lost_points`` for
metrics), logged once per kind with the call it dropped, and never holds back the calls after it.

A run is matched by name and run folder (``start``): a resumed training reopens the run of its own
run folder (one run, one step axis); a training that starts at step 0 (a new or deleted run folder)
gets a new run, never a FINISHED one of a deleted or other folder. A run still RUNNING for another
writer is refused: ``start(owner=...)`` records who writes the run (tags ``bfn.owner`` and
``bfn.run_folder``) and refuses a RUNNING run whose recorded run folder is not the caller's. The
run folder's lease (``pipeline.training.lease``) already excludes a second writer of the same
folder, so a RUNNING run with the caller's own folder was left open by a writer that died.
MLflow never changes a logged param: a resume that changes one (``trainer.max_steps``) keeps the
first value as the param and records the new one as the tag ``bfn.resumed.<key>``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from functools import partial
from pathlib import Path

from pipeline.secrets import MASK, SECRET_KEY, SECRET_VALUE, mask_params, mask_text  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
RUN_NAME_TAG = "bfn.run_name"
OWNER_TAG, RUN_FOLDER_TAG = "bfn.owner", "bfn.run_folder"
RESUMED_TAG = "bfn.resumed."  # + a param's key: its value on a resume that changed it
# MLflow error codes of a request the server refused: sending it again gets the same answer
PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "BAD_REQUEST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
        "NOT_IMPLEMENTED",
    }
)
mask_secrets = mask_params  # the name the rest of the project imports
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow prints "View run ... at: <tracking URI>" when a run ends, credentials included
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def _quick_http_defaults() -> None:
    """Short MLflow client retries and no printed run URLs (read at call time), unless the user set them."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


class RunInUseError(RuntimeError):
    """The MLflow run of this name is RUNNING for another writer (another run folder)."""


def is_permanent(error: BaseException) -> bool:
    """True for an MLflow error that a retry cannot fix (``PERMANENT_ERRORS``); connection errors,
    5xx (``INTERNAL_ERROR``), ``TEMPORARILY_UNAVAILABLE`` and rate limits are temporary."""
    # lazy: every `bfn` command imports tracking (via the driver); mlflow would add ~1.2 s to each
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in PERMANENT_ERRORS


def git_sha() -> str:
    """The commit being run: BFN_GIT_SHA (set by `bfn submit`, whose upload has no .git) or git."""
    if os.environ.get("BFN_GIT_SHA"):
        return os.environ["BFN_GIT_SHA"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
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

    def finish(self, status: str | None = "FINISHED") -> None: ...


class MLflowTracker:
    def __init__(self, uri: str, run_id: str, *, max_buffer: int = 100_000, retry_every: float = 5.0) -> None:
        from mlflow.tracking import MlflowClient  # lazy: see is_permanent

        _quick_http_defaults()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.buffer: deque = deque()
        self.pending: deque = deque()  # (what, call) of failed non-metric calls, retried in order
        self.max_buffer = max_buffer
        self.retry_every = retry_every
        self.lost_points = 0
        self.lost_calls = 0
        self.logged_params: dict[str, str] = {}  # what the run holds already (a reopened run: from ``start``)
        self._refused: set[tuple[str, str]] = set()  # (call, error code) already logged as refused
        self._spool: str | None = None  # copies of the files of queued artifact uploads
        self._failing = False
        self._next_try = 0.0

    @staticmethod
    def start(
        uri: str,
        experiment: str,
        run_name: str,
        *,
        artifact_location: str | None = None,
        tags: dict | None = None,
        owner: dict | None = None,
        resume: bool = True,
    ) -> MLflowTracker:
        """Open the run named ``run_name``, creating the experiment on first use.

        Without ``owner`` the newest run of that name is reopened (or created). With ``owner``
        (``{"holder": ..., "run_folder": ...}``) runs are matched by name and run folder: a run RUNNING
        for another run folder is refused (``RunInUseError``); with ``resume`` (the folder holds a
        checkpoint the training continues from) the newest run of this folder is reopened; otherwise
        (a training from step 0) a new run is made, except that a run no writer claimed yet and that
        holds no metrics (made beforehand by a sweep, with its tags) is taken. The writer is recorded
        on the run."""
        from mlflow.tracking import MlflowClient  # lazy: see is_permanent

        _quick_http_defaults()
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = found.experiment_id
        runs = client.search_runs(
            [experiment_id],
            f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
            max_results=1000,
            order_by=["attributes.start_time DESC"],
        )
        owner = {key: mask_text(str(value)) for key, value in owner.items()} if owner else None
        owner_tags = {OWNER_TAG: owner["holder"], RUN_FOLDER_TAG: owner["run_folder"]} if owner else {}
        newest = runs[0] if runs else None
        run = _choose_run(client, runs, run_name, owner, resume) if owner else newest
        if run is not None:
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            for key, value in owner_tags.items():
                client.set_tag(run_id, key, value)
        else:
            all_tags = {RUN_NAME_TAG: run_name, **(tags or {}), **owner_tags}
            run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        tracker = MLflowTracker(uri, run_id)
        tracker.logged_params = dict(run.data.params) if run is not None else {}
        return tracker

    def _call(self, what: str, call, points: int = 0) -> bool:
        """Run ``call``; False when it failed for a reason a retry may fix. A refused call
        (``is_permanent``) is dropped and counted (``points`` metric points, else one call)."""
        try:
            call()
        except Exception as error:  # any tracking failure: warn, never kill training
            if not is_permanent(error):
                if not self._failing:
                    log.warning(
                        "MLflow %s failed (%s: %s); buffering and retrying",
                        what,
                        type(error).__name__,
                        mask_text(str(error))[:200],
                    )  # masked: the URL may hold credentials
                self._failing = True
                return False
            self._drop(what, error, points)
        if self._failing:
            log.warning("MLflow is reachable again")
        self._failing = False
        return True

    def _drop(self, what: str, error: Exception, points: int) -> None:
        """Count a call the server refused; the first refusal of each kind is logged with its reason."""
        if points:
            self.lost_points += points
        else:
            self.lost_calls += 1
        kind = (what, getattr(error, "error_code", type(error).__name__))
        level = logging.DEBUG if kind in self._refused else logging.WARNING
        self._refused.add(kind)
        dropped = f"{what} of {points} metric points" if points else what
        log.log(
            level,
            "MLflow refused %s (%s); a retry cannot fix it: dropped, the calls after it go on",
            dropped,
            mask_text(str(error))[:500],
        )

    def _call_or_queue(self, what: str, fn, *args, **kwargs) -> bool:
        """Run a non-metric call now if nothing is queued before it, else queue it (order kept);
        False when it is queued (then it is the last in ``pending``)."""
        self.pending.append((what, partial(fn, *args, **kwargs)))
        if not (self._failing and time.monotonic() < self._next_try):  # a failing server: wait for the retry time
            self._send_pending()
        while len(self.pending) > self.max_buffer:
            self.pending.popleft()
            self.lost_calls += 1
        return not self.pending

    def _send_pending(self) -> bool:
        while self.pending:
            what, call = self.pending[0]
            if not self._call(what, call):
                self._next_try = time.monotonic() + self.retry_every
                return False
            self.pending.popleft()
        return True

    def log_params(self, params: dict) -> None:
        """Log params the run does not hold yet; one it holds with another value (a resume that changed
        it: MLflow refuses to change a param) is kept and its new value recorded as a tag."""
        from mlflow.entities import Param  # lazy: see is_permanent

        values = {key: str(value)[:6000] for key, value in mask_params(params).items()}
        changed = {key: value for key, value in values.items() if self.logged_params.get(key, value) != value}
        if changed:
            listed = "; ".join(f"{key}: {self.logged_params[key]} -> {value}" for key, value in changed.items())
            log.info(
                "MLflow keeps a run's first params; changed by this resume (tags %s<key>): %s", RESUMED_TAG, listed
            )
            self.set_tags({f"{RESUMED_TAG}{key}": value for key, value in changed.items()})
        items = [Param(key, value) for key, value in values.items() if key not in self.logged_params]
        self.logged_params.update({param.key: param.value for param in items})
        for i in range(0, len(items), 100):
            self._call_or_queue("log_params", self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict) -> None:
        for key, value in mask_params(tags).items():
            self._call_or_queue("set_tag", self.client.set_tag, self.run_id, key, str(value))

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric  # lazy: see is_permanent

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
            if not self._call("log_metrics", partial(self.client.log_batch, self.run_id, metrics=batch), len(batch)):
                self._next_try = time.monotonic() + self.retry_every
                return False
            for _ in batch:
                self.buffer.popleft()
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or folder); a queued upload sends a copy, since the caller may delete the
        original (a temporary folder) before the retry."""
        if self._call_or_queue("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path):
            return
        try:
            if self._spool is None:
                self._spool = tempfile.mkdtemp(prefix="bfn-mlflow-queued-")
            kept = Path(tempfile.mkdtemp(dir=self._spool)) / Path(path).name
            (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, kept)
        except OSError as error:  # the original is still there to send, unless the caller deletes it
            log.warning("MLflow: could not keep a copy of the queued artifact %s (%s)", path, error)
            return
        self.pending[-1] = ("log_artifact", partial(self.client.log_artifact, self.run_id, str(kept), artifact_path))

    def finish(self, status: str | None = "FINISHED") -> None:
        """Deliver what is buffered and queued and, unless ``status`` is None, set the run's final status;
        report everything that was lost (undelivered or refused)."""
        if status:
            self.pending.append(("set_terminated", partial(self.client.set_terminated, self.run_id, status)))
        if not self.flush(force=True):
            self.lost_points += len(self.buffer)
            self.lost_calls += len(self.pending)
            lost = ", ".join(sorted({what for what, _ in self.pending}))
            log.warning(
                "MLflow: %d metric points and %d other calls (%s) could not be delivered and are lost",
                len(self.buffer),
                len(self.pending),
                lost or "none",
            )
            self.buffer.clear()
            self.pending.clear()
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        if self.lost_points or self.lost_calls:
            log.warning(
                "MLflow: %d metric points and %d other calls were lost in all (buffer full, server "
                "down, or refused by the server)",
                self.lost_points,
                self.lost_calls,
            )


def _choose_run(client, runs: list, run_name: str, owner: dict, resume: bool):
    """The run (of ``runs``, newest first) that this writer continues, or None for a new run."""
    for run in runs:
        _check_not_in_use(run, run_name, owner)
    folder = owner["run_folder"]
    mine = [run for run in runs if run.data.tags.get(RUN_FOLDER_TAG) == folder]
    unclaimed = [run for run in runs if RUN_FOLDER_TAG not in run.data.tags]
    if resume and mine:
        return mine[0]
    # made before this writer (a sweep's trial run, or one from before runs were tagged with their folder)
    if unclaimed and (resume or not unclaimed[0].data.metrics):
        return unclaimed[0]
    if not runs:
        return None
    if mine:  # a new training in the same folder: it was deleted, or its last run died before its first checkpoint
        reason = f"its run folder {folder} holds no checkpoint, so this training starts at step 0"
        if mine[0].info.status == "RUNNING":  # its writer is gone: this process holds the folder's lease
            client.set_terminated(mine[0].info.run_id, "KILLED")
            reason += f"; the run was left RUNNING by a writer that died ({mine[0].data.tags.get(OWNER_TAG)}): KILLED"
    else:
        reason = f"it belongs to another run folder ({runs[0].data.tags.get(RUN_FOLDER_TAG)})"
    log.info(
        "MLflow run %s (%r) is not continued: %s. A new MLflow run starts",
        (mine or runs)[0].info.run_id,
        run_name,
        reason,
    )
    return None


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

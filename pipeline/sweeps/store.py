"""The one module that reads and writes MLflow for sweeps and scaling grids.

Identities are tags (which sweep or grid a run belongs to, its trial or grid point); numbers are
params (what a run was given: N, D, C, width, ...) and metrics (what it measured: the final NLL,
trial counts, fit parameters). Errors printed from here are masked
(``pipeline.tracking.mask_secrets``): an MLflow error message may carry the tracking URI with
its credentials.

Sweeps: a parent run ``sweep-<name>`` (role ``sweep``) and one child per trial (role ``trial``,
``mlflow.parentRunId``). The best run's model of a sweep or grid is registered under the study's name
with the alias ``champion`` (``register_best``). Scaling: a parent run ``scaling-<grid>`` (role
``study``), one child per grid point (role ``run``) and one run per fit (role ``fit``, its tables and
plots also artifacts of the study run), all tagged ``bfn.scaling=<grid>``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from pipeline.core import checkpointing
from pipeline.core import storage as core_storage
from pipeline.evaluation import models
from pipeline.sweeps.fit import ScalingError
from pipeline.tracking import HTTP_DEFAULTS, MLflowTracker, git_sha, mask_secrets
from pipeline.training.resume import run_folder

log = logging.getLogger(__name__)

SWEEP_TAG, TRIAL_TAG, ROLE_TAG = "bfn.sweep", "bfn.trial_id", "bfn.role"
GRID_TAG, GRID_ROLE_TAG, ENTRY_TAG = "bfn.scaling", "bfn.scaling_role", "bfn.scaling_entry"
STATE_TAGS = {
    "digest": "bfn.tune_state_sha256",
    "recent": "bfn.tune_state_recent",
    "files": "bfn.tune_state_files",
    "top": "bfn.tune_state_top",
}
FINAL_NLL = "scaling/nll"
# budget: an IsoFLOP plan's training FLOPs per point (absent from plain grids, whose fit skips Approach 2)
GRID_NUMBERS = ("N", "N_total", "D", "D_unique", "C", "C_measured", "width", "depth", "steps", "fraction", "budget")


def masked(error: BaseException | str) -> str:
    """An error's text with credentials (``user:pass@`` in URIs, access keys) replaced by ***."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return mask_secrets({"error": text})["error"]


def _client(uri: str):
    """A client with the tracker's short HTTP retries (MLflow's own default waits minutes)."""
    # lazy: scaling imports this module for every `bfn` command (build_parser); mlflow would add ~1.2 s
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def _search(uri: str, experiment: str, query: str, max_results: int = 50_000) -> list:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], query, max_results=max_results, order_by=["attributes.start_time DESC"]
    )


def open_run(cfg, run_name: str, tags: dict, params: dict | None = None, *, required: bool = False):
    """Create (or reopen, by name) the run a training will log to, with its tags and params.
    ``fit()`` reopens it by name, so the tags stay on the run it logs to. Unless ``required``, a
    failure is a warning: tracking never stops training."""
    try:
        tracker = MLflowTracker.start(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            run_name,
            artifact_location=cfg.tracking.artifact_location,
            tags=tags,
        )
    except Exception as error:
        if required:
            raise
        log.warning("MLflow run %s not created (%s); the trial trains untracked", run_name, masked(error))
        return None
    if params:
        tracker.log_params(params)
    return tracker


def register_best(cfg, study: str, run_id: str | None) -> int | None:
    """The best run's model (``cfg``: that run's config) registered as ``study``@champion; a run whose
    model was never logged (Tune stopped the trial at its last report) gets it from its run folder's
    newest complete checkpoint. The version, or None (a warning says why)."""
    if not cfg.tracking.enabled or run_id is None:
        return None
    try:
        filesystem, folder = core_storage.resolve(run_folder(cfg))
        found = checkpointing.complete_checkpoints(filesystem, folder)
    except (checkpointing.CheckpointError, OSError) as error:
        log.warning("the best run's checkpoints could not be listed (%s)", masked(error))
        found = []
    checkpoint = (filesystem, found[0][1]) if found else None
    return models.register_champion(cfg.tracking.uri, study, run_id, checkpoint)


# ---------------------------------------------------------------------------------- sweeps
def start_parent(cfg, sweep_name: str, params: dict, note: str, *, resume: bool):
    """The sweep's parent run (reopened on resume; params are logged once, at the start)."""
    if not cfg.tracking.enabled:
        return None
    tags = {SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"}
    try:
        parent = open_run(cfg, f"sweep-{sweep_name}", tags, None, required=True)
    except Exception as error:
        log.warning("MLflow unavailable (%s); the sweep runs untracked", masked(error))
        return None
    if not resume:
        parent.log_params(params)
    parent.set_tags({"git_sha": git_sha(), "mlflow.note.content": note})
    return parent


def find_parent(cfg, sweep_name: str) -> str | None:
    """The run id of the sweep's parent run, or None."""
    query = f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'"
    runs = _search(cfg.tracking.uri, cfg.tracking.experiment, query, max_results=1)
    return runs[0].info.run_id if runs else None


def finish_parent(
    parent, rows: list[dict], best: dict | None, files: dict, export: str | None, metric: str, wall: float
) -> None:
    """Summary artifacts, trial counts as metrics, the best trial as tags; close the run."""
    for path in files.values():
        parent.log_artifact(path, "sweep")
    counts = {
        "sweep/trials": len(rows),
        "sweep/trials_stopped_early": sum(r["status"] == "stopped" for r in rows),
        "sweep/trials_errored": sum(r["status"] == "error" for r in rows),
        "sweep/wall_s": round(wall, 1),
    }
    if best is not None:
        counts[f"best/{metric}"] = best["metric"]
        parent.set_tags(
            {
                "bfn.best_trial": best["trial_id"],
                "bfn.best_run_id": best.get("mlflow_run_id"),
                "bfn.best_preset": export,
            }
        )
        if export:
            parent.log_artifact(export, "sweep")
    parent.log_metrics(counts, step=0)
    parent.finish()


def close_trial_runs(cfg, sweep_name: str, rows: list[dict]) -> None:
    """Attach MLflow run ids to ``rows`` and close the runs Tune's kills left RUNNING: stopped
    trials as KILLED (tagged bfn.stopped_early), trials that reached max_t as FINISHED, errors
    as FAILED. Tune stops a trial at its last report too (ASHA at max_t), before fit() can close
    the run; its metrics are already logged (they are sent before each report)."""
    for row in rows:
        row["mlflow_run_id"] = None
    if not cfg.tracking.enabled:
        return
    client = _client(cfg.tracking.uri)
    query = f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'trial'"
    by_trial = {r.data.tags.get(TRIAL_TAG): r for r in _search(cfg.tracking.uri, cfg.tracking.experiment, query)}
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        run_id = row["mlflow_run_id"] = run.info.run_id
        client.set_tag(run_id, "bfn.trial_status", row["status"])
        if row["status"] == "stopped":
            client.set_tag(run_id, "bfn.stopped_early", f"step {row['step']}")
        if run.info.status == "RUNNING":
            status = {"error": "FAILED", "stopped": "KILLED", "completed": "FINISHED"}[row["status"]]
            if status == "FINISHED":
                client.set_tag(run_id, "bfn.final_step", str(row["step"]))
            client.set_terminated(run_id, status)


def record_state(uri: str, run_id: str, record: dict) -> None:
    """Write the Tune state's hashes (``tune_state``) onto the parent run, as tags (they change
    as the sweep goes; params cannot)."""
    from mlflow.entities import RunTag  # lazy: as in _client

    _client(uri).log_batch(run_id, tags=[RunTag(tag, str(record[key])) for key, tag in STATE_TAGS.items()])


def recorded_state(uri: str, run_id: str) -> dict | None:
    tags = _client(uri).get_run(run_id).data.tags
    if STATE_TAGS["digest"] not in tags:
        return None
    return {key: tags.get(tag) for key, tag in STATE_TAGS.items()}


# ---------------------------------------------------------------------------------- scaling
def grid_params(entry: dict, metric: str) -> dict[str, Any]:
    """A grid point's numbers as MLflow params (None, e.g. D_unique of unprepared data, left out)."""
    params = {f"scaling.{k}": entry[k] for k in GRID_NUMBERS if entry.get(k) is not None}
    return {**params, "scaling.nll_metric": metric}


def grid_tags(grid: str, entry_id: str) -> dict[str, str]:
    return {GRID_TAG: grid, GRID_ROLE_TAG: "run", ENTRY_TAG: entry_id}


def grid_runs(uri: str, experiment: str, grid: str, role: str = "run") -> list:
    query = f"tags.`{GRID_TAG}` = '{grid}' and tags.`{GRID_ROLE_TAG}` = '{role}'"
    return _search(uri, experiment, query)


def open_study(cfg, grid: str, params: dict):
    """The study's parent run ``scaling-<grid>`` (role ``study``), reopened by a resumed ``bfn scaling run``."""
    study = open_run(cfg, f"scaling-{grid}", {GRID_TAG: grid, GRID_ROLE_TAG: "study"}, params, required=True)
    study.set_tags({"git_sha": git_sha(), "mlflow.note.content": f"bfn scaling run: the grid {grid}"})
    return study


def close_study(study, uri: str, experiment: str, grid: str, best: dict | None, wall: float) -> None:
    """What the whole study cost and found, over every run of the grid (a plan that extends a grid
    under the same name adds to it): points finished, their total compute (6ND and counted), their
    own training wall time summed, this invocation's wall time, and this plan's best point as tags."""
    runs = grid_runs(uri, experiment, grid)
    finished = [r for r in runs if math.isfinite(r.data.metrics.get(FINAL_NLL, float("nan")))]
    study.log_metrics(
        {
            "study/points": len(runs),
            "study/points_finished": len(finished),
            "study/C_total": sum(_param(r, "scaling.C") for r in finished),
            "study/C_measured_total": sum(_param(r, "scaling.C_measured") for r in finished),
            "study/points_wall_s": round(sum((r.info.end_time - r.info.start_time) / 1e3 for r in finished), 1),
            "study/invocation_wall_s": round(wall, 1),
        },
        step=0,
    )
    if best is not None:
        study.set_tags({"bfn.best_point": best["id"], "bfn.best_run_id": best["run_id"]})
    study.finish()


def find_study(uri: str, experiment: str, grid: str) -> str | None:
    """The run id of the grid's study run, or None (a grid run before studies had parents)."""
    runs = grid_runs(uri, experiment, grid, role="study")
    return runs[0].info.run_id if runs else None


def finished_points(uri: str, experiment: str, grid: str) -> dict[str, str]:
    """{grid point id: run id} of the points that finished with a finite final NLL."""
    done = {}
    for run in grid_runs(uri, experiment, grid):
        nll = run.data.metrics.get(FINAL_NLL)
        if run.info.status == "FINISHED" and nll is not None and math.isfinite(nll):
            done.setdefault(run.data.tags.get(ENTRY_TAG), run.info.run_id)
    return done


def finalize_point(uri: str, run_id: str, metric: str, params: dict, steps: int | None = None) -> float:
    """Record a trained grid point's final validation NLL (the last value of ``metric``) as the
    metric ``scaling/nll`` (NaN when it never validated, or validated last before its planned
    ``steps``: a point that stopped early did not spend its D), and its params when a run made by an
    older plan lacks them."""
    client = _client(uri)
    logged = client.get_run(run_id).data.params if params else {}
    missing = {k: v for k, v in params.items() if k not in logged}
    if missing:
        MLflowTracker(uri, run_id).log_params(missing)
    history = client.get_metric_history(run_id, metric)
    last = max(history, key=lambda m: (m.step, m.timestamp)) if history else None
    value = float("nan") if last is None else last.value
    if last is not None and steps is not None and last.step < steps:
        log.warning("run %s validated last at step %d of %d: no final NLL (rerun the point)", run_id, last.step, steps)
        value = float("nan")
    client.log_metric(run_id, FINAL_NLL, float(value))
    return float(value)


def _param(run, key: str) -> float:
    try:
        return float(run.data.params[key])
    except (KeyError, ValueError):
        return float("nan")


def read_grid(uri: str, experiment: str, grid: str, *, data_axis: str = "seen") -> list[dict]:
    """The grid's runs: [{"run_id", "name", "status", "N", "D", "C", "C_measured", "budget", "nll", "metric"}]
    sorted by (N, D). ``data_axis="unique"``: D is the distinct training data (D_unique)."""
    runs = grid_runs(uri, experiment, grid)
    if not runs:
        raise ScalingError(
            f"no runs tagged {GRID_TAG}={grid} in experiment {experiment!r} at "
            f"{masked(uri)}; run `bfn scaling run` first"
        )
    out = []
    for run in runs:
        d_key = "scaling.D_unique" if data_axis == "unique" else "scaling.D"
        out.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "N": _param(run, "scaling.N"),
                "D": _param(run, d_key),
                "C": _param(run, "scaling.C"),
                "C_measured": _param(run, "scaling.C_measured"),
                "budget": _param(run, "scaling.budget"),
                "nll": float(run.data.metrics.get(FINAL_NLL, float("nan"))),
                "metric": run.data.params.get("scaling.nll_metric", ""),
            }
        )
    return sorted(out, key=lambda r: (r["N"], r["D"]))


def log_fit(
    uri: str,
    experiment: str,
    grid: str,
    nd: dict,
    c: dict,
    prediction: dict | None,
    files: dict,
    artifact_location: str | None,
    exponents: dict | None = None,
) -> str:
    """The fit as its own run (role ``fit``): parameters and intervals as metrics, tables and plot
    as artifacts; ``exponents`` (``scaling.optimal_exponents``): N_opt ~ C^a, D_opt ~ C^b of both
    approaches as ``fit/approach{2,3}/{a,b}[_ci_low|_ci_high]``. Returns its run id."""
    tracker = MLflowTracker.start(
        uri,
        experiment,
        f"scaling-fit-{grid}",
        artifact_location=artifact_location,
        tags={GRID_TAG: grid, GRID_ROLE_TAG: "fit"},
    )
    metrics = {f"fit/ND/{k}": v for k, v in nd["params"].items()}
    metrics.update({f"fit/C/{k}": v for k, v in c["params"].items()})
    for fit in (nd, c):
        for key, (low, high) in fit["ci"].items():
            metrics[f"fit/{fit['kind']}/{key}_ci_low"] = low
            metrics[f"fit/{fit['kind']}/{key}_ci_high"] = high
    if prediction:
        metrics.update({f"optimal/{k}": v for k, v in prediction.items() if isinstance(v, float)})
    metrics.update({"fit/n_runs": nd["n_runs"], "fit/n_boot": nd["n_boot"]})
    for approach, found in (exponents or {}).items():
        if not isinstance(found, dict):  # approach 2's reason it was not fitted, in fit.md
            continue
        for key in ("a", "b"):
            metrics[f"fit/{approach}/{key}"] = found["params"][key] if "params" in found else found[key]
            metrics[f"fit/{approach}/{key}_ci_low"], metrics[f"fit/{approach}/{key}_ci_high"] = found["ci"][key]
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(v)}, step=0)
    for path in files.values():
        tracker.log_artifact(path, "scaling")
    tracker.finish()
    study = find_study(uri, experiment, grid)
    if study is not None:
        parent = MLflowTracker(uri, study)
        for path in files.values():
            parent.log_artifact(path, "fit")
        parent.set_tags({"bfn.fit_run_id": tracker.run_id})
        parent.finish(status=None)
    return tracker.run_id

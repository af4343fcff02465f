"""Run training configs as Ray Tune trials: the one runner behind `bfn tune` (sampled configs,
ASHA) and `bfn scaling run --concurrent K` (a planned grid, FIFO).

A trial composes ``base overrides + its sampled values (++key=value) + run.name``, opens its
MLflow run (``store.open_run``: tags, and params for planned runs) and runs
``pipeline.training.driver.fit`` with a ``TuneReportCallback`` that forwards the reports carrying
the metric. Resources: Tune reserves a trial's driver (``driver_cpus``); the TorchTrainer inside
reserves its own workers; ``data_cpus`` stay free for Ray Data tasks (without them a full
cluster hangs instead of failing).

Two Tune callbacks run in the sweep's driver: the placement-group reaper (``placement_groups``)
and the recorder of the Tune state's sha256 at every save (``tune_state``), which writes to the
MLflow run set by ``recording_state``. The callbacks are pickled into the Tune state, so they hold no settings
(a tracking URI may carry credentials); the recorder reads its target from this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import Searcher

from pipeline.config import ConfigError, flatten, load, set_env_defaults
from pipeline.sweeps import store, tune_state
from pipeline.sweeps.export import PINNED_PATH_KEYS
from pipeline.training.driver import fit
from pipeline.training.ray_runtime import init_ray
from tune_spaces.common import hydra_value, to_overrides

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """A trial whose config, run name, MLflow tags and params are fixed in advance (a grid point)."""

    overrides: list[str]
    run_name: str
    tags: dict[str, str]
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """What every trial of one Tune experiment shares. ``planned``: the values of a ``_entry``
    grid over planned runs; otherwise a trial's run is ``<sweep>-<trial id>``."""

    overrides: list[str]
    sweep: str
    metric: str
    parent_run_id: str | None = None
    planned: dict[str, PlannedRun] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------- resources
def trial_resources(cfg, driver_cpus: float) -> dict[str, float]:
    """Logical resources one trial holds: its driver plus its Train workers."""
    workers = cfg.trainer.max_workers  # an elastic trial may grow to its maximum
    return {
        "CPU": driver_cpus + workers * cfg.trainer.cpus_per_worker,
        "GPU": float(workers) if cfg.trainer.use_gpu else 0.0,
    }


def fitting_trials(cluster: dict, per_trial: dict[str, float], data_cpus: float) -> int:
    cpus = float(cluster.get("CPU", 0)) - data_cpus
    fits = math.floor(cpus / per_trial["CPU"] + 1e-9) if per_trial["CPU"] else 10**6
    if per_trial["GPU"]:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0)) / per_trial["GPU"] + 1e-9))
    return max(fits, 0)


def start_ray(cfg, driver_cpus: float, data_cpus: float, wanted: int) -> dict:
    """Start (or join) Ray with room for ``wanted`` concurrent trials; return its resources."""
    if not ray.is_initialized() and not cfg.run.ray_address:
        need = math.ceil(wanted * trial_resources(cfg, driver_cpus)["CPU"] + data_cpus)
        cpus = max(cfg.run.ray_num_cpus or 0, need)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, ray_num_cpus=cpus))
    init_ray(cfg)
    return ray.cluster_resources()


def concurrency(
    cfg, *, driver_cpus: float, data_cpus: float, requested: int, total: int, option: str = "max_concurrent"
) -> int:
    """How many trials run at once: ``requested`` (0: as many as fit), capped by what the Ray
    cluster fits and by ``total``. Starts Ray. Raises ConfigError (naming ``option``) when not
    even one fits."""
    per_trial = trial_resources(cfg, driver_cpus)
    cluster = start_ray(cfg, driver_cpus, data_cpus, min(requested or 2, total))
    fits = fitting_trials(cluster, per_trial, data_cpus)
    if fits < 1:
        raise ConfigError(
            f"{option}: the Ray cluster has {cluster.get('CPU', 0)} CPUs and "
            f"{cluster.get('GPU', 0)} GPUs; one trial needs {per_trial['CPU']} CPUs and "
            f"{per_trial['GPU']} GPUs plus data_cpus={data_cpus} kept for Ray Data"
        )
    at_once = min(requested or fits, fits, total)
    if requested > fits:
        log.warning(
            "%s=%d does not fit the cluster (%s CPUs, %s per trial + %s for data); running %d at a time",
            option,
            requested,
            cluster.get("CPU"),
            per_trial["CPU"],
            data_cpus,
            at_once,
        )
    return at_once


def pin_paths(cfg) -> list[str]:
    """Overrides pinning the driver's absolute paths (Tune trials run in their own folders)."""
    flat = flatten(cfg.raw)
    return [f"{k}={hydra_value(flat[k])}" for k in PINNED_PATH_KEYS if flat.get(k) is not None]


# ---------------------------------------------------------------------------------- the trial
def _metric_callback(metric: str):
    """A TuneReportCallback that forwards only the reports carrying ``metric`` (Tune rejects a
    result without the metric it optimises; training reports before the first validation)."""

    class MetricReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def trial_overrides(settings: TrialSettings, config: dict, trial_id: str) -> tuple[list[str], str, dict, dict]:
    """(overrides, run name, MLflow tags, MLflow params) of one trial."""
    sampled = {k: v for k, v in config.items() if not k.startswith("_")}
    overrides = [*settings.overrides, *to_overrides(sampled)]
    tags = {store.SWEEP_TAG: settings.sweep, store.TRIAL_TAG: trial_id, store.ROLE_TAG: "trial"}
    run_name, params = f"{settings.sweep}-{trial_id}", {}
    if config.get("_entry") is not None:
        planned = settings.planned[config["_entry"]]
        overrides += planned.overrides
        run_name, tags, params = planned.run_name, {**tags, **planned.tags}, planned.params
    if settings.parent_run_id:
        tags["mlflow.parentRunId"] = settings.parent_run_id
    return [*overrides, f"run.name={run_name}"], run_name, tags, params


def run_trial(config: dict, settings: TrialSettings) -> None:
    """One Tune trial: compose + validate, open its MLflow run, fit with Tune reporting."""
    set_env_defaults()
    overrides, run_name, tags, params = trial_overrides(settings, config, tune.get_context().get_trial_id())
    cfg = load(overrides)
    if cfg.tracking.enabled:
        store.open_run(cfg, run_name, tags, params)
    fit(cfg, callbacks=[_metric_callback(settings.metric)])


# ----------------------------------------------------------------------- driver-side callbacks
class PlacementGroupReaper(tune.Callback):
    """Every few seconds, remove the worker placement groups of stopped trials (see
    ``placement_groups``); a failure is a warning, never the end of the sweep."""

    def __init__(self, every_s: float = 3.0) -> None:
        self.every_s, self.last, self.removed = every_s, 0.0, 0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        try:
            # lazy, inside the try: a Ray upgrade that breaks its private API costs a warning, not the sweep
            from pipeline.sweeps.placement_groups import reap_orphan_placement_groups

            self.removed += reap_orphan_placement_groups()
        except Exception as error:
            log.warning("placement group clean-up failed (%s)", store.masked(error))


_STATE_TARGET: dict[str, Any] = {}  # uri, run_id, path, filesystem, base, recent of this process's sweep


class TuneStateRecorder(tune.Callback):
    """Records the sha256 of the Tune state as Tune saves it (``tune_state``): Tune asks its
    callbacks for their state while it saves, after writing everything else and before the
    upload, so ``get_state`` hashes the staging folder then and returns None (no state of its own,
    so no callback file is written after the hash)."""

    _trials: list = []

    def on_step_begin(self, iteration, trials, **info):
        self._trials = trials  # Tune's own list: the trials it adds later in the step appear in it

    def get_state(self):
        if _STATE_TARGET and self._trials:
            record_save(self._trials[0].storage.experiment_driver_staging_path)
        return None

    def __getstate__(self):
        return {}  # pickled into tuner.pkl before any trial exists; never carries the live list


def record_save(staging: str) -> None:
    """Write the digest of the storage as it will be once ``staging`` is uploaded to the parent
    run (warn once on failure: resuming will then need trust_storage=true)."""
    target = _STATE_TARGET
    try:
        record = tune_state.record_of(tune_state.expected(target["base"], staging), target["recent"])
        if record["digest"] != (target["recent"] or [None])[0]:
            store.record_state(target["uri"], target["run_id"], record)
            target["recent"] = [record["digest"], *record["recent"].split()]
    except Exception as error:
        if not target.get("warned"):
            target["warned"] = True
            log.warning(
                "could not record the Tune state's sha256 (%s); resuming this sweep will need trust_storage=true",
                store.masked(error),
            )


def note_tuner_pkl() -> None:
    """The Tuner wrote tuner.pkl into the storage itself, straight before this call: hash it."""
    if _STATE_TARGET:
        files = tune_state.state_files(_STATE_TARGET["path"], _STATE_TARGET["filesystem"])
        _STATE_TARGET["base"]["tuner.pkl"] = files["tuner.pkl"]


@contextlib.contextmanager
def recording_state(uri: str | None, run_id: str | None, path: str, filesystem=None, *, base: dict | None = None):
    """While the block runs, TuneStateRecorder records into ``run_id``. ``base``: a resumed sweep's
    state files as ``tune_state.verify`` checked them (or the user trusted them); None for a new sweep."""
    if not (uri and run_id):
        yield
        return
    _STATE_TARGET.update(
        uri=uri,
        run_id=run_id,
        path=path,
        filesystem=filesystem,
        base=dict(base or {}),
        recent=[] if base is None else [tune_state.digest(base)],
    )
    try:
        yield
    finally:
        _STATE_TARGET.clear()


# ------------------------------------------------------------------------------ the experiment
def run_tune(
    *,
    name: str,
    storage_path: str,
    settings: TrialSettings,
    param_space: dict,
    num_samples: int,
    metric: str,
    mode: str,
    max_concurrent: int,
    driver_cpus: float,
    scheduler=None,
    search_alg=None,
    resume: bool = False,
    storage_filesystem=None,
):
    """Run (or restore) the Tune experiment ``storage_path/name`` of ``run_trial``s; returns
    Tune's ResultGrid. ``max_concurrent`` must already account for each trial's workers
    (``concurrency``). Restoring unpickles the experiment's state: check it first
    (``tune_state``)."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": driver_cpus})
    path = f"{storage_path.rstrip('/')}/{name}"
    if resume:  # Tune restores the RunConfig (callbacks included) with the experiment
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_filesystem
        )
    else:
        # Tune applies max_concurrent_trials to a Searcher only; a BasicVariantGenerator takes
        # its own max_concurrent (set by the caller)
        limit = max_concurrent if search_alg is None or isinstance(search_alg, Searcher) else None
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=num_samples,
                max_concurrent_trials=limit,
                scheduler=scheduler,
                search_alg=search_alg,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                verbose=1,
                callbacks=[PlacementGroupReaper(), TuneStateRecorder()],
            ),
        )
        note_tuner_pkl()
    return tuner.fit()


def experiment_exists(path: str, storage_filesystem=None) -> bool:
    if "://" not in path and storage_filesystem is None:
        return Path(path).is_dir() and any(Path(path).iterdir())
    return tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem)

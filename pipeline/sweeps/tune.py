"""`bfn tune`: hyper-parameter sweeps with Ray Tune over the same training path as `bfn train`.

    bfn tune experiment=smoke space=optim_short num_samples=8 [max_concurrent=2]
             [metric=val/nll_bits_per_dim] [mode=min] [scheduler=asha|fifo] [search=random|optuna]
             [grace_period=..] [reduction_factor=2] [max_t=..] [seed=0] [sweep=NAME] [resume=true]
             [export_dir=DIR] [driver_cpus=1] [data_cpus=1] [other Hydra overrides ...]

The keys above are the sweep's; every other argument is a Hydra override, composed and validated
exactly as `bfn train` does. Order of work:

1. compose + validate the base config, check the data, build the space (``tune_spaces``), check
   every key and range (``check_space``) and dry-run the space's corners (each composed onto the
   base config, validated and built on the meta device): a bad space fails before any trial;
2. resources: a trial needs ``driver_cpus`` (the Tune function that drives the TorchTrainer) plus
   ``num_workers x cpus_per_worker``; ``data_cpus`` stay free for Ray Data tasks (without them a
   full cluster hangs instead of failing). An embedded Ray is started with enough logical CPUs for
   the requested concurrency; ``max_concurrent`` is capped by ``ray.cluster_resources()``;
3. each trial composes ``base overrides + sampled values (++key=value) + run.name=<sweep>-<trial
   id>``, opens its MLflow run as a CHILD of the sweep's parent run (tag ``mlflow.parentRunId``)
   and runs ``pipeline.training.driver.fit`` with a ``TuneReportCallback`` that forwards the reports that
   carry the metric; ASHA (time_attr ``step``, the reported optimiser step) stops bad trials;
4. at the end: child runs that Tune's kills left open are closed (stopped trials as KILLED, tag
   ``bfn.stopped_early``; trials that reached max_t as FINISHED); the
   parent run gets ``sweep/summary.csv``, ``sweep/summary.md`` and ``sweep/<metric>_vs_params.png``;
   the best trial's config is written as an override-only experiment preset
   (``pipeline/conf/experiment/best_<sweep>.yaml``, or ``<export_dir>/experiment/...`` used with
   ``hydra.searchpath=[file://<export_dir>]``) and the command to train it is printed.

An interrupted sweep (same ``sweep`` name) continues with ``resume=true``: ``Tuner.restore``
resumes unfinished and errored trials, and each trial's TorchTrainer resumes from its own
checkpoint (same run name, same storage), in the same MLflow child run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, compose, flatten, load, set_env_defaults

# keys of the sweep (not Hydra): name -> (type, default)
OPTIONS: dict[str, tuple[type, Any]] = {
    "space": (str, None),
    "num_samples": (int, 4),
    "max_concurrent": (int, 0),  # 0: as many as the cluster fits
    "metric": (str, "val/nll_bits_per_dim"),
    "mode": (str, "min"),
    "scheduler": (str, "asha"),
    "search": (str, "random"),
    "grace_period": (int, 0),  # 0: max(val_every, log_every)
    "reduction_factor": (int, 2),
    "max_t": (int, 0),  # 0: trainer.max_steps
    "seed": (int, 0),
    "sweep": (str, ""),
    "resume": (bool, False),
    "export_dir": (str, ""),
    "driver_cpus": (float, 1.0),
    "data_cpus": (float, 1.0),
}
# sections that describe the machine, not the experiment: never written into an exported preset
MACHINE_KEYS = ("paths.", "tracking.", "run.storage_path", "run.ray_address", "run.ray_num_cpus",
                "data.uri", "run.name")  # fmt: skip
PINNED_PATH_KEYS = ("paths.root", "paths.data_dir", "paths.runs_dir", "data.uri", "run.storage_path",
                    "tracking.uri", "tracking.artifact_location")  # fmt: skip
SWEEP_TAG, TRIAL_TAG, ROLE_TAG = "bfn.sweep", "bfn.trial_id", "bfn.role"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class SweepOptions:
    space: str
    num_samples: int = 4
    max_concurrent: int = 0
    metric: str = "val/nll_bits_per_dim"
    mode: str = "min"
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 0
    reduction_factor: int = 2
    max_t: int = 0
    seed: int = 0
    sweep: str = ""
    resume: bool = False
    export_dir: str = ""
    driver_cpus: float = 1.0
    data_cpus: float = 1.0


def _parse(key: str, kind: type, text: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: must be {kind.__name__} (got {text!r})") from None


def parse_args(args: list[str]) -> tuple[SweepOptions, list[str]]:
    """Split ``key=value`` sweep options from Hydra overrides; validate the options."""
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, text = arg.partition("=")
        if sep and key in OPTIONS:
            values[key] = _parse(key, OPTIONS[key][0], text)
        else:
            overrides.append(arg)
    if not values.get("space"):
        from tune_spaces import SPACES

        raise ConfigError(f"space: required, one of {', '.join(sorted(SPACES))} (join with '+')")
    opts = SweepOptions(**values)
    checks = [
        (opts.num_samples >= 1, "num_samples", "must be >= 1", opts.num_samples),
        (opts.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0: as many as fit)",
         opts.max_concurrent),
        (opts.mode in ("min", "max"), "mode", "must be min or max", opts.mode),
        (opts.scheduler in ("asha", "fifo"), "scheduler", "must be asha or fifo", opts.scheduler),
        (opts.search in ("random", "optuna"), "search", "must be random or optuna", opts.search),
        (opts.grace_period >= 0, "grace_period", "must be >= 0", opts.grace_period),
        (opts.reduction_factor >= 2, "reduction_factor", "must be >= 2", opts.reduction_factor),
        (opts.max_t >= 0, "max_t", "must be >= 0", opts.max_t),
        (opts.driver_cpus > 0, "driver_cpus", "must be > 0 (Tune cannot place 0-CPU trials)",
         opts.driver_cpus),
        (opts.data_cpus >= 0, "data_cpus", "must be >= 0", opts.data_cpus),
        (not opts.sweep or bool(NAME.match(opts.sweep)), "sweep",
         "must be letters, digits, '-', '_' or '.'", opts.sweep),
    ]  # fmt: skip
    for ok, key, message, value in checks:
        if not ok:
            raise ConfigError(f"{key}: {message} (got {value!r})")
    return opts, overrides


# ------------------------------------------------------------------------------ space checking
def net_constraints(cfg, space: dict) -> tuple[set[str], dict[str, list[str]]]:
    """(extra keys, allowed values) for check_space: the constructor arguments of the networks
    the space can select (net.kwargs.<arg>, data-dependent ones left out) and the presets of the
    config's network kind (net.name)."""
    from bfn.networks import DATA_KEYS, NETWORKS, constructor_args
    from pipeline.config import net_presets
    from tune_spaces.common import support

    presets = net_presets()
    archs = [cfg.net.arch]
    if "net.name" in space:
        info = support(space["net.name"])
        if info["kind"] == "values":
            archs = [presets[n]["arch"] for n in info["values"] if n in presets] or archs
    args = set.intersection(*(set(constructor_args(arch)) - DATA_KEYS for arch in archs))
    allowed = {"net.name": sorted(n for n, p in presets.items() if NETWORKS[p["arch"]].kind == cfg.net.kind)}
    return {f"net.kwargs.{a}" for a in args}, allowed


def check_sweep_space(cfg, space: dict) -> None:
    """check_space plus a dry run of the space's corners: compose onto the base config, validate,
    build on the meta device. Raises ConfigError naming the space problem."""
    import torch

    from pipeline.config import Config
    from pipeline.training.build import build_model
    from tune_spaces.common import apply_to_dict, check_space, corner_samples

    extra, allowed = net_constraints(cfg, space)
    try:
        check_space(space, cfg.raw, extra_keys=extra, allowed_values=allowed)
    except ValueError as error:
        raise ConfigError(f"space: {error}") from None
    builds = any(k.startswith(("net.", "flow.", "data.")) for k in space)
    for sample in corner_samples(space):
        try:
            candidate = Config.from_dict(apply_to_dict(sample, cfg.raw))
            if builds:  # the network and flow only depend on these sections
                with torch.device("meta"):
                    build_model(candidate)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"space: the point {sample} is invalid: {error}") from None


def check_metric(cfg, metric: str) -> None:
    if not metric.startswith(("val/", "train/")):
        raise ConfigError(f"metric: must be a reported val/... or train/... metric (got {metric!r})")
    if metric.startswith("val/nll") and cfg.eval.nll_steps == 0:
        raise ConfigError(f"metric: {metric} needs eval.nll_steps > 0 (the config skips the NLL "
                          f"during training); use metric=val/loss or set eval.nll_steps")  # fmt: skip


# --------------------------------------------------------------------------------- resources
def trial_resources(cfg, opts: SweepOptions) -> dict[str, float]:
    """Logical resources one trial holds: its driver plus its Train workers."""
    workers = cfg.trainer.num_workers
    return {"CPU": opts.driver_cpus + workers * cfg.trainer.cpus_per_worker,
            "GPU": float(workers) if cfg.trainer.use_gpu else 0.0}  # fmt: skip


def fitting_trials(cluster: dict, per_trial: dict[str, float], data_cpus: float) -> int:
    cpus = float(cluster.get("CPU", 0)) - data_cpus
    fits = math.floor(cpus / per_trial["CPU"] + 1e-9) if per_trial["CPU"] else 10**6
    if per_trial["GPU"]:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0)) / per_trial["GPU"] + 1e-9))
    return max(fits, 0)


def start_ray(cfg, opts: SweepOptions, wanted: int) -> dict:
    """Start (or join) Ray with room for ``wanted`` concurrent trials; return its resources."""
    import ray

    from pipeline.training.driver import init_ray

    if not ray.is_initialized() and not cfg.run.ray_address:
        per = trial_resources(cfg, opts)
        need = math.ceil(wanted * per["CPU"] + opts.data_cpus)
        cpus = max(cfg.run.ray_num_cpus or 0, need)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, ray_num_cpus=cpus))
    init_ray(cfg)
    return ray.cluster_resources()


# ---------------------------------------------------------------------------------- the trial
def _metric_callback(metric: str):
    """A TuneReportCallback that forwards only the reports carrying ``metric`` (Tune rejects a
    result without the metric it optimises; training reports before the first validation)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def trial_overrides(settings: dict, config: dict, trial_id: str) -> tuple[list[str], str, dict]:
    """(overrides, run name, extra MLflow tags) of one trial."""
    from tune_spaces.common import to_overrides

    sampled = {k: v for k, v in config.items() if not k.startswith("_")}
    overrides = [*settings["overrides"], *to_overrides(sampled)]
    tags = {SWEEP_TAG: settings["sweep"], TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
    run_name = f"{settings['sweep']}-{trial_id}"
    entry = config.get("_entry")
    if entry is not None:  # a planned run (bfn scaling run): fixed overrides, name and tags
        planned = settings["entries"][entry]
        overrides += planned["overrides"]
        run_name, tags = planned["run_name"], {**tags, **planned["tags"]}
    return [*overrides, f"run.name={run_name}"], run_name, tags


def run_trial(config: dict, settings: dict) -> None:
    """One Tune trial: compose + validate, open the MLflow child run, fit with Tune reporting."""
    from ray import tune

    from pipeline.tracking import MLflowTracker
    from pipeline.training.driver import fit

    set_env_defaults()
    trial_id = tune.get_context().get_trial_id()
    overrides, run_name, tags = trial_overrides(settings, config, trial_id)
    cfg = load(overrides)
    if cfg.tracking.enabled:
        if settings.get("parent_run_id"):
            tags["mlflow.parentRunId"] = settings["parent_run_id"]
        try:  # fit() reopens this run by name, so the tags stay on the run it logs to
            MLflowTracker.start(cfg.tracking.uri, cfg.tracking.experiment, run_name,
                                artifact_location=cfg.tracking.artifact_location, tags=tags)  # fmt: skip
        except Exception as error:  # tracking never stops training
            print(f"[bfn] warning: MLflow child run not created ({error})", file=sys.stderr)
    fit(cfg, callbacks=[_metric_callback(settings["metric"])])


def pin_paths(cfg) -> list[str]:
    """Overrides pinning the driver's absolute paths (Tune trials run in their own folders)."""
    from tune_spaces.common import hydra_value

    flat = flatten(cfg.raw)
    return [f"{k}={hydra_value(flat[k])}" for k in PINNED_PATH_KEYS if flat.get(k) is not None]


def reap_orphan_placement_groups() -> int:
    """Remove the placement groups whose creator actor died (not detached, not yet removed).

    A trial that Tune stops (ASHA) is killed with its TorchTrainer controller; the controller's
    worker placement group outlives it, because Ray only frees a non-detached group when both
    its creator actor AND its job have died, and the job is this sweep. Ray Train's own
    PlacementGroupCleaner finds the cluster through RAY_ADDRESS or by scanning the machine, and
    gives up when several Ray instances run on one machine ("Found multiple active Ray
    instances"): the stopped trials' CPUs then stay reserved and the next trials hang. This
    does the same clean-up from the sweep's driver, through the GCS table (no state API).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    table = state._connect_and_get_accessor().get_placement_group_table()
    for raw in table:
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (data.is_detached or not data.creator_actor_dead
                or data.state == gcs_pb2.PlacementGroupTableData.REMOVED):  # fmt: skip
            continue
        if not data.creator_actor_id or ray.ActorID(data.creator_actor_id).is_nil():
            continue  # created by a driver (Tune's own trial groups): the job owns it
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
        removed += 1
    return removed


def _reaper_callback(every_s: float = 3.0):
    from ray.tune import Callback

    class PlacementGroupReaper(Callback):
        def __init__(self):
            self.last = 0.0
            self.removed = 0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            try:
                self.removed += reap_orphan_placement_groups()
            except Exception as error:  # never stop the sweep over the clean-up
                print(f"[bfn] warning: placement group clean-up failed ({error})", file=sys.stderr)

    return PlacementGroupReaper()


def run_tune(*, name: str, storage_path: str, trainable_settings: dict, param_space: dict,
             num_samples: int, metric: str, mode: str, max_concurrent: int, driver_cpus: float,
             scheduler=None, search_alg=None, resume: bool = False, storage_filesystem=None):  # fmt: skip
    """Run (or restore) the Tune experiment ``storage_path/name`` of ``run_trial``s.

    Tune reserves only the trial's driver (``driver_cpus``); the TorchTrainer inside reserves its
    own workers. ``max_concurrent`` must already account for both (see ``fitting_trials``)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, settings=trainable_settings), {"cpu": driver_cpus}
    )
    path = f"{storage_path.rstrip('/')}/{name}"
    if resume:  # Tune restores the RunConfig (callbacks included) with the experiment
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_filesystem)  # fmt: skip
    else:
        from ray.tune.search import Searcher

        # Tune applies max_concurrent_trials to a Searcher only; a BasicVariantGenerator takes
        # its own max_concurrent (set by the caller)
        limit = max_concurrent if search_alg is None or isinstance(search_alg, Searcher) else None
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                        max_concurrent_trials=limit,
                                        scheduler=scheduler, search_alg=search_alg),  # fmt: skip
            run_config=tune.RunConfig(name=name, storage_path=storage_path,
                                      storage_filesystem=storage_filesystem, verbose=1,
                                      callbacks=[_reaper_callback()]),  # fmt: skip
        )
    return tuner.fit()


def experiment_exists(path: str, storage_filesystem=None) -> bool:
    if "://" not in path and storage_filesystem is None:
        return Path(path).is_dir() and any(Path(path).iterdir())
    from ray import tune

    return tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem)


# ------------------------------------------------------------------------------------- sweep
def sweep(args: list[str]) -> dict:
    """The whole `bfn tune` command; returns a summary (rows, best, paths, parent run id)."""
    set_env_defaults()
    opts, overrides = parse_args(args)
    started = time.perf_counter()
    from pipeline.training.driver import preflight, storage
    from tune_spaces import get_space
    from tune_spaces.common import describe, is_grid

    cfg = load(overrides)
    try:
        space = get_space(opts.space)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_sweep_space(cfg, space)
    check_metric(cfg, opts.metric)
    preflight(cfg)
    if opts.search == "optuna" and any(is_grid(v) for v in space.values()):
        raise ConfigError("search: optuna does not take grid_search entries; use search=random")
    sweep_name = opts.sweep or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cfg.run.name}-{opts.space}")
    grid_size = math.prod(len(v["grid_search"]) for v in space.values() if is_grid(v))
    total = opts.num_samples * grid_size

    storage_path, storage_fs = storage(cfg)
    tune_storage = f"{storage_path.rstrip('/')}/tune"
    exp_path = f"{tune_storage}/{sweep_name}"
    exists = experiment_exists(exp_path, storage_fs)
    if exists and not opts.resume:
        raise ConfigError(f"sweep: {sweep_name} already exists at {exp_path}; pass resume=true to "
                          f"continue it or sweep=<new name>")  # fmt: skip
    if opts.resume and not exists:
        raise ConfigError(f"resume: no sweep {sweep_name} at {exp_path} to resume")

    per_trial = trial_resources(cfg, opts)
    wanted = min(opts.max_concurrent or 2, total)
    cluster = start_ray(cfg, opts, wanted)
    fits = fitting_trials(cluster, per_trial, opts.data_cpus)
    if fits < 1:
        raise ConfigError(
            f"max_concurrent: the Ray cluster has {cluster.get('CPU', 0)} CPUs and "
            f"{cluster.get('GPU', 0)} GPUs; one trial needs {per_trial['CPU']} CPUs and "
            f"{per_trial['GPU']} GPUs plus data_cpus={opts.data_cpus} kept for Ray Data"
        )
    max_concurrent = min(opts.max_concurrent or fits, fits, total)
    if opts.max_concurrent and opts.max_concurrent > fits:
        print(f"[bfn] max_concurrent={opts.max_concurrent} does not fit the cluster "
              f"({cluster.get('CPU')} CPUs, {per_trial['CPU']} per trial + {opts.data_cpus} for "
              f"data); running {max_concurrent} at a time", file=sys.stderr)  # fmt: skip

    parent = _start_parent(cfg, sweep_name, opts, space, overrides)
    settings = {"overrides": [*overrides, *pin_paths(cfg)], "sweep": sweep_name,
                "parent_run_id": parent.run_id if parent else None, "metric": opts.metric}  # fmt: skip
    max_t = opts.max_t or cfg.trainer.max_steps
    scheduler = None
    if opts.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = opts.grace_period or max(cfg.trainer.val_every, cfg.trainer.log_every)
        # a trial that reaches max_t = trainer.max_steps ends by itself (cleanly: its Train run
        # closes its MLflow run and frees its workers) instead of being stopped by ASHA
        scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=min(grace, max_t),
                                  reduction_factor=opts.reduction_factor,
                                  stop_last_trials=max_t < cfg.trainer.max_steps)  # fmt: skip
    search_alg = None
    if opts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=opts.seed)
    else:  # a SearchGenerator: Tune ignores max_concurrent_trials for it, so it gets its own
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=opts.seed, max_concurrent=max_concurrent)
    print(f"[bfn] sweep {sweep_name}: {total} trials, {max_concurrent} at a time, "
          f"{per_trial['CPU']} CPUs each, metric {opts.metric} ({opts.mode}), scheduler "
          f"{opts.scheduler}, search {opts.search}; space "
          f"{ {k: describe(v) for k, v in space.items()} }", flush=True)  # fmt: skip
    grid = run_tune(name=sweep_name, storage_path=tune_storage, trainable_settings=settings,
                    param_space=space, num_samples=opts.num_samples, metric=opts.metric,
                    mode=opts.mode, max_concurrent=max_concurrent, driver_cpus=opts.driver_cpus,
                    scheduler=scheduler, search_alg=search_alg, resume=opts.resume,
                    storage_filesystem=storage_fs)  # fmt: skip

    rows = collect_rows(grid, space, opts.metric, max_t)
    close_children(cfg, sweep_name, rows)
    best = pick_best(rows, opts.mode)
    out_dir = Path(cfg.raw["paths"]["runs_dir"]) / "sweeps" / sweep_name
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_summary(rows, space, opts.metric, out_dir, best, opts.mode)
    files["plot"] = plot_sweep(rows, space, opts.metric, out_dir / f"{_safe(opts.metric)}_vs_params.png",
                               best)  # fmt: skip
    export = command = None
    if best is not None:
        best_overrides = trial_overrides(settings, best["config"], best["trial_id"])[0]
        export, command = export_preset(best_overrides, sweep_name, opts.export_dir or None,
                                        user_overrides=overrides)  # fmt: skip
    wall = time.perf_counter() - started
    if parent is not None:
        _finish_parent(parent, rows, best, files, export, opts.metric, wall)
    stopped = [r for r in rows if r["status"] == "stopped"]
    print(f"\n[bfn] sweep {sweep_name} done in {wall:.0f} s: {len(rows)} trials, "
          f"{len(stopped)} stopped early by {opts.scheduler}, "
          f"{sum(r['status'] == 'error' for r in rows)} errored", flush=True)  # fmt: skip
    print((out_dir / "summary.md").read_text())
    if best is not None:
        print(f"[bfn] best trial {best['trial_id']}: {opts.metric} = {best['metric']:.4f}")
        print(f"[bfn] preset written to {export}\n[bfn] train it: {command}", flush=True)
    return {"sweep": sweep_name, "path": exp_path, "rows": rows, "best": best, "export": export,
            "command": command, "parent_run_id": parent.run_id if parent else None,
            "files": {k: str(v) for k, v in files.items()}, "wall_s": wall,
            "max_concurrent": max_concurrent}  # fmt: skip


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _start_parent(cfg, sweep_name: str, opts: SweepOptions, space: dict, overrides: list[str]):
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking import MLflowTracker, git_sha
    from tune_spaces.common import describe

    try:
        parent = MLflowTracker.start(cfg.tracking.uri, cfg.tracking.experiment, f"sweep-{sweep_name}",
                                     artifact_location=cfg.tracking.artifact_location,
                                     tags={SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"})  # fmt: skip
    except Exception as error:
        print(f"[bfn] warning: MLflow unavailable ({error}); the sweep runs untracked", file=sys.stderr)
        return None
    params = {f"tune.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params.update({f"space.{k}": describe(v) for k, v in space.items()})
    params["tune.overrides"] = " ".join(overrides)
    parent.log_params(params)
    parent.set_tags({"git_sha": git_sha(), "mlflow.note.content": f"bfn tune sweep {sweep_name}: "
                     f"{' '.join(overrides)} space={opts.space}"})  # fmt: skip
    return parent


def collect_rows(grid, space: dict, metric: str, max_t: int) -> list[dict]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(str(result.path)).name
        value = metrics.get(metric)
        step = metrics.get("step")
        if result.error is not None:
            status = "error"
        elif step is not None and step < max_t:
            status = "stopped"
        else:
            status = "completed"
        config = {k: v for k, v in (result.config or {}).items()}
        rows.append({"trial_id": trial_id, "status": status, "step": step,
                     "metric": float(value) if isinstance(value, int | float) else float("nan"),
                     "config": config, "params": {k: config.get(k) for k in space},
                     "error": str(result.error)[:300] if result.error else None})  # fmt: skip
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pick_best(rows: list[dict], mode: str) -> dict | None:
    """The best finite metric, preferring trials that ran to max_t over stopped ones."""
    finite = [r for r in rows if math.isfinite(r["metric"]) and r["status"] != "error"]
    if not finite:
        return None
    sign = 1 if mode == "min" else -1
    return min(finite, key=lambda r: (r["status"] != "completed", sign * r["metric"]))


def close_children(cfg, sweep_name: str, rows: list[dict]) -> None:
    """Attach MLflow run ids and close the runs Tune's kills left RUNNING: stopped trials as
    KILLED (tagged bfn.stopped_early), trials that reached max_t as FINISHED, errors as FAILED."""
    for row in rows:
        row["mlflow_run_id"] = None
    if not cfg.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'trial'",
                              max_results=10_000)  # fmt: skip
    by_trial = {r.data.tags.get(TRIAL_TAG): r for r in runs}
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "bfn.trial_status", row["status"])
        if row["status"] == "stopped":
            client.set_tag(run.info.run_id, "bfn.stopped_early", f"step {row['step']}")
        if run.info.status == "RUNNING":
            # Tune stops a trial at its last report too (ASHA at max_t), before fit() can close
            # the run: its metrics are already logged (they are sent before each report)
            status = {"error": "FAILED", "stopped": "KILLED", "completed": "FINISHED"}[row["status"]]
            if status == "FINISHED":
                client.set_tag(run.info.run_id, "bfn.final_step", str(row["step"]))
            client.set_terminated(run.info.run_id, status)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(rows: list[dict], space: dict, metric: str, out_dir: Path, best,
                  mode: str = "min") -> dict:
    keys = list(space)
    header = ["trial_id", "status", "step", metric, *keys, "mlflow_run_id"]
    table = [[r["trial_id"], r["status"], r["step"], r["metric"], *[r["params"][k] for k in keys],
              r.get("mlflow_run_id")] for r in rows]  # fmt: skip
    csv_path = out_dir / "summary.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    sign = 1 if mode == "min" else -1
    order = sorted(range(len(rows)), key=lambda i: (not math.isfinite(rows[i]["metric"]),
                                                    sign * rows[i]["metric"]))  # fmt: skip
    lines = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    for i in order:
        mark = " **best**" if best is not None and rows[i]["trial_id"] == best["trial_id"] else ""
        lines.append("| " + " | ".join(_fmt(v) for v in table[i][:-1]) + mark + " |")
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    json_path = out_dir / "summary.json"
    json_path.write_text(json.dumps({"rows": rows, "best": best}, indent=1, default=str))
    return {"csv": csv_path, "markdown": md_path, "json": json_path}


def plot_sweep(rows: list[dict], space: dict, metric: str, path: Path, best) -> Path:
    """One panel per searched key: the metric against the sampled value (log x for log domains);
    filled = ran to the end, hollow = stopped early, star = best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tune_spaces.common import is_log_scale, support

    keys = [k for k in space if support(space[k])["kind"] != "values"
            or len(set(map(str, support(space[k])["values"]))) > 1] or list(space)  # fmt: skip
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = [r["params"][key] for r in rows]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        for x, row in zip(xs, rows, strict=True):
            if not math.isfinite(row["metric"]):
                continue
            done = row["status"] == "completed"
            ax.scatter([x], [row["metric"]], s=40, facecolors="C0" if done else "none",
                       edgecolors="C0" if done else "C3", zorder=3)  # fmt: skip
            if best is not None and row["trial_id"] == best["trial_id"]:
                ax.scatter([x], [row["metric"]], marker="*", s=220, color="gold",
                           edgecolors="k", zorder=4)  # fmt: skip
        if numeric and is_log_scale(space[key]):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle("filled: ran to max_t   hollow red: stopped early   star: best", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finish_parent(parent, rows, best, files, export, metric, wall) -> None:
    for path in files.values():
        parent.log_artifact(path, "sweep")
    tags = {"bfn.trials": len(rows), "bfn.trials_stopped_early": sum(r["status"] == "stopped" for r in rows),
            "bfn.trials_errored": sum(r["status"] == "error" for r in rows), "bfn.sweep_wall_s": round(wall, 1)}
    if best is not None:
        tags.update({"bfn.best_trial": best["trial_id"], "bfn.best_run_id": best.get("mlflow_run_id"),
                     "bfn.best_preset": export})  # fmt: skip
        parent.log_metrics({f"best/{metric}": best["metric"]}, step=0)
        if export:
            parent.log_artifact(export, "sweep")
    parent.set_tags(tags)
    parent.finish()


# ---------------------------------------------------------------------------- preset export
def _choices(overrides: list[str]) -> dict[str, str]:
    """Hydra's group choices (data, net, ...) of a composition."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _experiment_keys(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not k.startswith(MACHINE_KEYS)}


def preset_yaml(overrides: list[str], preset_name: str, *, searchpath: list[str] = ()) -> str:
    """An override-only experiment preset reproducing the config composed from ``overrides``
    (machine keys aside): group overrides where the choice differs from train.yaml's defaults,
    then every value that differs from that group composition."""
    import yaml

    groups = ("data", "flow", "net", "optim", "trainer", "eval")
    target = _choices(overrides)
    default = _choices(list(searchpath))
    changed = {g: target[g] for g in groups if target.get(g) != default.get(g)}
    base = flatten(compose([*searchpath, *(f"{g}={c}" for g, c in changed.items())]))
    best = flatten(compose(overrides))
    diff = {k: v for k, v in _experiment_keys(best).items()
            if base.get(k, object()) != v and not (isinstance(v, dict) and not v)}  # fmt: skip
    body = {"defaults": [{f"override /{g}": c} for g, c in changed.items()]} if changed else {}
    body.update(_unflatten({**diff, "run.name": preset_name}))
    header = (f"# @package _global_\n# Best trial of a `bfn tune` sweep, written by pipeline/tune.py.\n"
              f"# Composed from: {' '.join(o for o in overrides if not o.startswith(PINNED_PATH_KEYS))}\n")
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def export_preset(overrides: list[str], sweep_name: str, export_dir: str | None,
                  *, user_overrides: list[str] = ()) -> tuple[str, str]:  # fmt: skip
    """Write best_<sweep>.yaml and check that composing it reproduces the trial's config.
    Returns (path, the `bfn train` command)."""
    from pipeline.config import CONF_DIR

    preset_name = "best_" + re.sub(r"[^A-Za-z0-9_]", "_", sweep_name)
    searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
    if export_dir:
        root = Path(export_dir).expanduser().resolve()
        searchpath = [f"hydra.searchpath=[file://{root}]"]
    else:
        root = CONF_DIR
    path = root / "experiment" / f"{preset_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)  # before composing: Hydra checks the searchpath
    text = preset_yaml(overrides, preset_name, searchpath=searchpath)
    previous = path.read_text() if path.exists() else None
    path.write_text(text)
    # round trip: the preset composes to the trial's experiment (machine keys aside)
    machine = [o for o in overrides if o.startswith(PINNED_PATH_KEYS)]
    want = _experiment_keys(flatten(compose(overrides)))
    got = _experiment_keys(flatten(compose([*searchpath, f"experiment={preset_name}", *machine])))
    if want != got:
        if previous is None:
            path.unlink()
        else:
            path.write_text(previous)
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ConfigError(f"export: the preset would not reproduce the best trial ({wrong})")
    keep = [o for o in user_overrides if o.split("=")[0].lstrip("+~") in ("tracking", "paths")
            or o.split("=")[0].lstrip("+~").startswith(MACHINE_KEYS)]  # fmt: skip
    keep = [o for o in keep if not o.startswith("run.name")]
    command = " ".join(["bfn train", *searchpath, f"experiment={preset_name}", *keep])
    return str(path), command


# --------------------------------------------------------------------------------------- CLI
def cmd_tune(args) -> int:
    sweep(list(args.args))
    return 0


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser(
        "tune", help="hyper-parameter sweep (Ray Tune: ASHA, random/Optuna) over bfn train",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*",
                   help="space=NAME num_samples=N [max_concurrent= metric= mode= scheduler= "
                        "search= grace_period= reduction_factor= max_t= seed= sweep= resume= "
                        "export_dir= driver_cpus= data_cpus=] and Hydra overrides")  # fmt: skip
    p.set_defaults(func=cmd_tune)

"""`bfn tune`: hyper-parameter sweeps with Ray Tune over the same training path as `bfn train`.

    bfn tune experiment=smoke space=optim_short num_samples=8 [max_concurrent=2]
             [metric=val/nll_bits_per_dim] [mode=min] [scheduler=asha|fifo] [search=random|optuna]
             [grace_period=..] [reduction_factor=2] [max_t=..] [seed=0] [sweep=NAME] [resume=true]
             [trust_storage=false] [export_dir=DIR] [driver_cpus=1] [data_cpus=1] [other Hydra overrides ...]

The keys above are the sweep's; every other argument is a Hydra override, composed and validated
exactly as `bfn train` does. Order of work:

1. compose + validate the base config, check the data, build the space (``tune_spaces``) and
   check it against the config (``spaces``: keys, then every value through the config's own
   validation, then the space's corners built on the meta device), and check the metric: a
   search over flow.beta_1 or flow.sigma_1 must rank by an NLL bound. A bad space fails before
   any trial;
2. resources (``runner.concurrency``): a trial needs ``driver_cpus`` plus ``num_workers x
   cpus_per_worker``, and ``data_cpus`` stay free for Ray Data; ``max_concurrent`` is capped by
   what the cluster fits;
3. the trials (``runner``): each composes ``base overrides + sampled values + run.name=<sweep>-<trial
   id>``, opens its MLflow run as a child of the sweep's parent run and trains; ASHA (time_attr
   ``step``) stops bad trials;
4. at the end: runs Tune's kills left open are closed (``store``), the parent run gets
   ``sweep/summary.csv``, ``summary.md`` and ``<metric>_vs_params.png`` (``reports``), the best
   trial becomes an experiment preset (``export``) and the command to train it is printed, and its
   model is registered as ``models:/<sweep>@champion`` (``store.register_best``).

An interrupted sweep (same ``sweep`` name) continues with ``resume=true``: ``Tuner.restore``
resumes unfinished and errored trials, each trial's TorchTrainer resumes from its own checkpoint,
in the same MLflow child run. Tune restores with pickle, so the sweep's storage must be trusted:
the resume first checks the stored state against the sha256 recorded in the parent run
(``tune_state``) and refuses on any difference (``trust_storage=true`` skips that check).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from pipeline.config import Config, ConfigError, load, set_env_defaults
from pipeline.sweeps import reports, store, tune_state
from pipeline.sweeps.export import export_preset
from pipeline.sweeps.store import masked
from pipeline.training.driver import preflight
from pipeline.training.ray_runtime import secure_local_ray
from pipeline.training.resume import storage

log = logging.getLogger(__name__)

# keys of the sweep (not Hydra): name -> type; defaults in SweepOptions
OPTIONS: dict[str, type] = {
    "space": str,
    "num_samples": int,
    "max_concurrent": int,
    "metric": str,
    "mode": str,
    "scheduler": str,
    "search": str,
    "grace_period": int,
    "reduction_factor": int,
    "max_t": int,
    "seed": int,
    "sweep": str,
    "resume": bool,
    "trust_storage": bool,
    "export_dir": str,
    "driver_cpus": float,
    "data_cpus": float,
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass
class SweepOptions:
    space: str
    num_samples: int = 4
    max_concurrent: int = 0  # 0: as many as the cluster fits
    metric: str = "val/nll_bits_per_dim"  # an NLL bound: comparable across accuracy schedules
    mode: str = "min"
    scheduler: str = "asha"
    search: str = "random"
    grace_period: int = 0  # 0: max(val_every, log_every)
    reduction_factor: int = 2
    max_t: int = 0  # 0: trainer.max_steps
    seed: int = 0
    sweep: str = ""
    resume: bool = False
    trust_storage: bool = False  # resume without checking the Tune state's recorded sha256
    export_dir: str = ""  # "": <paths.runs_dir>/presets
    driver_cpus: float = 1.0
    data_cpus: float = 1.0


def _typed(key: str, kind: type, value: Any) -> Any:
    """A sweep option's value as Hydra's grammar parsed it, checked against the option's type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # e.g. sweep=2024
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: must be {kind.__name__} (got {value!r})")
    return value


def parse_args(args: list[str]) -> tuple[SweepOptions, list[str]]:
    """Split ``key=value`` sweep options from Hydra overrides (both read by Hydra's override parser);
    validate the options."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
    except HydraException as error:
        raise ConfigError(f"override: {error}".replace("\n", " ")) from None
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for arg, override in zip(args, parsed, strict=True):
        key = override.key_or_group
        if key in OPTIONS and override.type.name == "CHANGE" and not override.is_sweep_override():
            values[key] = _typed(key, OPTIONS[key], override.value())
        else:
            overrides.append(arg)
    if not values.get("space"):
        from tune_spaces import SPACES  # lazy: tune_spaces imports ray (see prepare)

        raise ConfigError(f"space: required, one of {', '.join(sorted(SPACES))} (join with '+')")
    opts = SweepOptions(**values)
    checks = [
        (opts.num_samples >= 1, "num_samples", "must be >= 1", opts.num_samples),
        (opts.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0: as many as fit)", opts.max_concurrent),
        (opts.mode in ("min", "max"), "mode", "must be min or max", opts.mode),
        (opts.scheduler in ("asha", "fifo"), "scheduler", "must be asha or fifo", opts.scheduler),
        (opts.search in ("random", "optuna"), "search", "must be random or optuna", opts.search),
        (opts.grace_period >= 0, "grace_period", "must be >= 0", opts.grace_period),
        (opts.reduction_factor >= 2, "reduction_factor", "must be >= 2", opts.reduction_factor),
        (opts.max_t >= 0, "max_t", "must be >= 0", opts.max_t),
        (opts.driver_cpus > 0, "driver_cpus", "must be > 0 (Tune cannot place 0-CPU trials)", opts.driver_cpus),
        (opts.data_cpus >= 0, "data_cpus", "must be >= 0", opts.data_cpus),
        (
            not opts.sweep or bool(NAME.match(opts.sweep)),
            "sweep",
            "must be letters, digits, '-', '_' or '.'",
            opts.sweep,
        ),
    ]
    for ok, key, message, value in checks:
        if not ok:
            raise ConfigError(f"{key}: {message} (got {value!r})")
    return opts, overrides


# ------------------------------------------------------------------------------- before Ray
def prepare(opts: SweepOptions, cfg: Config) -> dict:
    """The search space, checked with the metric against the composed config; the data checked too."""
    # lazy: build_parser imports this module for every command, and commands without Ray never import it;
    # these import ray (tune_spaces: ray.tune domains)
    from pipeline.sweeps.spaces import check_objective, check_space
    from tune_spaces import get_space
    from tune_spaces.common import is_grid

    try:
        space = get_space(opts.space)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_space(cfg, space)
    check_objective(opts.metric, space)
    preflight(cfg)
    if opts.search == "optuna" and any(is_grid(v) for v in space.values()):
        raise ConfigError("search: optuna does not take grid_search entries; use search=random")
    return space


@dataclasses.dataclass(frozen=True)
class Location:
    name: str  # the sweep's name: Tune experiment, MLflow parent run sweep-<name>, trial run prefix
    storage: str  # the Tune experiments' folder (run.storage_path/tune)
    path: str  # this sweep's Tune experiment folder
    filesystem: Any  # pyarrow filesystem of ``path`` (None: inferred from the path)
    state: dict[str, str] | None = None  # resume: the state files restored (checked or trusted), path -> sha256


def locate(cfg, opts: SweepOptions) -> Location:
    """Where the sweep's Tune state lives; refuse a name clash, a resume of nothing, and a resume
    whose state differs from the sha256 recorded in MLflow."""
    from pipeline.sweeps import runner  # lazy: imports ray (see prepare)

    name = opts.sweep or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cfg.run.name}-{opts.space}")
    storage_path, filesystem = storage(cfg)
    tune_storage = f"{storage_path.rstrip('/')}/tune"
    path = f"{tune_storage}/{name}"
    exists = runner.experiment_exists(path, filesystem)
    if exists and not opts.resume:
        raise ConfigError(
            f"sweep: {name} already exists at {path}; pass resume=true to continue it or sweep=<new name>"
        )
    if opts.resume and not exists:
        raise ConfigError(f"resume: no sweep {name} at {path} to resume")
    state = None
    if opts.resume and not opts.trust_storage:
        state = tune_state.verify(cfg, name, path, filesystem)
    elif opts.resume:
        log.warning("trust_storage=true: restoring %s without checking its recorded sha256", path)
        state = tune_state.state_files(path, filesystem)
    return Location(name, tune_storage, path, filesystem, state)


# -------------------------------------------------------------------------------- the sweep
def _scheduler(cfg, opts: SweepOptions, max_t: int):
    if opts.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler  # lazy: see prepare

    grace = opts.grace_period or max(cfg.trainer.val_every, cfg.trainer.log_every)
    # a trial that reaches max_t = trainer.max_steps ends by itself (cleanly: its Train run
    # closes its MLflow run and frees its workers) instead of being stopped by ASHA
    return ASHAScheduler(
        time_attr="step",
        max_t=max_t,
        grace_period=min(grace, max_t),
        reduction_factor=opts.reduction_factor,
        stop_last_trials=max_t < cfg.trainer.max_steps,
    )


def _search_alg(opts: SweepOptions, max_concurrent: int):
    if opts.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # lazy: see prepare (and optuna: only for search=optuna)

        return OptunaSearch(seed=opts.seed)
    # a SearchGenerator: Tune ignores max_concurrent_trials for it, so it gets its own
    from ray.tune.search import BasicVariantGenerator  # lazy: see prepare

    return BasicVariantGenerator(random_state=opts.seed, max_concurrent=max_concurrent)


def _parent_params(opts: SweepOptions, space: dict, overrides: list[str]) -> dict:
    from tune_spaces.common import describe  # lazy: see prepare

    params = {f"tune.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params.update({f"space.{k}": describe(v) for k, v in space.items()})
    params["tune.overrides"] = " ".join(overrides)
    return params


def run(cfg, opts: SweepOptions, space: dict, overrides: list[str], where: Location):
    """Start the parent run and Ray, run (or restore) the trials; (settings, parent, results, max_concurrent)."""
    # lazy: see prepare
    from pipeline.sweeps import runner
    from tune_spaces.common import describe, is_grid

    total = opts.num_samples * math.prod(len(v["grid_search"]) for v in space.values() if is_grid(v))
    max_concurrent = runner.concurrency(
        cfg, driver_cpus=opts.driver_cpus, data_cpus=opts.data_cpus, requested=opts.max_concurrent, total=total
    )
    note = f"bfn tune sweep {where.name}: {' '.join(overrides)} space={opts.space}"
    parent = store.start_parent(cfg, where.name, _parent_params(opts, space, overrides), note, resume=opts.resume)
    settings = runner.TrialSettings(
        overrides=[*overrides, *runner.pin_paths(cfg)],
        sweep=where.name,
        metric=opts.metric,
        parent_run_id=parent.run_id if parent else None,
    )
    log.info(
        "sweep %s: %d trials, %d at a time, %s CPUs each, metric %s (%s), scheduler %s, search %s; space %s",
        where.name,
        total,
        max_concurrent,
        runner.trial_resources(cfg, opts.driver_cpus)["CPU"],
        opts.metric,
        opts.mode,
        opts.scheduler,
        opts.search,
        {k: describe(v) for k, v in space.items()},
    )
    max_t = opts.max_t or cfg.trainer.max_steps
    uri = cfg.tracking.uri if parent else None
    with runner.recording_state(uri, settings.parent_run_id, where.path, where.filesystem, base=where.state):
        grid = runner.run_tune(
            name=where.name,
            storage_path=where.storage,
            settings=settings,
            param_space=space,
            num_samples=opts.num_samples,
            metric=opts.metric,
            mode=opts.mode,
            max_concurrent=max_concurrent,
            driver_cpus=opts.driver_cpus,
            scheduler=_scheduler(cfg, opts, max_t),
            search_alg=_search_alg(opts, max_concurrent),
            resume=opts.resume,
            storage_filesystem=where.filesystem,
        )
    return settings, parent, collect_rows(grid, space, opts.metric, max_t), max_concurrent


def collect_rows(grid, space: dict, metric: str, max_t: int) -> list[dict]:
    """One row per trial of Tune's ResultGrid: id, status (completed, stopped, error), last step,
    metric, sampled values."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        value, step = metrics.get(metric), metrics.get("step")
        if result.error is not None:
            status = "error"
        elif step is not None and step < max_t:
            status = "stopped"
        else:
            status = "completed"
        config = dict(result.config or {})
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(str(result.path)).name,
                "status": status,
                "step": step,
                "metric": float(value) if isinstance(value, int | float) else float("nan"),
                "config": config,
                "params": {k: config.get(k) for k in space},
                "error": str(result.error)[:300] if result.error else None,
            }
        )
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pick_best(rows: list[dict], mode: str) -> dict | None:
    """The best finite metric, preferring trials that ran to max_t over stopped ones."""
    finite = [r for r in rows if math.isfinite(r["metric"]) and r["status"] != "error"]
    if not finite:
        return None
    sign = 1 if mode == "min" else -1
    return min(finite, key=lambda r: (r["status"] != "completed", sign * r["metric"]))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def report(cfg, opts: SweepOptions, space: dict, overrides: list[str], where: Location, settings, rows) -> dict:
    """Close the trial runs, write the summary and plot, export the best trial as a preset."""
    from pipeline.sweeps import runner  # lazy: see prepare

    try:
        store.close_trial_runs(cfg, where.name, rows)
    except Exception as error:  # the sweep's results still get written
        log.warning("could not close the trials' MLflow runs (%s)", store.masked(error))
    best = pick_best(rows, opts.mode)
    out_dir = Path(cfg.paths.runs_dir) / "sweeps" / where.name
    out_dir.mkdir(parents=True, exist_ok=True)
    files = reports.write_summary(rows, space, opts.metric, out_dir, best, opts.mode)
    files["plot"] = reports.plot_sweep(rows, space, opts.metric, out_dir / f"{_safe(opts.metric)}_vs_params.png", best)
    export = command = registered = None
    if best is not None:
        best_overrides = runner.trial_overrides(settings, best["config"], best["trial_id"])[0]
        registered = store.register_best(load(best_overrides), where.name, best.get("mlflow_run_id"))
        export, command = export_preset(
            best_overrides,
            where.name,
            opts.export_dir or str(Path(cfg.paths.runs_dir) / "presets"),
            user_overrides=overrides,
        )
    return {"best": best, "files": files, "export": export, "command": command, "registered": registered}


def sweep(args: list[str]) -> dict:
    """The whole `bfn tune` command; returns a summary (rows, best, paths, parent run id)."""
    set_env_defaults()
    opts, overrides = parse_args(args)
    started = time.perf_counter()
    cfg = load(overrides)
    secure_local_ray(cfg)  # before ray is imported: an embedded runtime then binds loopback only
    space = prepare(opts, cfg)
    where = locate(cfg, opts)
    settings, parent, rows, max_concurrent = run(cfg, opts, space, overrides, where)
    out = report(cfg, opts, space, overrides, where, settings, rows)
    wall = time.perf_counter() - started
    if parent is not None:
        store.finish_parent(parent, rows, out["best"], out["files"], out["export"], opts.metric, wall)
    stopped = sum(r["status"] == "stopped" for r in rows)
    log.info(
        "sweep %s done in %.0f s: %d trials, %d stopped early by %s, %d errored",
        where.name,
        wall,
        len(rows),
        stopped,
        opts.scheduler,
        sum(r["status"] == "error" for r in rows),
    )
    print(Path(out["files"]["markdown"]).read_text(), flush=True)
    if out["best"] is not None:
        print(
            f"best trial {out['best']['trial_id']}: {opts.metric} = {out['best']['metric']:.4f}\n"
            f"preset written to {out['export']}\ntrain it: {store.masked(out['command'])}",
            flush=True,
        )
    if out["registered"] is not None:
        print(f"its model: models:/{where.name}@champion (version {out['registered']})", flush=True)
    return {
        "sweep": where.name,
        "path": where.path,
        "rows": rows,
        "best": out["best"],
        "export": out["export"],
        "command": out["command"],
        "parent_run_id": parent.run_id if parent else None,
        "files": {k: str(v) for k, v in out["files"].items()},
        "wall_s": wall,
        "max_concurrent": max_concurrent,
        "registered_version": out["registered"],
    }


# --------------------------------------------------------------------------------------- CLI
def cmd_tune(args) -> int:
    from mlflow.exceptions import MlflowException  # lazy: mlflow adds ~1.2 s to every `bfn` command

    try:
        sweep(list(args.args))
    except MlflowException as error:  # its text may hold the tracking URI's credentials
        print(f"bfn: error: MLflow: {masked(error)}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="hyper-parameter sweep (Ray Tune: ASHA, random/Optuna) over bfn train",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "args",
        nargs="*",
        help="space=NAME num_samples=N [max_concurrent= metric= mode= scheduler= search= grace_period= "
        "reduction_factor= max_t= seed= sweep= resume= trust_storage= export_dir= driver_cpus= "
        "data_cpus=] and Hydra overrides",
    )
    p.set_defaults(func=cmd_tune)

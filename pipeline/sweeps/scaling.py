"""`bfn scaling plan | run | fit`: scaling laws of BFN loss in model size N, data D and compute C.
Longer than 500 lines: the two planners (grid, IsoFLOP), the runner and the fit of one command share helpers.

    bfn scaling plan [--name G] [--widths 8,16,24] [--depths 1] [--steps 200,400] [--fractions 1]
                     [--out PLAN.json] experiment=mnist_local [overrides ...]
    bfn scaling plan --isoflop --budgets 1e14,3e14,1e15 [--sizes 5] [--tokens-per-param 20] [--name G]
                     [--out PLAN.json] experiment=mnist_local [overrides ...]
    bfn scaling run PLAN.json [--concurrent K] [--force]
    bfn scaling fit [--name G] [--budget FLOPS] [--bootstrap 200] [--data-axis seen|unique]
                    [--compute 6ND|measured] [--out DIR] [overrides: tracking.uri=... ...]

(options first, then Hydra overrides.)

One MLflow run per grid point, tagged ``bfn.scaling=<grid>``; its numbers are params
(``store.grid_params``) and its result a metric:

* ``scaling.N``: non-embedding parameters, ``bfn.networks.count_parameters(net, non_embedding=True)``
  of the preset scaled in width (``net.kwargs.<width>``) and depth (``net.kwargs.<depth>``);
  the width/depth arguments per family are ``tune_spaces.architecture.FAMILIES``.
* ``scaling.D``: data dimensions seen, ``max_steps x batch_size x dims per example`` (pixels x
  channels, or characters); ``scaling.D_unique``: dimensions of the distinct training rows
  (``data.fraction x train rows x dims``). ``--data-axis unique`` fits against the latter.
* ``scaling.C = 6 N D``: training FLOPs, forward (2 N per dimension) + backward (4 N). This is
  the transformer estimate (Kaplan et al. 2020), which counts each weight once per token; a
  convolution applies each weight at every position of its resolution level, so for the U-Nets
  6ND is a convention rather than a count. ``scaling.C_measured`` is the counted alternative:
  3 x the forward FLOPs of one example (``torch.utils.flop_counter`` on the meta device; matmuls
  and convolutions) x examples seen. For the tiny MNIST U-Net the counted forward is ~0.4 x
  2N x dims, for the small text8 transformer ~1.3 x (attention). ``--compute measured`` fits
  L(C) on it.
* metric ``scaling/nll``: the final validation NLL, an NLL bound (``val/nll_bits_per_dim``;
  with ``eval.nll_steps`` 0 the continuous-time NLL, L∞ + reconstruction), named in the param
  ``scaling.nll_metric``.

The fit itself (``fit``, pure): L(N, D) = E + A / N^alpha + B / D^beta and L(C) = E + A / C^gamma
with bootstrap intervals, and the compute-optimal split of a budget. Too few runs (fewer than
free parameters + 1) or a non-finite NLL are rejected with a message. Grid points run one after
another (``fit`` calls) or ``--concurrent`` at a time as Tune trials (``runner``).

IsoFLOP (``--isoflop``, ``make_isoflop_plan``; Hoffmann et al. 2022): per training budget C (6ND as
above; evaluation FLOPs are not included, ``C_measured`` and the eval config state those), ``--sizes``
widths at the config's depth, spread over a factor 16 in log N around N_opt = sqrt(C / (6 r)) with
r = ``--tokens-per-param`` (D/N, Chinchilla's 20), each trained for round(C / (6 N batch dims)) steps
(the realised C within 5% of the budget, or the plan is refused). Each run keeps its budget as the
param ``scaling.budget``, and ``fit`` then reports two estimates of N_opt ~ C^a side by side:
Approach 2 (a parabola of L in log N per budget, its vertex, a power law over budgets; off-centre
budgets reported and left out) and Approach 3 (a = beta / (alpha + beta) of the L(N, D) fit).

``run`` registers the model of the point with the lowest final NLL as ``models:/<grid>@champion``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bfn.networks import count_parameters
from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, load, set_env_defaults
from pipeline.core.build import build_model
from pipeline.sweeps import reports, store
from pipeline.sweeps.fit import (
    ScalingError,
    compute_optimal,
    fit_isoflop,
    fit_law,
    implied_exponents,
    law,
    predict_budget,
)
from pipeline.sweeps.reports import plan_table
from pipeline.training.driver import fit
from pipeline.training.resume import storage

log = logging.getLogger(__name__)
NLL_METRIC = "val/nll_bits_per_dim"  # an NLL bound in every setup (continuous-time when nll_steps is 0)
__all__ = ["ScalingError", "compute_optimal", "fit_grid", "law", "make_plan", "measure", "run_plan", "write_plan"]


# ============================================================================ plan
def _forward_flops(model, cfg) -> int:
    """Counted forward FLOPs (matmul/conv) of the network on one example, on the meta device."""
    shape = cfg.data.data_shape
    with torch.device("meta"):
        text = cfg.data.seq_len is not None  # the transformer takes probabilities (B, L, K)
        x = torch.zeros(1, shape[0], cfg.flow.num_classes) if text else torch.zeros(1, *shape)
        with FlopCounterMode(display=False) as counter:
            model.net(x, torch.zeros(1))
    return int(counter.get_total_flops())


def measure(cfg, train_rows: int | None = None) -> dict[str, Any]:
    """N, D, D_unique, C, C_measured of a validated config (network built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model.net, non_embedding=True)
    dims = int(np.prod(cfg.data.data_shape))
    examples = cfg.trainer.max_steps * cfg.data.batch_size
    d = examples * dims
    fwd = _forward_flops(model, cfg)
    unique = None if train_rows is None else int(round(cfg.data.fraction * train_rows)) * dims
    return {
        "N": n,
        "N_total": count_parameters(model.net),
        "D": d,
        "D_unique": unique,
        "C": 6.0 * n * d,
        "C_measured": 3.0 * fwd * examples,
        "forward_flops": fwd,
        "dims_per_example": dims,
        "examples_seen": examples,
    }


def _axes(cfg, overrides, widths, depths, steps, fractions) -> tuple[str, dict, list]:
    """(family, its FAMILIES entry, the grid's axes) with the config's own values as defaults. A pinned
    argument the user sets explicitly (``net.kwargs.norm_groups=4``: finer widths) replaces the family's."""
    # lazy: build_parser imports this module for every command, and commands without Ray never import it
    from tune_spaces.architecture import FAMILIES, family_of  # (tune_spaces imports ray.tune)

    family = family_of(cfg.net.name)
    if family is None:
        raise ScalingError(f"net.name={cfg.net.name} has no width/depth family; one of {', '.join(FAMILIES)}")
    info = FAMILIES[family]
    explicit = _given_keys(overrides)
    pinned = {k: cfg.net.kwargs[k] if f"net.kwargs.{k}" in explicit else v for k, v in info["pinned"].items()}
    info = {**info, "pinned": pinned}
    depth = cfg.net.kwargs[info["depth"]]
    return (
        family,
        info,
        [
            list(widths or info["widths"]),
            list(depths or [depth]),
            list(steps or [cfg.trainer.max_steps]),
            list(fractions or [cfg.data.fraction]),
        ],
    )


def _given_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys the overrides give a value (Hydra's + and ++ prefixes dropped)."""
    return {re.sub(r"^\+*", "", o.split("=", 1)[0]) for o in overrides if "=" in o}


def make_plan(
    name: str,
    overrides: Sequence[str],
    *,
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
) -> dict:
    """The grid (width x depth x steps x fraction) over a base config, with N, D, C per point."""
    cfg = _load_plan_config(name, overrides)
    family, info, axes = _axes(cfg, overrides, widths, depths, steps, fractions)
    train_rows = _train_rows(cfg)
    entries = [
        _entry(cfg, info, int(width), int(depth), int(n_steps), float(fraction), train_rows)
        for width, depth, n_steps, fraction in itertools.product(*axes)
    ]
    return _plan(name, overrides, cfg, family, entries)


def _load_plan_config(name: str, overrides: Sequence[str]) -> Config:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise ScalingError(f"--name must be letters, digits, '-', '_' or '.' (got {name!r})")
    return load(list(overrides))


def _train_rows(cfg) -> int | None:
    try:
        return data_lib.num_rows(cfg.data.uri, "train")
    except Exception:  # data not prepared yet: D_unique unknown until then
        return None


def _sample(info: dict, width: int, depth: int, n_steps: int, fraction: float) -> dict[str, Any]:
    """The config paths one grid point sets (the family's pinned arguments keep every width buildable)."""
    return {
        f"net.kwargs.{info['width']}": int(width),
        f"net.kwargs.{info['depth']}": int(depth),
        **{f"net.kwargs.{k}": v for k, v in info["pinned"].items()},
        "trainer.max_steps": int(n_steps),
        "data.fraction": float(fraction),
    }


def _entry(
    cfg, info: dict, width: int, depth: int, n_steps: int, fraction: float, train_rows, prefix: str = ""
) -> dict:
    """One grid point: its id, overrides and measured sizes (``measure``)."""
    from tune_spaces.common import apply_to_dict, to_overrides  # lazy, as in _axes: tune_spaces imports ray

    sample = _sample(info, width, depth, n_steps, fraction)
    entry_id = f"{prefix}w{width}-d{depth}-s{n_steps}-f{fraction:g}"
    try:
        sizes = measure(Config.from_dict(apply_to_dict(sample, cfg.raw)), train_rows)
    except (ValueError, TypeError) as error:
        raise ScalingError(f"grid point {entry_id} is invalid: {error}") from None
    return {
        "id": entry_id,
        "width": int(width),
        "depth": int(depth),
        "steps": int(n_steps),
        "fraction": float(fraction),
        "overrides": to_overrides(sample),
        **sizes,
    }


def _plan(name: str, overrides: Sequence[str], cfg, family: str, entries: list[dict]) -> dict:
    from pipeline.sweeps.runner import pin_paths  # lazy, as in _axes: runner imports ray

    _warn_ema_lag(cfg, entries)
    # a point cut by the preset's time budget would not spend its D: no time budget unless asked for
    timed = "trainer.max_minutes" in _given_keys(overrides)
    return {
        "name": name,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "family": family,
        "base_overrides": [*([] if timed else ["trainer.max_minutes=0"]), *overrides, *pin_paths(cfg)],
        "metric": NLL_METRIC,
        "tracking": {"uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment, "enabled": cfg.tracking.enabled},
        "batch_size": cfg.data.batch_size,
        "entries": entries,
    }


def _warn_ema_lag(cfg, entries: list[dict]) -> None:
    """Validation reads the EMA weights: a point shorter than 3 EMA time constants is scored on
    weights that still remember their initialisation, which flatters no size and biases short runs."""
    decay = cfg.optim.ema_decay
    horizon = 1.0 / (1.0 - decay) if decay > 0 else 0.0
    short = [e["id"] for e in entries if e["steps"] < 3 * horizon]
    if short:
        log.warning(
            "%d of %d grid points train for fewer than 3 EMA time constants (optim.ema_decay=%g: %.0f steps), "
            "e.g. %s; their NLL is the EMA's lag more than the model's (optim.ema_decay=0 scores the last weights)",
            len(short),
            len(entries),
            decay,
            horizon,
            short[0],
        )


# ========================================================================= IsoFLOP plan
TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal D/N (Hoffmann et al. 2022): the planner's first guess
ISOFLOP_SPAN = 16.0  # largest / smallest N of one budget: wide enough for the parabola to show curvature
ISOFLOP_TOLERANCE = 0.05  # |realised C / budget - 1| a point may miss by (steps are integers)


def _width_step(info: dict) -> int:
    """Widths are multiples of every pinned divisor (GroupNorm groups, attention heads)."""
    return math.lcm(*(int(v) for v in info["pinned"].values() if isinstance(v, int) and v > 0))


def _candidate_sizes(cfg, info: dict, depth: int) -> list[tuple[int, int]]:
    """[(width, N)] for widths that are multiples of the family's step, spaced ~geometrically up to
    256 steps; N from the network built on the meta device (no FLOP counting: that is per point)."""
    from tune_spaces.common import apply_to_dict  # lazy, as in _axes: tune_spaces imports ray

    step = _width_step(info)
    out = []
    for mult in sorted({int(round(m)) for m in np.geomspace(1, 256, 48)}):
        sample = _sample(info, step * mult, depth, cfg.trainer.max_steps, cfg.data.fraction)
        try:
            with torch.device("meta"):
                net = build_model(Config.from_dict(apply_to_dict(sample, cfg.raw))).net
        except (ValueError, TypeError):  # a width this net cannot take: not a candidate
            continue
        out.append((step * mult, count_parameters(net, non_embedding=True)))
    return out


def _pick_widths(candidates: list[tuple[int, int]], n_opt: float, sizes: int, budget: float, ratio: float) -> list[int]:
    """``sizes`` distinct widths whose N lie evenly in log N across ISOFLOP_SPAN around ``n_opt``."""
    low, high = candidates[0][1], candidates[-1][1]
    if not low <= n_opt <= high:
        raise ScalingError(
            f"--budgets {budget:g}: the expected optimum N = {n_opt:.3g} lies outside the widths this family "
            f"builds (N from {low:,} to {high:,}); choose a budget between {6 * ratio * low**2:.2g} "
            f"and {6 * ratio * high**2:.2g} FLOPs (at {ratio:g} tokens per parameter)"
        )
    log_n = np.log([n for _, n in candidates])
    targets = math.log(n_opt) + np.linspace(-0.5, 0.5, sizes) * math.log(ISOFLOP_SPAN)
    widths = sorted({candidates[int(np.argmin(np.abs(log_n - t)))][0] for t in targets})
    if len(widths) < sizes:
        raise ScalingError(
            f"--sizes {sizes}: only {len(widths)} distinct widths reach N within a factor {ISOFLOP_SPAN:g} "
            f"around {n_opt:.3g} for budget {budget:g}; ask for fewer sizes or a larger budget"
        )
    return widths


def make_isoflop_plan(
    name: str,
    overrides: Sequence[str],
    *,
    budgets: Sequence[float],
    sizes: int = 5,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> dict:
    """An IsoFLOP grid: per training budget C (FLOPs, C = 6 N D as in the plan's ``C``; evaluation
    FLOPs are not included, see ``C_measured`` and the eval config for those), ``sizes`` widths at
    the config's depth spread evenly in log N over a factor ISOFLOP_SPAN around the expected optimum
    N_opt = sqrt(C / (6 r)) (r = ``tokens_per_param``, D/N at the optimum), each trained for
    steps = round(C / (6 N batch dims)) so that it spends the budget. The same plan format as
    ``make_plan`` (``bfn scaling run`` runs it) plus ``budget`` per entry and ``"kind": "isoflop"``."""
    _check_isoflop(budgets, sizes, tokens_per_param)
    cfg = _load_plan_config(name, overrides)
    family, info, _ = _axes(cfg, overrides, None, None, None, None)
    depth = int(cfg.net.kwargs[info["depth"]])
    per_step = cfg.data.batch_size * int(np.prod(cfg.data.data_shape))
    candidates = _candidate_sizes(cfg, info, depth)
    train_rows = _train_rows(cfg)
    entries = []
    for budget in budgets:
        n_opt = math.sqrt(budget / (6.0 * tokens_per_param))
        for width in _pick_widths(candidates, n_opt, sizes, budget, tokens_per_param):
            n = dict(candidates)[width]
            n_steps = max(1, round(budget / (6.0 * n * per_step)))
            realised = 6.0 * n * n_steps * per_step
            if abs(realised / budget - 1) > ISOFLOP_TOLERANCE:
                raise ScalingError(
                    f"--budgets {budget:g}: width {width} (N = {n:,}) spends {realised:.3g} FLOPs with "
                    f"{n_steps} step(s), more than {ISOFLOP_TOLERANCE:.0%} off the budget; raise the budget"
                )
            prefix = f"b{budget:.3g}-".replace("+", "")
            entry = _entry(cfg, info, width, depth, n_steps, float(cfg.data.fraction), train_rows, prefix)
            entries.append({**entry, "budget": float(budget)})
    plan = _plan(name, overrides, cfg, family, entries)
    return {**plan, "kind": "isoflop", "budgets": [float(b) for b in budgets], "tokens_per_param": tokens_per_param}


def _check_isoflop(budgets: Sequence[float], sizes: int, tokens_per_param: float) -> None:
    if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
        raise ScalingError(f"--budgets must be positive numbers of FLOPs, comma separated (got {list(budgets)})")
    if len(set(budgets)) < len(budgets):
        raise ScalingError(f"--budgets lists a budget twice (got {list(budgets)})")
    if sizes < 3:
        raise ScalingError(f"--sizes must be at least 3: a parabola in log N needs three points (got {sizes})")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise ScalingError(f"--tokens-per-param must be a positive number (got {tokens_per_param})")


def write_plan(plan: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1))
    out.with_suffix(".md").write_text(plan_table(plan))
    return out


# ============================================================================= run
def _run_name(plan: dict, entry: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{plan['name']}-{entry['id']}")


def _planned(plan: dict, entry: dict, parent_id: str | None = None):
    from pipeline.sweeps.runner import PlannedRun  # lazy, as in _axes: runner imports ray

    tags = store.grid_tags(plan["name"], entry["id"])
    return PlannedRun(
        overrides=list(entry["overrides"]),
        run_name=_run_name(plan, entry),
        tags={**tags, "mlflow.parentRunId": parent_id} if parent_id else tags,
        params=store.grid_params(entry, plan["metric"]),
    )


def run_plan(plan: dict, *, concurrent: int = 1, force: bool = False) -> list[dict]:
    """Train every grid point (skipping those already finished in MLflow unless ``force``):
    sequential ``fit`` calls, or ``concurrent`` at a time as Tune trials (no scheduler). Returns
    [{"id", "nll", "run_id"}] for every point of the plan."""
    set_env_defaults()
    track = plan["tracking"]
    if not track["enabled"]:
        raise ScalingError(
            "the plan's config has tracking.enabled=false; scaling runs are read back from "
            "MLflow, so tracking must be on"
        )
    started = time.perf_counter()
    done = {} if force else store.finished_points(track["uri"], track["experiment"], plan["name"])
    todo = [e for e in plan["entries"] if e["id"] not in done]
    if done:
        log.info(
            "scaling %s: %d of the plan's %d points already done (the grid holds %d), %d to train",
            plan["name"],
            len(plan["entries"]) - len(todo),
            len(plan["entries"]),
            len(done),
            len(todo),
        )
    configs = {}
    for entry in todo:  # validate every point before training any
        planned = _planned(plan, entry)
        configs[entry["id"]] = load([*plan["base_overrides"], *planned.overrides, f"run.name={planned.run_name}"])
    study = store.open_study(load(list(plan["base_overrides"])), plan["name"], _study_params(plan))
    if concurrent > 1 and len(todo) > 1:
        _run_with_tune(plan, todo, configs[todo[0]["id"]], concurrent, study.run_id)
    else:
        _run_one_by_one(plan, todo, configs, study.run_id)
    results = _finalize(plan)
    best = _register_best(plan, results)
    store.close_study(study, track["uri"], track["experiment"], plan["name"], best, time.perf_counter() - started)
    return results


def _study_params(plan: dict) -> dict[str, Any]:
    """The plan as the study run's params: what a person browsing MLflow needs to read the grid."""
    budgets = plan.get("budgets", [])
    params = {
        "scaling.kind": plan.get("kind", "grid"),
        "scaling.family": plan["family"],
        "scaling.points": len(plan["entries"]),
        "scaling.budgets": ",".join(f"{b:g}" for b in budgets) or None,
        "scaling.sizes_per_budget": len(plan["entries"]) // len(budgets) if budgets else None,
        "scaling.metric": plan["metric"],
        "scaling.base_overrides": " ".join(o for o in plan["base_overrides"] if not o.startswith("paths.")),
    }
    return {k: v for k, v in params.items() if v is not None}


def _register_best(plan: dict, results: list[dict]) -> dict | None:
    """The grid point with the lowest final NLL: its model registered as ``models:/<grid>@champion``."""
    finite = [r for r in results if r["run_id"] and math.isfinite(r["nll"])]
    if not finite:
        return None
    best = min(finite, key=lambda r: r["nll"])
    planned = _planned(plan, next(e for e in plan["entries"] if e["id"] == best["id"]))
    cfg = load([*plan["base_overrides"], *planned.overrides, f"run.name={planned.run_name}"])
    store.register_best(cfg, plan["name"], best["run_id"])
    return best


def _run_one_by_one(plan: dict, todo: list[dict], configs: dict, parent_id: str) -> None:
    for entry in todo:
        cfg, planned = configs[entry["id"]], _planned(plan, entry, parent_id)
        store.open_run(cfg, planned.run_name, planned.tags, planned.params, required=True)
        started = time.perf_counter()
        summary = fit(cfg)
        log.info(
            "scaling %s: %s = %s (%.0f s)",
            entry["id"],
            plan["metric"],
            summary.get(plan["metric"]),
            time.perf_counter() - started,
        )


def _run_with_tune(plan: dict, todo: list[dict], first_cfg, concurrent: int, parent_id: str) -> None:
    """The grid points as Tune trials (a grid over entry ids, FIFO, no early stopping)."""
    # lazy, as in _axes
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from pipeline.sweeps import runner

    driver_cpus, data_cpus = 0.5, 1.0
    try:
        at_once = runner.concurrency(
            first_cfg,
            driver_cpus=driver_cpus,
            data_cpus=data_cpus,
            requested=concurrent,
            total=len(todo),
            option="--concurrent",
        )
    except ConfigError as error:
        raise ScalingError(str(error)) from None
    settings = runner.TrialSettings(
        overrides=plan["base_overrides"],
        sweep=f"scaling-{plan['name']}",
        metric=plan["metric"],
        planned={e["id"]: _planned(plan, e, parent_id) for e in todo},  # their tags name the parent
    )
    storage_path, storage_fs = storage(first_cfg)
    runner.run_tune(
        name=f"scaling-{plan['name']}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=f"{storage_path.rstrip('/')}/tune",
        settings=settings,
        param_space={"_entry": tune.grid_search([e["id"] for e in todo])},
        num_samples=1,
        metric=plan["metric"],
        mode="min",
        max_concurrent=at_once,
        driver_cpus=driver_cpus,
        search_alg=BasicVariantGenerator(max_concurrent=at_once),
        storage_filesystem=storage_fs,
    )


def _finalize(plan: dict) -> list[dict]:
    """Every point's final NLL as the metric scaling/nll of its run."""
    track = plan["tracking"]
    runs = {}
    for run in store.grid_runs(track["uri"], track["experiment"], plan["name"]):  # newest first
        runs.setdefault(run.data.tags.get(store.ENTRY_TAG), run.info.run_id)
    results = []
    for entry in plan["entries"]:
        run_id = runs.get(entry["id"])
        nll = float("nan")
        if run_id is not None:
            params = store.grid_params(entry, plan["metric"])
            nll = store.finalize_point(track["uri"], run_id, plan["metric"], params, steps=entry["steps"])
        results.append({"id": entry["id"], "nll": nll, "run_id": run_id})
    return results


# ============================================================================= fit
def fit_grid(
    uri: str,
    experiment: str,
    name: str,
    *,
    budget: float | None = None,
    n_boot: int = 200,
    seed: int = 0,
    data_axis: str = "seen",
    compute: str = "6ND",
    out_dir: str | Path | None = None,
    log_to_mlflow: bool = True,
    artifact_location: str | None = None,
) -> dict:
    """Read the grid ``name`` back from MLflow, fit both laws with bootstrap CIs, write the
    plot and tables to ``out_dir`` and log them to an MLflow run ``scaling-fit-<name>``."""
    runs = store.read_grid(uri, experiment, name, data_axis=data_axis)
    nd = fit_law(runs, "ND", n_boot=n_boot, seed=seed)
    c = fit_law(runs, "C", n_boot=n_boot, seed=seed, compute_key="C" if compute == "6ND" else "C_measured")
    prediction = None if budget is None else predict_budget(nd, c, budget)
    exponents = optimal_exponents(nd, runs, n_boot=n_boot, seed=seed)
    out = Path(out_dir) if out_dir else Path("runs") / "scaling" / name
    out.mkdir(parents=True, exist_ok=True)
    files = reports.write_fit_tables(nd, c, runs, prediction, out, exponents)
    files["plot"] = reports.plot_fit(nd, c, runs, out / "scaling_fit.png", prediction, title=name)
    if any(math.isfinite(r.get("budget", float("nan"))) for r in runs):
        files["isoflop_plot"] = reports.plot_isoflop(runs, nd, exponents, out / "isoflop.png", title=name)
    run_id = None
    if log_to_mlflow:
        run_id = store.log_fit(uri, experiment, name, nd, c, prediction, files, artifact_location, exponents)
    return {
        "ND": nd,
        "C": c,
        "exponents": exponents,
        "prediction": prediction,
        "runs": runs,
        "files": {k: str(v) for k, v in files.items()},
        "mlflow_run_id": run_id,
    }


def optimal_exponents(nd: dict, runs: list[dict], *, n_boot: int = 200, seed: int = 0) -> dict:
    """N_opt ~ C^a and D_opt ~ C^b both ways: ``approach3`` implied by L(N, D), and ``approach2``
    (IsoFLOP parabolas) when runs carry a budget; a grid without budgets has no ``approach2``, and
    one whose budgets cannot be fitted has ``approach2_error`` (the L(N, D) fit still stands)."""
    out: dict[str, Any] = {"approach3": implied_exponents(nd)}
    if any(math.isfinite(r.get("budget", float("nan"))) for r in runs):
        try:
            out["approach2"] = fit_isoflop(runs, n_boot=n_boot, seed=seed)
        except ScalingError as error:
            out["approach2_error"] = str(error)
    return out


# ============================================================================== CLI
def _ints(text: str | None) -> list[int] | None:
    return [int(v) for v in str(text).split(",") if v.strip()] if text else None


def _floats(text: str | None) -> list[float] | None:
    return [float(v) for v in str(text).split(",") if v.strip()] if text else None


def _budgets(text: str | None) -> list[float]:
    try:
        return _floats(text) or []
    except ValueError:
        raise ScalingError(f"--budgets must be positive numbers of FLOPs, comma separated (got {text!r})") from None


def _grid_options(args) -> list[tuple[str, Any]]:
    return [
        ("--widths", args.widths),
        ("--depths", args.depths),
        ("--steps", args.steps),
        ("--fractions", args.fractions),
    ]


def cmd_plan(args) -> int:
    if args.isoflop:
        grid_options = [o for o, v in _grid_options(args) if v]
        if grid_options:
            raise ScalingError(
                f"{', '.join(grid_options)}: not with --isoflop "
                "(it picks widths and steps per budget at the config's depth)"
            )
        plan = make_isoflop_plan(
            args.name,
            args.overrides,
            budgets=_budgets(args.budgets),
            sizes=args.sizes,
            tokens_per_param=args.tokens_per_param,
        )
    elif args.budgets:
        raise ScalingError("--budgets: only with --isoflop")
    else:
        plan = make_plan(
            args.name,
            args.overrides,
            widths=_ints(args.widths),
            depths=_ints(args.depths),
            steps=_ints(args.steps),
            fractions=_floats(args.fractions),
        )
    cfg = load(args.overrides)
    out = Path(args.out or Path(cfg.paths.runs_dir) / "scaling" / args.name / "plan.json")
    write_plan(plan, out)
    print(plan_table(plan))
    print(
        f"{len(plan['entries'])} grid points written to {out}\ntrain them: bfn scaling run {out} [--concurrent 2]",
        flush=True,
    )
    return 0


def cmd_run(args) -> int:
    plan = json.loads(Path(args.plan).read_text())
    results = run_plan(plan, concurrent=args.concurrent, force=args.force)
    for r in results:
        print(f"  {r['id']}: {plan['metric']} = {r['nll']:.4f}")
    tracking = " ".join(o for o in plan["base_overrides"] if o.startswith("tracking."))
    print(f"fit them: bfn scaling fit --name {plan['name']} --budget 1e15 {store.masked(tracking)}", flush=True)
    return 0


def cmd_fit(args) -> int:
    cfg = load(args.overrides)
    if not cfg.tracking.enabled:
        raise ScalingError("tracking.enabled=false: the runs are read from MLflow")
    result = fit_grid(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        args.name,
        budget=args.budget,
        n_boot=args.bootstrap,
        seed=args.seed,
        data_axis=args.data_axis,
        compute=args.compute,
        out_dir=args.out or Path(cfg.paths.runs_dir) / "scaling" / args.name,
        artifact_location=cfg.tracking.artifact_location,
    )
    print(Path(result["files"]["markdown"]).read_text())
    print(f"plot: {result['files']['plot']}\nMLflow run: {result['mlflow_run_id']}", flush=True)
    return 0


def _guard(fn):
    """One masked line and exit status 2 for a refused plan or fit, or an MLflow failure."""

    def wrapped(args) -> int:
        from mlflow.exceptions import MlflowException  # lazy: mlflow adds ~1.2 s to every `bfn` command

        try:
            return fn(args)
        except ScalingError as error:
            print(f"bfn: error: scaling: {store.masked(str(error))}", file=sys.stderr)
        except MlflowException as error:
            print(f"bfn: error: scaling: MLflow: {store.masked(error)}", file=sys.stderr)
        return 2

    return wrapped


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scaling",
        help="scaling laws: plan a grid, train it, fit L(N, D), L(C)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="scaling_command", required=True)
    q = sub.add_parser("plan", help="grid over width x depth x steps x data fraction; N, D, C per point")
    q.add_argument("--name", default="scaling", help="grid name (MLflow tag bfn.scaling)")
    q.add_argument("--widths", default=None, help="comma list (default: the family's widths)")
    q.add_argument("--depths", default=None, help="comma list (default: the preset's depth)")
    q.add_argument("--steps", default=None, help="comma list of trainer.max_steps")
    q.add_argument("--fractions", default=None, help="comma list of data.fraction")
    q.add_argument("--isoflop", action="store_true", help="IsoFLOP grid: --sizes widths per budget of --budgets")
    q.add_argument("--budgets", default=None, help="comma list of training FLOPs (C = 6ND), with --isoflop")
    q.add_argument("--sizes", type=int, default=5, help="model sizes per budget (>= 3), with --isoflop")
    q.add_argument(
        "--tokens-per-param", type=float, default=TOKENS_PER_PARAM, help="D/N at the expected optimum (Chinchilla 20)"
    )
    q.add_argument("--out", default=None, help="plan JSON (default runs/scaling/<name>/plan.json)")
    q.add_argument("overrides", nargs="*", help="Hydra overrides of the base config")
    q.set_defaults(func=_guard(cmd_plan))
    q = sub.add_parser("run", help="train every grid point (sequential fit calls or Tune)")
    q.add_argument("plan")
    q.add_argument("--concurrent", type=int, default=1, help=">1: that many at a time via Tune")
    q.add_argument("--force", action="store_true", help="retrain points already finished")
    q.set_defaults(func=_guard(cmd_run))
    q = sub.add_parser("fit", help="fit L(N,D) and L(C) to a grid's MLflow runs (bootstrap CIs)")
    q.add_argument("--name", default="scaling")
    q.add_argument("--budget", type=float, default=None, help="FLOPs: predict compute-optimal N, D")
    q.add_argument("--bootstrap", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-axis", choices=["seen", "unique"], default="seen")
    q.add_argument("--compute", choices=["6ND", "measured"], default="6ND")
    q.add_argument("--out", default=None)
    q.add_argument("overrides", nargs="*", help="Hydra overrides (tracking.uri=..., tracking=...)")
    q.set_defaults(func=_guard(cmd_fit))

"""`bfn scaling plan | run | fit`: scaling laws of BFN loss in model size N, data D and compute C.

    bfn scaling plan [--name G] [--widths 8,16,24] [--depths 1] [--steps 200,400] [--fractions 1]
                     [--out PLAN.json] experiment=mnist_local [overrides ...]
    bfn scaling run PLAN.json [--concurrent K] [--force]
    bfn scaling fit [--name G] [--budget FLOPS] [--bootstrap 200] [--data-axis seen|unique]
                    [--compute 6ND|measured] [--out DIR] [overrides: tracking.uri=... ...]

(options first, then Hydra overrides.)

Quantities, one MLflow run per grid point, tagged ``bfn.scaling=<grid>``:

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
* ``scaling.nll``: the final validation NLL (``val/nll_bits_per_dim``; ``val/loss``, the
  continuous-time loss, when ``eval.nll_steps`` is 0), named in ``scaling.nll_metric``.

The fit: L(N, D) = E + A / N^alpha + B / D^beta and L(C) = E + A / C^gamma, by
``scipy.optimize.least_squares`` on log L (a Huber loss with delta 1e-3 on log residuals, as in
Hoffmann et al. 2022, from a grid of starting points; N, D and C are centred in log space for
conditioning), with 95% percentile bootstrap intervals over runs (runs resampled with
replacement and refitted). The compute-optimal split of a budget C = 6ND follows from the fit:
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt), G = (alpha A / (beta B))^(1/(alpha+beta)).
Too few runs (fewer than free parameters + 1) or a non-finite NLL are rejected with a message.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GRID_TAG, ROLE_TAG, ENTRY_TAG = "bfn.scaling", "bfn.scaling_role", "bfn.scaling_entry"
HUBER_DELTA = 1e-3
PARAMS = {"ND": ("E", "A", "alpha", "B", "beta"), "C": ("E", "A", "gamma")}


class ScalingError(ValueError):
    """A scaling plan or fit cannot go on; the message says why."""


# ============================================================================ plan
def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _dims(cfg) -> int:
    return int(np.prod(cfg.data.data_shape))


def _forward_flops(model, cfg) -> int:
    """Counted forward FLOPs (matmul/conv) of the network on one example, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shape = cfg.data.data_shape
    with torch.device("meta"):
        text = cfg.data.name == "text8"  # the transformer takes probabilities (B, L, K)
        x = torch.zeros(1, shape[0], cfg.flow.num_classes) if text else torch.zeros(1, *shape)
        with FlopCounterMode(display=False) as counter:
            model.net(x, torch.zeros(1))
    return int(counter.get_total_flops())


def measure(cfg, train_rows: int | None = None) -> dict[str, Any]:
    """N, D, D_unique, C, C_measured of a validated config (network built on the meta device)."""
    import torch

    from bfn.networks import count_parameters
    from pipeline.training.build import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    n = count_parameters(model.net, non_embedding=True)
    dims = _dims(cfg)
    examples = cfg.trainer.max_steps * cfg.data.batch_size
    d = examples * dims
    fwd = _forward_flops(model, cfg)
    unique = None if train_rows is None else int(round(cfg.data.fraction * train_rows)) * dims
    return {"N": n, "N_total": count_parameters(model.net), "D": d, "D_unique": unique,
            "C": 6.0 * n * d, "C_measured": 3.0 * fwd * examples, "forward_flops": fwd,
            "dims_per_example": dims, "examples_seen": examples}  # fmt: skip


def make_plan(name: str, overrides: Sequence[str], *, widths: Sequence[int] | None = None,
              depths: Sequence[int] | None = None, steps: Sequence[int] | None = None,
              fractions: Sequence[float] | None = None) -> dict:  # fmt: skip
    """The grid (width x depth x steps x fraction) over a base config, with N, D, C per point."""
    from pipeline import data as data_lib
    from pipeline.config import Config, load
    from pipeline.sweeps.tune import pin_paths
    from tune_spaces.architecture import FAMILIES, family_of
    from tune_spaces.common import apply_to_dict, to_overrides

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise ScalingError(f"--name must be letters, digits, '-', '_' or '.' (got {name!r})")
    cfg = load(list(overrides))
    family = family_of(cfg.net.name)
    if family is None:
        raise ScalingError(f"net.name={cfg.net.name} has no width/depth family; one of "
                           f"{', '.join(FAMILIES)}")  # fmt: skip
    info = FAMILIES[family]
    widths = list(widths or info["widths"])
    depths = list(depths or [cfg.net.kwargs.get(info["depth"])
                             or _preset_kwargs(cfg.net.name)[info["depth"]]])  # fmt: skip
    steps = list(steps or [cfg.trainer.max_steps])
    fractions = list(fractions or [cfg.data.fraction])
    try:
        train_rows = data_lib.num_rows(cfg.data.uri, "train")
    except Exception:  # data not prepared yet: D_unique unknown until then
        train_rows = None
    metric = "val/nll_bits_per_dim" if cfg.eval.nll_steps > 0 else "val/loss"
    entries = []
    for width, depth, n_steps, fraction in itertools.product(widths, depths, steps, fractions):
        sample = {f"net.kwargs.{info['width']}": int(width), f"net.kwargs.{info['depth']}": int(depth),
                  **{f"net.kwargs.{k}": v for k, v in info["pinned"].items()},
                  "trainer.max_steps": int(n_steps), "data.fraction": float(fraction)}  # fmt: skip
        entry_id = f"w{width}-d{depth}-s{n_steps}-f{fraction:g}"
        try:
            point = Config.from_dict(apply_to_dict(sample, cfg.raw))
            sizes = measure(point, train_rows)
        except (ValueError, TypeError) as error:
            raise ScalingError(f"grid point {entry_id} is invalid: {error}") from None
        entries.append({"id": entry_id, "width": int(width), "depth": int(depth),
                        "steps": int(n_steps), "fraction": float(fraction),
                        "overrides": to_overrides(sample), **sizes})  # fmt: skip
    pins = pin_paths(cfg)  # absolute paths: the plan runs the same from any folder
    return {"name": name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "family": family,
            "base_overrides": [*overrides, *pins], "metric": metric,
            "tracking": {"uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment,
                         "enabled": cfg.tracking.enabled},
            "batch_size": cfg.data.batch_size, "entries": entries}  # fmt: skip


def _preset_kwargs(net_name: str) -> dict:
    from pipeline.config import net_presets

    return net_presets()[net_name]["kwargs"]


def plan_table(plan: dict) -> str:
    head = "| id | width | depth | steps | fraction | N | D | C = 6ND | C measured |"
    lines = [head, "|" + "---|" * 9]
    for e in plan["entries"]:
        lines.append(f"| {e['id']} | {e['width']} | {e['depth']} | {e['steps']} | {e['fraction']:g} "
                     f"| {e['N']:,} | {e['D']:.3g} | {e['C']:.3g} | {e['C_measured']:.3g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_plan(plan: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=1))
    out.with_suffix(".md").write_text(plan_table(plan))
    return out


# ============================================================================= run
def _run_name(plan: dict, entry: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{plan['name']}-{entry['id']}")


def _tags(plan: dict, entry: dict) -> dict[str, Any]:
    return {GRID_TAG: plan["name"], ROLE_TAG: "run", ENTRY_TAG: entry["id"],
            "scaling.N": entry["N"], "scaling.N_total": entry["N_total"], "scaling.D": entry["D"],
            "scaling.D_unique": entry["D_unique"], "scaling.C": entry["C"],
            "scaling.C_measured": entry["C_measured"], "scaling.width": entry["width"],
            "scaling.depth": entry["depth"], "scaling.steps": entry["steps"],
            "scaling.fraction": entry["fraction"], "scaling.nll_metric": plan["metric"]}  # fmt: skip


def _client(plan: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=plan["tracking"]["uri"])


def _grid_runs(client, experiment: str, name: str, role: str = "run") -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id],
                              f"tags.`{GRID_TAG}` = '{name}' and tags.`{ROLE_TAG}` = '{role}'",
                              max_results=50_000)  # fmt: skip


def finalize(client, run_id: str, metric: str) -> float:
    """Tag a finished grid run with its final validation NLL (the last logged value)."""
    history = client.get_metric_history(run_id, metric)
    value = max(history, key=lambda m: (m.step, m.timestamp)).value if history else float("nan")
    client.set_tag(run_id, "scaling.nll", repr(float(value)))
    if math.isfinite(value):
        client.log_metric(run_id, "scaling/nll", float(value))
    return float(value)


def run_plan(plan: dict, *, concurrent: int = 1, force: bool = False) -> list[dict]:
    """Train every grid point (skipping those already finished in MLflow unless ``force``):
    sequential ``fit`` calls, or ``concurrent`` at a time as Tune trials (no scheduler)."""
    from pipeline.config import load, set_env_defaults
    from pipeline.tracking import MLflowTracker

    set_env_defaults()
    if not plan["tracking"]["enabled"]:
        raise ScalingError("the plan's config has tracking.enabled=false; scaling runs are read "
                           "back from MLflow, so tracking must be on")  # fmt: skip
    client = _client(plan)
    done = {}
    if not force:
        for run in _grid_runs(client, plan["tracking"]["experiment"], plan["name"]):
            nll = run.data.tags.get("scaling.nll")
            if run.info.status == "FINISHED" and nll is not None and math.isfinite(float(nll)):
                done[run.data.tags.get(ENTRY_TAG)] = run.info.run_id
    todo = [e for e in plan["entries"] if e["id"] not in done]
    if done:
        print(f"[bfn] scaling {plan['name']}: {len(done)} grid points already done, "
              f"{len(todo)} to train", flush=True)  # fmt: skip
    configs = {}
    for entry in todo:  # validate every point before training any
        overrides = [*plan["base_overrides"], *entry["overrides"], f"run.name={_run_name(plan, entry)}"]
        configs[entry["id"]] = (overrides, load(overrides))
    results = []
    if concurrent > 1 and len(todo) > 1:
        results = _run_with_tune(plan, todo, configs, concurrent)
    else:
        from pipeline.training.driver import fit

        for entry in todo:
            overrides, cfg = configs[entry["id"]]
            MLflowTracker.start(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
                                artifact_location=cfg.tracking.artifact_location,
                                tags=_tags(plan, entry))  # fmt: skip
            started = time.perf_counter()
            summary = fit(cfg)
            print(f"[bfn] scaling {entry['id']}: {plan['metric']} = {summary.get(plan['metric'])} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    runs = {r.data.tags.get(ENTRY_TAG): r for r in
            _grid_runs(client, plan["tracking"]["experiment"], plan["name"])}  # fmt: skip
    for entry in plan["entries"]:
        run = runs.get(entry["id"])
        if run is None:
            results.append({"id": entry["id"], "nll": float("nan"), "run_id": None})
            continue
        for key, value in _tags(plan, entry).items():  # also on runs made by an older plan
            client.set_tag(run.info.run_id, key, value)
        nll = finalize(client, run.info.run_id, plan["metric"])
        results.append({"id": entry["id"], "nll": nll, "run_id": run.info.run_id})
    return results


def _run_with_tune(plan: dict, todo: list[dict], configs: dict, concurrent: int) -> list:
    """The grid points as Tune trials (a grid over entry ids, FIFO, no early stopping)."""
    from ray import tune

    from pipeline.sweeps import tune as sweeps

    first_cfg = configs[todo[0]["id"]][1]
    opts = sweeps.SweepOptions(space="scaling", driver_cpus=0.5)
    per = sweeps.trial_resources(first_cfg, opts)
    sweeps.start_ray(first_cfg, opts, concurrent)
    import ray

    fits = sweeps.fitting_trials(ray.cluster_resources(), per, opts.data_cpus)
    if fits < 1:
        raise ScalingError(f"the Ray cluster cannot fit one run ({per['CPU']} CPUs + "
                           f"{opts.data_cpus} for data)")  # fmt: skip
    entries = {e["id"]: {"overrides": e["overrides"], "run_name": _run_name(plan, e),
                         "tags": _tags(plan, e)} for e in todo}  # fmt: skip
    settings = {"overrides": plan["base_overrides"], "sweep": f"scaling-{plan['name']}",
                "parent_run_id": None, "metric": plan["metric"], "entries": entries}  # fmt: skip
    from ray.tune.search import BasicVariantGenerator

    from pipeline.training.driver import storage

    storage_path, storage_fs = storage(first_cfg)
    name = f"scaling-{plan['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    at_once = min(concurrent, fits)
    sweeps.run_tune(
        name=name, storage_path=f"{storage_path.rstrip('/')}/tune", trainable_settings=settings,
        param_space={"_entry": tune.grid_search(list(entries))}, num_samples=1,
        metric=plan["metric"], mode="min", max_concurrent=at_once, driver_cpus=opts.driver_cpus,
        search_alg=BasicVariantGenerator(max_concurrent=at_once), storage_filesystem=storage_fs,
    )  # fmt: skip
    return []


# ============================================================================= fit
def _logsumexp(*terms):
    stacked = np.stack(np.broadcast_arrays(*terms))
    top = stacked.max(axis=0)
    return top + np.log(np.exp(stacked - top).sum(axis=0))


def _predict_nd(theta, log_n, log_d):
    e, a, alpha, b, beta = theta
    return _logsumexp(e, a - alpha * log_n, b - beta * log_d)


def _predict_c(theta, log_c):
    e, a, gamma = theta
    return _logsumexp(e, a - gamma * log_c)


def _terms(theta, x: tuple) -> tuple[np.ndarray, list[np.ndarray]]:
    """log L and d log L / d theta (softmax weights of the logsumexp terms)."""
    if len(theta) == 5:
        e, a, alpha, b, beta = theta
        logs = [np.full_like(x[0], e), a - alpha * x[0], b - beta * x[1]]
    else:
        e, a, gamma = theta
        logs = [np.full_like(x[0], e), a - gamma * x[0]]
    total = _logsumexp(*logs)
    w = [np.exp(t - total) for t in logs]
    jac = [w[0], w[1], -w[1] * x[0]]
    if len(theta) == 5:
        jac += [w[2], -w[2] * x[1]]
    return total, jac


def _fit_once(kind: str, x: tuple, log_l: np.ndarray, starts: list[np.ndarray]):
    from scipy.optimize import least_squares

    residual = lambda th: _terms(th, x)[0] - log_l  # noqa: E731
    jacobian = lambda th: np.stack(_terms(th, x)[1], axis=1)  # noqa: E731
    # log E, log A, exponent (, log B, exponent): exponents in [0, 4]
    bounds = ([-30, -30, 0, -30, 0], [10, 30, 4, 30, 4])
    if kind == "C":
        bounds = (bounds[0][:3], bounds[1][:3])
    best = None
    for start in starts:
        start = np.clip(start, np.array(bounds[0]) + 1e-6, np.array(bounds[1]) - 1e-6)
        try:  # plain least squares first (fast), then the Huber loss from there
            out = least_squares(residual, start, jac=jacobian, bounds=bounds, max_nfev=2000)
            out = least_squares(residual, out.x, jac=jacobian, bounds=bounds, loss="huber",
                                f_scale=HUBER_DELTA, max_nfev=2000)  # fmt: skip
        except (ValueError, FloatingPointError):
            continue
        if best is None or out.cost < best.cost:
            best = out
    return best


def _starts(kind: str, log_l: np.ndarray) -> list[np.ndarray]:
    low, spread = float(np.exp(log_l).min()), float(np.ptp(np.exp(log_l))) + 1e-3
    es = [math.log(0.5 * low), math.log(0.9 * low)]
    amps = [math.log(spread)]
    exps = [0.1, 0.4, 1.0]
    axes = (es, amps, exps, amps, exps) if kind == "ND" else (es, amps, exps)
    grid = itertools.product(*axes)
    return [np.array(s, dtype=float) for s in grid]


def _to_natural(kind: str, theta: np.ndarray, centre: tuple) -> dict[str, float]:
    """Parameters in the runs' own units (undo the log centring)."""
    if kind == "ND":
        e, a, alpha, b, beta = theta
        return {"E": math.exp(e), "A": math.exp(a + alpha * centre[0]), "alpha": alpha,
                "B": math.exp(b + beta * centre[1]), "beta": beta}  # fmt: skip
    e, a, gamma = theta
    return {"E": math.exp(e), "A": math.exp(a + gamma * centre[0]), "gamma": gamma}


def compute_optimal(p: dict[str, float], budget: float) -> dict[str, float]:
    """N_opt, D_opt and the predicted loss for a budget C = 6 N D under L(N, D)."""
    alpha, beta, a, b = (float(p[k]) for k in ("alpha", "beta", "A", "B"))
    nan = {"N_opt": float("nan"), "D_opt": float("nan"), "L_opt": float("nan")}
    if alpha <= 0 or beta <= 0:
        return nan
    with np.errstate(all="ignore"):  # degenerate bootstrap fits may overflow: reported as nan
        g = np.float64(alpha * a / (beta * b)) ** (1.0 / (alpha + beta))
        n_opt = float(g * np.float64(budget / 6.0) ** (beta / (alpha + beta)))
        d_opt = budget / (6.0 * n_opt) if n_opt else float("inf")
        loss = float(p["E"] + a / np.float64(n_opt) ** alpha + b / np.float64(d_opt) ** beta)
    out = {"N_opt": n_opt, "D_opt": d_opt, "L_opt": loss}
    return out if all(math.isfinite(v) and v > 0 for v in out.values()) else nan


def check_runs(runs: list[dict], kind: str = "ND") -> None:
    """Reject non-finite or non-positive values and too few (or too uniform) runs."""
    bad = [r for r in runs if not (math.isfinite(r["nll"]) and r["nll"] > 0)]
    if bad:
        names = ", ".join(f"{r.get('name') or r.get('run_id')} (nll={r['nll']})" for r in bad[:8])
        raise ScalingError(f"{len(bad)} run(s) have a non-finite or non-positive final NLL: {names}. "
                           f"Rerun them (`bfn scaling run PLAN --force`) or delete them from MLflow")  # fmt: skip
    for key in ("N", "D", "C"):
        odd = [r for r in runs if not (math.isfinite(r[key]) and r[key] > 0)]
        if odd:
            raise ScalingError(f"{len(odd)} run(s) have a non-positive or missing {key} "
                               f"(e.g. {odd[0].get('name')})")  # fmt: skip
    need = len(PARAMS[kind]) + 1
    if len(runs) < need:
        what = "L(N, D) = E + A/N^alpha + B/D^beta" if kind == "ND" else "L(C) = E + A/C^gamma"
        raise ScalingError(f"too few runs to fit {what}: {len(runs)} found, {len(PARAMS[kind])} "
                           f"free parameters need at least {need}")  # fmt: skip
    if kind == "ND":
        for key in ("N", "D"):
            if len({r[key] for r in runs}) < 2:
                raise ScalingError(f"all runs share one {key} = {runs[0][key]:g}; the grid must vary "
                                   f"{key} to fit its exponent")  # fmt: skip


def fit_law(runs: list[dict], kind: str = "ND", *, n_boot: int = 200, seed: int = 0,
            compute_key: str = "C") -> dict:  # fmt: skip
    """Fit L(N, D) (kind "ND") or L(C) (kind "C") to runs [{"N", "D", "C", "nll"}, ...];
    returns {"params", "ci" (95% bootstrap), "boot" (natural-unit samples), "n_runs", ...}."""
    check_runs(runs, kind)
    log_l = np.log([r["nll"] for r in runs])
    if kind == "ND":
        raw = (np.log([r["N"] for r in runs]), np.log([r["D"] for r in runs]))
    else:
        raw = (np.log([r[compute_key] for r in runs]),)
    centre = tuple(float(v.mean()) for v in raw)
    x = tuple(v - c for v, c in zip(raw, centre, strict=True))
    best = _fit_once(kind, x, log_l, _starts(kind, log_l))
    if best is None:
        raise ScalingError(f"the {kind} fit did not converge")
    params = _to_natural(kind, best.x, centre)
    rng = np.random.default_rng(seed)
    boot: list[dict[str, float]] = []
    n = len(runs)
    attempts = 0
    while len(boot) < n_boot and attempts < 20 * n_boot:
        attempts += 1
        idx = rng.integers(0, n, size=n)
        if len(set(idx.tolist())) < 3:
            continue
        if kind == "ND" and (len(set(x[0][idx])) < 2 or len(set(x[1][idx])) < 2):
            continue
        starts = [best.x]  # the full-data optimum: resampled data move it little
        out = _fit_once(kind, tuple(v[idx] for v in x), log_l[idx], starts)
        if out is not None:
            boot.append(_to_natural(kind, out.x, centre))
    ci = {}
    for key in PARAMS[kind]:
        values = np.array([b[key] for b in boot]) if boot else np.array([np.nan])
        ci[key] = (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))
    residuals = _predict(kind, best.x, x) - log_l
    return {"kind": kind, "params": params, "ci": ci, "boot": boot, "n_runs": n,
            "n_boot": len(boot), "rmse_log": float(np.sqrt(np.mean(residuals**2))),
            "centre": centre, "theta": best.x.tolist(), "compute_key": compute_key}  # fmt: skip


def _predict(kind: str, theta, x: tuple) -> np.ndarray:
    return _predict_nd(theta, *x) if kind == "ND" else _predict_c(theta, *x)


def law(kind: str, p: dict[str, float]):
    """The fitted law as a function of (N, D) or C, in natural units."""
    if kind == "ND":
        return lambda n, d: p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])
    return lambda c: p["E"] + p["A"] / np.power(c, p["gamma"])


def read_runs(uri: str, experiment: str, name: str, *, data_axis: str = "seen") -> list[dict]:
    """The grid's runs from MLflow: [{"run_id", "name", "N", "D", "C", "C_measured", "nll"}]."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = _grid_runs(client, experiment, name)
    if not runs:
        raise ScalingError(f"no runs tagged {GRID_TAG}={name} in experiment {experiment!r} at {uri}; "
                           f"run `bfn scaling run` first")  # fmt: skip
    out = []
    for run in runs:
        tags = run.data.tags

        def num(key, tags=tags):
            value = tags.get(key)
            try:
                return float(value) if value not in (None, "None") else float("nan")
            except ValueError:
                return float("nan")

        d = num("scaling.D_unique") if data_axis == "unique" else num("scaling.D")
        out.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                    "N": num("scaling.N"), "D": d, "C": num("scaling.C"),
                    "C_measured": num("scaling.C_measured"), "nll": num("scaling.nll"),
                    "metric": tags.get("scaling.nll_metric", "")})  # fmt: skip
    return sorted(out, key=lambda r: (r["N"], r["D"]))


def reliability_warnings(nd: dict, c: dict, runs: list[dict], prediction: dict | None) -> list[str]:
    """What a reader must know before trusting the fit: too few residual degrees of freedom,
    exponents the runs do not determine, a compute-optimal point far outside the grid."""
    out = []
    for fit in (nd, c):
        law_name = "L(N,D)" if fit["kind"] == "ND" else "L(C)"
        dof = fit["n_runs"] - len(PARAMS[fit["kind"]])
        if dof < 3:
            out.append(f"{law_name}: {fit['n_runs']} runs for {len(PARAMS[fit['kind']])} parameters leave "
                       f"{dof} residual degree(s) of freedom; the estimates are barely constrained")  # fmt: skip
        for key in ("alpha", "beta", "gamma"):
            if key not in fit["ci"]:
                continue
            low, high = fit["ci"][key]
            if not (math.isfinite(low) and math.isfinite(high) and low > 0 and high / low <= 10):
                out.append(f"{law_name}: {key} is not determined by these runs (95% CI [{low:.3g}, {high:.3g}])")
    if prediction and math.isfinite(prediction["N_opt"]):
        for key, axis in (("N_opt", "N"), ("D_opt", "D")):
            lo, hi = min(r[axis] for r in runs), max(r[axis] for r in runs)
            if not lo / 10 <= prediction[key] <= hi * 10:
                out.append(f"the compute-optimal {axis} = {prediction[key]:.3g} lies more than 10x outside the "
                           f"grid's {axis} range [{lo:.3g}, {hi:.3g}]: an extrapolation, not a measurement")
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_tables(nd: dict, c: dict, runs: list[dict], prediction: dict | None, out: Path) -> dict:
    rows = []
    for fit in (nd, c):
        for key in PARAMS[fit["kind"]]:
            low, high = fit["ci"][key]
            rows.append({"law": "L(N,D)" if fit["kind"] == "ND" else "L(C)", "param": key,
                         "estimate": fit["params"][key], "ci95_low": low, "ci95_high": high})  # fmt: skip
    csv_path = out / "fit.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md = ["| law | parameter | estimate | 95% CI |", "|---|---|---|---|"]
    md += [f"| {r['law']} | {r['param']} | {_fmt(r['estimate'])} | [{_fmt(r['ci95_low'])}, "
           f"{_fmt(r['ci95_high'])}] |" for r in rows]  # fmt: skip
    md.append("")
    md.append(f"L(N,D): {nd['n_runs']} runs, {nd['n_boot']} bootstrap fits, RMSE(log L) "
              f"{nd['rmse_log']:.4f}. L(C) on {c['compute_key']}: RMSE(log L) {c['rmse_log']:.4f}.")
    if prediction:
        md.append("")
        md.append(f"Compute-optimal for C = {prediction['budget']:.3g} FLOPs (C = 6ND): "
                  f"N = {prediction['N_opt']:.3g} [{prediction['N_opt_ci'][0]:.3g}, "
                  f"{prediction['N_opt_ci'][1]:.3g}], D = {prediction['D_opt']:.3g} "
                  f"[{prediction['D_opt_ci'][0]:.3g}, {prediction['D_opt_ci'][1]:.3g}], predicted "
                  f"L = {prediction['L_opt']:.4g}; L(C) predicts {prediction['L_C']:.4g}.")  # fmt: skip
    warnings = reliability_warnings(nd, c, runs, prediction)
    if warnings:
        md.append("")
        md += [f"WARNING: {w}" for w in warnings]
    md_path = out / "fit.md"
    md_path.write_text("\n".join(md) + "\n")
    runs_path = out / "runs.csv"
    with runs_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "run_id", "N", "D", "C", "C_measured",
                                                    "nll", "metric", "status"])  # fmt: skip
        writer.writeheader()
        for r in runs:
            writer.writerow({k: r.get(k) for k in writer.fieldnames})
    json_path = out / "fit.json"
    json_path.write_text(json.dumps({"ND": {k: v for k, v in nd.items() if k != "boot"},
                                     "C": {k: v for k, v in c.items() if k != "boot"},
                                     "prediction": prediction, "warnings": warnings},
                                    indent=1, default=float))  # fmt: skip
    return {"csv": csv_path, "markdown": md_path, "runs": runs_path, "json": json_path}


def plot_fit(nd: dict, c: dict, runs: list[dict], path: Path, prediction: dict | None = None,
             title: str = "") -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f_nd, f_c = law("ND", nd["params"]), law("C", c["params"])
    n_all = np.array([r["N"] for r in runs])
    d_all = np.array([r["D"] for r in runs])
    c_all = np.array([r[c["compute_key"]] for r in runs])
    l_all = np.array([r["nll"] for r in runs])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cmap = plt.get_cmap("viridis")
    ds, ns = sorted(set(d_all)), sorted(set(n_all))
    grid_n = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 100)
    for i, d in enumerate(ds):
        color = cmap(i / max(len(ds) - 1, 1))
        mask = d_all == d
        axes[0].scatter(n_all[mask], l_all[mask], color=color, label=f"D={d:.2g}", zorder=3)
        axes[0].plot(grid_n, f_nd(grid_n, d), color=color, alpha=0.7)
    axes[0].set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="final val NLL",
                title="L(N, D) against N")  # fmt: skip
    grid_d = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
    for i, n in enumerate(ns):
        color = plt.get_cmap("plasma")(i / max(len(ns) - 1, 1))
        mask = n_all == n
        axes[1].scatter(d_all[mask], l_all[mask], color=color, label=f"N={n:.3g}", zorder=3)
        axes[1].plot(grid_d, f_nd(n, grid_d), color=color, alpha=0.7)
    axes[1].set(xscale="log", xlabel="D (data dimensions seen)", title="L(N, D) against D")
    c_lo, c_hi = c_all.min() / 2, c_all.max() * 2
    if prediction:
        c_hi = max(c_hi, prediction["budget"] * 1.5)
    grid_c = np.geomspace(c_lo, c_hi, 150)
    axes[2].scatter(c_all, l_all, color="k", s=18, zorder=3, label="runs")
    p = nd["params"]
    g_c = c["params"]
    axes[2].plot(grid_c, f_c(grid_c), color="C0",
                 label=f"L(C) = {g_c['E']:.3g} + {g_c['A']:.3g}/C^{g_c['gamma']:.3g}")  # fmt: skip
    frontier = [compute_optimal(p, cc)["L_opt"] for cc in grid_c]
    axes[2].plot(grid_c, frontier, color="C3", ls="--", label="compute-optimal L(N, D)")
    if prediction:
        axes[2].scatter([prediction["budget"]], [prediction["L_opt"]], marker="*", s=200,
                        color="gold", edgecolors="k", zorder=4,
                        label=f"budget: N={prediction['N_opt']:.2g}, D={prediction['D_opt']:.2g}")  # fmt: skip
    axes[2].set(xscale="log", xlabel=f"C ({'6ND' if c['compute_key'] == 'C' else 'counted'} FLOPs)",
                title="L(C)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a_lo, a_hi = nd["ci"]["alpha"]
    b_lo, b_hi = nd["ci"]["beta"]
    fig.suptitle(f"{title}  alpha = {p['alpha']:.3g} [{a_lo:.3g}, {a_hi:.3g}]   beta = {p['beta']:.3g} "
                 f"[{b_lo:.3g}, {b_hi:.3g}]   E = {p['E']:.3g}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fit_grid(uri: str, experiment: str, name: str, *, budget: float | None = None,
             n_boot: int = 200, seed: int = 0, data_axis: str = "seen", compute: str = "6ND",
             out_dir: str | Path | None = None, log_to_mlflow: bool = True,
             artifact_location: str | None = None) -> dict:  # fmt: skip
    """Read the grid ``name`` back from MLflow, fit both laws with bootstrap CIs, write the
    plot and tables to ``out_dir`` and log them to an MLflow run ``scaling-fit-<name>``."""
    runs = read_runs(uri, experiment, name, data_axis=data_axis)
    compute_key = "C" if compute == "6ND" else "C_measured"
    nd = fit_law(runs, "ND", n_boot=n_boot, seed=seed)
    c = fit_law(runs, "C", n_boot=n_boot, seed=seed, compute_key=compute_key)
    prediction = None
    if budget is not None:
        if not (math.isfinite(budget) and budget > 0):
            raise ScalingError(f"--budget must be a positive number of FLOPs (got {budget})")
        point = compute_optimal(nd["params"], budget)
        boots = [compute_optimal(b, budget) for b in nd["boot"]] or [point]
        ci = {k: (float(np.nanpercentile([b[k] for b in boots], 2.5)),
                  float(np.nanpercentile([b[k] for b in boots], 97.5))) for k in point}  # fmt: skip
        prediction = {"budget": budget, **point, "N_opt_ci": ci["N_opt"], "D_opt_ci": ci["D_opt"],
                      "L_opt_ci": ci["L_opt"], "L_C": float(law("C", c["params"])(budget))}  # fmt: skip
    out = Path(out_dir) if out_dir else Path("runs") / "scaling" / name
    out.mkdir(parents=True, exist_ok=True)
    files = write_tables(nd, c, runs, prediction, out)
    files["plot"] = plot_fit(nd, c, runs, out / "scaling_fit.png", prediction, title=name)
    run_id = None
    if log_to_mlflow:
        run_id = _log_fit(uri, experiment, name, nd, c, prediction, files, artifact_location)
    return {"ND": nd, "C": c, "prediction": prediction, "runs": runs,
            "files": {k: str(v) for k, v in files.items()}, "mlflow_run_id": run_id}  # fmt: skip


def _log_fit(uri, experiment, name, nd, c, prediction, files, artifact_location) -> str:
    from pipeline.tracking import MLflowTracker

    tracker = MLflowTracker.start(uri, experiment, f"scaling-fit-{name}",
                                  artifact_location=artifact_location,
                                  tags={GRID_TAG: name, ROLE_TAG: "fit"})  # fmt: skip
    metrics = {f"fit/ND/{k}": v for k, v in nd["params"].items()}
    metrics.update({f"fit/C/{k}": v for k, v in c["params"].items()})
    for fit in (nd, c):
        for key, (low, high) in fit["ci"].items():
            if math.isfinite(low) and math.isfinite(high):
                metrics[f"fit/{fit['kind']}/{key}_ci_low"] = low
                metrics[f"fit/{fit['kind']}/{key}_ci_high"] = high
    if prediction:
        metrics.update({f"optimal/{k}": v for k, v in prediction.items()
                        if isinstance(v, float) and math.isfinite(v)})  # fmt: skip
    tracker.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(v)}, step=0)
    tracker.set_tags({"scaling.n_runs": nd["n_runs"], "scaling.n_boot": nd["n_boot"]})
    for path in files.values():
        tracker.log_artifact(path, "scaling")
    tracker.finish()
    return tracker.run_id


# ============================================================================== CLI
def _config_for(overrides: list[str]):
    from pipeline.config import load

    return load(overrides)


def cmd_plan(args) -> int:
    plan = make_plan(args.name, args.overrides, widths=_ints(args.widths) if args.widths else None,
                     depths=_ints(args.depths) if args.depths else None,
                     steps=_ints(args.steps) if args.steps else None,
                     fractions=_floats(args.fractions) if args.fractions else None)  # fmt: skip
    cfg = _config_for(args.overrides)
    out = Path(args.out or Path(cfg.raw["paths"]["runs_dir"]) / "scaling" / args.name / "plan.json")
    write_plan(plan, out)
    print(plan_table(plan))
    print(f"[bfn] {len(plan['entries'])} grid points written to {out}\n"
          f"[bfn] train them: bfn scaling run {out} [--concurrent 2]", flush=True)  # fmt: skip
    return 0


def cmd_run(args) -> int:
    plan = json.loads(Path(args.plan).read_text())
    results = run_plan(plan, concurrent=args.concurrent, force=args.force)
    for r in results:
        print(f"  {r['id']}: {plan['metric']} = {r['nll']:.4f}")
    print(f"[bfn] fit them: bfn scaling fit --name {plan['name']} --budget 1e15 "
          f"{' '.join(o for o in plan['base_overrides'] if o.startswith('tracking.'))}", flush=True)
    return 0


def cmd_fit(args) -> int:
    cfg = _config_for(args.overrides)
    if not cfg.tracking.enabled:
        raise ScalingError("tracking.enabled=false: the runs are read from MLflow")
    result = fit_grid(cfg.tracking.uri, cfg.tracking.experiment, args.name, budget=args.budget,
                      n_boot=args.bootstrap, seed=args.seed, data_axis=args.data_axis,
                      compute=args.compute,
                      out_dir=args.out or Path(cfg.raw["paths"]["runs_dir"]) / "scaling" / args.name,
                      artifact_location=cfg.tracking.artifact_location)  # fmt: skip
    print(Path(result["files"]["markdown"]).read_text())
    print(f"[bfn] plot: {result['files']['plot']}\n[bfn] MLflow run: {result['mlflow_run_id']}")
    return 0


def _guard(fn):
    def wrapped(args) -> int:
        try:
            return fn(args)
        except ScalingError as error:
            print(f"bfn: error: scaling: {error}", file=sys.stderr)
            return 2

    return wrapped


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("scaling", help="scaling laws: plan a grid, train it, fit L(N, D), L(C)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="scaling_command", required=True)
    q = sub.add_parser("plan", help="grid over width x depth x steps x data fraction; N, D, C per point")
    q.add_argument("--name", default="scaling", help="grid name (MLflow tag bfn.scaling)")
    q.add_argument("--widths", default=None, help="comma list (default: the family's widths)")
    q.add_argument("--depths", default=None, help="comma list (default: the preset's depth)")
    q.add_argument("--steps", default=None, help="comma list of trainer.max_steps")
    q.add_argument("--fractions", default=None, help="comma list of data.fraction")
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

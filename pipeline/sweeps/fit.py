"""Scaling-law fits, pure: numpy and scipy only (no MLflow, no Ray), so they are unit-testable.

L(N, D) = E + A / N^alpha + B / D^beta and L(C) = E + A / C^gamma, fitted by
``scipy.optimize.least_squares`` on log L (a Huber loss with delta 1e-3 on log residuals, as in
Hoffmann et al. 2022, from a grid of starting points; N, D and C are centred in log space for
conditioning), with 95% percentile bootstrap intervals over runs (resampled with replacement and
refitted). The compute-optimal split of a budget C = 6ND follows from L(N, D):
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt), G = (alpha A / (beta B))^(1/(alpha+beta)).

A run is a dict {"N", "D", "C", "C_measured", "nll", "name"}; reading them from MLflow is
``pipeline.sweeps.store``'s job, drawing them ``pipeline.sweeps.reports``'s.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

HUBER_DELTA = 1e-3
PARAMS = {"ND": ("E", "A", "alpha", "B", "beta"), "C": ("E", "A", "gamma")}
# IsoFLOP parabolas use the sizes whose loss is within this fraction of their budget's lowest: far from the
# minimum a profile is no parabola (a large model given a handful of steps sits near its initial loss)
ISOFLOP_NEAR = 0.25


class ScalingError(ValueError):
    """A scaling plan or fit cannot go on; the message says why."""


def _logsumexp(*terms):
    stacked = np.stack(np.broadcast_arrays(*terms))
    top = stacked.max(axis=0)
    return top + np.log(np.exp(stacked - top).sum(axis=0))


def _predict(kind: str, theta, x: tuple) -> np.ndarray:
    """log L at centred log inputs ``x`` = (log N, log D) or (log C,)."""
    if kind == "ND":
        e, a, alpha, b, beta = theta
        return _logsumexp(e, a - alpha * x[0], b - beta * x[1])
    e, a, gamma = theta
    return _logsumexp(e, a - gamma * x[0])


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
    from scipy.optimize import least_squares  # lazy: ~0.3 s; build_parser imports fit (via scaling) for every command

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
            out = least_squares(
                residual, out.x, jac=jacobian, bounds=bounds, loss="huber", f_scale=HUBER_DELTA, max_nfev=2000
            )
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
    return [np.array(s, dtype=float) for s in itertools.product(*axes)]


def _to_natural(kind: str, theta: np.ndarray, centre: tuple) -> dict[str, float]:
    """Parameters in the runs' own units (undo the log centring)."""
    if kind == "ND":
        e, a, alpha, b, beta = theta
        return {
            "E": math.exp(e),
            "A": math.exp(a + alpha * centre[0]),
            "alpha": alpha,
            "B": math.exp(b + beta * centre[1]),
            "beta": beta,
        }
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
        raise ScalingError(
            f"{len(bad)} run(s) have a non-finite or non-positive final NLL: {names}. "
            f"Rerun them (`bfn scaling run PLAN --force`) or delete them from MLflow"
        )
    for key in ("N", "D", "C"):
        odd = [r for r in runs if not (math.isfinite(r[key]) and r[key] > 0)]
        if odd:
            raise ScalingError(f"{len(odd)} run(s) have a non-positive or missing {key} (e.g. {odd[0].get('name')})")
    need = len(PARAMS[kind]) + 1
    if len(runs) < need:
        what = "L(N, D) = E + A/N^alpha + B/D^beta" if kind == "ND" else "L(C) = E + A/C^gamma"
        raise ScalingError(
            f"too few runs to fit {what}: {len(runs)} found, {len(PARAMS[kind])} free parameters need at least {need}"
        )
    if kind == "ND":
        for key in ("N", "D"):
            if len({r[key] for r in runs}) < 2:
                raise ScalingError(
                    f"all runs share one {key} = {runs[0][key]:g}; the grid must vary {key} to fit its exponent"
                )


def _percentile_ci(values) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap values, NaNs left out ((NaN, NaN) when all are NaN)."""
    values = np.asarray(values, dtype=float)
    if np.isnan(values).all():
        return (float("nan"), float("nan"))
    return (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))


def _bootstrap(
    kind: str, x: tuple, log_l: np.ndarray, best_theta, centre: tuple, n_boot: int, seed: int
) -> list[dict[str, float]]:
    """Refits on runs resampled with replacement (resamples too degenerate to fit are drawn again)."""
    rng = np.random.default_rng(seed)
    boot: list[dict[str, float]] = []
    n = len(log_l)
    attempts = 0
    while len(boot) < n_boot and attempts < 20 * n_boot:
        attempts += 1
        idx = rng.integers(0, n, size=n)
        if len(set(idx.tolist())) < 3:
            continue
        if kind == "ND" and (len(set(x[0][idx])) < 2 or len(set(x[1][idx])) < 2):
            continue
        # the full-data optimum as the only start: resampled data move it little
        out = _fit_once(kind, tuple(v[idx] for v in x), log_l[idx], [best_theta])
        if out is not None:
            boot.append(_to_natural(kind, out.x, centre))
    return boot


def fit_law(runs: list[dict], kind: str = "ND", *, n_boot: int = 200, seed: int = 0, compute_key: str = "C") -> dict:
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
    boot = _bootstrap(kind, x, log_l, best.x, centre, n_boot, seed)
    ci = {key: _percentile_ci([b[key] for b in boot]) for key in PARAMS[kind]}
    residuals = _predict(kind, best.x, x) - log_l
    return {
        "kind": kind,
        "params": _to_natural(kind, best.x, centre),
        "ci": ci,
        "boot": boot,
        "n_runs": len(runs),
        "n_boot": len(boot),
        "rmse_log": float(np.sqrt(np.mean(residuals**2))),
        "centre": centre,
        "theta": best.x.tolist(),
        "compute_key": compute_key,
    }


def law(kind: str, p: dict[str, float]):
    """The fitted law as a function of (N, D) or C, in natural units."""
    if kind == "ND":
        return lambda n, d: p["E"] + p["A"] / np.power(n, p["alpha"]) + p["B"] / np.power(d, p["beta"])
    return lambda c: p["E"] + p["A"] / np.power(c, p["gamma"])


def predict_budget(nd: dict, c: dict, budget: float) -> dict:
    """The compute-optimal N, D and loss for ``budget`` FLOPs, with bootstrap intervals, and what
    L(C) predicts for the same budget."""
    if not (math.isfinite(budget) and budget > 0):
        raise ScalingError(f"--budget must be a positive number of FLOPs (got {budget})")
    point = compute_optimal(nd["params"], budget)
    boots = [compute_optimal(b, budget) for b in nd["boot"]] or [point]
    ci = {k: _percentile_ci([b[k] for b in boots]) for k in point}
    return {
        "budget": budget,
        **point,
        "N_opt_ci": ci["N_opt"],
        "D_opt_ci": ci["D_opt"],
        "L_opt_ci": ci["L_opt"],
        "L_C": float(law("C", c["params"])(budget)),
    }


def law_name(fit: dict) -> str:
    return "L(N,D)" if fit["kind"] == "ND" else "L(C)"


def reliability_warnings(nd: dict, c: dict, runs: list[dict], prediction: dict | None) -> list[str]:
    """What a reader must know before trusting the fit: too few residual degrees of freedom,
    exponents the runs do not determine, a compute-optimal point far outside the grid."""
    out = []
    for fit in (nd, c):
        name, free = law_name(fit), len(PARAMS[fit["kind"]])
        dof = fit["n_runs"] - free
        if dof < 3:
            out.append(
                f"{name}: {fit['n_runs']} runs for {free} parameters leave "
                f"{dof} residual degree(s) of freedom; the estimates are barely constrained"
            )
        for key in ("alpha", "beta", "gamma"):
            if key not in fit["ci"]:
                continue
            low, high = fit["ci"][key]
            if not (math.isfinite(low) and math.isfinite(high) and low > 0 and high / low <= 10):
                out.append(f"{name}: {key} is not determined by these runs (95% CI [{low:.3g}, {high:.3g}])")
    if prediction and math.isfinite(prediction["N_opt"]):
        for key, axis in (("N_opt", "N"), ("D_opt", "D")):
            lo, hi = min(r[axis] for r in runs), max(r[axis] for r in runs)
            if not lo / 10 <= prediction[key] <= hi * 10:
                out.append(
                    f"the compute-optimal {axis} = {prediction[key]:.3g} lies more than 10x outside the "
                    f"grid's {axis} range [{lo:.3g}, {hi:.3g}]: an extrapolation, not a measurement"
                )
    return out


# ===================================================================== IsoFLOP (Approach 2)
def _parabola(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, list[float]]:
    """(centre, [c2, c1, c0]) of L = c2 x^2 + c1 x + c0 with x = log N - centre (centred for conditioning)."""
    centre = float(log_n.mean())
    return centre, [float(c) for c in np.polyfit(log_n - centre, loss, 2)]


def _vertex(log_n: np.ndarray, loss: np.ndarray) -> tuple[float, float] | None:
    """(log N, L) at the vertex of the parabola of L in log N; None when it opens downward."""
    return _parabola_vertex(*_parabola(log_n, loss))


def _parabola_vertex(centre: float, coeffs: list[float]) -> tuple[float, float] | None:
    c2, c1, c0 = coeffs
    if not c2 > 0:
        return None
    return centre - c1 / (2 * c2), c0 - c1**2 / (4 * c2)


def near_minimum(group: list[dict]) -> list[dict]:
    """The runs of one budget whose loss is within ISOFLOP_NEAR of the budget's lowest: its parabola's points."""
    lowest = min(r["nll"] for r in group)
    return [r for r in group if r["nll"] <= lowest * (1 + ISOFLOP_NEAR)]


def budget_optimum(budget: float, group: list[dict]) -> dict:
    """One budget's parabola fit (on ``near_minimum``), with the reason it is off-centre (None when usable)."""
    all_n = np.log([r["N"] for r in group])
    near = near_minimum(group)
    log_n = np.log([r["N"] for r in near])
    loss = np.array([r["nll"] for r in near])
    out = {
        "budget": budget,
        "n_runs": len(group),
        "n_near": len(near),
        "N_min": float(np.exp(all_n.min())),
        "N_max": float(np.exp(all_n.max())),
    }
    if len(set(log_n.tolist())) < 3:
        return {
            **out,
            "N_opt": float("nan"),
            "D_opt": float("nan"),
            "L_opt": float("nan"),
            "off_centre": f"budget {budget:.3g}: {len(set(log_n.tolist()))} distinct N within "
            f"{ISOFLOP_NEAR:.0%} of its lowest loss; a parabola needs 3: add sizes near the minimum",
        }
    centre, coeffs = _parabola(log_n, loss)
    vertex = _parabola_vertex(centre, coeffs)
    n_opt = float(np.exp(vertex[0])) if vertex else float("nan")
    out.update(
        {
            "parabola": {"centre": centre, "coeffs": coeffs, "log_N": [float(log_n.min()), float(log_n.max())]},
            "N_opt": n_opt,
            "D_opt": budget / (6.0 * n_opt) if vertex else float("nan"),
            "L_opt": vertex[1] if vertex else float("nan"),
        }
    )
    lowest = int(np.argmin(loss))
    if log_n[lowest] == all_n.min():
        edge, direction = "smallest", "smaller"
    elif log_n[lowest] == all_n.max():
        edge, direction = "largest", "larger"
    else:
        edge = direction = None
    if edge:
        out["off_centre"] = (
            f"budget {budget:.3g}: the lowest loss is at the {edge} N ({np.exp(log_n[lowest]):.3g}); the optimum "
            f"lies beyond the sampled sizes: extend this budget to {direction} N"
        )
    elif vertex is None:
        out["off_centre"] = (
            f"budget {budget:.3g}: the losses do not curve upward around a minimum (the parabola opens downward); "
            f"add sizes on both sides or rerun noisy points"
        )
    elif not log_n.min() <= vertex[0] <= log_n.max():
        side = "smaller" if vertex[0] < log_n.min() else "larger"
        out["off_centre"] = (
            f"budget {budget:.3g}: the parabola's vertex N = {n_opt:.3g} lies outside the sizes it was fitted on "
            f"[{np.exp(log_n.min()):.3g}, {np.exp(log_n.max()):.3g}]: extend this budget to {side} N"
        )
    else:
        out["off_centre"] = None
    return out


def _power_law(budgets: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, prefactor) of values = k C^a by least squares in log-log."""
    a, log_k = np.polyfit(np.log(budgets), np.log(values), 1)
    return float(a), float(np.exp(log_k))


def fit_isoflop(runs: list[dict], *, n_boot: int = 200, seed: int = 0) -> dict:
    """Approach 2 (Hoffmann et al. 2022): per budget a parabola of L in log N through the sizes within
    ISOFLOP_NEAR of the budget's lowest loss, its vertex N_opt(C) and D_opt = C / (6 N_opt); then
    N_opt = k C^a and D_opt = k' C^b by least squares in log-log, with 95% percentile bootstrap
    intervals (runs resampled with replacement within each budget, everything refitted). A budget
    whose lowest loss sits at its smallest or largest N, whose parabola opens downward or whose
    vertex lies outside the sizes it was fitted on is off-centre: reported in ``off_centre`` and left
    out of the exponent fit. Runs are {"budget", "N", "nll"}; C is the budget."""
    groups: dict[float, list[dict]] = {}
    for r in runs:
        if not (math.isfinite(r.get("budget", float("nan"))) and r["nll"] > 0 and math.isfinite(r["nll"])):
            continue
        groups.setdefault(float(r["budget"]), []).append(r)
    per_budget = [budget_optimum(b, groups[b]) for b in sorted(groups)]
    usable = [p for p in per_budget if p["off_centre"] is None]
    if len(usable) < 2:
        why = "; ".join(p["off_centre"] for p in per_budget if p["off_centre"]) or "no other budgets"
        raise ScalingError(
            f"Approach 2 needs at least 2 budgets with an interior minimum, {len(usable)} of {len(per_budget)} "
            f"have one ({why})"
        )
    c = np.array([p["budget"] for p in usable])
    a, k_n = _power_law(c, np.array([p["N_opt"] for p in usable]))
    b, k_d = _power_law(c, np.array([p["D_opt"] for p in usable]))
    boot = _isoflop_bootstrap([near_minimum(groups[p["budget"]]) for p in usable], c, n_boot, seed)
    return {
        "kind": "isoflop",
        "params": {"a": a, "b": b, "k_N": k_n, "k_D": k_d},
        "ci": {"a": _percentile_ci([x[0] for x in boot]), "b": _percentile_ci([x[1] for x in boot])},
        "per_budget": per_budget,
        "off_centre": [p["off_centre"] for p in per_budget if p["off_centre"]],
        "n_budgets": len(usable),
        "n_runs": sum(p["n_near"] for p in usable),
        "n_boot": len(boot),
    }


def _isoflop_bootstrap(groups: list[list[dict]], budgets: np.ndarray, n_boot: int, seed: int) -> list[tuple]:
    """(a, b) of refits on runs resampled within each budget (a resample whose parabola has no
    minimum is drawn again)."""
    rng = np.random.default_rng(seed)
    data = [(np.log([r["N"] for r in g]), np.array([r["nll"] for r in g])) for g in groups]
    out: list[tuple] = []
    attempts = 0
    while len(out) < n_boot and attempts < 20 * n_boot:
        attempts += 1
        log_opt = []
        for log_n, loss in data:
            idx = rng.integers(0, len(loss), size=len(loss))
            vertex = _vertex(log_n[idx], loss[idx]) if len(set(log_n[idx].tolist())) >= 3 else None
            if vertex is None:
                break
            log_opt.append(vertex[0])
        if len(log_opt) < len(data):
            continue
        n_opt = np.exp(log_opt)
        out.append((_power_law(budgets, n_opt)[0], _power_law(budgets, budgets / (6.0 * n_opt))[0]))
    return out


def implied_exponents(nd: dict) -> dict:
    """Approach 3's compute-optimal exponents from L(N, D): N_opt ~ C^(beta/(alpha+beta)) and
    D_opt ~ C^(alpha/(alpha+beta)), with intervals from the bootstrap fits."""

    def split(p: dict) -> tuple[float, float]:
        total = p["alpha"] + p["beta"]
        return (float(p["beta"] / total), float(p["alpha"] / total)) if total > 0 else (float("nan"), float("nan"))

    a, b = split(nd["params"])
    boots = [split(p) for p in nd["boot"]]
    return {
        "a": a,
        "b": b,
        "ci": {"a": _percentile_ci([x[0] for x in boots]), "b": _percentile_ci([x[1] for x in boots])},
    }

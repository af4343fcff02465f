"""Tables and plots of sweeps and scaling grids: files on disk, nothing else (no MLflow, no Ray).

Sweeps: ``summary.csv``, ``summary.md`` (sorted by the metric, the best trial marked),
``summary.json`` and ``<metric>_vs_params.png``. Scaling: the plan's table, ``fit.csv``,
``fit.md`` (with the fit's reliability warnings and the compute-optimal exponents of Approach 3,
L(N, D), beside Approach 2's IsoFLOP parabolas when the runs carry budgets), ``runs.csv``, ``fit.json`` and
``scaling_fit.png``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.figures import pyplot
from pipeline.sweeps.fit import (
    ISOFLOP_NEAR,
    PARAMS,
    budget_optimum,
    compute_optimal,
    law,
    law_name,
    reliability_warnings,
)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# ----------------------------------------------------------------------------------- sweeps
def write_summary(rows: list[dict], space: dict, metric: str, out_dir: Path, best, mode: str = "min") -> dict:
    """The sweep's trials as CSV, a Markdown table sorted best first, and JSON."""
    keys = list(space)
    header = ["trial_id", "status", "step", metric, *keys, "mlflow_run_id"]
    table = [
        [r["trial_id"], r["status"], r["step"], r["metric"], *[r["params"][k] for k in keys], r.get("mlflow_run_id")]
        for r in rows
    ]
    csv_path = out_dir / "summary.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    sign = 1 if mode == "min" else -1
    order = sorted(range(len(rows)), key=lambda i: (not math.isfinite(rows[i]["metric"]), sign * rows[i]["metric"]))
    lines = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    for i in order:
        mark = " **best**" if best is not None and rows[i]["trial_id"] == best["trial_id"] else ""
        lines.append("| " + " | ".join(_fmt(v) for v in table[i][:-1]) + mark + " |")
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(lines) + "\n")
    json_path = out_dir / "summary.json"
    json_path.write_text(json.dumps({"rows": rows, "best": best}, indent=1, default=str))
    return {"csv": csv_path, "markdown": md_path, "json": json_path}


def _sweep_panel(ax, key: str, domain, rows: list[dict], metric: str, best) -> None:
    # lazy: tune_spaces imports ray; this module stays Ray-free (scaling, imported by build_parser, imports it)
    from tune_spaces.common import is_log_scale

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
        ax.scatter(
            [x], [row["metric"]], s=40, facecolors="C0" if done else "none", edgecolors="C0" if done else "C3", zorder=3
        )
        if best is not None and row["trial_id"] == best["trial_id"]:
            ax.scatter([x], [row["metric"]], marker="*", s=220, color="gold", edgecolors="k", zorder=4)
    if numeric and is_log_scale(domain):
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)


def plot_sweep(rows: list[dict], space: dict, metric: str, path: Path, best) -> Path:
    """One panel per searched key: the metric against the sampled value (log x for log domains);
    filled = ran to the end, hollow = stopped early, star = best."""
    from tune_spaces.common import support  # lazy: as in _sweep_panel

    def varies(domain) -> bool:
        info = support(domain)
        return info["kind"] != "values" or len(set(map(str, info["values"]))) > 1

    keys = [k for k in space if varies(space[k])] or list(space)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _sweep_panel(ax, key, space[key], rows, metric, best)
    fig.suptitle("filled: ran to max_t   hollow red: stopped early   star: best", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------- scaling
def plan_table(plan: dict) -> str:
    """The plan's points; an IsoFLOP plan adds each point's budget and how far its C is from it."""
    iso = plan.get("kind") == "isoflop"
    head = "| id | width | depth | steps | fraction | N | D | C = 6ND | C measured |"
    head += " budget | C / budget |" if iso else ""
    lines = [head, "|" + "---|" * (11 if iso else 9)]
    for e in plan["entries"]:
        line = (
            f"| {e['id']} | {e['width']} | {e['depth']} | {e['steps']} | {e['fraction']:g} "
            f"| {e['N']:,} | {e['D']:.3g} | {e['C']:.3g} | {e['C_measured']:.3g} |"
        )
        lines.append(line + (f" {e['budget']:.3g} | {e['C'] / e['budget']:.4f} |" if iso else ""))
    return "\n".join(lines) + "\n"


def _fit_markdown(rows: list[dict], nd: dict, c: dict, prediction: dict | None, warnings: list[str]) -> str:
    md = ["| law | parameter | estimate | 95% CI |", "|---|---|---|---|"]
    md += [
        f"| {r['law']} | {r['param']} | {_fmt(r['estimate'])} | [{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}] |"
        for r in rows
    ]
    md.append("")
    md.append(
        f"L(N,D): {nd['n_runs']} runs, {nd['n_boot']} bootstrap fits, RMSE(log L) "
        f"{nd['rmse_log']:.4f}. L(C) on {c['compute_key']}: RMSE(log L) {c['rmse_log']:.4f}."
    )
    if prediction:
        md.append("")
        md.append(
            f"Compute-optimal for C = {prediction['budget']:.3g} FLOPs (C = 6ND): "
            f"N = {prediction['N_opt']:.3g} [{prediction['N_opt_ci'][0]:.3g}, "
            f"{prediction['N_opt_ci'][1]:.3g}], D = {prediction['D_opt']:.3g} "
            f"[{prediction['D_opt_ci'][0]:.3g}, {prediction['D_opt_ci'][1]:.3g}], predicted "
            f"L = {prediction['L_opt']:.4g}; L(C) predicts {prediction['L_C']:.4g}."
        )
    if warnings:
        md.append("")
        md += [f"WARNING: {w}" for w in warnings]
    return "\n".join(md) + "\n"


def _ci(pair) -> str:
    return f"[{_fmt(float(pair[0]))}, {_fmt(float(pair[1]))}]"


def _exponents_markdown(exponents: dict) -> str:
    """Both approaches' compute-optimal exponents side by side, and Approach 2's budgets."""
    md = [
        "",
        "Compute-optimal exponents, N_opt ~ C^a and D_opt ~ C^b (C = 6ND; 95% bootstrap CIs):",
        "",
        "| approach | a | 95% CI | b | 95% CI | from |",
        "|---|---|---|---|---|---|",
    ]
    three = exponents["approach3"]
    md.append(
        f"| 3: L(N,D) fit, a = beta/(alpha+beta) | {_fmt(three['a'])} | {_ci(three['ci']['a'])} "
        f"| {_fmt(three['b'])} | {_ci(three['ci']['b'])} | all runs |"
    )
    two = exponents.get("approach2")
    if two:
        p = two["params"]
        md.append(
            f"| 2: IsoFLOP parabolas | {_fmt(p['a'])} | {_ci(two['ci']['a'])} | {_fmt(p['b'])} | {_ci(two['ci']['b'])} "
            f"| {two['n_budgets']} budgets, {two['n_runs']} runs, {two['n_boot']} bootstrap fits |"
        )
        md += [
            "",
            "| budget C | runs (in the parabola) | N range | N_opt (vertex) | D_opt | used |",
            "|---|---|---|---|---|---|",
        ]
        for b in two["per_budget"]:
            md.append(
                f"| {b['budget']:.3g} | {b['n_runs']} ({b['n_near']}) | [{b['N_min']:.3g}, {b['N_max']:.3g}] "
                f"| {b['N_opt']:.3g} | {b['D_opt']:.3g} | {'no: off-centre' if b['off_centre'] else 'yes'} |"
            )
        if two["off_centre"]:
            md += ["", *(f"OFF-CENTRE (left out of Approach 2): {m}" for m in two["off_centre"])]
    if exponents.get("approach2_error"):
        md += ["", f"Approach 2 not fitted: {exponents['approach2_error']}"]
    return "\n".join(md) + "\n"


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_fit_tables(
    nd: dict, c: dict, runs: list[dict], prediction: dict | None, out: Path, exponents: dict | None = None
) -> dict:
    """fit.csv, fit.md, runs.csv and fit.json of a scaling fit; ``exponents``
    (``scaling.optimal_exponents``) adds both approaches' compute-optimal exponents to fit.md and fit.json."""
    rows = [
        {
            "law": law_name(fit),
            "param": key,
            "estimate": fit["params"][key],
            "ci95_low": fit["ci"][key][0],
            "ci95_high": fit["ci"][key][1],
        }
        for fit in (nd, c)
        for key in PARAMS[fit["kind"]]
    ]
    warnings = reliability_warnings(nd, c, runs, prediction)
    md_path = out / "fit.md"
    md_path.write_text(
        _fit_markdown(rows, nd, c, prediction, warnings) + (_exponents_markdown(exponents) if exponents else "")
    )
    json_path = out / "fit.json"
    json_path.write_text(
        json.dumps(
            {
                "ND": {k: v for k, v in nd.items() if k != "boot"},
                "C": {k: v for k, v in c.items() if k != "boot"},
                "prediction": prediction,
                "warnings": warnings,
                "exponents": exponents,
            },
            indent=1,
            default=float,
        )
    )
    return {
        "csv": _write_csv(out / "fit.csv", list(rows[0]), rows),
        "markdown": md_path,
        "runs": _write_csv(
            out / "runs.csv", ["name", "run_id", "N", "D", "C", "C_measured", "budget", "nll", "metric", "status"], runs
        ),
        "json": json_path,
    }


def _against(ax, xs, ys, groups, curve, grid, cmap, label: str) -> None:
    """Runs as points coloured by their value of the other axis, with the fitted curve of each."""
    levels = sorted(set(groups))
    for i, level in enumerate(levels):
        color = cmap(i / max(len(levels) - 1, 1))
        mask = groups == level
        ax.scatter(xs[mask], ys[mask], color=color, label=label.format(level), zorder=3)
        ax.plot(grid, curve(grid, level), color=color, alpha=0.7)


def plot_fit(nd: dict, c: dict, runs: list[dict], path: Path, prediction: dict | None = None, title: str = "") -> Path:
    """L(N, D) against N and against D, and L(C) with the compute-optimal frontier."""
    plt = pyplot()
    f_nd, f_c = law("ND", nd["params"]), law("C", c["params"])
    n_all, d_all = np.array([r["N"] for r in runs]), np.array([r["D"] for r in runs])
    c_all, l_all = np.array([r[c["compute_key"]] for r in runs]), np.array([r["nll"] for r in runs])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    _against(
        axes[0],
        n_all,
        l_all,
        d_all,
        f_nd,
        np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 100),
        plt.get_cmap("viridis"),
        "D={:.2g}",
    )
    axes[0].set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="final val NLL", title="L(N, D) against N")
    _against(
        axes[1],
        d_all,
        l_all,
        n_all,
        lambda d, n: f_nd(n, d),
        np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100),
        plt.get_cmap("plasma"),
        "N={:.3g}",
    )
    axes[1].set(xscale="log", xlabel="D (data dimensions seen)", title="L(N, D) against D")
    c_hi = max(c_all.max() * 2, prediction["budget"] * 1.5 if prediction else 0)
    grid_c = np.geomspace(c_all.min() / 2, c_hi, 150)
    p, g_c = nd["params"], c["params"]
    axes[2].scatter(c_all, l_all, color="k", s=18, zorder=3, label="runs")
    axes[2].plot(grid_c, f_c(grid_c), color="C0", label=f"L(C) = {g_c['E']:.3g} + {g_c['A']:.3g}/C^{g_c['gamma']:.3g}")
    axes[2].plot(
        grid_c, [compute_optimal(p, cc)["L_opt"] for cc in grid_c], color="C3", ls="--", label="compute-optimal L(N, D)"
    )
    if prediction:
        axes[2].scatter(
            [prediction["budget"]],
            [prediction["L_opt"]],
            marker="*",
            s=200,
            color="gold",
            edgecolors="k",
            zorder=4,
            label=f"budget: N={prediction['N_opt']:.2g}, D={prediction['D_opt']:.2g}",
        )
    axes[2].set(xscale="log", xlabel=f"C ({'6ND' if c['compute_key'] == 'C' else 'counted'} FLOPs)", title="L(C)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    (a_lo, a_hi), (b_lo, b_hi) = nd["ci"]["alpha"], nd["ci"]["beta"]
    fig.suptitle(
        f"{title}  alpha = {p['alpha']:.3g} [{a_lo:.3g}, {a_hi:.3g}]   beta = {p['beta']:.3g} "
        f"[{b_lo:.3g}, {b_hi:.3g}]   E = {p['E']:.3g}",
        fontsize=10,
    )
    return _save(fig, path)


def plot_isoflop(runs: list[dict], nd: dict, exponents: dict, path: Path, title: str = "") -> Path:
    """IsoFLOP curves (L against N per budget, each budget's parabola and vertex) and N_opt(C), D_opt(C):
    Approach 2's vertices with their power law beside Approach 3's compute-optimal line from L(N, D)."""
    plt = pyplot()
    two = exponents.get("approach2") or {}
    per_budget = {b["budget"]: b for b in two.get("per_budget", [])}
    budgets = sorted({float(r["budget"]) for r in runs if math.isfinite(r.get("budget", float("nan")))})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cmap = plt.get_cmap("viridis")
    for i, budget in enumerate(budgets):
        color = cmap(i / max(len(budgets) - 1, 1))
        group = sorted((r for r in runs if r.get("budget") == budget and math.isfinite(r["nll"])), key=lambda r: r["N"])
        log_n, loss = np.log([r["N"] for r in group]), np.array([r["nll"] for r in group])
        found = per_budget.get(budget, {})
        marker = "o" if found.get("off_centre") is None and found else "x"
        axes[0].scatter(np.exp(log_n), loss, color=color, marker=marker, zorder=3, label=f"C={budget:.2g}")
        parabola = budget_optimum(budget, group).get("parabola") if group else None  # Approach 2's own fit
        if parabola:  # drawn over the sizes it was fitted on
            grid = np.linspace(parabola["log_N"][0] - 0.2, parabola["log_N"][1] + 0.2, 80)
            axes[0].plot(
                np.exp(grid), np.polyval(parabola["coeffs"], grid - parabola["centre"]), color=color, alpha=0.7
            )
        if math.isfinite(found.get("N_opt", float("nan"))):
            vertex = ([found["N_opt"]], [found["L_opt"]])
            axes[0].scatter(*vertex, marker="*", s=160, color=color, edgecolors="k", zorder=4)
    axes[0].set(xscale="log", xlabel="N (non-embedding parameters)", ylabel="final val NLL", title="IsoFLOP curves")
    c_grid = np.geomspace(budgets[0] / 2, budgets[-1] * 2, 60) if budgets else np.array([])
    three = [compute_optimal(nd["params"], c) for c in c_grid]
    for ax, key, exponent in ((axes[1], "N_opt", "a"), (axes[2], "D_opt", "b")):
        used = [b for b in per_budget.values() if b["off_centre"] is None]
        left = [b for b in per_budget.values() if b["off_centre"] is not None and math.isfinite(b[key])]
        ax.scatter([b["budget"] for b in used], [b[key] for b in used], color="C3", zorder=3, label="vertices (used)")
        if left:
            ax.scatter([b["budget"] for b in left], [b[key] for b in left], color="C3", marker="x", label="off-centre")
        if two.get("params"):
            p, (low, high) = two["params"], two["ci"][exponent]
            k = p["k_N"] if key == "N_opt" else p["k_D"]
            label = f"Approach 2: C^{p[exponent]:.2f} [{low:.2f}, {high:.2f}]"
            ax.plot(c_grid, k * c_grid ** p[exponent], color="C3", label=label)
        a3, (low, high) = exponents["approach3"][exponent], exponents["approach3"]["ci"][exponent]
        label = f"Approach 3: C^{a3:.2f} [{low:.2f}, {high:.2f}]"
        ax.plot(c_grid, [t[key] for t in three], color="C0", ls="--", label=label)
        ax.set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)", ylabel=key, title=f"{key}(C)")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # a span under a decade labels every minor tick
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{title}  IsoFLOP: o used, x off-centre (left out of Approach 2); parabolas through the sizes within "
        f"{ISOFLOP_NEAR:.0%} of each budget's lowest loss",
        fontsize=10,
    )
    return _save(fig, path)

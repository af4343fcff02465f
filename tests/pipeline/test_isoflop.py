"""IsoFLOP planning and the two compute-optimal fits (pipeline/sweeps), without Ray or training.

The planner must spend each budget (realised C = 6ND within 5%) with K sizes around the expected
optimum of a real preset (networks on the meta device). On synthetic runs from a known
L(N, D) = E + A/N^alpha + B/D^beta with 1% multiplicative noise on an IsoFLOP grid, Approach 2
(parabolas per budget) and Approach 3 (the L(N, D) fit) must both hold the true N_opt exponent
beta/(alpha+beta) inside their bootstrap intervals; an off-centre budget is reported and left out;
CLI mistakes exit 2 naming the option. One sqlite MLflow store checks that `bfn scaling fit` reads
budgets back and reports both approaches side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.sweeps import fit as F
from pipeline.sweeps import scaling as S
from pipeline.sweeps import store

TRUE = {"E": 1.2, "A": 30.0, "alpha": 0.35, "B": 200.0, "beta": 0.3}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ~ C^a under L(N, D): 0.4615
BUDGETS = np.geomspace(1e15, 1e19, 5)


def truth(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def isoflop_runs(seed=0, noise=0.01, shift=None) -> list[dict]:
    """Seven sizes per budget over a factor 16 around the true optimum (``shift``: {budget index:
    factor} moves that budget's sizes off it), each trained with D = C / (6N)."""
    rng = np.random.default_rng(seed)
    runs = []
    for i, c in enumerate(BUDGETS):
        centre = F.compute_optimal(TRUE, c)["N_opt"] * (shift or {}).get(i, 1.0)
        for n in centre * np.geomspace(1 / 4, 4, 7):
            d = c / (6 * n)
            nll = truth(n, d) * math.exp(rng.normal(0, noise))
            runs.append({"budget": float(c), "N": n, "D": d, "C": 6 * n * d, "C_measured": 2.4 * n * d, "nll": nll})
    return runs


# ---------------------------------------------------------------------------------- planner
def test_isoflop_plan_spends_each_budget_around_the_expected_optimum(tmp_path):
    budgets, sizes = [1e14, 1e15], 5
    plan = S.make_isoflop_plan("iso", ["experiment=mnist_local"], budgets=budgets, sizes=sizes)
    assert plan["kind"] == "isoflop" and plan["budgets"] == budgets and plan["metric"] == "val/nll_bits_per_dim"
    dims = 784 * plan["batch_size"]
    for budget in budgets:
        points = [e for e in plan["entries"] if e["budget"] == budget]
        assert len(points) == sizes and len({e["width"] for e in points}) == sizes
        assert {e["depth"] for e in points} == {1}  # the preset's depth
        ns = sorted(e["N"] for e in points)
        n_opt = math.sqrt(budget / (6 * 20))
        assert ns[0] < n_opt < ns[-1]  # bracketed ...
        assert abs(math.log(math.sqrt(ns[0] * ns[-1]) / n_opt)) < math.log(1.5)  # ... and centred in log N
        for e in points:
            assert e["steps"] == max(1, round(budget / (6 * e["N"] * dims)))
            assert e["C"] == 6.0 * e["N"] * e["steps"] * dims
            assert abs(e["C"] / budget - 1) <= 0.05, (e["id"], e["C"], budget)
            assert store.grid_params(e, plan["metric"])["scaling.budget"] == budget
    out = S.write_plan(plan, tmp_path / "plan.json")
    table = out.with_suffix(".md").read_text()
    assert "| budget | C / budget |" in table and "b1e14-w" in table
    # the grid planner's plans are unchanged: no budget, no kind
    assert "kind" not in S.make_plan("g", ["experiment=smoke"], widths=[8], depths=[1], steps=[4])


def test_an_explicit_pinned_argument_gives_finer_widths_and_no_time_budget_cuts_a_point():
    """GroupNorm's 8 groups leave the small U-Nets too coarse for 5 sizes at 1e13 FLOPs; the user's
    net.kwargs.norm_groups=4 replaces the family's pinned 8 (widths in steps of 4). The preset's
    trainer.max_minutes would stop a point before it spends its budget: plans run without one."""
    base = ["experiment=mnist_local"]
    with pytest.raises(S.ScalingError, match="only 4 distinct widths"):
        S.make_isoflop_plan("iso", base, budgets=[1e13], sizes=5)
    plan = S.make_isoflop_plan("iso", [*base, "net.kwargs.norm_groups=4"], budgets=[1e13], sizes=5)
    widths = [e["width"] for e in plan["entries"]]
    assert len(set(widths)) == 5 and any(w % 8 for w in widths)
    assert all("++net.kwargs.norm_groups=4" in e["overrides"] for e in plan["entries"])
    assert plan["base_overrides"][0] == "trainer.max_minutes=0"
    timed = S.make_isoflop_plan("iso", [*base, "trainer.max_minutes=30"], budgets=[1e14], sizes=3)
    assert "trainer.max_minutes=0" not in timed["base_overrides"]


def test_points_shorter_than_the_ema_horizon_are_reported(caplog):
    """mnist_local's EMA (0.995, 200 steps) would score 1e13's largest points (61 steps) mostly on
    their initial weights; optim.ema_decay=0 scores the last weights and silences the warning."""
    overrides = ["experiment=mnist_local", "net.kwargs.norm_groups=4"]
    with caplog.at_level("WARNING", logger="pipeline.sweeps.scaling"):
        S.make_isoflop_plan("iso", overrides, budgets=[1e13], sizes=5)
    assert "fewer than 3 EMA time constants (optim.ema_decay=0.995: 200 steps)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.sweeps.scaling"):
        S.make_isoflop_plan("iso", [*overrides, "optim.ema_decay=0"], budgets=[1e13], sizes=5)
    assert "EMA" not in caplog.text


def test_a_point_that_stopped_before_its_steps_has_no_final_nll(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("scaling"))
    metrics = [Metric("val/nll_bits_per_dim", 0.3, 0, 40)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param("scaling.N", "10")])
    assert math.isnan(store.finalize_point(uri, run.info.run_id, "val/nll_bits_per_dim", {}, steps=50))
    assert store.finalize_point(uri, run.info.run_id, "val/nll_bits_per_dim", {}, steps=40) == 0.3


def test_isoflop_plan_refuses_a_budget_it_cannot_spend():
    """At 1e11 FLOPs the optimum (N ~ 2.9e4) is below the smallest U-Net of mnist_local."""
    with pytest.raises(S.ScalingError, match=r"--budgets 1e\+11: the expected optimum"):
        S.make_isoflop_plan("iso", ["experiment=mnist_local"], budgets=[1e11], sizes=3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budgets", "1e14,abc"], "--budgets must be positive numbers"),
        (["--budgets", "1e14,-3e14"], "--budgets must be positive numbers"),
        (["--budgets", "1e14", "--sizes", "2"], "--sizes must be at least 3"),
        (["--budgets", "1e14", "--tokens-per-param", "0"], "--tokens-per-param must be a positive number"),
        (["--budgets", "1e14", "--widths", "8,16"], "--widths: not with --isoflop"),
    ],
)
def test_isoflop_cli_errors_name_the_option(options, message, tmp_path, capsys):
    code = cli.main(["scaling", "plan", "--isoflop", *options, "--out", str(tmp_path / "p.json"), "experiment=smoke"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bfn: error: scaling: ") and message in err, err


def test_budgets_without_isoflop_are_refused(capsys):
    assert cli.main(["scaling", "plan", "--budgets", "1e14", "experiment=smoke"]) == 2
    assert "--budgets: only with --isoflop" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- fits
def test_both_approaches_recover_the_n_opt_exponent():
    runs = isoflop_runs()
    two = F.fit_isoflop(runs, n_boot=200, seed=0)
    assert two["off_centre"] == [] and two["n_budgets"] == 5 and two["n_boot"] == 200
    low, high = two["ci"]["a"]
    assert low <= TRUE_A <= high, (two["params"]["a"], (low, high))
    assert abs(two["params"]["a"] - TRUE_A) < 0.05
    assert math.isclose(two["params"]["a"] + two["params"]["b"], 1.0)  # D_opt = C / (6 N_opt)
    three = F.implied_exponents(F.fit_law(runs, "ND", n_boot=60, seed=1))
    low, high = three["ci"]["a"]
    assert low <= TRUE_A <= high, (three["a"], (low, high))
    assert abs(three["a"] - TRUE_A) < 0.05
    lo_b, hi_b = three["ci"]["b"]
    assert lo_b <= 1 - TRUE_A <= hi_b


def test_an_off_centre_budget_is_reported_and_left_out():
    """Budget 2's sizes all lie above its optimum (x6 to x96): named, with the direction to extend."""
    runs = isoflop_runs(shift={2: 24.0})
    two = F.fit_isoflop(runs, n_boot=50)
    assert two["n_budgets"] == 4 and len(two["off_centre"]) == 1
    message = two["off_centre"][0]
    assert message.startswith("budget 1e+17: the lowest loss is at the smallest N") and "to smaller N" in message
    assert [b["off_centre"] is None for b in two["per_budget"]] == [True, True, False, True, True]
    assert two["n_runs"] == 28
    # all but one off-centre: no exponent from one budget
    shifted = isoflop_runs(shift={0: 1 / 24, 1: 24.0, 2: 24.0, 3: 24.0})
    with pytest.raises(S.ScalingError, match=r"at least 2 budgets with an interior minimum, 1 of 5.*to larger N"):
        F.fit_isoflop(shifted, n_boot=10)


def test_a_grid_without_budgets_skips_approach_2():
    runs = [{**r, "budget": float("nan")} for r in isoflop_runs()]
    exponents = S.optimal_exponents(F.fit_law(runs, "ND", n_boot=5), runs, n_boot=5)
    assert set(exponents) == {"approach3"}


# --------------------------------------------------------------------- through MLflow (sqlite)
def test_fit_reads_budgets_and_reports_both_approaches(tmp_path):
    """The runs as `bfn scaling run` leaves them: children of the study run, which then holds the study's
    totals and, once fitted, the fit's tables and plots."""
    from pipeline.config import load

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load(["experiment=smoke", f"tracking.uri={uri}", "tracking.experiment=scaling"])
    study = store.open_study(cfg, "iso", {"scaling.kind": "isoflop"})
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("scaling").experiment_id
    results = []
    for i, r in enumerate(isoflop_runs(shift={4: 1 / 24})):
        entry = {k: r[k] for k in ("N", "D", "C", "C_measured", "budget")}
        tags = {**store.grid_tags("iso", f"p{i}"), "mlflow.parentRunId": study.run_id}
        run = client.create_run(exp_id, run_name=f"iso-p{i}", tags=tags)
        params = [Param(k, str(v)) for k, v in store.grid_params(entry, "val/nll_bits_per_dim").items()]
        client.log_batch(run.info.run_id, metrics=[Metric(store.FINAL_NLL, r["nll"], 0, 0)], params=params)
        client.set_terminated(run.info.run_id)
        results.append({"id": f"p{i}", "nll": r["nll"], "run_id": run.info.run_id, "C": entry["C"]})
    store.close_study(study, uri, "scaling", "iso", results[0], wall=12.5)
    totals = client.get_run(study.run_id).data.metrics
    assert totals["study/points_finished"] == len(results) and totals["study/invocation_wall_s"] == 12.5
    assert totals["study/C_total"] == pytest.approx(sum(r["C"] for r in results), rel=1e-6)
    result = S.fit_grid(uri, "scaling", "iso", n_boot=40, out_dir=tmp_path / "out", artifact_location=str(tmp_path))
    assert len(result["runs"]) == len(results)  # the study run is no grid point
    shown = {a.path for a in client.list_artifacts(study.run_id, "fit")}
    assert {"fit/fit.md", "fit/scaling_fit.png", "fit/isoflop.png"} <= shown, shown
    assert client.get_run(study.run_id).data.tags["bfn.fit_run_id"] == result["mlflow_run_id"]
    assert {r["budget"] for r in result["runs"]} == set(BUDGETS.tolist())
    md = Path(result["files"]["markdown"]).read_text()
    assert "| 3: L(N,D) fit, a = beta/(alpha+beta) |" in md and "| 2: IsoFLOP parabolas |" in md
    assert "OFF-CENTRE (left out of Approach 2): budget 1e+19: the lowest loss is at the largest N" in md
    assert "| alpha |" in md  # the L(N, D) table is still there
    saved = json.loads(Path(result["files"]["json"]).read_text())["exponents"]
    assert saved["approach2"]["n_budgets"] == 4
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    assert metrics["fit/approach2/a"] == pytest.approx(result["exponents"]["approach2"]["params"]["a"])
    assert "fit/approach3/a_ci_low" in metrics


def test_a_parabola_is_fitted_near_the_minimum_not_through_untrained_sizes():
    """A widened budget holds sizes far above its optimum that barely trained (loss near the initial one):
    the parabola uses the sizes within ISOFLOP_NEAR of the lowest loss, so its vertex is the true optimum."""
    true_log_opt = math.log(2e4)
    sizes = np.geomspace(3e3, 3e5, 9)
    runs = []
    for budget, shift in ((1e12, 0.0), (1e13, math.log(3.0))):
        for n in sizes * math.exp(shift):
            loss = 4.4 + 0.3 * (math.log(n) - true_log_opt - shift) ** 2
            runs.append({"budget": budget, "N": float(n), "nll": loss if loss < 6 else 14.0})  # untrained: flat 14
    two = F.fit_isoflop(runs, n_boot=20)
    assert two["off_centre"] == [] and all(b["n_near"] < b["n_runs"] for b in two["per_budget"])
    assert two["per_budget"][0]["N_opt"] == pytest.approx(2e4, rel=0.01)
    assert two["params"]["a"] == pytest.approx(math.log(3.0) / math.log(10.0), rel=0.01)
    # through every size, the flat untrained losses drag the vertex away
    far = F._vertex(np.log([r["N"] for r in runs[:9]]), np.array([r["nll"] for r in runs[:9]]))
    assert far is None or abs(far[0] - true_log_opt) > 0.1  # >10% off in N_opt

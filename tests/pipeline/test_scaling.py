"""Scaling-law fits (pipeline/sweeps) on synthetic runs logged to a real MLflow sqlite store.

Runs are generated from a known L(N, D) = E + A/N^alpha + B/D^beta with 0.5% multiplicative
noise and logged as `bfn scaling run` leaves them (N, D, C as params, the final NLL as a metric);
`fit_grid` must read them back, recover alpha and beta inside its bootstrap CIs,
write the plot and tables, log them to MLflow, and refuse too few runs or a NaN NLL. Also: the
plan of a real preset (N, D, C per grid point) without training. No Ray runtime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.sweeps import scaling as S
from pipeline.sweeps import store

TRUE = {"E": 1.2, "A": 30.0, "alpha": 0.35, "B": 200.0, "beta": 0.3}


def truth(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def log_runs(uri: str, name: str, points: list[tuple[float, float, float]], experiment="scaling"):
    """Grid runs as `bfn scaling run` leaves them (store.grid_tags/grid_params, then
    store.finalize_point), with a validation curve whose last value is the final NLL."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    for i, (n, d, nll) in enumerate(points):
        entry = {"N": int(n), "D": int(d), "C": 6.0 * int(n) * int(d), "C_measured": 2.4 * n * d}
        run = client.create_run(exp_id, run_name=f"{name}-p{i}", tags=store.grid_tags(name, f"p{i}"))
        params = [Param(k, str(v)) for k, v in store.grid_params(entry, "val/nll_bits_per_dim").items()]
        curve = [Metric("val/nll_bits_per_dim", value, 0, step) for value, step in ((2 * nll, 5), (nll, 10))]
        client.log_batch(run.info.run_id, metrics=curve, params=params)
        client.set_terminated(run.info.run_id)
        final = store.finalize_point(uri, run.info.run_id, "val/nll_bits_per_dim", {})
        assert final == nll or (math.isnan(final) and math.isnan(nll))
    return client


def synthetic(seed=0, noise=0.005):
    rng = np.random.default_rng(seed)
    ns = np.geomspace(1e4, 3e6, 5)
    ds = np.geomspace(1e6, 3e9, 5)
    return [(n, d, truth(n, d) * math.exp(rng.normal(0, noise))) for n in ns for d in ds]


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    """One sqlite store for the module (a new one costs ~5 s of schema migrations); every test
    logs its own grid name."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    log_runs(uri, "synthetic", synthetic())
    return uri, root


def test_fit_recovers_exponents_within_ci(grid_store, tmp_path):
    uri, root = grid_store
    result = S.fit_grid(
        uri,
        "scaling",
        "synthetic",
        budget=1e18,
        n_boot=60,
        seed=1,
        out_dir=tmp_path / "out",
        artifact_location=str(root / "art"),
    )
    nd = result["ND"]
    assert nd["n_runs"] == 25 and nd["n_boot"] >= 55
    for key in ("alpha", "beta", "E"):
        low, high = nd["ci"][key]
        assert low <= TRUE[key] <= high, (key, nd["params"][key], (low, high))
        assert abs(nd["params"][key] - TRUE[key]) < 0.1 * TRUE[key] + 0.02, (key, nd["params"][key])
    assert nd["ci"]["alpha"][1] - nd["ci"]["alpha"][0] < 0.2  # informative, not a huge interval
    # L(C): a positive exponent; the compute-optimal split of the budget under the true law
    assert 0 < result["C"]["params"]["gamma"] < 1
    pred = result["prediction"]
    want = S.compute_optimal(TRUE, 1e18)
    assert pred["N_opt_ci"][0] <= want["N_opt"] <= pred["N_opt_ci"][1]
    assert math.isclose(6 * pred["N_opt"] * pred["D_opt"], 1e18, rel_tol=1e-9)
    # files and the MLflow fit run
    for key in ("plot", "csv", "markdown", "runs", "json"):
        assert (tmp_path / "out").joinpath(result["files"][key]).exists(), key
    assert result["files"]["plot"].endswith(".png")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags[store.GRID_ROLE_TAG] == "fit" and run.info.status == "FINISHED"
    assert abs(run.data.metrics["fit/ND/alpha"] - nd["params"]["alpha"]) < 1e-9
    names = {a.path for a in client.list_artifacts(run.info.run_id, "scaling")}
    assert {"scaling/scaling_fit.png", "scaling/fit.csv", "scaling/fit.md"} <= names
    # the fit run is not read back as a grid run
    assert len(store.read_grid(uri, "scaling", "synthetic")) == 25
    # a well-determined fit: no warning but that the optimum for 1e18 FLOPs (D = 3.2e10) lies
    # beyond 10x the grid's largest D
    warnings = json.loads(Path(result["files"]["json"]).read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("the compute-optimal D = "), warnings


def test_an_underdetermined_fit_says_so(grid_store, tmp_path):
    """Six noisy runs (the tiny CPU grid's size) for five parameters: the table still comes out,
    with warnings about the degrees of freedom, the exponents and the extrapolated optimum."""
    uri, root = grid_store
    rng = np.random.default_rng(3)
    points = [(n, d, truth(n, d) * math.exp(rng.normal(0, 0.2))) for n in (1e4, 2e4, 4e4) for d in (1e6, 2e6)]
    log_runs(uri, "tiny", points)
    result = S.fit_grid(
        uri, "scaling", "tiny", budget=1e22, n_boot=20, out_dir=tmp_path / "out", artifact_location=str(root / "art")
    )
    warnings = json.loads(Path(result["files"]["json"]).read_text())["warnings"]
    text = " | ".join(warnings)
    assert "L(N,D): 6 runs for 5 parameters leave 1 residual degree(s) of freedom" in text
    assert "lies more than 10x outside the grid's" in text, text
    md = Path(result["files"]["markdown"]).read_text()
    assert all(f"WARNING: {w}" in md for w in warnings)


def test_compute_optimal_is_the_minimum_along_the_budget():
    budget = 1e17
    opt = S.compute_optimal(TRUE, budget)
    f = S.law("ND", TRUE)
    for factor in (0.5, 0.8, 1.25, 2.0):
        n = opt["N_opt"] * factor
        assert f(n, budget / (6 * n)) > opt["L_opt"]


def test_rejects_too_few_runs(grid_store, tmp_path, capsys):
    uri, _ = grid_store
    log_runs(uri, "small", synthetic()[:5])
    with pytest.raises(S.ScalingError, match=r"too few runs.*5 found, 5 free parameters need at least 6"):
        S.fit_grid(uri, "scaling", "small", out_dir=tmp_path / "o", log_to_mlflow=False)
    from pipeline import cli

    # through the CLI: one line, exit status 2
    code = cli.main(
        [
            "scaling",
            "fit",
            "--name",
            "small",
            f"tracking.uri={uri}",
            "tracking.experiment=scaling",
            f"paths.runs_dir={tmp_path}",
        ]
    )
    assert code == 2
    assert "bfn: error: scaling: too few runs" in capsys.readouterr().err


def test_rejects_one_size_only(grid_store, tmp_path):
    uri, _ = grid_store
    log_runs(uri, "flat", [p for seed in (0, 1) for p in synthetic(seed) if p[0] == 1e4])
    with pytest.raises(S.ScalingError, match="all runs share one N"):
        S.fit_grid(uri, "scaling", "flat", out_dir=tmp_path / "o", log_to_mlflow=False)


def test_rejects_nan_nll(grid_store, tmp_path):
    uri, _ = grid_store
    points = synthetic()
    points[3] = (points[3][0], points[3][1], float("nan"))
    log_runs(uri, "nan", points)
    with pytest.raises(S.ScalingError, match=r"non-finite .*final NLL: nan-p3 \(nll=nan\)"):
        S.fit_grid(uri, "scaling", "nan", out_dir=tmp_path / "o", log_to_mlflow=False)
    # `bfn scaling run` retrains exactly that point: the others count as done
    done = store.finished_points(uri, "scaling", "nan")
    assert len(done) == 24 and "p3" not in done


def test_grid_numbers_are_params_and_the_result_a_metric(grid_store):
    uri, _ = grid_store
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(store.read_grid(uri, "scaling", "synthetic")[0]["run_id"])
    assert {"scaling.N", "scaling.D", "scaling.C", "scaling.C_measured"} <= set(run.data.params)
    assert float(run.data.params["scaling.C"]) == 6 * float(run.data.params["scaling.N"]) * float(
        run.data.params["scaling.D"]
    )
    assert store.FINAL_NLL in run.data.metrics
    assert not [k for k in run.data.tags if k.startswith("scaling.")]


def test_missing_grid_is_explained(grid_store):
    uri, _ = grid_store
    with pytest.raises(S.ScalingError, match="no runs tagged bfn.scaling=absent"):
        store.read_grid(uri, "scaling", "absent")


def test_plan_measures_n_d_c(tmp_path):
    plan = S.make_plan(
        "tiny",
        ["experiment=smoke", "trainer=cpu_1", "eval.num_samples=0"],
        widths=[8, 16, 24],
        depths=[1],
        steps=[4, 8],
    )
    entries = plan["entries"]
    assert [e["id"] for e in entries][:2] == ["w8-d1-s4-f0.02", "w8-d1-s8-f0.02"]
    assert len(entries) == 6 and plan["metric"] == "val/nll_bits_per_dim"
    ns = sorted({e["N"] for e in entries})
    assert len(ns) == 3 and ns[0] < ns[1] < ns[2]
    for e in entries:
        assert e["D"] == e["steps"] * 16 * 784  # steps x batch x dims
        assert e["C"] == 6.0 * e["N"] * e["D"]
        assert 0 < e["C_measured"] < e["C"]  # the U-Net uses most weights at reduced resolution
        assert any(o.startswith("++net.kwargs.model_channels=") for o in e["overrides"])
    from bfn.networks import count_parameters
    from pipeline.config import load
    from pipeline.core.build import build_model

    cfg = load(["experiment=smoke", *entries[2]["overrides"]])
    assert count_parameters(build_model(cfg).net, non_embedding=True) == entries[2]["N"]
    out = S.write_plan(plan, tmp_path / "plan.json")
    assert out.exists() and "| w16-d1-s4-f0.02 |" in out.with_suffix(".md").read_text()


def test_plan_ranks_by_an_nll_bound_when_eval_skips_the_n_step_nll():
    """text8 validates with eval.nll_steps = 0: the grid still ranks by val/nll_bits_per_dim (the
    continuous-time NLL, L-infinity + reconstruction), never by L-infinity alone (val/loss)."""
    overrides = ["experiment=text8", "net=text8_transformer_tiny", "trainer=cpu_1"]
    from pipeline.config import load

    assert load(overrides).eval.nll_steps == 0
    plan = S.make_plan("t8", overrides, widths=[32], depths=[2], steps=[4])
    assert plan["metric"] == "val/nll_bits_per_dim"
    assert store.grid_params(plan["entries"][0], plan["metric"])["scaling.nll_metric"] == "val/nll_bits_per_dim"


def test_plan_rejects_a_width_the_net_cannot_take():
    with pytest.raises(S.ScalingError, match="w12-d1"):
        S.make_plan("bad", ["experiment=smoke"], widths=[12], depths=[1])


def test_an_mlflow_failure_is_one_masked_line(tmp_path, capsys):
    """The tracking server is down: one line, exit status 2, the URI's credentials masked."""
    from pipeline import cli

    code = cli.main(
        ["scaling", "fit", "--name", "g", "tracking.uri=http://user:sekret@127.0.0.1:9/", f"paths.runs_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bfn: error: scaling: MLflow:"), err
    assert "sekret" not in err and "***" in err

"""`bfn tune` and `bfn scaling` end to end on CPU, on the session's local Ray (4 logical CPUs).

* A 4-trial ASHA sweep of the smoke preset (1 Train worker per trial, 2 trials at a time:
  2 x (0.5 driver + 1 worker) CPUs, 1 CPU left for Ray Data), reporting and validating every
  2 steps, max_t 8, grace 4, reduction 2 (rungs at steps 4 and 8). The space is a learning-rate
  grid whose last two points (1e-7, 1e-8) leave the network at its initialisation: when they
  reach step 4, at least one of the first two trials (6e-3, 3e-3) has recorded a clearly better
  value there, so ASHA stops both. Grace 4 rather than 2 and no EMA (decay 0, so the validated
  weights are the trained ones) because two steps do not yet separate a good learning rate
  from none beyond the noise of a 200-example validation NLL; four do. Measured outside Ray
  (3 seeds, the same data and validation): at step 4, 6e-3 and 3e-3 reach 1.6-3.5 bits/dim and
  an untrained network 4.9-7.4 (the initialisation alone moves it by 2.5). 1e-3 (2.5-5.3) is not
  separable from an untrained network at step 4. Then: the MLflow parent/child runs, the summary
  artifacts, the exported best preset re-trained with `bfn train experiment=best_...`, a planted
  `tuner.pkl` refused by `resume=true` before Tune loads it, and `resume=true` on the finished sweep.
* A sweep driver SIGKILLed right after a Tune save (faults tier): a subprocess `bfn tune` whose
  Ray save path kills it once after the upload ended, once before it began; `resume=true` accepts
  the storage and the sweep ends.
* The orphan placement-group reaper (the one use of Ray's private API) on this Ray version.
* A tiny real scaling grid: 3 widths x 2 step counts of the tiny MNIST U-Net, trained 2 at a
  time through Tune, read back from MLflow, fitted, plotted. Six Train runs take 3-8 minutes on
  a shared 2-core machine, so it only runs with BFN_TEST_SCALING_GRID=1.

The `ray_local` fixture's 4 CPUs suffice, so no second Ray runtime is started. Every Ray call
runs under an explicit pytest timeout (a starved Ray hangs instead of failing).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline import data as data_lib
from tests.conftest import REPO
from tests.faults import kill_pids, pids_matching, spawn

pytestmark = pytest.mark.slow

LRS = [6e-3, 3e-3, 1e-7, 1e-8]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tune_shards") / "mnist"
    data_lib.prepare("mnist", str(out), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def machine(tmp_path_factory, shards) -> list[str]:
    """Overrides that keep everything (runs, Ray storage, MLflow) in a temporary folder."""
    root = tmp_path_factory.mktemp("tune")
    return [
        f"data.uri={shards}",
        f"paths.runs_dir={root / 'runs'}",
        f"run.storage_path={root / 'ray'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'artifacts'}",
        "tracking.experiment=tune-test",
    ]


SMOKE_1W = [
    "experiment=smoke",
    "trainer=cpu_1",
    "trainer.cpus_per_worker=1",
    "trainer.max_steps=8",
    "trainer.log_every=2",
    "trainer.val_every=2",
    "trainer.checkpoint_every=8",
    "eval.num_samples=0",
    "eval.val_batches=2",
    "data.val_batch_size=100",
    "optim.ema_decay=0.0",
]


class Plant:
    """A pickle that writes a marker file when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture
def lr_grid(monkeypatch):
    from ray import tune

    import tune_spaces

    monkeypatch.setitem(tune_spaces.SPACES, "lr_grid", lambda: {"optim.lr": tune.grid_search(LRS)})


@pytest.mark.timeout(120)
def test_orphan_placement_groups_are_reaped(ray_local):
    """A group whose creator actor died is removed (what a stopped trial's Train controller leaves
    behind); a group the driver created is left alone."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from pipeline.sweeps.placement_groups import reap_orphan_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> str:
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=30)
            return group.id.hex()

    ours = placement_group([{"CPU": 0.01}])
    ray.get(ours.ready(), timeout=30)
    creator = Creator.remote()
    orphan = ray.get(creator.make.remote(), timeout=60)
    ray.kill(creator)
    deadline = time.monotonic() + 60
    while placement_group_table()[orphan]["state"] != "REMOVED" and time.monotonic() < deadline:
        reap_orphan_placement_groups()  # the GCS marks the creator dead shortly after the kill
        time.sleep(0.5)
    assert placement_group_table()[orphan]["state"] == "REMOVED"
    assert placement_group_table(ours)["state"] == "CREATED"
    remove_placement_group(ours)


@pytest.mark.timeout(540)
def test_asha_sweep_mlflow_export_retrain_resume(ray_local, machine, lr_grid, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import cli
    from pipeline.config import load
    from pipeline.sweeps import tune as T

    export_dir = tmp_path / "presets"
    args = [
        *SMOKE_1W,
        *machine,
        "space=lr_grid",
        "num_samples=1",
        "max_concurrent=2",
        "grace_period=4",
        "reduction_factor=2",
        "driver_cpus=0.5",
        "sweep=asha-test",
        f"export_dir={export_dir}",
    ]
    started = time.perf_counter()
    result = T.sweep(args)
    wall = time.perf_counter() - started
    rows = {r["config"]["optim.lr"]: r for r in result["rows"]}
    stopped = [r for r in result["rows"] if r["status"] == "stopped"]
    with capsys.disabled():
        print(
            f"\nsweep wall {wall:.0f} s; stopped early (lr, step): "
            f"{[(r['config']['optim.lr'], r['step']) for r in stopped]}"
        )

    assert result["max_concurrent"] == 2
    assert sorted(rows) == sorted(LRS) and not [r for r in result["rows"] if r["status"] == "error"]
    assert stopped, "ASHA stopped no trial"
    for lr in (1e-7, 1e-8):
        assert rows[lr]["status"] == "stopped" and 4 <= rows[lr]["step"] < 8, rows[lr]
    assert all(r["step"] == 8 for r in result["rows"] if r["status"] == "completed")
    best = result["best"]
    assert best["status"] == "completed" and best["config"]["optim.lr"] in (6e-3, 3e-3)

    # MLflow: one parent (the sweep) and one child per trial, stopped ones closed as KILLED
    cfg = load([*SMOKE_1W, *machine])
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["bfn.role"] == "sweep"
    assert parent.data.metrics["sweep/trials_stopped_early"] == len(stopped)
    assert parent.data.metrics["sweep/trials"] == 4
    assert len(parent.data.tags["bfn.tune_state_sha256"]) == 64  # what resume=true checks
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    by_trial = {c.data.tags["bfn.trial_id"]: c for c in children}
    for row in result["rows"]:
        child = by_trial[row["trial_id"]]
        assert child.info.run_name == f"asha-test-{row['trial_id']}"
        assert float(child.data.params["optim.lr"]) == row["config"]["optim.lr"]
        assert "val/nll_bits_per_dim" in child.data.metrics
        if row["status"] == "stopped":
            assert child.info.status == "KILLED" and "bfn.stopped_early" in child.data.tags
        else:
            assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/summary.csv",
        "sweep/summary.md",
        "sweep/val_nll_bits_per_dim_vs_params.png",
        "sweep/best_asha_test.yaml",
    } <= artifacts
    # the best trial's model registered under the sweep's name: models:/asha-test@champion (Tune stops a
    # trial at its last report, so it is logged from the trial's final checkpoint when its driver could not)
    from pipeline.evaluation import models

    assert result["registered_version"] == 1
    champion = client.get_model_version_by_alias("asha-test", "champion")
    assert champion.run_id == best["mlflow_run_id"]
    weights, config = models.read_registered("models:/asha-test@champion", cfg.tracking.uri)
    assert config["optim"]["lr"] == best["config"]["optim.lr"] and weights
    summary = Path(result["files"]["csv"]).read_text().splitlines()
    assert summary[0].startswith("trial_id,status,step,val/nll_bits_per_dim,optim.lr") and len(summary) == 5

    # the exported preset re-trains with `bfn train experiment=best_asha_test`
    preset = export_dir / "experiment" / "best_asha_test.yaml"
    assert result["export"] == str(preset) and preset.read_text().startswith("# @package _global_")
    assert result["command"].startswith(f"bfn train hydra.searchpath=[file://{export_dir}] experiment=best_asha_test")
    retrain = [
        f"hydra.searchpath=[file://{export_dir}]",
        "experiment=best_asha_test",
        *machine,
        "trainer.max_steps=2",
        "trainer.checkpoint_every=2",
    ]
    again = load(retrain)
    assert again.optim.lr == best["config"]["optim.lr"] and again.run.name == "best_asha_test"
    assert (again.trainer.num_workers, again.optim.ema_decay, again.net.name) == (1, 0.0, "mnist_unet_tiny")
    capsys.readouterr()
    assert cli.main(["train", *retrain]) == 0
    assert "run 'best_asha_test' finished at step 2" in capsys.readouterr().out

    # the same sweep again: refused without resume=true; with it, Tune restores the finished
    # experiment (nothing to rerun) and no new child runs appear
    assert cli.main(["tune", *args]) == 2
    assert "resume=true" in capsys.readouterr().err
    # ... unless someone replaced the pickled Tune state: refused before anything loads it
    state = Path(result["path"]) / "tuner.pkl"
    original, marker = state.read_bytes(), tmp_path / "planted-pickle-ran"
    state.write_bytes(pickle.dumps(Plant(marker)))
    assert cli.main(["tune", *args, "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "resume: the Tune state at" in err and "tuner.pkl" in err and not marker.exists()
    state.write_bytes(original)
    resumed = T.sweep([*args, "resume=true"])
    assert sorted(r["trial_id"] for r in resumed["rows"]) == sorted(by_trial)
    assert resumed["parent_run_id"] == result["parent_run_id"]
    assert len(client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 4


# A `bfn tune` driver that SIGKILLs itself at Tune's first save while a trial runs: right after the
# save's upload to the storage ended ("after"), or after Tune wrote and hashed the state but before
# the upload began ("before"). The fault goes in through Ray's own save path, not the project's.
KILLER = """
import os, signal, sys
from pipeline.training.ray_runtime import ray_env_at_entry
ray_env_at_entry()  # what `bfn` does before anything imports ray
from ray.tune.execution import experiment_state
from pipeline import cli

mode, original = sys.argv[1], experiment_state._ExperimentCheckpointManager.sync_up_experiment_state

def sync_up(self, save_fn, force=False, wait=False):
    saved = []
    def save():
        save_fn()
        saved.append(any(t.status == "RUNNING" for t in save_fn.__self__.get_trials()))
        if mode == "before" and saved[-1]:
            os.kill(os.getpid(), signal.SIGKILL)
    original(self, save, force=force, wait=wait)
    if saved and saved[-1]:
        self._storage.syncer.wait()
        os.kill(os.getpid(), signal.SIGKILL)

experiment_state._ExperimentCheckpointManager.sync_up_experiment_state = sync_up
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.faults
@pytest.mark.timeout(600)
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_sweep_driver_killed_right_after_a_save_resumes(ray_local, machine, tmp_path, when):
    """The sweep's driver dies by SIGKILL right after a Tune save (its upload done, or not begun):
    `resume=true` accepts the storage, because the sha256 was recorded as Tune saved (a recorder
    that hashed the storage every few seconds left the newest save unrecorded), and the sweep ends."""
    from pipeline.sweeps import tune as T

    name = f"killed-{when}"
    args = [*SMOKE_1W, *machine, "space=lr", "num_samples=1", "driver_cpus=0.5", f"sweep={name}"]
    tag, ray_tmp = uuid.uuid4().hex, Path(tempfile.mkdtemp(prefix="bfnk-", dir="/tmp"))  # short: Unix sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(BFN_FAULT_TEST=tag, RAY_TMPDIR=str(ray_tmp), TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONPATH=str(REPO))
    log_file = tmp_path / "driver.log"
    driver = spawn([sys.executable, "-c", KILLER, when, "tune", *args], log_file, cwd=REPO, env=env)
    try:
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_pids(pids_matching(marker=f"BFN_FAULT_TEST={tag}"))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert driver.returncode == -signal.SIGKILL, log_file.read_text(errors="replace")[-3000:]

    resumed = T.sweep([*args, "resume=true"])
    assert [r["status"] for r in resumed["rows"]] == ["completed"] and resumed["rows"][0]["step"] == 8
    # the best trial's preset goes under the runs folder, never into the package tree
    runs_dir = next(o.split("=", 1)[1] for o in machine if o.startswith("paths.runs_dir="))
    assert resumed["export"] == str(Path(runs_dir).resolve() / "presets" / "experiment" / f"best_killed_{when}.yaml")
    assert resumed["command"].startswith(f"bfn train hydra.searchpath=[file://{Path(runs_dir).resolve() / 'presets'}]")


@pytest.mark.skipif(
    not os.environ.get("BFN_TEST_SCALING_GRID"),
    reason="6 Train runs: 3-8 min on 2 shared cores; set BFN_TEST_SCALING_GRID=1",
)
@pytest.mark.timeout(600)
def test_tiny_scaling_grid_end_to_end(ray_local, machine, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import load
    from pipeline.sweeps import scaling as S
    from pipeline.sweeps import store

    base = [
        "experiment=smoke",
        "trainer=cpu_1",
        "trainer.cpus_per_worker=1",
        "trainer.log_every=2",
        "trainer.val_every=100",
        "trainer.checkpoint_every=100",
        "eval.num_samples=0",
        *machine,
    ]
    plan = S.make_plan("tiny", base, widths=[8, 16, 24], depths=[1], steps=[3, 6])
    S.write_plan(plan, tmp_path / "plan.json")
    started = time.perf_counter()
    results = S.run_plan(plan, concurrent=2)
    wall = time.perf_counter() - started
    assert len(results) == 6 and all(r["run_id"] for r in results), results
    cfg = load(base)
    fit = S.fit_grid(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        "tiny",
        budget=1e12,
        n_boot=40,
        out_dir=tmp_path / "fit",
        artifact_location=cfg.tracking.artifact_location,
    )
    print(
        f"\nscaling grid: 6 runs in {wall:.0f} s; alpha={fit['ND']['params']['alpha']:.3g} "
        f"beta={fit['ND']['params']['beta']:.3g} gamma={fit['C']['params']['gamma']:.3g}"
    )
    print(Path(fit["files"]["markdown"]).read_text())
    assert Path(fit["files"]["plot"]).stat().st_size > 10_000
    runs = store.read_grid(cfg.tracking.uri, cfg.tracking.experiment, "tiny")
    assert len(runs) == 6 and len({r["N"] for r in runs}) == 3 and len({r["D"] for r in runs}) == 2
    client = MlflowClient(cfg.tracking.uri)
    data = client.get_run(runs[0]["run_id"]).data
    assert {"scaling.N", "scaling.D", "scaling.C"} <= set(data.params) and store.FINAL_NLL in data.metrics
    assert float(data.params["scaling.C"]) == 6 * float(data.params["scaling.N"]) * float(data.params["scaling.D"])
    assert client.get_run(fit["mlflow_run_id"]).data.tags[store.GRID_ROLE_TAG] == "fit"
    study = store.find_study(cfg.tracking.uri, cfg.tracking.experiment, "tiny")
    assert all(client.get_run(r["run_id"]).data.tags["mlflow.parentRunId"] == study for r in runs)
    assert client.get_run(study).data.metrics["study/points_finished"] == 6
    # a second `run` finds every point done and trains nothing
    started = time.perf_counter()
    assert [r["nll"] for r in S.run_plan(plan, concurrent=2)] == [r["nll"] for r in results]
    assert time.perf_counter() - started < 30

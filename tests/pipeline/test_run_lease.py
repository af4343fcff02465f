"""One writer per run folder, one experiment per run (fast; no Ray: everything here fails or
passes before Ray would start).

* a second `fit` of a run name whose folder another live process holds fails at once, naming the
  holder's host and pid; a lease whose holder died (same host) or whose heartbeat is stale is
  taken over; the heartbeat renews it and a lease that was taken over is not deleted by its old
  holder; a lease stamped long ago is taken over only after its file stayed unchanged for stale_s
  on our own clock (a live holder with a clock behind keeps it), and the dead-pid shortcut holds only
  within the same PID namespace;
* a rerun with an experiment-defining key changed (optim.lr) is refused naming the key, while
  run-length keys (trainer.max_steps) may change; run.init_from must be a checkpoint of the
  same model;
* an MLflow run RUNNING for another run folder is not reopened; one left RUNNING by a dead
  writer of the same folder is.

S3 leases (conditional puts on moto) are in test_checkpoint_integrity.py with the other moto tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bfn import EMA
from pipeline.config import ConfigError, compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer
from pipeline.training import driver, ray_runtime, resume
from pipeline.training.lease import LEASE_FILE, Lease, LeaseError, experiment_differences, lost_to
from tests.conftest import REPO

HOLD = """
import sys, time
from pipeline.training.lease import Lease
lease = Lease(sys.argv[1], heartbeat_s=0.5).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def no_env_changes(monkeypatch):
    """fit() configures the embedded Ray's environment first; keep that inside the test."""
    for key in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", ray_runtime.LOOPBACK_ENV):
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)


def overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'ray'}",
        f"data.uri={tmp_path / 'no-data'}",
        "tracking=none",
        *extra,
    ]


def write_checkpoint(tmp_path: Path, name: str, step: int, *extra: str) -> Path:
    cfg = load(overrides(tmp_path, name, *extra))
    model = build_model(cfg)
    folder = tmp_path / "ray" / name / f"checkpoint_{step:06d}"
    return checkpointing.save(
        folder,
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": step, "epoch": 0},
        config=compose(overrides(tmp_path, name, *extra)),
    )


# ------------------------------------------------------------------------------------ lease


def test_second_run_of_a_held_folder_fails_fast_naming_the_holder(tmp_path, no_env_changes, monkeypatch):
    """Another process (a real one) holds the run folder: fit() stops before Ray starts."""
    folder = tmp_path / "ray" / "shared"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = []
        monkeypatch.setattr(driver, "init_ray", started.append)
        with pytest.raises(LeaseError) as info:
            driver.fit(load(overrides(tmp_path, "shared")))
        assert started == []  # refused before any Ray runtime is started or joined
        message = str(info.value)
        assert f"pid {holder.pid}" in message and os.uname().nodename in message
        assert "run folder" in message and "another run.name" in message
    finally:
        holder.kill()
        holder.wait()
    # its holder died (SIGKILL: no release): the next run takes the lease over at once
    with Lease(str(folder)) as lease:
        assert json.loads((folder / LEASE_FILE).read_text())["pid"] == os.getpid() == lease.holder["pid"]
    assert not (folder / LEASE_FILE).exists()  # released


def test_stale_lease_of_another_host_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    other = {"id": "x", "host": "elsewhere", "pid": 1, "started": time.time() - 999, "heartbeat": time.time() - 5}
    (folder / LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(LeaseError, match="host elsewhere pid 1"):
        Lease(str(folder), stale_s=60).acquire()  # alive as far as we can tell: 5 s old
    other["heartbeat"] = time.time() - 61
    (folder / LEASE_FILE).write_text(json.dumps(other))
    started = time.monotonic()
    lease = Lease(str(folder), stale_s=1.0).acquire()  # an old stamp only makes it watch the file for stale_s
    assert time.monotonic() - started >= 1.0
    assert "took over the lease of host elsewhere pid 1" in caplog.text and "did not change for 1 s" in caplog.text
    lease.release()


SKEWED = """
import sys, time
from pipeline.training import lease as lease_module
real = time.time
lease_module.time = type("Clock", (), {"time": staticmethod(lambda: real() - 1000), "strftime": time.strftime,
                                       "localtime": time.localtime})
held = lease_module.Lease(sys.argv[1], heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_live_holder_with_a_clock_behind_is_not_taken_over(tmp_path):
    """Its heartbeat stamps are 1000 s old by our clock, but it renews them: the file changes while we
    watch it, so the lease is refused, not taken over (hosts' clocks are never compared to take over)."""
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", SKEWED, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseError, match=f"pid {holder.pid}"):
            Lease(str(folder), stale_s=2.0).acquire()
        assert json.loads((folder / LEASE_FILE).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_dead_pid_of_another_pid_namespace_is_not_taken_over_at_once(tmp_path):
    """The same hostname in another PID namespace (a container on the host network): its pid says
    nothing about that process here, so only a lease file unchanged for stale_s is taken over."""
    folder = tmp_path / "run"
    mine = Lease(str(folder))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = {
        **mine.holder,
        "id": "x",
        "pid": int(dead.stdout),
        "process_started": 1.0,
        "pid_ns": "pid:[1]",
        "heartbeat": time.time(),
    }
    folder.mkdir()
    (folder / LEASE_FILE).write_text(json.dumps(other))
    with pytest.raises(LeaseError, match=f"pid {other['pid']}"):
        mine.acquire()
    other["pid_ns"] = mine.holder["pid_ns"]  # the same namespace: the dead pid is proof, taken over at once
    (folder / LEASE_FILE).write_text(json.dumps(other))
    with Lease(str(folder)) as lease:
        assert json.loads((folder / LEASE_FILE).read_text())["id"] == lease.holder["id"]


def test_heartbeat_renews_and_a_lost_lease_is_not_deleted(tmp_path):
    folder = tmp_path / "run"
    lease = Lease(str(folder), heartbeat_s=0.2).acquire()
    first = json.loads((folder / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.7)
    assert json.loads((folder / LEASE_FILE).read_text())["heartbeat"] > first
    # another run takes it over (as after a stale period): this one notices, keeps its hands off
    thief = Lease(str(folder), stale_s=0.0)
    thief.acquire()
    time.sleep(0.7)
    assert lease.lost
    assert "taken over by host" in lost_to(str(folder), lease.holder["id"])  # what its workers read
    assert lost_to(str(folder), thief.holder["id"]) is None
    lease.release()
    assert json.loads((folder / LEASE_FILE).read_text())["id"] == thief.holder["id"]
    thief.release()
    assert not (folder / LEASE_FILE).exists()


# ------------------------------------------------------------------------- one experiment


def test_rerun_with_a_changed_learning_rate_is_refused_naming_it(tmp_path, no_env_changes):
    write_checkpoint(tmp_path, "exp", 4)
    with pytest.raises(ConfigError) as info:
        driver.fit(load(overrides(tmp_path, "exp", "optim.lr=0.123")))
    message = str(info.value)
    assert "optim.lr" in message and "0.123" in message and "run.init_from=" in message
    assert "trainer" not in message  # only what differs is named
    assert not (tmp_path / "ray" / "exp" / LEASE_FILE).exists()  # the refused run let go of its lease


def test_rerun_may_change_run_length_and_machine(tmp_path):
    write_checkpoint(tmp_path, "exp", 4)
    cfg = load(overrides(tmp_path, "exp", "trainer.max_steps=99", "trainer=cpu_1", "eval.nll_steps=3"))
    resume.check_resume(cfg)  # no error


def test_experiment_differences_names_keys_and_ignores_machine_keys():
    saved = compose(["experiment=smoke"])
    current = compose(
        [
            "experiment=smoke",
            "optim.lr=0.5",
            "flow.beta_1=2",
            "trainer.max_steps=50",
            "run.storage_path=/elsewhere",
            "tracking=none",
        ]
    )
    keys = [key for key, _, _ in experiment_differences(saved, current)]
    assert keys == ["flow.beta_1", "optim.lr"]


def test_init_from_must_be_a_checkpoint_of_the_same_model(tmp_path, no_env_changes):
    source = write_checkpoint(tmp_path, "pretrain", 6)
    resume.check_resume(load(overrides(tmp_path, "finetune", f"run.init_from={source}", "optim.lr=0.01")))
    with pytest.raises(ConfigError, match="run.init_from: .*net"):
        resume.check_resume(load(overrides(tmp_path, "other", f"run.init_from={source}", "net=mnist_unet_small")))
    with pytest.raises(ConfigError, match="run.init_from: checkpoint folder not found"):
        resume.check_resume(load(overrides(tmp_path, "x", f"run.init_from={tmp_path / 'nope'}")))
    weights = checkpointing.read_for_init(str(source))
    assert set(weights) == {"model", "ema", "config"}


# ----------------------------------------------------------------------------- MLflow runs


def test_mlflow_run_running_for_another_folder_is_not_reopened(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MLflowTracker, RunInUseError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker.start(uri, "bfn", "same", owner={"holder": "host a pid 1", "run_folder": "/a/same"})
    with pytest.raises(RunInUseError, match="host a pid 1.*/a/same"):
        MLflowTracker.start(uri, "bfn", "same", owner={"holder": "host b pid 2", "run_folder": "/b/same"})
    # the same folder (whose lease we hold): the RUNNING run was left open by a dead writer
    again = MLflowTracker.start(uri, "bfn", "same", owner={"holder": "host b pid 3", "run_folder": "/a/same"})
    assert again.run_id == first.run_id
    assert MlflowClient(uri).get_run(first.run_id).data.tags["bfn.owner"] == "host b pid 3"
    again.finish()  # FINISHED: another folder still gets a run of its own (runs are matched by name and folder)
    other = MLflowTracker.start(uri, "bfn", "same", owner={"holder": "host c", "run_folder": "/c/same"})
    assert other.run_id != first.run_id

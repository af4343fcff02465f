"""Unsafe input is refused and secrets stay secret (fast; no Ray, except the standalone tests below).

(Longer than 500 lines: one test per safety finding, grouped by what they protect.)

* Checkpoints are loaded weights-only: a .pt whose unpickling would run code (it would write a
  marker file) is refused by `checkpointing.read` (what a resume calls), `bfn eval` and `bfn sample`
  with CheckpointError / exit status 2, and the marker never appears. The payload is first shown to
  work when loaded unsafely, so the test is not vacuous. The planted file is re-sealed (COMPLETE
  rewritten to match it, as an attacker with write access to the storage could); without that, the
  checksum check refuses it before anything is unpickled.
* Secrets (AWS keys, tokens, credentials inside URIs) given in the environment or in config
  overrides never reach MLflow params, tags or the store file, a checkpoint's config.json, the
  printed summary, the tracker's warnings, or an error message; secret files are created 0600,
  never through a symlink or over an existing file.
* run.name is one plain folder name (no ".", "..", hidden or path-like names).
* Every server the project starts binds to 127.0.0.1: the embedded Ray's dashboard and the local
  stack's moto, MLflow and Ray head (their command lines, captured without starting them).
* The embedded Ray: its temp root is a folder only this user can enter (/tmp/bfn-ray-<uid>, 0700, or
  a private RAY_TMPDIR); a process that imported ray before the loopback setting refuses to start it.
  Standalone (a pytest process of their own): `bfn train`, `tune`, `scaling run --concurrent 2` and
  `bench pipeline`, each started as a user starts it with a bootstrap file naming a dead cluster in
  its RAY_TMPDIR, run a runtime of their own whose every listening socket is on loopback.

The end-to-end versions (a real run with sentinel secrets in its environment, its MLflow store,
checkpoints, output and Ray logs searched; the listening sockets of a live embedded Ray) are in
tests/integration/test_faults.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest

from bfn import EMA
from pipeline.config import ConfigError, compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer
from tests.conftest import REPO
from tests.faults import spawn, write_malicious_pt
from tests.servers import free_port

SECRET = "sentinel-Secret-4b1d9e"


def find_secrets(values: Iterable[str], places: Iterable[Path], max_bytes: int = 64 * 1024**2) -> list:
    """(path, value) for every secret value found in the files under ``places`` (raw bytes, so
    sqlite stores, logs, JSON and pickles are all searched)."""
    needles = [v.encode() for v in values if v]
    found = []
    for place in places:
        place = Path(place)
        files = [place] if place.is_file() else (p for p in place.rglob("*") if p.is_file())
        for path in files:
            try:
                if path.is_symlink() or path.stat().st_size > max_bytes:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            found += [(str(path), n.decode()) for n in needles if n in data]
    return found


# ------------------------------------------------------------------------ crafted pickles


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    overrides = ["experiment=smoke", f"data.uri={tmp_path / 'no-data'}"]
    cfg = load(overrides)
    model = build_model(cfg)
    return checkpointing.save(
        tmp_path / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": 3, "epoch": 0},
        config=compose(overrides),
    )


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    path = write_malicious_pt(tmp_path / "evil.pt", marker)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("name", ["model.pt", "ema.pt", "optimizer.pt", "rng.pt"])
def test_resume_refuses_a_crafted_pickle(checkpoint, tmp_path, name):
    marker = tmp_path / "pwned"
    write_malicious_pt(checkpoint / name, marker)
    with pytest.raises(checkpointing.CheckpointError, match=rf"{name} (has \d+ bytes|does not match)"):
        checkpointing.read(checkpoint)  # the checksums catch the swap before anything is unpickled
    checkpointing.seal(checkpoint)
    with pytest.raises(checkpointing.CheckpointError, match=rf"refusing to load .*{name}.*weights-only"):
        checkpointing.read(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["eval", "--steps", "2", "--max-batches", "1"], ["sample", "--num", "2"]])
@pytest.mark.parametrize("name", ["ema.pt", "model.pt"])
def test_eval_and_sample_refuse_a_crafted_pickle(checkpoint, tmp_path, command, name):
    marker = tmp_path / "pwned"
    write_malicious_pt(checkpoint / name, marker)
    checkpointing.seal(checkpoint)
    extra = ["--raw-weights"] if name == "model.pt" else []
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", command[0], str(checkpoint), *command[1:], *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bfn: error: refusing to load") and name in lines[0]
    assert "Traceback" not in out.stderr
    assert not marker.exists()


# -------------------------------------------------------------------------------- secrets


def test_mask_secrets_keys_and_embedded_credentials():
    from pipeline.tracking import mask_secrets

    masked = mask_secrets(
        {
            "aws.secret_access_key": SECRET,
            "api_key": SECRET,
            "MLFLOW_TRACKING_TOKEN": SECRET,
            "db_password": SECRET,
            "tracking.uri": f"http://bfn:{SECRET}@127.0.0.1:5000",
            "note": "key AKIAABCDEFGHIJKLMNOP in text",
            "plain": "ok",
            "token_count": None,
        }
    )
    assert SECRET not in repr(masked) and "AKIAABCDEFGHIJKLMNOP" not in repr(masked)
    assert masked["tracking.uri"] == "http://***@127.0.0.1:5000" and masked["plain"] == "ok"


def test_no_secret_reaches_mlflow_params_tags_or_store(tmp_path, monkeypatch):
    """Sentinels in the environment and in config overrides; the real start_tracking (driver
    side) logs the resolved config and tags to a sqlite store; nothing secret is in it."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.tracking_run import start_tracking

    env = {
        "AWS_SECRET_ACCESS_KEY": SECRET + "-aws",
        "AWS_ACCESS_KEY_ID": "AKIASENTINEL00000001",
        "AWS_SESSION_TOKEN": SECRET + "-session",
        "MLFLOW_TRACKING_TOKEN": SECRET + "-mlflow",
        "MLFLOW_TRACKING_PASSWORD": SECRET + "-password",
        "RAY_AUTH_TOKEN": SECRET + "-ray",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    db = tmp_path / "mlflow.db"
    cfg = load(
        [
            "experiment=smoke",
            f"tracking.uri=sqlite:///{db}",
            f"tracking.artifact_location={tmp_path / 'a'}",
            f"run.ray_address=ray://bfn:{SECRET}-cfg@127.0.0.1:10001",
        ]
    )
    run_id = start_tracking(cfg, 123, {"dataset": "mnist", "splits": {"train": {"rows": 10, "shards": []}}}).run_id
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    everything = repr(run.data.params) + repr(run.data.tags) + repr(run.info)
    for value in [*env.values(), f"{SECRET}-cfg"]:
        assert value not in everything
    assert run.data.params["run.ray_address"] == "ray://***@127.0.0.1:10001"
    assert find_secrets([*env.values(), SECRET], [tmp_path]) == []


def test_a_signed_source_url_in_a_manifest_never_reaches_mlflow(tmp_path):
    """A dataset prepared from a signed URL before masking existed keeps it in manifest.json; the
    manifest the driver reads (data.verify) and logs as an MLflow artifact has it masked."""
    import json

    from mlflow.tracking import MlflowClient

    from pipeline import data
    from pipeline.training.tracking_run import end_tracking, start_tracking

    out = tmp_path / "cifar10"
    data.prepare("cifar10", str(out), source=None, progress=False)
    signed = (
        "https://b.s3.amazonaws.com/cifar-10-python.tar.gz?X-Amz-Credential=ASIAIOSFODNN7EXAMPLE%2F2026"
        f"&X-Amz-Security-Token={SECRET}-session&X-Amz-Signature={SECRET}-sig"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["source"].update(kind="url", location=signed, url=signed)
    (out / "manifest.json").write_text(json.dumps(manifest))
    db = tmp_path / "mlflow.db"
    cfg = load(["experiment=smoke", f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'a'}"])
    tracker = start_tracking(cfg, 1, data.verify(str(out), splits=["train", "val"]))
    assert end_tracking(tracker, {})["tracking_lost_calls"] == 0
    logged = MlflowClient(cfg.tracking.uri).download_artifacts(
        tracker.run_id, "data/manifest.json", str(tmp_path / "dl")
    )
    assert "X-Amz-Signature=***" in Path(logged).read_text()
    assert find_secrets([SECRET, "ASIAIOSFODNN7EXAMPLE"], [tmp_path / "a", db, tmp_path / "dl"]) == []


def test_printed_summary_masks_credentials_in_the_tracking_uri(capsys):
    from pipeline.training.driver import print_summary

    cfg = load(["experiment=smoke", "tracking=mlflow_server", f"tracking.uri=http://bfn:{SECRET}@127.0.0.1:5000"])
    print_summary(cfg, {"step": 6, "mlflow_run_id": "0" * 32, "checkpoint": "/x"})
    out = capsys.readouterr().out
    assert SECRET not in out and "http://***@127.0.0.1:5000" in out


def test_tracker_warnings_hide_credentials_and_a_dead_server_costs_seconds(monkeypatch, caplog, tmp_path):
    """A dead server: metric points AND the other calls (params, tags, an artifact, the final
    status) are counted as lost and reported at the end, in seconds, without the credentials."""
    from pipeline.tracking import HTTP_DEFAULTS, MLflowTracker

    for key in HTTP_DEFAULTS:  # the defaults apply only where the user set nothing
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    tracker = MLflowTracker(f"http://bfn:{SECRET}@127.0.0.1:{free_port()}", "0" * 32)
    tracker.log_params({"optim.lr": 0.1})
    tracker.set_tags({"a": 1, "b": 2})
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    (tmp_path / "curves.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "curves.png", "figures")
    tracker.finish()
    assert time.monotonic() - started < 60  # MLflow's defaults would retry for minutes
    assert tracker.lost_points == 3  # undelivered points are counted and reported
    assert tracker.lost_calls == 5  # params, 2 tags, the artifact, the final status
    assert any("3 metric points and 5 other calls" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


def test_tracking_calls_queued_during_an_outage_are_delivered_later(tmp_path, monkeypatch):
    """Params, tags and artifacts that fail while the store is unreachable are sent again, in
    order, once it answers (here: a sqlite store whose folder appears later)."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import MLflowTracker

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    tracker = MLflowTracker.start(f"sqlite:///{db}", "bfn", "queued", artifact_location=str(tmp_path / "art"))
    calls = []
    real = tracker.client.set_tag

    def flaky_set_tag(*args):
        calls.append(args)
        if len(calls) <= 2:
            raise ConnectionError("store down")
        return real(*args)

    monkeypatch.setattr(tracker.client, "set_tag", flaky_set_tag)
    tracker.retry_every = 0.0
    tracker.set_tags({"first": 1})  # fails, queued
    tracker.set_tags({"second": 2})  # fails (queued behind the first)
    assert len(tracker.pending) == 2
    tracker.log_metrics({"train/loss": 1.0}, 1)  # the next call delivers the queue first, in order
    tracker.finish()
    run = MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id)
    assert run.data.tags["first"] == "1" and run.data.tags["second"] == "2"
    assert run.info.status == "FINISHED" and tracker.lost_calls == 0


def test_config_errors_do_not_echo_credentials():
    with pytest.raises(ConfigError) as info:
        load(["experiment=smoke", f"tracking.uri=mysql://bfn:{SECRET}@127.0.0.1/mlflow"])
    assert "tracking.uri" in str(info.value)
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------------------ bind addresses


def test_embedded_ray_is_loopback_only_with_a_fresh_token(monkeypatch):
    """init_ray for an embedded runtime: dashboard on 127.0.0.1, every other service on loopback
    (Ray's node address), token auth on with a token file of mode 0600 that nobody else made, a
    runtime of its own (address "local") under the user's private temp root."""
    import ray

    from pipeline.training import ray_runtime

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((kwargs, dict(os.environ))))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", ray_runtime.LOOPBACK_ENV, "RAY_TMPDIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_runtime.init_ray(load(["experiment=smoke"]))
    kwargs, env = calls[0]
    # address="local": an embedded runtime starts its own Ray, never a cluster found on the machine
    assert kwargs["dashboard_host"] == "127.0.0.1" and kwargs["address"] == "local"
    root = Path(f"/tmp/bfn-ray-{os.getuid()}")
    assert kwargs["_temp_dir"] == str(root / "ray") and env["RAY_TMPDIR"] == str(root)
    assert stat.S_IMODE(root.lstat().st_mode) == 0o700 and root.lstat().st_uid == os.getuid()
    assert env[ray_runtime.LOOPBACK_ENV] == "0"
    assert "RAY_AUTH_MODE" not in env  # unset: ray.init enables token mode and reloads its settings
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64 and not token.is_symlink()


def test_embedded_ray_sets_ray_trains_local_defaults_unless_the_user_did(monkeypatch):
    """No preemption watcher and a 0.5 s controller poll in an embedded runtime (start-up, see
    docs/benchmarks.md); a value the user exported wins."""
    from pipeline.training import ray_runtime

    for key in (
        ray_runtime.LOOPBACK_ENV,
        "GLOO_SOCKET_IFNAME",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_MODE",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
    ):
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored (or removed) after the test
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    ray_runtime.embedded_ray_env()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    ray_runtime.embedded_ray_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


def test_joining_a_cluster_leaves_auth_and_addresses_alone(monkeypatch):
    import ray

    from pipeline.training import ray_runtime

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append((kwargs, dict(os.environ))))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])  # the joined cluster: one node
    monkeypatch.delenv(ray_runtime.LOOPBACK_ENV, raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cluster-token-from-the-user")
    ray_runtime.init_ray(load(["experiment=smoke", "run.ray_address=auto"]))
    kwargs, env = calls[0]
    # only the address (and, when the CLI owns logging, how loud Ray is): no auth, no local addresses
    assert kwargs["address"] == "auto" and set(kwargs) <= {"address", "logging_level", "logging_config"}
    assert ray_runtime.LOOPBACK_ENV not in env and env["RAY_AUTH_TOKEN"] == "cluster-token-from-the-user"
    assert "RAY_TMPDIR" not in env  # `auto` finds a local cluster through Ray's default temp folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_embedded_ray_temp_root_is_private_to_this_user(monkeypatch):
    """Ray makes every folder below its temp root world-writable (0777), so the root must be a folder
    nobody else can enter: /tmp/bfn-ray-<uid> is made 0700 and closed again when found open; a name
    someone else made first, a symlink, a RAY_TMPDIR open to others or too long for Ray's Unix sockets
    is refused with an error naming it."""
    from pipeline.training import ray_runtime

    base = Path(tempfile.mkdtemp(prefix="bfnr-", dir="/tmp"))  # short: the root's length is checked
    try:
        monkeypatch.setattr(ray_runtime, "RAY_ROOT_BASE", base)
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
        uid = os.getuid()
        root = ray_runtime.ray_temp_root()
        assert root == base / f"bfn-ray-{uid}" and _mode(root) == 0o700 and root.lstat().st_uid == uid
        root.chmod(0o777)  # as Ray leaves the folders it makes
        assert ray_runtime.ray_temp_root() == root and _mode(root) == 0o700
        taken = base / f"bfn-ray-{uid + 1}"  # another user's name, made first by us
        taken.mkdir(mode=0o700)
        monkeypatch.setattr(ray_runtime.os, "getuid", lambda: uid + 1)
        with pytest.raises(ConfigError, match=rf"{taken} belongs to uid {uid}, not to this user \(uid {uid + 1}\)"):
            ray_runtime.ray_temp_root()
        monkeypatch.undo()
        monkeypatch.setattr(ray_runtime, "RAY_ROOT_BASE", base)
        cases = {
            "link": "is not a folder",
            "open": r"is open to other users \(mode 0755\)",
            "x" * 40: "at most 32 characters",
        }
        (base / "link").symlink_to(root)
        (base / "open").mkdir(mode=0o755)
        (base / "open").chmod(0o755)
        for name, message in cases.items():
            monkeypatch.setenv("RAY_TMPDIR", str(base / name))
            with pytest.raises(ConfigError, match=rf"RAY_TMPDIR={base / name}.* {message}"):
                ray_runtime.ray_temp_root()
        assert _mode(base / "open") == 0o755 and not (base / ("x" * 40)).exists()  # a user's folder is not changed
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_an_open_ray_tmpdir_stops_bfn_train_before_ray_starts(monkeypatch, tmp_path):
    import ray

    from pipeline.training import ray_runtime

    shared = Path(tempfile.mkdtemp(prefix="bfns-", dir="/tmp"))
    try:
        shared.chmod(0o777)
        monkeypatch.setenv("RAY_TMPDIR", str(shared))
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
        with pytest.raises(ConfigError, match=rf"RAY_TMPDIR={shared} is open to other users \(mode 0777\)"):
            ray_runtime.init_ray(load(["experiment=smoke"]))
        assert list(shared.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_embedded_runtime_refuses_to_start_when_ray_was_imported_too_early(tmp_path):
    """A process that imported ray before the loopback setting would start Ray on the network
    address: init_ray refuses (RuntimeError, before ray.init) instead of warning."""
    code = (
        "import os; os.environ.pop('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', None); import ray\n"
        "ray.init = lambda **kwargs: print('ray.init called')\n"
        "from pipeline.config import load; from pipeline.training.ray_runtime import init_ray\n"
        "init_ray(load(['experiment=smoke']))"
    )
    env = {**os.environ, "RAY_TMPDIR": str(tempfile.mkdtemp(prefix="bfni-", dir="/tmp"))}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert out.returncode == 1 and "ray.init called" not in out.stdout, out.stderr[-2000:]
    assert "RuntimeError: ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set" in out.stderr


# ------------------------------------------------------- every command that starts Ray (standalone)


@pytest.fixture(scope="module")
def ray_commands(tmp_path_factory) -> dict[str, list[str]]:
    """The commands that start an embedded Ray, each at its smallest (argv after `bfn`); everything they
    write goes to a temporary folder."""
    from pipeline import data as data_lib
    from pipeline.sweeps import scaling

    root = tmp_path_factory.mktemp("ray_commands")
    shards = root / "mnist"
    data_lib.prepare("mnist", str(shards), progress=False)
    machine = [
        f"data.uri={shards}",
        f"paths.runs_dir={root / 'runs'}",
        f"run.storage_path={root / 'ray'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'artifacts'}",
    ]
    small = ["experiment=smoke", "trainer=cpu_1", "trainer.max_steps=1", "eval.num_samples=0", *machine]
    plan = scaling.make_plan("listen", small, widths=[8, 16], depths=[1], steps=[1])
    plan_path = scaling.write_plan(plan, root / "plan.json")
    return {
        "train": ["train", *small, "tracking=none", "run.name=listen"],
        "tune": ["tune", *small, "tracking=none", "space=lr", "num_samples=1", "max_concurrent=1", "driver_cpus=0.5"],
        "scaling": ["scaling", "run", str(plan_path), "--concurrent", "2"],
        "bench": ["bench", "pipeline", "--steps", "1", f"data.uri={shards}", "net=mnist_unet_tiny"],
    }


def _ray_is_up(driver: int, sockets: list[tuple[int, str, int]], commands: dict[int, str]) -> bool:
    """The driver has connected (its core worker listens) and the node's services listen."""
    listening = {commands[pid] for pid, _, _ in sockets}
    return any(pid == driver for pid, _, _ in sockets) and all(
        any(name in command for command in listening) for name in ("gcs_server", "raylet", "dashboard/agent.py")
    )


@pytest.mark.slow
@pytest.mark.standalone
@pytest.mark.parametrize("command", ["train", "tune", "scaling", "bench"])
def test_every_command_starts_its_own_ray_on_loopback_only(ray_commands, command, tmp_path):
    """`bfn train`, `tune`, `scaling run --concurrent 2` and `bench pipeline` as a user runs them: every
    listening socket of the embedded runtime they start is on loopback (the loopback setting is made at
    CLI entry, before anything imports ray), and the runtime is their own, under RAY_TMPDIR, although a
    bootstrap file there names a cluster that is gone (a killed `ray start`): it is neither joined nor
    changed. Each command is stopped (by PID) once its runtime is up. `bfn eval`, `sample` and
    `quality` start no Ray at all (test_the_commands_without_ray_never_import_it)."""
    from tests.faults import command_line, is_loopback, kill_pids, listening_sockets, pids_matching

    argv = ray_commands[command]
    ray_tmp = Path(tempfile.mkdtemp(prefix="bfnl-", dir="/tmp"))  # short: Ray's Unix sockets live below it
    (ray_tmp / "ray").mkdir()
    stale = f"127.0.0.1:{free_port()}"  # nothing listens there
    (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
    marker = f"BFN_LISTEN_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX"))}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    env[marker.split("=")[0]] = marker.split("=")[1]
    log = tmp_path / "out.log"
    proc = spawn([sys.executable, "-m", "pipeline.cli", *argv], log, cwd=tmp_path, env=env)
    pids: list[int] = []
    try:
        deadline, seen = time.monotonic() + 240, set()
        while True:
            assert proc.poll() is None, f"`bfn {command}` exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no Ray runtime within 240 s:\n{log.read_text()[-3000:]}"
            pids = sorted({proc.pid, *pids_matching(marker=marker, session=proc.pid, path=str(ray_tmp))})
            sockets = listening_sockets(pids)
            commands = {pid: command_line(pid) for pid in pids}
            if _ray_is_up(proc.pid, sockets, commands):
                break
            time.sleep(0.3)
        time.sleep(2)  # what starts right after the driver connects (workers, agents' servers)
        for _ in range(2):
            pids = sorted({proc.pid, *pids_matching(marker=marker, session=proc.pid, path=str(ray_tmp))})
            commands.update({pid: command_line(pid) for pid in pids if pid not in commands})
            seen |= set(listening_sockets(pids))
            time.sleep(0.5)
    finally:
        kill_pids(sorted(set(pids) | {proc.pid} | set(pids_matching(marker=marker))))
        proc.wait(timeout=30)
        sessions = sorted(p.name for p in (ray_tmp / "ray").glob("session_2*"))
        bootstrap = (ray_tmp / "ray" / "ray_current_cluster").read_text()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    exposed = [(commands[pid].split(" ")[0], ip, port) for pid, ip, port in seen if not is_loopback(ip)]
    # torch's rendezvous store (TCPStore) on a Train worker listens on every interface; it is not Ray's
    assert [name for name, _, _ in exposed if "RayTrainWorker" not in name] == [], exposed
    assert len(seen) >= 8 and len(sessions) == 1 and bootstrap == stale, (seen, sessions, bootstrap)
    gcs = [commands[pid] for pid, _, _ in seen if "gcs_server" in commands[pid]]
    assert gcs and all(f"{ray_tmp}/ray/{sessions[0]}" in c for c in gcs), gcs  # its own session, its own root


def test_the_commands_without_ray_never_import_it():
    """`bfn eval`, `sample`, `quality`, `data` and `import-official` run without Ray: their modules do not import it."""
    code = (
        "import sys\n"
        "import pipeline.cli, pipeline.evaluation.evaluate, pipeline.evaluation.quality.table\n"
        "import pipeline.training.official, pipeline.data\n"
        "pipeline.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_local_stack_binds_every_server_to_loopback(tmp_path, monkeypatch):
    """`bfn stack up` command lines, captured instead of started: moto, MLflow and the Ray head's
    dashboard all get 127.0.0.1."""
    from pipeline.cluster import devstack as localstack

    launched: list[list[str]] = []

    class FakeProcess:
        pid = os.getpid()

        def __init__(self, argv, **kwargs):
            launched.append(list(argv))

        def poll(self):
            return None

    monkeypatch.setattr(localstack.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(localstack, "wait_until", lambda *a, **k: 0.0)
    monkeypatch.setattr(localstack, "create_bucket", lambda *a, **k: None)
    localstack.up(tmp_path / "stack", echo=lambda _m: None)
    by_name = {Path(argv[0]).name: argv for argv in launched}
    assert set(by_name) == {"moto_server", "mlflow", "ray"}
    assert by_name["moto_server"][by_name["moto_server"].index("-H") + 1] == "127.0.0.1"
    assert by_name["mlflow"][by_name["mlflow"].index("--host") + 1] == "127.0.0.1"
    assert "--dashboard-host=127.0.0.1" in by_name["ray"]
    joined = " ".join(" ".join(a) for a in launched)
    assert "0.0.0.0" not in joined and "::" not in joined


# ------------------------------------------------------------------ secrets in files and names


def test_checkpoint_config_json_has_no_credentials(tmp_path):
    """Sentinel credentials in config values (tracking.uri, run.ray_address) are masked in
    config.json; the rest of the config is kept for evaluation and the resume check."""
    overrides = [
        "experiment=smoke",
        "tracking=mlflow_server",
        f"tracking.uri=http://bfn:{SECRET}@127.0.0.1:5000",
        f"run.ray_address=ray://bfn:{SECRET}-ray@127.0.0.1:10001",
    ]
    cfg = load(overrides)
    model = build_model(cfg)
    folder = checkpointing.save(
        tmp_path / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": 1, "epoch": 0},
        config=cfg.raw,
    )
    assert find_secrets([SECRET], [tmp_path]) == []
    saved = checkpointing.read(folder)["config"]
    assert saved["tracking"]["uri"] == "http://***@127.0.0.1:5000"
    assert saved["optim"] == cfg.raw["optim"] and saved["net"] == cfg.raw["net"]


def test_mask_text_is_the_one_masking(monkeypatch):
    from pipeline import secrets
    from pipeline.tracking import mask_secrets

    monkeypatch.setattr(secrets, "_known", set())
    secrets.register("hunter2-registered", "ab")  # too short to mask: would hide ordinary text
    text = f"uri http://u:{SECRET}@h:1 key AKIAABCDEFGHIJKLMNOP value hunter2-registered ab"
    masked = secrets.mask_text(text)
    assert SECRET not in masked and "AKIA" not in masked and "hunter2" not in masked and masked.endswith(" ab")
    assert mask_secrets is secrets.mask_params
    nested = secrets.mask_config(
        {"a": {"api_key": "x" * 8, "uri": f"s3://k:{SECRET}@b"}, "l": [f"http://u:{SECRET}@h"]}
    )
    assert SECRET not in repr(nested) and nested["a"]["api_key"] == "***"


def test_secret_files_are_private_and_never_reuse_a_path(tmp_path):
    import stat

    from pipeline.secrets import write_secret_file

    path = write_secret_file(tmp_path / "token", "s3cr3t")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "s3cr3t"
    with pytest.raises(FileExistsError):  # O_EXCL: an existing file (and its permissions) is never reused
        write_secret_file(path, "other")
    target = tmp_path / "elsewhere"
    target.write_text("")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):  # O_NOFOLLOW + O_EXCL: never written through a symlink
        write_secret_file(tmp_path / "link", "s3cr3t")
    assert target.read_text() == ""


@pytest.mark.parametrize("name", [".", "..", ".hidden", "-x", "a/b", "", "x" * 129, "a b"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match="run.name"):
        load(["experiment=smoke", f"run.name='{name}'"])


@pytest.mark.parametrize("name", ["a", "9lives", "mnist_local.v2-b", "x" * 128])
def test_run_name_accepts_plain_names(name):
    assert load(["experiment=smoke", f"run.name={name}"]).run.name == name


def test_credentials_to_a_plain_http_host_are_warned_about(monkeypatch, caplog):
    """A tracking URI with credentials over plain http to another host: a warning (masked), and no
    request is made here (the tracker is replaced by one that fails)."""
    from pipeline.secrets import plain_http_to_remote
    from pipeline.training import tracking_run

    assert plain_http_to_remote("http://mlflow.internal:5000") and plain_http_to_remote("http://10.1.2.3:5000")
    assert not plain_http_to_remote("http://127.0.0.1:5000") and not plain_http_to_remote("https://mlflow.internal")
    assert not plain_http_to_remote("http://localhost:5000") and not plain_http_to_remote("http://[::1]:5000")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no server in this test")

    monkeypatch.setattr(tracking_run.MLflowTracker, "start", unreachable)
    cfg = load(["experiment=smoke", "tracking=mlflow_server", f"tracking.uri=http://bfn:{SECRET}@mlflow.internal:5000"])
    assert tracking_run.start_tracking(cfg, 1, {"splits": {"train": 1}}) is None
    assert "plain http to another host" in caplog.text and SECRET not in caplog.text

"""Unsafe input is refused and secrets stay secret (fast; no Ray).

* Checkpoints are loaded weights-only: a .pt whose unpickling would run code (it would write a
  marker file) is refused by `checkpointing.read` (what a resume calls), `bfn eval` and `bfn sample`
  with CheckpointError / exit status 2, and the marker never appears. The payload is first shown to
  work when loaded unsafely, so the test is not vacuous.
* Secrets (AWS keys, tokens, credentials inside URIs) given in the environment or in config
  overrides never reach MLflow params, tags or the store file, the printed summary, the
  tracker's warnings, or an error message.
* Every server the project starts binds to 127.0.0.1: the embedded Ray's dashboard and the local
  stack's moto, MLflow and Ray head (their command lines, captured without starting them).

The end-to-end versions (a real run with sentinel secrets in its environment, its MLflow store,
checkpoints, output and Ray logs searched; the listening sockets of a live embedded Ray) are in
tests/integration/test_faults.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from bfn import EMA
from pipeline.config import ConfigError, compose, load
from pipeline.training import checkpointing
from pipeline.training.build import build_model, build_optimizer
from tests.conftest import REPO
from tests.faults import write_malicious_pt
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
    return checkpointing.save(tmp_path / "ckpt", model=model, ema=EMA(model, 0.9),
                              optimizer=build_optimizer(cfg, model), train_state={"step": 3, "epoch": 0},
                              config=compose(overrides))  # fmt: skip


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
    with pytest.raises(checkpointing.CheckpointError, match=rf"refusing to load .*{name}.*weights-only"):
        checkpointing.read(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["eval", "--steps", "2", "--max-batches", "1"], ["sample", "--num", "2"]])
@pytest.mark.parametrize("name", ["ema.pt", "model.pt"])
def test_eval_and_sample_refuse_a_crafted_pickle(checkpoint, tmp_path, command, name):
    marker = tmp_path / "pwned"
    write_malicious_pt(checkpoint / name, marker)
    extra = ["--raw-weights"] if name == "model.pt" else []
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", command[0], str(checkpoint), *command[1:], *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bfn: error: refusing to load") and name in lines[0]
    assert "Traceback" not in out.stderr
    assert not marker.exists()


# -------------------------------------------------------------------------------- secrets


def test_mask_secrets_keys_and_embedded_credentials():
    from pipeline.tracking import mask_secrets

    masked = mask_secrets({
        "aws.secret_access_key": SECRET, "api_key": SECRET, "MLFLOW_TRACKING_TOKEN": SECRET,
        "db_password": SECRET, "tracking.uri": f"http://bfn:{SECRET}@127.0.0.1:5000",
        "note": "key AKIAABCDEFGHIJKLMNOP in text", "plain": "ok", "token_count": None,
    })  # fmt: skip
    assert SECRET not in repr(masked) and "AKIAABCDEFGHIJKLMNOP" not in repr(masked)
    assert masked["tracking.uri"] == "http://***@127.0.0.1:5000" and masked["plain"] == "ok"


def test_no_secret_reaches_mlflow_params_tags_or_store(tmp_path, monkeypatch):
    """Sentinels in the environment and in config overrides; the real start_tracking (driver
    side) logs the resolved config and tags to a sqlite store; nothing secret is in it."""
    from mlflow.tracking import MlflowClient

    from pipeline.training.driver import start_tracking

    env = {"AWS_SECRET_ACCESS_KEY": SECRET + "-aws", "AWS_ACCESS_KEY_ID": "AKIASENTINEL00000001",
           "AWS_SESSION_TOKEN": SECRET + "-session", "MLFLOW_TRACKING_TOKEN": SECRET + "-mlflow",
           "MLFLOW_TRACKING_PASSWORD": SECRET + "-password", "RAY_AUTH_TOKEN": SECRET + "-ray"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    db = tmp_path / "mlflow.db"
    cfg = load(["experiment=smoke", f"tracking.uri=sqlite:///{db}", f"tracking.artifact_location={tmp_path / 'a'}",
                f"run.ray_address=ray://bfn:{SECRET}-cfg@127.0.0.1:10001"])  # fmt: skip
    run_id = start_tracking(cfg, 123, {"dataset": "mnist", "splits": {"train": {"rows": 10, "shards": []}}})
    run = MlflowClient(cfg.tracking.uri).get_run(run_id)
    everything = repr(run.data.params) + repr(run.data.tags) + repr(run.info)
    for value in [*env.values(), f"{SECRET}-cfg"]:
        assert value not in everything
    assert run.data.params["run.ray_address"] == "ray://***@127.0.0.1:10001"
    assert find_secrets([*env.values(), SECRET], [tmp_path]) == []


def test_printed_summary_masks_credentials_in_the_tracking_uri(capsys):
    from pipeline.training.driver import print_summary

    cfg = load(["experiment=smoke", "tracking=mlflow_server", f"tracking.uri=http://bfn:{SECRET}@127.0.0.1:5000"])
    print_summary(cfg, {"step": 6, "mlflow_run_id": "0" * 32, "checkpoint": "/x"})
    out = capsys.readouterr().out
    assert SECRET not in out and "http://***@127.0.0.1:5000" in out


def test_tracker_warnings_hide_credentials_and_a_dead_server_costs_seconds(monkeypatch, caplog):
    from pipeline.tracking import HTTP_DEFAULTS, MLflowTracker

    for key in HTTP_DEFAULTS:  # the defaults apply only where the user set nothing
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    tracker = MLflowTracker(f"http://bfn:{SECRET}@127.0.0.1:{free_port()}", "0" * 32)
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.finish()
    assert time.monotonic() - started < 30  # MLflow's defaults would retry for minutes
    assert tracker.lost_points == 3  # undelivered points are counted and reported
    assert any("lost" in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text


def test_config_errors_do_not_echo_credentials():
    with pytest.raises(ConfigError) as info:
        load(["experiment=smoke", f"tracking.uri=mysql://bfn:{SECRET}@127.0.0.1/mlflow"])
    assert "tracking.uri" in str(info.value)
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------------------ bind addresses


def test_embedded_ray_dashboard_binds_loopback(monkeypatch):
    import ray

    from pipeline.training import driver as train

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    train.init_ray(load(["experiment=smoke"]))
    assert calls and calls[0]["dashboard_host"] == "127.0.0.1" and "address" not in calls[0]


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
    monkeypatch.setattr(localstack, "_wait_until", lambda *a, **k: 0.0)
    monkeypatch.setattr(localstack, "_create_bucket", lambda *a, **k: None)
    localstack.up(tmp_path / "stack", echo=lambda _m: None)
    by_name = {Path(argv[0]).name: argv for argv in launched}
    assert set(by_name) == {"moto_server", "mlflow", "ray"}
    assert by_name["moto_server"][by_name["moto_server"].index("-H") + 1] == "127.0.0.1"
    assert by_name["mlflow"][by_name["mlflow"].index("--host") + 1] == "127.0.0.1"
    assert "--dashboard-host=127.0.0.1" in by_name["ray"]
    joined = " ".join(" ".join(a) for a in launched)
    assert "0.0.0.0" not in joined and "::" not in joined

"""Faults injected for real into the training path (Ray Train workers, MLflow, S3 on moto).

(Longer than 500 lines: each fault is one long real run; they share fixtures and the README fault
table's order.)

Each test breaks something the way it breaks in production and checks what survives:

* a Train worker (rank 0, the one that logs and checkpoints) is SIGKILLed mid-run;
* the `bfn train` driver process is SIGKILLed after its first checkpoint, then the command is rerun;
* the MLflow tracking server is stopped for 30 s mid-run and started again on the same port;
* S3 fails checkpoint uploads (a fault-injecting proxy in front of moto): first briefly, then for
  good on one checkpoint folder, leaving it half-written;
* S3 fails the reads of the newest checkpoint for one of two resuming workers (rank 1) only;
* the optimiser blows the weights up (optim.lr=1e30) so every later step is non-finite;
* a checkpoint whose .pt would run code when unpickled is put where a resume reads it;
* the latest checkpoint's optimizer.pt is truncated before a resume;
* a second `bfn train` of the same run name starts while the first runs;
* another run takes the run folder's lease over while the first trains;
* a client without the runtime's token calls its GCS.

"Continuous step axis" after a restart (documented choice): the steps between the checkpoint a
run restarts from and the moment it died are trained again, and MLflow then holds two points for
each of them (MLflow keeps every point it is sent; nothing is deleted). The history is continuous
when the points logged before the fault and those logged after it are each strictly increasing in
step, the ones after it start right after the step of the checkpoint resumed from (a complete
checkpoint, a multiple of trainer.checkpoint_every), and the union of the steps is exactly
1..max_steps with nothing missing. The re-done span (last step logged before the fault minus the
step resumed from) is at most trainer.checkpoint_every. "The fault" is the kill for a worker, the
relaunch for a driver (its workers train on for seconds after its death and write checkpoints its
controller never registers; the rerun resumes from the newest complete one), the first refused
upload for S3.

Measurements (steps re-done, seconds from the fault to the first step after it) are printed;
run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import data as data_lib
from pipeline.config import load
from pipeline.core import checkpointing
from tests.faults import (
    CheckpointWriteFaults,
    FaultyS3Proxy,
    MLflowServer,
    ReadFaultsForOneProcess,
    command_line,
    complete_checkpoints,
    grpc_status,
    is_loopback,
    kill_pids,
    listening_sockets,
    pids_matching,
    rank0_worker_pid,
    ray_session_dir,
    registered_checkpoints,
    spawn,
    sqlite_metric_rows,
    wait_until,
    write_malicious_pt,
)
from tests.pipeline.test_security import find_secrets
from tests.servers import aws_env, create_bucket, moto_s3, venv_bin

pytestmark = [pytest.mark.slow, pytest.mark.faults]

# One Train worker (trainer=cpu_1) wherever the fault does not need two: each worker group start
# costs about 20 s more with two on this 2-core machine. Worker death and the numerics run keep two.
FAST = ("experiment=smoke", "eval.num_samples=0", "eval.nll_steps=0", "trainer.log_every=1", "trainer.val_every=100000")
FIT_TIMEOUT_S = 900  # a hung fit fails the test (the watchdog below) instead of looping forever


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "mnist"
    data_lib.prepare("mnist", str(out), progress=False)
    return str(out)


def overrides(tmp_path: Path, shards: str, name: str, *extra: str) -> list[str]:
    return [
        *FAST,
        f"run.name={name}",
        f"data.uri={shards}",
        f"run.storage_path={tmp_path / 'ray'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        *extra,
    ]


def fit_with_watchdog(cfg):
    """fit(cfg) in this process; a fit that outlives FIT_TIMEOUT_S fails the test."""
    from pipeline.training.driver import fit

    timer = threading.Timer(FIT_TIMEOUT_S, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        return fit(cfg)
    finally:
        timer.cancel()


def assert_continuous(rows: list[tuple[int, int]], total: int, every: int, fault_ms: float, resumed: int) -> None:
    """The step-axis contract of the module docstring, for one fault at ``fault_ms`` after which
    the run went on from the checkpoint at step ``resumed``. ``rows``: (step, timestamp ms)."""
    before = [s for s, t in rows if t <= fault_ms]
    after = [s for s, t in rows if t > fault_ms]
    assert before == sorted(set(before)) and after == sorted(set(after)), (before, after)  # strictly increasing
    assert after and after[0] == resumed + 1, (resumed, before, after)
    assert resumed % every == 0 and 0 <= before[-1] - resumed <= every, (resumed, before)
    assert sorted({s for s, _ in rows}) == list(range(1, total + 1)), rows  # nothing missing


def run_ids(uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bfn")
    return [r.info.run_id for r in client.search_runs([experiment.experiment_id])]


# ------------------------------------------------------------------------------ worker death


def test_worker_sigkill_restarts_from_latest_checkpoint(ray_local, shards, tmp_path):
    """SIGKILL rank 0 two steps past a checkpoint: Ray Train (FailureConfig max_failures=1)
    restarts the worker group from that checkpoint, the run finishes its steps in one MLflow run."""
    every, total = 4, 16
    cfg = load(
        overrides(
            tmp_path,
            shards,
            "wdeath",
            f"trainer.max_steps={total}",
            f"trainer.checkpoint_every={every}",
            "trainer.max_failures=1",
        )
    )
    run_folder, db, session = tmp_path / "ray" / "wdeath", tmp_path / "mlflow.db", ray_session_dir()
    fault: dict = {}
    over = threading.Event()

    def kill_rank0_mid_run():
        def ready():
            if over.is_set():
                raise RuntimeError("the run ended before the kill")
            registered = registered_checkpoints(run_folder)
            done = [s for s, p in complete_checkpoints(run_folder) if p.name in registered]
            steps = [s for s, _ in sqlite_metric_rows(db, "train/loss")]
            if done and steps and max(steps) >= done[-1] + 2 and max(steps) < total - every:
                return rank0_worker_pid(session), done[-1]
            return None

        try:
            (pid, checkpoint_step) = wait_until(
                ready, timeout=FIT_TIMEOUT_S, interval=0.05, what="a checkpoint and two more steps"
            )
            assert pid, "rank 0's worker process not found"
            os.kill(pid, signal.SIGKILL)
            fault.update(pid=pid, at=time.time(), checkpoint_step=checkpoint_step)
        except Exception as error:  # reported by the main thread
            fault["error"] = error

    killer = threading.Thread(target=kill_rank0_mid_run, daemon=True)
    killer.start()
    try:
        summary = fit_with_watchdog(cfg)
    finally:
        over.set()
        killer.join(timeout=10)
    assert "error" not in fault, fault.get("error")

    assert summary["step"] == total
    rows = sqlite_metric_rows(db, "train/loss")
    before = [s for s, t in rows if t <= fault["at"] * 1000]
    after = [(s, t) for s, t in rows if t > fault["at"] * 1000]
    resumed = after[0][0] - 1
    assert resumed == fault["checkpoint_step"]  # the latest registered checkpoint
    assert_continuous(rows, total, every, fault["at"] * 1000, resumed)
    assert run_ids(cfg.tracking.uri) == [summary["mlflow_run_id"]]  # one run, one step axis
    redone = max(before) - resumed
    downtime = after[0][1] / 1000 - fault["at"]
    print(
        f"\n[worker death] killed rank 0 (pid {fault['pid']}) after step {max(before)}; resumed "
        f"from step {resumed}; {redone} step(s) re-done (<= {every}); {downtime:.1f} s from the "
        f"kill to the next logged step"
    )
    assert not os.path.exists(f"/proc/{fault['pid']}")


# ------------------------------------------------------------------------------ lease taken over


def checkpoint_folders(run_folder: Path) -> list[str]:
    """The checkpoint folders (Ray's checkpoint_manager_snapshot.json registers those already there)."""
    return sorted(p.name for p in run_folder.glob("checkpoint_*") if p.is_dir())


def test_lease_taken_over_mid_run_stops_the_run_before_its_next_checkpoint(ray_local, shards, tmp_path):
    """Another run takes the run folder's lease over while this one trains (as after a clock skew or an
    S3 outage longer than the stale limit): the old holder's worker sees it before its next report,
    the fit fails naming the new holder, and no checkpoint is written after the takeover."""
    from pipeline.training.lease import LEASE_FILE, LeaseError, LocalLeaseFile

    every, total = 2, 400
    cfg = load(
        overrides(
            tmp_path,
            shards,
            "taken",
            f"trainer.max_steps={total}",
            f"trainer.checkpoint_every={every}",
            "trainer.max_failures=1",
        )
    )
    run_folder = tmp_path / "ray" / "taken"
    fault: dict = {}
    over = threading.Event()

    def take_over():
        try:

            def first_checkpoint():
                if over.is_set():
                    raise RuntimeError("the run ended before the takeover")
                return complete_checkpoints(run_folder)

            wait_until(first_checkpoint, timeout=FIT_TIMEOUT_S, interval=0.02, what="a first checkpoint")
            file = LocalLeaseFile(run_folder / LEASE_FILE)
            data, version = file.read()
            thief = {**json.loads(data), "id": "thief", "host": "thief-host", "pid": 4242, "heartbeat": time.time()}
            assert file.replace(json.dumps(thief).encode(), version), "the lease changed under the test"
            fault.update(at=time.time(), folders=checkpoint_folders(run_folder))
        except Exception as error:  # reported by the main thread
            fault["error"] = error

    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseError) as info:
            fit_with_watchdog(cfg)
    finally:
        over.set()
        thread.join(timeout=10)
    assert "error" not in fault, fault.get("error")
    message = str(info.value)
    assert "taken over by host thief-host pid 4242" in message and str(run_folder) in message, message
    # nothing written after the takeover: the same checkpoint folders, and the thief's lease left alone
    assert checkpoint_folders(run_folder) == fault["folders"]
    assert json.loads((run_folder / LEASE_FILE).read_text())["id"] == "thief"
    print(
        f"\n[lease taken over] the run stopped {time.time() - fault['at']:.1f} s after the takeover; "
        f"checkpoints kept: {fault['folders']}"
    )


# ------------------------------------------------------------------------------ driver death

SENTINELS = {  # secrets in the environment of a real run; none may show up anywhere
    "AWS_ACCESS_KEY_ID": "AKIASENTINELAKID0001",
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-7f3a9c",
    "AWS_SESSION_TOKEN": "sentinel-session-token-51be",
    "MLFLOW_TRACKING_TOKEN": "sentinel-mlflow-token-c0de",
    "HF_TOKEN": "sentinel-hf-token-9d2e",
}


def ray_api_auth_mode(port: int) -> str | None:
    """The authentication mode the Ray dashboard / job API on 127.0.0.1:port reports (its public
    /api/authentication_mode endpoint), or None if no Ray API answers there."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/authentication_mode", timeout=5) as resp:
            return json.loads(resp.read() or b"{}").get("authentication_mode")
    except (OSError, ValueError):
        return None


GET_CLUSTER_ID = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # any GCS call; an empty request is valid


def second_run_refused(argv: list[str], cwd: Path, log: Path, holder_pid: int) -> float:
    """Run the same `bfn train` while the first holds the run folder: it must exit with status 2
    at once (before starting Ray), naming the holder. Returns how long it took."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 2, text[-3000:]
    assert "is in use by another run" in text and f"pid {holder_pid}" in text, text[-3000:]
    assert "Started a local Ray instance" not in text
    return time.monotonic() - started


@pytest.fixture
def own_ray():
    """(marker, ray temp dirs): what a test needs to find the Ray processes a `bfn train`
    subprocess starts (they inherit ``marker`` in their environment). Afterwards anything still
    carrying the marker is stopped by PID and the temp dirs are removed."""
    tag = uuid.uuid4().hex
    dirs: list[str] = []
    yield f"BFN_FAULT_TEST={tag}", dirs
    kill_pids(pids_matching(marker=f"BFN_FAULT_TEST={tag}"))
    for folder in dirs:
        shutil.rmtree(folder, ignore_errors=True)


def test_driver_sigkill_then_rerun_resumes(shards, tmp_path, own_ray):
    """`bfn train` killed with SIGKILL after its first checkpoint; its Ray processes are found
    and stopped by PID; the same command run again resumes from that checkpoint. The run also
    carries secret sentinels in its environment, and every listening socket is checked."""
    # the killed driver's worker trains on until Ray's fate sharing reaches it (seconds; it logged 4 steps
    # in a rehearsal): the run must be long enough that it cannot finish before the rerun
    every, total = 4, 32
    work = tmp_path / "cwd"
    work.mkdir()
    marker, ray_dirs = own_ray
    settings = ("trainer=cpu_1", f"trainer.max_steps={total}", f"trainer.checkpoint_every={every}")
    argv = [venv_bin("bfn"), "train", *overrides(tmp_path, shards, "ddeath", *settings)]
    run_folder = tmp_path / "ray" / "ddeath"

    def launch(log: Path) -> subprocess.Popen:
        ray_tmp = tempfile.mkdtemp(prefix="bfnf-", dir="/tmp")  # short: unix socket paths < 108 bytes
        ray_dirs.append(ray_tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
        env.update(SENTINELS, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
        env[marker.split("=")[0]] = marker.split("=")[1]
        return spawn(argv, log, cwd=work, env=env)

    def leftovers(proc, ray_tmp):
        return sorted(set(pids_matching(marker=marker, session=proc.pid, path=ray_tmp)) - {proc.pid})

    first = launch(tmp_path / "first.log")
    try:

        def checkpointed():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            registered = registered_checkpoints(run_folder)
            return [s for s, p in complete_checkpoints(run_folder) if p.name in registered]

        steps = wait_until(checkpointed, timeout=FIT_TIMEOUT_S, interval=0.1, what="a registered checkpoint")
        contender = second_run_refused(argv, work, tmp_path / "contender.log", first.pid)
        sockets = listening_sockets(leftovers(first, ray_dirs[0]) + [first.pid])
        commands = {pid: command_line(pid) for pid, _, _ in sockets}
        api = [
            (ip, port, ray_api_auth_mode(port))
            for pid, ip, port in sockets
            if "dashboard/dashboard.py" in commands[pid] and ray_api_auth_mode(port)
        ]
        gcs_ports = [port for pid, _, port in sockets if "gcs_server" in commands[pid]]
        gcs_refuses = [grpc_status(port, GET_CLUSTER_ID) for port in gcs_ports]
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.time()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        time.sleep(5)  # give the orphans a chance to go by themselves
        orphans = leftovers(first, ray_dirs[0])
        names = sorted({command_line(pid).split(" ")[0].rsplit("/", 1)[-1] for pid in orphans})
        kill_pids(orphans)
    checkpoint_step = steps[-1]
    assert leftovers(first, ray_dirs[0]) == []
    print(
        f"\n[driver death] killed the driver at checkpoint step {checkpoint_step}; 5 s later "
        f"{len(orphans)} of its Ray processes were still running ({', '.join(names)}); stopped by PID"
    )

    # every service of the embedded runtime listens on loopback, and its GCS wants the token
    assert api and all(ip == "127.0.0.1" and mode == "token" for ip, _, mode in api), (api, sockets)
    exposed = [(commands[pid].split(" ")[0], ip, port) for pid, ip, port in sockets if not is_loopback(ip)]
    # the one exception: torch.distributed's rendezvous store (TCPStore), which Ray Train starts on
    # the rank-0 worker, listens on every interface (torch has no bind-address option); it is not Ray's
    # and needs no token. One per Train worker group at most.
    assert [name for name, _, _ in exposed] in ([], ["ray::RayTrainWorker"]), exposed
    assert gcs_refuses and set(gcs_refuses) == {"UNAUTHENTICATED"}, gcs_refuses
    print(
        f"[driver death] {len(sockets)} listening sockets of the embedded runtime, all on loopback except "
        f"{exposed} (torch's TCPStore); its GCS refused a client without the token; a second run of the "
        f"same name was refused in {contender:.1f} s"
    )

    relaunched_at = time.time()
    # the orphans trained on after the driver's death; their newest checkpoint is complete but unregistered
    complete, registered = complete_checkpoints(run_folder), registered_checkpoints(run_folder)
    newest = max(step for step, _ in complete)
    newest_registered = max(step for step, path in complete if path.name in registered)
    second = launch(tmp_path / "second.log")
    try:
        second.wait(timeout=FIT_TIMEOUT_S)
    finally:
        if second.poll() is None:
            os.kill(second.pid, signal.SIGKILL)
        kill_pids(leftovers(second, ray_dirs[1]))
    out = (tmp_path / "second.log").read_text(errors="replace")
    assert second.returncode == 0, out[-4000:]
    resumed = re.findall(r"\[bfn\] resumed from step (\d+)", out)
    assert resumed and int(resumed[0]) == newest >= checkpoint_step, (newest, out[-3000:])
    assert f"[bfn] run 'ddeath' finished at step {total}" in out
    rows = sqlite_metric_rows(tmp_path / "mlflow.db", "train/loss")
    before = [s for s, t in rows if t <= relaunched_at * 1000]
    late = [s for s, t in rows if killed_at * 1000 < t <= relaunched_at * 1000]
    assert_continuous(rows, total, every, relaunched_at * 1000, int(resumed[0]))
    assert len(run_ids(f"sqlite:///{tmp_path / 'mlflow.db'}")) == 1
    print(
        f"[driver death] rerun resumed from step {resumed[0]} (the newest complete checkpoint; the newest "
        f"registered one was step {newest_registered}); {max(before) - int(resumed[0])} step(s) re-done (the "
        f"orphaned workers logged steps {late} after the driver died)"
    )

    # no secret from the environment reached MLflow, the checkpoints, the output or Ray's logs
    places = [
        tmp_path / "first.log",
        tmp_path / "second.log",
        tmp_path / "mlflow.db",
        tmp_path / "artifacts",
        run_folder,
        *(Path(d) for d in ray_dirs),
    ]
    assert find_secrets(SENTINELS.values(), places) == []


# ---------------------------------------------------------------------------- tracking outage


def test_tracking_server_outage_buffers_and_delivers(ray_local, shards, tmp_path, capfd):
    """The MLflow server is stopped for 30 s while training runs, then started again on the same
    port: training goes on, every point logged during the outage reaches the store after it, and the
    run ends FINISHED with its curves. The tracking URI carries a sentinel password (the server
    ignores it), which must appear nowhere: store, artifacts, checkpoints, output, Ray's logs."""
    from mlflow.tracking import MlflowClient

    outage_s = 30
    password = "sentinel-uri-pass-5e1f"
    with MLflowServer(tmp_path / "mlflow") as server:
        # the loop runs 75 s: the outage starts at the first logged step and lasts 30 s plus the
        # restart (5-25 s on this machine, depending on load)
        uri = server.url.replace("http://", f"http://bfn:{password}@")
        cfg = load(
            [
                *overrides(
                    tmp_path,
                    shards,
                    "outage",
                    "trainer=cpu_1",
                    "trainer.max_steps=100000",
                    "trainer.max_minutes=1.25",
                    "trainer.checkpoint_every=100000",
                ),
                "tracking=mlflow_server",
                f"tracking.uri={uri}",
            ]
        )
        fault: dict = {}

        def outage():
            try:
                wait_until(
                    lambda: sqlite_metric_rows(server.db, "train/loss"), timeout=FIT_TIMEOUT_S, what="a logged step"
                )
                fault["down"] = time.time()
                server.stop()
                time.sleep(outage_s)
                fault["restarting"] = time.time()
                server.start()
                fault["up"] = time.time()
            except Exception as error:
                fault["error"] = error

        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        started = time.time()
        summary = fit_with_watchdog(cfg)
        ended = time.time()
        thread.join(timeout=300)
        assert "error" not in fault, fault.get("error")
        assert fault["up"] < ended, "the server came back only after the run"
        rows = sqlite_metric_rows(server.db, "train/loss")
        run = MlflowClient(server.url).get_run(summary["mlflow_run_id"])
        artifacts = [a.path for a in MlflowClient(server.url).list_artifacts(run.info.run_id, "figures")]

    steps = [s for s, _ in rows]
    total = summary["step"]
    assert total > 0 and summary["tracking_lost_points"] == 0
    assert sorted(steps) == list(range(1, total + 1))  # each step exactly once, none lost
    during = [s for s, t in rows if fault["down"] * 1000 <= t < fault["up"] * 1000]
    assert during, "no step was logged while the server was down"
    assert run.info.status == "FINISHED" and "figures/curves.png" in artifacts
    assert run.data.tags.get("bfn.final_step") == str(total)
    out = capfd.readouterr()
    places = [tmp_path, server.root, ray_session_dir() / "logs"]
    assert find_secrets([password], places) == [] and password not in out.out + out.err
    print(
        f"\n[tracking outage] server down {fault['up'] - fault['down']:.0f} s (restart "
        f"{fault['up'] - fault['restarting']:.0f} s); {len(during)} steps logged during it were "
        f"delivered afterwards; the run trained {total} steps in {time.time() - started:.0f} s and ended "
        f"FINISHED with its curves"
    )


# ----------------------------------------------------------------------------- storage outage


def test_checkpoint_upload_faults_on_s3(ray_local, shards, tmp_path):
    """Checkpoints go to S3 (moto) through a fault-injecting proxy. Folder 2: its first 4 PUTs
    fail (the AWS SDK tries a request 3 times, so the upload as a whole must be retried). Folder 3:
    optimizer.pt fails for good, a write cut short after config.json, ema.pt and model.pt: the
    report fails, the worker group restarts from folder 2, the half-written folder is never
    registered, and the run finishes its steps."""
    import boto3

    every, total = 2, 8
    rule = CheckpointWriteFaults(transient={2: 4}, broken=[3], fail=["optimizer.pt"])
    with moto_s3() as endpoint, FaultyS3Proxy(endpoint, rule) as proxy, aws_env(proxy.url):
        create_bucket(endpoint, "bfn")
        cfg = load(
            overrides(
                tmp_path,
                shards,
                "s3faults",
                "trainer=cpu_1",
                f"trainer.max_steps={total}",
                f"trainer.checkpoint_every={every}",
                "trainer.max_failures=1",
                "run.storage_path=s3://bfn/ray",
            )
        )
        started = time.time()
        summary = fit_with_watchdog(cfg)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bfn", Prefix="ray/s3faults/")["Contents"]]
        snapshot = s3.get_object(Bucket="bfn", Key="ray/s3faults/checkpoint_manager_snapshot.json")["Body"].read()

    log = [(t, m, p.split("?")[0], s) for t, m, p, s in proxy.log]
    assert summary["step"] == total
    # folder 2: failed attempts, then the same files stored: the write was retried, no restart
    second = rule.folder(2)
    failed = {p for _, m, p, s in log if m == "PUT" and second in p and s == 503}
    stored = {p for _, m, p, s in log if m == "PUT" and second in p and s == 200}
    assert failed and failed <= stored
    assert max(rule.attempts[p] for p in failed) > 3  # more than the SDK's own 3 attempts
    # folder 3: half-written, never registered, not the result
    third = rule.folder(3)
    assert any(k.endswith(f"{third}/model.pt") for k in keys)
    assert not any(k.endswith((f"{third}/COMPLETE", f"{third}/optimizer.pt")) for k in keys)
    assert third.encode() not in snapshot and third not in summary["checkpoint"]
    rows = sqlite_metric_rows(tmp_path / "mlflow.db", "train/loss")
    fault_at = min(t for t, m, p, s in log if third in p and s == 503)
    resumed = [s for s, t in rows if t > fault_at * 1000][0] - 1
    assert resumed == 2 * every  # restarted from folder 2, the last complete checkpoint
    assert_continuous(rows, total, every, fault_at * 1000, resumed)
    complete = [k for k in keys if k.endswith("/COMPLETE")]
    assert summary["checkpoint"].rstrip("/").rsplit("/", 1)[-1] in " ".join(complete)
    print(
        f"\n[storage outage] folder 2: {rule.transient[2]} PUTs failed ({sorted(Path(p).name for p in failed)}), "
        f"then stored; folder 3 left half-written, run restarted from step {resumed}; "
        f"{time.time() - started:.0f} s for the whole run"
    )


def test_a_read_failing_on_rank_1_only_resumes_both_ranks_from_the_same_checkpoint(ray_local, shards, tmp_path, capfd):
    """2 workers resume from S3 (moto behind the proxy), whose run folder holds complete checkpoints at
    steps 2 and 4. Rank 1's reads of the step-4 folder fail (503 past the SDK's retries) and rank 0's
    do not. Rank 0 alone chooses; rank 1 cannot read its choice, so the attempt fails on both ranks
    and FailureConfig retries it: both ranks then load step 4. No worker ever loads step 2 (reads of
    it are refused, so a rank that fell back would fail at once instead of training diverged)."""
    import pyarrow.fs
    import torch

    from bfn import EMA
    from pipeline.core.build import build_model, build_optimizer
    from tests.servers import TEST_CREDENTIALS

    every, total = 2, 6
    folders = {step: f"checkpoint_2000-01-01_00-00-{step:02d}.000000" for step in (2, 4)}
    rule = ReadFaultsForOneProcess(folders[4], refused=[folders[2]])
    with moto_s3() as endpoint, FaultyS3Proxy(endpoint, rule, by_process=True) as proxy, aws_env(proxy.url):
        create_bucket(endpoint, "bfn")
        cfg = load(
            overrides(
                tmp_path,
                shards,
                "agree",
                f"trainer.max_steps={total}",
                f"trainer.checkpoint_every={every}",
                "trainer.max_failures=1",
                "run.storage_path=s3://bfn/ray",
            )
        )
        s3 = pyarrow.fs.S3FileSystem(
            endpoint_override=endpoint.split("://")[1],
            scheme="http",
            region="us-east-1",
            access_key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        for step, name in folders.items():  # what an earlier run of this config left (straight to moto)
            torch.manual_seed(step)
            model = build_model(cfg)
            state = {"step": step, "epoch": 0, "run_name": "agree"}
            local = checkpointing.save(
                tmp_path / "local" / name,
                model=model,
                ema=EMA(model, cfg.optim.ema_decay),
                optimizer=build_optimizer(cfg, model),
                train_state=state,
                config=cfg.raw,
            )
            checkpointing.upload(local, s3, f"bfn/ray/agree/{name}")
        summary = fit_with_watchdog(cfg)

    out = capfd.readouterr()
    text = out.out + out.err
    assert summary["step"] == total
    assert rule.refused_reads == [], f"a rank fell back to the older checkpoint: {rule.refused_reads}"
    faulted = rule.faulted
    assert faulted is not None and sum(rule.failed.values()) >= 3, (rule.readers, rule.failed)
    model_reads = [
        (pid, s)
        for (_, m, p, s), pid in zip(proxy.log, proxy.pids, strict=True)
        if m == "GET" and p.split("?")[0].endswith(f"/{folders[4]}/model.pt")
    ]
    loaded = {pid for pid, s in model_reads if 200 <= s < 300}  # 206: ranged GETs
    # attempt 1: rank 0 (the first reader) loaded step 4, rank 1 (the faulted process) could not;
    # attempt 2: two new processes, both loaded step 4
    assert rule.readers[0] in loaded and faulted not in loaded, (rule.readers, model_reads)
    assert len(rule.readers) == 4 and set(rule.readers[2:]) <= loaded, (rule.readers, model_reads)
    assert re.search(rf"pid={faulted}\b.*rank 1 cannot read \S*{folders[4]}", text), text[-4000:]
    assert re.findall(r"\[bfn\] resumed from step (\d+)", text) == ["4"], text[-4000:]
    assert "previous complete checkpoint" not in text
    rows = sqlite_metric_rows(tmp_path / "mlflow.db", "train/loss")
    assert sorted(s for s, _ in rows) == list(range(5, total + 1))
    print(
        f"\n[one rank's read fails] rank 1 (pid {faulted}) could not read the step-4 checkpoint "
        f"({sum(rule.failed.values())} GETs failed); the attempt failed on both ranks and the retry "
        f"resumed both from step 4"
    )


# ------------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def blown_up_run(ray_local, shards, tmp_path_factory):
    """A run whose first update (optim.lr=1e30) makes every later loss NaN: it must stop after
    trainer.max_bad_steps consecutive skipped steps, keeping the blown-up weights as a diagnostic
    outside Ray's checkpoint history.

    log_every=2, val_every=3: step 3 validates without logging, so only rank 0 has metrics there;
    every rank must still report on that step (report is a barrier), or the run deadlocks."""
    from ray.train import TrainingFailedError

    tmp_path = tmp_path_factory.mktemp("nan")
    cfg = load(
        overrides(
            tmp_path,
            shards,
            "blowup",
            "optim.lr=1e30",
            "trainer.max_bad_steps=3",
            "trainer.max_steps=50",
            "trainer.checkpoint_every=100",
            "trainer.max_failures=0",
            "trainer.log_every=2",
            "trainer.val_every=3",
        )
    )
    with pytest.raises(TrainingFailedError) as info:
        fit_with_watchdog(cfg)
    return tmp_path, cfg, info.value


def test_non_finite_steps_stop_the_run_with_a_diagnostic_kept_aside(blown_up_run):
    from mlflow.tracking import MlflowClient

    tmp_path, cfg, error = blown_up_run
    assert "BadStepsError" in str(error) and "3 consecutive non-finite steps at step 4" in str(error)
    assert complete_checkpoints(tmp_path / "ray" / "blowup") == []  # nothing a rerun could resume from
    diagnostic = tmp_path / "ray" / "blowup" / "outputs" / "diagnostic" / "step_00000004"
    assert (diagnostic / "model.pt").is_file() and str(diagnostic) in str(error)
    client = MlflowClient(cfg.tracking.uri)
    (run_id,) = run_ids(cfg.tracking.uri)
    skipped = {m.step: m.value for m in client.get_metric_history(run_id, "train/skipped_steps")}
    assert skipped == {2: 1, 4: 3}  # decided and logged at log steps: the loop reads the device there
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0, 3]  # step 3 validated
    assert client.get_run(run_id).info.status == "FAILED"


@pytest.fixture(scope="module")
def rerun_after_blowup(blown_up_run, shards):
    """The same run name again with the default (sane) learning rate: it must train from scratch,
    not from the blown-up weights."""
    tmp_path, _, _ = blown_up_run
    again = load(
        overrides(
            tmp_path,
            shards,
            "blowup",
            "trainer=cpu_1",
            "trainer.max_steps=4",
            "trainer.checkpoint_every=4",
            "trainer.max_failures=0",
        )
    )
    return tmp_path, again, fit_with_watchdog(again)


def test_a_rerun_with_a_sane_lr_trains_instead_of_resuming_the_diagnostic(rerun_after_blowup):
    import math

    _, _, summary = rerun_after_blowup
    assert summary["step"] == 4 and math.isfinite(summary["train/loss"]) and summary["skipped_steps"] == 0


def test_crafted_pickle_in_a_checkpoint_is_refused_on_resume(rerun_after_blowup):
    """Resume reads the latest checkpoint weights-only: a model.pt that would run code when
    unpickled stops the run with CheckpointError, and the code never runs."""
    from ray.train import TrainingFailedError

    tmp_path, cfg, _ = rerun_after_blowup
    ((_, folder),) = complete_checkpoints(tmp_path / "ray" / "blowup")
    marker = tmp_path / "pwned"
    write_malicious_pt(folder / "model.pt", marker)
    checkpointing.seal(folder)  # whoever can write the storage can rewrite COMPLETE as well
    again = load(
        overrides(
            tmp_path,
            str(cfg.data.uri),
            "blowup",
            "trainer=cpu_1",
            "trainer.max_steps=50",
            "trainer.checkpoint_every=100",
            "trainer.max_failures=0",
        )
    )
    # (the rerun's experiment: a resume refuses another one)
    with pytest.raises(TrainingFailedError) as info:
        fit_with_watchdog(again)
    assert "CheckpointError" in str(info.value) and "refusing to load" in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- token auth


def test_embedded_runtime_refuses_clients_without_its_token(ray_local):
    """The session's runtime (started as `bfn train` starts it): every listener on loopback, and the
    GCS, the raylet and the job API refuse a client that lacks the token (or has another one)."""
    import urllib.error
    import urllib.request

    import psutil
    import ray

    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    sockets = listening_sockets([p.pid for p in psutil.Process().children(recursive=True)])
    assert sockets and [s for s in sockets if not is_loopback(s[1])] == []
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    assert grpc_status(gcs_port, GET_CLUSTER_ID) == "UNAUTHENTICATED"
    assert grpc_status(gcs_port, GET_CLUSTER_ID, "0" * 64) == "UNAUTHENTICATED"
    assert grpc_status(gcs_port, GET_CLUSTER_ID, token) == "OK"
    raylet_port = ray.nodes()[0]["NodeManagerPort"]
    assert grpc_status(raylet_port, "/ray.rpc.NodeManagerService/GetNodeStats") == "UNAUTHENTICATED"
    dashboard = f"http://{ray._private.worker.get_dashboard_url()}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401


# ---------------------------------------------------------------------- corrupt checkpoint


def test_truncated_optimizer_resumes_from_the_previous_checkpoint(ray_local, shards, tmp_path, capfd):
    """2 workers, checkpoints at steps 2 and 4; optimizer.pt of the step-4 checkpoint is cut in
    half (a torn write); the rerun verifies it against COMPLETE, warns, resumes both ranks from
    step 2 and reaches its steps."""
    every = 2
    first = fit_with_watchdog(
        load(overrides(tmp_path, shards, "torn", "trainer.max_steps=4", f"trainer.checkpoint_every={every}"))
    )
    latest = Path(first["checkpoint"])
    assert json.loads((latest / "train_state.json").read_text())["step"] == 4
    optimizer = latest / "optimizer.pt"
    with optimizer.open("r+b") as f:
        f.truncate(optimizer.stat().st_size // 2)
    relaunched_at = time.time()
    second = fit_with_watchdog(
        load(overrides(tmp_path, shards, "torn", "trainer.max_steps=6", f"trainer.checkpoint_every={every}"))
    )
    assert second["step"] == 6 and second["mlflow_run_id"] == first["mlflow_run_id"]
    out = capfd.readouterr()
    text = out.out + out.err
    assert "resuming from the previous complete checkpoint" in text and "optimizer.pt" in text
    assert re.search(r"resumed from step 2\b", text), text[-3000:]
    rows = sqlite_metric_rows(tmp_path / "mlflow.db", "train/loss")
    assert_continuous(rows, 6, every, relaunched_at * 1000, 2)
    print("\n[corrupt checkpoint] optimizer.pt of step 4 truncated; resumed from step 2, steps 3-4 re-done")

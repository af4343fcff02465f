"""The cluster-use layer end to end, on this machine only (everything on 127.0.0.1).

One local stack for the module (`pipeline.cluster.devstack.up`: a token-auth Ray head, an MLflow server
with S3 artifacts, moto S3), then:

* a probe job (a few lines of MLflow logging, no training) proves the wiring without the trainer:
  job -> MLflow server -> S3 bucket, and the MLflow UI in headless Chromium;
* `bfn submit train experiment=smoke` runs the real training path through the same checks
  (skipped only while `pipeline/cli.py` does not exist yet);
* `bfn jobs list/logs`, and `stack down` leaving no process behind.

Screenshots and rendered DOMs go to runs/test-artifacts/cluster/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.cluster import devstack as localstack
from pipeline.cluster import submit

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "runs" / "test-artifacts" / "cluster"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None)
TRAIN_TIMEOUT_S = int(os.environ.get("BFN_TEST_TRAIN_TIMEOUT", "1200"))

PROBE_JOB = """
import os, sys, tempfile
import mlflow
from PIL import Image

run_name = sys.argv[1]
client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
exp = client.get_experiment_by_name("bfn-stack-probe")
exp_id = exp.experiment_id if exp else client.create_experiment("bfn-stack-probe")
run_id = client.create_run(exp_id, run_name=run_name).info.run_id
for step in range(3):
    client.log_metric(run_id, "train/loss", 1.0 / (step + 1), step=step)
client.log_metric(run_id, "val/nll_bits_per_dim", 0.4321, step=2)
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "probe.png")
    Image.new("RGB", (28, 28), (200, 30, 30)).save(path)
    client.log_artifact(run_id, path, artifact_path="samples")
client.set_terminated(run_id)
print("PROBE_RUN_ID", run_id)
"""


# --------------------------------------------------------------------------- helpers


def _http_json(url: str, body: dict | None = None, token: str | None = None, timeout: float = 15):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def _status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _client_env(stack: dict) -> dict[str, str]:
    """What a user's shell has after exporting `bfn stack up`'s lines."""
    return {**os.environ, **stack["env"]}


@contextlib.contextmanager
def _token_env(stack: dict):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", stack["env"]["RAY_AUTH_TOKEN_PATH"])
        yield


def _bfn_command() -> list[str]:
    """`bfn` once pipeline/cli.py registers `submit`, else the module's own entry point."""
    bfn = Path(sys.executable).parent / "bfn"
    if bfn.exists() and importlib.util.find_spec("pipeline.cli") is not None:
        probe = subprocess.run([str(bfn), "submit", "--help"], capture_output=True, timeout=120)
        if probe.returncode == 0:
            return [str(bfn)]
    return [sys.executable, "-m", "pipeline.cluster.submit"]


def _find_run(stack: dict, run_name: str, since_ms: int) -> dict:
    mlflow = stack["urls"]["mlflow"]
    exps = _http_json(f"{mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 1000})
    exp_ids = [e["experiment_id"] for e in exps.get("experiments", [])]
    runs = _http_json(
        f"{mlflow}/api/2.0/mlflow/runs/search",
        {"experiment_ids": exp_ids, "filter": f"attributes.run_name = '{run_name}'"},
    ).get("runs", [])
    if not runs:  # the trainer may name its run differently: take the runs it started
        recent = _http_json(
            f"{mlflow}/api/2.0/mlflow/runs/search",
            {"experiment_ids": exp_ids, "filter": f"attributes.start_time >= {since_ms}"},
        ).get("runs", [])
        runs = [r for r in recent if any(m["key"] == "train/loss" for m in r["data"]["metrics"])]
    assert runs, f"no MLflow run named {run_name!r} (nor any run with train/loss since the submit)"
    return runs[0]


def _list_artifacts(stack: dict, run_id: str, path: str = "") -> list[str]:
    mlflow = stack["urls"]["mlflow"]
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    listing = _http_json(f"{mlflow}/api/2.0/mlflow/artifacts/list?{query}")
    files = []
    for f in listing.get("files", []):
        files += _list_artifacts(stack, run_id, f["path"]) if f["is_dir"] else [f["path"]]
    return files


def _s3_keys(stack: dict, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack["urls"]["s3"],
        aws_access_key_id=stack["env"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack["env"]["AWS_SECRET_ACCESS_KEY"],
        region_name=stack["env"]["AWS_DEFAULT_REGION"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def check_run_in_mlflow_and_s3(stack: dict, run: dict) -> dict:
    """Metrics train/loss, a val/ metric and an NLL metric; a samples/*.png artifact that is an
    object in the moto bucket. Returns what the UI check needs."""
    info, metrics = run["info"], {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "train/loss" in metrics, sorted(metrics)
    assert any(k.startswith("val/") for k in metrics), sorted(metrics)
    nll = sorted(k for k in metrics if "nll" in k.lower())
    assert nll, f"no NLL metric among {sorted(metrics)}"
    pngs = [p for p in _list_artifacts(stack, info["run_id"]) if p.startswith("samples/")]
    pngs = [p for p in pngs if p.endswith(".png")]
    assert pngs, f"no samples/*.png artifact for run {info['run_id']}"
    keys = _s3_keys(stack, "mlflow/")
    for png in pngs:
        matching = [k for k in keys if k.endswith(f"/{info['run_id']}/artifacts/{png}")]
        assert matching, f"{png} of run {info['run_id']} is not in s3://{stack['bucket']}/mlflow/"
    return {
        "run_id": info["run_id"],
        "run_name": info["run_name"],
        "experiment_id": info["experiment_id"],
        "nll": nll[0],
        "png": pngs[0],
    }


def _run_chromium(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Chromium in its own session; on timeout, that session is killed by PID."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        for pid in localstack.stack_pids({proc.pid}, None):  # helpers it left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


def render(url: str, name: str, budget_ms: int = 20000) -> str:
    """The DOM of ``url`` after its scripts ran (virtual time), plus a screenshot, both kept."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bfn-chromium-") as profile_root:

        def flags(tag: str) -> list[str]:
            return [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                f"--user-data-dir={profile_root}/{tag}",
                "--window-size=1400,1600",
                f"--virtual-time-budget={budget_ms}",
            ]

        dom = _run_chromium([*flags("dom"), "--dump-dom", url], timeout=120).stdout
        _run_chromium([*flags("shot"), f"--screenshot={ARTIFACTS / f'{name}.png'}", url], 120)
    (ARTIFACTS / f"{name}.html").write_text(dom)
    return dom


def check_run_in_ui(stack: dict, run: dict, name: str) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    base = stack["urls"]["mlflow"]
    page = f"{base}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
    dom = render(page, f"{name}-run")
    assert run["run_name"] in dom, f"run name not rendered; see {ARTIFACTS / (name + '-run.html')}"
    assert run["nll"] in dom, f"{run['nll']} not rendered; see {ARTIFACTS / (name + '-run.html')}"
    dom = render(f"{page}/artifacts/{run['png']}", f"{name}-artifact")
    # the artifact view fetches the PNG and shows it as <img alt="samples/x.png" src="blob:...">
    assert f'alt="{run["png"]}"' in dom, f"no image; see {ARTIFACTS / (name + '-artifact.html')}"
    assert 'src="blob:' in dom
    assert (ARTIFACTS / f"{name}-run.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home_token = Path.home() / ".ray" / "auth_token"
    had_home_token = home_token.exists()
    root = tmp_path_factory.mktemp("stack")
    t0 = time.monotonic()
    state = localstack.up(root, timeout=240)
    state["up_s"] = time.monotonic() - t0
    print(f"stack up: {state['timings_s']}")
    try:
        yield state
    finally:
        localstack.down(root)
    assert home_token.exists() == had_home_token, "the stack must not write ~/.ray/auth_token"


@pytest.fixture(scope="module")
def probe_run(stack, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("probe_job")
    (workdir / "probe_job.py").write_text(PROBE_JOB)
    name = f"probe-{uuid.uuid4().hex[:8]}"
    env, known = submit.job_env(environ=_client_env(stack))
    t0 = time.monotonic()
    with _token_env(stack):
        client = submit.connect(stack["urls"]["ray_dashboard"], timeout=5)
        job_id = client.submit_job(
            entrypoint=f"python probe_job.py {name}",
            runtime_env=submit.build_runtime_env(env, working_dir=workdir),
            submission_id=f"bfn-probe-{name}",
        )
        status = submit.follow(client, job_id, known, timeout=300, poll=1)
        logs = client.get_job_logs(job_id)
    elapsed = time.monotonic() - t0
    print(f"probe job {job_id}: {status} in {elapsed:.1f}s")
    assert status == "SUCCEEDED", logs[-3000:]
    return {"job_id": job_id, "name": name, "logs": logs, "elapsed_s": elapsed}


@pytest.fixture(scope="module")
def s3_mnist(stack):
    """MNIST shards in the stack's bucket, as on a real cluster (`bfn data prepare --out s3://`)."""
    if importlib.util.find_spec("pipeline.cli") is None:
        pytest.skip("pipeline/cli.py (bfn train, bfn data) does not exist yet")
    uri = f"s3://{stack['bucket']}/data/mnist"
    bfn = str(Path(sys.executable).parent / "bfn")
    t0 = time.monotonic()
    proc = subprocess.run(
        [bfn, "data", "prepare", "mnist", "--out", uri],
        cwd=REPO,
        env=_client_env(stack),
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"bfn data prepare mnist --out {uri}: rc={proc.returncode} in {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return uri


@pytest.fixture(scope="module")
def smoke_train(stack, s3_mnist):
    """`bfn submit train experiment=smoke` with data on S3; `bfn submit` adds run=cluster
    (join the cluster, checkpoints under $BFN_STORAGE_PATH = s3://<bucket>/ray) and
    tracking=mlflow_server ($MLFLOW_TRACKING_URI, artifacts proxied to s3://<bucket>/mlflow)."""
    name = f"it-smoke-{uuid.uuid4().hex[:8]}"
    since_ms = int(time.time() * 1000) - 5000
    cmd = [*_bfn_command(), "submit", "train", "experiment=smoke", f"run.name={name}"]
    cmd += [f"data.uri={s3_mnist}"]
    cmd += ["--address", stack["urls"]["ray_dashboard"], "--timeout", str(TRAIN_TIMEOUT_S)]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=_client_env(stack),
        capture_output=True,
        text=True,
        timeout=TRAIN_TIMEOUT_S + 120,
    )
    elapsed = time.monotonic() - t0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "smoke-train-submit.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    print(f"bfn submit train experiment=smoke: rc={proc.returncode} in {elapsed:.1f}s")
    return {"name": name, "since_ms": since_ms, "proc": proc, "elapsed_s": elapsed, "cmd": cmd}


# --------------------------------------------------------------------------- tests


def test_stack_is_up_with_token_auth(stack):
    st = localstack.status(stack["root_dir"])
    assert st["running"], st
    token_path = Path(stack["token_path"])
    assert token_path.parent == Path(stack["root_dir"])
    assert oct(token_path.stat().st_mode & 0o777) == "0o600"
    token = token_path.read_text().strip()
    dash = stack["urls"]["ray_dashboard"]
    assert dash.startswith("http://127.0.0.1:")
    assert _http_json(f"{dash}/api/authentication_mode") == {"authentication_mode": "token"}
    assert _status(f"{dash}/api/jobs/") == 401
    assert _status(f"{dash}/api/jobs/", token="0" * 64) == 403
    assert _status(f"{dash}/api/jobs/", token=token) == 200
    for url in stack["urls"].values():
        assert url.startswith("http://127.0.0.1:"), url
    # every process of the stack (Ray's GCS, raylet, agents, workers included) listens on loopback
    from tests.faults import is_loopback, listening_sockets, pids_matching

    pids = pids_matching(marker=f"{localstack.MARKER_ENV}={stack['id']}")
    for service in stack["services"].values():  # each service runs in a session of its own
        pids += [service["pid"], *pids_matching(session=service["pid"])]
    sockets = listening_sockets(pids)
    assert len(sockets) > 5 and [s for s in sockets if not is_loopback(s[1])] == [], sockets


def test_probe_job_logs_run_to_mlflow_and_s3(stack, probe_run):
    assert "PROBE_RUN_ID" in probe_run["logs"]
    run = _find_run(stack, probe_run["name"], since_ms=0)
    checked = check_run_in_mlflow_and_s3(stack, run)
    assert checked["nll"] == "val/nll_bits_per_dim"


def test_probe_run_in_mlflow_ui(stack, probe_run):
    run = check_run_in_mlflow_and_s3(stack, _find_run(stack, probe_run["name"], since_ms=0))
    check_run_in_ui(stack, run, "probe")


def test_jobs_cli_list_and_logs(stack, probe_run):
    base = [sys.executable, "-m", "pipeline.cluster.submit", "jobs"]
    env = _client_env(stack)
    address = ["--address", stack["urls"]["ray_dashboard"]]
    listing = subprocess.run([*base, "list", *address], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert probe_run["job_id"] in listing.stdout
    logs = subprocess.run(
        [*base, "logs", probe_run["job_id"], *address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert logs.returncode == 0 and "PROBE_RUN_ID" in logs.stdout, logs.stderr


def test_smoke_train_job_succeeds(smoke_train):
    proc = smoke_train["proc"]
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{' '.join(smoke_train['cmd'])} failed:\n{tail}"
    assert "SUCCEEDED" in proc.stdout
    assert "submitted job bfn-train-" in proc.stdout
    assert "run=cluster tracking=mlflow_server" in proc.stderr  # the submission report is logged


def test_smoke_train_checkpoints_on_s3(stack, smoke_train):
    assert smoke_train["proc"].returncode == 0, "the smoke job failed (see the test above)"
    keys = _s3_keys(stack, "ray/")  # $BFN_STORAGE_PATH, set by the stack, forwarded by submit
    assert any("checkpoint" in k for k in keys), f"no checkpoint under s3://.../ray/: {keys[:20]}"


def test_smoke_train_run_in_mlflow_and_s3(stack, smoke_train):
    assert smoke_train["proc"].returncode == 0, "the smoke job failed (see the test above)"
    run = _find_run(stack, smoke_train["name"], smoke_train["since_ms"])
    check_run_in_mlflow_and_s3(stack, run)


def test_smoke_train_run_in_mlflow_ui(stack, smoke_train):
    assert smoke_train["proc"].returncode == 0, "the smoke job failed (see the test above)"
    run = check_run_in_mlflow_and_s3(stack, _find_run(stack, smoke_train["name"], smoke_train["since_ms"]))
    check_run_in_ui(stack, run, "smoke-train")


def test_zz_stack_down_stops_everything(stack):
    """Last in the module: `down` stops every process `up` started, by PID, and only those."""
    state = localstack.load_state(stack["root_dir"])
    pids = [s["pid"] for s in state["services"].values()]
    t0 = time.monotonic()
    report = localstack.down(stack["root_dir"])
    elapsed = time.monotonic() - t0
    print(f"stack down: {elapsed:.1f}s")
    assert elapsed < 60
    assert report["stray"] == []
    for pid in pids:
        assert not localstack.alive(pid), pid
    assert localstack.stack_pids(set(pids), state["id"]) == []
    assert localstack.status(stack["root_dir"]) == {"running": False, "root_dir": stack["root_dir"]}
    for url in stack["urls"].values():
        with pytest.raises(OSError):
            urllib.request.urlopen(url, timeout=3)

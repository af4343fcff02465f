"""A local development stack: Ray head (token auth) + MLflow server + S3 (moto), all on 127.0.0.1.

(Longer than 500 lines: three servers' start, health checks and stop by PID,
with the stack file that ties them together; `ruff format` spreads their argument lists.)

``up(root_dir)`` starts the three services as child processes, each in its own session, and
writes ``root_dir/stack.json`` (PIDs, ports, URLs, the environment a client should export).
``down(root_dir)`` stops exactly those processes by PID -- never ``ray stop``/``pkill``, which would
also stop every other Ray of the user. ``status(root_dir)`` reports liveness and health.
Processes are found and stopped with psutil.

Ray head
    ``ray start --head --block`` runs in the foreground as our child. ``--block`` makes that
    ``ray start`` process own the node: on SIGTERM it stops the raylet, GCS, dashboard and the
    rest. ``down`` then sweeps any survivor in the head's session or carrying the stack's marker
    variable ``BFN_LOCALSTACK_ID`` in its environment (Ray workers inherit it). The head takes
    127.0.0.1 as its node address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), so every Ray service
    listens on loopback only, and it holds the stack's S3 endpoint and (dummy) credentials, as an
    instance profile would on a cluster: jobs need no forwarded keys.

Token auth (Ray 2.60)
    ``up`` generates a 256-bit token into ``root_dir/auth_token`` (a new file, mode 0600, never
    through a symlink) and starts the head with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``
    pointing at it, so nothing is written to ``~/.ray``. Clients (``bfn submit``, ``ray job ...``)
    export ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``; ``bfn stack up`` prints those lines
    (the path, never the token).

The test suite's servers (``tests/servers.py``) start moto and MLflow with the same helpers:
``venv_bin``, ``free_port``, ``moto_argv``, ``http_status``, ``wait_until``, ``create_bucket``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from pipeline.secrets import write_secret_file

log = logging.getLogger(__name__)
STATE_FILE = "stack.json"
TOKEN_FILE = "auth_token"
MARKER_ENV = "BFN_LOCALSTACK_ID"
HOST = "127.0.0.1"
# moto accepts any credentials; these are the conventional dummies, not secrets.
S3_DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MOTO_READY_PATH = "/moto-api/"
NODE_PREFIX = "node"  # worker nodes joined by add_node: node1, node2, ...
# `ray start` for a joining node, kept on loopback: on Linux `ray start` replaces 127.0.0.1 in --address and
# --node-ip-address by the machine's network address (services.resolve_ip_for_localhost, a private function
# replaced here, in this development stack only), and the head listens on loopback alone
_LOOPBACK_NODE = (
    "import sys; import ray._private.services as services; services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)
# every Ray node on one machine needs ports of its own (the agent's listen port is fixed by default)
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)  # moto's dashboard: it answers once the server serves requests
_MAX_RAY_TEMP_DIR_LEN = 36  # unix socket paths must stay under 108 bytes; Ray adds about 70
# Variables of the caller that must not leak into the services we start.
_SCRUB_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    MARKER_ENV,
)


class StackError(RuntimeError):
    """A stack operation failed or timed out; the message says what, where and how to look."""


# --------------------------------------------------------------------------- processes


def venv_bin(name: str) -> str:
    """The executable ``name`` from this interpreter's environment (the venv's bin/), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"executable {name!r} not found next to {sys.executable} or on PATH")
    return found


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def moto_argv(port: int) -> list[str]:
    """The moto S3 server's command line, on loopback."""
    return [venv_bin("moto_server"), "-H", HOST, "-p", str(port)]


def start_time(pid: int) -> float | None:
    """When ``pid`` started (guards against PID reuse), or None if it does not exist."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def alive(pid: int, started: float | None = None) -> bool:
    """``pid`` runs (not a zombie) and, if ``started`` is given, is the process that started then."""
    try:
        process = psutil.Process(pid)
        running = process.status() != psutil.STATUS_ZOMBIE
        return running and (started is None or abs(process.create_time() - started) < 1e-3)
    except psutil.Error:
        return False


def stack_pids(sessions: set[int], marker: str | None) -> list[int]:
    """Live PIDs (not this process) in one of ``sessions`` or with ``MARKER_ENV=marker`` in their
    environment."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(process.pid) in sessions or (marker and process.environ().get(MARKER_ENV) == marker):
                found.append(process.pid)
    return found


def terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM ``pids``, SIGKILL those left after ``grace`` s; returns the PIDs that needed SIGKILL.
    Our own children are reaped, so none is left as a zombie."""
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            process.send_signal(signal.SIGTERM)
            processes.append(process)
    _, left = psutil.wait_procs(processes, timeout=grace)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=5)
    return [p.pid for p in left]


def _stop_service(svc: dict[str, Any], marker: str, grace: float) -> dict[str, Any]:
    """SIGTERM the service's main PID, wait, then sweep its session (and marked PIDs) by PID."""
    pid = svc["pid"]
    report = {"pid": pid, "was_alive": alive(pid, svc.get("start_time")), "killed": []}
    if report["was_alive"]:
        report["killed"] += terminate([pid], grace)
    rest = stack_pids({pid}, marker if svc.get("marked") else None)
    report["killed"] += terminate(rest, 10)
    report["swept"] = rest
    return report


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# --------------------------------------------------------------------------- HTTP probes


def http_status(url: str, token: str | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """(HTTP status, body) of a GET; an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until(
    name: str,
    ready: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen | None,
    log_path: Path | None,
    what: str,
    interval: float = 0.3,
) -> float:
    """Poll ``ready`` until True (OSError/ValueError: not yet); StackError as soon as ``proc`` exits
    or after ``timeout`` s, with the tail of ``log_path``. Returns the seconds waited."""
    started = time.monotonic()
    last_error: Exception | None = None
    while True:
        try:
            if ready():
                return time.monotonic() - started
        except (OSError, ValueError) as error:
            last_error = error
        failure = None
        if proc is not None and proc.poll() is not None:
            failure = f"{name} exited with code {proc.returncode} before {what}"
        elif time.monotonic() - started > timeout:
            failure = f"timed out after {timeout:.0f}s waiting for {name}: {what}"
            failure += f" (last error: {last_error})" if last_error else ""
        if failure:
            raise StackError(failure + (f". Log {log_path}:\n{_tail(log_path)}" if log_path else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- state


def state_path(root_dir: str | os.PathLike) -> Path:
    return Path(root_dir).resolve() / STATE_FILE


def load_state(root_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = state_path(root_dir)
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(root: Path, state: dict[str, Any]) -> None:
    temporary = root / (STATE_FILE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(root / STATE_FILE)


def export_lines(state: dict[str, Any]) -> str:
    """``export K=V`` lines for a shell (the token itself is never printed, only its path)."""
    return "\n".join(f"export {k}={v}" for k, v in state["env"].items())


def _ray_temp_dir(root: Path, stack_id: str) -> Path:
    candidate = root / "ray"
    return candidate if len(str(candidate)) <= _MAX_RAY_TEMP_DIR_LEN else Path("/tmp") / f"bfnray-{stack_id[:8]}"


def _new_token(root: Path) -> Path:
    """A fresh token file; an old one (or anything else at that name) is removed, never reused."""
    path = root / TOKEN_FILE
    path.unlink(missing_ok=True)  # unlink removes a symlink itself, not its target
    return write_secret_file(path, secrets.token_hex(32))  # same format as Ray's own generator


def _new_state(root: Path, ports: dict[str, int], bucket: str, token_path: Path) -> dict[str, Any]:
    urls = {
        "ray_dashboard": f"http://{HOST}:{ports['dashboard']}",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "s3": f"http://{HOST}:{ports['s3']}",
    }
    env = {
        "RAY_API_SERVER_ADDRESS": urls["ray_dashboard"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "AWS_ENDPOINT_URL": urls["s3"],
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        **S3_DUMMY_CREDENTIALS,
        "BFN_STORAGE_PATH": f"s3://{bucket}/ray",
    }  # Ray Train checkpoints (run=cluster)
    return {
        "id": uuid.uuid4().hex,
        "root_dir": str(root),
        "started_at": time.time(),
        "ports": ports,
        "urls": urls,
        "bucket": bucket,
        "token_path": str(token_path),
        "services": {},
        "env": env,
        "timings_s": {},
    }


# --------------------------------------------------------------------------- up


class _Launcher:
    """Starts services as children in their own sessions and records them in the state file."""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.root, self.state, self.logs = root, state, root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.launched_at: dict[str, float] = {}

    def launch(self, name: str, argv: list[str], env: dict[str, str], marked: bool = False) -> None:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.procs[name], self.launched_at[name] = proc, time.monotonic()
        self.state["services"][name] = {
            "pid": proc.pid,
            "start_time": start_time(proc.pid),
            "argv": argv,
            "log": str(log_path),
            "marked": marked,
        }
        _write_state(self.root, self.state)

    def wait(self, name: str, label: str, ready: Callable[[], bool], what: str, timeout: float) -> None:
        wait_until(label, ready, timeout=timeout, proc=self.procs[name], log_path=self.logs / f"{name}.log", what=what)
        self.state["timings_s"][name] = time.monotonic() - self.launched_at[name]


def _mlflow_argv(root: Path, bucket: str, port: int) -> list[str]:
    return [
        venv_bin("mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def _ray_argv(ports: dict[str, int], num_cpus: int, object_store_memory: int, ray_tmp: Path) -> list[str]:
    return [
        venv_bin("ray"),
        "start",
        "--head",
        "--block",
        f"--port={ports['ray']}",
        f"--ray-client-server-port={ports['ray_client']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={ports['dashboard']}",
        f"--num-cpus={num_cpus}",
        f"--object-store-memory={object_store_memory}",
        f"--temp-dir={ray_tmp}",
        "--disable-usage-stats",
    ]


def _ray_env(base_env: dict[str, str], state: dict[str, Any], ray_tmp: Path) -> dict[str, str]:
    return {
        **base_env,
        MARKER_ENV: state["id"],  # inherited by every Ray process, so `down` can find them all
        # job entrypoints (`python -m pipeline.cli ...`) must find this environment's python
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", "")]),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1: Ray listens on loopback
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_TMPDIR": str(ray_tmp),
        "AWS_ENDPOINT_URL": state["urls"]["s3"],
        "MLFLOW_S3_ENDPOINT_URL": state["urls"]["s3"],
        **S3_DUMMY_CREDENTIALS,
        **state.get("ray_settings", {}),
    }


def _start_services(
    launcher: _Launcher, state: dict[str, Any], num_cpus: int, object_store_memory: int, timeout: float
) -> None:
    """moto first (MLflow needs the bucket), then MLflow and Ray in parallel (each takes seconds)."""
    root, ports, urls = launcher.root, state["ports"], state["urls"]
    base_env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    launcher.launch("s3", moto_argv(ports["s3"]), base_env)
    launcher.wait(
        "s3",
        "moto S3 server",
        lambda: http_status(urls["s3"] + MOTO_READY_PATH)[0] < 500,
        f"{urls['s3']} answering",
        timeout,
    )
    create_bucket(urls["s3"], state["bucket"])
    mlflow_env = {
        **base_env,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": urls["s3"],
        **S3_DUMMY_CREDENTIALS,
    }
    launcher.launch("mlflow", _mlflow_argv(root, state["bucket"], ports["mlflow"]), mlflow_env)
    ray_tmp = _ray_temp_dir(root, state["id"])
    ray_tmp.mkdir(parents=True, exist_ok=True)
    state["ray_temp_dir"] = str(ray_tmp)
    launcher.launch(
        "ray", _ray_argv(ports, num_cpus, object_store_memory, ray_tmp), _ray_env(base_env, state, ray_tmp), marked=True
    )
    launcher.wait(
        "mlflow",
        "MLflow server",
        lambda: http_status(urls["mlflow"] + "/health")[0] == 200,
        f"{urls['mlflow']}/health returning 200",
        timeout,
    )
    token = Path(state["token_path"]).read_text()
    launcher.wait(
        "ray",
        "Ray head",
        lambda: http_status(urls["ray_dashboard"] + "/api/jobs/", token)[0] == 200,
        f"job API at {urls['ray_dashboard']}/api/jobs/ accepting the token",
        timeout,
    )


def up(
    root_dir: str | os.PathLike,
    *,
    num_cpus: int = 4,
    object_store_memory: int = 1024**3,
    bucket: str = "bfn",
    timeout: float = 180.0,
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    mlflow_port: int | None = None,
    s3_port: int | None = None,
    echo: Callable[[str], None] = log.info,
    ray_settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start S3 (moto), MLflow and a token-auth Ray head on 127.0.0.1; return the state dict.

    ``ray_settings``: environment of every Ray node of the stack (head and ``add_node``), e.g. Ray's system
    settings ``RAY_health_check_period_ms``.

    Every wait is bounded by ``timeout`` seconds; on any failure everything already started is
    stopped and a :class:`StackError` names the service, its URL and the tail of its log.
    """
    root = Path(root_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    previous = load_state(root)
    if previous and any(alive(s["pid"], s.get("start_time")) for s in previous["services"].values()):
        raise StackError(
            f"a stack is already running from {root} (see {root / STATE_FILE}); run `bfn stack down --dir {root}` first"
        )
    started = time.monotonic()
    ports = {
        "ray": ray_port or free_port(),
        "dashboard": dashboard_port or free_port(),
        "ray_client": free_port(),
        "dashboard_agent": free_port(),
        "mlflow": mlflow_port or free_port(),
        "s3": s3_port or free_port(),
    }
    state = _new_state(root, ports, bucket, _new_token(root))
    state["ray_settings"] = dict(ray_settings or {})
    try:
        _start_services(_Launcher(root, state), state, num_cpus, object_store_memory, timeout)
    except BaseException as error:
        with contextlib.suppress(Exception):
            down(root, echo=lambda _m: None)
        if isinstance(error, Exception) and not isinstance(error, StackError):
            raise StackError(f"stack up failed: {error!r}") from error
        raise
    state["timings_s"]["total"] = time.monotonic() - started
    _write_state(root, state)
    urls = state["urls"]
    echo(
        f"stack up in {state['timings_s']['total']:.1f}s: Ray dashboard {urls['ray_dashboard']}, "
        f"MLflow {urls['mlflow']}, S3 {urls['s3']} (bucket {bucket})"
    )
    return state


# --------------------------------------------------------------------------- worker nodes


def add_node(
    root_dir: str | os.PathLike,
    *,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    object_store_memory: int = 256 * 1024**2,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Join one more Ray node (a raylet of its own, ``ray start --address --block``) to the stack's head, on
    127.0.0.1 with ports of its own and the head's environment (token, S3, marker). ``resources``: custom
    resources it offers (``{"bfn_worker": 1}``: training workers that ask for it run on such nodes only).
    Returns ``{"name", "pid", "node_id"}``; ``down`` stops it with the rest."""
    root = Path(root_dir).resolve()
    state = load_state(root)
    if state is None or "ray" not in state["services"]:
        raise StackError(f"no stack running from {root}: `bfn stack up --dir {root}` first")
    name = f"{NODE_PREFIX}{1 + sum(n.startswith(NODE_PREFIX) for n in state['services'])}"
    # a temp folder of its own: nodes sharing one would each stream every node's worker logs to the job
    ray_tmp = Path(state["ray_temp_dir"]) / name
    argv = [
        sys.executable,
        "-c",
        _LOOPBACK_NODE,
        "start",
        "--block",
        f"--address={HOST}:{state['ports']['ray']}",
        f"--node-ip-address={HOST}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(resources or {})}",
        f"--object-store-memory={object_store_memory}",
        f"--temp-dir={ray_tmp}",
        *(f"--{port}={free_port()}" for port in _NODE_PORTS),
        "--disable-usage-stats",
    ]
    known = {svc.get("node_id") for svc in state["services"].values()}
    launcher = _Launcher(root, state)
    base_env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the head's loopback switch) makes `ray start` refuse to join a node;
    # with it on, _LOOPBACK_NODE keeps --node-ip-address and --address on 127.0.0.1
    env = {**_ray_env(base_env, state, ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launcher.launch(name, argv, env, marked=True)
    found: list[str] = []

    def joined() -> bool:
        found[:] = sorted(_node_ids(state) - known)
        return bool(found)

    launcher.wait(name, f"Ray node {name}", joined, f"a new alive node in the cluster at {HOST}", timeout)
    state["services"][name]["node_id"] = found[0]
    _write_state(root, state)
    return {"name": name, "pid": state["services"][name]["pid"], "node_id": found[0]}


def raylet_pid(root_dir: str | os.PathLike, name: str) -> int:
    """The raylet process of node ``name`` (a child of its ``ray start --block``): what a node loss kills."""
    state = load_state(root_dir)
    if state is None or name not in state["services"]:
        raise StackError(f"no node {name!r} in the stack at {root_dir}")
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(state["services"][name]["pid"]).children(recursive=True):
            if child.name() == "raylet":
                return child.pid
    raise StackError(f"node {name!r} has no raylet running")


def _node_ids(state: dict[str, Any]) -> set[str]:
    """Alive worker (non-head) node ids, from the dashboard's state API (with the stack's token)."""
    token = Path(state["token_path"]).read_text().strip()
    status, body = http_status(state["urls"]["ray_dashboard"] + "/api/v0/nodes", token, timeout=10)
    if status != 200:
        raise ValueError(f"dashboard /api/v0/nodes answered {status}")
    nodes = json.loads(body)["data"]["result"]["result"]
    return {n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]}


def create_bucket(s3_url: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 server at ``s3_url`` (moto: the dummy credentials)."""
    import boto3  # lazy: ~0.25 s on every `bfn` command (build_parser imports this module), for `bfn stack up`

    credentials = S3_DUMMY_CREDENTIALS
    boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name=credentials["AWS_DEFAULT_REGION"],
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=bucket)


# --------------------------------------------------------------------------- down / status


def down(root_dir: str | os.PathLike, *, echo: Callable[[str], None] = log.info, grace: float = 30.0) -> dict:
    """Stop what ``up`` started, by PID (Ray first, then MLflow, then S3). Idempotent."""
    root = Path(root_dir).resolve()
    state = load_state(root)
    if state is None:
        echo(f"no stack state at {root / STATE_FILE}; nothing to stop")
        return {}
    started = time.monotonic()
    nodes = sorted(name for name in state["services"] if name.startswith(NODE_PREFIX))
    reports = {
        name: _stop_service(state["services"][name], state["id"], grace)
        for name in (*nodes, "ray", "mlflow", "s3")
        if name in state["services"]
    }
    # a last sweep for anything carrying the marker (e.g. a Ray worker that changed session)
    stray = stack_pids(set(), state["id"])
    terminate(stray, 0)
    reports["stray"] = stray
    ray_tmp = state.get("ray_temp_dir")
    if ray_tmp and not Path(ray_tmp).is_relative_to(root) and Path(ray_tmp).name.startswith("bfnray-"):
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stopped = dict(state, stopped_at=time.time(), down_report=reports)
    (root / (STATE_FILE + ".stopped")).write_text(json.dumps(stopped, indent=2) + "\n")
    (root / STATE_FILE).unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    echo(f"stack down in {elapsed:.1f}s ({', '.join(reports)} stopped; logs kept in {root / 'logs'})")
    return {"elapsed_s": elapsed, **reports}


def status(root_dir: str | os.PathLike) -> dict[str, Any]:
    """Liveness of each PID and health of each endpoint; ``{"running": False}`` when no stack."""
    root = Path(root_dir).resolve()
    state = load_state(root)
    if state is None:
        return {"running": False, "root_dir": str(root)}
    token = None
    with contextlib.suppress(OSError):
        token = Path(state["token_path"]).read_text().strip()
    urls = state["urls"]
    probes = {
        "ray": (urls["ray_dashboard"], "/api/jobs/"),
        "mlflow": (urls["mlflow"], "/health"),
        "s3": (urls["s3"], MOTO_READY_PATH),
    }
    services = {}
    for name, svc in state["services"].items():
        base, probe = probes.get(name, (urls["ray_dashboard"], None))  # a worker node: its process is its health
        healthy = probe is None and alive(svc["pid"], svc.get("start_time"))
        with contextlib.suppress(OSError, ValueError):
            if probe is not None:
                healthy = http_status(base + probe, token if name == "ray" else None, timeout=2)[0] == 200
        services[name] = {
            "pid": svc["pid"],
            "alive": alive(svc["pid"], svc.get("start_time")),
            "healthy": healthy,
            "url": base,
        }
    running = bool(services) and all(s["alive"] and s["healthy"] for s in services.values())
    return {"running": running, "root_dir": str(root), "services": services, "env": state["env"]}


# --------------------------------------------------------------------------- CLI


def _print_status(directory: str) -> int:
    st = status(directory)
    if not st.get("services"):
        print(f"no stack running from {st['root_dir']}")
        return 1
    for name, s in st["services"].items():
        print(f"{name:7s} pid={s['pid']:<8d} alive={s['alive']!s:5s} healthy={s['healthy']!s:5s} {s['url']}")
    print(export_lines(st))
    return 0 if st["running"] else 1


def _cmd(args: argparse.Namespace) -> int:
    try:
        if args.stack_cmd == "up":
            state = up(
                args.dir,
                num_cpus=args.num_cpus,
                bucket=args.bucket,
                timeout=args.timeout,
                ray_port=args.ray_port,
                dashboard_port=args.dashboard_port,
                mlflow_port=args.mlflow_port,
                s3_port=args.s3_port,
            )
            print("# export these to use the stack (the token is read from RAY_AUTH_TOKEN_PATH):")
            print(export_lines(state))
            print(f"# then: bfn submit train experiment=smoke --address {state['urls']['ray_dashboard']}")
            print(f"# stop: bfn stack down --dir {state['root_dir']}")
        elif args.stack_cmd == "down":
            down(args.dir)
        else:
            return _print_status(args.dir)
    except StackError as error:
        log.error("%s", error)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``stack {up,down,status}`` to a CLI's subparsers (each sets ``func=``)."""
    parser = subparsers.add_parser("stack", help="local dev stack: Ray head (token auth) + MLflow + S3 (moto)")
    sub = parser.add_subparsers(dest="stack_cmd", required=True, metavar="{up,down,status}")
    for name, help_ in (
        ("up", "start the stack"),
        ("down", "stop what `up` started, by PID"),
        ("status", "PIDs, health, and the env to export"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--dir", default="runs/stack", help="state/log/data dir (default runs/stack)")
        if name == "up":
            sp.add_argument("--num-cpus", type=int, default=4)
            sp.add_argument("--bucket", default="bfn")
            sp.add_argument("--timeout", type=float, default=180.0, help="seconds per wait")
            for port in ("ray-port", "dashboard-port", "mlflow-port", "s3-port"):
                sp.add_argument(f"--{port}", type=int, default=None, help="default: a free port")
        sp.set_defaults(func=_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.devstack")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

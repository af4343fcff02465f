"""A local development stack: Ray head (token auth) + MLflow server + S3 (moto), all on 127.0.0.1.

``up(root_dir)`` starts the three services as child processes, each in its own session, and
writes ``root_dir/stack.json`` (PIDs, ports, URLs, the environment a client should export).
``down(root_dir)`` stops exactly those processes by PID -- never ``ray stop``/``pkill``, which would
also stop every other Ray of the user. ``status(root_dir)`` reports liveness and health.

Ray head
    ``ray start --head --block`` runs in the foreground as our child. ``--block`` makes that
    ``ray start`` process own the node (``shutdown_at_exit``): on SIGTERM it kills the raylet,
    GCS, dashboard and the rest. Afterwards ``down`` sweeps any survivor that is in the head's
    session or carries the stack's marker variable ``BFN_LOCALSTACK_ID`` in its environment (Ray
    workers inherit it).

Token auth (Ray 2.60)
    ``RAY_AUTH_MODE=token`` turns it on. The token is looked up, in this order, from
    ``RAY_AUTH_TOKEN`` (the value), ``RAY_AUTH_TOKEN_PATH`` (a file), then ``~/.ray/auth_token``.
    ``up`` generates a 256-bit token (as ``ray get-auth-token --generate`` would), writes it to
    ``root_dir/auth_token`` (mode 0600) and starts the head with ``RAY_AUTH_TOKEN_PATH`` pointing at
    it, so nothing is written to ``~/.ray``. Clients (``bfn submit``, ``ray job ...``) export
    ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH=root_dir/auth_token``; ``bfn stack up``
    prints those lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
# unix socket paths must stay under 108 bytes; Ray adds about 70 to --temp-dir
_MAX_RAY_TEMP_DIR_LEN = 36
# Variables of the caller that must not leak into the services we start.
_SCRUB_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


class StackError(RuntimeError):
    """A stack operation failed or timed out; the message says what, where and how to look."""


# --------------------------------------------------------------------------- processes


def _bin(name: str) -> str:
    """The executable ``name`` from this interpreter's environment, else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"executable {name!r} not found next to {sys.executable} or on PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot); guards against PID reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, start_time: int | None = None) -> bool:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (no zombie left behind); ignore it otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _stack_pids(session_ids: set[int], marker: str | None) -> list[int]:
    """PIDs in one of ``session_ids`` or (if ``marker``) with ``MARKER_ENV=marker`` in their env."""
    needle = f"{MARKER_ENV}={marker}".encode() if marker else None
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if int(fields[3]) in session_ids:
            found.append(pid)
            continue
        if needle is None:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in left:
            _reap(pid)
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.2)
    return left


def _stop_service(svc: dict[str, Any], marker: str, grace: float) -> dict[str, Any]:
    """SIGTERM the service's main PID, wait, then sweep its session (and marked PIDs) by PID."""
    pid, start = svc["pid"], svc.get("start_time")
    report = {"pid": pid, "was_alive": _alive(pid, start), "killed": []}
    if report["was_alive"]:
        _signal(pid, signal.SIGTERM)
        if _wait_gone([pid], grace):
            _signal(pid, signal.SIGKILL)
            report["killed"].append(pid)
            _wait_gone([pid], 5)
    rest = _stack_pids({pid}, marker if svc.get("marked") else None)
    if rest:
        for p in rest:
            _signal(p, signal.SIGTERM)
        for p in _wait_gone(rest, 10):
            _signal(p, signal.SIGKILL)
            report["killed"].append(p)
        _wait_gone(rest, 5)
    report["swept"] = rest
    return report


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- HTTP probes


def _http(url: str, token: str | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_until(
    name: str,
    ready: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen | None,
    log: Path,
    what: str,
) -> float:
    """Poll ``ready`` until True; fail fast if ``proc`` exits; raise after ``timeout`` s."""
    t0 = time.monotonic()
    last_exc: Exception | None = None
    while True:
        try:
            if ready():
                return time.monotonic() - t0
        except (OSError, ValueError) as e:
            last_exc = e
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{name} exited with code {proc.returncode} before {what}. Log {log}:\n{_tail(log)}"
            )
        if time.monotonic() - t0 > timeout:
            raise StackError(
                f"timed out after {timeout:.0f}s waiting for {name}: {what}"
                + (f" (last error: {last_exc})" if last_exc else "")
                + f". Log {log}:\n{_tail(log)}"
            )
        time.sleep(0.3)


# --------------------------------------------------------------------------- state


def state_path(root_dir: str | os.PathLike) -> Path:
    return Path(root_dir).resolve() / STATE_FILE


def load_state(root_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = state_path(root_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write_state(root: Path, state: dict[str, Any]) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(root / STATE_FILE)


def export_lines(state: dict[str, Any]) -> str:
    """``export K=V`` lines for a shell (the token itself is never printed, only its path)."""
    return "\n".join(f"export {k}={v}" for k, v in state["env"].items())


def _ray_temp_dir(root: Path, stack_id: str) -> Path:
    candidate = root / "ray"
    if len(str(candidate)) <= _MAX_RAY_TEMP_DIR_LEN:
        return candidate
    return Path("/tmp") / f"bfnray-{stack_id[:8]}"


# --------------------------------------------------------------------------- up / down / status


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
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start S3 (moto), MLflow and a token-auth Ray head on 127.0.0.1; return the state dict.

    Every wait is bounded by ``timeout`` seconds; on any failure everything already started is
    stopped and a :class:`StackError` names the service, its URL and the tail of its log.
    """
    root = Path(root_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    previous = load_state(root)
    if previous and any(
        _alive(s["pid"], s.get("start_time")) for s in previous["services"].values()
    ):
        raise StackError(
            f"a stack is already running from {root} (see {root / STATE_FILE}); "
            f"run `bfn stack down --dir {root}` first"
        )
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    stack_id = uuid.uuid4().hex
    t_start = time.monotonic()

    ports = {
        "ray": ray_port or _free_port(),
        "dashboard": dashboard_port or _free_port(),
        "ray_client": _free_port(),
        "dashboard_agent": _free_port(),
        "mlflow": mlflow_port or _free_port(),
        "s3": s3_port or _free_port(),
    }
    s3_url = f"http://{HOST}:{ports['s3']}"
    mlflow_url = f"http://{HOST}:{ports['mlflow']}"
    dashboard_url = f"http://{HOST}:{ports['dashboard']}"

    token_path = root / TOKEN_FILE
    token = secrets.token_hex(32)  # same format as Ray's own generator
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)

    base_env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV and k != MARKER_ENV}

    state: dict[str, Any] = {
        "id": stack_id,
        "root_dir": str(root),
        "started_at": time.time(),
        "ports": ports,
        "urls": {"ray_dashboard": dashboard_url, "mlflow": mlflow_url, "s3": s3_url},
        "bucket": bucket,
        "token_path": str(token_path),
        "services": {},
        "env": {
            "RAY_API_SERVER_ADDRESS": dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "MLFLOW_TRACKING_URI": mlflow_url,
            "AWS_ENDPOINT_URL": s3_url,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            **S3_DUMMY_CREDENTIALS,
            "BFN_STORAGE_PATH": f"s3://{bucket}/ray",  # Ray Train checkpoints (run=cluster)
        },
        "timings_s": {},
    }
    procs: dict[str, subprocess.Popen] = {}
    launched_at: dict[str, float] = {}

    def launch(name: str, argv: list[str], env: dict[str, str], marked: bool = False) -> None:
        log_path = logs / f"{name}.log"
        log_f = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here on
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log_f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=root,
                start_new_session=True,
            )
        finally:
            log_f.close()
        procs[name] = proc
        launched_at[name] = time.monotonic()
        state["services"][name] = {
            "pid": proc.pid,
            "start_time": _start_time(proc.pid),
            "argv": argv,
            "log": str(log_path),
            "marked": marked,
        }
        _write_state(root, state)

    try:
        # 1. S3 (moto): fast, and MLflow needs the bucket.
        launch("s3", [_bin("moto_server"), "-H", HOST, "-p", str(ports["s3"])], base_env)
        state["timings_s"]["s3"] = _wait_until(
            "moto S3 server",
            lambda: _http(s3_url + "/moto-api/")[0] < 500,
            timeout=timeout,
            proc=procs["s3"],
            log=logs / "s3.log",
            what=f"{s3_url} answering",
        )
        _create_bucket(s3_url, bucket)

        # 2. MLflow and 3. Ray start in parallel (each takes several seconds).
        mlflow_env = {
            **base_env,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            **S3_DUMMY_CREDENTIALS,
        }
        launch(
            "mlflow",
            [
                _bin("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{bucket}/mlflow",
                "--host",
                HOST,
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "1",
            ],
            mlflow_env,
        )

        ray_tmp = _ray_temp_dir(root, stack_id)
        ray_tmp.mkdir(parents=True, exist_ok=True)
        state["ray_temp_dir"] = str(ray_tmp)
        ray_env = {
            **base_env,
            MARKER_ENV: stack_id,  # inherited by every Ray process, so `down` can find them all
            # job entrypoints (`python -m pipeline.cli ...`) must find this environment's python
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", "")]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_TMPDIR": str(ray_tmp),
        }
        launch(
            "ray",
            [
                _bin("ray"),
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
            ],
            ray_env,
            marked=True,
        )

        _wait_until(
            "MLflow server",
            lambda: _http(mlflow_url + "/health")[0] == 200,
            timeout=timeout,
            proc=procs["mlflow"],
            log=logs / "mlflow.log",
            what=f"{mlflow_url}/health returning 200",
        )
        state["timings_s"]["mlflow"] = time.monotonic() - launched_at["mlflow"]
        _wait_until(
            "Ray head",
            lambda: _http(dashboard_url + "/api/jobs/", token)[0] == 200,
            timeout=timeout,
            proc=procs["ray"],
            log=logs / "ray.log",
            what=f"job API at {dashboard_url}/api/jobs/ accepting the token",
        )
        state["timings_s"]["ray"] = time.monotonic() - launched_at["ray"]
        state["timings_s"]["total"] = time.monotonic() - t_start
        _write_state(root, state)
    except BaseException as e:
        with contextlib.suppress(Exception):
            down(root, echo=lambda _m: None)
        if isinstance(e, StackError):
            raise
        if isinstance(e, Exception):
            raise StackError(f"stack up failed: {e!r}") from e
        raise
    echo(
        f"stack up in {state['timings_s']['total']:.1f}s: Ray dashboard {dashboard_url}, "
        f"MLflow {mlflow_url}, S3 {s3_url} (bucket {bucket})"
    )
    return state


def _create_bucket(s3_url: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name=S3_DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=bucket)


def down(
    root_dir: str | os.PathLike, *, echo: Callable[[str], None] = print, grace: float = 30.0
) -> dict[str, Any]:
    """Stop what ``up`` started, by PID (Ray first, then MLflow, then S3). Idempotent."""
    root = Path(root_dir).resolve()
    state = load_state(root)
    if state is None:
        echo(f"no stack state at {root / STATE_FILE}; nothing to stop")
        return {}
    t0 = time.monotonic()
    reports = {}
    for name in ("ray", "mlflow", "s3"):
        svc = state["services"].get(name)
        if svc:
            reports[name] = _stop_service(svc, state["id"], grace)
    # a last sweep for anything carrying the marker (e.g. a Ray worker that changed session)
    stray = _stack_pids(set(), state["id"])
    for p in stray:
        _signal(p, signal.SIGKILL)
    _wait_gone(stray, 5)
    reports["stray"] = stray
    ray_tmp = state.get("ray_temp_dir")
    if (
        ray_tmp
        and not Path(ray_tmp).is_relative_to(root)
        and Path(ray_tmp).name.startswith("bfnray-")
    ):
        shutil.rmtree(ray_tmp, ignore_errors=True)
    stopped = dict(state, stopped_at=time.time(), down_report=reports)
    (root / (STATE_FILE + ".stopped")).write_text(json.dumps(stopped, indent=2) + "\n")
    (root / STATE_FILE).unlink(missing_ok=True)
    elapsed = time.monotonic() - t0
    echo(
        f"stack down in {elapsed:.1f}s ({', '.join(reports)} stopped; logs kept in {root / 'logs'})"
    )
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
    bases = {"ray": urls["ray_dashboard"], "mlflow": urls["mlflow"], "s3": urls["s3"]}
    probes = {"ray": "/api/jobs/", "mlflow": "/health", "s3": "/moto-api/"}
    services = {}
    for name, svc in state["services"].items():
        healthy = False
        with contextlib.suppress(OSError, ValueError):
            url = bases[name] + probes[name]
            healthy = _http(url, token if name == "ray" else None, timeout=2)[0] == 200
        services[name] = {
            "pid": svc["pid"],
            "alive": _alive(svc["pid"], svc.get("start_time")),
            "healthy": healthy,
            "url": bases[name],
        }
    running = bool(services) and all(s["alive"] and s["healthy"] for s in services.values())
    return {"running": running, "root_dir": str(root), "services": services, "env": state["env"]}


# --------------------------------------------------------------------------- CLI


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
            print(
                "# then: bfn submit train experiment=smoke --address "
                + state["urls"]["ray_dashboard"]
            )
            print(f"# stop: bfn stack down --dir {state['root_dir']}")
        elif args.stack_cmd == "down":
            down(args.dir)
        else:
            st = status(args.dir)
            if not st.get("services"):
                print(f"no stack running from {st['root_dir']}")
                return 1
            for name, s in st["services"].items():
                print(
                    f"{name:7s} pid={s['pid']:<8d} alive={s['alive']!s:5s} "
                    f"healthy={s['healthy']!s:5s} {s['url']}"
                )
            print(export_lines(st))
            return 0 if st["running"] else 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``stack {up,down,status}`` to a CLI's subparsers (each sets ``func=``)."""
    p = subparsers.add_parser(
        "stack", help="local dev stack: Ray head (token auth) + MLflow + S3 (moto)"
    )
    sub = p.add_subparsers(dest="stack_cmd", required=True, metavar="{up,down,status}")
    for name, help_ in (
        ("up", "start the stack"),
        ("down", "stop what `up` started, by PID"),
        ("status", "PIDs, health, and the env to export"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument(
            "--dir", default="runs/stack", help="state/log/data dir (default runs/stack)"
        )
        if name == "up":
            sp.add_argument("--num-cpus", type=int, default=4)
            sp.add_argument("--bucket", default="bfn")
            sp.add_argument("--timeout", type=float, default=180.0, help="seconds per wait")
            for port in ("ray-port", "dashboard-port", "mlflow-port", "s3-port"):
                sp.add_argument(f"--{port}", type=int, default=None, help="default: a free port")
        sp.set_defaults(func=_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.devstack")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

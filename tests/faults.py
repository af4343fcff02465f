"""Fault injection for the fault-tolerance and security tests (tests/integration/test_faults.py).

What is here, each acting on this machine only:

* processes: find them by PID -- an environment marker they inherited, their session id, or a
  path in their command line (a private ``RAY_TMPDIR``) -- and stop them by PID. Never ``pkill``,
  ``killall`` or ``ray stop``: other Ray instances of the same user run on this machine.
* Ray Train workers of the in-process runtime (``ray_local``): their PIDs from the state API, and
  which one is rank 0 (the worker whose log holds the ``[bfn] step`` lines only rank 0 prints).
* ``MLflowServer``: a real ``mlflow server`` (sqlite, one worker, no job runner) on 127.0.0.1 that
  can be stopped and started again on the same port.
* ``FaultyS3Proxy``: a small HTTP reverse proxy on 127.0.0.1 in front of an S3 endpoint (moto) that
  answers the requests a rule picks with an S3 error instead of forwarding them, and records every
  request, so a test can tell a retried write from a lost one.
* ``write_malicious_pt``: a ``.pt`` file whose unpickling would run code (it writes a marker file).
* listening sockets of a set of PIDs (to check what binds to which address).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tests.servers import HOST, free_port, venv_bin, wait_for_http

# ----------------------------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], object], *, timeout: float, interval: float = 0.2,
               what: str = "condition") -> object:  # fmt: skip
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def pids_matching(*, marker: str | None = None, session: int | None = None,
                  path: str | None = None) -> list[int]:  # fmt: skip
    """Live PIDs (other than this process) that have ``marker`` (``KEY=VALUE``) in their
    environment, or belong to session ``session``, or have ``path`` in their command line."""
    me, found = os.getpid(), []
    needle = marker.encode() if marker else None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        if session is not None and int(fields[3]) == session:
            found.append(pid)
            continue
        try:
            if needle and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(pid)
                continue
            if path and path.encode() in (entry / "cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def kill_pids(pids: Iterable[int], *, grace: float = 10.0) -> list[int]:
    """SIGTERM each PID, SIGKILL what is left after ``grace`` s; returns the PIDs that needed it."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        for pid in pids:  # reap our own children so they do not linger as zombies
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    stubborn = [p for p in pids if alive(p)]
    for pid in stubborn:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in stubborn), timeout=10, what="SIGKILLed PIDs gone")
    return stubborn


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the PIDs hold (IPv4 and IPv6)."""
    listening: dict[str, tuple[str, int]] = {}
    for proto in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                address, port = fields[1].split(":")
                if proto == "tcp":
                    ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                else:  # four little-endian 32-bit words
                    raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8))
                    ip = socket.inet_ntop(socket.AF_INET6, raw)
                listening[fields[9]] = (ip, int(port, 16))
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in listening:
                        out.append((pid, *listening[target[8:-1]]))
    return sorted(set(out))


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------ Ray (in-process)


def ray_session_dir() -> Path:
    """The session folder of the Ray runtime this process is connected to."""
    import ray._private.worker

    return Path(ray._private.worker._global_node.get_session_dir_path())


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker actors of the connected runtime (state API)."""
    import ray._private.worker
    from ray.util.state import list_actors

    # the address of *this* runtime: without it the state API looks for "the" local Ray and fails
    # with "Found multiple active Ray instances" when other runtimes share the machine
    address = f"http://{ray._private.worker.get_dashboard_url()}"
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)  # fmt: skip
    return sorted(int(a.pid) for a in actors if a.pid and alive(int(a.pid)))


def rank0_worker_pid(session_dir: Path) -> int | None:
    """The live Train worker that prints ``[bfn] step`` lines: only rank 0 does (worker.py).

    Ray names each worker's stdout ``logs/worker-<worker id>-<job id>-<pid>.out``."""
    for pid in train_worker_pids():
        for log in (session_dir / "logs").glob(f"worker-*-{pid}.out"):
            with contextlib.suppress(OSError):
                if "[bfn] step" in log.read_text(errors="replace"):
                    return pid
    return None


# ------------------------------------------------------------------------------ checkpoints


def complete_checkpoints(run_folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints (COMPLETE marker) in a local run folder."""
    out = []
    for path in Path(run_folder).glob("checkpoint_*"):
        state = path / "train_state.json"
        if (path / "COMPLETE").exists() and state.exists():
            with contextlib.suppress(OSError, ValueError):
                out.append((int(json.loads(state.read_text())["step"]), path))
    return sorted(out)


def registered_checkpoints(run_folder: Path) -> list[str]:
    """Checkpoint folder names Ray's checkpoint manager has registered (what a resume uses)."""
    snapshot = Path(run_folder) / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"checkpoint_[0-9_.:-]+", text)))


# ----------------------------------------------------------------------------------- MLflow


def sqlite_metric_rows(db: Path, key: str) -> list[tuple[int, int]]:
    """(step, timestamp ms) of every stored point of metric ``key``, read from the sqlite file
    itself (works while the tracking server is down)."""
    import sqlite3

    if not Path(db).exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            rows = conn.execute("SELECT step, timestamp FROM metrics WHERE key = ? ORDER BY timestamp, step",
                                (key,)).fetchall()  # fmt: skip
        except sqlite3.OperationalError:  # schema not created yet, or locked
            return []
    return [(int(s), int(t)) for s, t in rows]


class MLflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store: start, stop (an outage), start again on
    the same port. Stopped by PID: SIGTERM to its session, SIGKILL after a grace period."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180.0) -> None:
        argv = [venv_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.root / "artifacts"), "--host", HOST,
                "--port", str(self.port), "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        with open(self.root / f"server-{self.starts}.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
        try:
            wait_for_http(f"{self.url}/health", timeout=timeout, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_pids([self.proc.pid, *pids_matching(session=self.proc.pid)])
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None
        wait_until(lambda: not port_open(self.port), timeout=30, what=f"port {self.port} closed")

    def __enter__(self) -> MLflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


# ------------------------------------------------------------------------------- S3 faults

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "content-length"}  # fmt: skip
_S3_CODES = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied"}


class FaultyS3Proxy:
    """HTTP reverse proxy on 127.0.0.1 in front of ``upstream`` (an S3 endpoint such as moto).

    ``rule(method, path)`` (path with query) returns None to forward the request, or an HTTP
    status to answer it with an S3 error document instead (503 -> ``ServiceUnavailable``, which
    the AWS SDK and Ray treat as retryable). Every request is recorded in ``log`` as
    ``(time, method, path, status)``. Use as a context manager; ``url`` is its endpoint.
    """

    def __init__(self, upstream: str, rule: Callable[[str, str], int | None] | None = None) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rule = rule
        self.log: list[tuple[float, str, str, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    status = proxy.rule(self.command, self.path) if proxy.rule else None
                if status:
                    code = _S3_CODES.get(status, "InternalError")
                    doc = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        "<Message>injected fault</Message><RequestId>fault</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(doc)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(doc)
                    proxy._record(self.command, self.path, status)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() not in ("server", "date"):
                            self.send_header(key, value)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    proxy._record(self.command, self.path, resp.status)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="faulty-s3-proxy")  # fmt: skip

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((time.time(), method, path, status))

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class CheckpointWriteFaults:
    """A ``FaultyS3Proxy`` rule for Ray Train checkpoint uploads (``.../checkpoint_<time>/<file>``).

    Checkpoint folders are numbered in the order their first file is PUT (1, 2, ...).

    * ``transient``: folder number -> how many PUT requests into that folder fail before the proxy
      lets them through (a short outage: the uploader has to retry).
    * ``broken``: folder numbers whose files named in ``fail`` fail for good (a write cut short:
      the files before them in upload order arrive, the folder never gets its COMPLETE marker).

    ``attempts`` counts the PUTs per object key.
    """

    PATTERN = re.compile(r"/(checkpoint_[^/?]+)/([^/?]+)")

    def __init__(self, transient: dict[int, int] | None = None, broken: Iterable[int] = (),
                 fail: Iterable[str] = ("optimizer.pt",)) -> None:  # fmt: skip
        self.transient = dict(transient or {})
        self.broken = set(broken)
        self.fail = set(fail)
        self.folders: list[str] = []
        self.puts: Counter = Counter()  # per folder
        self.attempts: Counter = Counter()  # per object key

    def __call__(self, method: str, path: str) -> int | None:
        match = self.PATTERN.search(path)
        if method != "PUT" or not match:
            return None
        folder, name = match.groups()
        if folder not in self.folders:
            self.folders.append(folder)
        number = self.folders.index(folder) + 1
        self.puts[folder] += 1
        self.attempts[path.split("?")[0]] += 1
        if self.puts[folder] <= self.transient.get(number, 0):
            return 503
        if number in self.broken and name in self.fail:
            return 503
        return None

    def folder(self, number: int) -> str:
        return self.folders[number - 1]


# ---------------------------------------------------------------------------------- pickles


class _RunsCode:
    """Unpickling this calls ``exec`` on a line that writes ``marker``: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def write_malicious_pt(path: Path, marker: Path) -> Path:
    """A torch.save file (zip + pickle) that runs code when loaded with weights_only=False."""
    import torch

    torch.save({"weight": _RunsCode(marker)}, path)
    return path

"""Fault injection for the fault-tolerance and security tests (tests/integration/test_faults.py).

(Longer than 500 lines: every fault injector of the fault tests, each small, kept in one module the
tests import.)

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
  request (and, with ``by_process``, the client process behind it: ``ReadFaultsForOneProcess`` makes
  one worker's reads fail), so a test can tell a retried write from a lost one.
* ``write_malicious_pt``: a ``.pt`` file whose unpickling would run code (it writes a marker file).
* listening sockets of a set of PIDs (to check what binds to which address), and a raw gRPC call
  with or without Ray's token (to check that a service refuses clients without it).
Processes and sockets are inspected with psutil.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
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


def wait_until(
    predicate: Callable[[], object], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> object:
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


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pids_matching(*, marker: str | None = None, session: int | None = None, path: str | None = None) -> list[int]:
    """Live PIDs (other than this process) that have ``marker`` (``KEY=VALUE``) in their
    environment, or belong to session ``session``, or have ``path`` in their command line."""
    import psutil

    key, _, value = (marker or "").partition("=")
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if (
                (session is not None and os.getsid(process.pid) == session)
                or (marker and process.environ().get(key) == value)
                or (path and path in " ".join(process.cmdline()))
            ):
                found.append(process.pid)
    return found


def kill_pids(pids: Iterable[int], *, grace: float = 10.0) -> list[int]:
    """SIGTERM each PID, SIGKILL what is left after ``grace`` s; returns the PIDs that needed it.
    Our own children are reaped, so none lingers as a zombie."""
    import psutil

    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            process.terminate()
            processes.append(process)
    _, stubborn = psutil.wait_procs(processes, timeout=grace)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    _, left = psutil.wait_procs(stubborn, timeout=10)
    assert not left, f"PIDs still alive after SIGKILL: {[p.pid for p in left]}"
    return [p.pid for p in stubborn]


def spawn(argv: list[str], log: Path, *, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a command in a session of its own (so its Ray processes can be found by session id),
    no stdin, stdout and stderr into ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the PIDs hold (IPv4 and IPv6)."""
    import psutil

    out = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for connection in psutil.Process(pid).net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    out.add((pid, connection.laddr.ip, connection.laddr.port))
    return sorted(out)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (::ffff:127.0.0.1)."""
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def command_line(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def grpc_status(port: int, method: str, token: str | None = None) -> str:
    """The gRPC status code name of an empty ``method`` request to 127.0.0.1:port, sent with the
    Ray token (``authorization: Bearer``) or without it."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=lambda x: x, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


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
    actors = list_actors(
        address=address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return sorted(int(a.pid) for a in actors if a.pid and alive(int(a.pid)))


def rank0_worker_pid(session_dir: Path) -> int | None:
    """The live Train worker that logs ``[bfn] step`` lines: only rank 0 does (worker.py).

    Ray names each worker's output ``logs/worker-<worker id>-<job id>-<pid>.out`` / ``.err``
    (logging writes to stderr)."""
    for pid in train_worker_pids():
        for log in (session_dir / "logs").glob(f"worker-*-{pid}.*"):
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
    """Checkpoint folder names Ray's checkpoint manager has registered (what Ray hands a resumed worker)."""
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
            rows = conn.execute(
                "SELECT step, timestamp FROM metrics WHERE key = ? ORDER BY timestamp, step", (key,)
            ).fetchall()
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
        argv = [
            venv_bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        with open(self.root / f"server-{self.starts}.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
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

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}
_S3_CODES = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied"}


class FaultyS3Proxy:
    """HTTP reverse proxy on 127.0.0.1 in front of ``upstream`` (an S3 endpoint such as moto).

    ``rule(method, path)`` (path with query) returns None to forward the request, or an HTTP
    status to answer it with an S3 error document instead (503 -> ``ServiceUnavailable``, which
    the AWS SDK and Ray treat as retryable). Every request is recorded in ``log`` as
    ``(time, method, path, status)``. Use as a context manager; ``url`` is its endpoint.

    ``by_process=True``: each request's client process is found (the local PID owning the socket,
    psutil), passed to the rule as a third argument ``rule(method, path, pid)`` and recorded in
    ``pids`` (one entry per ``log`` entry), so a fault can hit one worker process only.
    """

    def __init__(
        self, upstream: str, rule: Callable[..., int | None] | None = None, *, by_process: bool = False
    ) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rule = rule
        self.log: list[tuple[float, str, str, int]] = []
        self.by_process = by_process
        self.pids: list[int | None] = []  # by_process: the client PID of each log entry
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

            def _client_pid(self) -> int | None:
                # once per connection (it serves many requests); never per port: a later process
                # can reuse the port of a closed connection
                if not hasattr(self, "_pid"):
                    self._pid = proxy.client_pid(self.client_address[1])
                return self._pid

            def _handle(self) -> None:
                body = self._body()
                pid = self._client_pid() if proxy.by_process else None
                with proxy._lock:
                    status = None
                    if proxy.rule:
                        status = proxy.rule(self.command, self.path, *((pid,) if proxy.by_process else ()))
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
                    proxy._record(self.command, self.path, status, pid)
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
                    proxy._record(self.command, self.path, resp.status, pid)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="faulty-s3-proxy")

    def _record(self, method: str, path: str, status: int, pid: int | None = None) -> None:
        with self._lock:
            self.log.append((time.time(), method, path, status))
            if self.by_process:
                self.pids.append(pid)

    def client_pid(self, port: int) -> int | None:
        """The PID of the local process whose socket from 127.0.0.1:``port`` is connected to this proxy."""
        import psutil

        mine = self._server.server_address[1]
        ours = (c for c in psutil.net_connections(kind="tcp") if c.laddr and c.raddr and c.pid)
        return next((c.pid for c in ours if c.laddr.port == port and c.raddr.port == mine), None)

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

    def __init__(
        self,
        transient: dict[int, int] | None = None,
        broken: Iterable[int] = (),
        fail: Iterable[str] = ("optimizer.pt",),
    ) -> None:
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


class ReadFaultsForOneProcess:
    """A ``FaultyS3Proxy(by_process=True)`` rule: one process cannot read a checkpoint folder.

    GETs (objects and listings) under the folder ``failing`` fail with 503 for one client process only,
    for as long as it lives (the AWS SDK's retries fail too, so its read fails): the ``reader``-th
    process to GET there, processes counted in the order of their first GET. Every other process reads
    normally. GETs under the folders ``refused`` are answered 403 for every process (not retried), and
    counted in ``refused_reads``. Requests of ``ignore`` (default: this process, e.g. a driver that
    runs here) are neither counted nor failed.
    """

    def __init__(self, failing: str, refused: Iterable[str] = (), reader: int = 2, ignore: Iterable[int] = ()) -> None:
        self.failing, self.refused, self.reader = failing, tuple(refused), reader
        self.ignore = set(ignore) or {os.getpid()}
        self.readers: list[int] = []  # processes in the order of their first GET under ``failing``
        self.failed: Counter = Counter()  # GETs failed, per object or listing
        self.refused_reads: list[tuple[int | None, str]] = []  # (pid, path)

    @property
    def faulted(self) -> int | None:
        """The process whose reads fail (once it has tried one)."""
        return self.readers[self.reader - 1] if len(self.readers) >= self.reader else None

    def __call__(self, method: str, path: str, pid: int | None) -> int | None:
        if method != "GET" or pid in self.ignore:
            return None
        key = urllib.parse.unquote(path)
        if any(f"/{folder}/" in key for folder in self.refused):
            self.refused_reads.append((pid, key))
            return 403
        if f"/{self.failing}/" not in key:
            return None
        if pid is not None and pid not in self.readers:
            self.readers.append(pid)
        if pid is not None and pid == self.faulted:
            self.failed[key] += 1
            return 503
        return None


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

"""Local servers for tests: a moto S3 server (and small helpers other server fixtures can reuse).

Everything binds to 127.0.0.1. Processes are started with ``subprocess.Popen`` and stopped by
their PID only (SIGTERM, then SIGKILL after a grace period).

    from tests.servers import moto_s3, aws_env, create_bucket

    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn")
        ...  # pyarrow / Ray / boto3 now talk to the moto server via AWS_ENDPOINT_URL
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def venv_bin(name: str) -> str:
    """Path of a console script installed next to the running interpreter (the venv's bin/),
    falling back to ``$PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def wait_for_http(
    url: str,
    *,
    timeout: float = 30.0,
    proc: subprocess.Popen | None = None,
    ok_status: Sequence[int] = (200,),
) -> None:
    """Poll ``url`` until it answers with one of ``ok_status``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server process {proc.pid} exited with {proc.returncode} before {url} answered"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok_status:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in ok_status:
                return
            last = exc
        except OSError as exc:  # connection refused while the server starts
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s (last: {last})")


def stop_process(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` (by its PID), then SIGKILL if it is still alive after ``grace`` s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@contextlib.contextmanager
def server_process(
    argv: Sequence[str],
    ready_url: str,
    *,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    name: str = "server",
) -> Iterator[subprocess.Popen]:
    """Run ``argv`` as a subprocess until the ``with`` block ends; wait for ``ready_url`` first.

    Output goes to a temporary log file whose tail is included in the error if it fails to
    start. The process is stopped by its PID on exit, whatever happens in the block.
    """
    log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the server
    )
    try:
        try:
            wait_for_http(ready_url, timeout=timeout, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} ({' '.join(argv)}) did not start: {exc}\n{tail}") from exc
        yield proc
    finally:
        stop_process(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


@contextlib.contextmanager
def moto_s3(port: int | None = None, *, timeout: float = 30.0) -> Iterator[str]:
    """Start ``moto_server -H 127.0.0.1 -p PORT`` and yield its endpoint URL
    (``http://127.0.0.1:PORT``). Each server starts empty; create buckets with ``create_bucket``.
    """
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    argv = [venv_bin("moto_server"), "-H", HOST, "-p", str(port)]
    # moto answers GET /moto-api/ with its dashboard once it serves requests
    with server_process(argv, f"{endpoint}/moto-api/", timeout=timeout, name="moto_s3"):
        yield endpoint


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment variables that point boto3, pyarrow and Ray at ``endpoint``."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, **TEST_CREDENTIALS}


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[dict[str, str]]:
    """Set ``s3_env(endpoint)`` in ``os.environ`` for the block, then restore the old values.

    Processes started before (e.g. an already running local Ray's workers) do not see it.
    """
    values = s3_env(endpoint)
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield values
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 server at ``endpoint`` (boto3, test credentials)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=bucket)

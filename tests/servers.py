"""Local servers for tests: a moto S3 server (and small helpers other server fixtures can reuse).

Everything binds to 127.0.0.1. Processes are started with ``subprocess.Popen`` and stopped by
their PID only (SIGTERM, then SIGKILL after a grace period). Finding executables and ports,
waiting for a server, moto's command line and bucket creation are the dev stack's own helpers
(``pipeline.cluster.devstack``): one implementation for `bfn stack up` and the tests.

    from tests.servers import moto_s3, aws_env, create_bucket

    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn")
        ...  # pyarrow / Ray / boto3 now talk to the moto server via AWS_ENDPOINT_URL
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pipeline.cluster.devstack import (
    HOST,
    MOTO_READY_PATH,
    S3_DUMMY_CREDENTIALS,
    create_bucket,
    free_port,
    http_status,
    moto_argv,
    venv_bin,
    wait_until,
)

__all__ = [
    "HOST",
    "TEST_CREDENTIALS",
    "aws_env",
    "create_bucket",
    "free_port",
    "moto_s3",
    "s3_env",
    "server_process",
    "stop_process",
    "venv_bin",
    "wait_for_http",
]
# the dev stack's dummies, plus a session token and region so that no real profile's leaks in
TEST_CREDENTIALS = {**S3_DUMMY_CREDENTIALS, "AWS_SESSION_TOKEN": "testing", "AWS_REGION": "us-east-1"}


def wait_for_http(
    url: str, *, timeout: float = 30.0, proc: subprocess.Popen | None = None, ok_status: Sequence[int] = (200,)
) -> None:
    """Poll ``url`` until it answers with one of ``ok_status``; StackError (a RuntimeError) at once
    if ``proc`` exits, or after ``timeout`` s."""
    wait_until(
        url,
        lambda: http_status(url, timeout=2)[0] in ok_status,
        timeout=timeout,
        proc=proc,
        log_path=None,
        what=f"an HTTP {'/'.join(map(str, ok_status))} answer",
        interval=0.1,
    )


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
        except RuntimeError as exc:
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
    """Start the moto S3 server (``moto_argv``, as `bfn stack up` does) and yield its endpoint URL
    (``http://127.0.0.1:PORT``). Each server starts empty; create buckets with ``create_bucket``.
    """
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    with server_process(moto_argv(port), endpoint + MOTO_READY_PATH, timeout=timeout, name="moto_s3"):
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

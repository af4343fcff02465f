"""The tests' servers and `bfn stack up` share one implementation of their helpers
(`pipeline.cluster.devstack`): ports, executables, HTTP waits, moto's command line, buckets."""

from __future__ import annotations

import ast
import subprocess
import sys
import time

import pytest

from pipeline.cluster import devstack
from tests import servers
from tests.conftest import REPO


def test_the_test_servers_use_the_dev_stacks_helpers():
    for name in ("free_port", "venv_bin", "create_bucket"):
        assert getattr(servers, name) is getattr(devstack, name), name
    assert servers.HOST == devstack.HOST
    assert servers.TEST_CREDENTIALS.items() >= devstack.S3_DUMMY_CREDENTIALS.items()
    imported = set()
    for node in ast.walk(ast.parse((REPO / "tests" / "servers.py").read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported |= {node.module} if isinstance(node, ast.ImportFrom) else {a.name for a in node.names}
    assert not imported & {"socket", "shutil", "urllib.request", "urllib.error", "boto3"}, imported  # no second copy


def test_wait_for_http_stops_at_once_when_the_server_dies():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3"):
        servers.wait_for_http(f"http://{servers.HOST}:{servers.free_port()}/", timeout=60, proc=proc)
    assert time.monotonic() - started < 10
    with pytest.raises(RuntimeError, match=r"timed out after 1s .*last error"):  # nothing listens there
        servers.wait_for_http(f"http://{servers.HOST}:{servers.free_port()}/", timeout=1)

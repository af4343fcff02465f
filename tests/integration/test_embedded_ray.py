"""An embedded runtime never joins a cluster that happens to run on the machine.

`bfn train` without ``run.ray_address`` starts a Ray of its own (``ray.init(address="local")``) even
when Ray's bootstrap file (``<temp dir>/ray/ray_current_cluster``, written by `ray start`) names a
live cluster that has nothing to do with it; that cluster is left running and untouched. (A
bootstrap file naming a cluster that is gone is covered for every command that starts Ray in
tests/pipeline/test_security.py, and for `bfn train` to the end in tests/integration/test_train.py.)
The unrelated cluster is stopped by the PIDs of its processes only, never with a global `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pipeline import data as data_lib
from tests.conftest import REPO
from tests.faults import alive, kill_pids, pids_matching
from tests.servers import free_port, venv_bin

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # starts a Ray head of its own: the cluster tier


def test_a_live_unrelated_ray_cluster_is_neither_joined_nor_touched(tmp_path):
    shards = tmp_path / "mnist"
    data_lib.prepare("mnist", str(shards), progress=False)
    ray_tmp = Path(tempfile.mkdtemp(prefix="bfnu-", dir="/tmp"))  # short: Ray's Unix sockets live below it
    marker = f"BFN_UNRELATED_CLUSTER={uuid.uuid4().hex}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    base.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    try:
        started = subprocess.run(
            [
                venv_bin("ray"),
                "start",
                "--head",
                "--port",
                str(free_port()),
                "--num-cpus",
                "1",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ],
            env={**base, "RAY_AUTH_MODE": "disabled", marker.split("=")[0]: marker.split("=")[1]},
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        cluster = pids_matching(marker=marker)
        bootstrap = (ray_tmp / "ray" / "ray_current_cluster").read_text()
        (session,) = [p for p in (ray_tmp / "ray").glob("session_2*") if not p.is_symlink()]
        assert cluster and bootstrap.startswith("127.0.0.1:"), (cluster, bootstrap)

        args = [
            "experiment=smoke",
            "run.name=beside",
            f"data.uri={shards}",
            "trainer.max_steps=2",
            f"run.storage_path={tmp_path / 'ray'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'a'}",
        ]
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", *args],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=600,
            env={**base, "PYTHONPATH": str(REPO)},
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        assert "finished at step 2" in out and "existing cluster" not in out.lower()
        assert all(alive(pid) for pid in cluster), [pid for pid in cluster if not alive(pid)]
        assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == bootstrap
        # a driver that had joined would have left its log in the cluster's session; ours has a session of its own
        assert not [p.name for p in (session / "logs").glob("python-core-driver-*")]
        ours = [p for p in (ray_tmp / "ray").glob("session_2*") if p != session and not p.is_symlink()]
        assert len(ours) == 1 and list((ours[0] / "logs").glob("python-core-driver-*")), ours
    finally:
        kill_pids(pids_matching(marker=marker))
        shutil.rmtree(ray_tmp, ignore_errors=True)

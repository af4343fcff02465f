"""Shared fixtures.

Ray and MLflow read their environment at start-up, so the switches below are set at import time,
before any test can call ``ray.init``. Everything binds to 127.0.0.1; nothing leaves the machine.
The session's Ray runtime uses token auth with a token generated for it, as `bfn train` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node address 127.0.0.1: it listens on loopback only
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "0",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray runtime for the whole session (each ``ray.init`` costs 3-7 s).

    4 logical CPUs on a 2-core machine: 2 Train workers plus Ray Data tasks would otherwise starve
    (see STACK_NOTES: a 2-CPU runtime hangs instead of failing).
    """
    import ray

    from pipeline.training.driver import embedded_ray_env

    embedded_ray_env()  # token auth with a fresh token, as `bfn train` runs it
    ray_tmp = Path("/tmp") / f"bfn-ray-{os.getpid()}"
    ray_tmp.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        include_dashboard=True,
        _temp_dir=str(ray_tmp),
        log_to_driver=True,
    )
    yield tmp_path_factory.mktemp("ray_storage")
    ray.shutdown()

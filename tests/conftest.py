"""Shared fixtures.

Ray and MLflow read their environment at start-up, so the switches below are set at import time,
before any test can call ``ray.init``. Everything binds to 127.0.0.1; nothing leaves the machine.
The session's Ray runtime uses token auth with a token generated for it, as `bfn train` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.training.ray_runtime import ray_env_at_entry

ray_env_at_entry()  # what `bfn` sets before anything imports ray (loopback node address, quiet switches)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray runtime for the whole session (each ``ray.init`` costs 3-7 s).

    4 logical CPUs on a 2-core machine: 2 Train workers plus Ray Data tasks would otherwise starve
    (see STACK_NOTES: a 2-CPU runtime hangs instead of failing).
    """
    import ray

    from pipeline.training.ray_runtime import embedded_ray_env, ray_temp_root

    embedded_ray_env()  # token auth with a fresh token, as `bfn train` runs it
    ray.init(
        address="local",  # never a cluster some bootstrap file on the machine names
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        include_dashboard=True,
        _temp_dir=str(ray_temp_root() / "ray"),  # the private temp root of `bfn train`
        log_to_driver=True,
    )
    yield tmp_path_factory.mktemp("ray_storage")
    ray.shutdown()

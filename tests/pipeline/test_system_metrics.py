"""Per-worker system metrics (``pipeline.training.system_metrics``) and their switch, tracking.system_metrics.
The real 2-worker run that logs them is tests/integration/test_train.py."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load
from pipeline.training import system_metrics


def test_a_rank_reads_its_process_and_logs_one_series_per_rank():
    sampler = system_metrics.ProcessSampler(torch.device("cpu"))
    sum(i * i for i in range(200_000))  # some CPU time to measure
    cpu, rss, gpu, gpu_memory = sampler.read()
    assert cpu >= 0 and rss > 10 and gpu == gpu_memory == system_metrics.UNMEASURED
    metrics = system_metrics.gather([cpu, rss, gpu, gpu_memory], rank=0, world=1)
    assert metrics == {
        "system/rank0/cpu_utilization_percentage": pytest.approx(cpu),
        "system/rank0/memory_rss_megabytes": pytest.approx(rss),
    }  # no GPU here: its series are not logged


def test_the_switch_defaults_on_and_is_checked():
    assert load(["experiment=smoke"]).tracking.system_metrics is True
    assert load(["experiment=smoke", "tracking.system_metrics=false"]).tracking.system_metrics is False
    with pytest.raises(ConfigError, match="tracking.system_metrics: must be true or false"):
        load(["experiment=smoke", "tracking.system_metrics=3"])

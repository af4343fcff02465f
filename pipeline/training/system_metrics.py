"""System metrics per worker: each rank's own process (CPU, resident memory) and, on a GPU, its device
(utilisation, memory held by torch), read at every log step and logged by rank 0 as one series per rank:
``system/rank<r>/cpu_utilization_percentage``, ``.../memory_rss_megabytes``,
``.../gpu_utilization_percentage``, ``.../gpu_memory_megabytes`` (``tracking.system_metrics``).

Why not MLflow's own ``SystemMetricsMonitor`` (``mlflow.system_metrics``): it measures the whole
machine (two ranks on one node would log the same numbers), counts its own steps instead of the
training step, polls the run from a thread in every worker, and stops for good at the first failed
write, where the project's tracker buffers and retries (``pipeline.tracking``). The names follow its
``system/`` prefix, so MLflow's UI shows them in its system metrics view.

Reading costs two ``psutil`` calls per log interval, off the step; the values join the one all-reduce
of the log step (``progress.all_mean``), so every rank takes part on the same steps.
"""

from __future__ import annotations

import contextlib

import psutil
import torch

from pipeline.training.progress import all_mean

KEYS = ("cpu_utilization_percentage", "memory_rss_megabytes", "gpu_utilization_percentage", "gpu_memory_megabytes")
UNMEASURED = -1.0  # a value this rank has no source for (no GPU, no NVML): not logged


class ProcessSampler:
    """This worker's process (and GPU) use since the previous read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # starts the interval the first read measures

    def read(self) -> list[float]:
        """CPU percent since the last read (100 = one core), resident MiB, GPU percent and MiB (or UNMEASURED)."""
        values = [self.process.cpu_percent(None), self.process.memory_info().rss / 2**20, UNMEASURED, UNMEASURED]
        if self.device.type == "cuda":
            values[3] = torch.cuda.memory_reserved(self.device) / 2**20
            with contextlib.suppress(Exception):  # torch reads utilisation through NVML, which may be absent
                values[2] = float(torch.cuda.utilization(self.device))
        return values


def gather(values: list[float], rank: int, world: int) -> dict[str, float]:
    """Every rank's ``values`` (a collective: all ranks call it on the same steps) as metrics named by rank."""
    table = torch.zeros(world, len(KEYS), dtype=torch.float64)
    table[rank] = torch.tensor(values, dtype=torch.float64)
    table = all_mean(table, world) * world  # the rows are disjoint: the mean times world is the gathered table
    return {
        f"system/rank{r}/{key}": value
        for r, row in enumerate(table.tolist())
        for key, value in zip(KEYS, row, strict=True)
        if value != UNMEASURED
    }

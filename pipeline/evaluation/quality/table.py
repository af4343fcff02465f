"""`bfn quality`: sample quality of one checkpoint for each (sampler, NFE), over seeds, as a table.

Each cell is the mean ± the sample standard deviation over seeds (seed i draws with
``torch.Generator().manual_seed(i)``); ``s/sample`` is the sampling wall time over the number of
samples. The ``data`` row scores real rows of the val split (held out from the classifier and from
the test split) with the same metrics and sample count: the values a perfect sampler would reach.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import bfn.samplers
from pipeline import data as data_lib
from pipeline.config import check_count, default_runs_dir, parse_grid, parse_nfe, parse_samplers
from pipeline.evaluation import figures
from pipeline.evaluation.evaluate import load_model
from pipeline.evaluation.quality import metrics as qm

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- sampling
def draw(
    model,
    sampler: str,
    nfe: int,
    num: int,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    grid: str | None = None,
) -> tuple[torch.Tensor, float]:
    """``num`` samples in batches of ``batch_size`` from one seeded generator; (samples, seconds).
    ``grid``: the solvers' time grid (None: the flow's default); the paper's sampler has none."""
    generator = torch.Generator(device=device).manual_seed(seed)
    grid = None if sampler == "paper" else grid  # one table mixes the paper's sampler with the solvers
    started, chunks = time.perf_counter(), []
    for start in range(0, num, batch_size):
        chunks.append(
            bfn.samplers.sample(
                model,
                min(batch_size, num - start),
                sampler=sampler,
                nfe=nfe,
                generator=generator,
                device=device,
                grid=grid,
            ).cpu()
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(chunks), time.perf_counter() - started


@dataclass
class Row:
    label: str
    nfe: int | None
    num: int
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, scores: dict[str, float]) -> None:
        for key, value in scores.items():
            self.values.setdefault(key, []).append(float(value))

    def stat(self, key: str) -> tuple[float, float]:
        v = self.values.get(key, [])
        if not v:
            return math.nan, math.nan
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def data_row(cfg, scorer, num: int, seeds: int) -> Row:
    """Real val-split rows through the same metrics: seed i shuffles (and binarises) with seed i."""
    rows = data_lib.num_rows(cfg.data.uri, "val")
    n = min(num, rows)
    row = Row(f"data (val split, {n} rows)", None, n)
    if n < qm.min_samples(cfg.data.name):
        log.warning("the val split has %d rows: no data row", rows)
        return row
    for seed in range(seeds):
        batch = next(
            data_lib.iter_batches(
                cfg.data.uri, "val", cfg.data.name, batch_size=n, num_bins=cfg.data.num_bins, seed=seed, shuffle=True
            )
        )
        row.add(scorer.score(batch["x"]))
    return row


def run(
    model,
    cfg,
    scorer,
    *,
    samplers: list[str],
    nfes: list[int],
    num: int,
    seeds: int,
    batch_size: int,
    device: torch.device,
    samples_dir: Path | None = None,
    grid: str | None = None,
) -> list[Row]:
    """One row per (sampler, NFE): metrics of ``num`` samples for seeds 0..seeds-1."""
    rows = []
    for sampler in samplers:
        for nfe in nfes:
            row = Row(sampler, nfe, num)
            for seed in range(seeds):
                samples, seconds = draw(
                    model, sampler, nfe, num, seed=seed, batch_size=batch_size, device=device, grid=grid
                )
                row.add({**scorer.score(samples), "seconds_per_sample": seconds / num})
                if seed == 0 and samples_dir is not None:
                    figures.save_samples(samples, cfg.data.name, samples_dir / f"{sampler}_nfe{nfe}_seed0")
                log.info(
                    "quality: %s nfe %d seed %d: %s",
                    sampler,
                    nfe,
                    seed,
                    ", ".join(f"{k} {v[-1]:.4g}" for k, v in row.values.items()),
                )
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------- writing
def _cell(row: Row, key: str, digits: int = 4) -> str:
    mean, std = row.stat(key)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}g}" if math.isnan(std) else f"{mean:.{digits}g} ± {std:.2g}"


def metric_keys(rows: list[Row]) -> list[str]:
    present = {k for row in rows for k in row.values}
    return [k for k in qm.METRICS if k in present]


def markdown(rows: list[Row]) -> str:
    keys = metric_keys(rows)
    arrows = {"lower": "↓", "higher": "↑"}
    head = ["sampler", "NFE", *(f"{qm.METRICS[k][0]} {arrows[qm.METRICS[k][1]]}" for k in keys), "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [
            row.label,
            "–" if row.nfe is None else str(row.nfe),
            *(_cell(row, k) for k in keys),
            _cell(row, "seconds_per_sample", 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[Row], stem: Path, header: str) -> tuple[Path, Path]:
    """``stem``.csv (means and standard deviations) and ``stem``.md (header + table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = [*metric_keys(rows), *(k for k in ("words", "seconds_per_sample") if any(k in r.values for r in rows))]
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sampler", "nfe", "num", "seeds", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))])
        for row in rows:
            seeds = max((len(v) for v in row.values.values()), default=0)
            cells = [f"{x:.6g}" if not math.isnan(x) else "" for k in keys for x in row.stat(k)]
            writer.writerow([row.label, "" if row.nfe is None else row.nfe, row.num, seeds, *cells])
    md_path.write_text(header + "\n\n" + markdown(rows) + "\n")
    return csv_path, md_path


# -------------------------------------------------------------------------------------- command
def _solver_grid(model, grid: str | None) -> str:
    solver = bfn.samplers.make_solver(model.flow)
    return (
        f"BFN-Solvers (ode*, sde*) on the {grid or solver.DEFAULT_GRID} time grid from t_start "
        f"{solver.DEFAULT_T_START:g}; paper: the paper's sampler, uniform steps, last call at t = 1"
    )


def quality(
    checkpoint,
    overrides=(),
    *,
    samplers,
    nfe,
    num: int = 256,
    seeds: int = 3,
    batch_size: int = 256,
    out=None,
    cache=None,
    device: str | None = None,
    use_ema: bool = True,
    grid: str | None = None,
) -> tuple[list[Row], str]:
    """`bfn quality`: the table for every (sampler, NFE), written to ``out``.csv/.md; (rows, text)."""
    samplers, nfes, grid = parse_samplers(samplers), parse_nfe(nfe), parse_grid(grid)
    num, seeds, batch_size = (
        check_count(f, v, 1) for f, v in (("--num", num), ("--seeds", seeds), ("--batch-size", batch_size))
    )
    model, cfg = load_model(checkpoint, overrides, use_ema=use_ema)
    check_count("--num", num, qm.min_samples(cfg.data.name), f" for {cfg.data.name} (a covariance needs two samples)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_lib.verify(cfg.data.uri, splits=["train", "val", "test"], check_checksums=False)
    runs = default_runs_dir() if out is None or cache is None else None
    cache = Path(cache) if cache is not None else runs / "quality" / "classifiers"
    checkpoint = Path(checkpoint).resolve()
    stem = Path(out) if out is not None else runs / "quality" / f"{checkpoint.parent.name}_{checkpoint.name}"
    stem = stem.with_suffix("") if stem.suffix in (".csv", ".md") else stem
    scorer = qm.make_scorer(cfg.data.uri, cfg.data.name, cfg.data.num_bins, cache, device=device)
    model = model.to(device)
    rows = [data_row(cfg, scorer, num, seeds)]
    rows += run(
        model,
        cfg,
        scorer,
        samplers=samplers,
        nfes=nfes,
        num=num,
        seeds=seeds,
        batch_size=batch_size,
        device=device,
        samples_dir=stem.with_name(stem.name + "_samples"),
        grid=grid,
    )
    header = "\n".join(
        [
            f"Sample quality of {checkpoint} ({cfg.data.name}, {'EMA' if use_ema else 'raw'} weights, {device.type}): "
            f"{num} samples per cell, mean ± standard deviation over {seeds} seed{'s' if seeds > 1 else ''}.",
            scorer.describe() + ".",
            _solver_grid(model, grid) + ".",
            "Metrics: "
            + "; ".join(f"{qm.METRICS[k][0]} ({qm.METRICS[k][1]} is better)" for k in metric_keys(rows))
            + ". Definitions: pipeline/evaluation/quality/metrics.py.",
        ]
    )
    csv_path, md_path = write(rows, stem, header)
    log.info("quality table written to %s and %s; seed-0 samples in %s_samples/", csv_path, md_path, stem)
    return rows, header + "\n\n" + markdown(rows)

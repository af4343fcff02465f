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
from pathlib import Path

import torch

import bfn.samplers
from pipeline import data as data_lib
from pipeline.config import (
    ConfigError,
    check_count,
    default_runs_dir,
    parse_grid,
    parse_guidance,
    parse_nfe,
    parse_samplers,
)
from pipeline.evaluation import figures
from pipeline.evaluation.evaluate import load_model
from pipeline.evaluation.inpaint import check_infer_class
from pipeline.evaluation.inpaint import image_mask as inpaint_mask
from pipeline.evaluation.quality import conditional as cond
from pipeline.evaluation.quality import metrics as qm
from pipeline.evaluation.quality.row import Row

log = logging.getLogger(__name__)


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
                samples, seconds = cond.draw(
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


def _guided(rows: list[Row]) -> bool:
    return any(row.guidance is not None for row in rows)


def markdown(rows: list[Row]) -> str:
    keys = metric_keys(rows)
    arrows = {"lower": "↓", "higher": "↑"}
    guided = ["w"] if _guided(rows) else []
    head = ["sampler", "NFE", *guided, *(f"{qm.METRICS[k][0]} {arrows[qm.METRICS[k][1]]}" for k in keys), "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [
            row.label,
            "–" if row.nfe is None else str(row.nfe),
            *(["–" if row.guidance is None else f"{row.guidance:g}"] if guided else []),
            *(_cell(row, k) for k in keys),
            _cell(row, "seconds_per_sample", 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: list[Row], stem: Path, header: str) -> tuple[Path, Path]:
    """``stem``.csv (means and standard deviations) and ``stem``.md (header + table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    per_class = sorted({k for r in rows for k in r.values if k.startswith("fd_class_")}, key=lambda k: int(k[9:]))
    extra = [k for k in ("words", "seconds_per_sample") if any(k in r.values for r in rows)]
    keys = [*metric_keys(rows), *per_class, *extra]
    guided = ["guidance"] if _guided(rows) else []
    csv_path, md_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".md")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        head = ["sampler", "nfe", *guided, "num", "seeds", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))]
        writer.writerow(head)
        for row in rows:
            seeds = max((len(v) for v in row.values.values()), default=0)
            cells = [f"{x:.6g}" if not math.isnan(x) else "" for k in keys for x in row.stat(k)]
            w = ["" if row.guidance is None else f"{row.guidance:g}"] if guided else []
            writer.writerow([row.label, "" if row.nfe is None else row.nfe, *w, row.num, seeds, *cells])
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
    guidance=None,
    inpaint: str | None = None,
    fill=None,
    prompt=None,
    particles=None,
    infer_class: bool = False,
) -> tuple[list[Row], str]:
    """`bfn quality`: the table for every (sampler, NFE), written to ``out``.csv/.md; (rows, text).

    At most one of: ``guidance`` (scales w; class-conditional models: a row per (sampler, NFE, w)),
    ``inpaint`` (a --keep value; image models), ``fill`` (characters after a ``prompt``; text8
    models). See ``conditional.py`` for those tables."""
    samplers, nfes, grid = parse_samplers(samplers), parse_nfe(nfe), parse_grid(grid)
    num, seeds, batch_size = (
        check_count(f, v, 1) for f, v in (("--num", num), ("--seeds", seeds), ("--batch-size", batch_size))
    )
    chosen = [f for f, v in (("--guidance", guidance), ("--inpaint", inpaint), ("--fill", fill)) if v is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)}: give one (each makes its own table)")
    guidances = None if guidance is None else parse_guidance(guidance)
    fill = None if fill is None else check_count("--fill", fill, 1)
    if prompt is not None and fill is None:
        raise ConfigError("--prompt: the number of known characters before a --fill span; give --fill too")
    prompt = None if prompt is None else check_count("--prompt", prompt, 1)
    if particles is not None and inpaint is None and fill is None:
        raise ConfigError("--particles: sequential Monte Carlo completes known parts; give --inpaint or --fill too")
    items = [1] if particles is None else str(particles).split(",")
    particles = list(
        dict.fromkeys(check_count("--particles", item.strip() if isinstance(item, str) else item, 1) for item in items)
    )
    model, cfg = load_model(checkpoint, overrides, use_ema=use_ema)
    text = data_lib.is_text(cfg.data.name)
    if infer_class and inpaint is None:
        raise ConfigError("--infer-class: SMC particles of every class complete an --inpaint; give --inpaint too")
    if infer_class:
        check_infer_class(cfg.model.num_labels, particles)
    if guidances is not None:
        cond.check_guidances(cfg.model, guidances, num)
    if inpaint is not None and text:
        raise ConfigError(f"--inpaint: the model is a text model (data.name={cfg.data.name}); use --fill")
    if fill is not None and cfg.data.name != "text8":
        raise ConfigError(f"--fill: infilling is measured on text8 models (data.name={cfg.data.name}); use --inpaint")
    if fill is not None:
        prompt = cond.check_fill(cfg, fill, prompt)
    if inpaint is not None:
        inpaint_mask(inpaint, cfg.data.data_shape, flag="--inpaint")  # a bad --keep fails before the classifier trains
    elif fill is None:
        check_count(
            "--num", num, qm.min_samples(cfg.data.name), f" for {cfg.data.name} (a covariance needs two samples)"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_lib.verify(cfg.data.uri, splits=["train", "val", "test"], check_checksums=False)
    runs = default_runs_dir() if out is None or cache is None else None
    cache = Path(cache) if cache is not None else runs / "quality" / "classifiers"
    checkpoint = Path(checkpoint).resolve()
    mode = (
        ""
        if not chosen
        else "_" + ("guidance" if guidances else f"inpaint_{Path(inpaint).stem}" if inpaint else "fill")
    )
    stem = Path(out) if out is not None else runs / "quality" / f"{checkpoint.parent.name}_{checkpoint.name}{mode}"
    stem = stem.with_suffix("") if stem.suffix in (".csv", ".md") else stem
    scorer = (
        None
        if fill is not None
        else qm.make_scorer(cfg.data.uri, cfg.data.name, cfg.data.num_bins, cache, device=device)
    )
    model = model.to(device)
    common = dict(
        samplers=samplers,
        nfes=nfes,
        num=num,
        seeds=seeds,
        batch_size=batch_size,
        device=device,
        samples_dir=stem.with_name(stem.name + "_samples"),
        grid=grid,
    )
    if guidances is not None:
        rows = cond.guidance_rows(model, cfg, scorer, guidances=guidances, **common)
    elif inpaint is not None:
        rows = cond.inpaint_rows(
            model, cfg, scorer, keep=inpaint, particles=particles, infer_label=infer_class, **common
        )
    elif fill is not None:
        rows = cond.fill_rows(model, cfg, fill=fill, prompt=prompt, particles=particles, **common)
    else:
        rows = [data_row(cfg, scorer, num, seeds), *run(model, cfg, scorer, **common)]
    what = {
        "--guidance": "class-conditional samples (labels spread evenly over the classes) for each guidance scale w, "
        "and the same network without a label",
        "--inpaint": f"test images completed from the {inpaint} kept pixels, without a label",
        "--fill": f"text8 test windows: {prompt} characters known, the next {fill} sampled",
    }
    header = "\n".join(
        [
            f"Sample quality of {checkpoint} ({cfg.data.name}, {'EMA' if use_ema else 'raw'} weights, {device.type}): "
            f"{num} {'samples' if not chosen else 'rows'} per cell, mean ± standard deviation over {seeds} "
            f"seed{'s' if seeds > 1 else ''}." + (f" Rows: {what[chosen[0]]}." if chosen else ""),
            *([scorer.describe() + "."] if scorer is not None else []),
            _solver_grid(model, grid) + ".",
            "Metrics: "
            + "; ".join(f"{qm.METRICS[k][0]} ({qm.METRICS[k][1]} is better)" for k in metric_keys(rows))
            + ". Definitions: pipeline/evaluation/quality/metrics.py.",
        ]
    )
    csv_path, md_path = write(rows, stem, header)
    log.info("quality table written to %s and %s; seed-0 samples in %s_samples/", csv_path, md_path, stem)
    return rows, header + "\n\n" + markdown(rows)

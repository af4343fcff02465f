"""One quality point per (sampler, NFE) during training, for the worker's validation step.

Config keys: ``eval.quality_*`` (defaults in ``conf/eval/default.yaml``, checked by ``EvalConfig``).
The classifier and the test split's reference statistics are built once per process.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, parse_nfe, parse_samplers
from pipeline.evaluation import figures
from pipeline.evaluation.quality import metrics as qm
from pipeline.evaluation.quality.conditional import draw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualitySettings:
    samplers: tuple[str, ...]
    nfe: tuple[int, ...]
    num: int
    cache: Path

    @classmethod
    def from_config(cls, cfg: Config) -> QualitySettings:
        """From a validated config (``EvalConfig.validate`` has checked the eval.quality_* keys)."""
        ev = cfg.eval
        samplers = parse_samplers(list(ev.quality_samplers), "eval.quality_samplers") if ev.quality_samplers else []
        cache = ev.quality_cache or Path(cfg.paths.runs_dir) / "quality" / "classifiers"
        return cls(tuple(samplers), tuple(parse_nfe(ev.quality_nfe, "eval.quality_nfe")), ev.quality_num, Path(cache))


@functools.lru_cache(maxsize=4)
def _scorer(uri: str, name: str, num_bins: int, cache: str, device: str):
    return qm.make_scorer(uri, name, num_bins, cache, device=torch.device(device))


def quality_point(model, cfg, step: int, out_dir: str | Path) -> dict[str, float]:
    """Metrics of ``model`` (the bare BFN, e.g. the EMA copy) for every configured sampler and NFE.

    Returns ``{"quality/<sampler>/nfe_<N>/<metric>": value}`` (metrics of ``metrics.py`` plus
    ``seconds_per_sample``); empty when eval.quality_samplers is empty. Writes each point's samples
    to ``out_dir/<sampler>_nfe<N>_step<step>.png`` (.txt for text8) for logging as artifacts. Draws
    with ``trainer.seed`` at every step, so points differ by the weights only.
    """
    settings = QualitySettings.from_config(cfg)
    if not settings.samplers:
        return {}
    device = next(model.parameters()).device
    scorer = _scorer(cfg.data.uri, cfg.data.name, cfg.data.num_bins, str(settings.cache), str(device))
    was_training, out = model.training, {}
    model.eval()
    try:
        for sampler in settings.samplers:
            for nfe in settings.nfe:
                samples, seconds = draw(
                    model, sampler, nfe, settings.num, seed=cfg.trainer.seed, batch_size=settings.num, device=device
                )
                prefix = f"quality/{sampler}/nfe_{nfe}/"
                scores = {**scorer.score(samples), "seconds_per_sample": seconds / settings.num}
                out.update({prefix + k: float(v) for k, v in scores.items()})
                figures.save_samples(samples, cfg.data.name, Path(out_dir) / f"{sampler}_nfe{nfe}_step{step:08d}")
    finally:
        model.train(was_training)
    log.info(
        "quality at step %d: %s",
        step,
        ", ".join(f"{k.removeprefix('quality/')} {v:.4g}" for k, v in out.items() if "seconds" not in k),
    )
    return out

"""`bfn eval` and `bfn sample`: a checkpoint's NLL on a split, and samples, without Ray.

Checkpoints are read weights-only (pipeline.core.checkpointing); the model is rebuilt from the
config stored beside the weights, so a checkpoint evaluates the network it was trained with. A
registered MLflow model (``models:/NAME@champion``, ``models``) is taken wherever a checkpoint is.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import torch

from bfn import NLLEstimate
from bfn.samplers import sample as draw
from pipeline import data as data_lib
from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_count,
    default_runs_dir,
    parse_grid,
    parse_samplers,
)
from pipeline.core import checkpointing
from pipeline.core.build import build_model
from pipeline.evaluation import figures, inpaint, models

log = logging.getLogger(__name__)


def load_model(checkpoint: str | Path, overrides: list[str] = (), *, use_ema: bool = True):
    """The model of a checkpoint folder or of a registered MLflow model (``models:/NAME@ALIAS``, in the
    store of ``models.tracking_uri``), in eval mode, and its config (with ``overrides`` applied)."""
    if models.is_model_uri(checkpoint):
        if not use_ema:
            raise ConfigError(f"--raw-weights: {checkpoint} holds the EMA weights only")
        weights, config = models.read_registered(str(checkpoint), models.tracking_uri(overrides))
    else:
        weights, config = checkpointing.read_model_only(checkpoint, ema=use_ema)
    cfg = Config.from_dict(apply_overrides(config, list(overrides)))
    model = build_model(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise checkpointing.CheckpointError(
            f"checkpoint {checkpoint}: weights do not fit net {cfg.net.name!r} ({str(error)[:300]})"
        ) from None
    return model.eval(), cfg


def parse_steps(text: str | int | None) -> int | None:
    """``--steps``: a positive n, or 0 / ``inf`` for continuous time (n = infinity)."""
    if text is None or isinstance(text, int):
        return text
    if text.strip().lower() in ("inf", "infinity", "∞"):
        return 0
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--steps: must be a whole number or inf (got {text!r})") from None


def summary(estimate: NLLEstimate, unit: str, num_steps: int) -> str:
    """One line per unit, the loss named as the paper does: the n-step loss L^n, or for n = 0 the
    continuous-time loss L^inf (L∞)."""
    v = estimate.in_unit(unit)
    loss = "continuous-time loss L∞" if num_steps == 0 else f"{num_steps}-step loss L^{num_steps}"
    return (
        f"NLL {v['total']:.4f} ± {v['total_se']:.4f} {unit} ({loss} {v['loss']:.4f} ± {v['loss_se']:.4f}, "
        f"reconstruction {v['reconstruction']:.4f} ± {v['reconstruction_se']:.4f}; "
        f"{estimate.num_repeats} repeats x {estimate.num_examples} examples)"
    )


def _one_pass(
    model,
    cfg: Config,
    split: str,
    repeat: int,
    max_batches: int,
    num_steps: int,
    total_rows: int,
    started: float,
    vocabulary=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-example (bound loss, reconstruction, characters covered or None) over one pass of ``split``;
    ``vocabulary`` (subword text) counts the characters each window covers."""
    loss, recon, chars = [], [], []
    text8 = cfg.data.name == "text8"  # test windows every eval.text8_stride characters (1: every offset)
    batches = data_lib.iter_batches(
        cfg.data.uri,
        split,
        cfg.data.name,
        num_bins=cfg.data.num_bins,
        batch_size=cfg.data.val_batch_size,
        seed=repeat,
        stride=cfg.eval.text8_stride if text8 else None,
        seq_len=cfg.data.seq_len,
        labels=cfg.model.conditional,
    )
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        x = torch.from_numpy(batch["x"])
        x = x.long() if cfg.flow.kind == "discrete" else x.float()
        label = torch.from_numpy(batch["label"]) if "label" in batch else None  # conditional: p(x | label)
        loss.append(model.bound_loss(x, num_steps, label))
        recon.append(model.reconstruction_loss(x, label))
        if vocabulary is not None:
            chars.append(vocabulary.chars(x))
        if i % 10 == 0:
            done = sum(len(v) for v in loss)
            log.info(
                "eval pass %d: %d/%d examples (%.0f s)", repeat + 1, done, total_rows, time.perf_counter() - started
            )
    return torch.cat(loss), torch.cat(recon), torch.cat(chars) if chars else None


@torch.no_grad()
def evaluate(
    checkpoint,
    overrides=(),
    *,
    split="test",
    num_steps=None,
    repeats=None,
    max_batches=0,
    use_ema=True,
    target_se: float | None = None,
) -> NLLEstimate:
    """NLL bound = n-step loss (n = 0: continuous-time loss) + reconstruction, over ``repeats``
    passes of ``split``; of a conditional model, the NLL of p(x | label) with each example's own label
    (as validation reports it). With ``target_se`` (in ``eval.unit``), passes continue until the
    standard error of the total is at most ``target_se`` (at least 2 passes, at most ``repeats``)."""
    model, cfg = load_model(checkpoint, overrides, use_ema=use_ema)
    num_steps = parse_steps(num_steps) if num_steps is not None else cfg.eval.nll_steps
    repeats = repeats if repeats is not None else cfg.eval.nll_repeats
    if num_steps < 0 or repeats < 1:
        raise ConfigError(f"--steps must be >= 0 (0 = inf) and --repeats >= 1 (got {num_steps}, {repeats})")
    target_se = target_se if target_se is not None else cfg.eval.target_se
    if target_se is not None and not (math.isfinite(target_se) and target_se > 0):
        raise ConfigError(f"--target-se: must be a positive number (got {target_se})")
    data_lib.verify(cfg.data.uri, splits=[split])
    total_rows = data_lib.num_rows(cfg.data.uri, split)
    torch.manual_seed(cfg.trainer.seed)
    losses, recons, started = [], [], time.perf_counter()
    vocabulary = data_lib.vocabulary_of(cfg.data.name, cfg.data.uri)  # bits/char of subword text
    for repeat in range(repeats):
        loss, recon, chars = _one_pass(
            model, cfg, split, repeat, max_batches, num_steps, total_rows, started, vocabulary
        )
        losses.append(loss)
        recons.append(recon)
        estimate = NLLEstimate.from_terms(torch.stack(losses), torch.stack(recons), model.num_dims)
        if chars is not None:  # every pass reads the same windows
            estimate = estimate.per_chars(chars.sum().item())
        se = estimate.in_unit(cfg.eval.unit)["total_se"]
        if target_se is not None and repeat >= 1 and se <= target_se:
            log.info("target standard error %.4g %s reached after %d passes", target_se, cfg.eval.unit, repeat + 1)
            break
    else:
        if target_se is not None:
            log.warning(
                "target standard error %.4g %s not reached in %d passes (%.4g)", target_se, cfg.eval.unit, repeats, se
            )
    n = "inf (continuous time)" if num_steps == 0 else str(num_steps)
    shown = checkpoint if models.is_model_uri(checkpoint) else Path(checkpoint).name
    print(f"{shown} on {split}, n = {n}:")
    for unit in dict.fromkeys(("nats/dim", "bits/dim", cfg.eval.unit)):
        print(f"  {summary(estimate, unit, num_steps)}")
    if estimate.num_repeats == 1:
        print("  (one pass: the standard error is over examples)")
    return estimate


def resolve_nfe(num_steps, nfe) -> int:
    """``--steps`` n or ``--nfe`` (nfe = n + 1; default n = 100) -> the number of network calls."""
    if num_steps is not None and nfe is not None:
        raise ConfigError(f"--steps and --nfe: give one of them (nfe = steps + 1; got {num_steps}, {nfe})")
    if nfe is None:
        nfe = check_count("--steps", 100 if num_steps is None else num_steps, 1) + 1
    return check_count("--nfe", nfe, 1)


@torch.no_grad()
def sample(
    checkpoint,
    *,
    num=64,
    num_steps=None,
    nfe=None,
    sampler="paper",
    seed=0,
    out=None,
    use_ema=True,
    grid=None,
    classes=None,
    guidance=None,
) -> Path:
    """`bfn sample`: ``num`` samples drawn with ``sampler`` (bfn.samplers.SAMPLERS) in ``nfe``
    network calls, as a PNG grid (images) or a text file (text8), at ``out`` (a path stem; default
    ``<paths.runs_dir>/samples/<run>_<checkpoint>_<sampler>_nfe<N>_seed<S>``); returns the path.

    Every sampler makes nfe - 1 updates and one last call for the result, so ``num_steps`` n (the
    paper's number of steps, the older flag) means nfe = n + 1; give one of the two (default n = 100).
    ``classes`` ("3", "1,7", "all"; conditional models): ``num`` samples of each class, one grid row
    per class, guided with ``guidance`` (classifier-free; None: 0).
    """
    nfe = resolve_nfe(num_steps, nfe)
    names = parse_samplers(sampler, several=False)
    num = check_count("--num", num, 1)
    if parse_grid(grid) is not None and names[0] == "paper":
        raise ConfigError("--grid: applies to the BFN-Solvers (ode1, ode2, sde1, sde2), not to --sampler paper")
    model, cfg = load_model(checkpoint, use_ema=use_ema)
    label, scale = inpaint.labels_for(cfg, classes, guidance, num)
    generator = torch.Generator().manual_seed(seed)
    count = num if label is None else len(label)  # no label and guidance 0: the unconditional call
    samples = draw(model, count, sampler=names[0], nfe=nfe, generator=generator, grid=grid, label=label, guidance=scale)
    if out is None and models.is_model_uri(checkpoint):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(checkpoint)[len("models:/") :])
        out = default_runs_dir() / "samples" / f"model_{name}_{names[0]}_nfe{nfe}_seed{seed}"
    if out is None:  # never into the checkpoint folder: sealed by its COMPLETE marker, possibly shared
        folder = Path(checkpoint).resolve()
        out = default_runs_dir() / "samples" / f"{folder.parent.name}_{folder.name}_{names[0]}_nfe{nfe}_seed{seed}"
    vocabulary = data_lib.vocabulary_of(cfg.data.name, cfg.data.uri)  # subword ids: the data's tokenizer
    return figures.save_samples(samples, cfg.data.name, Path(out), vocabulary, cols=None if label is None else num)


def inpaint_checkpoint(checkpoint, *, num_steps=None, nfe=None, use_ema=True, **options) -> Path:
    """`bfn inpaint`: ``pipeline.evaluation.inpaint.inpaint`` on the model of ``checkpoint``."""
    nfe = resolve_nfe(num_steps, nfe)
    model, cfg = load_model(checkpoint, use_ema=use_ema)
    return inpaint.inpaint(model, cfg, checkpoint, nfe=nfe, **options)

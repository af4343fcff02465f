"""`bfn eval` and `bfn sample`: a checkpoint's NLL on a split, and samples, without Ray.

Checkpoints are read weights-only (pipeline.training.checkpointing); the model is rebuilt from the
config stored beside the weights, so a checkpoint evaluates the network it was trained with.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from bfn import NLLEstimate
from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, absolutize
from pipeline.evaluation import figures
from pipeline.training import checkpointing
from pipeline.training.build import build_model


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Dotted key=value overrides on a stored config (values parsed as YAML scalars)."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: unknown key")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key}: unknown key")
        node[leaf] = yaml.safe_load(value)
    return absolutize(config)


def load_model(checkpoint: str | Path, overrides: list[str] = (), *, use_ema: bool = True):
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


@torch.no_grad()
def evaluate(checkpoint, overrides=(), *, split="test", num_steps=None, repeats=None,
             max_batches=0, use_ema=True) -> NLLEstimate:  # fmt: skip
    """NLL = n-step loss + reconstruction over ``repeats`` passes of ``split``."""
    model, cfg = load_model(checkpoint, overrides, use_ema=use_ema)
    num_steps = num_steps if num_steps is not None else cfg.eval.nll_steps
    repeats = repeats if repeats is not None else cfg.eval.nll_repeats
    if num_steps < 1 or repeats < 1:
        raise ConfigError(f"--steps and --repeats must be >= 1 (got {num_steps}, {repeats})")
    data_lib.verify(cfg.data.uri, splits=[split])
    total_rows = data_lib.num_rows(cfg.data.uri, split)
    torch.manual_seed(cfg.trainer.seed)
    losses, recons, started = [], [], time.perf_counter()
    for repeat in range(repeats):
        loss, recon = [], []
        batches = data_lib.iter_batches(cfg.data.uri, split, cfg.data.name, num_bins=cfg.data.num_bins,
                                        batch_size=cfg.data.val_batch_size, seed=repeat)  # fmt: skip
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            x = torch.from_numpy(batch["x"])
            x = x.long() if cfg.flow.kind == "discrete" else x.float()
            loss.append(model.n_step_loss(x, num_steps))
            recon.append(model.reconstruction_loss(x))
            done = sum(len(v) for v in loss)
            if i % 10 == 0:
                print(f"[bfn] eval repeat {repeat + 1}/{repeats}: {done}/{total_rows} examples "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        losses.append(torch.cat(loss))
        recons.append(torch.cat(recon))
    estimate = NLLEstimate.from_terms(torch.stack(losses), torch.stack(recons), model.num_dims)
    print(f"[bfn] {Path(checkpoint).name} on {split}, n = {num_steps}:")
    for unit in dict.fromkeys(("nats/dim", "bits/dim", cfg.eval.unit)):
        print(f"  {estimate.summary(unit)}")
    if num_steps and repeats == 1:
        print(f"  (one repeat: the standard error is over examples; ln 2 = {math.log(2):.6f})")
    return estimate


@torch.no_grad()
def sample(checkpoint, *, num=64, num_steps=100, seed=0, out=None, use_ema=True) -> Path:
    model, cfg = load_model(checkpoint, use_ema=use_ema)
    if num < 1 or num_steps < 1:
        raise ConfigError(f"--num and --steps must be >= 1 (got {num}, {num_steps})")
    samples = model.sample(num, num_steps, generator=torch.Generator().manual_seed(seed))
    stem = Path(out) if out else Path(checkpoint) / f"samples_{num_steps}steps_seed{seed}"
    return figures.save_samples(samples, cfg.data.name, stem)

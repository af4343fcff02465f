"""The per-worker training function that Ray Train runs on every worker.

train_fn_per_worker(config): typed config -> build model/EMA/optimiser -> resume from
ray.train.get_checkpoint() -> loop over the worker's shard of the train dataset -> every k steps
report metrics (all ranks: report is a barrier), validate on the EMA weights, render samples and
checkpoint (rank 0 writes; rank 0 logs to MLflow).

Resume semantics: model, EMA, optimiser, step, epoch and rank 0's RNG come back exactly; the data
stream restarts at a fresh pass over the shard (Ray Data cannot seek into a stream), so at most one
partial epoch is seen in a different order. Other ranks reseed from (seed, rank, step).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from bfn import EMA
from bfn.networks import count_parameters
from pipeline.config import Config
from pipeline.evaluation import figures
from pipeline.tracking import MLflowTracker, NullTracker
from pipeline.training import checkpointing, steps
from pipeline.training.build import build_model, build_optimizer, lr_at


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite steps; a diagnostic checkpoint was reported."""


def to_model_space(x: torch.Tensor, data_name: str) -> torch.Tensor:
    """Ray batch column -> model data: long ids (mnist, text8) or float32 in [-1, 1] (cifar10)."""
    return x.long() if data_name in ("mnist", "text8") else x.float()


def _batches(dataset, batch_size: int, device, data_name: str, epoch: int):
    """Endless (epoch, x) over a Ray dataset (iterator), one pass per epoch."""
    while True:
        for batch in dataset.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                                local_shuffle_buffer_size=4 * batch_size,
                                                device=device):  # fmt: skip
            yield epoch, to_model_space(batch["x"], data_name)
        epoch += 1


def _read_checkpoint(checkpoint, device) -> dict:
    """The checkpoint's state, verified; an earlier checkpoint if it is corrupt (checkpointing)."""
    return checkpointing.read_for_resume(checkpoint, device)


def _seed(seed: int, rank: int, step: int) -> None:
    torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


def _all_mean(value: float, world_size: int) -> float:
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / world_size


def train_fn_per_worker(config: dict) -> dict | None:
    import ray.data
    import ray.train
    import ray.train.torch

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = Config.from_dict(config)
    runtime = config.get("_runtime", {})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    device = ray.train.torch.get_device()

    raw = build_model(cfg).to(device)
    ema = EMA(raw, cfg.optim.ema_decay)
    optimizer = build_optimizer(cfg, raw)
    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = _read_checkpoint(checkpoint, device)
        raw.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["train_state"]["step"], state["train_state"]["epoch"] + 1
        if rank == 0:
            checkpointing.set_rng_state(state["rng"])
            print(f"[bfn] resumed from step {step} ({checkpoint.path})", flush=True)
    if not (checkpoint and rank == 0):
        _seed(cfg.trainer.seed, rank, step)
    model = ray.train.torch.prepare_model(raw) if world > 1 else raw
    if cfg.trainer.compile:
        model = torch.compile(model)

    tracker = NullTracker()
    if rank == 0 and cfg.tracking.enabled and runtime.get("mlflow_run_id"):
        tracker = MLflowTracker(cfg.tracking.uri, runtime["mlflow_run_id"])
    run_dir = Path(runtime.get("local_run_dir") or tempfile.mkdtemp(prefix="bfn-run-"))
    per_worker = cfg.data.batch_size // world
    train_iter = _batches(ray.train.get_dataset_shard("train"), per_worker, device, cfg.data.name, epoch)
    history: dict[str, list] = {"train/loss": [], "val/loss": []}
    throughput: list[float] = []  # samples/s of each logging window (the benchmark reads it)
    last: dict[str, float] = {}
    bad_in_a_row = skipped_total = 0
    window_loss, window_steps = 0.0, 0
    model.train()
    if rank == 0 and step == 0:  # the untrained model's numbers: the baseline every curve starts at
        baseline = _validate_and_sample(cfg, ema.model, 0, run_dir, tracker, device, samples=False)
        tracker.log_metrics(baseline, 0)
        history["val/loss"].append((0, baseline["val/loss"]))
    window_start = time.perf_counter()  # throughput windows include data waits, not val/ckpt
    loop_start = window_start

    while step < cfg.trainer.max_steps:
        epoch, x = next(train_iter)
        result = steps.train_step(model, raw, x, optimizer, ema, grad_clip=cfg.optim.grad_clip,
                                  lr=lr_at(cfg, step), amp=cfg.trainer.amp)  # fmt: skip
        step += 1
        if result.skipped:
            bad_in_a_row += 1
            skipped_total += 1
            if bad_in_a_row >= cfg.trainer.max_bad_steps:
                _report_and_checkpoint(cfg, rank, raw, ema, optimizer, step, epoch, config,
                                       {"train/skipped_steps": skipped_total, "diagnostic": 1})  # fmt: skip
                tracker.finish("FAILED")
                raise BadStepsError(
                    f"{bad_in_a_row} consecutive non-finite steps at step {step} (last loss "
                    f"{result.loss}, grad norm {result.grad_norm}); a diagnostic checkpoint was "
                    f"saved. Lower optim.lr, check the data, or raise trainer.max_bad_steps."
                )
        else:
            bad_in_a_row = 0
            window_loss += result.loss
            window_steps += 1
        last_step = step == cfg.trainer.max_steps
        metrics: dict[str, float] = {}
        if step % cfg.trainer.log_every == 0 or last_step:
            elapsed = time.perf_counter() - window_start
            loss = _all_mean(window_loss / max(window_steps, 1), world)
            metrics.update({
                "train/loss": loss, "lr": lr_at(cfg, step - 1), "epoch": epoch,
                "train/samples_per_s": window_steps * cfg.data.batch_size / max(elapsed, 1e-9),
                "train/grad_norm": result.grad_norm, "train/skipped_steps": skipped_total,
            })  # fmt: skip
            history["train/loss"].append((step, loss))
            throughput.append(metrics["train/samples_per_s"])
            window_loss, window_steps = 0.0, 0
            # a time budget ends the run at a log step; every rank must agree, so all-reduce
            budget = cfg.trainer.max_minutes * 60
            out_of_time = budget > 0 and time.perf_counter() - loop_start > budget
            if _all_mean(float(out_of_time), world) > 0 and not last_step:
                last_step = True
                if rank == 0:
                    print(f"[bfn] time budget of {cfg.trainer.max_minutes} min reached at step "
                          f"{step}", flush=True)  # fmt: skip
            if rank == 0:
                print(f"[bfn] step {step}/{cfg.trainer.max_steps} epoch {epoch} loss {loss:.4f} "
                      f"{metrics['train/samples_per_s']:.1f} samples/s", flush=True)  # fmt: skip
        if rank == 0 and (step % cfg.trainer.val_every == 0 or last_step):
            metrics.update(_validate_and_sample(cfg, ema.model, step, run_dir, tracker, device))
            history["val/loss"].append((step, metrics["val/loss"]))
        if metrics:
            tracker.log_metrics(metrics, step)
            last.update(metrics)
            # every report carries the latest validation metrics too, so a Tune scheduler that
            # watches a val/ metric finds it in each result
            metrics = {**{k: v for k, v in last.items() if k.startswith("val/")}, **metrics}
        if step % cfg.trainer.checkpoint_every == 0 or last_step:
            _report_and_checkpoint(cfg, rank, raw, ema, optimizer, step, epoch, config, metrics)
        elif step % cfg.trainer.log_every == 0 or step % cfg.trainer.val_every == 0:
            # report is a barrier: every rank reports on the same steps. (Deciding by `metrics`
            # deadlocked: on a val step that is no log step only rank 0 has metrics.)
            ray.train.report({**metrics, "step": step})
        if metrics:
            window_start = time.perf_counter()
        if last_step:
            break

    if rank != 0:
        return None
    curves = figures.save_curves(history, run_dir / "curves.png", f"{cfg.run.name}")
    tracker.log_artifact(curves, "figures")
    tracker.set_tags({"bfn.final_step": step})
    tracker.finish()
    return {**last, "step": step, "run_dir": str(run_dir), "skipped_steps": skipped_total,
            "tracking_lost_points": tracker.lost_points, "samples_per_s_windows": throughput,
            "num_parameters": count_parameters(raw.net)}  # fmt: skip


def _validate_and_sample(cfg: Config, ema_model, step: int, run_dir: Path, tracker, device,
                         samples: bool = True) -> dict:  # fmt: skip
    """Rank 0: EMA validation (loss, NLL in each unit) and a sample grid/text file."""
    import ray.train

    val = ray.train.get_dataset_shard("val")
    batches = (to_model_space(b["x"], cfg.data.name) for b in val.iter_torch_batches(
        batch_size=cfg.data.val_batch_size, device=device))  # fmt: skip
    started = time.perf_counter()
    result = steps.validate(ema_model, batches, nll_steps=cfg.eval.nll_steps,
                            nll_repeats=cfg.eval.nll_repeats, max_batches=cfg.eval.val_batches)  # fmt: skip
    metrics = {"val/loss": result["loss"], "val/loss_bits_per_dim": result["loss"] / math.log(2)}
    if result["nll"] is not None:
        metrics.update(steps.nll_metrics(result["nll"], cfg.eval.unit))
        print(f"[bfn] step {step} val: {result['nll'].summary(cfg.eval.unit)}", flush=True)
    if cfg.eval.num_samples and samples:
        generator = torch.Generator(device=device).manual_seed(cfg.trainer.seed)
        samples = ema_model.sample(cfg.eval.num_samples, cfg.eval.sample_steps, generator=generator)
        path = figures.save_samples(samples, cfg.data.name, run_dir / "samples" / f"step_{step:08d}")
        tracker.log_artifact(path, "samples")
        metrics["val/samples_written"] = 1.0
    metrics["val/seconds"] = time.perf_counter() - started
    return metrics


def _report_and_checkpoint(cfg, rank, raw, ema, optimizer, step, epoch, config, metrics) -> None:
    """All ranks report; rank 0 attaches a checkpoint folder."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="bfn-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            train_state = {"step": step, "epoch": epoch, "run_name": cfg.run.name}
            public = {k: v for k, v in config.items() if k != "_runtime"}
            checkpointing.save(folder, model=raw, ema=ema, optimizer=optimizer,
                               train_state=train_state, config=public)  # fmt: skip
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "step": step}, checkpoint=checkpoint,
                         checkpoint_upload_fn=checkpointing.persist)  # fmt: skip

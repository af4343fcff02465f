"""The per-worker training function that Ray Train runs on every worker.
(Longer than 500 lines: one worker's life, from resume through step, validation, checkpoint and preemption.)

train_fn_per_worker({"config": ..., "runtime": ...}): build model/EMA/optimiser, resume from
ray.train.get_checkpoint() (or a newer complete checkpoint the driver found), then step over the
worker's shard. When to log, validate, checkpoint and report is decided by ``Cadence`` (identical
on every rank: ``report`` is a barrier); rank 0 logs to MLflow (every rank's system metrics too,
``system_metrics``), validates on the EMA weights and writes checkpoints.

The step itself never waits on the device: losses, gradient norms and the skip decision stay on the
device and are read once per log interval (``Window``).

What a checkpoint holds and the loop advances is a ``TrainState`` (model, EMA, optimiser, step, epoch);
what stays fixed for the launch (config, rank, device, tracker) is a ``WorkerContext``.

Resume semantics: model, EMA, optimiser, step, epoch and rank 0's RNG come back exactly; the data
stream restarts at a fresh pass over the shard (Ray Data cannot seek into a stream), so at most one
partial epoch is seen in a different order. Other ranks reseed from (seed, rank, step).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch

from bfn.networks import count_parameters
from pipeline import data as data_lib
from pipeline.config import Config
from pipeline.core import checkpointing
from pipeline.core.build import lr_at
from pipeline.evaluation import figures
from pipeline.evaluation.quality import quality_point
from pipeline.tracking import MLflowTracker, NullTracker
from pipeline.training import steps, system_metrics, train_state
from pipeline.training.cadence import Actions, Cadence
from pipeline.training.lease import lease_file, lost_to
from pipeline.training.progress import Progress, Window, all_mean
from pipeline.training.system_metrics import ProcessSampler
from pipeline.training.train_state import TrainState

log = logging.getLogger(__name__)
PREEMPTION_WAIT_S = 120.0  # a preemption notice without a deadline: Ray Train's own assumption of the time left


class BadStepsError(RuntimeError):
    """Too many consecutive non-finite steps; a diagnostic checkpoint was written aside."""


class PreemptedError(RuntimeError):
    """A node of this worker group is being preempted: every rank checkpointed and stops; Ray Train restarts the
    group on the nodes that remain (one of FailureConfig.max_failures: Ray Train 2.60 spends its separate
    preemption budget only on workers the reclaim itself killed)."""


@dataclass(frozen=True)
class Runtime:
    """Values of this launch that the driver passes beside the config (never inside it)."""

    mlflow_run_id: str | None = None
    local_run_dir: str | None = None
    verbose: bool = False
    newest_checkpoint: Any = None  # ray.train.Checkpoint: the run folder's newest complete one at launch
    lease: dict | None = None  # the driver's run-folder lease ({run_folder, id}): checked before each report
    watch_preemption: bool = False  # Ray Train's preemption watcher runs: ask for its notice at each log step


@dataclass(frozen=True)
class WorkerContext:
    """What stays fixed for this worker during a launch: the config, its place in the group, its device,
    where rank 0 writes samples and curves, and its tracker (a ``NullTracker`` except on rank 0)."""

    cfg: Config
    runtime: Runtime
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    tracker: MLflowTracker | NullTracker
    system: ProcessSampler | None = None  # tracking.system_metrics: this rank's CPU/memory/GPU, every rank
    vocabulary: data_lib.Vocabulary | None = None  # subword text: bits/char and decoded samples (rank 0)


def _batches(dataset, batch_size: int, device, epoch: int, seed: int):
    """Endless (epoch, stored batch, labels or None) over a Ray dataset (iterator), one pass per epoch;
    the local shuffle is seeded per (seed, epoch) so a launch is reproducible. Labels: the (B,) class
    ids of a conditional run's rows (``model.num_labels``); None for unconditional runs."""
    while True:
        for batch in dataset.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed * 1_000_003 + epoch,
            device=device,
        ):
            yield epoch, batch["x"], batch.get("label")
        epoch += 1


def _model_batch(cfg: Config, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Stored batch -> model data: the seeded draws (MNIST binarisation, text8 window offsets) of
    (trainer.seed, rank, step), so a resumed run draws what it would have drawn."""
    generator = data_lib.batch_generator(cfg.trainer.seed, rank, step, x.device)
    return data_lib.to_model(x, cfg.data.name, seq_len=cfg.data.seq_len, generator=generator)


def _build(cfg: Config, device, *, rank: int, world: int, newest_checkpoint) -> tuple[TrainState, CompiledStep]:
    """The train state, resumed or initialised (``train_state.restore``), and the step that trains it
    (on the DDP wrapper of its model when there are several workers)."""
    state = train_state.new_state(cfg, device)
    train_state.restore(cfg, state, newest_checkpoint, device=device, rank=rank, world=world)
    # DDP compares strides literally and warns once (six lines) when a 1x1 conv's channels_last gradient
    # differs from its bucket view only along size-1 dims: the same memory order, nothing to fix
    # (tests/bfn/test_networks.py::test_gradients_are_laid_out_like_their_parameters)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    model = ray.train.torch.prepare_model(state.model) if world > 1 else state.model
    return state, CompiledStep(model, cfg.trainer.compile, rank)


class CompiledStep:
    """The training step, with ``torch.compile`` on the network when asked. Compilation happens at
    the first call: its cost is logged as warm-up, and a failure falls back to eager with a warning
    (a genuine error in the step then raises again, uncompiled)."""

    def __init__(self, model, compile_model: bool, rank: int) -> None:
        self.eager, self.rank = model, rank
        self.model = torch.compile(model) if compile_model else model
        self.pending = compile_model

    def __call__(self, raw, x, optimizer, ema, **kwargs) -> steps.StepResult:
        if not self.pending:
            return steps.train_step(self.model, raw, x, optimizer, ema, **kwargs)
        self.pending, started = False, time.perf_counter()
        try:
            result = steps.train_step(self.model, raw, x, optimizer, ema, **kwargs)
        except Exception as error:  # noqa: BLE001 (any compiler failure: train uncompiled)
            log.warning(
                "torch.compile failed (%s: %s); training continues without it (trainer.compile=false "
                "skips the attempt)",
                type(error).__name__,
                str(error).splitlines()[0][:200],
            )
            self.model = self.eager
            return steps.train_step(self.model, raw, x, optimizer, ema, **kwargs)
        if self.rank == 0:
            log.info("torch.compile warm-up: the first step took %.1f s", time.perf_counter() - started)
        return result


def _quiet_ray(record: logging.LogRecord) -> bool:
    """Drop Ray's INFO chatter (some Ray Train loggers are named by file path, not "ray...")."""
    return record.levelno >= logging.WARNING or not (
        record.name.startswith("ray") or "/site-packages/ray/" in record.name
    )


def _configure_logging(rank: int, verbose: bool) -> None:
    """Rank 0 prints one progress line per log interval; Ray's own reports only with -v."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="[bfn] %(message)s", force=True)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_ray)
        logging.getLogger("ray").setLevel(logging.WARNING)  # Ray's loggers with handlers of their own


def train_fn_per_worker(loop_config: dict) -> dict | None:
    """What Ray Train runs on every worker: the run to ``trainer.max_steps`` (or its time budget); rank 0
    returns the summary the driver gets (``Result.return_value``), the other ranks None."""
    cfg, runtime = Config.from_dict(loop_config["config"]), Runtime(**loop_config["runtime"])
    ctx, state, step_fn = _start(cfg, runtime)
    train_iter = _batches(
        _shard("train"),
        cfg.data.batch_size // ctx.world,
        ctx.device,
        state.epoch,
        seed=cfg.trainer.seed * 7919 + ctx.rank,
    )
    cadence = Cadence.from_config(cfg.trainer)
    progress = Progress(cfg.trainer.max_steps, cfg.trainer.max_minutes * 60, first_step=state.step)
    state.model.train()
    if ctx.rank == 0 and state.step == 0:  # the untrained model's numbers: the baseline every curve starts at
        baseline = _validate_and_sample(ctx, state.ema.model, 0, samples=False)
        ctx.tracker.log_metrics(baseline, 0)
        progress.history["val/loss"].append((0, baseline["val/loss"]))
    window = Window(ctx.device)  # throughput windows include data waits, not validation/checkpoints
    progress.loop_started = window.started

    while state.step < cfg.trainer.max_steps:
        _advance(ctx, state, step_fn, train_iter, window)
        actions = cadence.actions(state.step)
        metrics: dict[str, float] = {}
        if actions.log:
            metrics, actions = _log_and_check(ctx, state, window, progress, cadence, actions)
            if runtime.watch_preemption and not actions.last:
                _checkpoint_if_preempted(ctx, state, metrics, progress)
        if ctx.rank == 0 and actions.validate:
            metrics.update(_validate_and_sample(ctx, state.ema.model, state.step))
            progress.history["val/loss"].append((state.step, metrics["val/loss"]))
        if actions.report:
            lost = _lease_lost(runtime.lease, ctx.rank, ctx.world)
            if lost:  # returned, not raised: a worker error would be retried (FailureConfig) into the same folder
                ctx.tracker.finish("FAILED")
                return {"lease_lost": lost, "step": state.step} if ctx.rank == 0 else None
            _report(ctx, state, metrics, progress, checkpoint=actions.checkpoint)
            window.started = time.perf_counter()
        if actions.last:
            break
    return _finish(ctx, state, progress)


def _shard(name: str):
    """This worker's shard of the dataset ``name`` (Ray Train's ``get_dataset_shard``)."""
    return ray.train.get_dataset_shard(name)


def _start(cfg: Config, runtime: Runtime) -> tuple[WorkerContext, TrainState, CompiledStep]:
    """This worker's context (logging, threads, device, tracker) and its train state, built or resumed."""
    ray_context = ray.train.get_context()
    rank, world = ray_context.get_world_rank(), ray_context.get_world_size()
    _configure_logging(rank, runtime.verbose)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    device = ray.train.torch.get_device()
    state, step_fn = _build(cfg, device, rank=rank, world=world, newest_checkpoint=runtime.newest_checkpoint)
    tracker = NullTracker()
    if rank == 0 and cfg.tracking.enabled and runtime.mlflow_run_id:
        tracker = MLflowTracker(cfg.tracking.uri, runtime.mlflow_run_id)
    run_dir = Path(runtime.local_run_dir or tempfile.mkdtemp(prefix="bfn-run-"))
    system = ProcessSampler(device) if cfg.tracking.enabled and cfg.tracking.system_metrics else None
    vocabulary = data_lib.vocabulary_of(cfg.data.name, cfg.data.uri) if rank == 0 else None  # read once
    ctx = WorkerContext(cfg, runtime, rank, world, device, run_dir, tracker, system, vocabulary)
    _record_nodes(ctx, state.step)
    return ctx, state, step_fn


def _record_nodes(ctx: WorkerContext, step: int) -> None:
    """Which Ray node each rank of this launch runs on: one progress line and the MLflow tag ``bfn.rank_nodes``
    (JSON, rank -> node id), rewritten at every launch of an elastic or restarted run."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if ctx.world > 1:  # once per launch, beside DDP's own start-up collectives
        nodes = [None] * ctx.world
        torch.distributed.all_gather_object(nodes, node)
    if ctx.rank == 0:
        log.info(
            "world size %d from step %d on %d node(s): %s",
            ctx.world,
            step,
            len(set(nodes)),
            ", ".join(f"rank {r} on {n[:12]}" for r, n in enumerate(nodes)),
        )
        ctx.tracker.set_tags({"bfn.rank_nodes": json.dumps(dict(enumerate(nodes)))})


def _checkpoint_if_preempted(ctx: WorkerContext, state: TrainState, metrics: dict, progress: Progress) -> None:
    """At a log step: whether Ray Train saw a node of this group drained for preemption (its watcher polls
    the drain state; ``get_preemption_info`` agrees on one answer across ranks, a barrier, so it is asked at log
    steps only, never per step). On a notice every rank reports a checkpoint of this step and raises
    ``PreemptedError``: Ray Train restarts the group on the remaining nodes, losing no step since the notice."""
    info = ray.train.get_preemption_info()
    if info is None:
        return
    left = "none" if info.deadline_ms is None else f"{info.deadline_ms / 1000 - time.time():.0f} s"
    if ctx.rank == 0:
        log.warning(
            "preemption notice for node(s) %s (ranks %s, deadline in %s): checkpoint at step %d, then stop",
            ", ".join(n[:12] for n in info.preempted_node_ids),
            info.preempted_ranks,
            left,
            state.step,
        )
    _report(ctx, state, metrics, progress, checkpoint=True)
    if ctx.rank == 0:
        log.warning("checkpoint of step %d written; waiting for the preempted node(s) to go", state.step)
    _wait_for_reclaim(info)
    raise PreemptedError(f"preempted at step {state.step} (ranks {info.preempted_ranks}); checkpoint written")


def _wait_for_reclaim(info) -> None:
    """Hold this worker until the preempted nodes are gone (or their deadline, else ``PREEMPTION_WAIT_S``, has
    passed): Ray Train sizes the restarted group from the nodes it counts, and it counts a draining node's
    resources until the node is reclaimed. Ranks on a preempted node end with it."""
    deadline = info.deadline_ms / 1000 if info.deadline_ms else time.time() + PREEMPTION_WAIT_S
    leaving = set(info.preempted_node_ids)
    while time.time() < deadline + 5 and leaving & {node["NodeID"] for node in ray.nodes() if node["Alive"]}:
        time.sleep(1.0)


def _advance(ctx: WorkerContext, state: TrainState, step_fn: CompiledStep, train_iter, window: Window) -> None:
    """One optimiser step on the next batch: the state moves one step on, the result joins the window."""
    cfg = ctx.cfg
    state.epoch, stored, label = next(train_iter)
    x = _model_batch(cfg, stored, ctx.rank, state.step)
    result = step_fn(
        state.model,
        x,
        state.optimizer,
        state.ema,
        grad_clip=cfg.optim.grad_clip,
        lr=lr_at(cfg, state.step),
        amp=cfg.trainer.amp,
        label=label,
    )
    window.add(result)
    state.step += 1


def _log_and_check(
    ctx: WorkerContext, state: TrainState, window: Window, progress: Progress, cadence: Cadence, actions: Actions
) -> tuple[dict[str, float], Actions]:
    """At a log step: the window's metrics, then whether the run stops (too many bad steps raise; the
    time budget makes this step the last). Returns (metrics, the actions of this step)."""
    metrics, stats = _log_window(ctx, state, window, progress)
    stop = should_stop(ctx.cfg, stats, progress, state.step, ctx.rank, ctx.world)
    if stop == "bad_steps":
        metrics["train/bad_run"] = stats["worst_run"]
        _abort_bad_steps(ctx, state, metrics)
    if stop == "time" and not actions.last:
        actions = cadence.actions(state.step, stop=True)
    return metrics, actions


def _log_window(
    ctx: WorkerContext, state: TrainState, window: Window, progress: Progress
) -> tuple[dict[str, float], dict[str, float]]:
    """The window's train metrics and one progress line; returns (metrics, the window's stats)."""
    cfg, step = ctx.cfg, state.step
    stats = window.read(ctx.world)
    progress.skipped_total += int(stats["skipped"])
    metrics = {
        "train/loss": stats["loss"],
        "lr": lr_at(cfg, step - 1),
        "epoch": state.epoch,
        "train/samples_per_s": stats["good"] * cfg.data.batch_size / max(stats["seconds"], 1e-9),
        "train/grad_norm": stats["grad_norm"],
        "train/skipped_steps": progress.skipped_total,
        "train/world_size": ctx.world,  # elastic runs change it from launch to launch
    }
    if ctx.system is not None:  # every rank's process, gathered on the log step (a collective)
        metrics.update(system_metrics.gather(ctx.system.read(), ctx.rank, ctx.world))
    progress.history["train/loss"].append((step, stats["loss"]))
    progress.throughput.append(metrics["train/samples_per_s"])
    progress.logged_at.append(time.time())
    if ctx.rank == 0:
        log.info(
            "step %d/%d | loss %.4f | %.1f samples/s | epoch %d | ETA %s",
            step,
            cfg.trainer.max_steps,
            stats["loss"],
            metrics["train/samples_per_s"],
            state.epoch,
            progress.eta(step),
        )
    return metrics, stats


def should_stop(
    cfg: Config, stats: dict[str, float], progress: Progress, step: int, rank: int, world: int
) -> str | None:
    """Whether the run stops at this log step: "bad_steps", "time" (trainer.max_minutes) or None.

    Every rank takes the same decision: gradients are all-reduced, so non-finite steps are the same
    everywhere, and the time budget is all-reduced."""
    if stats["worst_run"] >= cfg.trainer.max_bad_steps:
        return "bad_steps"
    budget = cfg.trainer.max_minutes * 60
    out_of_time = budget > 0 and time.perf_counter() - progress.loop_started > budget
    if all_mean(torch.tensor([float(out_of_time)], dtype=torch.float64), world).item() > 0:
        if rank == 0:
            log.info("time budget of %s min reached at step %d", cfg.trainer.max_minutes, step)
        return "time"
    return None


def _abort_bad_steps(ctx: WorkerContext, state: TrainState, metrics: dict[str, float]) -> None:
    """Stop the run. Rank 0 keeps the blown-up state as a diagnostic outside Ray's checkpoint
    history, so a rerun never resumes from it."""
    message = (
        f"{int(metrics['train/bad_run'])} consecutive non-finite steps at step {state.step} (grad norm "
        f"{metrics['train/grad_norm']})."
    )
    if ctx.rank == 0:
        folder = ctx.run_dir / "diagnostic" / f"step_{state.step:08d}"
        state.save(folder, config=ctx.cfg.raw, extra={checkpointing.DIAGNOSTIC_KEY: True})
        ctx.tracker.log_metrics(metrics, state.step)
        ctx.tracker.set_tags({"bfn.diagnostic_checkpoint": str(folder)})
        ctx.tracker.finish("FAILED")
        message += f" The weights are kept for inspection at {folder} (never resumed from)."
    raise BadStepsError(f"{message} Lower optim.lr, check the data, or raise trainer.max_bad_steps.")


def _report(
    ctx: WorkerContext, state: TrainState, metrics: dict[str, float], progress: Progress, *, checkpoint: bool
) -> None:
    """Every rank reports on the same steps (a barrier); rank 0 logs and attaches the checkpoint."""
    if metrics:
        ctx.tracker.log_metrics(metrics, state.step)
        progress.last.update(metrics)
        # every report carries the latest validation metrics, so a Tune scheduler watching a val/
        # metric finds it in each result
        metrics = {**{k: v for k, v in progress.last.items() if k.startswith("val/")}, **metrics}
    with tempfile.TemporaryDirectory(prefix="bfn-ckpt-") as folder:
        saved = None
        if checkpoint and ctx.rank == 0:
            state.save(folder, config=ctx.cfg.raw, extra={"run_name": ctx.cfg.run.name})
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({**metrics, "step": state.step}, checkpoint=saved, checkpoint_upload_fn=checkpointing.persist)


@functools.lru_cache(maxsize=1)
def _lease_file(run_folder: str):
    """One lease file (an S3 client) per worker process, not one per report."""
    return lease_file(run_folder)


def _lease_lost(lease: dict | None, rank: int, world: int) -> str | None:
    """Rank 0 reads the run folder's lease; every rank learns whether another run took it over (the same
    decision everywhere: ``report`` is a barrier). Returns the reason on rank 0, "lost" on the others."""
    if not lease:
        return None
    reason = lost_to(lease["run_folder"], lease["id"], _lease_file(lease["run_folder"])) if rank == 0 else None
    if all_mean(torch.tensor([float(reason is not None)], dtype=torch.float64), world).item() == 0:
        return None
    if rank == 0:
        log.error("%s", reason)
    return reason or "lost"


def _finish(ctx: WorkerContext, state: TrainState, progress: Progress) -> dict | None:
    """Rank 0's end of the run: the curves figure, the final tags, and the summary returned to the driver."""
    if ctx.rank != 0:
        return None
    tracker = ctx.tracker
    curves = figures.save_curves(progress.history, ctx.run_dir / "curves.png", f"{ctx.cfg.run.name}")
    tracker.log_artifact(curves, "figures")
    tracker.set_tags({"bfn.final_step": state.step})
    tracker.finish()
    return {
        **progress.last,
        "step": state.step,
        "run_dir": str(ctx.run_dir),
        "skipped_steps": progress.skipped_total,
        "tracking_lost_points": tracker.lost_points,
        "tracking_lost_calls": tracker.lost_calls,
        "samples_per_s_windows": progress.throughput,
        "windows_logged_at": progress.logged_at,
        "num_parameters": count_parameters(state.model.net),
    }


def _validate_and_sample(ctx: WorkerContext, ema_model, step: int, *, samples: bool = True) -> dict:
    """Rank 0: EMA validation (loss, NLL in each unit) and a sample grid/text file."""
    cfg, device = ctx.cfg, ctx.device
    val = _shard("val")
    generator = data_lib.batch_generator(cfg.trainer.seed, 0, data_lib.VALIDATION_STEP, device)
    batches = (
        _with_label(data_lib.to_model(b["x"], cfg.data.name, seq_len=cfg.data.seq_len, generator=generator), b)
        for b in val.iter_torch_batches(batch_size=cfg.data.val_batch_size, device=device)
    )
    started = time.perf_counter()
    vocabulary = ctx.vocabulary
    result = steps.validate(
        ema_model,
        batches,
        nll_steps=cfg.eval.nll_steps,
        nll_repeats=cfg.eval.val_repeats,
        max_batches=cfg.eval.val_batches,
        count_chars=None if vocabulary is None else vocabulary.chars,
    )
    metrics = {"val/loss": result["loss"], "val/loss_bits_per_dim": result["loss"] / math.log(2)}
    metrics.update(steps.nll_metrics(result["nll"], cfg.eval.unit))
    log.info("%s", steps.validation_table(step, result, cfg.eval.nll_steps, cfg.eval.unit))
    if samples:
        metrics.update(_samples(ctx, ema_model, step))
    metrics["val/seconds"] = time.perf_counter() - started
    return metrics


def _samples(ctx: WorkerContext, ema_model, step: int) -> dict[str, float]:
    """Rank 0 at a validation step: a seeded sample grid (or text file), and sample quality against
    network calls per sampler when ``eval.quality_samplers`` asks for it."""
    cfg, metrics = ctx.cfg, {}
    if cfg.eval.num_samples:
        generator = torch.Generator(device=ctx.device).manual_seed(cfg.trainer.seed)
        stem = ctx.run_dir / "samples" / f"step_{step:08d}"
        if cfg.model.conditional:
            path = _class_grid(cfg, ema_model, generator, stem)
        else:
            drawn = ema_model.sample(cfg.eval.num_samples, cfg.eval.sample_steps, generator=generator)
            path = figures.save_samples(drawn, cfg.data.name, stem, ctx.vocabulary)
        ctx.tracker.log_artifact(path, "samples")
        metrics["val/samples_written"] = 1.0
    if cfg.eval.quality_samplers:
        metrics.update(quality_point(ema_model, cfg, step, ctx.run_dir / "quality"))
        for path in sorted((ctx.run_dir / "quality").glob(f"*_step{step:08d}.*")):
            ctx.tracker.log_artifact(path, "quality")
    return metrics


def _with_label(x: torch.Tensor, batch: dict):
    """A validation batch for ``steps.validate``: x, or (x, labels) for a conditional run."""
    return x if batch.get("label") is None else (x, batch["label"])


def _class_grid(cfg: Config, ema_model, generator: torch.Generator, stem: Path) -> Path:
    """A conditional model's validation grid: one row per class, eval.num_samples // model.num_labels
    samples each (at least one), guided with eval.guidance; returns the PNG written."""
    per_class = max(1, cfg.eval.num_samples // cfg.model.num_labels)
    label = torch.arange(cfg.model.num_labels, device=generator.device).repeat_interleave(per_class)
    drawn = ema_model.sample(
        len(label), cfg.eval.sample_steps, generator=generator, label=label, guidance=cfg.eval.guidance
    )
    return figures.save_samples(drawn, cfg.data.name, stem, cols=per_class)

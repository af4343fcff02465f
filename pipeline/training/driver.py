"""`bfn train`: validate the config and data, start (or join) Ray, run the TorchTrainer.

Order matters: every check that can fail on bad input (config values, shards, manifest, a run
folder in use, a resume with a different experiment) runs before Ray starts, so a mistake costs
seconds, not a cluster allocation. The steps live beside this file: the Ray runtime and its secure
environment (``ray_runtime``), the run folder's lease and resume checks (``resume``), the driver's
MLflow run (``tracking_run``); the loop each worker runs is ``worker``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bfn.networks import count_parameters
from pipeline import data as data_lib
from pipeline import logs
from pipeline.config import Config
from pipeline.core.build import build_model
from pipeline.secrets import mask_text
from pipeline.training.lease import Lease, LeaseError
from pipeline.training.ray_runtime import init_ray, secure_local_ray
from pipeline.training.resume import claim_run, local_run_dir, storage
from pipeline.training.tracking_run import end_tracking, log_final_model, start_tracking


def preflight(cfg: Config) -> dict:
    """Check the prepared shards (manifest, files, checksums, schema, value ranges) of train and val."""
    manifest = data_lib.verify(cfg.data.uri, splits=["train", "val"])
    if manifest.get("dataset") not in (None, cfg.data.name):
        raise data_lib.DataError(
            f"data.uri {cfg.data.uri} holds {manifest.get('dataset')!r}, but data.name is {cfg.data.name!r}"
        )
    data_lib.check_values(cfg.data.uri, manifest, ["train", "val"])
    check_vocabulary(cfg, manifest)
    return manifest


def check_vocabulary(cfg: Config, manifest: dict) -> None:
    """A subword dataset fixes K: the model's flow.num_classes must be its tokenizer's vocabulary size."""
    if cfg.data.name == "text_bpe" and manifest.get("vocab_size") != cfg.flow.num_classes:
        raise data_lib.DataError(
            f"flow.num_classes={cfg.flow.num_classes} but the tokenizer of data.uri {cfg.data.uri} has "
            f"{manifest.get('vocab_size')} tokens: set flow.num_classes={manifest.get('vocab_size')} "
            f"(or prepare the data with `bfn data prepare text-bpe --vocab {cfg.flow.num_classes}`)"
        )


def fit(cfg: Config, *, callbacks: list | None = None) -> dict:
    """Run (or resume) the training run ``cfg.run.name``; returns rank 0's summary.

    ``callbacks``: extra Ray Train callbacks (``bfn tune`` passes a ``TuneReportCallback``)."""
    secure_local_ray(cfg)  # before ray is imported
    lease, newest = claim_run(cfg)
    try:
        return _fit(cfg, lease, newest, callbacks)
    finally:
        lease.release()


def _fit(cfg: Config, lease: Lease, newest: tuple[Any, str] | None, callbacks: list | None) -> dict:
    # the CLI imports this module before ray_env_at_entry: Ray reads its node address at import
    import ray.train

    manifest = preflight(cfg)
    num_parameters = _count_parameters(cfg)
    init_ray(cfg)
    datasets = _datasets(cfg)
    tracker = start_tracking(cfg, num_parameters, manifest, lease, resume=newest is not None)
    run_id = tracker.run_id if tracker else None
    # the newest complete checkpoint, registered or not: a killed driver's workers write some it never registered
    found = ray.train.Checkpoint(newest[1], filesystem=newest[0]) if newest else None
    runtime = {
        "mlflow_run_id": run_id,
        "local_run_dir": local_run_dir(cfg),
        "verbose": logs.verbose(),
        "newest_checkpoint": found,
        "lease": lease.token,
        # Ray Train's watcher is on unless switched off (embedded runtimes: ray_runtime.embedded_ray_env)
        "watch_preemption": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") not in ("0", "false", "False"),
    }
    trainer = _trainer(cfg, {"config": cfg.raw, "runtime": runtime}, datasets, callbacks)
    try:
        result = trainer.fit()
    except BaseException:  # the driver's queued calls are delivered or counted even when the fit fails
        end_tracking(tracker, {})
        raise
    summary = dict(result.return_value or {})
    if summary.get("lease_lost") or lease.lost:  # another run took the folder over: this one stopped
        end_tracking(tracker, {})
        raise LeaseError(
            summary.get("lease_lost")
            or f"run folder {lease.run_folder}: the lease was taken over by another run while this one trained"
        )
    summary.update(
        {
            "run_name": cfg.run.name,
            "mlflow_run_id": run_id,
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "storage": result.path,
        }
    )
    summary["mlflow_model_id"] = log_final_model(cfg, tracker, result.checkpoint)
    return end_tracking(tracker, summary)


def _count_parameters(cfg: Config) -> int:
    """The network's parameter count, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return count_parameters(build_model(cfg).net)


def _datasets(cfg: Config) -> dict:
    """The train and val Ray datasets, seeded; blocks reach the workers in a fixed order, so a seeded
    launch sees the same batches."""
    # the CLI imports this module before ray_env_at_entry: Ray reads its node address at import
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    seed = cfg.trainer.seed
    seq_len = cfg.data.seq_len if data_lib.is_text(cfg.data.name) else None
    labels = cfg.model.conditional  # rows {"x", "label"}; an unconditional run's datasets are unchanged
    return {
        "train": data_lib.ray_dataset(
            cfg.data.uri,
            "train",
            cfg.data.name,
            num_bins=cfg.data.num_bins,
            fraction=cfg.data.fraction,
            seed=seed,
            seq_len=seq_len,
            labels=labels,
        ),
        "val": data_lib.ray_dataset(
            cfg.data.uri,
            "val",
            cfg.data.name,
            num_bins=cfg.data.num_bins,
            seed=seed + 1,
            seq_len=seq_len,
            labels=labels,
        ),
    }


def _trainer(cfg: Config, loop_config: dict, datasets: dict, callbacks: list | None):
    """The TorchTrainer of this run: ``worker.train_fn_per_worker`` on ``trainer.num_workers`` workers,
    writing into the run folder's storage."""
    # the CLI imports this module before ray_env_at_entry: Ray reads its node address at import (the
    # worker's module imports ray too)
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.training.worker import train_fn_per_worker

    storage_path, storage_filesystem = storage(cfg)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
            # a preemption notice makes the workers checkpoint and stop (worker._checkpoint_if_preempted): Ray Train
            # 2.60 counts that stop as one of max_failures and restarts the group on the nodes that remain
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            callbacks=list(callbacks or []),
            # Ray Train's own INFO lines (resources, worker groups, reports) only with -v
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if loop_config["runtime"]["verbose"] else "WARNING"
            ),
        ),
        datasets=datasets,
        dataset_config=data_config(cfg),
    )


def data_config(cfg: Config):
    """How the datasets reach the workers: "train" is split into one disjoint stream per worker (Ray Data's
    ``streaming_split``, equal sizes); "val" is not split, rank 0 alone validates on all of it. One worker
    reads the whole stream itself: no split coordinator actor to start and feed."""
    import ray.train  # lazy: Ray reads its node address at import, after ray_env_at_entry

    return ray.train.DataConfig(datasets_to_split=["train"] if cfg.trainer.max_workers > 1 else [])


def scaling_config(cfg: Config):
    """``trainer.num_workers`` as Ray Train's ScalingConfig: a number is a fixed group (FailureConfig restarts it
    at the same size); a range [min, max] is Ray's elastic group, restarted at whatever size the cluster has room
    for when a node is lost, and grown again at the next resize check once nodes come back."""
    import ray.train  # lazy: Ray reads its node address at import, after ray_env_at_entry

    trainer = cfg.trainer
    resources = {"CPU": trainer.cpus_per_worker, **(trainer.resources or {})}
    if not trainer.elastic:
        return ray.train.ScalingConfig(
            num_workers=trainer.num_workers, use_gpu=trainer.use_gpu, resources_per_worker=resources
        )
    extra = {} if trainer.resize_check_s is None else {"elastic_resize_monitor_interval_s": trainer.resize_check_s}
    return ray.train.ScalingConfig(
        num_workers=(trainer.min_workers, trainer.max_workers),
        use_gpu=trainer.use_gpu,
        resources_per_worker=resources,
        **extra,
    )


def print_summary(cfg: Config, summary: dict) -> None:
    unit_key = cfg.eval.unit.replace("/", "_per_")
    lines = [f"\n[bfn] run {cfg.run.name!r} finished at step {summary.get('step')}"]
    if "val/nll_bits_per_dim" in summary:
        subword = cfg.data.name == "text_bpe"  # a dim is a token; bits/char is its own unit then
        per_dim = "bits/token" if subword else "bits/char" if cfg.eval.unit == "bits/char" else "bits/dim"
        digits = 4 if subword else 2  # bits/char beside bits/token; nats/image beside bits/dim
        lines.append(
            f"  validation NLL: {summary['val/nll_bits_per_dim']:.4f} ± "
            f"{summary['val/nll_bits_per_dim_se']:.4f} {per_dim}"
            + (
                f", {summary[f'val/nll_{unit_key}']:.{digits}f} ± {summary[f'val/nll_{unit_key}_se']:.{digits}f} "
                f"{cfg.eval.unit}"
                if cfg.eval.unit not in ("bits/dim", "nats/dim") and (subword or cfg.eval.unit != "bits/char")
                else ""
            )
        )
    if "val/loss" in summary:
        lines.append(f"  validation continuous-time loss: {summary['val/loss']:.4f} nats/dim")
    if summary.get("run_dir"):
        lines.append(f"  samples and curves: {summary['run_dir']}")
    lines.append(f"  checkpoint: {summary.get('checkpoint')}")
    if cfg.tracking.enabled and summary.get("mlflow_run_id"):
        uri = mask_text(cfg.tracking.uri)  # never print credentials inside the URI
        if uri.startswith("sqlite"):
            lines.append(f"  browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        else:
            lines.append(f"  browse: {uri}")
        lines.append(f"  MLflow run id: {summary['mlflow_run_id']}")
    print("\n".join(lines), flush=True)

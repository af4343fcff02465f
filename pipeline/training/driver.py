"""`bfn train`: validate the config and data, start (or join) Ray, run the TorchTrainer.

Order matters: every check that can fail on bad input (config values, shards, manifest) runs
before Ray starts, so a mistake costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pipeline import data as data_lib
from pipeline.config import Config, flatten, set_env_defaults
from pipeline.tracking import MASK, SECRET_VALUE, MLflowTracker, git_sha

log = logging.getLogger(__name__)

def preflight(cfg: Config) -> dict:
    """Check the prepared shards (manifest, files, checksums, schema, value ranges) of train and val."""
    manifest = data_lib.verify(cfg.data.uri, splits=["train", "val"])
    if manifest.get("dataset") not in (None, cfg.data.name):
        raise data_lib.DataError(
            f"data.uri {cfg.data.uri} holds {manifest.get('dataset')!r}, but data.name is "
            f"{cfg.data.name!r}"
        )
    data_lib.check_values(cfg.data.uri, manifest, ["train", "val"])
    return manifest


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    set_env_defaults()
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded, loopback-only runtime
    ray.init(num_cpus=cfg.run.ray_num_cpus, object_store_memory=768 * 1024**2,
             include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)  # fmt: skip


def storage(cfg: Config):
    """(storage_path, storage_filesystem) for Ray Train.

    With a custom S3 endpoint in the environment (AWS_ENDPOINT_URL, e.g. MinIO or moto), an
    explicit pyarrow filesystem carries the endpoint and credentials to the controller and
    workers, which may have been started before the variables were set. Ray then wants the path
    without its scheme.
    """
    from urllib.parse import urlparse

    path = cfg.run.storage_path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not (path.startswith("s3://") and endpoint):
        return path, None
    from pyarrow import fs

    url = urlparse(endpoint)
    filesystem = fs.S3FileSystem(
        endpoint_override=url.netloc, scheme=url.scheme or "http",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )  # fmt: skip
    return path[len("s3://") :], filesystem


def local_run_dir(cfg: Config) -> str | None:
    """Where rank 0 writes sample grids and curves (also logged to MLflow)."""
    if "://" in cfg.run.storage_path:
        return str(Path(cfg.paths.runs_dir) / "outputs" / cfg.run.name)
    return str(Path(cfg.run.storage_path) / cfg.run.name / "outputs")


def start_tracking(cfg: Config, num_parameters: int, manifest: dict) -> str | None:
    if not cfg.tracking.enabled:
        return None
    try:
        tracker = MLflowTracker.start(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
            artifact_location=cfg.tracking.artifact_location,
        )  # fmt: skip
    except Exception as error:  # tracking must never stop training
        print(f"[bfn] warning: MLflow unavailable ({type(error).__name__}: "
              f"{SECRET_VALUE.sub(MASK, str(error))}); training continues without tracking",
              file=sys.stderr)  # fmt: skip
        return None
    tracker.log_params(flatten(cfg.raw))
    describe_run(tracker, manifest)
    tracker.set_tags({
        "git_sha": git_sha(), "dataset": cfg.data.name, "num_parameters": num_parameters,
        "net": cfg.net.name, "flow.kind": cfg.flow.kind,
        "dataset.train_rows": manifest["splits"]["train"]["rows"],
        "nll_n": "inf" if cfg.eval.nll_steps == 0 else cfg.eval.nll_steps,
    })  # fmt: skip
    return tracker.run_id


def describe_run(tracker: MLflowTracker, manifest: dict) -> None:
    """What the MLflow UI shows about the run: a model-training experiment (not the GenAI
    "evaluation runs" view), the run's source and commit, and the data manifest as an artifact."""
    import json
    import tempfile

    sha = git_sha()
    try:
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        tracker.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except Exception as error:  # tracking must never stop training
        log.warning("MLflow: could not mark the experiment as model training (%s)", type(error).__name__)
    tracker.set_tags({"mlflow.source.type": "LOCAL", "mlflow.source.name": "bfn train",
                      **({"mlflow.source.git.commit": sha} if sha != "unknown" else {})})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bfn-manifest-") as folder:
        path = Path(folder) / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2))
        tracker.log_artifact(path, "data")


def fit(cfg: Config, *, callbacks: list | None = None) -> dict:
    """Run (or resume) the training run ``cfg.run.name``; returns rank 0's summary.

    ``callbacks``: extra Ray Train callbacks (``bfn tune`` passes a ``TuneReportCallback``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from bfn.networks import count_parameters
    from pipeline.training.build import build_model
    from pipeline.training.worker import train_fn_per_worker

    manifest = preflight(cfg)
    import torch

    with torch.device("meta"):
        num_parameters = count_parameters(build_model(cfg).net)
    init_ray(cfg)
    import ray.data

    # blocks reach the workers in a fixed order, so a seeded launch sees the same batches
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    seed = cfg.trainer.seed
    seq_len = cfg.data.seq_len if cfg.data.name == "text8" else None
    datasets = {
        "train": data_lib.ray_dataset(cfg.data.uri, "train", cfg.data.name, num_bins=cfg.data.num_bins,
                                      fraction=cfg.data.fraction, seed=seed, seq_len=seq_len),
        "val": data_lib.ray_dataset(cfg.data.uri, "val", cfg.data.name, num_bins=cfg.data.num_bins,
                                    seed=seed + 1, seq_len=seq_len),
    }  # fmt: skip
    run_id = start_tracking(cfg, num_parameters, manifest)
    run_dir = local_run_dir(cfg)
    storage_path, storage_filesystem = storage(cfg)
    import logging

    runtime = {"mlflow_run_id": run_id, "local_run_dir": run_dir,
               "verbose": logging.getLogger().isEnabledFor(logging.DEBUG)}  # fmt: skip
    loop_config = {"config": cfg.raw, "runtime": runtime}
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )  # fmt: skip
    result = trainer.fit()
    summary = dict(result.return_value or {})
    summary.update({"run_name": cfg.run.name, "mlflow_run_id": run_id,
                    "checkpoint": result.checkpoint.path if result.checkpoint else None,
                    "storage": result.path})  # fmt: skip
    if run_id and summary.get("checkpoint"):
        tracker = MLflowTracker(cfg.tracking.uri, run_id)
        tracker.set_tags({"final_checkpoint": summary["checkpoint"]})
    return summary


def print_summary(cfg: Config, summary: dict) -> None:
    unit_key = cfg.eval.unit.replace("/", "_per_")
    lines = [f"\n[bfn] run {cfg.run.name!r} finished at step {summary.get('step')}"]
    if "val/nll_bits_per_dim" in summary:
        lines.append(
            f"  validation NLL: {summary['val/nll_bits_per_dim']:.4f} ± "
            f"{summary['val/nll_bits_per_dim_se']:.4f} bits/dim"
            + (f", {summary[f'val/nll_{unit_key}']:.2f} ± {summary[f'val/nll_{unit_key}_se']:.2f} "
               f"{cfg.eval.unit}" if cfg.eval.unit not in ("bits/dim", "nats/dim") else "")
        )  # fmt: skip
    if "val/loss" in summary:
        lines.append(f"  validation continuous-time loss: {summary['val/loss']:.4f} nats/dim")
    if summary.get("run_dir"):
        lines.append(f"  samples and curves: {summary['run_dir']}")
    lines.append(f"  checkpoint: {summary.get('checkpoint')}")
    if cfg.tracking.enabled and summary.get("mlflow_run_id"):
        uri = SECRET_VALUE.sub(MASK, cfg.tracking.uri)  # never print credentials inside the URI
        if uri.startswith("sqlite"):
            lines.append(f"  browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        else:
            lines.append(f"  browse: {uri}")
        lines.append(f"  MLflow run id: {summary['mlflow_run_id']}")
    print("\n".join(lines), flush=True)

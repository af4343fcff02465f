"""The driver's MLflow run of a fit: opened (or resumed) before the TorchTrainer starts, closed after it.

Rank 0 logs the training metrics into the same run from its worker (``pipeline.tracking``); what the
driver logs here is the run's description: its config, tags, data manifest, final checkpoint and, once
the run finished, its final EMA weights as an MLflow model (``log_final_model``).
Tracking never stops training: an unreachable server is a warning and a run without tracking.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from pipeline.config import Config, flatten
from pipeline.evaluation import models
from pipeline.secrets import mask_text, plain_http_to_remote
from pipeline.tracking import MLflowTracker, RunInUseError, git_sha
from pipeline.training.lease import Lease, LeaseError, describe

log = logging.getLogger(__name__)


def start_tracking(
    cfg: Config, num_parameters: int, manifest: dict, lease: Lease | None = None, *, resume: bool = True
) -> MLflowTracker | None:
    """Open the run's MLflow run (``MLflowTracker.start``: matched by name and, with ``lease``, run folder;
    ``resume``: the folder holds a checkpoint to continue) and log its config, tags and data manifest.
    The tracker's queued calls are delivered or counted at the end (``end_tracking``)."""
    if not cfg.tracking.enabled:
        return None
    if plain_http_to_remote(cfg.tracking.uri) and (
        "@" in cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_TOKEN") or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    ):
        log.warning(
            "tracking.uri %s is plain http to another host: its credentials travel unencrypted; use https",
            mask_text(cfg.tracking.uri),
        )
    owner = {"holder": describe(lease.holder), "run_folder": lease.run_folder} if lease else None
    try:
        tracker = MLflowTracker.start(
            cfg.tracking.uri,
            cfg.tracking.experiment,
            cfg.run.name,
            artifact_location=cfg.tracking.artifact_location,
            owner=owner,
            resume=resume,
        )
    except RunInUseError as error:
        raise LeaseError(str(error)) from None
    except Exception as error:  # tracking must never stop training
        log.warning(
            "MLflow unavailable (%s: %s); training continues without tracking",
            type(error).__name__,
            mask_text(str(error)),
        )
        return None
    tracker.log_params(flatten(cfg.raw))
    describe_run(tracker, manifest)
    tracker.set_tags(
        {
            "git_sha": git_sha(),
            "dataset": cfg.data.name,
            "num_parameters": num_parameters,
            "net": cfg.net.name,
            "flow.kind": cfg.flow.kind,
            "dataset.train_rows": manifest["splits"]["train"]["rows"],
            "nll_n": "inf" if cfg.eval.nll_steps == 0 else cfg.eval.nll_steps,
        }
    )
    return tracker


def log_final_model(cfg: Config, tracker: MLflowTracker | None, checkpoint) -> str | None:
    """A finished run's final EMA weights as its MLflow model (``pipeline.evaluation.models``), from its
    last checkpoint (a ``ray.train.Checkpoint``, local or remote); the model id, or None."""
    if tracker is None or checkpoint is None:
        return None
    return models.log_checkpoint_model(cfg.tracking.uri, tracker.run_id, checkpoint.filesystem, checkpoint.path)


def end_tracking(tracker: MLflowTracker | None, summary: dict) -> dict:
    """The driver's last MLflow calls: the final checkpoint as a tag, then what is still queued is
    delivered or counted and reported (added to the summary's ``tracking_lost_*``). The run's status
    is rank 0's to set (a sweep closes the runs Tune stopped)."""
    if tracker is None:
        return summary
    if summary.get("checkpoint"):
        tracker.set_tags({"final_checkpoint": summary["checkpoint"]})
    tracker.finish(status=None)
    summary["tracking_lost_points"] = summary.get("tracking_lost_points", 0) + tracker.lost_points
    summary["tracking_lost_calls"] = summary.get("tracking_lost_calls", 0) + tracker.lost_calls
    return summary


def describe_run(tracker: MLflowTracker, manifest: dict) -> None:
    """What the MLflow UI shows about the run: a model-training experiment (not the GenAI
    "evaluation runs" view), the run's source and commit, and the data manifest as an artifact."""
    sha = git_sha()
    try:
        experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        tracker.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except Exception as error:  # tracking must never stop training
        log.warning("MLflow: could not mark the experiment as model training (%s)", type(error).__name__)
    tracker.set_tags(
        {
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "bfn train",
            **({"mlflow.source.git.commit": sha} if sha != "unknown" else {}),
        }
    )
    with tempfile.TemporaryDirectory(prefix="bfn-manifest-") as folder:
        path = Path(folder) / "manifest.json"
        path.write_text(json.dumps(manifest, indent=2))
        tracker.log_artifact(path, "data")

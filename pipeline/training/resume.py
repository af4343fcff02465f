"""The run folder of a fit, ``<run.storage_path>/<run.name>``: where it is, who may write it, what it resumes.

Before Ray starts, the driver takes the folder's lease (``claim_run``: one writer per run) and checks
that a rerun continues the same experiment from the folder's newest complete checkpoint, or that
``run.init_from`` names readable weights of the same model (``check_resume``). Ray Train gets the
folder's storage as ``storage``; rank 0's samples and curves go to ``local_run_dir``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, is_under, keys_marked
from pipeline.core import checkpointing
from pipeline.core import storage as core_storage
from pipeline.secrets import mask_text
from pipeline.training.lease import Lease, experiment_differences

log = logging.getLogger(__name__)
WEIGHT_KEYS = keys_marked("weights")  # what run.init_from must match


def storage(cfg: Config):
    """(storage_path, storage_filesystem) for Ray Train.

    With a custom S3 endpoint in the environment (AWS_ENDPOINT_URL, e.g. MinIO or moto), an
    explicit pyarrow filesystem carries the endpoint and credentials to the controller and
    workers, which may have been started before the variables were set. Ray then wants the path
    without its scheme.
    """
    path = cfg.run.storage_path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not (path.startswith("s3://") and endpoint):
        return path, None
    filesystem, path = core_storage.resolve(path)
    return path, filesystem


def local_run_dir(cfg: Config) -> str | None:
    """Where rank 0 writes sample grids and curves (also logged to MLflow)."""
    if "://" in cfg.run.storage_path:
        return str(Path(cfg.paths.runs_dir) / "outputs" / cfg.run.name)
    return str(Path(cfg.run.storage_path) / cfg.run.name / "outputs")


def run_folder(cfg: Config) -> str:
    """Ray Train's folder of this run: ``<run.storage_path>/<run.name>`` (path or URI)."""
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def check_resume(cfg: Config) -> tuple[Any, str] | None:
    """A rerun resumes only the same experiment (``lease.RESUMABLE``: what may change);
    ``run.init_from`` must be a readable checkpoint and is ignored once the run has its own.
    Returns (the run folder's pyarrow filesystem, the path on it of its newest complete checkpoint),
    or None when it has none."""
    filesystem, folder = core_storage.resolve(run_folder(cfg))
    found = checkpointing.latest_config(filesystem, folder)
    if found is None:
        if cfg.run.init_from:
            _check_init_from(cfg)
        return None
    path, saved = found
    if "://" in cfg.run.storage_path:  # pyarrow paths carry no scheme
        path = f"{cfg.run.storage_path.split('://')[0]}://{path}"
    if cfg.run.init_from:
        log.info("run %s resumes from its own checkpoint %s; run.init_from is ignored", cfg.run.name, path)
    differences = experiment_differences(saved, cfg.raw)
    if differences:
        listed = "; ".join(f"{key}: {mask_text(str(old))} -> {mask_text(str(new))}" for key, old, new in differences)
        raise ConfigError(
            f"run.name={cfg.run.name}: its checkpoint {path} is of a different experiment ({listed}). "
            f"Resuming would continue someone else's weights: use a new run.name, or start a new run from "
            f"these weights with run.init_from={path}"
        )
    return filesystem, found[0]


def _check_init_from(cfg: Config) -> None:

    try:
        saved = checkpointing.read_for_init(cfg.run.init_from, map_location="meta")["config"]
    except checkpointing.CheckpointError as error:
        raise ConfigError(f"run.init_from: {error}") from None
    # what the weights' shapes depend on (a schedule such as flow.beta_1 may change when fine-tuning)
    differences = [key for key, _, _ in experiment_differences(saved, cfg.raw) if is_under(key, WEIGHT_KEYS)]
    if differences:
        raise ConfigError(f"run.init_from: its weights are of another model ({', '.join(differences)} differ)")


def claim_run(cfg: Config) -> tuple[Lease, tuple[Any, str] | None]:
    """Take the run folder's lease (one writer per run) and check the resume; before Ray starts.
    Returns the lease and the newest complete checkpoint (``check_resume``)."""
    lease = Lease(run_folder(cfg)).acquire()
    try:
        return lease, check_resume(cfg)
    except BaseException:
        lease.release()
        raise

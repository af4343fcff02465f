"""`bfn train`: validate the config and data, start (or join) Ray, run the TorchTrainer.

Order matters: every check that can fail on bad input (config values, shards, manifest, a run
folder in use, a resume with a different experiment) runs before Ray starts, so a mistake costs
seconds, not a cluster allocation.

The embedded runtime (no ``run.ray_address``) listens on loopback only (``ray_env_at_entry``, set
by the CLI before anything imports ray), requires a token that is generated per runtime (a 0600
file in a private temporary folder, never printed; see ``secure_local_ray``), keeps its sessions
under a temp root only this user can enter (``ray_temp_root``) and never joins a cluster a
bootstrap file names (``ray.init(address="local")``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline import data as data_lib
from pipeline import logs
from pipeline.config import Config, ConfigError, flatten, is_under, keys_marked, set_env_defaults
from pipeline.secrets import mask_text, plain_http_to_remote, write_secret_file
from pipeline.tracking import MLflowTracker, RunInUseError, git_sha
from pipeline.training.lease import Lease, LeaseError, describe, experiment_differences

log = logging.getLogger(__name__)
WEIGHT_KEYS = keys_marked("weights")  # what run.init_from must match
# Ray then takes 127.0.0.1 as the node address: every service of a single-node runtime binds
# loopback (Linux default: the machine's routable address). Read when `ray` is first imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's sockets sit ~70 bytes below <root>/ray and a Unix socket path has at most 107
RAY_ROOT_MAX_LEN = 32
RAY_ROOT_BASE = Path("/tmp")  # where the default temp root, bfn-ray-<uid>, is made (short, like Ray's /tmp/ray)
_local_token_path: Path | None = None


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


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _local_token() -> Path:
    """This process's token file for embedded runtimes (one per process: Ray caches the token)."""
    global _local_token_path
    if _local_token_path is None or not _local_token_path.exists():
        import secrets

        folder = Path(tempfile.mkdtemp(prefix="bfn-ray-auth-"))  # mode 0700
        atexit.register(shutil.rmtree, folder, True)
        _local_token_path = write_secret_file(folder / "auth_token", secrets.token_hex(32))
    return _local_token_path


def secure_local_ray(cfg: Config) -> None:
    """Before an embedded Ray starts: token auth (RAY_AUTH_TOKEN_PATH, RAY_AUTH_MODE unset so that
    ``ray.init`` turns token mode on and reloads its settings) and loopback-only addresses. Call it
    before ``import ray`` for the loopback part; joining a cluster (run.ray_address) changes nothing."""
    if not (cfg.run.ray_address or _ray_running()):
        embedded_ray_env()


def ray_env_at_entry() -> None:
    """What every `bfn` command sets before anything imports ray: the quiet defaults and Ray's loopback
    node address (read once, when ray is imported). Joining a cluster is unaffected: a driver takes
    the address of the node it connects to."""
    set_env_defaults()
    _warn_if_ray_binds_the_network()
    os.environ[LOOPBACK_ENV] = "0"


def _ray_binds_loopback() -> bool:
    """Whether an embedded runtime started by this process binds loopback (the setting Ray read at import)."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        return "ray" not in sys.modules and os.environ.get(LOOPBACK_ENV) == "0"
    return not getattr(constants, "ENABLE_RAY_CLUSTER", True)


def _warn_if_ray_binds_the_network() -> None:
    if "ray" in sys.modules and not _ray_binds_loopback():
        log.warning("ray was imported before the embedded runtime was configured: its services may listen "
                    "on this machine's network address (token auth still applies)")  # fmt: skip


def ray_temp_root() -> Path:
    """The embedded runtime's temp root: $RAY_TMPDIR, else /tmp/bfn-ray-<uid>. A folder of this user that
    nobody else can enter: Ray makes the folders below it world-writable, and its sessions hold logs,
    sockets and Tune's local copy of a sweep's state (unpickled on resume). Short, for Unix sockets."""
    given = os.environ.get("RAY_TMPDIR")
    root = Path(given) if given else RAY_ROOT_BASE / f"bfn-ray-{os.getuid()}"
    what = f"RAY_TMPDIR={given}" if given else f"Ray's temp root {root}"
    if not root.is_absolute() or len(str(root)) > RAY_ROOT_MAX_LEN:
        raise ConfigError(f"{what}: Ray's temp root must be an absolute path of at most {RAY_ROOT_MAX_LEN} "
                          "characters (Ray's Unix sockets live below it; their paths are limited to 107 bytes)")
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700, parents=bool(given))
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} is not a folder (a symlink or a file): Ray's temp root must be a private folder")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{what} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): "
                          "Ray's temp root must be a private folder of this user; set RAY_TMPDIR to one")
    if stat.S_IMODE(info.st_mode) & 0o077:
        if given:
            raise ConfigError(f"{what} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}): Ray's "
                              "temp root must be private (chmod 700 it, or unset RAY_TMPDIR)")
        os.chmod(root, 0o700)  # our own folder, opened by someone's chmod: close it again
    return root


def embedded_ray_env() -> None:
    """The environment of a new embedded runtime (``secure_local_ray``; the test fixture too)."""
    _warn_if_ray_binds_the_network()
    os.environ[LOOPBACK_ENV] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torch's gloo connections between workers: loopback too
    # one machine is never drained by a cloud provider: the watcher would be one more process polling every 5 s
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # the controller sees a finished worker group at its next poll (default every 2 s): ~1.5 s less per fit,
    # no measurable cost to the steady state (docs/benchmarks.md)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_local_token())
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_AUTH_MODE", None)
    # its notice suggests opting out of token auth; the token here is generated, nothing to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def init_ray(cfg: Config) -> None:
    secure_local_ray(cfg)  # before ray is imported (nothing to do when joining a cluster or when Ray runs)
    import ray

    if ray.is_initialized():
        return
    set_env_defaults()
    quiet = logs.ray_init_kwargs()
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, **quiet)
    else:
        if not _ray_binds_loopback():
            raise RuntimeError(f"ray was imported before {LOOPBACK_ENV}=0 was set: an embedded runtime would "
                               "listen on this machine's network address (set it before importing ray)")
        root = ray_temp_root()
        os.environ["RAY_TMPDIR"] = str(root)  # Ray's workers and Tune look their temp folder up there too
        if os.environ.get("RAY_ADDRESS"):
            log.info("RAY_ADDRESS is set but run.ray_address is not: starting an embedded runtime "
                     "(run.ray_address=auto or run=cluster joins a cluster)")  # fmt: skip
        # "local": always a runtime of our own, never the cluster a bootstrap file names (a killed
        # `ray start` leaves one behind) nor RAY_ADDRESS; joining a cluster is what run.ray_address is for
        ray.init(address="local", num_cpus=cfg.run.ray_num_cpus, object_store_memory=768 * 1024**2,
                 include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 _temp_dir=str(root / "ray"), **quiet)  # fmt: skip
    logs.restore()


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
    filesystem = data_lib.s3_filesystem(path[len("s3://") :].split("/", 1)[0])
    return path[len("s3://") :], filesystem


def local_run_dir(cfg: Config) -> str | None:
    """Where rank 0 writes sample grids and curves (also logged to MLflow)."""
    if "://" in cfg.run.storage_path:
        return str(Path(cfg.paths.runs_dir) / "outputs" / cfg.run.name)
    return str(Path(cfg.run.storage_path) / cfg.run.name / "outputs")


def run_folder(cfg: Config) -> str:
    """Ray Train's folder of this run: ``<run.storage_path>/<run.name>`` (path or URI)."""
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def _run_filesystem(cfg: Config):
    """(pyarrow filesystem, path of the run folder on it)."""
    import pyarrow.fs

    path, filesystem = storage(cfg)
    if filesystem is None:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
    return filesystem, f"{path.rstrip('/')}/{cfg.run.name}"


def check_resume(cfg: Config) -> tuple[Any, str] | None:
    """A rerun resumes only the same experiment (``lease.RESUMABLE``: what may change);
    ``run.init_from`` must be a readable checkpoint and is ignored once the run has its own.
    Returns (the run folder's pyarrow filesystem, the path on it of its newest complete checkpoint),
    or None when it has none."""
    from pipeline.core import checkpointing

    filesystem, folder = _run_filesystem(cfg)
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
    from pipeline.core import checkpointing

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


def start_tracking(cfg: Config, num_parameters: int, manifest: dict, lease: Lease | None = None, *,
                   resume: bool = True) -> MLflowTracker | None:  # fmt: skip
    """Open the run's MLflow run (``MLflowTracker.start``: matched by name and, with ``lease``, run folder;
    ``resume``: the folder holds a checkpoint to continue) and log its config, tags and data manifest.
    The tracker's queued calls are delivered or counted at the end (``end_tracking``)."""
    if not cfg.tracking.enabled:
        return None
    if plain_http_to_remote(cfg.tracking.uri) and (
        "@" in cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_TOKEN") or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    ):
        log.warning("tracking.uri %s is plain http to another host: its credentials travel unencrypted; use https",
                    mask_text(cfg.tracking.uri))  # fmt: skip
    owner = {"holder": describe(lease.holder), "run_folder": lease.run_folder} if lease else None
    try:
        tracker = MLflowTracker.start(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name,
            artifact_location=cfg.tracking.artifact_location, owner=owner, resume=resume,
        )  # fmt: skip
    except RunInUseError as error:
        raise LeaseError(str(error)) from None
    except Exception as error:  # tracking must never stop training
        log.warning("MLflow unavailable (%s: %s); training continues without tracking",
                    type(error).__name__, mask_text(str(error)))  # fmt: skip
        return None
    tracker.log_params(flatten(cfg.raw))
    describe_run(tracker, manifest)
    tracker.set_tags({
        "git_sha": git_sha(), "dataset": cfg.data.name, "num_parameters": num_parameters,
        "net": cfg.net.name, "flow.kind": cfg.flow.kind,
        "dataset.train_rows": manifest["splits"]["train"]["rows"],
        "nll_n": "inf" if cfg.eval.nll_steps == 0 else cfg.eval.nll_steps,
    })  # fmt: skip
    return tracker


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
    secure_local_ray(cfg)  # before ray is imported
    lease, newest = claim_run(cfg)
    try:
        return _fit(cfg, lease, newest, callbacks)
    finally:
        lease.release()


def _fit(cfg: Config, lease: Lease, newest: tuple[Any, str] | None, callbacks: list | None) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from bfn.networks import count_parameters
    from pipeline.core.build import build_model
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
    tracker = start_tracking(cfg, num_parameters, manifest, lease, resume=newest is not None)
    run_id = tracker.run_id if tracker else None
    run_dir = local_run_dir(cfg)
    storage_path, storage_filesystem = storage(cfg)
    # the newest complete checkpoint, registered or not: a killed driver's workers write some it never registered
    found = ray.train.Checkpoint(newest[1], filesystem=newest[0]) if newest else None
    runtime = {"mlflow_run_id": run_id, "local_run_dir": run_dir, "verbose": logs.verbose(), "newest_checkpoint": found,
               "lease": lease.token}  # fmt: skip
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
            # Ray Train's own INFO lines (resources, worker groups, reports) only with -v
            logging_config=ray.train.LoggingConfig(log_level="INFO" if runtime["verbose"] else "WARNING"),
        ),
        datasets=datasets,
        # one worker reads the whole stream itself: no split coordinator actor to start and feed
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if cfg.trainer.num_workers > 1 else []),
    )  # fmt: skip
    try:
        result = trainer.fit()
    except BaseException:  # the driver's queued calls are delivered or counted even when the fit fails
        end_tracking(tracker, {})
        raise
    summary = dict(result.return_value or {})
    if summary.get("lease_lost") or lease.lost:  # another run took the folder over: this one stopped
        end_tracking(tracker, {})
        raise LeaseError(summary.get("lease_lost") or f"run folder {lease.run_folder}: the lease was taken over "
                         "by another run while this one trained")  # fmt: skip
    summary.update({"run_name": cfg.run.name, "mlflow_run_id": run_id,
                    "checkpoint": result.checkpoint.path if result.checkpoint else None,
                    "storage": result.path})  # fmt: skip
    return end_tracking(tracker, summary)


def print_summary(cfg: Config, summary: dict) -> None:
    unit_key = cfg.eval.unit.replace("/", "_per_")
    lines = [f"\n[bfn] run {cfg.run.name!r} finished at step {summary.get('step')}"]
    if "val/nll_bits_per_dim" in summary:
        per_dim = "bits/char" if cfg.eval.unit == "bits/char" else "bits/dim"  # one character is one dim
        lines.append(
            f"  validation NLL: {summary['val/nll_bits_per_dim']:.4f} ± "
            f"{summary['val/nll_bits_per_dim_se']:.4f} {per_dim}"
            + (f", {summary[f'val/nll_{unit_key}']:.2f} ± {summary[f'val/nll_{unit_key}_se']:.2f} "
               f"{cfg.eval.unit}" if cfg.eval.unit not in ("bits/dim", "nats/dim", "bits/char") else "")
        )  # fmt: skip
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

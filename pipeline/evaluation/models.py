"""Trained BFNs as MLflow models: logged when a run finishes, registered by sweeps, read back by `bfn eval`/`sample`.

A model is the pyfunc of ``pyfunc`` logged from code (``pyfunc_code.py``: nothing is pickled), named
``model`` in its run, with three artifacts: ``weights.pt`` (the final EMA state dict, read weights-only),
``config.json`` (the resolved config, secrets masked: ``load_context`` rebuilds the network from it) and,
for text, ``tokenizer.json`` (the vocabulary); its signature declares ``pyfunc.PARAMS``.

``bfn tune`` and ``bfn scaling run`` register their best run's model under the study's name with the
alias ``champion`` (``register_champion``). ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) is then
accepted wherever a checkpoint folder is (``read_registered``). Logging never stops a training: a
failure is a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline import data as data_lib
from pipeline.config import Config, compose
from pipeline.core import checkpointing
from pipeline.core.checkpointing import CheckpointError
from pipeline.data import TEXT8_ALPHABET
from pipeline.secrets import mask_config, mask_text

log = logging.getLogger(__name__)
MODEL_NAME = "model"  # the logged model's name in its run
CHAMPION = "champion"
CODE = Path(__file__).with_name("pyfunc_code.py")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?/?$")
# what a fresh environment needs to load the model, beside this project installed (bfn, pipeline)
REQUIREMENTS = ("torch", "numpy", "mlflow", "hydra-core", "omegaconf", "pyarrow", "pillow", "tokenizers")


def is_model_uri(text: str | Path) -> bool:
    return str(text).startswith("models:/")


def tracking_uri(overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The MLflow store a ``models:/`` URI is resolved in: ``tracking.uri`` of the default config
    (MLFLOW_TRACKING_URI, or the local store under runs/), with the ``tracking.*`` overrides given."""
    uri = compose([o for o in overrides if o.lstrip("+").startswith("tracking.")])["tracking"]["uri"]
    if not uri:
        raise CheckpointError("models:/ URIs need an MLflow store: set MLFLOW_TRACKING_URI or tracking.uri=...")
    return uri


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


@contextlib.contextmanager
def _process_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then put back (unset if it was)."""
    # lazy: as in log_model
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri exports its URI there, or deletes it
    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None if previous == env else previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _write_artifacts(folder: Path, weights: dict, config: dict) -> dict[str, str]:
    torch.save(weights, folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps(mask_config(config), indent=2, default=str))
    artifacts = {"weights": str(folder / "weights.pt"), "config": str(folder / "config.json")}
    if config["data"]["name"] == "text8":  # id i is the i-th character
        (folder / "tokenizer.json").write_text(json.dumps({"vocab": list(TEXT8_ALPHABET)}))
        artifacts["tokenizer"] = str(folder / "tokenizer.json")
    elif config["data"]["name"] == "text_bpe":  # the dataset's BPE (sha256-checked against its manifest)
        vocabulary = data_lib.vocabulary_of("text_bpe", config["data"]["uri"])
        (folder / "tokenizer.json").write_text(vocabulary.to_json())
        artifacts["tokenizer"] = str(folder / "tokenizer.json")
    return artifacts


def log_model(uri: str, run_id: str, weights: dict, config: dict, *, step: int = 0) -> str | None:
    """Log ``weights`` (a state dict) and ``config`` as the run's MLflow model; its model id, or None
    (with a warning) when MLflow failed."""
    # lazy: mlflow adds ~1.2 s to every `bfn` command, and only a finished run logs a model
    import mlflow

    from pipeline.evaluation import pyfunc  # lazy: imports mlflow at the top

    try:
        with tempfile.TemporaryDirectory(prefix="bfn-model-") as folder:
            artifacts = _write_artifacts(Path(folder), weights, config)
            with _process_tracking_uri(uri), warnings.catch_warnings():  # Model.log reads the process's URI
                # its advice to add an input example and type hints: the model takes params only, no input
                warnings.simplefilter("ignore", UserWarning)
                info = mlflow.models.Model.log(
                    artifact_path=None,
                    name=MODEL_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    step=step,
                    python_model=str(CODE),
                    artifacts=artifacts,
                    signature=pyfunc.signature(Config.from_dict(config)),
                    pip_requirements=_requirements(),
                )
    except Exception as error:  # tracking never stops training
        log.warning("MLflow: the run's model was not logged (%s: %s)", type(error).__name__, mask_text(str(error)))
        return None
    log.info("MLflow model %s logged in run %s (step %d)", info.model_id, run_id, step)
    return info.model_id


def log_checkpoint_model(uri: str, run_id: str, filesystem, path: str) -> str | None:
    """Log the EMA weights of the checkpoint at ``path`` (on ``filesystem``) as the run's model."""
    try:
        weights, config = checkpointing.read_model_at(filesystem, path)
    except CheckpointError as error:
        log.warning("MLflow: no model logged for run %s: checkpoint %s unreadable (%s)", run_id, path, error)
        return None
    return log_model(uri, run_id, weights, config, step=max(checkpointing.read_step(filesystem, path), 0))


def logged_model(client, run_id: str) -> str | None:
    """The id of the newest model (highest step) logged in the run, or None."""
    outputs = client.get_run(run_id).outputs
    found = sorted(outputs.model_outputs, key=lambda m: m.step) if outputs else []
    return found[-1].model_id if found else None


def register_champion(uri: str, name: str, run_id: str, checkpoint: tuple | None = None) -> int | None:
    """Register the run's model under ``name`` and point the alias ``champion`` at it; its version.
    A run whose model was never logged (Tune stops a trial at its last report) gets it logged first from
    ``checkpoint`` ((filesystem, path) of its final checkpoint). None, with a warning, on failure."""
    # lazy: as in log_model
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        model_id = logged_model(client, run_id)
        if model_id is None and checkpoint is not None:
            model_id = log_checkpoint_model(uri, run_id, *checkpoint)
        if model_id is None:
            log.warning("MLflow: run %s has no model to register as %s@%s", run_id, name, CHAMPION)
            return None
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with _process_tracking_uri(uri):  # the registry finds the logged model in the process's store
            found = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
        client.set_registered_model_alias(name, CHAMPION, found.version)
    except Exception as error:  # the study's results stand without a registered model
        log.warning("MLflow: could not register %s@%s (%s)", name, CHAMPION, mask_text(str(error)))
        return None
    log.info("registered model %s version %s (run %s) as models:/%s@%s", name, found.version, run_id, name, CHAMPION)
    return int(found.version)


def read_registered(model_uri: str, uri: str) -> tuple[dict, dict]:
    """(EMA weights, config) of a registered model, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``;
    the weights read weights-only. CheckpointError naming the model and alias when it does not exist."""
    # lazy: as in log_model
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    match = MODEL_URI.match(str(model_uri))
    if not match or not (match["alias"] or match["version"]):
        raise CheckpointError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match["name"], match["alias"], match["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        which = f"alias {alias!r}" if alias else f"version {number}"
        raise CheckpointError(
            f"{model_uri}: the registry at {mask_text(uri)} has no model {name!r} with {which} "
            f"({error.error_code}); `bfn tune` and `bfn scaling run` register their best run as NAME@{CHAMPION}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="bfn-model-") as folder, _process_tracking_uri(uri):
        # the version's source (models:/<model id>) is looked up in the process's store
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=folder, tracking_uri=uri, registry_uri=uri)
        paths = Model.load(local).flavors["python_function"]["artifacts"]
        weights = checkpointing.load_tensors(Path(local) / paths["weights"]["path"])
        config = json.loads((Path(local) / paths["config"]["path"]).read_text())
    return weights, config

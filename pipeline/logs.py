"""How bfn talks to a person: one line per event through ``logging``; libraries only with -v."""

from __future__ import annotations

import logging
import os
from pathlib import Path

QUIET_LIBRARIES = ("ray", "mlflow", "alembic", "botocore", "filelock", "matplotlib")
_configured: dict = {}  # {"verbose": bool} once the CLI has set up logging; library use is left alone


def verbose() -> bool:
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure(verbose: bool) -> None:
    """Root logging for the driver: ``[bfn] message`` at INFO (with levels and DEBUG under -v)."""
    _configured["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="[bfn] %(levelname)s %(message)s" if verbose else "[bfn] %(message)s",
        force=True,
    )
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # urllib3 warns on every retry of a request whose failure bfn reports itself, in one line
    logging.getLogger("urllib3").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:  # read by MLflow and Ray Data here and in every Ray process started after this
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # Ray's own, in its actors
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).parent / "conf" / "ray_data_logging.yaml"))


def ray_init_kwargs() -> dict:
    """``ray.init`` arguments that keep Ray's INFO lines (driver, Train controller, workers) out
    of a person's terminal unless -v, when the CLI owns logging; the worker then sets up its own
    progress logging."""
    import ray  # lazy: every command configures logging, and those without Ray never import it

    if not _configured or _configured["verbose"]:
        return {}
    return {"logging_level": logging.WARNING, "logging_config": ray.LoggingConfig(log_level="WARNING")}


def restore() -> None:
    """Ray's logging config also reconfigures this process's root logger: put the CLI's back."""
    if _configured:
        configure(_configured["verbose"])

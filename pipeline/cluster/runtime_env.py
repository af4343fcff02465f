"""What a Ray Job of ``bfn submit`` carries: its environment variables and its code.

``job_env`` forwards settings (never credentials unless asked: Ray stores a job's runtime_env
where anyone holding the cluster token can read it; without ``--forward-credentials`` the
credentials inside a forwarded URL are stripped, with a warning naming the variable, and an
``--env`` credential is refused), ``check_overrides`` refuses credentials in the entrypoint,
``build_runtime_env`` chooses ``working_dir`` or ``image_uri``, and
``working_dir_size`` measures the upload with ``pathspec`` (the gitignore syntax Ray's excludes use).
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pathspec

from pipeline.secrets import credential_values, has_credential, is_secret_env_name, is_secret_key, strip_credentials

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Never shipped to the cluster (gitignored paths are skipped as well).
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "runs/",
    "outputs/",
    "data/shards/",
    ".git",  # a worktree's .git is a file
    "**/__pycache__/",
    ".pytest_cache/",
    ".hypothesis/",
    ".ruff_cache/",
    "*.egg-info/",
    "mlruns/",
    "mlflow.db",
    "*.pyc",
]
# Forwarded from the caller's environment when set: settings, no secrets.
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "BFN_STORAGE_PATH",
)  # Ray Train storage (s3://...), read by pipeline/conf/run/cluster.yaml
# Forwarded only with --forward-credentials.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SECRET_ENV = {*CREDENTIAL_ENV, "RAY_AUTH_TOKEN"}
JOB_ENV_DEFAULTS = {
    "PYTHONUNBUFFERED": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}  # quiet, unbuffered job logs
MAX_WORKING_DIR_BYTES = 90 * 2**20  # Ray refuses packages over 100 MiB


class SubmitError(RuntimeError):
    """A user-facing failure of ``bfn submit`` / ``bfn jobs``, shown as ``error: <message>``."""

    exit_code = 1


def _is_secret(key: str) -> bool:
    return key.upper() in SECRET_ENV or is_secret_env_name(key)


def _credential_refused(what: str) -> SubmitError:
    return SubmitError(
        f"{what} carries a credential, and Ray stores the job's env_vars where anyone holding the "
        "cluster token can read them: pass --forward-credentials to send it anyway, or better, give "
        "the cluster its own credentials (instance profile / IRSA)"
    )


def job_env(
    extra: Iterable[str] = (), forward_credentials: bool = False, environ: dict | None = None
) -> tuple[dict[str, str], list[str]]:
    """env_vars for the job, and the secret values among them (to mask in anything printed).

    Without ``forward_credentials`` a forwarded setting loses the credentials inside it (a URL's
    ``user:password@``, a ``?token=``; a warning names the variable) and ``--env`` refuses one."""
    environ = dict(os.environ if environ is None else environ)
    keys = list(FORWARD_ENV) + (list(CREDENTIAL_ENV) if forward_credentials else [])
    env = dict(JOB_ENV_DEFAULTS)
    env.update({key: environ[key] for key in keys if environ.get(key)})
    known = [found for key in FORWARD_ENV for found in credential_values(environ.get(key) or "")]
    for key in [] if forward_credentials else [k for k in FORWARD_ENV if k in env and has_credential(env[k])]:
        stripped = strip_credentials(env[key])
        if has_credential(stripped):  # a credential outside a URL's userinfo and query: nothing to send
            del env[key]
        else:
            env[key] = stripped
        log.warning(
            "%s holds credentials: %s, since Ray stores a job's env_vars where anyone holding the cluster "
            "token can read them; pass --forward-credentials to send them",
            key,
            "not forwarded" if key not in env else "forwarded without them",
        )
    for item in extra:
        key, sep, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: expected KEY or KEY=VALUE")
        if key.startswith("RAY_AUTH"):
            raise SubmitError(f"--env {key}: the cluster's auth settings are not job settings")
        if not sep and environ.get(key) is None:
            raise SubmitError(f"--env {key}: not set in this environment")
        value = value if sep else environ[key]
        if not forward_credentials and (_is_secret(key) or has_credential(value)):
            raise _credential_refused(f"--env {key}")
        env[key] = value
    known += [value for key, value in env.items() if _is_secret(key)]
    known += [found for value in env.values() for found in credential_values(value)]
    return env, [value for value in known if value]


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override that carries a credential: the entrypoint is stored with the job."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if has_credential(value) or (is_secret_key(key) and value):
            raise SubmitError(
                f"override {key}: carries a credential, and Ray stores the entrypoint with the job (readable by "
                "anyone holding the cluster token). Put it in the environment instead (MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, AWS_*) and pass --forward-credentials, or "
                "better, give the cluster its own credentials (instance profile / IRSA)"
            )


def pip_requirements(path: str | None) -> list[str]:
    """Requirement lines from ``path``, or the project's own (dependencies + [pipeline])."""
    if path:
        lines = Path(path).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*meta.get("dependencies", []), *meta.get("optional-dependencies", {}).get("pipeline", [])]
    # Ray itself must already be on the cluster (same version); pip must not replace it.
    return [r for r in requirements if not r.replace(" ", "").lower().startswith(("ray[", "ray="))]


def working_dir_size(root: Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes that would be uploaded from ``root`` (excludes + .gitignore), per top-level entry."""
    patterns = list(excludes)
    gitignore = root / ".gitignore"
    if gitignore.is_file():
        patterns += gitignore.read_text().splitlines()
    spec = pathspec.GitIgnoreSpec.from_lines(patterns)  # the syntax of Ray's excludes and .gitignore
    total, per_top = 0, {}
    for dirpath, dirnames, filenames in os.walk(root):
        relative = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not spec.match_file(f"{relative / d}/")]
        for name in filenames:
            path = relative / name
            if spec.match_file(str(path)):
                continue
            try:
                size = (Path(dirpath) / name).stat().st_size
            except OSError:
                continue
            total += size
            per_top[path.parts[0]] = per_top.get(path.parts[0], 0) + size
    return total, per_top


def check_working_dir_size(root: Path, excludes: list[str]) -> int:
    total, per_top = working_dir_size(root, excludes)
    if total > MAX_WORKING_DIR_BYTES:
        listing = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(per_top.items(), key=lambda kv: -kv[1])[:5])
        raise SubmitError(
            f"working_dir {root} would upload {total / 2**20:.0f} MiB (Ray's limit is about "
            f"{MAX_WORKING_DIR_BYTES // 2**20} MiB); largest: {listing}. Add --exclude PATTERN, or put "
            "data on S3 / in the image (--image)"
        )
    return total


def build_runtime_env(
    env_vars: dict[str, str],
    image: str | None = None,
    pip: list[str] | None = None,
    working_dir: Path = REPO_ROOT,
    extra_excludes: Iterable[str] = (),
) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if image:
        if pip:
            raise SubmitError(
                "--image and --pip-requirements cannot be combined (Ray's image_uri only allows "
                "env_vars); bake the requirements into the image"
            )
        runtime_env["image_uri"] = image
    else:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = [*WORKING_DIR_EXCLUDES, *extra_excludes]
        if pip:
            runtime_env["pip"] = pip
    return runtime_env

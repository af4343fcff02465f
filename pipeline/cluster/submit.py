"""Submit ``bfn`` runs to a Ray cluster as Ray Jobs, and list / follow / stop them.

    bfn submit train experiment=smoke --address http://127.0.0.1:8265 \\
        [--image IMG | --pip-requirements | --requirements-file FILE] [--no-wait]
    bfn jobs list --address URL
    bfn jobs logs <job id> --address URL [--follow]
    bfn jobs stop <job id> --address URL

The job runs ``python -m pipeline.cli <kind> <overrides...>`` on the cluster. Its runtime_env:

* ``working_dir``: this repository (minus .venv, runs/, data/shards, .git, caches), unless
  ``--image`` is given: Ray's ``image_uri`` cannot be combined with ``working_dir`` and the image
  already contains the project (infra/docker/Dockerfile).
* ``env_vars``: MLflow / S3 settings and AWS credentials taken from the caller's environment
  (``--no-forward-credentials`` keeps the AWS keys at home, for clusters with an instance profile).
  Only key names are printed; every forwarded secret value is masked in anything this module prints.
  Note that Ray stores the runtime_env with the job: anyone holding the cluster token can read it.

Token auth (Ray 2.60) -- the token is found the way Ray's own clients find it:
``RAY_AUTH_TOKEN`` (the value), else ``RAY_AUTH_TOKEN_PATH`` (a file), else ``~/.ray/auth_token``,
and sent as ``Authorization: Bearer <token>``. Before anything else the address is probed on
the public ``/api/authentication_mode`` endpoint with a short timeout, which gives a fast error
naming the address when it is unreachable, and a clear "missing token" error when the cluster
wants one.

Each registered subcommand sets ``func=`` on its parser; ``func(args)`` returns 0 on success and
raises ``SystemExit(code)`` (after printing ``error: ...`` to stderr) on failure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("train", "tune", "scaling", "eval")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never shipped to the cluster (gitignored paths are skipped by Ray as well).
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "runs/",
    "outputs/",
    "data/shards/",
    ".git/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".hypothesis/",
    ".ruff_cache/",
    "*.egg-info/",
    "mlruns/",
    "mlflow.db",
    "*.pyc",
]
# Forwarded from the caller's environment when set. Values are printed as key names only.
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "BFN_STORAGE_PATH",  # Ray Train storage (s3://...), read by pipeline/conf/run/cluster.yaml
)
# Config groups a job on a cluster needs (pipeline/conf): join the cluster and keep checkpoints on
# shared storage; log to the MLflow server (artifacts proxied by it). Added unless overridden.
CLUSTER_DEFAULTS = {"run": "cluster", "tracking": "mlflow_server"}
CLUSTER_DEFAULT_KINDS = ("train", "tune", "scaling")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_ENV = {
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
}
# Quiet, unbuffered job logs.
JOB_ENV_DEFAULTS = {
    "PYTHONUNBUFFERED": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
DEFAULT_CONNECT_TIMEOUT = 5.0
MAX_WORKING_DIR_BYTES = 90 * 2**20  # Ray refuses packages over 100 MiB


class SubmitError(RuntimeError):
    """A user-facing failure; the message is printed as ``error: <message>``."""

    exit_code = 1


class UnreachableError(SubmitError):
    exit_code = 3


class MissingTokenError(SubmitError):
    exit_code = 4


# --------------------------------------------------------------------------- secrets


class Masker:
    """Replaces every known secret value with ``****`` in text that is about to be printed."""

    def __init__(self, values: Iterable[str | None] = ()):
        self._values = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    def add(self, value: str | None) -> None:
        if value and len(value) >= 4 and value not in self._values:
            self._values = sorted([*self._values, value], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for v in self._values:
            text = text.replace(v, "****")
        return text


def _is_secret(key: str) -> bool:
    upper = key.upper()
    return upper in SECRET_ENV or any(w in upper for w in ("SECRET", "PASSWORD", "TOKEN", "KEY"))


# --------------------------------------------------------------------------- address + token


def resolve_address(address: str | None) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS; adds http://."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        env_addr = os.environ.get("RAY_ADDRESS", "")
        address = env_addr if env_addr.startswith(("http://", "https://")) else None
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HOST:PORT (the Ray dashboard / job API, "
            "8265 by default) or set RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def resolve_token() -> tuple[str | None, str]:
    """The cluster token and where it came from, in Ray 2.60's own order.

    ``RAY_AUTH_TOKEN`` > ``RAY_AUTH_TOKEN_PATH`` > ``~/.ray/auth_token``. Returns ``(None, reason)``
    when there is none. A set but unreadable/empty ``RAY_AUTH_TOKEN_PATH`` is an error, as in Ray.
    """
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return value, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_env:
        try:
            token = Path(path_env).expanduser().read_text().strip()
        except OSError as e:
            raise MissingTokenError(
                f"missing token: RAY_AUTH_TOKEN_PATH={path_env} cannot be read ({e.strerror})"
            ) from None
        if not token:
            raise MissingTokenError(f"missing token: RAY_AUTH_TOKEN_PATH={path_env} is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path_env}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, "no RAY_AUTH_TOKEN, no RAY_AUTH_TOKEN_PATH, no ~/.ray/auth_token"


def _missing_token_message(address: str) -> str:
    return (
        f"missing token: the Ray cluster at {address} has token authentication on, but no token "
        "was found. Set RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<file holding the token>, "
        "or put it in ~/.ray/auth_token (on the head node: `ray get-auth-token`; local stack: "
        "export RAY_AUTH_TOKEN_PATH=<stack dir>/auth_token, as printed by `bfn stack up`)"
    )


def probe(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> str:
    """Fast reachability check; returns the cluster's auth mode ("token", "disabled", "unknown")."""
    url = address + "/api/authentication_mode"
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:  # a Ray without token auth support
            return "unknown"
        if e.code in (401, 403):
            return "token"
        raise UnreachableError(
            f"Ray job API at {address} answered HTTP {e.code} on {url}; "
            "is this a Ray dashboard address?"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UnreachableError(
            f"cannot reach the Ray cluster at {address} within {timeout:.0f}s ({reason}). "
            "Is it up, and is this the dashboard/job API address (http://HOST:8265)? "
            "Local: `bfn stack up`; remote: open a tunnel first "
            "(`ray dashboard infra/ray/cluster.yaml`)."
        ) from None
    try:
        return str(json.loads(body).get("authentication_mode", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def connect(address: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT):
    """A ``JobSubmissionClient`` for ``address`` with the token header set, or a clear error."""
    address = resolve_address(address)
    mode = probe(address, timeout)
    token, _source = resolve_token()
    if mode == "token" and not token:
        raise MissingTokenError(_missing_token_message(address))
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        if "401" in str(e) or "Missing" in str(e):
            raise MissingTokenError(_missing_token_message(address)) from None
        raise SubmitError(
            f"the Ray cluster at {address} rejected the token from {_source} (HTTP 403): "
            "it is not this cluster's token"
        ) from None
    except ConnectionError as e:
        raise UnreachableError(f"cannot reach the Ray cluster at {address}: {e}") from None


# --------------------------------------------------------------------------- runtime env


def job_env(
    extra: Iterable[str] = (), forward_credentials: bool = True, environ: dict | None = None
) -> tuple[dict[str, str], Masker]:
    """env_vars for the job, and a masker that hides every secret value among them."""
    environ = dict(os.environ if environ is None else environ)
    keys = list(FORWARD_ENV) + (list(CREDENTIAL_ENV) if forward_credentials else [])
    env = dict(JOB_ENV_DEFAULTS)
    for key in keys:
        if environ.get(key):
            env[key] = environ[key]
    for item in extra:
        key, sep, value = item.partition("=")
        if not key:
            raise SubmitError(f"--env {item!r}: expected KEY or KEY=VALUE")
        if key.startswith("RAY_AUTH"):
            raise SubmitError(f"--env {key}: the cluster's auth settings are not job settings")
        if sep:
            env[key] = value
        elif environ.get(key) is not None:
            env[key] = environ[key]
        else:
            raise SubmitError(f"--env {key}: not set in this environment")
    masker = Masker(v for k, v in env.items() if _is_secret(k))
    # URIs may embed user:password@
    for v in env.values():
        parsed = urllib.parse.urlsplit(v) if "://" in v else None
        if parsed and parsed.password:
            masker.add(parsed.password)
    return env, masker


def pip_requirements(path: str | None) -> list[str]:
    """Requirement lines from ``path``, or the project's own (dependencies + [pipeline])."""
    if path:
        lines = Path(path).read_text().splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    reqs = [
        *meta.get("dependencies", []),
        *meta.get("optional-dependencies", {}).get("pipeline", []),
    ]
    # Ray itself must already be on the cluster (same version); pip must not replace it.
    return [
        r
        for r in reqs
        if not r.replace(" ", "").lower().startswith("ray[")
        and not r.replace(" ", "").lower().startswith("ray=")
    ]


def working_dir_size(root: Path, excludes: list[str]) -> tuple[int, dict[str, int]]:
    """Bytes that would be uploaded from ``root`` (excludes + .gitignore), per top-level entry."""
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray itself matches with

    patterns = list(excludes)
    gitignore = root / ".gitignore"
    if gitignore.is_file():
        patterns += gitignore.read_text().splitlines()
    spec = PathSpec.from_lines("gitwildmatch", patterns)
    total, per_top = 0, {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if not spec.match_file(f"{rel_dir / d}/")]
        for name in filenames:
            rel = rel_dir / name
            if spec.match_file(str(rel)):
                continue
            try:
                size = (Path(dirpath) / name).stat().st_size
            except OSError:
                continue
            total += size
            top = rel.parts[0]
            per_top[top] = per_top.get(top, 0) + size
    return total, per_top


def check_working_dir_size(root: Path, excludes: list[str]) -> int:
    total, per_top = working_dir_size(root, excludes)
    if total > MAX_WORKING_DIR_BYTES:
        biggest = sorted(per_top.items(), key=lambda kv: -kv[1])[:5]
        listing = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in biggest)
        raise SubmitError(
            f"working_dir {root} would upload {total / 2**20:.0f} MiB (Ray's limit is about "
            f"{MAX_WORKING_DIR_BYTES // 2**20} MiB); largest: {listing}. Add --exclude PATTERN, "
            "or put data on S3 / in the image (--image)"
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
                "--image and --pip-requirements cannot be combined (Ray's image_uri "
                "only allows env_vars); bake the requirements into the image"
            )
        runtime_env["image_uri"] = image
    else:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = [*WORKING_DIR_EXCLUDES, *extra_excludes]
        if pip:
            runtime_env["pip"] = pip
    return runtime_env


def with_cluster_defaults(kind: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` plus ``run=cluster tracking=mlflow_server`` where the user set neither."""
    if kind not in CLUSTER_DEFAULT_KINDS:
        return overrides, []
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    added = [
        f"{group}={choice}" for group, choice in CLUSTER_DEFAULTS.items() if group not in given
    ]
    return [*added, *overrides], added


def local_git_sha(root: Path) -> str | None:
    """HEAD of the checkout being uploaded (read-only ``git rev-parse``), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def entrypoint(kind: str, overrides: list[str]) -> str:
    return " ".join(["python", "-m", "pipeline.cli", kind, *(shlex.quote(o) for o in overrides)])


# --------------------------------------------------------------------------- waiting / logs


def follow(
    client, job_id: str, masker: Masker, timeout: float | None, poll: float = 2.0, out=sys.stdout
) -> str:
    """Print the job's new log output until it ends; return its final status (or "TIMEOUT")."""
    printed = 0
    deadline = None if not timeout else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id) or ""
        if len(logs) > printed:
            out.write(masker(logs[printed:]))
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline and time.monotonic() > deadline:
            return "TIMEOUT"
        time.sleep(poll)


def _fail(e: SubmitError, masker: Masker | None = None) -> None:
    msg = masker(str(e)) if masker else str(e)
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(e.exit_code)


def cmd_submit(args: argparse.Namespace) -> int:
    masker = Masker()
    try:
        env, masker = job_env(args.env or [], forward_credentials=not args.no_forward_credentials)
        pip = None
        if args.pip_requirements or args.requirements_file:
            pip = pip_requirements(args.requirements_file)
        runtime_env = build_runtime_env(
            env, image=args.image, pip=pip, working_dir=REPO_ROOT, extra_excludes=args.exclude or []
        )
        upload = 0
        if "working_dir" in runtime_env:
            # .git is not uploaded: tell the job which commit its code came from
            sha = local_git_sha(REPO_ROOT)
            if sha:
                env.setdefault("BFN_GIT_SHA", sha)
            upload = check_working_dir_size(
                Path(runtime_env["working_dir"]), runtime_env["excludes"]
            )
        overrides = [o for o in args.overrides if o != "--"]
        added: list[str] = []
        if not args.no_cluster_defaults:
            overrides, added = with_cluster_defaults(args.kind, overrides)
        ep = entrypoint(args.kind, overrides)
        address = resolve_address(args.address)
        t0 = time.monotonic()
        client = connect(address, args.connect_timeout)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        job_id = args.job_id or f"bfn-{args.kind}-{stamp}-{secrets.token_hex(3)}"
        print(f"submitting to {address}: {ep}")
        if added:
            print(f"  added for the cluster: {' '.join(added)} (--no-cluster-defaults to skip)")
        if "tracking=mlflow_server" in added and "MLFLOW_TRACKING_URI" not in env:
            print("  warning: MLFLOW_TRACKING_URI is not set here; the job uses the config's URI")
        print(
            "  code: "
            + (
                f"image {args.image}"
                if args.image
                else f"working_dir {REPO_ROOT} ({upload / 2**20:.1f} MiB)"
            )
            + (f" + pip ({len(pip)} requirements)" if pip else "")
        )
        print("  env_vars: " + ", ".join(sorted(env)) + " (values not shown)")
        from ray.exceptions import AuthenticationError

        try:
            job_id = client.submit_job(
                entrypoint=ep,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"bfn_kind": args.kind, "submitted_by": "bfn submit"},
            )
        except AuthenticationError as e:
            raise SubmitError(masker(str(e))) from None
        except RuntimeError as e:
            raise SubmitError(f"submission to {address} failed: {masker(str(e))}") from None
        print(f"submitted job {job_id} in {time.monotonic() - t0:.1f}s")
        follow_cmd = f"bfn jobs logs {job_id} --address {address} --follow"
        if args.no_wait:
            print(f"follow it:  {follow_cmd}")
            print(f"stop it:    bfn jobs stop {job_id} --address {address}")
            return 0
        print(f"following (Ctrl-C stops following, not the job; later: {follow_cmd})")
        try:
            status = follow(client, job_id, masker, args.timeout)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job keeps running. {follow_cmd}")
            return 0
        elapsed = time.monotonic() - t0
        if status == "SUCCEEDED":
            print(f"job {job_id} SUCCEEDED ({elapsed:.1f}s from submission)")
            return 0
        if status == "TIMEOUT":
            raise SubmitError(
                f"job {job_id} still running after --timeout {args.timeout:.0f}s; "
                f"follow: {follow_cmd}; stop: bfn jobs stop {job_id} --address {address}"
            )
        info = client.get_job_info(job_id)
        raise SubmitError(f"job {job_id} {status}: {masker(info.message or '')}")
    except SubmitError as e:
        _fail(e, masker)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    _env, masker = job_env(forward_credentials=True)
    try:
        client = connect(args.address, args.connect_timeout)
        if args.jobs_cmd == "list":
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
            print(f"{'SUBMISSION ID':40s} {'STATUS':10s} {'STARTED':19s} ENTRYPOINT")
            for j in jobs[: args.limit]:
                started = (
                    _dt.datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                    if j.start_time
                    else "-"
                )
                print(
                    f"{(j.submission_id or j.job_id or '-'):40s} {str(j.status.value):10s} "
                    f"{started:19s} {masker(j.entrypoint)[:80]}"
                )
        elif args.jobs_cmd == "logs":
            if args.follow:
                status = follow(client, args.job_id, masker, args.timeout)
                print(f"[job {args.job_id}: {status}]")
            else:
                sys.stdout.write(masker(client.get_job_logs(args.job_id) or ""))
        elif args.jobs_cmd == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id} {info.status.value} {masker(info.message or '')}")
        elif args.jobs_cmd == "stop":
            stopped = client.stop_job(args.job_id)
            print(
                f"stop requested for {args.job_id}" if stopped else f"{args.job_id} was not running"
            )
            if args.wait:
                deadline = time.monotonic() + args.timeout
                while str(client.get_job_status(args.job_id).value) not in TERMINAL:
                    if time.monotonic() > deadline:
                        raise SubmitError(
                            f"job {args.job_id} did not stop within {args.timeout:.0f}s"
                        )
                    time.sleep(1)
                print(f"{args.job_id} {client.get_job_status(args.job_id).value}")
    except RuntimeError as e:
        if not isinstance(e, SubmitError):
            e = SubmitError(masker(str(e)))
        _fail(e, masker)
    return 0


# --------------------------------------------------------------------------- CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="Ray job API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to wait for the address to answer (default %(default)s)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs {list,logs,status,stop}`` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "submit",
        help="run a bfn command on a Ray cluster as a Ray Job",
        description="Submit `python -m pipeline.cli <kind> <overrides>` as a Ray Job.",
    )
    p.add_argument("kind", choices=KINDS, help="what to run on the cluster")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke run.name=x")
    _common(p)
    code = p.add_mutually_exclusive_group()
    code.add_argument(
        "--image",
        default=None,
        help="container image with the project installed (runtime_env image_uri; "
        "no working_dir upload)",
    )
    code.add_argument(
        "--pip-requirements",
        action="store_true",
        help="pip-install the project's requirements (pyproject.toml, minus ray) on "
        "the workers (runtime_env pip)",
    )
    code.add_argument(
        "--requirements-file",
        default=None,
        metavar="FILE",
        help="like --pip-requirements, with the requirements from FILE",
    )
    p.add_argument(
        "--env",
        action="append",
        metavar="KEY[=VALUE]",
        help="extra env var for the job (repeatable; KEY alone copies it from here)",
    )
    p.add_argument(
        "--no-cluster-defaults",
        action="store_true",
        help="do not add run=cluster tracking=mlflow_server (train/tune/scaling) to the overrides",
    )
    p.add_argument(
        "--no-forward-credentials",
        action="store_true",
        help="do not forward AWS_ACCESS_KEY_ID/SECRET/SESSION (cluster has an instance profile)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="extra gitignore-style pattern to keep out of the working_dir upload (repeatable)",
    )
    p.add_argument(
        "--job-id", default=None, help="submission id (default bfn-<kind>-<time>-<rand>)"
    )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument(
        "--timeout",
        type=float,
        default=6 * 3600,
        help="seconds to follow the job before giving up (default %(default)s)",
    )
    p.set_defaults(func=cmd_submit)

    j = subparsers.add_parser("jobs", help="list / follow / stop Ray Jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True, metavar="{list,logs,status,stop}")
    lp = jsub.add_parser("list", help="jobs on the cluster, newest first")
    lp.add_argument("--limit", type=int, default=20)
    for name, help_ in (
        ("logs", "print (or --follow) a job's logs"),
        ("status", "a job's status"),
        ("stop", "stop a job"),
    ):
        sp = jsub.add_parser(name, help=help_)
        sp.add_argument("job_id")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true")
        if name == "stop":
            sp.add_argument("--wait", action="store_true", help="wait until it has stopped")
        if name in ("logs", "stop"):
            sp.add_argument("--timeout", type=float, default=6 * 3600 if name == "logs" else 60)
    for sp in (lp, *[jsub.choices[n] for n in ("logs", "status", "stop")]):
        _common(sp)
        sp.set_defaults(func=cmd_jobs)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m pipeline.cluster.submit submit ...`` (same as ``bfn submit``)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.submit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

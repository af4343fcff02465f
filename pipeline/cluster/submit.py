"""Submit ``bfn`` runs to a Ray cluster as Ray Jobs, and list / follow / stop them.

(Longer than 500 lines: `bfn submit` and `bfn jobs`, which share the job
client, the runtime environment and the credential checks.)

    bfn submit train experiment=smoke --address http://127.0.0.1:8265 \\
        [--image IMG | --pip-requirements | --requirements-file FILE] [--forward-credentials] [--no-wait]
    bfn jobs list --address URL
    bfn jobs logs <job id> --address URL [--follow]
    bfn jobs stop <job id> --address URL

The job runs ``python -m pipeline.cli <kind> <overrides...>`` on the cluster, through Ray's public
job SDK (``ray.job_submission.JobSubmissionClient``). Its runtime_env:

* ``working_dir``: this repository (minus .venv, runs/, data/shards, .git, caches; matched with
  ``pathspec`` as Ray does), unless ``--image`` is given: Ray's ``image_uri`` cannot be combined
  with ``working_dir`` and the image already contains the project (infra/docker/Dockerfile).
* ``env_vars``: MLflow / S3 settings from the caller's environment. Credentials (AWS keys, MLflow
  password or token, the ``user:pass@`` or ``?token=`` inside a forwarded URL, an ``--env``
  credential) only with ``--forward-credentials``: Ray stores the runtime_env with the job, where
  anyone holding the cluster token can read them; clusters should use instance profiles / IRSA.
  Without the flag a forwarded URL goes without its credentials (a warning names the variable)
  and an ``--env`` credential is refused. An override that carries a credential (userinfo or a
  secret query parameter in a URI, an AWS key, a secret-looking key) is refused even with the
  flag: the entrypoint is stored with the job too, and shown by ``bfn jobs list``.

Token auth (Ray 2.60) -- the token is found the way Ray's own clients find it:
``RAY_AUTH_TOKEN`` (the value), else ``RAY_AUTH_TOKEN_PATH`` (a file), else ``~/.ray/auth_token``,
and sent as ``Authorization: Bearer <token>``; never to a plain-http address other than loopback
unless ``--allow-plain-http`` (it would cross the network in clear). Before anything else the
address is probed on the public ``/api/authentication_mode`` endpoint with a short timeout, which
gives a fast error naming the address when it is unreachable, and a clear "missing token" error.

Each registered subcommand sets ``func=`` on its parser; ``func(args)`` returns 0 on success and
raises ``SystemExit(code)`` (after logging ``error: ...``) on failure. Everything printed is masked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cluster.runtime_env import (  # noqa: F401 (part of this command's interface)
    CREDENTIAL_ENV,
    MAX_WORKING_DIR_BYTES,
    WORKING_DIR_EXCLUDES,
    SubmitError,
    build_runtime_env,
    check_overrides,
    check_working_dir_size,
    job_env,
    pip_requirements,
    working_dir_size,
)
from pipeline.secrets import (
    has_credential,
    install_log_masking,
    mask_text,
    plain_http_to_remote,
    register_environment,
)
from pipeline.secrets import register as register_secret

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("train", "tune", "scaling", "eval")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Config groups a job on a cluster needs (pipeline/conf): join the cluster and keep checkpoints on
# shared storage; log to the MLflow server (artifacts proxied by it). Added unless overridden.
CLUSTER_DEFAULTS = {"run": "cluster", "tracking": "mlflow_server"}
CLUSTER_DEFAULT_KINDS = ("train", "tune", "scaling")

DEFAULT_CONNECT_TIMEOUT = 5.0


class UnreachableError(SubmitError):
    exit_code = 3


class MissingTokenError(SubmitError):
    exit_code = 4


# --------------------------------------------------------------------------- address + token


def resolve_address(address: str | None) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS; adds http://."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        env_address = os.environ.get("RAY_ADDRESS", "")
        address = env_address if env_address.startswith(("http://", "https://")) else None
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
        except OSError as error:
            raise MissingTokenError(
                f"missing token: RAY_AUTH_TOKEN_PATH={path_env} cannot be read ({error.strerror})"
            ) from None
        if not token:
            raise MissingTokenError(f"missing token: RAY_AUTH_TOKEN_PATH={path_env} is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path_env}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "no RAY_AUTH_TOKEN, no RAY_AUTH_TOKEN_PATH, no ~/.ray/auth_token"


def _missing_token_message(address: str) -> str:
    return (
        f"missing token: the Ray cluster at {address} has token authentication on, but no token was found. "
        "Set RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<file holding the token>, or put it in "
        "~/.ray/auth_token (on the head node: `ray get-auth-token`; local stack: export "
        "RAY_AUTH_TOKEN_PATH=<stack dir>/auth_token, as printed by `bfn stack up`)"
    )


def probe(address: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> str:
    """Fast reachability check on Ray's public ``/api/authentication_mode`` (the job SDK itself
    waits much longer on a dead address); returns "token", "disabled" or "unknown"."""
    url = address + "/api/authentication_mode"
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:  # a Ray without token auth support
            return "unknown"
        if error.code in (401, 403):
            return "token"
        raise UnreachableError(
            f"Ray job API at {address} answered HTTP {error.code} on {url}; is this a Ray dashboard address?"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise UnreachableError(
            f"cannot reach the Ray cluster at {address} within {timeout:.0f}s ({getattr(error, 'reason', error)}). "
            "Is it up, and is this the dashboard/job API address (http://HOST:8265)? Local: `bfn stack up`; "
            "remote: open a tunnel first (`ray dashboard infra/ray/cluster.yaml`)."
        ) from None
    try:
        return str(json.loads(body).get("authentication_mode", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def connect(address: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT, *, allow_plain_http: bool = False):
    """A ``JobSubmissionClient`` for ``address`` with the token header set, or a clear error."""
    address = resolve_address(address)
    token, source = resolve_token()
    register_secret(token)  # masked by value in everything printed from now on
    if token and plain_http_to_remote(address) and not allow_plain_http:  # checked before any request
        raise SubmitError(
            f"refusing to send the cluster token to {address} over plain http (it would cross the "
            "network unencrypted): use an SSH tunnel or port-forward to 127.0.0.1, https, or "
            "--allow-plain-http on a network you trust"
        )
    if probe(address, timeout) == "token" and not token:
        raise MissingTokenError(_missing_token_message(address))
    # lazy: build_parser imports this module for every command (those without Ray never import it)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    except AuthenticationError as error:
        if "401" in str(error) or "Missing" in str(error):
            raise MissingTokenError(_missing_token_message(address)) from None
        raise SubmitError(
            f"the Ray cluster at {address} rejected the token from {source} (HTTP 403): it is not this cluster's token"
        ) from None
    except ConnectionError as error:
        raise UnreachableError(f"cannot reach the Ray cluster at {address}: {error}") from None


def with_cluster_defaults(kind: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` plus ``run=cluster tracking=mlflow_server`` where the user set neither."""
    if kind not in CLUSTER_DEFAULT_KINDS:
        return overrides, []
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    added = [f"{group}={choice}" for group, choice in CLUSTER_DEFAULTS.items() if group not in given]
    return [*added, *overrides], added


def local_git_sha(root: Path) -> str | None:
    """HEAD of the checkout being uploaded (read-only ``git rev-parse``), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def entrypoint(kind: str, overrides: list[str]) -> str:
    return " ".join(["python", "-m", "pipeline.cli", kind, *(shlex.quote(o) for o in overrides)])


# --------------------------------------------------------------------------- submit


@dataclass
class Submission:
    """Everything ``bfn submit`` sends, built and checked before the cluster is contacted."""

    kind: str
    entrypoint: str
    runtime_env: dict[str, Any]
    known_secrets: list[str]
    added: list[str] = field(default_factory=list)
    upload_bytes: int = 0
    pip: list[str] | None = None


def prepare(args: argparse.Namespace) -> Submission:
    env, known = job_env(args.env or [], forward_credentials=args.forward_credentials)
    pip = pip_requirements(args.requirements_file) if args.pip_requirements or args.requirements_file else None
    runtime_env = build_runtime_env(
        env, image=args.image, pip=pip, working_dir=REPO_ROOT, extra_excludes=args.exclude or []
    )
    upload = 0
    if "working_dir" in runtime_env:
        sha = local_git_sha(REPO_ROOT)  # .git is not uploaded: tell the job which commit its code came from
        if sha:
            env.setdefault("BFN_GIT_SHA", sha)
        upload = check_working_dir_size(Path(runtime_env["working_dir"]), runtime_env["excludes"])
    overrides = [o for o in args.overrides if o != "--"]
    check_overrides(overrides)
    added: list[str] = []
    if not args.no_cluster_defaults:
        overrides, added = with_cluster_defaults(args.kind, overrides)
    return Submission(args.kind, entrypoint(args.kind, overrides), runtime_env, known, added, upload, pip)


def _describe(submission: Submission, address: str, image: str | None) -> None:
    mask = submission.known_secrets
    log.info("submitting to %s: %s", address, mask_text(submission.entrypoint, mask))
    if submission.added:
        log.info("  added for the cluster: %s (--no-cluster-defaults to skip)", " ".join(submission.added))
    env = submission.runtime_env["env_vars"]
    if "tracking=mlflow_server" in submission.added and "MLFLOW_TRACKING_URI" not in env:
        log.warning("MLFLOW_TRACKING_URI is not set here; the job uses the config's URI")
    code = f"image {image}" if image else f"working_dir {REPO_ROOT} ({submission.upload_bytes / 2**20:.1f} MiB)"
    log.info("  code: %s%s", code, f" + pip ({len(submission.pip)} requirements)" if submission.pip else "")
    log.info("  env_vars: %s (values not shown)", ", ".join(sorted(env)))
    if any(key in env for key in CREDENTIAL_ENV) or any(has_credential(value) for value in env.values()):
        log.warning(
            "credentials forwarded into the job's runtime_env: anyone holding the cluster token can read them back"
        )


def _send(client, submission: Submission, job_id: str, address: str) -> str:
    from ray.exceptions import AuthenticationError  # lazy, as in connect

    try:
        return client.submit_job(
            entrypoint=submission.entrypoint,
            submission_id=job_id,
            runtime_env=submission.runtime_env,
            metadata={"bfn_kind": submission.kind, "submitted_by": "bfn submit"},
        )
    except AuthenticationError as error:
        raise SubmitError(str(error)) from None
    except RuntimeError as error:
        raise SubmitError(f"submission to {address} failed: {error}") from None


def _wait_for_end(client, job_id: str, address: str, known: list[str], timeout: float, started: float) -> int:
    follow_command = f"bfn jobs logs {job_id} --address {address} --follow"
    log.info("following (Ctrl-C stops following, not the job; later: %s)", follow_command)
    try:
        status = follow(client, job_id, known, timeout)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. {follow_command}")
        return 0
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED ({time.monotonic() - started:.1f}s from submission)")
        return 0
    if status == "TIMEOUT":
        raise SubmitError(
            f"job {job_id} still running after --timeout {timeout:.0f}s; follow: {follow_command}; "
            f"stop: bfn jobs stop {job_id} --address {address}"
        )
    raise SubmitError(f"job {job_id} {status}: {client.get_job_info(job_id).message or ''}")


def cmd_submit(args: argparse.Namespace) -> int:
    known: list[str] = []
    try:
        submission = prepare(args)
        known = submission.known_secrets
        address = resolve_address(args.address)
        started = time.monotonic()
        client = connect(address, args.connect_timeout, allow_plain_http=args.allow_plain_http)
        job_id = args.job_id or f"bfn-{args.kind}-{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        _describe(submission, address, args.image)
        job_id = _send(client, submission, job_id, address)
        print(f"submitted job {job_id} in {time.monotonic() - started:.1f}s")
        if args.no_wait:
            print(f"follow it:  bfn jobs logs {job_id} --address {address} --follow")
            print(f"stop it:    bfn jobs stop {job_id} --address {address}")
            return 0
        return _wait_for_end(client, job_id, address, known, args.timeout, started)
    except SubmitError as error:
        _fail(error, known)
    return 0


# --------------------------------------------------------------------------- jobs


def follow(client, job_id: str, known: list[str], timeout: float | None, poll: float = 2.0, out=sys.stdout) -> str:
    """Print the job's new log output (masked) until it ends; return its final status (or "TIMEOUT")."""
    printed = 0
    deadline = None if not timeout else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id) or ""
        if len(logs) > printed:
            out.write(mask_text(logs[printed:], known))
            out.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline and time.monotonic() > deadline:
            return "TIMEOUT"
        time.sleep(poll)


def _fail(error: SubmitError, known: list[str] = ()) -> None:
    print(f"error: {mask_text(str(error), known)}", file=sys.stderr)  # the command's result, as cli.py does
    raise SystemExit(error.exit_code)


def _list_jobs(client, limit: int, known: list[str]) -> None:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    print(f"{'SUBMISSION ID':40s} {'STATUS':10s} {'STARTED':19s} ENTRYPOINT")
    for job in jobs[:limit]:
        started = f"{_dt.datetime.fromtimestamp(job.start_time / 1000):%Y-%m-%d %H:%M:%S}" if job.start_time else "-"
        print(
            f"{(job.submission_id or job.job_id or '-'):40s} {str(job.status.value):10s} {started:19s} "
            f"{mask_text(job.entrypoint, known)[:80]}"
        )


def _stop_job(client, job_id: str, wait: bool, timeout: float) -> None:
    stopped = client.stop_job(job_id)
    print(f"stop requested for {job_id}" if stopped else f"{job_id} was not running")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while str(client.get_job_status(job_id).value) not in TERMINAL:
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} did not stop within {timeout:.0f}s")
        time.sleep(1)
    print(f"{job_id} {client.get_job_status(job_id).value}")


def cmd_jobs(args: argparse.Namespace) -> int:
    _env, known = job_env(forward_credentials=True)  # mask every credential of this environment
    try:
        client = connect(args.address, args.connect_timeout, allow_plain_http=args.allow_plain_http)
        if args.jobs_cmd == "list":
            _list_jobs(client, args.limit, known)
        elif args.jobs_cmd == "logs" and args.follow:
            print(f"[job {args.job_id}: {follow(client, args.job_id, known, args.timeout)}]")
        elif args.jobs_cmd == "logs":
            sys.stdout.write(mask_text(client.get_job_logs(args.job_id) or "", known))
        elif args.jobs_cmd == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id} {info.status.value} {mask_text(info.message or '', known)}")
        else:
            _stop_job(client, args.job_id, args.wait, args.timeout)
    except RuntimeError as error:
        _fail(error if isinstance(error, SubmitError) else SubmitError(str(error)), known)
    return 0


# --------------------------------------------------------------------------- CLI


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=None, help="Ray job API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds to wait for the address to answer (default %(default)s)",
    )
    parser.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="send the cluster token over plain http to a non-loopback address",
    )


def _register_submit(subparsers: argparse._SubParsersAction) -> None:
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
        help="container image with the project installed (runtime_env image_uri; no working_dir)",
    )
    code.add_argument(
        "--pip-requirements",
        action="store_true",
        help="pip-install the project's requirements (pyproject.toml, minus ray) on the workers",
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
        "--forward-credentials",
        action="store_true",
        help="also forward AWS keys, MLflow credentials, the credentials inside forwarded URLs and "
        "--env credentials (stored with the job: readable by anyone holding the cluster token; "
        "prefer instance profiles / IRSA)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="extra gitignore-style pattern to keep out of the working_dir upload (repeatable)",
    )
    p.add_argument("--job-id", default=None, help="submission id (default bfn-<kind>-<time>-<rand>)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument(
        "--timeout",
        type=float,
        default=6 * 3600,
        help="seconds to follow the job before giving up (default %(default)s)",
    )
    p.set_defaults(func=cmd_submit)


def _register_jobs(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="list / follow / stop Ray Jobs")
    sub = jobs.add_subparsers(dest="jobs_cmd", required=True, metavar="{list,logs,status,stop}")
    listing = sub.add_parser("list", help="jobs on the cluster, newest first")
    listing.add_argument("--limit", type=int, default=20)
    for name, help_ in (
        ("logs", "print (or --follow) a job's logs"),
        ("status", "a job's status"),
        ("stop", "stop a job"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("job_id")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true")
        if name == "stop":
            sp.add_argument("--wait", action="store_true", help="wait until it has stopped")
        if name in ("logs", "stop"):
            sp.add_argument("--timeout", type=float, default=6 * 3600 if name == "logs" else 60)
    for sp in (listing, *[sub.choices[n] for n in ("logs", "status", "stop")]):
        _common(sp)
        sp.set_defaults(func=cmd_jobs)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs {list,logs,status,stop}`` to a CLI's subparsers."""
    _register_submit(subparsers)
    _register_jobs(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m pipeline.cluster.submit submit ...`` (same as ``bfn submit``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register_environment()
    install_log_masking()
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster.submit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

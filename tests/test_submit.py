"""`bfn submit`, `bfn jobs` and `bfn stack` without a cluster: error paths (unreachable address,
missing or wrong token, plain http), what a submission sends (token header, env vars, credentials
only when asked, no credentials in overrides) and what it shows (masked). A tiny in-process HTTP
stand-in for a Ray job API on 127.0.0.1; no Ray, no servers.
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.cluster import devstack as localstack
from pipeline.cluster import submit

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- submit: errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bfn")
    sub = parser.add_subparsers(dest="command", required=True)
    submit.register(sub)
    localstack.register(sub)
    return parser


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_token_env(monkeypatch, tmp_path):
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    return tmp_path


class FakeJobAPI:
    """A stand-in for a token-auth Ray job API on 127.0.0.1 (enough for JobSubmissionClient)."""

    def __init__(self, token: str | None = "s3cr3t-cluster-token", mode: str = "token"):
        self.token, self.mode, self.requests = token, mode, []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body: object = None):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                api.requests.append((self.command, self.path, dict(self.headers), body))
                if self.path == "/api/authentication_mode":
                    return self._reply(200, {"authentication_mode": api.mode})
                if api.mode == "token":
                    got = self.headers.get("Authorization")
                    if not got:
                        return self._reply(401, "Unauthorized: Missing authentication token")
                    if got != f"Bearer {api.token}":
                        return self._reply(403, "Forbidden: Invalid authentication token")
                if self.path == "/api/version":
                    return self._reply(200, {"ray_version": "2.60.0", "version": "4"})
                if self.path.startswith("/api/packages/"):
                    return self._reply(404 if self.command == "GET" else 200, {})
                if self.path == "/api/jobs/" and self.command == "POST":
                    sid = json.loads(body)["submission_id"]
                    return self._reply(200, {"job_id": sid, "submission_id": sid})
                return self._reply(404, {})

            do_GET = do_POST = do_PUT = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_unreachable_address_fails_fast_and_names_it(no_token_env):
    address = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(submit.UnreachableError, match=re.escape(address)):
        submit.connect(address, timeout=3)
    assert time.monotonic() - t0 < 5


def test_silent_address_times_out_within_connect_timeout(no_token_env):
    # a socket that accepts connections but never answers (a hung or firewalled endpoint)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        address = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(submit.UnreachableError, match=re.escape(address)):
            submit.connect(address, timeout=1.5)
        assert time.monotonic() - t0 < 5


def test_cli_unreachable_exit_code_and_message(no_token_env):
    address = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cluster.submit", "submit", "train", "experiment=smoke"]
        + ["--address", address, "--connect-timeout", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert proc.returncode == submit.UnreachableError.exit_code, proc.stderr
    assert address in proc.stderr and "cannot reach" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30


def test_missing_token_is_a_clear_error(no_token_env):
    with FakeJobAPI() as api, pytest.raises(submit.MissingTokenError) as err:
        submit.connect(api.address, timeout=3)
    msg = str(err.value)
    assert msg.startswith("missing token")
    assert api.address in msg and "RAY_AUTH_TOKEN" in msg and "RAY_AUTH_TOKEN_PATH" in msg


def test_missing_token_via_cli(no_token_env, capsys):
    with FakeJobAPI() as api, pytest.raises(SystemExit) as exit_:
        args = _parser().parse_args(["jobs", "list", "--address", api.address])
        args.func(args)
    assert exit_.value.code == submit.MissingTokenError.exit_code
    assert "error: missing token" in capsys.readouterr().err


def test_unreadable_token_path_is_a_clear_error(no_token_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_token_env / "nope"))
    with pytest.raises(submit.MissingTokenError, match="RAY_AUTH_TOKEN_PATH"):
        submit.resolve_token()


def test_wrong_token_is_rejected_clearly(no_token_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with FakeJobAPI() as api, pytest.raises(submit.SubmitError, match="rejected the token"):
        submit.connect(api.address, timeout=3)


def test_token_precedence_matches_ray(no_token_env, monkeypatch):
    home_token = no_token_env / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("from-home\n")
    assert submit.resolve_token() == ("from-home", str(home_token))
    path_token = no_token_env / "tok"
    path_token.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert submit.resolve_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.resolve_token() == ("from-env", "RAY_AUTH_TOKEN")


@pytest.mark.parametrize(
    "argv",
    [["submit", "bogus"], ["jobs", "bogus"], ["stack", "bogus"], ["bogus"]],
    ids=["submit-kind", "jobs", "stack", "top"],
)
def test_unknown_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_registered_subcommands_set_func():
    parser = _parser()
    for argv in (
        ["submit", "train", "experiment=smoke", "run.name=x"],
        ["jobs", "list"],
        ["jobs", "logs", "j1"],
        ["jobs", "stop", "j1"],
        ["stack", "up"],
        ["stack", "down"],
        ["stack", "status"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func), argv
    args = parser.parse_args(["submit", "tune", "a=1", "b=2", "--address", "http://x:1"])
    assert args.kind == "tune" and args.overrides == ["a=1", "b=2"]


# --------------------------------------------------------------------------- submit: happy path


def _submit_no_wait(api, monkeypatch, tmp_path, *extra: str, overrides=("experiment=smoke", "run.name=it's")):
    workdir = tmp_path / "proj"
    (workdir / "pipeline").mkdir(parents=True, exist_ok=True)
    (workdir / "pipeline" / "__init__.py").write_text("")
    monkeypatch.setattr(submit, "REPO_ROOT", workdir)
    monkeypatch.setenv("RAY_AUTH_TOKEN", api.token)
    args = _parser().parse_args(
        ["submit", "train", *overrides, "--address", api.address, "--no-wait", "--job-id", "bfn-test-1", *extra]
    )
    return args.func(args)


def _posted_jobs(api) -> list[dict]:
    return [json.loads(body) for method, path, _, body in api.requests if method == "POST" and path == "/api/jobs/"]


def test_submit_sends_token_header_env_and_masks_secrets(no_token_env, monkeypatch, capsys, caplog):
    """Full `bfn submit --no-wait --forward-credentials` against the stand-in job API: the token
    goes in the header, credentials reach the job's env_vars (opted in), nothing secret is shown."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLEID")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    caplog.set_level(logging.INFO)
    with FakeJobAPI() as api:
        assert _submit_no_wait(api, monkeypatch, no_token_env, "--forward-credentials") == 0
    out = capsys.readouterr()
    shown = out.out + out.err + caplog.text
    assert secret not in shown and api.token not in shown
    assert "AWS_SECRET_ACCESS_KEY" in caplog.text and "anyone holding the cluster token can read them" in caplog.text
    assert "bfn-test-1" in out.out and f"bfn jobs logs bfn-test-1 --address {api.address}" in out.out
    (job,) = _posted_jobs(api)
    headers = next(h for m, p, h, _ in api.requests if m == "POST" and p == "/api/jobs/")
    assert headers["Authorization"] == f"Bearer {api.token}"
    expected = "python -m pipeline.cli train run=cluster tracking=mlflow_server experiment=smoke"
    expected += " 'run.name=it'\"'\"'s'"
    assert job["entrypoint"] == expected
    env = job["runtime_env"]["env_vars"]
    assert env["AWS_SECRET_ACCESS_KEY"] == secret and env["MLFLOW_TRACKING_URI"].endswith(":5999")
    assert not any(k.startswith("RAY_AUTH") for k in env)
    assert job["runtime_env"]["working_dir"].startswith("gcs://")


def test_submit_keeps_credentials_home_unless_asked(no_token_env, monkeypatch):
    for key, value in {
        "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret",
        "AWS_ACCESS_KEY_ID": "AKIASENTINEL00000001",
        "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-password",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with FakeJobAPI() as api:
        assert _submit_no_wait(api, monkeypatch, no_token_env) == 0
    (job,) = _posted_jobs(api)
    assert "sentinel" not in json.dumps(job) and "AKIASENTINEL" not in json.dumps(job)
    assert job["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"  # settings still go


@pytest.mark.parametrize(
    "override",
    [
        "tracking.uri=http://bfn:sentinel-cfg-pass@mlflow.internal:5000",
        "run.ray_address=ray://u:sentinel-cfg-pass@127.0.0.1:10001",
        "+aws.secret_access_key=sentinel-cfg-pass",
    ],
)
def test_submit_refuses_credentials_in_overrides(no_token_env, monkeypatch, capsys, override):
    """The entrypoint is stored with the job: a credential in a config value never reaches the
    job spec, nor the output."""
    with FakeJobAPI() as api, pytest.raises(SystemExit) as exit_:
        _submit_no_wait(api, monkeypatch, no_token_env, overrides=("experiment=smoke", override))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "carries a credential" in err and override.split("=")[0].lstrip("+") in err
    assert "sentinel-cfg-pass" not in err
    assert _posted_jobs(api) == [] and not any(b"sentinel" in r[3] for r in api.requests)


def _url_credentials_env(monkeypatch) -> dict[str, str]:
    """Settings `bfn submit` forwards, each carrying a credential in another form."""
    env = {
        "MLFLOW_TRACKING_URI": "https://bfn:sentinel-uri-pass@mlflow.example.com",  # user:password
        "AWS_ENDPOINT_URL": "http://sentinel-uri-token@127.0.0.1:9000",  # a token alone as userinfo
        "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9000/?X-Amz-Security-Token=sentinel-uri-query&v=2",
        "BFN_STORAGE_PATH": "s3://:sentinel-uri-empty-user@bfn-runs/runs",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def test_submit_strips_credentials_from_forwarded_urls_unless_asked(no_token_env, monkeypatch, capsys, caplog):
    """Settings holding credentials (user:password@, token@, :password@, ?X-Amz-Security-Token=)
    reach the job without them, a warning naming each variable; with --forward-credentials as they
    are. The job spec checked is the one the real `bfn submit` posted to the job API."""
    env = _url_credentials_env(monkeypatch)
    caplog.set_level(logging.INFO)
    with FakeJobAPI() as api:
        assert _submit_no_wait(api, monkeypatch, no_token_env) == 0
    (job,) = _posted_jobs(api)
    assert "sentinel" not in json.dumps(job)
    sent = job["runtime_env"]["env_vars"]
    assert sent["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert sent["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert sent["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000/?v=2"
    assert sent["BFN_STORAGE_PATH"] == "s3://bfn-runs/runs"
    shown = "".join(capsys.readouterr()) + caplog.text
    assert "sentinel" not in shown
    for key in env:
        assert f"{key} holds credentials: forwarded without them" in caplog.text and "--forward-credentials" in shown

    caplog.clear()
    with FakeJobAPI() as api:
        assert _submit_no_wait(api, monkeypatch, no_token_env, "--forward-credentials") == 0
    (job,) = _posted_jobs(api)
    assert {key: job["runtime_env"]["env_vars"][key] for key in env} == env
    shown = "".join(capsys.readouterr()) + caplog.text
    assert "sentinel" not in shown and "anyone holding the cluster token can read them" in shown


@pytest.mark.parametrize(
    "item",
    [
        "HF_TOKEN=sentinel-env-token",
        "MY_API_KEY",
        "DB_PASSWORD=sentinel-env-pass",
        "DATABASE_URL=postgresql://app:sentinel-env-pass@db.internal/bfn",
        "SIGNED=https://b.s3.amazonaws.com/k?X-Amz-Signature=sentinel-env-sig",
    ],
)
def test_submit_refuses_env_credentials_unless_asked(no_token_env, monkeypatch, capsys, item):
    """`--env` is typed on purpose: a credential there is refused (naming it and the flag) rather
    than stripped, so the job never starts half-configured; with --forward-credentials it goes."""
    monkeypatch.setenv("MY_API_KEY", "sentinel-env-apikey")
    key = item.partition("=")[0]
    with FakeJobAPI() as api, pytest.raises(SystemExit) as exit_:
        _submit_no_wait(api, monkeypatch, no_token_env, "--env", item)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"--env {key} carries a credential" in err and "--forward-credentials" in err and "sentinel" not in err
    assert _posted_jobs(api) == []
    with FakeJobAPI() as api:
        assert _submit_no_wait(api, monkeypatch, no_token_env, "--env", item, "--forward-credentials") == 0
    (job,) = _posted_jobs(api)
    assert job["runtime_env"]["env_vars"][key].startswith(("sentinel", "postgresql://app:sentinel", "https://b.s3"))
    assert "sentinel" not in "".join(capsys.readouterr())


@pytest.mark.parametrize(
    "override",
    [
        "tracking.uri=https://ghp_sentinelToken0123@mlflow.example.com",
        "tracking.uri=https://:sentinel-empty-user@mlflow.example.com",
        "run.ray_address=ray://bfn:p@ss-sentinel@127.0.0.1:10001",
        "data.uri=https://b.s3.amazonaws.com/d?X-Amz-Signature=sentinel0sig",
        "data.uri=https://h/d?X-Amz-Credential=sentinel%2F20260101%2Fus-east-1",
        "+run.note=ASIAIOSFODNN7SENTINEL",
    ],
)
@pytest.mark.parametrize("flag", [(), ("--forward-credentials",)], ids=["", "forward-credentials"])
def test_submit_refuses_every_credential_form_in_overrides(no_token_env, monkeypatch, capsys, override, flag):
    """The entrypoint is stored with the job and listed by `bfn jobs list`: an override carrying a
    credential in any form is refused, even with --forward-credentials (the message says how to
    pass it through the environment instead); nothing is posted and nothing secret is shown."""
    with FakeJobAPI() as api, pytest.raises(SystemExit) as exit_:
        _submit_no_wait(api, monkeypatch, no_token_env, *flag, overrides=("experiment=smoke", override))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    key = override.split("=")[0].lstrip("+")
    assert f"override {key}: carries a credential" in err and "--forward-credentials" in err
    assert "sentinel" not in err.lower() and "ASIAIOSFODNN7" not in err
    assert _posted_jobs(api) == [] and not any(b"sentinel" in r[3] for r in api.requests)


def test_token_never_sent_over_plain_http_to_another_host(no_token_env, monkeypatch):
    """Refused before any request is made (the probe would be the first)."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cr3t-cluster-token")
    monkeypatch.setattr(submit, "probe", lambda *a, **k: pytest.fail("a request was made"))
    with pytest.raises(submit.SubmitError, match="plain http"):
        submit.connect("http://ray-head.example.internal:8265", timeout=1)
    with pytest.raises(submit.SubmitError, match="plain http"):
        submit.connect("http://10.0.0.5:8265", timeout=1)


def test_runtime_env_variants(monkeypatch):
    from pipeline.secrets import mask_text

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "xxxxsecret")
    env, known = submit.job_env()
    assert "AWS_SECRET_ACCESS_KEY" not in env  # credentials stay home by default
    env, known = submit.job_env(["EXTRA=1"], forward_credentials=True)
    assert env["EXTRA"] == "1" and mask_text("key=xxxxsecret", known) == "key=***"
    image_env = submit.build_runtime_env(env, image="registry.example.com/bfn/bfn-ray:1")
    assert "working_dir" not in image_env and image_env["image_uri"].endswith(":1")
    with pytest.raises(submit.SubmitError, match="cannot be combined"):
        submit.build_runtime_env(env, image="x:1", pip=["numpy"])
    wd = submit.build_runtime_env(env)
    for pattern in (".venv/", "runs/", "data/shards/", ".git"):
        assert pattern in wd["excludes"]
    reqs = submit.pip_requirements(None)
    assert "torch==2.13.0" in reqs and "mlflow==3.17.2" in reqs
    assert not any(r.startswith("ray") for r in reqs)
    with pytest.raises(submit.SubmitError, match="RAY_AUTH"):
        submit.job_env(["RAY_AUTH_MODE=disabled"])


def test_working_dir_upload_is_small():
    total, per_top = submit.working_dir_size(REPO, submit.WORKING_DIR_EXCLUDES)
    assert ".venv" not in per_top and ".git" not in per_top and "runs" not in per_top
    assert total < submit.MAX_WORKING_DIR_BYTES, per_top


def test_cluster_defaults_only_where_not_given():
    ovr, added = submit.with_cluster_defaults("train", ["experiment=smoke"])
    assert ovr == ["run=cluster", "tracking=mlflow_server", "experiment=smoke"]
    assert added == ["run=cluster", "tracking=mlflow_server"]
    ovr, added = submit.with_cluster_defaults("tune", ["tracking=none", "run.name=x"])
    assert added == ["run=cluster"] and "tracking=none" in ovr
    assert submit.with_cluster_defaults("eval", ["a=1"]) == (["a=1"], [])


def test_bfn_cli_registers_cluster_subcommands():
    if importlib.util.find_spec("pipeline.cli") is None:
        pytest.skip("pipeline/cli.py does not exist yet")
    from pipeline import cli

    parser = cli.build_parser()
    for argv in (["submit", "train", "experiment=smoke"], ["jobs", "list"], ["stack", "status"]):
        args = parser.parse_args(argv)
        assert args.func in (submit.cmd_submit, submit.cmd_jobs, localstack._cmd), argv


# --------------------------------------------------------------------------- localstack (no start)


def test_localstack_without_a_stack(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert localstack.status(tmp_path) == {"running": False, "root_dir": str(tmp_path)}
    assert localstack.down(tmp_path) == {}
    assert "nothing to stop" in caplog.text
    # unix socket paths must fit: a long root gets a short Ray temp dir under /tmp
    long_root = tmp_path / ("x" * 80)
    assert len(str(localstack._ray_temp_dir(long_root, "abcdef123456"))) <= 36
    assert localstack._ray_temp_dir(Path("/r"), "abc") == Path("/r/ray")

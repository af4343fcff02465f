"""Masking (pipeline/secrets.py): every common form of a credential, found by pattern or by value,
and nothing else (fast; no Ray).

* Property tests (hypothesis) for each form: a URI's userinfo (``token@``, ``:password@``,
  ``user:password@``, a password holding ``@`` or ``'``), secret query parameters (``?token=``,
  ``X-Amz-Signature``, ``X-Amz-Credential``, ...), AWS access key ids (``AKIA``/``ASIA``) and bare
  AWS secret keys, each in running text; masking is idempotent; git shas, run ids, URLs without
  credentials and every shipped preset's config come back unchanged.
* Masking by value: the secrets of the environment (``*_TOKEN``, ``*_SECRET_ACCESS_KEY``,
  ``*_PASSWORD``, the password inside a URL-valued variable) are registered by the CLI at start,
  and every log record is masked, also after logging is reconfigured (``logs.restore`` after
  ``ray.init``) and in a logged traceback.
* ``bfn data prepare --source URL`` with a signed URL (served on 127.0.0.1) downloads with the
  credentials but prints and stores (manifest.json, which the driver logs to MLflow) none;
  a manifest written before this masking is masked when read.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import cli, logs, secrets
from pipeline import data as D
from pipeline.config import compose
from pipeline.data import sources
from tests.pipeline.test_data_sources import build_cifar_archive, sha256

FAST = settings(max_examples=150, deadline=None)
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
SUB_DELIMS = "!$&'()*+,;="
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SENTINEL = "sentinel-Tok3n-5e6f7a"


@pytest.fixture(autouse=True)
def no_registered_values(monkeypatch):
    """Each test starts with nothing registered and leaves the process's registry as it was."""
    monkeypatch.setattr(secrets, "_known", set())


# ------------------------------------------------------------------------------------------------
# by pattern
# ------------------------------------------------------------------------------------------------

schemes = st.sampled_from(["http", "https", "s3", "ray", "postgresql", "ftp"])
hosts = st.sampled_from(["mlflow.example.com", "127.0.0.1:5000", "[::1]:8265", "bucket", "h"])
tails = st.sampled_from(["", "/", "/api/2.0?page=2", "/a/b.tar.gz", "#frag", "?x=1&y=2"])
users = st.text(UNRESERVED + SUB_DELIMS + "%", min_size=1, max_size=24)
passwords = st.text(UNRESERVED + SUB_DELIMS + "%:@", min_size=1, max_size=24)


@st.composite
def userinfos(draw) -> tuple[str, str]:
    """(userinfo, the secret part of it): a token alone, an empty user, or user:password."""
    form = draw(st.sampled_from(["token", "empty user", "user:password"]))
    if form == "token":
        token = draw(users)
        return token, token
    password = draw(passwords)
    return (f":{password}", password) if form == "empty user" else (f"{draw(users)}:{password}", password)


@FAST
@given(
    scheme=schemes,
    userinfo=userinfos(),
    host=hosts,
    tail=tails,
    before=st.sampled_from(["", "uri ", "'", '{"uri": "', "failed: <urlopen "]),
)
def test_uri_userinfo_is_masked_in_every_form(scheme, userinfo, host, tail, before):
    info, secret = userinfo
    text = f"{before}{scheme}://{info}@{host}{tail} and more"
    masked = secrets.mask_text(text)
    assert masked == f"{before}{scheme}://***@{host}{tail} and more"
    assert secrets.strip_credentials(f"{scheme}://{info}@{host}{tail}") == f"{scheme}://{host}{tail}"
    assert secret in secrets.credential_values(text)
    assert secrets.mask_text(masked) == masked


SECRET_PARAMS = [
    "token",
    "access_token",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "sig",
    "api_key",
    "apikey",
    "password",
    "client_secret",
    "Signature",
    "key",
]
PLAIN_PARAMS = [
    "page=2",
    "X-Amz-Date=20260101T000000Z",
    "X-Amz-Expires=3600",
    "X-Amz-SignedHeaders=host",
    "X-Amz-Algorithm=AWS4-HMAC-SHA256",
    "v=1",
]
query_values = st.text(UNRESERVED + "%+/=", min_size=1, max_size=64)


@FAST
@given(
    params=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(SECRET_PARAMS), query_values),
            st.tuples(st.just(None), st.sampled_from(PLAIN_PARAMS)),
        ),
        min_size=1,
        max_size=6,
    ),
    fragment=st.sampled_from(["", "#top"]),
)
def test_secret_query_parameters_are_masked(params, fragment):
    query = "&".join(value if name is None else f"{name}={value}" for name, value in params)
    expected = "&".join(value if name is None else f"{name}=***" for name, value in params)
    base = "https://bucket.s3.amazonaws.com/data/cifar-10-python.tar.gz"
    text = f"downloading {base}?{query}{fragment} now"
    assert secrets.mask_text(text) == f"downloading {base}?{expected}{fragment} now"
    kept = "&".join(value for name, value in params if name is None)
    assert secrets.strip_credentials(f"{base}?{query}{fragment}") == base + (f"?{kept}" if kept else "") + fragment


@FAST
@given(
    prefix=st.sampled_from(["AKIA", "ASIA"]),
    rest=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=16, max_size=16),
    around=st.sampled_from([("key ", " in text"), ('"', '"'), ("id=", ""), ("", ",")]),
)
def test_aws_access_key_ids_long_term_and_temporary_are_masked(prefix, rest, around):
    before, after = around
    assert secrets.mask_text(f"{before}{prefix}{rest}{after}") == f"{before}***{after}"


@st.composite
def aws_secret_keys(draw) -> str:
    """40 base64 characters as AWS issues them, with an upper and a lower case letter and a digit
    (a real key lacks one of them with probability ~0.1%), not starting with '/' (~1.6%): the shape
    ``mask_text`` recognises without a name beside it (paths and git shas have another)."""
    chars = draw(st.lists(st.sampled_from(B64), min_size=37, max_size=37))
    chars += [draw(st.sampled_from(B64[:26])), draw(st.sampled_from(B64[26:52])), draw(st.sampled_from(B64[52:62]))]
    random.Random(draw(st.integers(0, 2**32))).shuffle(chars)
    if chars[0] == "/":
        chars[0] = "K"
    return "".join(chars)


@FAST
@given(
    key=aws_secret_keys(),
    around=st.sampled_from(
        [
            ("aws_secret_access_key = ", "\n"),
            ('"SecretAccessKey": "', '"'),
            ("AWS_SECRET_ACCESS_KEY=", ""),
            ("secret ", ". next"),
        ]
    ),
)
def test_bare_aws_secret_keys_are_masked(key, around):
    before, after = around
    assert secrets.mask_text(f"{before}{key}{after}") == f"{before}***{after}"


@FAST
@given(
    sha=st.text("0123456789abcdef", min_size=40, max_size=40),
    run_id=st.text("0123456789abcdef", min_size=32, max_size=32),
)
def test_identifiers_and_plain_urls_are_left_alone(sha, run_id):
    text = (
        f"commit {sha} run {run_id} s3://bfn-data/mnist/train/part-00000.parquet "
        f"https://mlflow.example.com:5000/#/experiments/1/runs/{run_id}?page=2&sort=desc "
        "file:///home/user/data/raw/mnist/ user@example.com ray://127.0.0.1:10001"
    )
    assert secrets.mask_text(text) == text and not secrets.has_credential(text)


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in Path(cli.__file__).parent.joinpath("conf", "experiment").glob("*.yaml"))
)
def test_every_shipped_config_is_left_alone(preset):
    """Masking goes into config.json and MLflow params: a real config value is never taken for a secret."""
    for extra in ([], ["run=cluster", "tracking=mlflow_server"]):
        raw = compose([f"experiment={preset}", *extra])
        assert secrets.mask_config(raw) == raw


# ------------------------------------------------------------------------------------------------
# by value, and where the output goes
# ------------------------------------------------------------------------------------------------


def test_environment_secrets_are_the_credentials_not_the_settings():
    environ = {
        "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
        "AWS_SESSION_TOKEN": "session-token-value",
        "MLFLOW_TRACKING_PASSWORD": "mlflow-password",
        "MLFLOW_TRACKING_TOKEN": "mlflow-token-value",
        "RAY_AUTH_TOKEN": "ray-cluster-token",
        "HF_TOKEN": "hf_tokenvalue",
        "MLFLOW_TRACKING_URI": "https://bfn:uri-password@mlflow.example.com",
        "AWS_ENDPOINT_URL": "https://uri-token@s3.example.com",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_TOKEN_PATH": "/home/u/.ray/auth_token",
        "AWS_SHARED_CREDENTIALS_FILE": "/home/u/.aws/credentials",
        "MLFLOW_TRACKING_USERNAME": "bfn",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "PATH": "/usr/bin:/bin",
        "SKIP_PASS": "true",
    }
    found = set(secrets.environment_secrets(environ))
    assert {
        "aws-secret-value",
        "session-token-value",
        "mlflow-password",
        "mlflow-token-value",
        "ray-cluster-token",
        "hf_tokenvalue",
        "uri-password",
        "uri-token",
        "AKIAIOSFODNN7EXAMPLE",
    } == found


def test_cli_registers_the_environment_and_masks_every_log_line(monkeypatch, tmp_path, capsys):
    """`bfn` registers its environment's secrets at start: a secret where no pattern finds it (a
    path, as file-sharing links carry it) is masked in the error line and in every later log line
    (on the CLI's own handler: what a person sees)."""
    monkeypatch.setenv("DATA_SHARE_TOKEN", SENTINEL)
    source = tmp_path / SENTINEL / "nothing-here"
    assert cli.main(["data", "prepare", "cifar10", "--source", str(source), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bfn: error: cifar10: source" in err and "/***/nothing-here" in err and SENTINEL not in err
    logging.getLogger("pipeline.test").warning("retrying %s", f"https://files.example.com/s/{SENTINEL}/x.tar.gz")
    err = capsys.readouterr().err
    assert "[bfn] retrying https://files.example.com/s/***/x.tar.gz" in err and SENTINEL not in err


def test_log_masking_survives_reconfiguration_and_covers_tracebacks(monkeypatch):
    """The masking is in the record factory: `logs.restore()` (run after ray.init, which replaces
    the root handlers) keeps it, and a traceback's text is masked too."""
    secrets.install_log_masking()
    secrets.install_log_masking()  # idempotent
    logs.configure(False)
    logs.restore()
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)
    log = logging.getLogger("pipeline.test")
    secrets.register("registered-" + SENTINEL)
    log.info("tracking at %s, key %s", f"https://bfn:{SENTINEL}@mlflow.example.com", "registered-" + SENTINEL)
    try:
        raise ConnectionError(f"cannot reach https://{SENTINEL}@mlflow.example.com/api")
    except ConnectionError:
        log.exception("MLflow failed")
    shown = stream.getvalue()
    assert "tracking at https://***@mlflow.example.com, key ***" in shown
    assert "ConnectionError: cannot reach https://***@mlflow.example.com/api" in shown and SENTINEL not in shown


# ------------------------------------------------------------------------------------------------
# bfn data prepare --source <signed URL>
# ------------------------------------------------------------------------------------------------


def test_data_prepare_from_a_signed_url_keeps_its_credentials_out(tmp_path, http_files, monkeypatch, capsys):
    handler, base = http_files
    built = build_cifar_archive(tmp_path / "src")
    monkeypatch.setitem(sources.CANONICAL_ARCHIVES["cifar10"], "sha256", sha256(built["archive"]))
    monkeypatch.delenv("BFN_DATA_CACHE", raising=False)
    signature, session = "5e" * 32, f"{SENTINEL}-session"
    query = (
        f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAIOSFODNN7EXAMPLE%2F20260101%2Fus-east-1"
        f"%2Fs3%2Faws4_request&X-Amz-Expires=3600&X-Amz-Security-Token={session}&X-Amz-Signature={signature}"
    )
    handler.files[f"/mirror/cifar-10-python.tar.gz?{query}"] = built["archive"].read_bytes()
    url = f"{base}/mirror/cifar-10-python.tar.gz?{query}"
    out = tmp_path / "c"
    assert cli.main(["data", "prepare", "cifar10", "--source", url, "--out", str(out)]) == 0
    assert handler.requests == [f"/mirror/cifar-10-python.tar.gz?{query}"]  # downloaded with its credentials
    shown = "".join(capsys.readouterr())  # the CLI's log lines go to stderr
    stored = (out / "manifest.json").read_text()
    for text in (shown, stored):
        for secret in (signature, session, "ASIAIOSFODNN7EXAMPLE"):
            assert secret not in text
    assert "downloading" in shown and "X-Amz-Signature=***" in shown
    location = json.loads(stored)["source"]["location"]
    assert location.startswith(f"{base}/mirror/cifar-10-python.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Cred")
    assert location.endswith("X-Amz-Security-Token=***&X-Amz-Signature=***")
    assert D.verify(str(out))["source"]["location"] == location

    # a manifest written before the masking: what the driver reads (and logs to MLflow) is masked
    manifest = json.loads(stored)
    manifest["source"].update(location=url, url=url)
    (out / "manifest.json").write_text(json.dumps(manifest))
    read = D.verify(str(out))
    assert signature not in json.dumps(read) and read["source"]["url"] == location

    # a dead signed URL: the one error line names it, masked
    dead = url.replace(base, "http://127.0.0.1:9")
    assert cli.main(["data", "prepare", "cifar10", "--source", dead, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "bfn: error: download of http://127.0.0.1:9/mirror/" in err and signature not in err and session not in err

"""Secrets: the one place that masks them, and the one way this project writes a secret file.

Masking is by key (a dict key that looks secret: its value becomes ``***``), by pattern and by
value. The patterns: the userinfo of a URI (``user:password@``, ``token@``, ``:password@``, a
password holding ``@``), secret query parameters (``?token=``, ``X-Amz-Signature=``,
``X-Amz-Credential=``, ``sig=`` ...), AWS access key ids (``AKIA``/``ASIA``) and bare AWS secret
keys (a run of exactly 40 base64 characters with upper and lower case letters and a digit, not
starting with ``/``, which paths do). By value: strings registered with ``register`` (the CLI
registers the secrets of its environment at start: ``register_environment``) or passed in
``known``. Every write or print of something that may hold a secret goes through ``mask_text`` /
``mask_params`` / ``mask_config``: MLflow params and tags, checkpoints' config.json, data
manifests, ``bfn submit`` output; ``install_log_masking`` masks every log record of the process.

``write_secret_file`` creates a new file readable by its owner only, refusing to follow a symlink
or to reuse an existing file (whose permissions and owner it would otherwise inherit).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MASK = "***"
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key)", re.I)
# Environment variables holding a secret by name: *_TOKEN, *_SECRET_ACCESS_KEY, *_PASSWORD, ...
# (not TOKENIZERS_PARALLELISM or RAY_AUTH_TOKEN_PATH, whose values are settings).
SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASS|KEY|API_?KEY|CREDENTIALS?)$", re.I)
_STOP = r"\s\"<>\\"  # characters that end a URI in running text (a quote ' may be part of a password)
_USERINFO = rf"(?<=://)[^/?#{_STOP}]*@"  # greedy: the host follows the last '@' (a password may hold one)
_QUERY_NAME = (
    rf"[^=&#{_STOP}]*(?:token|secret|passw(?:or)?d|credential|signature|api[_-]?key|access[_-]?key)"
    rf"[^=&#{_STOP}]*|sig|key|pwd|pass|auth|apikey"
)
SECRET_VALUE = re.compile(
    rf"(?P<userinfo>{_USERINFO})"
    rf"|(?P<query>(?<=[?&])(?i:{_QUERY_NAME})=)[^&#{_STOP}]+"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[0-9])"
    r"[A-Za-z0-9+][A-Za-z0-9/+]{39}(?![A-Za-z0-9/+=])"  # a bare AWS secret access key
)
MIN_KNOWN_LENGTH = 4  # shorter registered values would mask ordinary words
_SETTING_WORDS = {"true", "false", "yes", "no", "none", "null", "on", "off", "auto", "default"}  # never secrets
_known: set[str] = set()


def register(*values: str | None) -> None:
    """Mask these exact values in everything masked from now on (in this process)."""
    _known.update(v for v in values if v and len(v) >= MIN_KNOWN_LENGTH)


def _replace(match: re.Match) -> str:
    if match["userinfo"] is not None:
        return MASK + "@"
    if match["query"] is not None:
        return match["query"] + MASK
    return MASK


def mask_text(text: str, known: Iterable[str | None] = ()) -> str:
    """``text`` with credentials in URIs, AWS keys and known secret values replaced by ***."""
    values = _known | {v for v in known if v and len(v) >= MIN_KNOWN_LENGTH}
    for value in sorted(values, key=len, reverse=True):  # longest first: a value may contain another
        text = text.replace(value, MASK)
    return SECRET_VALUE.sub(_replace, text)


def has_credential(text: str) -> bool:
    """Whether ``text`` carries a credential by pattern (registered values aside: a short one
    could be an ordinary word)."""
    return SECRET_VALUE.search(text) is not None


def credential_values(text: str) -> list[str]:
    """The secret parts of ``text`` by pattern: a URI's password (or its whole userinfo when it
    has no password: a token), secret query values, AWS keys."""
    found = []
    for match in SECRET_VALUE.finditer(text):
        if match["userinfo"] is not None:
            user, colon, password = match["userinfo"][:-1].partition(":")
            found.append(password if colon else user)
        elif match["query"] is not None:
            found.append(match[0][len(match["query"]) :])
        else:
            found.append(match[0])
    return [value for value in found if value and value != MASK]


def strip_credentials(text: str) -> str:
    """``text`` (a URI) without its userinfo and its secret query parameters."""
    text = re.sub(_USERINFO, "", text)
    base, question, rest = text.partition("?")
    if not question:
        return text
    query, hash_, fragment = rest.partition("#")
    kept = [part for part in query.split("&") if not re.fullmatch(_QUERY_NAME, part.partition("=")[0], re.I)]
    return base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment


def is_secret_env_name(name: str) -> bool:
    return bool(SECRET_ENV_NAME.search(name))


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values of ``environ`` (default ``os.environ``): variables named like a secret, and
    the credentials inside any value (a tracking URI's password, a query token)."""
    environ = os.environ if environ is None else environ
    values = [
        value
        for name, value in environ.items()
        if value and is_secret_env_name(name) and value.lower() not in _SETTING_WORDS
    ]
    return values + [found for value in environ.values() for found in credential_values(value)]


def register_environment(environ: Mapping[str, str] | None = None) -> None:
    """Register ``environment_secrets``: from now on they are masked by value everywhere."""
    register(*environment_secrets(environ))


class _MaskingRecordFactory:
    """Wraps the log record factory: a record whose message or traceback holds a secret gets the
    masked text. A factory, not a handler filter: it reaches every handler, including those that
    logging.basicConfig(force=True) or Ray's logging config install later."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        record = self.wrapped(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            masked = mask_text(text)
            if masked != text:
                record.exc_text = masked  # formatters use a set exc_text instead of formatting the exception
        return record


def install_log_masking() -> None:
    """Mask every log record created from now on in this process (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _MaskingRecordFactory):  # under another wrapper (Ray's) a second one masks twice
        logging.setLogRecordFactory(_MaskingRecordFactory(factory))


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def mask_params(params: dict[str, Any]) -> dict[str, Any]:
    """A flat dict with secret-looking keys' values and embedded credentials masked."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key) and value not in (None, ""):
            out[key] = MASK
        else:
            out[key] = mask_text(value) if isinstance(value, str) else value
    return out


def mask_config(config: Any) -> Any:
    """A nested config (dicts, lists, scalars) with the same masking as ``mask_params``."""
    if isinstance(config, dict):
        return {
            key: (
                MASK
                if is_secret_key(str(key)) and value not in (None, "") and not isinstance(value, dict)
                else mask_config(value)
            )
            for key, value in config.items()
        }
    if isinstance(config, list | tuple):
        return [mask_config(value) for value in config]
    return mask_text(config) if isinstance(config, str) else config


def write_secret_file(path: str | Path, text: str) -> Path:
    """Create ``path`` (mode 0600) holding ``text``; an existing file or a symlink there is an
    error (O_EXCL | O_NOFOLLOW), so the secret never lands in a file someone else prepared."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask could only have narrowed it; make it exact
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def plain_http_to_remote(url: str) -> bool:
    """True for an http:// URL whose host is not loopback: credentials sent there travel in clear."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name: may resolve anywhere
        return True

"""Secrets: the one place that masks them, and the one way this project writes a secret file.

Masking is by key (a dict key that looks secret: its value becomes ``***``), by pattern
(``user:password@`` inside a URI, AWS access key ids) and by value (strings registered with
``register`` or passed in ``known``, e.g. the values of secret environment variables). Every
write or print of something that may hold a secret goes through ``mask_text`` / ``mask_params`` /
``mask_config``: MLflow params and tags, checkpoints' config.json, log lines, ``bfn submit`` output.

``write_secret_file`` creates a new file readable by its owner only, refusing to follow a symlink
or to reuse an existing file (whose permissions and owner it would otherwise inherit).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key)", re.I)
SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|(?<=://)[^/@\s:]+:[^/@\s]+(?=@))")
MIN_KNOWN_LENGTH = 4  # shorter registered values would mask ordinary words
_known: set[str] = set()


def register(*values: str | None) -> None:
    """Mask these exact values in everything masked from now on (in this process)."""
    _known.update(v for v in values if v and len(v) >= MIN_KNOWN_LENGTH)


def mask_text(text: str, known: Iterable[str | None] = ()) -> str:
    """``text`` with credentials in URIs, AWS key ids and known secret values replaced by ***."""
    values = _known | {v for v in known if v and len(v) >= MIN_KNOWN_LENGTH}
    for value in sorted(values, key=len, reverse=True):  # longest first: a value may contain another
        text = text.replace(value, MASK)
    return SECRET_VALUE.sub(MASK, text)


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
        return {key: (MASK if is_secret_key(str(key)) and value not in (None, "") and not isinstance(value, dict)
                      else mask_config(value)) for key, value in config.items()}  # fmt: skip
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
    import ipaddress
    from urllib.parse import urlsplit

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

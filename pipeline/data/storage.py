"""Names, the error type and file access shared by the data modules (no parsing, no Ray).

A dataset lives under a local folder, a ``file://`` URI or ``s3://bucket/prefix``; every access
goes through a pyarrow filesystem from ``resolve``.

S3 (documented choice): URIs ``s3://bucket/prefix`` get a ``pyarrow.fs.S3FileSystem`` built on
the calling process from the environment (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_REGION``/``AWS_DEFAULT_REGION``) with the values filled in explicitly. ``ray_dataset`` hands
that filesystem object to ``ray.data.read_parquet(filesystem=...)``, so read tasks get the
endpoint and keys with the task even when the Ray runtime was started before the environment was
set (its workers would not see later changes). The keys travel with the serialized task; on a
shared cluster prefer instance/IAM credentials and leave the key variables unset.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.parse
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

DATASETS = ("mnist", "cifar10", "text8", "text_bpe")
# text datasets: bytes per stored id (text8's 27 chars fit one; subword ids up to 65,536 take two, little-endian)
ID_BYTES = {"text8": 1, "text_bpe": 2}
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
IMAGE_SHAPE = {"mnist": (28, 28), "cifar10": (32, 32, 3)}
NUM_CLASSES = 10
TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id = position; the reference shows ' ' as '_'


class DataError(ValueError):
    """Bad or missing data: the message names the dataset, split, shard path or column at fault."""


def check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return name


def is_text(name: str) -> bool:
    """Text datasets are cut into windows of ``seq_len`` ids; images are not."""
    return name in ID_BYTES


def raw_dir() -> Path:
    """The vendored raw data (``data/raw`` in the repository; ``BFN_RAW_DIR`` overrides)."""
    env = os.environ.get("BFN_RAW_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "raw"


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https", "file", "ftp")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """The one S3 filesystem of the project: endpoint, credentials and region from the environment
    (AWS_ENDPOINT_URL[_S3] for MinIO or moto), passed explicitly so Ray processes started earlier get them."""
    env = os.environ
    kwargs: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region and not endpoint and bucket:
        try:
            region = pafs.resolve_s3_region(bucket)
        except Exception:  # noqa: BLE001 - fall back to the SDK default
            region = None
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path without scheme) for a local path, file://, s3:// or other URI."""
    uri = str(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        path = (parsed.netloc + parsed.path).rstrip("/")
        return s3_filesystem(parsed.netloc), path
    if len(parsed.scheme) > 1:  # file://, gs://, hdfs://, ... (one letter = a Windows drive)
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: Any) -> None:
    """Write a whole file; on a local filesystem through a temporary name and an atomic move."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)

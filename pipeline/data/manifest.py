"""The manifest: its schema, reading and validating it, and checking the shards against it.

Format version 2 (``manifest.json`` at the dataset root, local or s3://)::

    {"dataset": "mnist" | "cifar10" | "text8",
     "format_version": 2,
     "splits": {"train" | "val" | "test": {
         "rows": int >= 0,
         "schema": [{"name": str, "type": str}, ...],          # the split's Parquet columns
         "shards": [{"path": "train/part-00000.parquet",       # relative, inside the dataset
                     "rows": int >= 0, "bytes": int >= 0, "sha256": 64 hex digits}, ...],
         # text8 only: chars per row, chars between row starts, chars in the split's stream
         "row_chars": int >= 1, "row_stride": int >= 1, "chars": int >= 0}},
     "seq_len": int >= 1,                                       # text8 only
     ... descriptive keys: shape, dtype, split_rule, source, rows_per_shard, created_at, created_by,
         vocab, vocab_size, num_classes}

Version 1 had one top-level ``schema`` and text8 training rows of ``seq_len`` chars; reading it
is a ``DataError`` that says to re-run ``bfn data prepare``. Every structural fault (a missing
key, a wrong type, a negative count, a shard path that is absolute or climbs out with ``..``, a
malformed sha256) is a ``DataError`` naming the manifest and the key, before any shard is opened.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.storage import (
    DATASETS,
    ID_BYTES,
    IMAGE_SHAPE,
    MANIFEST_NAME,
    SPLITS,
    DataError,
    check_name,
    is_text,
    join,
    read_bytes,
    resolve,
    sha256_hex,
)
from pipeline.secrets import mask_config

FORMAT_VERSION = 2
# column, max (text_bpe: vocab_size - 1, from the manifest)
VALUE_RANGES = {"mnist": ("label", 9), "cifar10": ("label", 9), "text8": ("ids", 26), "text_bpe": ("ids", None)}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def expected_schema(name: str, *, seq_len: int = 256, split: str = "test") -> pa.Schema:
    """The Parquet schema of ``split`` of dataset ``name``. Text rows hold ``2 * seq_len`` ids in
    the train split and ``seq_len`` in val/test (see ``transforms.text8_rows``), ``ID_BYTES`` each."""
    check_name(name)
    if is_text(name):
        width = 2 * int(seq_len) if split == "train" else int(seq_len)
        return pa.schema([("ids", pa.binary(width * ID_BYTES[name])), ("offset", pa.int64())])
    return pa.schema([("image", pa.binary(int(np.prod(IMAGE_SHAPE[name])))), ("label", pa.int64())])


def schema_to_json(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


# ================================================================================================
# structure
# ================================================================================================


def _need(obj: dict, key: str, kind: type | tuple[type, ...], where: str, at: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: {at.rstrip('.') or 'the manifest'} lacks the key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: {at}{key} must be {names} (got {type(value).__name__} {value!r:.80})")
    return value


def _count(obj: dict, key: str, where: str, at: str, *, low: int = 0) -> int:
    value = _need(obj, key, int, where, at)
    if value < low:
        raise DataError(f"{where}: {at}{key} must be an integer >= {low} (got {value})")
    return value


def _check_path(path: str, where: str, at: str) -> None:
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or ":" in path
        or ".." in parts
        or posixpath.normpath(path) != path
    ):
        raise DataError(
            f"{where}: {at}path {path!r} must be a plain relative path inside the dataset folder "
            "(no leading '/', no '..', e.g. 'train/part-00000.parquet')"
        )


def _check_split(entry: Any, split: str, name: str, where: str) -> None:
    at = f"splits.{split}."
    if not isinstance(entry, dict):
        raise DataError(f"{where}: splits.{split} must be an object (got {type(entry).__name__})")
    _count(entry, "rows", where, at)
    for i, column in enumerate(_need(entry, "schema", list, where, at)):
        if not isinstance(column, dict):
            raise DataError(f"{where}: {at}schema[{i}] must be an object with 'name' and 'type'")
        _need(column, "name", str, where, f"{at}schema[{i}].")
        _need(column, "type", str, where, f"{at}schema[{i}].")
    seen: set[str] = set()
    for i, shard in enumerate(_need(entry, "shards", list, where, at)):
        here = f"{at}shards[{i}]."
        if not isinstance(shard, dict):
            raise DataError(f"{where}: {at}shards[{i}] must be an object (got {type(shard).__name__})")
        path = _need(shard, "path", str, where, here)
        _check_path(path, where, here)
        if path in seen:
            raise DataError(f"{where}: {here}path {path!r} is listed twice")
        seen.add(path)
        _count(shard, "rows", where, here)
        _count(shard, "bytes", where, here)
        if not _SHA256.match(_need(shard, "sha256", str, where, here)):
            raise DataError(f"{where}: {here}sha256 must be 64 lowercase hex digits (got {shard['sha256']!r:.80})")
    if is_text(name):
        _count(entry, "row_chars", where, at, low=1)
        _count(entry, "row_stride", where, at, low=1)
        _count(entry, "chars", where, at)


def validate_manifest(man: Any, uri: str) -> dict:
    """Check the structure of the parsed manifest of ``uri`` (see the module docstring); returns it."""
    where = f"manifest {str(uri).rstrip('/')}/{MANIFEST_NAME}"
    if not isinstance(man, dict):
        raise DataError(f"{where}: must be a JSON object (got {type(man).__name__})")
    name = _need(man, "dataset", str, where, "")
    if name not in DATASETS:
        raise DataError(f"{where}: unknown dataset {name!r} in manifest; expected one of {', '.join(DATASETS)}")
    version = _need(man, "format_version", int, where, "")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{where}: written in data format {version}, this code reads format {FORMAT_VERSION}; "
            f"re-run `bfn data prepare {name} --out {uri}`"
        )
    splits = _need(man, "splits", dict, where, "")
    if not splits:
        raise DataError(f"{where}: splits is empty")
    for split, entry in splits.items():
        if split not in SPLITS:
            raise DataError(f"{where}: unknown split {split!r}; expected {', '.join(SPLITS)}")
        _check_split(entry, split, name, where)
    if is_text(name):
        _count(man, "seq_len", where, "", low=1)
    if name == "text_bpe":
        _count(man, "vocab_size", where, "", low=2)
        _need(man, "tokenizer", dict, where, "")
    return man


def read_manifest(uri: str) -> dict:
    """Load and validate ``<uri>/manifest.json``; ``DataError`` if it is missing or malformed. Its
    source's URL comes back with credentials masked (an older manifest may hold them; it is logged
    to MLflow)."""
    fs, root = resolve(uri)
    where = f"manifest {str(uri).rstrip('/')}/{MANIFEST_NAME}"
    try:
        data = read_bytes(fs, join(root, MANIFEST_NAME))
    except FileNotFoundError as exc:
        raise DataError(f"missing {where} (run `bfn data prepare` first)") from exc
    except OSError as exc:
        raise DataError(f"cannot read {where}: {exc}") from exc
    try:
        man = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{where} is not valid JSON: {exc}") from exc
    if isinstance(man, dict) and isinstance(man.get("source"), dict):
        man["source"] = mask_config(man["source"])
    return validate_manifest(man, uri)


def _split_schema(man: dict, split: str, uri: str) -> pa.Schema:
    """The split's expected schema, after checking that the manifest agrees with it."""
    name = man["dataset"]
    expected = expected_schema(name, seq_len=int(man.get("seq_len", 256)), split=split)
    got = {c["name"]: c["type"] for c in man["splits"][split]["schema"]}
    for field in expected:
        if field.name not in got:
            raise DataError(f"{uri}: manifest schema of split {split!r} lacks column {field.name!r} of {name}")
        if got[field.name] != str(field.type):
            raise DataError(
                f"{uri}: manifest schema of split {split!r}: column {field.name!r} is "
                f"{got[field.name]}, {name} expects {field.type}"
            )
    extra = sorted(set(got) - set(expected.names))
    if extra:
        raise DataError(f"{uri}: manifest schema of split {split!r} has unexpected column(s) {extra} for {name}")
    return expected


# ================================================================================================
# shards
# ================================================================================================


def _check_shard_metadata(meta: pq.FileMetaData, schema: pa.Schema, where: str, rows: int) -> None:
    got = meta.schema.to_arrow_schema()
    for field in schema:
        idx = got.get_field_index(field.name)
        if idx < 0:
            raise DataError(f"{where}: column {field.name!r} is missing")
        if got.field(idx).type != field.type:
            raise DataError(
                f"{where}: column {field.name!r} has type {got.field(idx).type}, the manifest says {field.type}"
            )
    extra = sorted(set(got.names) - set(schema.names))
    if extra:
        raise DataError(f"{where}: unexpected column(s) {extra}")
    if meta.num_rows != rows:
        raise DataError(f"{where}: {meta.num_rows} rows, the manifest says {rows}")
    for rg in range(meta.num_row_groups):
        for ci in range(meta.num_columns):
            col = meta.row_group(rg).column(ci)
            stats = col.statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                raise DataError(f"{where}: column {col.path_in_schema!r} has {stats.null_count} nulls")


def _check_shard(fs: pafs.FileSystem, root: str, shard: dict, schema: pa.Schema, where: str, checksums: bool) -> int:
    """Size, checksum (optional), footer schema and row count of one shard; returns its bytes."""
    path = join(root, shard["path"])
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"missing {where}")
    if info.size != shard["bytes"]:
        raise DataError(f"{where}: {info.size} bytes, the manifest says {shard['bytes']} (truncated or replaced)")
    try:
        if checksums:
            data = read_bytes(fs, path)
            digest = sha256_hex(data)
            if digest != shard["sha256"]:
                raise DataError(f"{where}: sha256 {digest} does not match the manifest's {shard['sha256']} (corrupt)")
            meta = pq.read_metadata(pa.BufferReader(data))
        else:
            with fs.open_input_file(path) as f:
                meta = pq.read_metadata(f)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{where}: unreadable Parquet ({exc})") from exc
    _check_shard_metadata(meta, schema, where, int(shard["rows"]))
    return int(info.size)


def verify(uri: str, splits: Sequence[str] | None = None, *, check_checksums: bool = True) -> dict:
    """Check a prepared dataset before any Ray worker reads it.

    Raises ``DataError`` naming the culprit for: a missing or malformed manifest (see
    ``validate_manifest``), an old format, a split schema that differs from the dataset's, an
    unknown or empty split, a missing shard, a shard whose size or sha256 differs from the manifest
    (corrupt, truncated), a shard whose Parquet schema or row count differs from the manifest.
    With ``check_checksums=False`` only the sizes and Parquet footers are read. Returns the
    manifest plus ``"verified": {"splits": {split: rows}, "shards", "bytes", "checked_checksums"}``.
    """
    man = read_manifest(uri)
    fs, root = resolve(uri)
    wanted = list(man["splits"]) if splits is None else list(splits)
    summary: dict[str, Any] = {"splits": {}, "shards": 0, "bytes": 0, "checked_checksums": bool(check_checksums)}
    for split in wanted:
        if split not in man["splits"]:
            raise DataError(f"{uri}: split {split!r} is not in the manifest (has {', '.join(man['splits'])})")
        entry = man["splits"][split]
        schema = _split_schema(man, split, uri)
        if not entry["shards"] or not entry["rows"]:
            raise DataError(f"{uri}: split {split!r} is empty")
        for shard in entry["shards"]:
            where = f"shard {str(uri).rstrip('/')}/{shard['path']} (split {split!r})"
            summary["bytes"] += _check_shard(fs, root, shard, schema, where, check_checksums)
            summary["shards"] += 1
        total = sum(int(s["rows"]) for s in entry["shards"])
        if total != int(entry["rows"]):
            raise DataError(f"{uri}: split {split!r} shards hold {total} rows, the manifest says {entry['rows']}")
        summary["splits"][split] = total
    return {**man, "verified": summary}


def check_values(uri: str, manifest: dict, splits: Sequence[str]) -> None:
    """Every stored label / text8 id in range, shard by shard (one column read per shard).

    ``verify`` checks sizes, checksums and schemas but not values; a bad value would otherwise fail
    inside a Ray Data task after the workers started, without the shard's name.
    """
    column, high = VALUE_RANGES[manifest["dataset"]]
    high = int(manifest["vocab_size"]) - 1 if high is None else high
    id_bytes = ID_BYTES.get(manifest["dataset"], 1)
    fs, root = resolve(uri)
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            where = f"shard {str(uri).rstrip('/')}/{shard['path']} (split {split!r})"
            try:
                with fs.open_input_file(join(root, shard["path"])) as f:
                    array = pq.read_table(f, columns=[column]).column(column).combine_chunks()
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{where}: unreadable Parquet ({exc})") from exc
            if column == "ids":  # fixed_size_binary: ID_BYTES little-endian bytes per id
                width = array.type.byte_width
                values = np.frombuffer(array.buffers()[1], np.uint8, len(array) * width, array.offset * width)
                values = values.view("<u2") if id_bytes == 2 else values
            else:
                values = array.to_numpy(zero_copy_only=False)
            if values.size and (values.min() < 0 or values.max() > high):
                raise DataError(
                    f"{where}: column {column!r} has values outside 0..{high} (min {values.min()}, max {values.max()})"
                )


def num_rows(uri: str, split: str) -> int:
    """Rows of ``split`` according to the manifest (no shard is opened)."""
    man = read_manifest(uri)
    if split not in man["splits"]:
        raise DataError(f"{uri}: split {split!r} is not in the manifest")
    return int(man["splits"][split]["rows"])

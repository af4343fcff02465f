"""``bfn data prepare``: raw files -> Parquet shards plus ``manifest.json`` (local folder or s3://).

Layout: ``<root>/manifest.json`` and ``<root>/{train,val,test}/part-00000.parquet ...``; the
manifest format is in ``manifest.py``. Rows per dataset:

=========  =========================================  ===========================================
dataset    Parquet columns                            one row
=========  =========================================  ===========================================
mnist      image: fixed_size_binary[784], label       uint8 grey levels 0..255, row-major 28x28
cifar10    image: fixed_size_binary[3072], label      uint8 HWC 32x32x3
text8      ids: fixed_size_binary[2*seq_len] (train)  char ids (0 = space, 1..26 = a..z); a row
           or [seq_len] (val/test), offset: int64     starts every seq_len chars of its split,
                                                      ``offset`` = its first char in the split
=========  =========================================  ===========================================

Splits (BFN_SPEC section 0):

* mnist: train/val = ``torch.utils.data.random_split(range(60000), [0.99, 0.01],
  generator=torch.Generator().manual_seed(2147483647))`` (59400/600, rows stored in the subsets'
  index order), test = the official 10,000.
* cifar10 from the full python tarball: the same rule on the 50,000 (49500/500); from the bundled
  lossless subset (200 train + 20 test images): train = train images 0..179, val = 180..199,
  test = the 20 test images.
* text8: chars [0, .9n) / [.9n, .95n) / [.95n, n) as in the reference. Train rows hold 2*seq_len
  chars and start every seq_len chars (overlapping by half): the training crop (a window of
  seq_len at a uniform offset in [0, seq_len), ``transforms.to_model``) then reaches every start
  position, as the reference trains on every offset. Val/test rows are the non-overlapping
  windows of seq_len chars; ``iter_batches(stride=...)`` re-cuts them into windows at any stride
  (stride 1 = the reference's every-offset evaluation). The starts and tail chars that no row
  reaches are counted in the manifest's ``split_rule``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import posixpath
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import random_split

from pipeline.data import bpe, sources
from pipeline.data.manifest import FORMAT_VERSION, expected_schema, schema_to_json
from pipeline.data.storage import (
    IMAGE_SHAPE,
    MANIFEST_NAME,
    NUM_CLASSES,
    SPLITS,
    TEXT8_ALPHABET,
    DataError,
    check_name,
    exists,
    is_text,
    join,
    resolve,
    write_bytes,
)
from pipeline.data.transforms import text8_rows

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_SHARD = 10_000
ROW_GROUP_ROWS = 4_096
REFERENCE_SEED = 2147483647
VAL_FRACTION = 0.01


def say(progress: bool, message: str) -> None:
    """Progress of a preparation at INFO; with ``progress=False`` at DEBUG."""
    log.log(logging.INFO if progress else logging.DEBUG, message)


def reference_split(n: int, val_fraction: float = VAL_FRACTION, seed: int = REFERENCE_SEED) -> tuple[np.ndarray, ...]:
    """(train, val) indices exactly as the reference: ``random_split(range(n), [1-f, f], gen)``.

    torch floors ``n * fraction`` for each part and hands the remainder out round-robin from the
    first part, then slices one ``torch.randperm(n, generator)``: train is its head, val its tail.
    """
    train, val = random_split(
        range(n), [1.0 - val_fraction, val_fraction], generator=torch.Generator().manual_seed(seed)
    )
    return np.asarray(train.indices, np.int64), np.asarray(val.indices, np.int64)


def _fixed_binary(mat: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Rows of uint8 (or little-endian uint16 ids, two bytes each) as fixed-size binary values."""
    if mat.dtype != np.uint8:
        mat = np.ascontiguousarray(mat, dtype="<u2").view(np.uint8)
    mat = np.ascontiguousarray(mat, dtype=np.uint8)
    n, width = mat.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(mat)])


def _text_cuts(n: int) -> dict[str, tuple[int, int]]:
    """The reference's text8 split of n chars: [0, .9n) / [.9n, .95n) / [.95n, n)."""
    return {"train": (0, int(n * 0.9)), "val": (int(n * 0.9), int(n * 0.95)), "test": (int(n * 0.95), n)}


def _text_tables(streams: dict[str, np.ndarray], seq_len: int, unit: str) -> tuple[dict, dict, dict]:
    """{split: table}, {split: manifest fields}, and the row rule of each split's id stream."""
    tables, extra, dropped = {}, {}, {}
    for split, ids in streams.items():
        train = split == "train"
        rows, offsets = text8_rows(ids, seq_len, train=train)
        tables[split] = pa.table({"ids": _fixed_binary(rows), "offset": pa.array(offsets, pa.int64())})
        extra[split] = {"row_chars": rows.shape[1], "row_stride": seq_len, "chars": len(ids)}
        if train:  # crops start in [0, rows * seq_len); the reference's starts are [0, len - seq_len)
            dropped["train_unused_start_positions"] = max(len(ids) - seq_len - len(rows) * seq_len, 0)
        else:
            dropped.setdefault(f"dropped_tail_{unit}", {})[split] = len(ids) - len(rows) * seq_len
    rule = {
        "train_rows": f"2*seq_len = {2 * seq_len} {unit} starting every seq_len = {seq_len} {unit}; training "
        "crops seq_len at a uniform offset in [0, seq_len) (pipeline.data.to_model)",
        "eval_rows": f"non-overlapping windows of seq_len = {seq_len} {unit}; iter_batches(stride=k) re-cuts "
        f"them into windows starting every k {unit}",
        "offset": f"first {unit[:-1]} of the row within its split",
        **dropped,
    }
    return tables, extra, rule


def _text8_tables(ids: np.ndarray, seq_len: int) -> tuple[dict, dict, dict]:
    """{split: table}, {split: text8 manifest fields}, and the split rule."""
    cuts = _text_cuts(len(ids))
    tables, extra, rule = _text_tables({s: ids[a:b] for s, (a, b) in cuts.items()}, seq_len, "chars")
    rule = {
        "method": "contiguous chars [0,.9n) / [.9n,.95n) / [.95n,n) (reference prepare_text8)",
        "chars": len(ids),
        "char_ranges": {s: list(c) for s, c in cuts.items()},
        **rule,
    }
    return tables, extra, rule


def _bpe_tables(ids: np.ndarray, seq_len: int, vocab_size: int, progress: bool) -> tuple[dict, dict, dict, Any]:
    """text8-style chars -> a BPE tokenizer trained on the train split, and each split's token rows."""
    text = sources.text8_decode_bytes(ids)
    cuts = _text_cuts(len(text))
    say(progress, f"text_bpe: training a {vocab_size:,}-token BPE on {cuts['train'][1]:,} train chars")
    vocabulary = bpe.Vocabulary(bpe.train_tokenizer(text[: cuts["train"][1]], vocab_size).to_str())
    if vocabulary.size < vocab_size:
        log.warning(
            "text_bpe: the corpus ran out of pairs to merge at %d tokens (asked %d)", vocabulary.size, vocab_size
        )
    streams = {split: vocabulary.encode(text[a:b]) for split, (a, b) in cuts.items()}
    tables, extra, rule = _text_tables(streams, seq_len, "tokens")
    for split, (a, b) in cuts.items():
        extra[split] = {**extra[split], "tokens": extra[split]["chars"], "chars": b - a}
        extra[split]["chars_per_token"] = round((b - a) / max(len(streams[split]), 1), 4)
    rule = {
        "method": "contiguous chars [0,.9n) / [.9n,.95n) / [.95n,n) (as text8), each split tokenised on its own",
        "chars": len(text),
        "char_ranges": {s: list(c) for s, c in cuts.items()},
        **rule,
    }
    return tables, extra, rule, vocabulary


def _image_tables(raw: dict[str, Any]) -> tuple[dict, dict]:
    def table(x: np.ndarray, y: np.ndarray) -> pa.Table:
        return pa.table({"image": _fixed_binary(x), "label": pa.array(y, pa.int64())})

    x, y = raw["train_x"], raw["train_y"]
    if raw.get("val") == "last20":
        tr, va = np.arange(len(x) - 20), np.arange(len(x) - 20, len(x))
        rule: dict[str, Any] = {
            "method": "lossless subset: val = the last 20 of the 200 train images",
            "train_indices": [0, len(x) - 20],
            "val_indices": [len(x) - 20, len(x)],
        }
    else:
        tr, va = reference_split(len(x))
        rule = {
            "method": "torch.utils.data.random_split(range(n), [0.99, 0.01], "
            "generator=torch.Generator().manual_seed(2147483647))",
            "n": len(x),
            "val_fraction": VAL_FRACTION,
            "seed": REFERENCE_SEED,
            "order": "rows in the subsets' index order",
            "val_indices_sha256": hashlib.sha256(np.asarray(va, "<i8").tobytes()).hexdigest(),
        }
    rule["test"] = "official test set"
    tables = {"train": table(x[tr], y[tr]), "val": table(x[va], y[va]), "test": table(raw["test_x"], raw["test_y"])}
    return tables, rule


def _write_split(
    fs: pafs.FileSystem, root: str, name: str, split: str, tab: pa.Table, rows_per_shard: int, progress: bool
) -> dict[str, Any]:
    if tab.num_rows == 0:
        raise DataError(f"{name}: split {split!r} would be empty")
    shards = []
    count = -(-tab.num_rows // rows_per_shard)
    for i, start in enumerate(range(0, tab.num_rows, rows_per_shard)):
        part = tab.slice(start, rows_per_shard)
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        buf = sink.getvalue()
        rel = f"{split}/part-{i:05d}.parquet"
        write_bytes(fs, join(root, rel), buf)
        shards.append(
            {
                "path": rel,
                "rows": part.num_rows,
                "bytes": buf.size,
                "sha256": hashlib.sha256(memoryview(buf)).hexdigest(),
            }
        )
        say(progress, f"{name}: wrote {rel} ({i + 1}/{count}, {part.num_rows:,} rows, {buf.size / 1e6:.2f} MB)")
    return {"rows": tab.num_rows, "schema": schema_to_json(tab.schema), "shards": shards}


def _remove_old(fs: pafs.FileSystem, root: str) -> None:
    """Drop the old manifest first (so a failed prepare leaves no valid-looking dataset) and any
    old ``part-*.parquet`` shards of the three splits (a smaller re-prepare must not leave some)."""
    if exists(fs, join(root, MANIFEST_NAME)):
        fs.delete_file(join(root, MANIFEST_NAME))
    for split in SPLITS:
        for info in fs.get_file_info(pafs.FileSelector(join(root, split), allow_not_found=True)):
            base = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and base.startswith("part-") and base.endswith(".parquet"):
                fs.delete_file(info.path)


def _describe_source(name: str, raw: dict[str, Any], exact: bool) -> str:
    if name == "mnist":
        what = "MNIST IDX files (60,000 train + 10,000 test)"
    elif name == "cifar10":
        what = (
            "CIFAR-10 python batches (50,000 train + 10,000 test)"
            if raw.get("val") == "reference"
            else "CIFAR-10 lossless subset: train images 0..199 and test images 0..19, exact"
        )
    else:
        what = f"text8 chars ({len(raw['ids']):,})"
    return f"{what}; {'canonical checksums match' if exact else 'NOT the canonical files'}"


def _read_source(name: str, source: Any, progress: bool) -> tuple[dict, dict]:
    raw_name = "text8" if name == "text_bpe" else name  # subword data are made from text8-style text
    if source == sources.BUNDLED_LARGE:
        if raw_name != "text8":
            raise DataError(f"--source {sources.BUNDLED_LARGE} is text8-style text, not {name}")
        raw, src = sources.load_bundled_large(), {"kind": "vendored", "location": "data/raw/text8"}
    else:
        with tempfile.TemporaryDirectory(prefix="bfn-data-") as scratch:
            path, src = sources.locate(raw_name, source, Path(scratch), progress=progress)
            say(progress, f"{name}: reading {src['kind']} source {path}")
            raw = sources.load(raw_name, path)
    src["files"] = raw["files"]
    src["exact"] = all(f.get("canonical") for f in raw["files"].values())
    if src["kind"] == "vendored" and not src["exact"]:
        raise DataError(
            f"bundled {raw_name} files under {src['location']} do not match their recorded checksums "
            f"(see data/raw/{raw_name}/PROVENANCE.md): {raw['files']}"
        )
    if src["kind"] == "url" and not src["exact"]:
        raise DataError(f"{name}: downloaded files are not canonical: {raw['files']}")
    src["description"] = _describe_source(raw_name, raw, src["exact"])
    return raw, src


def _tables(name: str, raw: dict, seq_len: int, vocab_size: int | None, progress: bool) -> tuple:
    """(tables, per-split manifest fields, split rule, fields for the manifest's top level, tokenizer)."""
    if name == "text8":
        tables, extra, rule = _text8_tables(raw["ids"], seq_len)
        return tables, extra, rule, {"seq_len": seq_len, "vocab": TEXT8_ALPHABET, "vocab_size": 27}, None
    if name == "text_bpe":
        tables, extra, rule, vocabulary = _bpe_tables(raw["ids"], seq_len, vocab_size, progress)
        top = {
            "seq_len": seq_len,
            "vocab_size": vocabulary.size,
            "tokenizer": bpe.tokenizer_record(vocabulary, vocab_size),
        }
        return tables, extra, rule, top, vocabulary
    tables, rule = _image_tables(raw)
    return tables, {}, rule, {"num_classes": NUM_CLASSES}, None


def prepare(
    name: str,
    out: str,
    *,
    source: Any = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    seq_len: int = 256,
    vocab_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``name`` as Parquet shards plus ``manifest.json`` under ``out`` (folder or s3://).

    ``source`` (see ``sources.locate``): None = the bundled files under ``data/raw/<name>``;
    ``"download"`` = the canonical public file, sha256-checked; a URL; a local archive file
    (``cifar-10-python.tar.gz``, ``text8.zip``); or a folder holding the files; for text8 and
    text_bpe also ``"bundled-large"`` (the bundled text8 prefix + Wikipedia sample, 3.19M chars,
    text_bpe's default). ``text_bpe`` trains a BPE of at most ``vocab_size`` tokens on the train
    split and stores it as ``tokenizer.json`` beside the shards. Progress goes to the ``logging``
    module (INFO; DEBUG with ``progress=False``). Returns the manifest.
    """
    check_name(name)
    if int(rows_per_shard) < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if is_text(name) and int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if name == "text_bpe":
        bpe.check_vocab_size(vocab_size)
        source = sources.BUNDLED_LARGE if source is None else source
    elif vocab_size is not None:
        raise DataError(f"--vocab is for text-bpe; {name} has a fixed alphabet")
    rows_per_shard, seq_len = int(rows_per_shard), int(seq_len)
    raw, src = _read_source(name, source, progress)
    tables, extra, rule, top, vocabulary = _tables(name, raw, seq_len, vocab_size, progress)
    fs, root = resolve(out)
    _remove_old(fs, root)
    splits = {}
    for split in SPLITS:
        schema = expected_schema(name, seq_len=seq_len, split=split)
        assert tables[split].schema.equals(schema), (split, tables[split].schema, schema)
        splits[split] = {
            **_write_split(fs, root, name, split, tables[split], rows_per_shard, progress),
            **extra.get(split, {}),
        }
    if vocabulary is not None:
        write_bytes(fs, join(root, bpe.TOKENIZER_NAME), vocabulary.to_json().encode())
        say(progress, f"{name}: wrote {bpe.TOKENIZER_NAME} ({bpe.describe(vocabulary)})")
    manifest = {
        "dataset": name,
        "format_version": FORMAT_VERSION,
        "shape": [seq_len] if is_text(name) else list(IMAGE_SHAPE[name]),
        "dtype": "uint16" if name == "text_bpe" else "uint8",
        "splits": splits,
        "split_rule": rule,
        "source": src,
        "rows_per_shard": rows_per_shard,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "created_by": f"pipeline.data.prepare (pyarrow {pa.__version__}, python {sys.version.split()[0]})",
        **top,
    }
    write_bytes(fs, join(root, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    say(
        progress,
        f"{name}: wrote {str(out).rstrip('/')}/{MANIFEST_NAME} ("
        + ", ".join(f"{s} {v['rows']:,}" for s, v in splits.items())
        + " rows)",
    )
    return manifest

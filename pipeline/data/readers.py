"""Reading a prepared split: Ray Data datasets for training, a plain pyarrow reader for the rest.

* ``ray_dataset``: what the Train workers consume. Rows are ``preprocess``ed (deterministic), so
  MNIST comes as grey levels and text8 training rows as 2*seq_len chars; the worker applies
  ``to_model`` with a generator from ``batch_generator(seed, rank, step, device)``.
* ``iter_batches``: evaluation, benchmarks and tests, without Ray. It yields model-ready numpy
  batches: ``to_model`` is applied with the generator ``reader_generator(seed, epoch)``, consumed
  batch by batch (so the draws depend on ``batch_size`` too). For text8 val/test, ``stride``
  re-cuts the split's stream into windows starting every ``stride`` chars.

Subsets (``fraction`` < 1) are chosen by content, not position: every row gets a 64-bit keyed
blake2b hash of its bytes (key = ``seed``), and the rows with the ``round(fraction * n)`` smallest
hashes are kept (more only if identical rows tie at the cut). The subset is the same for both
readers, local or S3, any sharding, and nested: a smaller fraction is a subset of a larger one for
the same seed. The cut-off is computed on the calling process by reading the split once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.data.manifest import num_rows, read_manifest, verify
from pipeline.data.storage import DataError, check_name, is_text, join, resolve
from pipeline.data.transforms import (
    as_matrix,
    preprocess,
    reader_generator,
    text8_stream,
    text8_windows,
    to_model,
)

RAY_MAP_BATCH_SIZE = 1024
# Splits up to this size (Parquet bytes) that ray_dataset materializes are read by the calling
# process and handed to Ray as SMALL_SPLIT_BLOCKS blocks; larger ones stream through read tasks.
SMALL_SPLIT_BYTES = 256 * 1024**2
SMALL_SPLIT_BLOCKS = 8
# ... and preprocessed there too when the result is at most this big (MNIST and text8 keep their
# size; CIFAR-10's float32 bin centres are 4x the stored bytes)
EAGER_PREPROCESS_BYTES = 256 * 1024**2


def _columns(name: str) -> tuple[str, str]:
    """(data column, auxiliary int64 column) of ``name``'s shards."""
    return ("ids", "offset") if is_text(name) else ("image", "label")


def _table_dict(tab: pa.Table | pa.RecordBatch) -> dict[str, Any]:
    return {n: tab.column(n) for n in tab.schema.names}


def _row_keys(name: str, batch: dict[str, Any], seed: int) -> np.ndarray:
    """64-bit keyed hash of each row's content (data bytes + the int64 aux column)."""
    data_col, aux_col = _columns(name)
    mat = as_matrix(batch, data_col, None)
    aux = batch[aux_col]
    aux = aux.to_numpy(zero_copy_only=False) if isinstance(aux, pa.Array | pa.ChunkedArray) else aux
    rows = np.concatenate([mat, np.asarray(aux, dtype="<i8").reshape(-1, 1).view(np.uint8)], axis=1)
    key = int(seed).to_bytes(16, "little", signed=True)
    digests = (hashlib.blake2b(r.tobytes(), digest_size=8, key=key, person=b"subset").digest() for r in rows)
    return np.fromiter((int.from_bytes(d, "little") for d in digests), dtype=np.uint64, count=len(rows))


def _subset_threshold(tables: Iterable[pa.Table], name: str, n: int, fraction: float, seed: int) -> int | None:
    """The largest row key kept for ``fraction`` (None = keep everything, without reading)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return None
    k = max(1, int(round(fraction * n)))
    keys = np.concatenate([_row_keys(name, _table_dict(t), seed) for t in tables])
    return int(np.partition(keys, k - 1)[k - 1])


def _keep_subset(tab: pa.Table, *, name: str, seed: int, threshold: int | None) -> pa.Table:
    if threshold is None:
        return tab
    return tab.filter(pa.array(_row_keys(name, _table_dict(tab), seed) <= np.uint64(threshold)))


def _read_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def _split_paths(uri: str, split: str, name: str, seq_len: int | None) -> tuple[pafs.FileSystem, list[str], dict]:
    """(filesystem, shard paths, manifest) after checking the manifest, footers and ``seq_len``."""
    check_name(name)
    man = read_manifest(uri)
    if man["dataset"] != name:
        raise DataError(f"{uri} holds dataset {man['dataset']!r}, not {name!r}")
    if is_text(name) and seq_len is not None and int(seq_len) != man["seq_len"]:
        raise DataError(
            f"{uri} was prepared with seq_len {man['seq_len']}, not {seq_len}: re-run "
            f"`bfn data prepare {name.replace('_', '-')} --seq-len {seq_len} --out {uri}` or set data.seq_len"
        )
    verify(uri, [split], check_checksums=False)
    fs, root = resolve(uri)
    return fs, [join(root, s["path"]) for s in man["splits"][split]["shards"]], man


# ================================================================================================
# Ray Data
# ================================================================================================


def _ray_preprocess(tab: pa.Table, *, name: str, num_bins: int, labels: bool = False) -> dict[str, np.ndarray]:
    return preprocess(name, _table_dict(tab.combine_chunks()), num_bins=num_bins, labels=labels)


def _preprocessed_bytes(tab: pa.Table, name: str, num_bins: int, labels: bool = False) -> int:
    """Bytes of ``preprocess``'s output for ``tab``, from its output for the first row."""
    if tab.num_rows == 0:
        return 0
    row = _ray_preprocess(tab.slice(0, 1), name=name, num_bins=num_bins, labels=labels)
    return tab.num_rows * sum(values.nbytes for values in row.values())


def _map_bundles(blocks: list[pa.Table], rows: int) -> list[pa.Table]:
    """The inputs of ``map_batches(batch_size=rows)``'s tasks, whose outputs are one block each:
    consecutive blocks joined until they hold at least ``rows`` rows."""
    bundles, pending = [], []
    for block in blocks:
        pending.append(block)
        if sum(b.num_rows for b in pending) >= rows:
            bundles.append(pa.concat_tables(pending))
            pending = []
    return bundles + ([pa.concat_tables(pending)] if pending else [])


def _tensor_block(batch: dict[str, np.ndarray]) -> pa.Table:
    """A Ray Data block of ``{"x": (B, ...) array}``, as a map_batches task would return it."""
    # lazy: pipeline.data serves `bfn data`, eval, sample and quality, which run without Ray and never import it
    from ray.data.extensions import ArrowTensorArray

    return pa.table({column: ArrowTensorArray.from_numpy(values) for column, values in batch.items()})


def ray_dataset(
    uri: str,
    split: str,
    name: str,
    *,
    num_bins: int = 256,
    fraction: float = 1.0,
    materialize: bool = True,
    seed: int | None = 0,
    seq_len: int | None = None,
    labels: bool = False,
) -> Any:
    """A Ray Dataset of ``{"x": ...}`` rows of ``split`` (local folder or s3://), as ``preprocess`` makes them.

    Reads the split's shards (checking manifest and footers first; run ``verify`` for checksums),
    keeps the ``fraction`` subset chosen by ``seed`` (None = 0), materializes the stored rows in
    the object store when ``materialize`` (recommended for these small datasets on few cores: the
    read then runs once; splits up to ``SMALL_SPLIT_BYTES`` are read by this process, without read
    tasks) and maps ``preprocess`` lazily. Such a small split whose preprocessed rows fit in
    ``EAGER_PREPROCESS_BYTES`` is preprocessed here too: iterating it then runs no Ray task at all
    (a map task launched from a Train worker waited ~2 s for its CPU budget each validation).
    ``seq_len``: when given, must match the text8 manifest. ``labels`` (class-conditional runs): rows
    ``{"x", "label"}``; without it the dataset is exactly the unconditional one.
    The rows are not model-ready: apply ``to_model`` to each batch. Needs a running Ray (or starts one).
    """
    import ray.data  # lazy: pipeline.data is imported by the commands that run without Ray, which never import it

    seed = 0 if seed is None else int(seed)
    fs, paths, man = _split_paths(uri, split, name, seq_len)
    small = materialize and sum(s["bytes"] for s in man["splits"][split]["shards"]) <= SMALL_SPLIT_BYTES
    # a small split is read once, here; otherwise the subset cut-off reads it shard by shard
    tables = [_read_table(fs, p) for p in paths] if small else (_read_table(fs, p) for p in paths)
    threshold = _subset_threshold(tables, name, num_rows(uri, split), fraction, seed)
    subset = {"name": name, "seed": seed, "threshold": threshold}
    if small:
        # the same rows as the streaming read below, without its read tasks (~10-25 s per call on 2 cores)
        table = _keep_subset(pa.concat_tables(tables), **subset)
        step = max(1, -(-table.num_rows // SMALL_SPLIT_BLOCKS))
        blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
        if _preprocessed_bytes(table, name, num_bins, labels) <= EAGER_PREPROCESS_BYTES:
            # the blocks the lazy map below would yield, computed once here: a seeded local shuffle
            # depends on block boundaries, so a launch draws the same batches either way
            blocks = [
                _tensor_block(_ray_preprocess(b, name=name, num_bins=num_bins, labels=labels))
                for b in _map_bundles(blocks, RAY_MAP_BATCH_SIZE)
            ]
            return ray.data.from_blocks(blocks)
        # from_blocks puts the blocks as they are; from_arrow runs a metadata task per block (~1.5 s)
        ds = ray.data.from_blocks(blocks)
    else:
        ds = ray.data.read_parquet(paths, filesystem=fs, file_extensions=["parquet"])
        if threshold is not None:
            ds = ds.map_batches(_keep_subset, batch_format="pyarrow", batch_size=None, fn_kwargs=subset)
        if materialize:
            ds = ds.materialize()
    return ds.map_batches(
        _ray_preprocess,
        batch_format="pyarrow",
        batch_size=RAY_MAP_BATCH_SIZE,
        fn_kwargs={"name": name, "num_bins": num_bins, "labels": labels},
        udf_modifying_row_count=False,
    )


# ================================================================================================
# plain pyarrow reader
# ================================================================================================


def _stored_chunks(
    fs: pafs.FileSystem, paths: list[str], name: str, seed: int, threshold: int | None, chunk_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """The stored rows, shard by shard, as {data column: uint8 matrix, aux column: int64}."""
    data_col, aux_col = _columns(name)
    for path in paths:
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows):
                tab = _keep_subset(pa.Table.from_batches([rb]), name=name, seed=seed, threshold=threshold)
                d = _table_dict(tab)
                yield {
                    data_col: as_matrix(d, data_col, None).copy(),
                    aux_col: d[aux_col].to_numpy(zero_copy_only=False),
                }


def _rebatch(chunks: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    buf: dict[str, np.ndarray] | None = None
    for chunk in chunks:
        buf = chunk if buf is None else {c: np.concatenate([buf[c], chunk[c]]) for c in buf}
        pos, have = 0, len(next(iter(buf.values())))
        while have - pos >= batch_size:
            yield {c: v[pos : pos + batch_size] for c, v in buf.items()}
            pos += batch_size
        buf = {c: v[pos:] for c, v in buf.items()}
    if buf is not None and len(next(iter(buf.values()))):
        yield buf


def _permute(chunks: Iterable[dict[str, np.ndarray]], seed: int, epoch: int) -> list[dict[str, np.ndarray]]:
    every = list(chunks)
    if not every:
        return []
    rows = {c: np.concatenate([p[c] for p in every]) for c in every[0]}
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(2, int(epoch))))
    order = rng.permutation(len(next(iter(rows.values()))))
    return [{c: v[order] for c, v in rows.items()}]


def _stride_windows(
    chunks: Iterable[dict[str, np.ndarray]], seq_len: int, stride: int, where: str
) -> Iterator[dict[str, np.ndarray]]:
    every = list(chunks)
    ids = np.concatenate([c["ids"] for c in every]) if every else np.empty((0, seq_len), np.uint8)
    offsets = np.concatenate([c["offset"] for c in every]) if every else np.empty(0, np.int64)
    windows = text8_windows(text8_stream(ids, offsets, where), seq_len, stride)
    for start in range(0, len(windows), 4096):
        yield {"ids": np.ascontiguousarray(windows[start : start + 4096])}


def iter_batches(
    uri: str,
    split: str,
    name: str,
    *,
    batch_size: int,
    num_bins: int = 256,
    seed: int = 0,
    fraction: float = 1.0,
    shuffle: bool = False,
    epoch: int = 0,
    stride: int | None = None,
    seq_len: int | None = None,
    labels: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Model-ready ``{"x": numpy}`` batches of ``split`` without Ray (evaluation, benchmarks, tests).

    Same rows (``fraction``) and value checks as ``ray_dataset``, then ``to_model`` with
    ``reader_generator(seed, epoch)``: MNIST int64 {0, 1} (B, 28, 28, 1) (a new binarisation for
    a new ``seed`` or ``epoch``), CIFAR-10 float32 (B, 32, 32, 3), text8 int64 (B, seq_len)
    (training rows cropped at a random offset). Batches have ``batch_size`` rows except possibly
    the last. Without ``shuffle`` rows come in stored order, streamed shard by shard; with it the
    split is loaded and permuted with (``seed``, ``epoch``).

    ``stride`` (text8 only): windows of seq_len chars starting every ``stride`` chars of the
    split's stored stream (for val/test: ``stride=seq_len`` gives the stored rows, ``stride=1``
    every offset as the reference evaluates; the tail shorter than one row, counted in the
    manifest, is not part of the stream). ``fraction`` must then be 1. ``labels`` (images): batches
    ``{"x", "label"}`` with the class ids int64 (B,).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stride is not None and (name != "text8" or fraction != 1.0):
        raise ValueError(f"stride is for text8 with fraction=1 only (got {name}, fraction={fraction})")
    fs, paths, man = _split_paths(uri, split, name, seq_len)
    threshold = _subset_threshold((_read_table(fs, p) for p in paths), name, num_rows(uri, split), fraction, seed)
    rows_seq_len = int(man.get("seq_len", 0))
    source: Iterable[dict[str, np.ndarray]] = _stored_chunks(
        fs, paths, name, seed, threshold, max(int(batch_size), 1024)
    )
    if stride is not None:
        source = _stride_windows(source, rows_seq_len, int(stride), f"{uri} split {split!r}")
    if shuffle:
        source = _permute(source, seed, epoch)
    generator = reader_generator(seed, epoch)
    for raw in _rebatch(source, int(batch_size)):
        rows = preprocess(name, raw, num_bins=num_bins, labels=labels)
        x = to_model(torch.from_numpy(rows["x"]), name, seq_len=rows_seq_len, generator=generator).numpy()
        yield {"x": x, "label": rows["label"]} if labels else {"x": x}


def labelled_images(uri: str, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Every stored row of an image split with its label: (uint8 pixels (N, H*W*C), int64 (N,)).
    ``iter_batches`` yields model inputs only; the sample-quality classifier trains on labels too."""
    if is_text(name):
        raise ValueError(f"labelled_images: {name} has no labels")
    fs, paths, _ = _split_paths(uri, split, name, None)
    tables = [_read_table(fs, p) for p in paths]
    images = np.concatenate([as_matrix(_table_dict(t), "image", None) for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)
    return images, labels

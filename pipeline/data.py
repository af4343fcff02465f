"""Data layer: prepare sharded Parquet + manifest, validate it, read it (Ray Data or plain pyarrow).

On-disk format (``FORMAT_VERSION`` 1), the same on a local folder and under ``s3://bucket/prefix``::

    <root>/manifest.json
    <root>/{train,val,test}/part-00000.parquet ...

=========  ======================================  ==========================================
dataset    Parquet columns                         one row
=========  ======================================  ==========================================
mnist      image: fixed_size_binary[784],          uint8 pixels 0..255, row-major 28x28
           label: int64
cifar10    image: fixed_size_binary[3072],         uint8 HWC 32x32x3
           label: int64
text8      ids: fixed_size_binary[seq_len],        char ids (0 = space, 1..26 = a..z)
           offset: int64                           char offset of the window in its split
=========  ======================================  ==========================================

Splits (BFN_SPEC section 0):

* mnist: train/val = ``torch.utils.data.random_split(range(60000), [0.99, 0.01],
  generator=torch.Generator().manual_seed(2147483647))`` (59400/600, rows stored in the subsets'
  index order), test = the official 10,000.
* cifar10 from the full python tarball: the same rule on the 50,000 (49500/500); from the vendored
  lossless subset (200 train + 20 test images): train = train images 0..179, val = 180..199,
  test = the 20 test images.
* text8: chars [0, .9n) / [.9n, .95n) / [.95n, n) as in the reference, each cut into
  non-overlapping windows of ``seq_len`` chars (the reference uses every offset; a shorter tail is
  dropped and counted in the manifest).

Preprocessing (``preprocess``) follows the reference transforms: dynamic binarisation for MNIST,
bin-centre quantisation for CIFAR-10, int64 ids for text8.

Randomness of the MNIST binarisation (documented choice). Ray Data re-runs ``map_batches`` on
every pass, but the mapped function is not told which pass it is in, batches run in whichever
worker is free, and Ray 2.60's Parquet reader does not even keep the row order inside a block
(it put all six MNIST train shards in one block, and two reads of them gave the rows in different
orders), so neither a batch index nor a batch fingerprint is stable. The draws are therefore
keyed per row: every row has a 64-bit keyed blake2b hash of its bytes (key = ``seed``), and a
small counter actor (0 CPU, owned by the process that called ``ray_dataset``) returns how many
times each row key was preprocessed before: its ``visit``, i.e. the pass number. Pixel j of the
row is 1 iff ``floor(255 * u / 2**32) < pixel``, ``u`` being 32 bits of ``splitmix64`` of (key,
visit, j) (Bernoulli(pixel/255) up to 2^-32). So draws differ between rows and between epochs, do
not depend on batching, block order, sharding or scheduling, and are reproducible from ``seed``:
pass k of any ``ray_dataset(seed=s)`` equals ``iter_batches(seed=s, epoch=k)`` row by row.
Caveats: every execution of the dataset is a pass (an extra ``count()`` or ``take()`` that runs
the map shifts later epochs by one); a task that Ray retries after a failure counts twice;
identical rows (same image and label) share a key, so under Ray they take turns (visits 2k and
2k+1) while ``iter_batches`` gives both the draw of visit k. ``seed=None`` uses fresh OS entropy.
The public ``preprocess`` draws from whatever numpy ``Generator`` it is given.

Subsets (``fraction`` < 1) are chosen by content, not position: every row gets a 64-bit keyed
blake2b hash of its bytes (key = ``seed``), and the rows with the ``round(fraction * n)`` smallest
hashes are kept (more only if identical rows tie at the cut). The subset is the same for both
readers, local or S3, any sharding, and nested: a smaller fraction is a subset of a larger one for
the same seed. The cut-off is computed on the driver by reading the split once with pyarrow.

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

import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import pickle
import posixpath
import struct
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "DATASETS",
    "FORMAT_VERSION",
    "SPLITS",
    "DataError",
    "download",
    "expected_schema",
    "text8_decode",
    "text8_encode",
    "iter_batches",
    "num_rows",
    "prepare",
    "preprocess",
    "ray_dataset",
    "raw_dir",
    "read_manifest",
    "reference_split",
    "verify",
]

DATASETS = ("mnist", "cifar10", "text8")
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_ROWS_PER_SHARD = 10_000
ROW_GROUP_ROWS = 4_096
REFERENCE_SEED = 2147483647
VAL_FRACTION = 0.01
TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id = position; the reference shows ' ' as '_'
RAY_MAP_BATCH_SIZE = 1024
# Splits up to this size (Parquet bytes) that ray_dataset materializes are read by the calling
# process and handed to Ray as SMALL_SPLIT_BLOCKS blocks; larger ones stream through read tasks.
SMALL_SPLIT_BYTES = 256 * 1024**2
SMALL_SPLIT_BLOCKS = 8
KEY_COLUMN = "_bfn_row_key"  # internal column added by ray_dataset for MNIST (uint64)

_IMAGE_SHAPE = {"mnist": (28, 28), "cifar10": (32, 32, 3)}
_NUM_CLASSES = 10

# --- canonical checksums ------------------------------------------------------------------------
# MNIST: the LeCun .gz files (md5, as used by torchvision) and the uncompressed IDX files (sha256).
MNIST_FILES = {
    "train-images-idx3-ubyte": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        "d53e105ee54ea40749a09fcbcd1e9432",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        "9fb629c4189551a2d022fa330f9573f3",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_SUBSET = "cifar10_lossless_subset.npz"
CIFAR10_SUBSET_SHA256 = "85cd04590f3681e2d4bb54e243e7f178a8d0a60e56ca38df16a12d0addf90b46"
TEXT8_ZIP = "text8.zip"
TEXT8_ZIP_SHA256 = "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232"
TEXT8_SHA256 = "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"  # member "text8"
TEXT8_SUBSET = "text8_first100k.txt"
TEXT8_SUBSET_SHA256 = "cf4215bfd474fdffa9944796ac527f0e8f0fd3302da25d5e5c211877c1d2ed4a"

# Where the public files live (for reference; ``prepare(source=URL)`` takes any mirror).
PUBLIC_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "text8": "http://mattmahoney.net/dc/text8.zip",
}


class DataError(ValueError):
    """Bad or missing data: the message names the dataset, split, shard path or column at fault."""


# ================================================================================================
# schema, paths, filesystems
# ================================================================================================


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return name


def expected_schema(name: str, *, seq_len: int = 256) -> pa.Schema:
    """The Parquet schema of dataset ``name`` (``seq_len`` only matters for text8)."""
    _check_name(name)
    if name == "text8":
        return pa.schema([("ids", pa.binary(int(seq_len))), ("offset", pa.int64())])
    width = int(np.prod(_IMAGE_SHAPE[name]))
    return pa.schema([("image", pa.binary(width)), ("label", pa.int64())])


def _data_column(name: str) -> str:
    return "ids" if name == "text8" else "image"


def _aux_column(name: str) -> str:
    return "offset" if name == "text8" else "label"


def _schema_to_json(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def raw_dir() -> Path:
    """The vendored raw data (``data/raw`` in the repository; ``BFN_RAW_DIR`` overrides)."""
    env = os.environ.get("BFN_RAW_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "raw"


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https", "file", "ftp")


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
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


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path without scheme) for a local path, file://, s3:// or other URI."""
    uri = str(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "s3":
        path = (parsed.netloc + parsed.path).rstrip("/")
        return _s3_filesystem(parsed.netloc), path
    if len(parsed.scheme) > 1:  # file://, gs://, hdfs://, ... (one letter = a Windows drive)
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _write_bytes(fs: pafs.FileSystem, path: str, data: Any) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # atomic on one local filesystem
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[data] {msg}", flush=True)


# ================================================================================================
# downloads
# ================================================================================================


def _fetch(url: str, dest: Path, *, progress: bool, timeout: float = 60.0) -> dict[str, str]:
    """Stream ``url`` to ``dest``; return its md5 and sha256."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    req = urllib.request.Request(url, headers={"User-Agent": "bfn-ray-data/1"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                sha.update(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    _log(progress, f"  {dest.name}: {done / total:4.0%} of {total:,} bytes")
                    next_report += 0.1
    except OSError as exc:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {exc}") from exc
    tmp.replace(dest)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _file_digests(path: Path) -> dict[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def download(
    url: str,
    dest_dir: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    filename: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` (http, https, ftp or file) into ``dest_dir`` and check its checksum(s).

    At least one of ``md5``/``sha256`` is required. On a mismatch the file is deleted and
    ``DataError`` names the URL, the expected and the actual digest. A file already in
    ``dest_dir`` with the right checksum is reused.
    """
    if not (md5 or sha256):
        raise ValueError("download() needs an expected md5 or sha256")
    name = filename or posixpath.basename(urllib.parse.urlparse(url).path) or "download"
    dest = Path(dest_dir) / name
    expected = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if dest.exists() and all(_file_digests(dest)[k] == v for k, v in expected.items()):
        _log(progress, f"using cached {dest}")
        return dest
    _log(progress, f"downloading {url}")
    got = _fetch(url, dest, progress=progress)
    for kind, want in expected.items():
        if got[kind] != want:
            dest.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {url}: expected {kind} {want}, got {got[kind]}")
    _log(progress, f"verified {name} ({', '.join(f'{k} {got[k]}' for k in expected)})")
    return dest


# ================================================================================================
# raw sources
# ================================================================================================


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _maybe_gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find_mnist_file(folder: Path, base: str) -> Path:
    dotted = base.replace(
        "-idx", ".idx"
    )  # e.g. train-images.idx3-ubyte (the PyPI/Windows spelling)
    for cand in (f"{base}.gz", base, f"{dotted}.gz", dotted):
        if (folder / cand).is_file():
            return folder / cand
    raise DataError(f"mnist source {folder}: missing {base}.gz (or {base})")


def _parse_idx(data: bytes, path: Path, *, images: bool) -> np.ndarray:
    want = 2051 if images else 2049
    head = 16 if images else 8
    if len(data) < head or struct.unpack(">I", data[:4])[0] != want:
        raise DataError(f"{path}: not an IDX {'image' if images else 'label'} file (magic {want})")
    if images:
        n, rows, cols = struct.unpack(">III", data[4:16])
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        shape: tuple[int, ...] = (n, rows * cols)
    else:
        (n,) = struct.unpack(">I", data[4:8])
        shape = (n,)
    size = int(np.prod(shape))
    if len(data) != head + size:
        raise DataError(f"{path}: {len(data) - head} data bytes, header promises {size}")
    return np.frombuffer(data, np.uint8, count=size, offset=head).reshape(shape)


def _load_mnist(folder: Path) -> dict[str, Any]:
    arrays, files = {}, {}
    for base, (_, canon_sha) in MNIST_FILES.items():
        path = _find_mnist_file(folder, base)
        data = _maybe_gunzip(path.read_bytes())
        digest = _sha256(data)
        files[path.name] = {"sha256_uncompressed": digest, "canonical": digest == canon_sha}
        arrays[base] = _parse_idx(data, path, images="images" in base)
    out = {"files": files}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if len(x) != len(y):
            raise DataError(f"mnist source {folder}: {len(x)} {split} images but {len(y)} labels")
        out[f"{split}_x"], out[f"{split}_y"] = x, y.astype(np.int64)
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 python batches without running arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DataError(f"CIFAR-10 batch pickle refers to {module}.{name}; refusing to load it")
        return super().find_class(module, name)


def _cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{where}: not a CIFAR-10 python batch ({exc})") from exc
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{where}: data {x.shape} / labels {y.shape}, expected (N, 3072) / (N,)")
    # stored as 3 colour planes (CHW); the project stores HWC like torchvision's .data
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(-1, 3072), y


def _load_cifar10(folder: Path) -> dict[str, Any]:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    tarball, extracted = folder / CIFAR10_TARBALL, folder / "cifar-10-batches-py"
    if tarball.is_file() or extracted.is_dir():
        blobs: dict[str, bytes] = {}
        files: dict[str, Any] = {}
        if tarball.is_file():
            digests = _file_digests(tarball)
            files[CIFAR10_TARBALL] = {**digests, "canonical": digests["md5"] == CIFAR10_TARBALL_MD5}
            with tarfile.open(tarball, "r:gz") as tar:
                for member in tar.getmembers():
                    base = posixpath.basename(member.name)
                    if member.isfile() and base in names:
                        blobs[base] = tar.extractfile(member).read()
        else:
            for n in names:
                if (extracted / n).is_file():
                    blobs[n] = (extracted / n).read_bytes()
            files["cifar-10-batches-py"] = {"canonical": False, "note": "extracted folder"}
        missing = [n for n in names if n not in blobs]
        if missing:
            raise DataError(f"cifar10 source {folder}: missing batch file(s) {', '.join(missing)}")
        parts = [_cifar_batch(blobs[n], f"{folder}/{n}") for n in names]
        return {
            "files": files,
            "train_x": np.concatenate([p[0] for p in parts[:5]]),
            "train_y": np.concatenate([p[1] for p in parts[:5]]),
            "test_x": parts[5][0],
            "test_y": parts[5][1],
            "val": "reference",
        }
    subset = folder / CIFAR10_SUBSET
    if not subset.is_file():
        raise DataError(
            f"cifar10 source {folder}: no {CIFAR10_TARBALL}, cifar-10-batches-py/ "
            f"or {CIFAR10_SUBSET}"
        )
    digest = _file_digests(subset)["sha256"]
    with np.load(subset, allow_pickle=False) as z:
        xtr, ytr = z["x_train_first200"], z["y_train_first200"]
        xte, yte = z["x_test_first20"], z["y_test_first20"]
    for key, arr in (("x_train_first200", xtr), ("x_test_first20", xte)):
        if arr.dtype != np.uint8 or arr.shape[1:] != (32, 32, 3):
            raise DataError(
                f"{subset}: {key} is {arr.dtype}{arr.shape}, expected uint8 (N,32,32,3)"
            )
    return {
        "files": {CIFAR10_SUBSET: {"sha256": digest, "canonical": digest == CIFAR10_SUBSET_SHA256}},
        "train_x": xtr.reshape(len(xtr), -1),
        "train_y": ytr.astype(np.int64),
        "test_x": xte.reshape(len(xte), -1),
        "test_y": yte.astype(np.int64),
        "val": "last20",
    }


def _load_text8(folder: Path) -> dict[str, Any]:
    zpath, plain, subset = folder / TEXT8_ZIP, folder / "text8", folder / TEXT8_SUBSET
    if zpath.is_file():
        zsha = _file_digests(zpath)["sha256"]
        with zipfile.ZipFile(zpath) as zf:
            members = zf.namelist()
            member = "text8" if "text8" in members else members[0]
            text = zf.read(member)
        sha = _sha256(text)
        files = {
            TEXT8_ZIP: {
                "sha256": zsha,
                "member": member,
                "member_sha256": sha,
                "canonical": zsha == TEXT8_ZIP_SHA256 or sha == TEXT8_SHA256,
            }
        }
    elif plain.is_file() or subset.is_file():
        path = plain if plain.is_file() else subset
        text = path.read_bytes()
        sha = _sha256(text)
        files = {
            path.name: {"sha256": sha, "canonical": sha in (TEXT8_SHA256, TEXT8_SUBSET_SHA256)}
        }
    else:
        raise DataError(f"text8 source {folder}: no {TEXT8_ZIP}, text8 or {TEXT8_SUBSET}")
    return {"files": files, "ids": text8_encode(text, where=str(folder))}


def text8_encode(text: bytes | str, *, where: str = "text") -> np.ndarray:
    """Map text8 chars to ids (' ' -> 0, 'a'..'z' -> 1..26); anything else is a DataError."""
    raw = np.frombuffer(
        text.encode("ascii", "replace") if isinstance(text, str) else text, np.uint8
    )
    ids = np.where(raw == 32, 0, raw.astype(np.int16) - 96)
    bad = np.flatnonzero((ids < 0) | (ids > 26))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: char {raw[i : i + 1].tobytes()!r} at offset {i} is not in the "
            f"text8 alphabet (a-z and space); {bad.size} such chars"
        )
    return ids.astype(np.uint8)


def text8_decode(ids: Iterable[int]) -> str:
    return "".join(TEXT8_ALPHABET[int(i)] for i in ids)


def reference_split(
    n: int, val_fraction: float = VAL_FRACTION, seed: int = REFERENCE_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices exactly as the reference: ``random_split(range(n), [1-f, f], gen)``.

    torch floors ``n * fraction`` for each part and hands the remainder out round-robin from the
    first part, then slices one ``torch.randperm(n, generator)``: train is its head, val its tail.
    """
    import torch
    from torch.utils.data import random_split

    train, val = random_split(
        range(n), [1.0 - val_fraction, val_fraction], generator=torch.Generator().manual_seed(seed)
    )
    return np.asarray(train.indices, np.int64), np.asarray(val.indices, np.int64)


# ================================================================================================
# prepare
# ================================================================================================


def _fixed_binary(mat: np.ndarray) -> pa.FixedSizeBinaryArray:
    mat = np.ascontiguousarray(mat, dtype=np.uint8)
    n, width = mat.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(mat)])


def _mnist_ok(path: Path, digests: dict[str, str], base: str) -> bool:
    """A canonical MNIST file: the LeCun .gz md5, or (re-compressed mirror) canonical IDX bytes."""
    gz_md5, idx_sha = MNIST_FILES[base]
    if digests["md5"] == gz_md5:
        return True
    try:
        return _sha256(_maybe_gunzip(path.read_bytes())) == idx_sha
    except (OSError, EOFError, gzip.BadGzipFile):
        return False


def _text8_ok(path: Path, digests: dict[str, str]) -> bool:
    """The canonical text8.zip, or any zip whose member ``text8`` is the canonical text."""
    if digests["sha256"] == TEXT8_ZIP_SHA256:
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return _sha256(zf.read("text8")) == TEXT8_SHA256
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _fetch_verified(url: str, path: Path, ok: Any, expected: str, progress: bool) -> None:
    """Download ``url`` to ``path`` unless a verified copy is there; ``ok(path, digests)``."""
    if path.is_file() and ok(path, _file_digests(path)):
        _log(progress, f"using cached {path}")
        return
    _log(progress, f"downloading {url}")
    got = _fetch(url, path, progress=progress)
    if not ok(path, got):
        path.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: md5 {got['md5']}, sha256 {got['sha256']}; "
            f"expected {expected}"
        )
    _log(progress, f"verified {path.name}")


def _download_source(name: str, url: str, dest: Path, progress: bool) -> dict[str, Any]:
    """Download the canonical public file(s) for ``name`` from ``url`` into ``dest``; verify."""
    if name == "mnist":
        names = {f"{b}.gz" for b in MNIST_FILES}
        if url.endswith("/"):
            base = url
        elif posixpath.basename(urllib.parse.urlparse(url).path) in names:
            base = url.rsplit("/", 1)[0] + "/"  # the URL of one of the four files
        else:
            base = url + "/"
        for b, (gz_md5, idx_sha) in MNIST_FILES.items():
            _fetch_verified(
                urllib.parse.urljoin(base, f"{b}.gz"),
                dest / f"{b}.gz",
                lambda p, d, b=b: _mnist_ok(p, d, b),
                f"the canonical .gz md5 {gz_md5} or uncompressed sha256 {idx_sha}",
                progress,
            )
        return {"url": base}
    if name == "cifar10":
        file_url = url + CIFAR10_TARBALL if url.endswith("/") else url
        download(
            file_url, dest, md5=CIFAR10_TARBALL_MD5, filename=CIFAR10_TARBALL, progress=progress
        )
        return {"url": file_url}
    file_url = url + TEXT8_ZIP if url.endswith("/") else url
    _fetch_verified(
        file_url,
        dest / TEXT8_ZIP,
        _text8_ok,
        f"sha256 {TEXT8_ZIP_SHA256} (or a member 'text8' with sha256 {TEXT8_SHA256})",
        progress,
    )
    return {"url": file_url}


def _split_tables(name: str, raw: dict[str, Any], seq_len: int) -> tuple[dict, dict]:
    """{split: pa.Table} and a description of how the splits were made."""
    if name == "text8":
        ids = raw["ids"]
        n = len(ids)
        cuts = {
            "train": (0, int(n * 0.9)),
            "val": (int(n * 0.9), int(n * 0.95)),
            "test": (int(n * 0.95), n),
        }
        tables, dropped = {}, {}
        for split, (a, b) in cuts.items():
            chars = ids[a:b]
            nwin = len(chars) // seq_len
            tables[split] = pa.table(
                {
                    "ids": _fixed_binary(chars[: nwin * seq_len].reshape(nwin, seq_len)),
                    "offset": pa.array(np.arange(nwin, dtype=np.int64) * seq_len, pa.int64()),
                }
            )
            dropped[split] = len(chars) - nwin * seq_len
        rule = {
            "method": "contiguous chars [0,.9n) / [.9n,.95n) / [.95n,n) (reference prepare_text8)",
            "chars": n,
            "char_ranges": {s: list(c) for s, c in cuts.items()},
            "windows": f"non-overlapping, seq_len={seq_len}, offset = start char within the split",
            "dropped_tail_chars": dropped,
        }
        return tables, rule

    def table(x: np.ndarray, y: np.ndarray) -> pa.Table:
        return pa.table({"image": _fixed_binary(x), "label": pa.array(y, pa.int64())})

    x, y = raw["train_x"], raw["train_y"]
    if raw.get("val") == "last20":
        tr, va = np.arange(len(x) - 20), np.arange(len(x) - 20, len(x))
        rule = {
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
            "val_indices_sha256": _sha256(np.asarray(va, "<i8").tobytes()),
        }
    rule["test"] = "official test set"
    tables = {
        "train": table(x[tr], y[tr]),
        "val": table(x[va], y[va]),
        "test": table(raw["test_x"], raw["test_y"]),
    }
    return tables, rule


def _write_split(
    fs: pafs.FileSystem,
    root: str,
    name: str,
    split: str,
    tab: pa.Table,
    rows_per_shard: int,
    progress: bool,
) -> dict[str, Any]:
    if tab.num_rows == 0:
        raise DataError(f"{name}: split {split!r} would be empty")
    shards = []
    for i, start in enumerate(range(0, tab.num_rows, rows_per_shard)):
        part = tab.slice(start, rows_per_shard)
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        buf = sink.getvalue()
        rel = f"{split}/part-{i:05d}.parquet"
        _write_bytes(fs, _join(root, rel), buf)
        shards.append(
            {
                "path": rel,
                "rows": part.num_rows,
                "bytes": buf.size,
                "sha256": hashlib.sha256(memoryview(buf)).hexdigest(),
            }
        )
        _log(progress, f"{name}: wrote {rel} ({part.num_rows:,} rows, {buf.size / 1e6:.2f} MB)")
    return {"rows": tab.num_rows, "shards": shards}


def _remove_old(fs: pafs.FileSystem, root: str) -> None:
    """Drop the old manifest first (so a failed prepare leaves no valid-looking dataset) and any
    old ``part-*.parquet`` shards of the three splits (a smaller re-prepare must not leave some)."""
    if _exists(fs, _join(root, MANIFEST_NAME)):
        fs.delete_file(_join(root, MANIFEST_NAME))
    for split in SPLITS:
        sel = pafs.FileSelector(_join(root, split), allow_not_found=True)
        for info in fs.get_file_info(sel):
            base = posixpath.basename(info.path)
            if (
                info.type == pafs.FileType.File
                and base.startswith("part-")
                and (base.endswith(".parquet"))
            ):
                fs.delete_file(info.path)


def prepare(
    name: str,
    out: str,
    *,
    source: str | None = None,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    seq_len: int = 256,
    progress: bool = True,
) -> dict:
    """Write ``name`` as Parquet shards plus ``manifest.json`` under ``out`` (folder or s3://).

    ``source``: None = the vendored files under ``data/raw/<name>``; a local folder holding the
    canonical files (MNIST IDX .gz or raw; ``cifar-10-python.tar.gz``, ``cifar-10-batches-py/``
    or the lossless subset npz; ``text8.zip``, ``text8`` or ``text8_first100k.txt``); or an
    http(s)/file URL of the canonical public file (MNIST: the folder URL of the four .gz files),
    downloaded and checked against the canonical checksums. Downloads go to ``$BFN_DATA_CACHE``
    when set (and are reused), otherwise to a temporary folder deleted afterwards.
    Returns the manifest.
    """
    _check_name(name)
    if int(rows_per_shard) < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if name == "text8" and int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    rows_per_shard, seq_len = int(rows_per_shard), int(seq_len)
    loaders = {"mnist": _load_mnist, "cifar10": _load_cifar10, "text8": _load_text8}

    with tempfile.TemporaryDirectory(prefix="bfn-data-") as tmp:
        if source is None:
            folder = raw_dir() / name
            src: dict[str, Any] = {"kind": "vendored", "location": f"data/raw/{name}"}
        elif _is_url(str(source)):
            cache = os.environ.get("BFN_DATA_CACHE")
            folder = Path(cache) / name if cache else Path(tmp)
            src = {
                "kind": "url",
                "location": str(source),
                **_download_source(name, str(source), folder, progress),
            }
        else:
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise DataError(f"{name}: source {source} is not a folder")
            src = {"kind": "folder", "location": str(folder.resolve())}
        _log(progress, f"{name}: reading {src['kind']} source {src['location']}")
        raw = loaders[name](folder)

    src["files"] = raw["files"]
    src["exact"] = all(f.get("canonical") for f in raw["files"].values())
    if src["kind"] == "vendored" and not src["exact"]:
        raise DataError(
            f"vendored {name} files under {folder} do not match their recorded "
            f"checksums (see data/raw/{name}/PROVENANCE.md): {raw['files']}"
        )
    if src["kind"] == "url" and not src["exact"]:
        raise DataError(f"{name}: downloaded files are not canonical: {raw['files']}")
    src["description"] = _describe_source(name, raw, src)

    tables, rule = _split_tables(name, raw, seq_len)
    schema = expected_schema(name, seq_len=seq_len)
    fs, root = _resolve(out)
    _remove_old(fs, root)
    splits = {}
    for split in SPLITS:
        assert tables[split].schema.equals(schema), (tables[split].schema, schema)
        splits[split] = _write_split(fs, root, name, split, tables[split], rows_per_shard, progress)

    manifest = {
        "dataset": name,
        "format_version": FORMAT_VERSION,
        "schema": _schema_to_json(schema),
        "shape": [seq_len] if name == "text8" else list(_IMAGE_SHAPE[name]),
        "dtype": "uint8",
        "splits": splits,
        "split_rule": rule,
        "source": src,
        "rows_per_shard": rows_per_shard,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "created_by": f"pipeline.data.prepare (pyarrow {pa.__version__}, python "
        f"{sys.version.split()[0]})",
    }
    if name == "text8":
        manifest.update(seq_len=seq_len, vocab=TEXT8_ALPHABET, vocab_size=len(TEXT8_ALPHABET))
    else:
        manifest["num_classes"] = _NUM_CLASSES
    _write_bytes(fs, _join(root, MANIFEST_NAME), json.dumps(manifest, indent=2).encode())
    _log(
        progress,
        f"{name}: wrote {out.rstrip('/')}/{MANIFEST_NAME} ("
        + ", ".join(f"{s} {v['rows']:,}" for s, v in splits.items())
        + " rows)",
    )
    return manifest


def _describe_source(name: str, raw: dict[str, Any], src: dict[str, Any]) -> str:
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
    exact = "canonical checksums match" if src["exact"] else "NOT the canonical files"
    return f"{what}; {exact}"


# ================================================================================================
# manifest / verify
# ================================================================================================

_MANIFEST_KEYS = ("dataset", "format_version", "schema", "splits")


def read_manifest(uri: str) -> dict:
    """Load ``<uri>/manifest.json``; ``DataError`` if it is missing or malformed."""
    fs, root = _resolve(uri)
    path = _join(root, MANIFEST_NAME)
    try:
        data = _read_bytes(fs, path)
    except FileNotFoundError as exc:
        raise DataError(
            f"missing manifest {uri.rstrip('/')}/{MANIFEST_NAME} (run `prepare` first)"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read manifest {uri.rstrip('/')}/{MANIFEST_NAME}: {exc}") from exc
    try:
        man = json.loads(data)
    except ValueError as exc:
        raise DataError(
            f"manifest {uri.rstrip('/')}/{MANIFEST_NAME} is not valid JSON: {exc}"
        ) from exc
    missing = [k for k in _MANIFEST_KEYS if not isinstance(man, dict) or k not in man]
    if missing:
        raise DataError(f"manifest {uri.rstrip('/')}/{MANIFEST_NAME} lacks {', '.join(missing)}")
    return man


def _manifest_schema(man: dict, uri: str) -> pa.Schema:
    """The dataset's expected schema, after checking that the manifest agrees with it."""
    name = man["dataset"]
    if name not in DATASETS:
        raise DataError(
            f"{uri}: unknown dataset {name!r} in manifest; expected one of {', '.join(DATASETS)}"
        )
    if man["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{uri}: manifest format_version {man['format_version']!r}, this code "
            f"reads {FORMAT_VERSION}"
        )
    expected = expected_schema(name, seq_len=int(man.get("seq_len", 256)))
    got = {c["name"]: c["type"] for c in man["schema"]}
    for field in expected:
        if field.name not in got:
            raise DataError(f"{uri}: manifest schema lacks column {field.name!r} of {name}")
        if got[field.name] != str(field.type):
            raise DataError(
                f"{uri}: manifest schema column {field.name!r} is {got[field.name]}, "
                f"{name} expects {field.type}"
            )
    extra = sorted(set(got) - set(expected.names))
    if extra:
        raise DataError(f"{uri}: manifest schema has unexpected column(s) {extra} for {name}")
    return expected


def _check_shard_metadata(meta: pq.FileMetaData, schema: pa.Schema, where: str, rows: int) -> None:
    got = meta.schema.to_arrow_schema()
    for field in schema:
        idx = got.get_field_index(field.name)
        if idx < 0:
            raise DataError(f"{where}: column {field.name!r} is missing")
        if got.field(idx).type != field.type:
            raise DataError(
                f"{where}: column {field.name!r} has type {got.field(idx).type}, "
                f"the manifest says {field.type}"
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
                raise DataError(
                    f"{where}: column {col.path_in_schema!r} has {stats.null_count} nulls"
                )


def verify(uri: str, splits: Sequence[str] | None = None, *, check_checksums: bool = True) -> dict:
    """Check a prepared dataset before any Ray worker reads it.

    Raises ``DataError`` naming the culprit for: a missing/malformed manifest, an unknown dataset,
    a manifest schema that differs from the dataset's, an unknown or empty split, a missing shard,
    a shard whose size or sha256 differs from the manifest (corrupt, truncated), a shard whose
    Parquet schema or row count differs from the manifest. With ``check_checksums=False`` only the
    sizes and Parquet footers are read. Returns the manifest, plus ``"verified": {"splits":
    {split: rows} (the splits checked), "shards", "bytes", "checked_checksums"}``.
    """
    man = read_manifest(uri)
    schema = _manifest_schema(man, uri)
    fs, root = _resolve(uri)
    wanted = list(man["splits"]) if splits is None else list(splits)
    summary: dict[str, Any] = {
        "splits": {},
        "shards": 0,
        "bytes": 0,
        "checked_checksums": bool(check_checksums),
    }
    for split in wanted:
        if split not in man["splits"]:
            raise DataError(
                f"{uri}: split {split!r} is not in the manifest (has {', '.join(man['splits'])})"
            )
        entry = man["splits"][split]
        shards = entry.get("shards") or []
        if not shards or not entry.get("rows"):
            raise DataError(f"{uri}: split {split!r} is empty")
        total = 0
        for shard in shards:
            path = _join(root, shard["path"])
            where = f"shard {uri.rstrip('/')}/{shard['path']} (split {split!r})"
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"missing {where}")
            if "bytes" in shard and info.size != shard["bytes"]:
                raise DataError(
                    f"{where}: {info.size} bytes, the manifest says {shard['bytes']} "
                    f"(truncated or replaced)"
                )
            try:
                if check_checksums:
                    data = _read_bytes(fs, path)
                    digest = _sha256(data)
                    if digest != shard["sha256"]:
                        raise DataError(
                            f"{where}: sha256 {digest} does not match the manifest's "
                            f"{shard['sha256']} (corrupt)"
                        )
                    meta = pq.read_metadata(pa.BufferReader(data))
                else:
                    with fs.open_input_file(path) as f:
                        meta = pq.read_metadata(f)
            except DataError:
                raise
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"{where}: unreadable Parquet ({exc})") from exc
            _check_shard_metadata(meta, schema, where, int(shard["rows"]))
            total += int(shard["rows"])
            summary["shards"] += 1
            summary["bytes"] += int(info.size)
        if total != int(entry["rows"]):
            raise DataError(
                f"{uri}: split {split!r} shards hold {total} rows, the manifest says "
                f"{entry['rows']}"
            )
        summary["splits"][split] = total
    return {**man, "verified": summary}


def num_rows(uri: str, split: str) -> int:
    """Rows of ``split`` according to the manifest (no shard is opened)."""
    man = read_manifest(uri)
    if split not in man["splits"]:
        raise DataError(f"{uri}: split {split!r} is not in the manifest")
    return int(man["splits"][split]["rows"])


# ================================================================================================
# preprocessing
# ================================================================================================


def _as_matrix(batch: dict[str, Any], col: str, width: int | None) -> np.ndarray:
    """A (B, width) integer matrix (uint8 when possible) from a fixed-size-binary column given as
    a pyarrow array, numpy object array of bytes, numpy 'S' array or integer array."""
    if col not in batch:
        raise DataError(f"batch has no column {col!r} (columns: {', '.join(sorted(batch))})")
    v = batch[col]
    if isinstance(v, pa.ChunkedArray):
        v = v.combine_chunks()
    if isinstance(v, pa.Array):
        if not pa.types.is_fixed_size_binary(v.type):
            raise DataError(f"column {col!r} has arrow type {v.type}, expected fixed_size_binary")
        if v.null_count:
            raise DataError(f"column {col!r} has {v.null_count} null values")
        w = v.type.byte_width
        if len(v) == 0:
            mat = np.empty((0, w), np.uint8)
        else:
            mat = np.frombuffer(v.buffers()[1], np.uint8, count=len(v) * w, offset=v.offset * w)
            mat = mat.reshape(len(v), w)
    else:
        v = np.asarray(v)
        if v.dtype == object:
            items = v.ravel().tolist()
            if any(not isinstance(b, bytes | bytearray | memoryview) for b in items):
                raise DataError(f"column {col!r} holds non-bytes values (None or objects)")
            lengths = {len(b) for b in items}
            if len(lengths) > 1:
                raise DataError(f"column {col!r} rows have different lengths {sorted(lengths)}")
            w = lengths.pop() if lengths else (width or 0)
            mat = np.frombuffer(b"".join(items), np.uint8).reshape(len(items), w)
        elif v.dtype.kind == "S":
            mat = np.ascontiguousarray(v.ravel()).view(np.uint8).reshape(v.size, v.dtype.itemsize)
        elif v.dtype.kind in "ui":
            mat = v.reshape(len(v), -1)
            if mat.size and (mat.min() < 0 or mat.max() > 255):
                raise DataError(
                    f"column {col!r} has values outside 0..255 (min {mat.min()}, max {mat.max()})"
                )
            mat = mat.astype(np.uint8, copy=False)
        else:
            raise DataError(f"column {col!r} has unsupported dtype {v.dtype}")
    if width is not None and mat.shape[1] != width:
        raise DataError(f"column {col!r} rows have {mat.shape[1]} values, expected {width}")
    return mat


def _check_labels(batch: dict[str, Any], n: int) -> None:
    if "label" not in batch:
        return
    y = batch["label"]
    y = np.asarray(
        y.to_numpy(zero_copy_only=False) if isinstance(y, pa.Array | pa.ChunkedArray) else y
    )
    if len(y) != n:
        raise DataError(f"column 'label' has {len(y)} rows, column 'image' {n}")
    if y.size and (y.min() < 0 or y.max() >= _NUM_CLASSES):
        raise DataError(
            f"column 'label' has values outside 0..{_NUM_CLASSES - 1} "
            f"(min {y.min()}, max {y.max()})"
        )


def _bin_centres(num_bins: int) -> np.ndarray:
    """Lookup table pixel 0..255 -> centre of its bin among ``num_bins`` bins in [-1, 1].

    x = 2p/255 - 1, index = clamp(floor((x/2 + 0.5) K), 0, K-1) = clamp(floor(pK/255), 0, K-1),
    computed in exact integer arithmetic; centre = (2 index + 1)/K - 1.
    """
    p = np.arange(256, dtype=np.int64)
    idx = np.minimum((p * num_bins) // 255, num_bins - 1)
    return ((2 * idx + 1) / num_bins - 1).astype(np.float32)


def preprocess(
    name: str, batch: dict[str, Any], *, num_bins: int = 256, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Raw rows -> model input ``{"x": ...}`` (pure numpy, as in the reference's data.py).

    * mnist: uint8 {0,1} (B,28,28,1), each pixel ~ Bernoulli(pixel/255) drawn from ``rng``
      (exactly p/255: ``rng.integers(0, 255) < p``); a new draw on every call.
    * cifar10: float32 (B,32,32,3), the centre of the pixel's bin among ``num_bins`` bins in
      [-1,1] (for 256 bins: exactly (2p+1)/256 - 1).
    * text8: int64 (B, seq_len) ids 0..26.

    ``batch`` holds the Parquet columns (pyarrow arrays or numpy: bytes objects, 'S' or integer
    matrices). Values out of range raise ``DataError`` naming the column.
    """
    _check_name(name)
    if name == "text8":
        ids = _as_matrix(batch, "ids", None)
        if ids.size and ids.max() > 26:
            bad = np.argwhere(ids > 26)[0]
            raise DataError(
                f"column 'ids' has id {ids[tuple(bad)]} > 26 at row {bad[0]}, position {bad[1]}"
            )
        return {"x": ids.astype(np.int64)}
    width = int(np.prod(_IMAGE_SHAPE[name]))
    img = _as_matrix(batch, "image", width)
    _check_labels(batch, len(img))
    n = len(img)
    if name == "mnist":
        x = rng.integers(0, 255, size=img.shape, dtype=np.uint8) < img
        return {"x": x.astype(np.uint8).reshape(n, 28, 28, 1)}
    if int(num_bins) < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    return {"x": _bin_centres(int(num_bins))[img].reshape(n, 32, 32, 3)}


def _row_keys(
    name: str, batch: dict[str, Any], seed: int, purpose: bytes = b"subset"
) -> np.ndarray:
    """64-bit keyed hash of each row's content (data bytes + the int64 aux column); ``purpose``
    separates the subset keys from the binarisation keys."""
    mat = _as_matrix(batch, _data_column(name), None)
    aux_col = batch[_aux_column(name)]
    if isinstance(aux_col, pa.Array | pa.ChunkedArray):
        aux_col = aux_col.to_numpy(zero_copy_only=False)
    aux = np.asarray(aux_col, dtype="<i8").reshape(-1, 1).view(np.uint8)
    rows = np.concatenate([mat, aux], axis=1)
    key = int(seed).to_bytes(16, "little", signed=True)
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(r.tobytes(), digest_size=8, key=key, person=purpose).digest(),
                "little",
            )
            for r in rows
        ),
        dtype=np.uint64,
        count=len(rows),
    )


def _table_dict(tab: pa.Table | pa.RecordBatch) -> dict[str, Any]:
    return {n: tab.column(n) for n in tab.schema.names}


def _subset_threshold(
    tables: Iterable[pa.Table], name: str, n: int, fraction: float, seed: int
) -> int | None:
    """The largest row key kept for ``fraction`` (None = keep everything, without reading)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return None
    k = max(1, int(round(fraction * n)))
    keys = np.concatenate([_row_keys(name, _table_dict(t), seed) for t in tables])
    return int(np.partition(keys, k - 1)[k - 1])


def _read_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    with fs.open_input_file(path) as f:
        return pq.read_table(f)


def _split_paths(uri: str, split: str, name: str) -> tuple[pafs.FileSystem, list[str], dict]:
    _check_name(name)
    man = read_manifest(uri)
    if man["dataset"] != name:
        raise DataError(f"{uri} holds dataset {man['dataset']!r}, not {name!r}")
    verify(uri, [split], check_checksums=False)
    fs, root = _resolve(uri)
    return fs, [_join(root, s["path"]) for s in man["splits"][split]["shards"]], man


def _seed_words(seed: int) -> list[int]:
    return [int(seed) & (2**64 - 1), (int(seed) >> 64) & (2**64 - 1)]


# ================================================================================================
# Ray Data
# ================================================================================================


class _VisitCounter:
    """Counts how often each row key was preprocessed: its visit number is the pass (epoch)."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def visit_rows(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty(len(keys), np.int64)
        counts = self._counts
        for i, k in enumerate(keys.tolist()):
            n = counts.get(k, 0)
            out[i] = n
            counts[k] = n + 1
        return out


_U64 = np.uint64
_GOLDEN, _MIX1, _MIX2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def _binarize_keyed(img: np.ndarray, keys: np.ndarray, visits: np.ndarray) -> np.ndarray:
    """Bernoulli(pixel/255) per pixel, a pure function of (row key, visit, pixel index).

    Word w of a row is ``splitmix64(row_seed + (w + 1) * golden)``; its high and low 32 bits give
    pixels 2w and 2w+1 the uniform ``u = floor(255 * half / 2**32)`` on 0..254, and a pixel is 1
    iff ``u < pixel`` (probability pixel/255 up to 2**-32). Rows are done in chunks so that the
    uint64 temporaries stay small.
    """
    n, width = img.shape
    words = (width + 1) // 2
    out = np.empty((n, 2 * words), np.uint8)
    steps = np.arange(1, words + 1, dtype=_U64)[None, :] * _GOLDEN
    low, k255, s32 = _U64(0xFFFFFFFF), _U64(255), _U64(32)
    with np.errstate(over="ignore"):
        row_seed = _splitmix64(keys.astype(_U64) + (visits.astype(_U64) + _U64(1)) * _MIX2)
        for a in range(0, n, 512):
            z = _splitmix64(row_seed[a : a + 512, None] + steps)
            out[a : a + 512, 0::2] = ((z >> s32) * k255) >> s32
            out[a : a + 512, 1::2] = ((z & low) * k255) >> s32
    return (out[:, :width] < img).astype(np.uint8)


def _preprocess_keyed(
    name: str, batch: dict[str, Any], *, num_bins: int, seed: int, visits: Any
) -> dict[str, np.ndarray]:
    """``preprocess`` with the row-keyed MNIST draws (``visits``: per row, or one int)."""
    if name != "mnist":
        return preprocess(name, batch, num_bins=num_bins, rng=None)
    img = _as_matrix(batch, "image", 784)
    _check_labels(batch, len(img))
    if KEY_COLUMN in batch:  # precomputed once per row by ray_dataset
        keys = np.asarray(_to_numpy(batch[KEY_COLUMN]), _U64)
    else:
        keys = _row_keys(name, batch, seed, b"binarize")
    if callable(visits):
        visits = visits(keys)
    visits = np.broadcast_to(np.asarray(visits, np.int64), keys.shape)
    return {"x": _binarize_keyed(img, keys, visits).reshape(len(img), 28, 28, 1)}


def _to_numpy(col: Any) -> np.ndarray:
    if isinstance(col, pa.Array | pa.ChunkedArray):
        return col.to_numpy(zero_copy_only=False)
    return np.asarray(col)


def _ray_annotate(
    tab: pa.Table, *, name: str, seed: int, threshold: int | None, add_key: bool
) -> pa.Table:
    """Before materializing: keep the ``fraction`` subset and/or add the binarisation key column
    (hashing each row once instead of on every epoch)."""
    if threshold is not None:
        keys = _row_keys(name, _table_dict(tab), seed)
        tab = tab.filter(pa.array(keys <= np.uint64(threshold)))
    if add_key:
        keys = _row_keys(name, _table_dict(tab), seed, b"binarize")
        tab = tab.append_column(KEY_COLUMN, pa.array(keys, pa.uint64()))
    return tab


def _ray_preprocess(
    tab: pa.Table, *, name: str, num_bins: int, seed: int | None, counter: Any
) -> dict[str, np.ndarray]:
    batch = _table_dict(tab.combine_chunks())
    if name == "mnist" and seed is None:
        return preprocess(name, batch, num_bins=num_bins, rng=np.random.default_rng())
    if name == "mnist":
        import ray

        def visits(keys: np.ndarray) -> np.ndarray:
            return ray.get(counter.visit_rows.remote(keys))

        return _preprocess_keyed(name, batch, num_bins=num_bins, seed=seed, visits=visits)
    return preprocess(name, batch, num_bins=num_bins, rng=None)


def ray_dataset(
    uri: str,
    split: str,
    name: str,
    *,
    num_bins: int = 256,
    fraction: float = 1.0,
    materialize: bool = True,
    seed: int | None = 0,
) -> Any:
    """A Ray Dataset of preprocessed ``{"x": ...}`` rows for ``split`` (local folder or s3://).

    Reads the split's shards with ``ray.data.read_parquet`` (checking manifest and footers
    first; run ``verify`` for checksums), keeps a deterministic ``fraction`` of the rows,
    materializes the raw rows in the object store when ``materialize`` (recommended for these
    small datasets on few cores: the read then runs once; splits up to ``SMALL_SPLIT_BYTES`` are
    read by this process, without read tasks) and maps the preprocessing lazily, so
    MNIST's binarisation is drawn anew on every pass, keyed per row by (``seed``, pass number);
    see the module docstring. ``seed=None``: fresh OS entropy (the subset then uses seed 0).
    Rows are ``{"x": ...}`` as in ``preprocess``. Needs a running Ray (or starts one).
    """
    import ray
    import ray.data

    fs, paths, man = _split_paths(uri, split, name)
    split_bytes = sum(int(s.get("bytes", 0)) for s in man["splits"][split]["shards"])
    small = materialize and split_bytes <= SMALL_SPLIT_BYTES
    # a small split is read once, here; otherwise the subset cut-off reads it shard by shard
    tables = [_read_table(fs, p) for p in paths] if small else (_read_table(fs, p) for p in paths)
    threshold = _subset_threshold(
        tables, name, num_rows(uri, split), fraction, seed if seed is not None else 0
    )
    keyed = seed is not None and name == "mnist"  # only MNIST's preprocessing is random
    annotate = {"name": name, "seed": seed if seed is not None else 0, "threshold": threshold, "add_key": keyed}
    if small:
        # put the rows in the object store from this process: the same rows as the streaming
        # read below, without its read tasks (~10-25 s per call on 2 cores, measured)
        table = _ray_annotate(pa.concat_tables(tables), **annotate)
        step = max(1, -(-table.num_rows // SMALL_SPLIT_BLOCKS))
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)] or [table])
    else:
        ds = ray.data.read_parquet(paths, filesystem=fs, file_extensions=["parquet"])
        if threshold is not None or keyed:
            ds = ds.map_batches(_ray_annotate, batch_format="pyarrow", batch_size=None, fn_kwargs=annotate)
        if materialize:
            ds = ds.materialize()
    counter = None
    if keyed:
        counter = ray.remote(num_cpus=0, max_restarts=0)(_VisitCounter).remote()
    return ds.map_batches(
        _ray_preprocess,
        batch_format="pyarrow",
        batch_size=RAY_MAP_BATCH_SIZE,
        fn_kwargs={"name": name, "num_bins": num_bins, "seed": seed, "counter": counter},
        udf_modifying_row_count=False,
    )


# ================================================================================================
# plain pyarrow reader
# ================================================================================================


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
) -> Iterator[dict[str, np.ndarray]]:
    """Preprocessed batches of ``split`` without Ray (evaluation, single-process benchmarks).

    Same rows (``fraction``), same preprocessing and value checks as ``ray_dataset``. Batches have
    ``batch_size`` rows except possibly the last. Without ``shuffle`` rows come in stored order,
    streamed shard by shard; with ``shuffle`` the split is loaded and permuted with ``seed`` and
    ``epoch``. MNIST's binarisation is keyed per row by (``seed``, ``epoch``) exactly like pass
    number ``epoch`` of ``ray_dataset(seed=seed)``: pass a new ``epoch`` for new draws.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fs, paths, _ = _split_paths(uri, split, name)
    threshold = _subset_threshold((_read_table(fs, p) for p in paths), name, num_rows(uri, split), fraction, seed)
    cols = [_data_column(name), _aux_column(name)]

    def raw_chunks() -> Iterator[dict[str, np.ndarray]]:
        for path in paths:
            with fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=max(int(batch_size), 1024)):
                    d = _table_dict(rb)
                    if threshold is not None:
                        keep = _row_keys(name, d, seed) <= np.uint64(threshold)
                        rb = rb.filter(pa.array(keep))
                        d = _table_dict(rb)
                    yield {
                        cols[0]: _as_matrix(d, cols[0], None).copy(),
                        cols[1]: d[cols[1]].to_numpy(zero_copy_only=False),
                    }

    def rebatch(chunks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        buf: dict[str, np.ndarray] | None = None
        for chunk in chunks:
            buf = chunk if buf is None else {c: np.concatenate([buf[c], chunk[c]]) for c in cols}
            pos, have = 0, len(buf[cols[1]])
            while have - pos >= batch_size:
                yield {c: v[pos : pos + batch_size] for c, v in buf.items()}
                pos += batch_size
            buf = {c: v[pos:] for c, v in buf.items()}
        if buf is not None and len(buf[cols[1]]):
            yield buf

    if shuffle:
        every = list(raw_chunks())
        allrows = {c: np.concatenate([p[c] for p in every]) for c in cols}
        perm = np.random.default_rng(np.random.SeedSequence([*_seed_words(seed), int(epoch), 0x5F]))
        order = perm.permutation(len(allrows[cols[1]]))
        source: Iterable[dict[str, np.ndarray]] = [{c: v[order] for c, v in allrows.items()}]
    else:
        source = raw_chunks()
    for raw in rebatch(source):
        yield _preprocess_keyed(name, raw, num_bins=num_bins, seed=seed, visits=int(epoch))

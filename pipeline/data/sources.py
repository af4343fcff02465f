"""Raw sources: where the canonical files come from, verified downloads, and their parsers.

(Longer than 500 lines because each of the three datasets' download, verification and parser sit
together; split per dataset they would repeat the verified-download code.)

``locate`` turns a ``source`` (None = the bundled files under ``data/raw``; ``"download"`` = the
canonical public file; a URL; a local archive file; a folder) into a local path, and ``load``
parses it into numpy arrays: MNIST IDX (.gz or raw), the CIFAR-10 python pickles (read by a
numpy-only unpickler: no code in a pickle runs), text8 (zip or plain text). Nothing here writes
shards; see ``shards.py``.

Downloads are capped in size (``DOWNLOAD_MAX_BYTES``: a server announcing or sending more is cut
off) and checked against the canonical sha256 (MNIST: the LeCun .gz md5 or the IDX content
sha256) before anything is decompressed; decompressed members are capped too
(``MEMBER_MAX_BYTES``), so a hostile archive cannot fill the disk or the memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import posixpath
import struct
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.storage import TEXT8_ALPHABET, DataError, check_name, is_url, raw_dir
from pipeline.secrets import credential_values, mask_config, mask_text

log = logging.getLogger(__name__)

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
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_SUBSET = "cifar10_lossless_subset.npz"
CIFAR10_SUBSET_SHA256 = "85cd04590f3681e2d4bb54e243e7f178a8d0a60e56ca38df16a12d0addf90b46"
TEXT8_ZIP = "text8.zip"
TEXT8_SHA256 = "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"  # member "text8"
TEXT8_SUBSET = "text8_first100k.txt"
TEXT8_SUBSET_SHA256 = "cf4215bfd474fdffa9944796ac527f0e8f0fd3302da25d5e5c211877c1d2ed4a"
# --source bundled-large: the text8 prefix, one space, then a text8-style Wikipedia sample (PROVENANCE.md)
BUNDLED_LARGE = "bundled-large"
WIKI_SAMPLE = "enwiki_sample_wikifil.txt"
WIKI_SAMPLE_SHA256 = "0cf035b28f92b01ff2dd0880909f6087bfb48bc8b8c726b793bccdad5c56a13c"

PUBLIC_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "text8": "http://mattmahoney.net/dc/text8.zip",
}
# The one-file archives `source="download"` fetches: name, sha256, and the download cap (the real
# files are 170,498,071 and 31,344,016 bytes).
CANONICAL_ARCHIVES = {
    "cifar10": {
        "filename": CIFAR10_TARBALL,
        "sha256": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        "max_bytes": 200_000_000,
    },
    "text8": {
        "filename": TEXT8_ZIP,
        "sha256": "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
        "max_bytes": 40_000_000,
    },
}
DOWNLOAD_MAX_BYTES = 32 * 1024**2  # any other download (an MNIST .gz is at most 9.9 MB)
# decompressed sizes: MNIST train images 47,040,016 B, a CIFAR-10 batch 31,035,7xx B, text8 1e8 B
MEMBER_MAX_BYTES = {"mnist": 64 * 1024**2, "cifar10": 64 * 1024**2, "text8": 128 * 1024**2}


def say(progress: bool, message: str) -> None:
    """Progress of long preparations at INFO; with ``progress=False`` at DEBUG (a URL's credentials masked)."""
    log.log(logging.INFO if progress else logging.DEBUG, mask_text(message))


# ================================================================================================
# downloads
# ================================================================================================


class _Digests:
    """md5 and sha256 of one stream in one pass (``hashlib.file_digest`` takes any ``update``)."""

    def __init__(self) -> None:
        self.md5, self.sha256 = hashlib.md5(), hashlib.sha256()

    def update(self, chunk: bytes | memoryview) -> None:
        self.md5.update(chunk)
        self.sha256.update(chunk)

    def hexdigests(self) -> dict[str, str]:
        return {"md5": self.md5.hexdigest(), "sha256": self.sha256.hexdigest()}


def file_digests(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, _Digests).hexdigests()


def _fetch(url: str, dest: Path, *, max_bytes: int, progress: bool, timeout: float = 60.0) -> dict[str, str]:
    """Stream ``url`` to ``dest`` (at most ``max_bytes``); return its md5 and sha256."""
    shown = mask_text(url)  # a signed or tokenised URL's credentials stay out of every message
    digests = _Digests()  # hashed as it streams: the size cap may stop it before the file is whole
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "bfn-ray-data/2"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise DataError(f"download of {shown} refused: {total:,} bytes announced, the cap is {max_bytes:,}")
            done, next_report = 0, 0.1
            while chunk := response.read(1 << 20):
                done += len(chunk)
                if done > max_bytes:
                    raise DataError(f"download of {shown} stopped: more than the cap of {max_bytes:,} bytes")
                out.write(chunk)
                digests.update(chunk)
                if total and done / total >= next_report:
                    say(progress, f"{dest.name}: {done / total:4.0%} of {total:,} bytes")
                    next_report += 0.1
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as exc:  # URLError is an OSError; ValueError: a malformed URL
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {shown} failed: {mask_text(str(exc), credential_values(url))}") from exc
    tmp.replace(dest)
    return digests.hexdigests()


def download(
    url: str,
    dest_dir: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    filename: str | None = None,
    max_bytes: int = DOWNLOAD_MAX_BYTES,
    progress: bool = True,
) -> Path:
    """Download ``url`` (http, https, ftp or file) into ``dest_dir`` and check its checksum(s).

    At least one of ``md5``/``sha256`` is required. More than ``max_bytes`` is refused. On a
    mismatch the file is deleted and ``DataError`` names the URL, the expected and the actual
    digest. A file already in ``dest_dir`` with the right checksum is reused.
    """
    if not (md5 or sha256):
        raise ValueError("download() needs an expected md5 or sha256")
    name = filename or posixpath.basename(urllib.parse.urlparse(url).path) or "download"
    dest = Path(dest_dir) / name
    expected = {k: v.lower() for k, v in (("md5", md5), ("sha256", sha256)) if v}
    if dest.is_file() and all(file_digests(dest)[k] == v for k, v in expected.items()):
        say(progress, f"using cached {dest}")
        return dest
    say(progress, f"downloading {url}")
    got = _fetch(url, dest, max_bytes=max_bytes, progress=progress)
    for kind, want in expected.items():
        if got[kind] != want:
            dest.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {mask_text(url)}: expected {kind} {want}, got {got[kind]}")
    say(progress, f"verified {name} ({', '.join(f'{k} {got[k]}' for k in expected)})")
    return dest


def _mnist_file_ok(path: Path, digests: dict[str, str], base: str) -> bool:
    """A canonical MNIST file: the LeCun .gz md5, or (a re-compressed mirror) canonical IDX bytes."""
    gz_md5, idx_sha = MNIST_FILES[base]
    if digests["md5"] == gz_md5:
        return True
    try:
        return hashlib.sha256(_gunzip_capped(path.read_bytes(), "mnist", str(path))).hexdigest() == idx_sha
    except (OSError, EOFError, DataError):
        return False


def _download_mnist(url: str, dest: Path, progress: bool) -> dict[str, Any]:
    """The four .gz files from a folder URL (or the URL of one of them) into ``dest``."""
    names = {f"{b}.gz" for b in MNIST_FILES}
    if url.endswith("/"):
        base = url
    elif posixpath.basename(urllib.parse.urlparse(url).path) in names:
        base = url.rsplit("/", 1)[0] + "/"
    else:
        base = url + "/"
    for b, (gz_md5, idx_sha) in MNIST_FILES.items():
        file_url, path = urllib.parse.urljoin(base, f"{b}.gz"), dest / f"{b}.gz"
        if path.is_file() and _mnist_file_ok(path, file_digests(path), b):
            say(progress, f"using cached {path}")
            continue
        say(progress, f"downloading {file_url}")
        got = _fetch(file_url, path, max_bytes=DOWNLOAD_MAX_BYTES, progress=progress)
        if not _mnist_file_ok(path, got, b):
            path.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {mask_text(file_url)}: md5 {got['md5']}, sha256 {got['sha256']}; "
                f"expected the canonical .gz md5 {gz_md5} or uncompressed sha256 {idx_sha}"
            )
    return {"url": base}


def _download_archive(name: str, url: str, dest: Path, progress: bool) -> tuple[Path, dict]:
    """The canonical one-file archive of ``name`` from ``url`` (a folder URL gets its file name)."""
    canon = CANONICAL_ARCHIVES[name]
    file_url = url + canon["filename"] if url.endswith("/") else url
    path = download(
        file_url,
        dest,
        sha256=canon["sha256"],
        filename=canon["filename"],
        max_bytes=canon["max_bytes"],
        progress=progress,
    )
    return path, {"kind": "url", "location": url, "url": file_url}


# ================================================================================================
# where the files are
# ================================================================================================


def locate(name: str, source: str | os.PathLike | None, scratch: Path, *, progress: bool) -> tuple[Path, dict]:
    """(local file or folder to ``load``, description of the source for the manifest, a URL's
    credentials masked: the manifest is logged to MLflow).

    ``source``: None = the bundled files ``data/raw/<name>``; ``"download"`` = the canonical file
    from ``PUBLIC_URLS``; an http(s)/file URL of the canonical file (MNIST: the folder URL of the
    four .gz files); a local archive file (``cifar-10-python.tar.gz``, ``text8.zip``, a plain
    text8 file, the CIFAR-10 subset .npz); or a folder holding the files (or the extracted
    ``cifar-10-batches-py``). Downloads go to ``$BFN_DATA_CACHE/<name>`` when set (and are
    reused), otherwise into ``scratch``.
    """
    check_name(name)
    path, src = _locate(name, source, scratch, progress=progress)
    return path, mask_config(src)


def _locate(name: str, source: str | os.PathLike | None, scratch: Path, *, progress: bool) -> tuple[Path, dict]:
    if source is None:
        return raw_dir() / name, {"kind": "vendored", "location": f"data/raw/{name}"}
    text = str(source)
    cache = os.environ.get("BFN_DATA_CACHE")
    folder = Path(cache) / name if cache else scratch
    if text == "download":
        return _download_default(name, folder, progress)
    if is_url(text):
        if name == "mnist":
            return folder, {"kind": "url", "location": text, **_download_mnist(text, folder, progress)}
        return _download_archive(name, text, folder, progress)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, {"kind": "folder", "location": str(path.resolve())}
    if path.is_file():
        if name == "mnist":
            raise DataError(f"mnist: source {path} is a file; pass the folder holding the four IDX files")
        return path, {"kind": "file", "location": str(path.resolve())}
    raise DataError(f"{name}: source {mask_text(text)} is neither an existing file or folder nor a URL")


def _download_default(name: str, folder: Path, progress: bool) -> tuple[Path, dict]:
    url = PUBLIC_URLS[name]
    try:
        if name == "mnist":
            return folder, {"kind": "url", "location": url, **_download_mnist(url, folder, progress)}
        return _download_archive(name, url, folder, progress)
    except DataError as exc:
        cache = os.environ.get("BFN_DATA_CACHE")
        cached = f"a verified copy in $BFN_DATA_CACHE ({folder}): none; then " if cache else ""
        offline = {
            "mnist": "the folder holding the four IDX .gz files",
            "cifar10": f"{CIFAR10_TARBALL} or its extracted cifar-10-batches-py/ folder",
            "text8": f"{TEXT8_ZIP} or the extracted text8 file",
        }[name]
        raise DataError(
            f"{name}: could not get the canonical files. Tried: {cached}{mask_text(url)}: {exc}. "
            f"Offline, download them elsewhere and pass --source with {offline}; "
            f"or --source bundled for the small bundled data (data/raw/{name})"
        ) from exc


# ================================================================================================
# parsers
# ================================================================================================


def _gunzip_capped(data: bytes, name: str, where: str) -> bytes:
    """``data`` itself, or gunzipped when it is gzip, refusing more than the dataset's cap."""
    if data[:2] != b"\x1f\x8b":
        return data
    cap = MEMBER_MAX_BYTES[name]
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(cap + 1)
    except (OSError, EOFError) as exc:
        raise DataError(f"{where}: not a readable gzip file ({exc})") from exc
    if len(out) > cap:
        raise DataError(f"{where}: decompresses to more than {cap:,} bytes; refusing it")
    return out


def _find_mnist_file(folder: Path, base: str) -> Path:
    dotted = base.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (the PyPI/Windows spelling)
    for candidate in (f"{base}.gz", base, f"{dotted}.gz", dotted):
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(f"mnist source {folder}: missing {base}.gz (or {base})")


def _parse_idx(data: bytes, path: Path, *, images: bool) -> np.ndarray:
    want, head = (2051, 16) if images else (2049, 8)
    if len(data) < head or struct.unpack(">I", data[:4])[0] != want:
        raise DataError(f"{path}: not an IDX {'image' if images else 'label'} file (magic {want})")
    if images:
        n, rows, cols = struct.unpack(">III", data[4:16])
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
        shape: tuple[int, ...] = (n, rows * cols)
    else:
        shape = struct.unpack(">I", data[4:8])
    size = int(np.prod(shape))
    if len(data) != head + size:
        raise DataError(f"{path}: {len(data) - head} data bytes, header promises {size}")
    return np.frombuffer(data, np.uint8, count=size, offset=head).reshape(shape)


def _load_mnist(folder: Path) -> dict[str, Any]:
    arrays, files = {}, {}
    for base, (_, canonical_sha) in MNIST_FILES.items():
        path = _find_mnist_file(folder, base)
        data = _gunzip_capped(path.read_bytes(), "mnist", str(path))
        digest = hashlib.sha256(data).hexdigest()
        files[path.name] = {"sha256_uncompressed": digest, "canonical": digest == canonical_sha}
        arrays[base] = _parse_idx(data, path, images="images" in base)
    out: dict[str, Any] = {"files": files}
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
    except Exception as exc:  # noqa: BLE001 - any malformed pickle
        raise DataError(f"{where}: not a CIFAR-10 python batch ({exc})") from exc
    if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{where}: data {x.shape} / labels {y.shape}, expected (N, 3072) / (N,)")
    # stored as 3 colour planes (CHW); the project stores HWC like torchvision's .data
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).reshape(-1, 3072), y


def _cifar_tar_blobs(tarball: Path) -> dict[str, bytes]:
    cap, blobs = MEMBER_MAX_BYTES["cifar10"], {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if not (member.isfile() and base in CIFAR10_BATCHES):
                    continue
                if member.size > cap:
                    raise DataError(f"{tarball}: member {member.name} has {member.size:,} bytes (cap {cap:,})")
                blobs[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{tarball}: not a readable tar.gz archive ({exc})") from exc
    return blobs


def _cifar_from_batches(blobs: dict[str, bytes], where: str, files: dict) -> dict[str, Any]:
    missing = [n for n in CIFAR10_BATCHES if n not in blobs]
    if missing:
        raise DataError(f"cifar10 source {where}: missing batch file(s) {', '.join(missing)}")
    parts = [_cifar_batch(blobs[n], f"{where}/{n}") for n in CIFAR10_BATCHES]
    return {
        "files": files,
        "val": "reference",
        "train_x": np.concatenate([p[0] for p in parts[:5]]),
        "train_y": np.concatenate([p[1] for p in parts[:5]]),
        "test_x": parts[5][0],
        "test_y": parts[5][1],
    }


def _cifar_subset(subset: Path) -> dict[str, Any]:
    digest = file_digests(subset)["sha256"]
    try:
        with np.load(subset, allow_pickle=False) as z:
            xtr, ytr = z["x_train_first200"], z["y_train_first200"]
            xte, yte = z["x_test_first20"], z["y_test_first20"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{subset}: not the CIFAR-10 subset .npz ({exc})") from exc
    for key, arr in (("x_train_first200", xtr), ("x_test_first20", xte)):
        if arr.dtype != np.uint8 or arr.shape[1:] != (32, 32, 3):
            raise DataError(f"{subset}: {key} is {arr.dtype}{arr.shape}, expected uint8 (N,32,32,3)")
    return {
        "files": {subset.name: {"sha256": digest, "canonical": digest == CIFAR10_SUBSET_SHA256}},
        "train_x": xtr.reshape(len(xtr), -1),
        "train_y": ytr.astype(np.int64),
        "test_x": xte.reshape(len(xte), -1),
        "test_y": yte.astype(np.int64),
        "val": "last20",
    }


def _load_cifar10(path: Path) -> dict[str, Any]:
    if path.is_dir():
        for candidate in (path / CIFAR10_TARBALL, path / "cifar-10-batches-py", path / CIFAR10_SUBSET):
            if candidate.exists():
                return _load_cifar10(candidate)
        if (path / "data_batch_1").is_file():  # the extracted cifar-10-batches-py itself
            blobs = {n: (path / n).read_bytes() for n in CIFAR10_BATCHES if (path / n).is_file()}
            return _cifar_from_batches(blobs, str(path), {path.name: {"canonical": False, "note": "extracted folder"}})
        raise DataError(f"cifar10 source {path}: no {CIFAR10_TARBALL}, cifar-10-batches-py/ or {CIFAR10_SUBSET}")
    if path.suffix == ".npz":
        return _cifar_subset(path)
    digests = file_digests(path)  # the archive's checksum, before anything is decompressed
    canonical = digests["sha256"] == CANONICAL_ARCHIVES["cifar10"]["sha256"] or digests["md5"] == CIFAR10_TARBALL_MD5
    files = {path.name: {**digests, "canonical": canonical}}
    return _cifar_from_batches(_cifar_tar_blobs(path), str(path), files)


def _text8_zip(path: Path, digest: str) -> tuple[bytes, dict]:
    cap = MEMBER_MAX_BYTES["text8"]
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            member = "text8" if "text8" in members else members[0] if len(members) == 1 else None
            if member is None:
                raise DataError(f"{path}: no member 'text8' (members: {', '.join(members[:10])})")
            if zf.getinfo(member).file_size > cap:
                raise DataError(f"{path}: member {member} has {zf.getinfo(member).file_size:,} bytes (cap {cap:,})")
            with zf.open(member) as f:
                text = f.read(cap + 1)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from exc
    if len(text) > cap:
        raise DataError(f"{path}: member {member} decompresses to more than {cap:,} bytes")
    sha = hashlib.sha256(text).hexdigest()
    canonical = digest == CANONICAL_ARCHIVES["text8"]["sha256"] or sha == TEXT8_SHA256
    return text, {path.name: {"sha256": digest, "member": member, "member_sha256": sha, "canonical": canonical}}


def _load_text8(path: Path) -> dict[str, Any]:
    if path.is_dir():
        for candidate in (TEXT8_ZIP, "text8", TEXT8_SUBSET):
            if (path / candidate).is_file():
                return _load_text8(path / candidate)
        raise DataError(f"text8 source {path}: no {TEXT8_ZIP}, text8 or {TEXT8_SUBSET}")
    digest = file_digests(path)["sha256"]  # the archive's checksum, before anything is decompressed
    if zipfile.is_zipfile(path):
        text, files = _text8_zip(path, digest)
    else:
        if path.stat().st_size > MEMBER_MAX_BYTES["text8"]:
            raise DataError(f"{path}: {path.stat().st_size:,} bytes, more than the text8 cap")
        text = path.read_bytes()
        files = {path.name: {"sha256": digest, "canonical": digest in (TEXT8_SHA256, TEXT8_SUBSET_SHA256)}}
    return {"files": files, "ids": text8_encode(text, where=str(path))}


def load(name: str, path: Path) -> dict[str, Any]:
    """Parse the raw files at ``path`` (from ``locate``): arrays plus a ``files`` digest record.

    mnist/cifar10: ``train_x``/``test_x`` uint8 (N, pixels) row-major HWC, ``train_y``/``test_y``
    int64, ``val`` = how val is made (``reference`` split or the subset's ``last20``); text8:
    ``ids`` uint8 (n,) of the whole corpus.
    """
    loaders = {"mnist": _load_mnist, "cifar10": _load_cifar10, "text8": _load_text8}
    return loaders[check_name(name)](path)


def text8_encode(text: bytes | str, *, where: str = "text") -> np.ndarray:
    """Map text8 chars to ids (' ' -> 0, 'a'..'z' -> 1..26); anything else is a DataError."""
    raw = np.frombuffer(text.encode("ascii", "replace") if isinstance(text, str) else text, np.uint8)
    ids = np.where(raw == 32, 0, raw.astype(np.int16) - 96)
    bad = np.flatnonzero((ids < 0) | (ids > 26))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{where}: char {raw[i : i + 1].tobytes()!r} at offset {i} is not in the "
            f"text8 alphabet (a-z and space); {bad.size} such chars"
        )
    return ids.astype(np.uint8)


def load_bundled_large() -> dict[str, Any]:
    """The bundled text8 prefix + one space + the Wikipedia sample, as ``load("text8", ...)`` returns."""
    folder, parts, files = raw_dir() / "text8", [], {}
    for name, sha in ((TEXT8_SUBSET, TEXT8_SUBSET_SHA256), (WIKI_SAMPLE, WIKI_SAMPLE_SHA256)):
        if not (folder / name).is_file():
            raise DataError(f"--source {BUNDLED_LARGE}: {folder / name} is missing (see data/raw/text8/PROVENANCE.md)")
        data = (folder / name).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        files[name] = {"sha256": digest, "canonical": digest == sha}
        parts.append(text8_encode(data, where=str(folder / name)))
    ids = np.concatenate([parts[0], np.zeros(1, np.uint8), parts[1]])
    return {"files": files, "ids": ids}


def text8_decode_bytes(ids: np.ndarray) -> str:
    """text8 ids (uint8 array) -> the text, vectorised (``text8_decode`` for a few ids)."""
    ids = np.asarray(ids, dtype=np.uint8)
    return np.where(ids == 0, 32, ids + 96).astype(np.uint8).tobytes().decode("ascii")


def text8_decode(ids: Iterable[int]) -> str:
    return "".join(TEXT8_ALPHABET[int(i)] for i in ids)

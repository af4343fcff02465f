"""Tests of the data layer (pipeline/data/): prepare -> verify -> read, preprocessing, errors.

(Longer than 500 lines: the data layer's tests, one per rule of the manifest and the readers.)

Fast tests use small generated IDX files plus the bundled CIFAR-10 subset and text8 prefix; one
test prepares the real bundled MNIST (about 3 s). The ``slow`` tests use the session ``ray_local``
runtime and a moto S3 server. Sources and downloads: test_data_sources.py; the manifest schema:
test_data_manifest.py; seeds, binarisation and text8 windows: test_data_transforms.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import data as D
from pipeline.data import sources

try:  # `python -m pytest` from the repo root puts it on sys.path; plain `pytest` puts tests/
    from tests.servers import aws_env, create_bucket, moto_s3
except ModuleNotFoundError:  # pragma: no cover
    from servers import aws_env, create_bucket, moto_s3

RAW = Path(__file__).resolve().parents[2] / "data" / "raw"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def write_idx_folder(folder: Path, n_train: int, n_test: int, *, seed: int = 0) -> dict:
    """Random MNIST-like IDX files (gzip) in ``folder``; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        img = struct.pack(">IIII", 2051, n, 28, 28) + x.tobytes()
        lab = struct.pack(">II", 2049, n) + y.tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(img))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(lab))
        arrays[prefix] = (x.reshape(n, -1), y.astype(np.int64))
    return arrays


def read_raw(uri: str, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """All stored rows of a split as (uint8 matrix, int64 aux), read with plain pyarrow."""
    man = D.read_manifest(uri)
    tabs = [pq.read_table(os.path.join(uri, s["path"])) for s in man["splits"][split]["shards"]]
    tab = pa.concat_tables(tabs)
    data_col, aux_col = ("ids", "offset") if name == "text8" else ("image", "label")
    width = tab.schema.field(data_col).type.byte_width
    mat = np.frombuffer(b"".join(tab.column(data_col).to_pylist()), np.uint8).reshape(-1, width)
    return mat, tab.column(aux_col).to_numpy()


def rows_digest(mat: np.ndarray, aux: np.ndarray | None = None) -> str:
    """Order-independent digest of a multiset of rows."""
    aux = np.zeros(len(mat), np.int64) if aux is None else np.asarray(aux, np.int64)
    hashes = sorted(
        hashlib.sha256(np.ascontiguousarray(r).tobytes() + struct.pack("<q", int(a))).digest()
        for r, a in zip(mat, aux, strict=True)
    )
    return hashlib.sha256(b"".join(hashes)).hexdigest()


@pytest.fixture(scope="module")
def small_mnist(tmp_path_factory):
    """A prepared 300+40 image MNIST-like dataset (several shards per split) and its source."""
    root = tmp_path_factory.mktemp("small_mnist")
    arrays = write_idx_folder(root / "src", 300, 40)
    out = str(root / "shards")
    D.prepare("mnist", out, source=str(root / "src"), rows_per_shard=64, progress=False)
    return out, arrays


@pytest.fixture
def prepared_copy(small_mnist, tmp_path):
    """A private copy of the small dataset that a test may damage."""
    dst = tmp_path / "ds"
    shutil.copytree(small_mnist[0], dst)
    return str(dst)


# ------------------------------------------------------------------------------------------------
# splits and round trips
# ------------------------------------------------------------------------------------------------


def test_reference_split_matches_torch_random_split():
    import torch

    train, val = D.reference_split(60000)
    assert (len(train), len(val)) == (59400, 600)
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(2147483647)).numpy()
    np.testing.assert_array_equal(train, perm[:59400])
    np.testing.assert_array_equal(val, perm[59400:])
    tr, va = D.reference_split(50000)
    assert (len(tr), len(va)) == (49500, 500)
    # torch floors each part and gives the remainder to the first part(s)
    assert [len(p) for p in D.reference_split(301)] == [298, 3]  # floor: 297 + 3, remainder 1


def test_small_mnist_round_trip(small_mnist):
    out, arrays = small_mnist
    checked = D.verify(out)
    assert checked["verified"]["splits"] == {"train": 297, "val": 3, "test": 40}
    assert checked["verified"]["checked_checksums"] is True
    assert {k: v for k, v in checked.items() if k != "verified"} == D.read_manifest(out)
    assert D.verify(out, ["val"], check_checksums=False)["verified"]["splits"] == {"val": 3}
    man = D.read_manifest(out)
    assert man["dataset"] == "mnist" and man["format_version"] == D.FORMAT_VERSION
    for split in ("train", "val", "test"):
        assert man["splits"][split]["schema"] == [
            {"name": "image", "type": "fixed_size_binary[784]"},
            {"name": "label", "type": "int64"},
        ]
    assert man["shape"] == [28, 28]
    assert len(man["splits"]["train"]["shards"]) == 5  # 297 rows, 64 per shard
    assert all(len(s["sha256"]) == 64 for s in man["splits"]["train"]["shards"])
    assert man["source"]["kind"] == "folder" and man["source"]["exact"] is False
    assert man["created_at"]
    # exact rows in the reference order: train = perm head, val = perm tail, test = official
    x, y = arrays["train"]
    tr, va = D.reference_split(300)
    for split, idx in (("train", tr), ("val", va)):
        mat, lab = read_raw(out, split, "mnist")
        np.testing.assert_array_equal(mat, x[idx])
        np.testing.assert_array_equal(lab, y[idx])
        assert D.num_rows(out, split) == len(idx)
    mat, lab = read_raw(out, "test", "mnist")
    np.testing.assert_array_equal(mat, arrays["t10k"][0])
    np.testing.assert_array_equal(lab, arrays["t10k"][1])
    # the plain reader yields every row, binarised and model-ready
    batches = list(D.iter_batches(out, "train", "mnist", batch_size=50))
    assert [len(b["x"]) for b in batches] == [50] * 5 + [47]
    xb = np.concatenate([b["x"] for b in batches])
    assert xb.dtype == np.int64 and xb.shape == (297, 28, 28, 1)
    assert set(np.unique(xb)) <= {0, 1}
    flat = xb.reshape(297, -1)
    src = x[tr]
    assert not flat[src == 0].any() and flat[src == 255].all()


def test_real_mnist_vendored():
    """The vendored MNIST end to end (about 3 s): reference split sizes, every example kept."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        man = D.prepare("mnist", out, progress=False)
        assert man["source"]["exact"] is True
        assert D.verify(out)["verified"]["splits"] == {"train": 59400, "val": 600, "test": 10000}
        train_x, train_y = read_raw(out, "train", "mnist")
        val_x, val_y = read_raw(out, "val", "mnist")
        test_x, test_y = read_raw(out, "test", "mnist")
    src = sources.load("mnist", RAW / "mnist")
    assert list(test_y[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    np.testing.assert_array_equal(test_x, src["test_x"])
    _, val_idx = D.reference_split(60000)
    np.testing.assert_array_equal(val_x, src["train_x"][val_idx])
    np.testing.assert_array_equal(val_y, src["train_y"][val_idx])
    assert rows_digest(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])) == (
        rows_digest(src["train_x"], src["train_y"])
    )
    assert np.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cifar10_vendored_round_trip(tmp_path):
    out = str(tmp_path / "c")
    man = D.prepare("cifar10", out, progress=False)
    assert D.verify(out)["verified"]["splits"] == {"train": 180, "val": 20, "test": 20}
    assert man["source"]["exact"] is True and "last 20" in man["split_rule"]["method"]
    with np.load(RAW / "cifar10" / "cifar10_lossless_subset.npz") as z:
        xtr, ytr = z["x_train_first200"].reshape(200, -1), z["y_train_first200"]
        xte, yte = z["x_test_first20"].reshape(20, -1), z["y_test_first20"]
    for split, (x, y) in {
        "train": (xtr[:180], ytr[:180]),
        "val": (xtr[180:], ytr[180:]),
        "test": (xte, yte),
    }.items():
        mat, lab = read_raw(out, split, "cifar10")
        np.testing.assert_array_equal(mat, x)
        np.testing.assert_array_equal(lab, y)
    # train image 0 (frog), HWC: row 0 starts [59,62,63],[43,46,45]
    assert read_raw(out, "train", "cifar10")[0][0, :6].tolist() == [59, 62, 63, 43, 46, 45]
    (b,) = list(D.iter_batches(out, "test", "cifar10", batch_size=64))
    assert b["x"].dtype == np.float32 and b["x"].shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(b["x"], (2 * xte.reshape(20, 32, 32, 3).astype(np.float64) + 1) / 256 - 1)


def test_text8_vendored_round_trip(tmp_path):
    out = str(tmp_path / "t")
    man = D.prepare("text8", out, progress=False)
    assert D.verify(out)["verified"]["splits"] == {"train": 350, "val": 19, "test": 19}
    assert man["splits"]["train"]["schema"][0] == {"name": "ids", "type": "fixed_size_binary[512]"}
    assert man["splits"]["test"]["schema"][0] == {"name": "ids", "type": "fixed_size_binary[256]"}
    assert {s: (v["row_chars"], v["row_stride"], v["chars"]) for s, v in man["splits"].items()} == {
        "train": (512, 256, 90_000),
        "val": (256, 256, 5_000),
        "test": (256, 256, 5_000),
    }
    assert man["split_rule"]["dropped_tail_chars"] == {"val": 136, "test": 136}
    assert man["split_rule"]["train_unused_start_positions"] == 90_000 - 256 - 350 * 256
    text = (RAW / "text8" / "text8_first100k.txt").read_text()
    # training rows: 512 chars starting every 256, each overlapping the next by half
    ids, offsets = read_raw(out, "train", "text8")
    assert offsets.tolist() == list(range(0, 256 * 350, 256))
    for k in (0, 1, 349):
        assert D.text8_decode(ids[k]) == text[256 * k : 256 * k + 512]
    for split, start in (("val", 90_000), ("test", 95_000)):
        ids, offsets = read_raw(out, split, "text8")
        assert offsets.tolist() == list(range(0, 256 * len(ids), 256))
        decoded = "".join(D.text8_decode(r) for r in ids)
        assert decoded == text[start : start + len(decoded)]
    # model-ready: each training row cropped to 256 chars at an offset in [0, 256)
    x = _iter_rows(out, "train", "text8", batch_size=100)
    assert x.dtype == np.int64 and x.shape == (350, 256) and x.min() >= 0 and x.max() <= 26
    starts = [text.find(D.text8_decode(row), 256 * k) - 256 * k for k, row in enumerate(x)]
    assert all(0 <= o < 256 for o in starts) and len(set(starts)) > 100
    assert D.text8_decode(_iter_rows(out, "test", "text8", batch_size=8)[0]) == text[95_000:95_256]
    out2 = str(tmp_path / "t2")  # another window length
    D.prepare("text8", out2, seq_len=1000, progress=False)
    assert D.verify(out2)["verified"]["splits"] == {"train": 89, "val": 5, "test": 5}


# ------------------------------------------------------------------------------------------------
# verify: every failure names its culprit
# ------------------------------------------------------------------------------------------------


def _shard(uri: str, split: str = "train", i: int = 1) -> str:
    return os.path.join(uri, D.read_manifest(uri)["splits"][split]["shards"][i]["path"])


def _edit_manifest(uri: str, fn) -> None:
    path = os.path.join(uri, "manifest.json")
    man = json.loads(Path(path).read_text())
    fn(man)
    Path(path).write_text(json.dumps(man))


def test_verify_corrupt_shard(prepared_copy):
    path = _shard(prepared_copy)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(D.DataError, match=rf"shard {re.escape(path)} \(split 'train'\): sha256 .* \(corrupt\)"):
        D.verify(prepared_copy)
    D.verify(prepared_copy, ["val", "test"])  # other splits are fine
    D.verify(prepared_copy, check_checksums=False)  # same size, footer intact


def test_verify_truncated_shard(prepared_copy):
    path = _shard(prepared_copy, "test", 0)
    Path(path).write_bytes(Path(path).read_bytes()[:-100])
    for check in (True, False):
        with pytest.raises(D.DataError, match=rf"shard {re.escape(path)} \(split 'test'\).*truncated"):
            D.verify(prepared_copy, check_checksums=check)
    with pytest.raises(D.DataError, match=rf"shard {re.escape(path)}"):
        list(D.iter_batches(prepared_copy, "test", "mnist", batch_size=8))


def test_verify_missing_shard_and_manifest(prepared_copy, tmp_path):
    path = _shard(prepared_copy, "train", 3)
    os.remove(path)
    with pytest.raises(D.DataError, match=rf"missing shard {re.escape(path)} \(split 'train'\)"):
        D.verify(prepared_copy)
    with pytest.raises(D.DataError, match="missing manifest .*manifest.json"):
        D.verify(str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="missing manifest"):
        D.num_rows(str(tmp_path / "nowhere"), "train")


def test_verify_schema_mismatch_in_shard(prepared_copy):
    path = _shard(prepared_copy, "val", 0)
    tab = pq.read_table(path)
    tab = tab.set_column(1, "label", tab.column("label").cast(pa.int32()))
    pq.write_table(tab, path)
    data = Path(path).read_bytes()

    def fix(man):  # make size and checksum agree, so only the schema is wrong
        man["splits"]["val"]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_manifest(prepared_copy, fix)
    with pytest.raises(
        D.DataError,
        match=rf"shard {re.escape(path)} \(split 'val'\): column 'label' has "
        r"type int32, the manifest says int64",
    ):
        D.verify(prepared_copy)


def test_verify_schema_mismatch_in_manifest(prepared_copy):
    _edit_manifest(prepared_copy, lambda m: m["splits"]["val"]["schema"][0].update(type="fixed_size_binary[785]"))
    with pytest.raises(
        D.DataError,
        match=r"schema of split 'val': column 'image' is fixed_size_binary.785., "
        r"mnist expects fixed_size_binary\[784\]",
    ):
        D.verify(prepared_copy)
    D.verify(prepared_copy, ["train", "test"])


def test_unknown_dataset(prepared_copy):
    _edit_manifest(prepared_copy, lambda m: m.update(dataset="fashion_mnist"))
    with pytest.raises(D.DataError, match="unknown dataset 'fashion_mnist'"):
        D.verify(prepared_copy)
    with pytest.raises(D.DataError, match="unknown dataset 'svhn'"):
        D.prepare("svhn", "/nonexistent/never-written", progress=False)
    with pytest.raises(D.DataError, match="unknown dataset 'svhn'"):
        D.preprocess("svhn", {})


def test_empty_and_unknown_split(prepared_copy):
    _edit_manifest(prepared_copy, lambda m: m["splits"]["val"].update(rows=0, shards=[]))
    with pytest.raises(D.DataError, match="split 'val' is empty"):
        D.verify(prepared_copy)
    D.verify(prepared_copy, ["train"])
    with pytest.raises(D.DataError, match="split 'dev' is not in the manifest"):
        D.verify(prepared_copy, ["dev"])
    with pytest.raises(D.DataError, match="holds dataset 'mnist', not 'text8'"):
        list(D.iter_batches(prepared_copy, "train", "text8", batch_size=4))


def test_reprepare_removes_stale_shards(prepared_copy, small_mnist, tmp_path):
    src = Path(small_mnist[0]).parent / "src"
    D.prepare("mnist", prepared_copy, source=str(src), rows_per_shard=1000, progress=False)
    assert sorted(os.listdir(os.path.join(prepared_copy, "train"))) == ["part-00000.parquet"]
    assert D.verify(prepared_copy)["verified"]["shards"] == 3


# ------------------------------------------------------------------------------------------------
# preprocessing
# ------------------------------------------------------------------------------------------------


def test_preprocess_keeps_mnist_grey_levels():
    """The Ray side is deterministic: MNIST stays grey levels; to_model binarises on the device."""
    img = np.tile(np.array([0, 255, 128, 51], np.uint8), 196)[None].repeat(3, axis=0)
    out = D.preprocess("mnist", {"image": img, "label": np.array([0, 1, 9])})["x"]
    assert out.dtype == np.uint8 and out.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(out.reshape(3, 784), img)


def test_plain_reader_binarisation_is_seeded(small_mnist):
    """iter_batches draws from reader_generator(seed, epoch): the same arguments give the same
    binarisation, another seed or epoch another one; grey 0 and 255 are exact."""
    out, arrays = small_mnist
    a = _iter_rows(out, "train", "mnist", batch_size=64, seed=1)
    np.testing.assert_array_equal(a, _iter_rows(out, "train", "mnist", batch_size=64, seed=1))
    for other in ({"seed": 1, "epoch": 1}, {"seed": 2}):
        b = _iter_rows(out, "train", "mnist", batch_size=64, **other)
        assert abs((a != b).mean() - 1 / 3) < 0.02  # independent draws: E[2p(1-p)] = 1/3 for uniform grey
    grey = arrays["train"][0][D.reference_split(300)[0]]
    flat = a.reshape(len(a), -1)
    assert not flat[grey == 0].any() and flat[grey == 255].all()
    middle = (grey > 0) & (grey < 255)
    assert abs(flat[middle].mean() - (grey[middle] / 255).mean()) < 0.01


def test_preprocess_accepts_every_column_representation():
    mat = np.arange(3 * 3072, dtype=np.int64).reshape(3, 3072) % 256
    forms = [
        mat.astype(np.uint8),
        mat,  # any integer dtype in range
        np.array([r.astype(np.uint8).tobytes() for r in mat], dtype=object),
        np.array([r.astype(np.uint8).tobytes() for r in mat], dtype="S3072"),
        pa.array([r.astype(np.uint8).tobytes() for r in mat], pa.binary(3072)),
        pa.array([r.astype(np.uint8).tobytes() for r in np.concatenate([mat, mat])], pa.binary(3072)).slice(3, 3),
    ]
    outs = [D.preprocess("cifar10", {"image": f})["x"] for f in forms]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_preprocess_cifar_bin_centres():
    p = np.arange(256, dtype=np.uint8)
    img = np.tile(p, 12)[None]  # one image whose 3072 values cycle 0..255
    x = D.preprocess("cifar10", {"image": img})["x"]
    assert x.dtype == np.float32 and x.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(x.reshape(-1)[:256], ((2 * p.astype(np.float64) + 1) / 256 - 1))
    for k in (2, 16, 256):
        # the reference chain in float32: ToTensor (p/255) -> 2x-1 -> quantize
        x32 = (p.astype(np.float32) / np.float32(255)) * 2 - 1
        idx = np.clip(np.floor((x32 / 2 + 0.5) * k), 0, k - 1)
        want = (2 * idx + 1) / k - 1
        got = D.preprocess("cifar10", {"image": img}, num_bins=k)["x"].reshape(-1)[:256]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert len(np.unique(got)) == k


def test_preprocess_text8_and_value_errors():
    ids = np.array([[0, 1, 26, 5]], np.uint8)
    x = D.preprocess("text8", {"ids": ids, "offset": np.array([0])})["x"]
    assert x.dtype == np.uint8 and x.tolist() == [[0, 1, 26, 5]]
    with pytest.raises(D.DataError, match="column 'ids' has id 27"):
        D.preprocess("text8", {"ids": np.array([[0, 27]], np.uint8)})
    with pytest.raises(D.DataError, match="column 'ids' has values outside 0..255"):
        D.preprocess("text8", {"ids": np.array([[0, 300]])})
    with pytest.raises(D.DataError, match="column 'label' has values outside 0..9"):
        D.preprocess("mnist", {"image": np.zeros((2, 784), np.uint8), "label": np.array([1, 10])})
    with pytest.raises(D.DataError, match="column 'image' rows have 100 values, expected 784"):
        D.preprocess("mnist", {"image": np.zeros((2, 100), np.uint8)})
    with pytest.raises(D.DataError, match="batch has no column 'image'"):
        D.preprocess("cifar10", {"pixels": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(D.DataError, match="column 'image' holds non-bytes"):
        D.preprocess("mnist", {"image": np.array([None], dtype=object)})


# ------------------------------------------------------------------------------------------------
# plain reader: subsets and shuffling
# ------------------------------------------------------------------------------------------------


def _iter_rows(uri, split, name, **kw):
    return np.concatenate([b["x"] for b in D.iter_batches(uri, split, name, **kw)])


def test_fraction_is_exact_nested_and_layout_independent(tmp_path):
    """(text8 val rows pass to_model unchanged, so rows can be compared as sets.)"""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    D.prepare("text8", a, seq_len=16, progress=False)
    D.prepare("text8", b, seq_len=16, rows_per_shard=100, progress=False)  # other sharding
    n = D.num_rows(a, "val")
    half = _iter_rows(a, "val", "text8", batch_size=128, fraction=0.5, seed=3)
    quarter = _iter_rows(a, "val", "text8", batch_size=128, fraction=0.25, seed=3)
    assert len(half) == round(0.5 * n) and len(quarter) == round(0.25 * n)
    as_set = lambda m: {r.tobytes() for r in m}  # noqa: E731
    assert as_set(quarter) < as_set(half)
    assert as_set(_iter_rows(b, "val", "text8", batch_size=7, fraction=0.5, seed=3)) == as_set(half)
    other = _iter_rows(a, "val", "text8", batch_size=128, fraction=0.5, seed=4)
    assert as_set(other) != as_set(half)
    with pytest.raises(ValueError, match="fraction"):
        next(D.iter_batches(a, "val", "text8", batch_size=8, fraction=0.0))


def test_shuffle_is_a_seeded_permutation(tmp_path):
    out = str(tmp_path / "t")
    D.prepare("text8", out, seq_len=16, progress=False)
    plain = _iter_rows(out, "val", "text8", batch_size=100)
    s1 = _iter_rows(out, "val", "text8", batch_size=100, shuffle=True, seed=1)
    s1b = _iter_rows(out, "val", "text8", batch_size=33, shuffle=True, seed=1)
    s2 = _iter_rows(out, "val", "text8", batch_size=100, shuffle=True, seed=2)
    np.testing.assert_array_equal(s1, s1b)
    assert not np.array_equal(s1, plain) and not np.array_equal(s1, s2)
    assert rows_digest(s1) == rows_digest(plain) == rows_digest(s2)


# ------------------------------------------------------------------------------------------------
# Ray Data (slow)
# ------------------------------------------------------------------------------------------------


def _ray_rows(ds) -> np.ndarray:
    return np.concatenate([b["x"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


@pytest.mark.slow
def test_ray_dataset_mnist_grey_levels_then_seeded_binarisation(ray_local, small_mnist):
    """Ray yields the stored grey levels on every pass; the worker's to_model binarises each batch
    with the generator of (seed, rank, step): the same step gives the same draw, another step not."""
    import torch

    out, _ = small_mnist
    ds = D.ray_dataset(out, "train", "mnist", seed=7)
    e1, e2 = _ray_rows(ds), _ray_rows(ds)
    assert e1.shape == (297, 28, 28, 1) and e1.dtype == np.uint8
    stored, _ = read_raw(out, "train", "mnist")
    assert rows_digest(e1.reshape(297, -1)) == rows_digest(e2.reshape(297, -1)) == rows_digest(stored)
    (grey,) = [b["x"] for b in ds.iter_torch_batches(batch_size=297)]
    assert grey.dtype == torch.uint8
    x, again, step4 = (
        D.to_model(grey, "mnist", seq_len=0, generator=D.batch_generator(7, 0, step, "cpu")) for step in (3, 3, 4)
    )
    assert x.dtype == torch.int64 and x.shape == (297, 28, 28, 1) and set(x.unique().tolist()) <= {0, 1}
    assert torch.equal(x, again) and not torch.equal(x, step4)
    assert not x[grey == 0].any() and x[grey == 255].all()


@pytest.mark.slow
def test_ray_dataset_fraction_matches_plain_reader(ray_local, tmp_path):
    """A streaming (not materialized) read of a 30 % subset: the plain reader's rows exactly (val);
    training rows come uncropped (2*seq_len chars) and hold the plain reader's crops."""
    out = str(tmp_path / "t")
    D.prepare("text8", out, seq_len=64, progress=False)
    n = D.num_rows(out, "val")
    sub = _ray_rows(D.ray_dataset(out, "val", "text8", fraction=0.3, seed=5, materialize=False))
    plain = _iter_rows(out, "val", "text8", batch_size=64, fraction=0.3, seed=5)
    assert sub.dtype == np.uint8 and plain.dtype == np.int64
    assert sub.shape == (round(0.3 * n), 64) == plain.shape
    assert rows_digest(sub) == rows_digest(plain.astype(np.uint8))
    train = _ray_rows(D.ray_dataset(out, "train", "text8", fraction=0.3, seed=5, materialize=False, seq_len=64))
    assert train.shape == (round(0.3 * D.num_rows(out, "train")), 128)
    ids, _ = read_raw(out, "train", "text8")
    assert {r.tobytes() for r in train} <= {r.tobytes() for r in ids}
    joined = b"\xff".join(r.tobytes() for r in train)
    crops = _iter_rows(out, "train", "text8", batch_size=64, fraction=0.3, seed=5)
    assert all(c.astype(np.uint8).tobytes() in joined for c in crops)
    with pytest.raises(D.DataError, match="prepared with seq_len 64, not 256"):
        D.ray_dataset(out, "train", "text8", seq_len=256)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "cifar10", "text8"])
def test_ray_dataset_preprocessed_in_the_caller_yields_the_lazy_maps_batches(
    ray_local, small_mnist, tmp_path, monkeypatch, name
):
    """A small split is preprocessed by the calling process (no map task to wait for when a Train
    worker iterates it): the seeded, locally shuffled batches equal the lazy map's, bit for bit."""
    import ray.data

    from pipeline.data import readers

    out = small_mnist[0] if name == "mnist" else str(tmp_path / name)
    if name != "mnist":
        D.prepare(name, out, rows_per_shard=64, progress=False, **({"seq_len": 64} if name == "text8" else {}))
    monkeypatch.setattr(readers, "RAY_MAP_BATCH_SIZE", 48)  # several blocks per bundle, a ragged last one
    options = ray.data.DataContext.get_current().execution_options
    monkeypatch.setattr(options, "preserve_order", True)  # as fit() runs it

    def batches(ds):
        return [
            b["x"] for b in ds.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=40, local_shuffle_seed=3)
        ]

    eager = D.ray_dataset(out, "train", name, num_bins=16 if name == "cifar10" else 256)
    monkeypatch.setattr(readers, "EAGER_PREPROCESS_BYTES", -1)
    lazy = D.ray_dataset(out, "train", name, num_bins=16 if name == "cifar10" else 256)
    assert "MapBatches" not in repr(eager) and "MapBatches" in repr(lazy)
    got, want = batches(eager), batches(lazy)
    assert len(got) == len(want) > 4
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.slow
def test_s3_prepare_verify_and_ray_read(ray_local, tmp_path):
    """prepare -> verify -> Ray read over s3:// on a moto server. The Ray runtime was started
    without the AWS variables, so this also checks that ray_dataset ships an explicit
    S3 filesystem (endpoint + keys) with its read tasks."""
    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn-data")
        uri = "s3://bfn-data/datasets/cifar10"
        D.prepare("cifar10", uri, rows_per_shard=64, progress=False)
        assert D.verify(uri)["verified"]["splits"] == {"train": 180, "val": 20, "test": 20}
        x = _ray_rows(D.ray_dataset(uri, "train", "cifar10"))
        assert x.shape == (180, 32, 32, 3) and x.dtype == np.float32
        with np.load(RAW / "cifar10" / "cifar10_lossless_subset.npz") as z:
            want = z["x_train_first200"][:180]
        pixels = np.rint((x + 1) * 128 - 0.5).astype(np.uint8)  # invert the 256-bin centres
        assert rows_digest(pixels.reshape(180, -1)) == rows_digest(want.reshape(180, -1))
        plain = _iter_rows(uri, "val", "cifar10", batch_size=8)
        assert plain.shape == (20, 32, 32, 3)
        # a damaged object on S3 is named too
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        key = "datasets/cifar10/test/part-00000.parquet"
        s3.put_object(Bucket="bfn-data", Key=key, Body=b"PAR1 not parquet")
        with pytest.raises(D.DataError, match=re.escape(f"shard {uri}/test/part-00000.parquet (split 'test')")):
            D.verify(uri)

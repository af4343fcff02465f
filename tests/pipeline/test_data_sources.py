"""Raw sources (pipeline/data/sources.py): archive files, folders, URLs, downloads and their limits.

Archives are built in tmp_path from the bundled subsets: a cifar-10-python.tar.gz with the
cifar-10-batches-py layout (the 200 + 20 bundled images as five training batches and a test
batch, pickled as the original) and a text8.zip whose member ``text8`` is the bundled 100k-char
prefix. URLs are served by an http.server on 127.0.0.1 in this process; the canonical checksums
are replaced by the built archives' where a test needs a download to be accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline import data as D
from pipeline.data import sources
from tests.pipeline.test_data import RAW, read_raw, rows_digest, write_idx_folder
from tests.servers import free_port

TEXT = (RAW / "text8" / "text8_first100k.txt").read_bytes()


def build_cifar_archive(folder: Path) -> dict:
    """cifar-10-python.tar.gz (and its extracted folder) made from the bundled subset."""
    with np.load(RAW / "cifar10" / "cifar10_lossless_subset.npz") as z:
        xtr, ytr = z["x_train_first200"], z["y_train_first200"].astype(np.int64)
        xte, yte = z["x_test_first20"], z["y_test_first20"].astype(np.int64)
    batches = {f"data_batch_{i + 1}": (xtr[40 * i : 40 * i + 40], ytr[40 * i : 40 * i + 40]) for i in range(5)}
    batches["test_batch"] = (xte, yte)
    folder.mkdir(parents=True, exist_ok=True)
    extracted = folder / "extracted" / "cifar-10-batches-py"
    extracted.mkdir(parents=True)
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, (x, y) in batches.items():
            planes = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # the original stores CHW rows
            blob = pickle.dumps(
                {b"batch_label": name.encode(), b"labels": y.tolist(), b"data": planes, b"filenames": []}, protocol=2
            )
            (extracted / name).write_bytes(blob)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {
        "archive": archive,
        "extracted": extracted,
        "train": (xtr.reshape(200, -1), ytr),
        "test": (xte.reshape(20, -1), yte),
    }


def build_text8_zip(path: Path, text: bytes = TEXT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_rows(out: str, name: str) -> dict:
    return {split: rows_digest(*read_raw(out, split, name)) for split in ("train", "val", "test")}


# ------------------------------------------------------------------------------------------------
# local archives and folders
# ------------------------------------------------------------------------------------------------


def test_cifar10_archive_file_source(tmp_path):
    """`--source /path/to/cifar-10-python.tar.gz` (a file, not a folder) gives the reference split."""
    built = build_cifar_archive(tmp_path / "src")
    out = str(tmp_path / "c")
    man = D.prepare("cifar10", out, source=str(built["archive"]), progress=False)
    assert D.verify(out)["verified"]["splits"] == {"train": 198, "val": 2, "test": 20}
    assert man["source"]["kind"] == "file" and man["source"]["exact"] is False
    assert man["source"]["files"]["cifar-10-python.tar.gz"]["sha256"] == sha256(built["archive"])
    assert man["split_rule"]["seed"] == 2147483647
    x, y = built["train"]
    tr, va = D.reference_split(200)
    for split, idx in (("train", tr), ("val", va)):
        mat, lab = read_raw(out, split, "cifar10")
        np.testing.assert_array_equal(mat, x[idx])  # CHW pickles back to HWC rows
        np.testing.assert_array_equal(lab, y[idx])
    mat, lab = read_raw(out, "test", "cifar10")
    np.testing.assert_array_equal(mat, built["test"][0])
    np.testing.assert_array_equal(lab, built["test"][1])


def test_cifar10_folder_sources_agree(tmp_path):
    """A folder holding the archive, the extracted cifar-10-batches-py, or a folder holding that."""
    built = build_cifar_archive(tmp_path / "src")
    digests = []
    for i, source in enumerate([tmp_path / "src", built["extracted"], built["extracted"].parent]):
        out = str(tmp_path / f"c{i}")
        D.prepare("cifar10", out, source=str(source), progress=False)
        digests.append(all_rows(out, "cifar10"))
    assert digests[0] == digests[1] == digests[2]


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for name in sources.CIFAR10_BATCHES:
        (src / name).write_bytes(pickle.dumps(os.system))
    with pytest.raises(D.DataError, match="refers to (posix|nt).system; refusing"):
        D.prepare("cifar10", str(tmp_path / "o"), source=str(src.parent), progress=False)


def test_text8_zip_file_and_folder_sources(tmp_path):
    """A text8.zip (file or in a folder) and a plain `text8` file give the bundled prefix's shards."""
    bundled = str(tmp_path / "bundled")
    D.prepare("text8", bundled, seq_len=64, progress=False)
    archive = build_text8_zip(tmp_path / "zipdir" / "text8.zip")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "text8").write_bytes(TEXT)
    for i, source in enumerate([archive, archive.parent, tmp_path / "plain"]):
        out = str(tmp_path / f"t{i}")
        man = D.prepare("text8", out, source=str(source), seq_len=64, progress=False)
        assert all_rows(out, "text8") == all_rows(bundled, "text8"), source
    assert man["source"]["files"]["text8"]["canonical"] is True  # the bundled prefix's own sha256


def test_text8_bad_chars_and_missing_sources(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text8").write_bytes(b"hello World")
    with pytest.raises(D.DataError, match=r"'W' at offset 6"):
        D.prepare("text8", str(tmp_path / "o"), source=str(bad), progress=False)
    with pytest.raises(D.DataError, match="neither an existing file or folder nor a URL"):
        D.prepare("cifar10", str(tmp_path / "o"), source=str(tmp_path / "nope.tar.gz"), progress=False)
    with pytest.raises(D.DataError, match="no cifar-10-python.tar.gz, cifar-10-batches-py/"):
        D.prepare("cifar10", str(tmp_path / "o"), source=str(bad), progress=False)
    with pytest.raises(D.DataError, match="is a file; pass the folder holding the four IDX files"):
        D.prepare("mnist", str(tmp_path / "o"), source=str(bad / "text8"), progress=False)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(D.DataError, match="broken.tar.gz: not a readable tar.gz archive"):
        D.prepare("cifar10", str(tmp_path / "o"), source=str(tmp_path / "broken.tar.gz"), progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_decompression_is_capped(tmp_path, monkeypatch):
    """A member that decompresses past the cap is refused before it is read whole."""
    monkeypatch.setitem(sources.MEMBER_MAX_BYTES, "text8", 50_000)
    with pytest.raises(D.DataError, match=r"member text8 has 100,000 bytes \(cap 50,000\)"):
        D.prepare("text8", str(tmp_path / "o"), source=str(build_text8_zip(tmp_path / "t.zip")), progress=False)
    monkeypatch.setitem(sources.MEMBER_MAX_BYTES, "mnist", 10_000)
    write_idx_folder(tmp_path / "idx", 30, 5)
    with pytest.raises(D.DataError, match="decompresses to more than 10,000 bytes"):
        D.prepare("mnist", str(tmp_path / "o"), source=str(tmp_path / "idx"), progress=False)
    monkeypatch.setitem(sources.MEMBER_MAX_BYTES, "cifar10", 1_000)
    with pytest.raises(D.DataError, match=r"member cifar-10-batches-py/data_batch_1 has .* \(cap 1,000\)"):
        D.prepare(
            "cifar10", str(tmp_path / "o"), source=str(build_cifar_archive(tmp_path / "c")["archive"]), progress=False
        )


# ------------------------------------------------------------------------------------------------
# downloads
# ------------------------------------------------------------------------------------------------


def test_download_checks_checksums(tmp_path):
    payload = tmp_path / "blob.bin"
    payload.write_bytes(b"bayesian flow" * 1000)
    url = payload.as_uri()
    good = sha256(payload)
    path = D.download(url, tmp_path / "dl", sha256=good, progress=False)
    assert path.read_bytes() == payload.read_bytes()
    with pytest.raises(D.DataError, match="checksum mismatch.*blob.bin.*expected md5 0{32}"):
        D.download(url, tmp_path / "dl2", md5="0" * 32, progress=False)
    assert not (tmp_path / "dl2" / "blob.bin").exists()
    with pytest.raises(D.DataError, match="download of .* failed"):
        D.download((tmp_path / "nope.bin").as_uri(), tmp_path / "dl3", sha256=good, progress=False)


@pytest.mark.parametrize("announced", [True, False])
def test_download_size_is_capped(tmp_path, http_files, announced):
    """More than max_bytes is refused: from the Content-Length when the server sends one, else
    while streaming; nothing is left behind."""
    handler, base = http_files
    handler.send_length = announced
    handler.files["/big.bin"] = b"x" * 5_000_000
    match = "5,000,000 bytes announced, the cap is 1,000,000" if announced else "more than the cap of 1,000,000"
    with pytest.raises(D.DataError, match=match):
        D.download(f"{base}/big.bin", tmp_path / "dl", sha256="0" * 64, max_bytes=1_000_000, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_prepare_cifar10_from_url(tmp_path, http_files, monkeypatch):
    """The URL path end to end: download (sha256 checked before the tarball is opened), cache,
    parse; a wrong checksum deletes the file and writes no manifest."""
    handler, base = http_files
    built = build_cifar_archive(tmp_path / "src")
    handler.files["/mirror/cifar-10-python.tar.gz"] = built["archive"].read_bytes()
    monkeypatch.setenv("BFN_DATA_CACHE", str(tmp_path / "cache"))
    url = f"{base}/mirror/cifar-10-python.tar.gz"
    with pytest.raises(D.DataError, match=f"checksum mismatch for {url}: expected sha256 6d958be0"):
        D.prepare("cifar10", str(tmp_path / "bad"), source=url, progress=False)
    assert not (tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz").exists()
    assert not (tmp_path / "bad" / "manifest.json").exists()

    monkeypatch.setitem(sources.CANONICAL_ARCHIVES["cifar10"], "sha256", sha256(built["archive"]))
    out = str(tmp_path / "c")
    man = D.prepare("cifar10", out, source=f"{base}/mirror/", progress=False)  # a folder URL works too
    assert man["source"]["kind"] == "url" and man["source"]["url"] == url and man["source"]["exact"] is True
    assert D.verify(out)["verified"]["splits"] == {"train": 198, "val": 2, "test": 20}
    assert all_rows(out, "cifar10") == all_rows(_prepared(built["archive"], tmp_path / "local"), "cifar10")
    requests = len(handler.requests)
    D.prepare("cifar10", str(tmp_path / "again"), source=url, progress=False)
    assert len(handler.requests) == requests  # the verified cached copy was reused


def _prepared(source: Path, out: Path) -> str:
    D.prepare("cifar10", str(out), source=str(source), progress=False)
    return str(out)


def test_checksum_comes_before_decompression(tmp_path, http_files):
    """A download that is not even an archive fails on its checksum, never in the zip reader."""
    handler, base = http_files
    handler.files["/text8.zip"] = b"PK\x03\x04 not a zip at all"
    with pytest.raises(D.DataError, match="checksum mismatch for .*/text8.zip: expected sha256 a6640522"):
        D.prepare("text8", str(tmp_path / "o"), source=f"{base}/text8.zip", progress=False)


def test_default_download_and_its_failure_message(tmp_path, http_files, monkeypatch):
    """`source="download"` fetches PUBLIC_URLS[name]; offline, the error names what was tried and
    what to pass instead."""
    handler, base = http_files
    archive = build_text8_zip(tmp_path / "text8.zip")
    handler.files["/dc/text8.zip"] = archive.read_bytes()
    monkeypatch.setitem(sources.CANONICAL_ARCHIVES["text8"], "sha256", sha256(archive))
    monkeypatch.setitem(sources.PUBLIC_URLS, "text8", f"{base}/dc/text8.zip")
    monkeypatch.delenv("BFN_DATA_CACHE", raising=False)
    man = D.prepare("text8", str(tmp_path / "t"), source="download", progress=False)
    assert man["source"]["url"] == f"{base}/dc/text8.zip" and man["source"]["exact"] is True
    assert D.num_rows(str(tmp_path / "t"), "val") == 19

    dead = f"http://127.0.0.1:{free_port()}/dc/text8.zip"
    monkeypatch.setitem(sources.PUBLIC_URLS, "text8", dead)
    with pytest.raises(D.DataError) as caught:
        D.prepare("text8", str(tmp_path / "t2"), source="download", progress=False)
    message = str(caught.value)
    for part in ("could not get the canonical files", dead, "--source with text8.zip", "--source bundled"):
        assert part in message, message


def test_prepare_mnist_from_file_url_verifies_content(tmp_path, monkeypatch, caplog):
    """The bundled .gz files are re-compressed (not the LeCun .gz md5), but their IDX content is
    canonical, so a download of them is accepted (about 3 s); BFN_DATA_CACHE keeps it."""
    monkeypatch.setenv("BFN_DATA_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "m")
    url = (RAW / "mnist").as_uri() + "/"
    man = D.prepare("mnist", out, source=url, progress=False)
    assert man["source"]["kind"] == "url" and man["source"]["exact"] is True
    assert man["source"]["location"] == url
    assert D.num_rows(out, "val") == 600
    assert len(list((tmp_path / "cache" / "mnist").glob("*.gz"))) == 4
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        sources.locate("mnist", url, tmp_path / "unused", progress=True)
    assert sum("using cached" in r.getMessage() for r in caplog.records) == 4


def test_mnist_url_with_wrong_checksum(tmp_path):
    write_idx_folder(tmp_path / "fake_mnist", 20, 5)
    with pytest.raises(D.DataError, match=r"checksum mismatch for file://.*train-images-idx3"):
        D.prepare("mnist", str(tmp_path / "o"), source=(tmp_path / "fake_mnist").as_uri() + "/", progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def test_cli_prepare_sources(tmp_path, monkeypatch, capsys):
    """`bfn data prepare cifar10 --source FILE` works; without --source it downloads (here from a
    dead 127.0.0.1 port: exit 2, one line naming the URL); `--source bundled` takes data/raw."""
    built = build_cifar_archive(tmp_path / "src")
    assert (
        cli.main(["data", "prepare", "cifar10", "--source", str(built["archive"]), "--out", str(tmp_path / "c")]) == 0
    )
    assert "prepared cifar10" in capsys.readouterr().out
    assert cli.main(["data", "verify", str(tmp_path / "c")]) == 0
    assert "cifar10 OK" in capsys.readouterr().out
    dead = f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz"
    monkeypatch.setitem(sources.PUBLIC_URLS, "cifar10", dead)
    monkeypatch.delenv("BFN_DATA_CACHE", raising=False)
    assert cli.main(["data", "prepare", "cifar10", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("bfn: error:")]
    assert len(errors) == 1 and dead in errors[0] and "--source" in errors[0]  # one line names the culprit
    assert cli.main(["data", "prepare", "cifar10", "--source", "bundled", "--out", str(tmp_path / "b")]) == 0
    assert D.num_rows(str(tmp_path / "b"), "train") == 180


def test_gzip_idx_files_round_trip_through_the_cap(tmp_path):
    """The cap does not change what is read: gzip and raw IDX files give the same shards."""
    write_idx_folder(tmp_path / "gz", 200, 10)
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in (tmp_path / "gz").iterdir():
        (raw / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    D.prepare("mnist", str(tmp_path / "a"), source=str(tmp_path / "gz"), progress=False)
    D.prepare("mnist", str(tmp_path / "b"), source=str(raw), progress=False)
    assert all_rows(str(tmp_path / "a"), "mnist") == all_rows(str(tmp_path / "b"), "mnist")

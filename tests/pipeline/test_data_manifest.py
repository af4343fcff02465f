"""The manifest schema (pipeline/data/manifest.py): every malformed manifest is one DataError that
names the manifest and the key, raised before any shard is opened; old formats say what to run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline import data as D
from pipeline.data import manifest as M


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "text8"
    D.prepare("text8", str(out), seq_len=64, rows_per_shard=200, progress=False)
    return out


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    shutil.copytree(prepared, tmp_path / "ds")
    return tmp_path / "ds"


def _edit(uri: Path, fn) -> str:
    man = json.loads((uri / "manifest.json").read_text())
    fn(man)
    (uri / "manifest.json").write_text(json.dumps(man))
    return f"manifest {uri}/manifest.json: "


def _shard(man: dict) -> dict:
    return man["splits"]["train"]["shards"][1]


BAD = {  # name: (edit, what the message says after "manifest <uri>/manifest.json: ")
    "not an object": (lambda m: m.clear() or m.update(x=1), "the manifest lacks the key 'dataset'"),
    "no dataset": (lambda m: m.pop("dataset"), "the manifest lacks the key 'dataset'"),
    "dataset type": (lambda m: m.update(dataset=3), "dataset must be str (got int 3)"),
    "no splits": (lambda m: m.pop("splits"), "the manifest lacks the key 'splits'"),
    "splits type": (lambda m: m.update(splits=[]), "splits must be dict (got list"),
    "empty splits": (lambda m: m.update(splits={}), "splits is empty"),
    "unknown split": (lambda m: m["splits"].update(dev=m["splits"]["val"]), "unknown split 'dev'"),
    "split type": (lambda m: m["splits"].update(val=[1]), "splits.val must be an object (got list)"),
    "rows missing": (lambda m: m["splits"]["val"].pop("rows"), "splits.val lacks the key 'rows'"),
    "rows negative": (lambda m: m["splits"]["val"].update(rows=-1), "splits.val.rows must be an integer >= 0"),
    "rows float": (lambda m: m["splits"]["val"].update(rows=1.5), "splits.val.rows must be int (got float 1.5)"),
    "rows bool": (lambda m: m["splits"]["val"].update(rows=True), "splits.val.rows must be int (got bool True)"),
    "rows string": (lambda m: m["splits"]["val"].update(rows="19"), "splits.val.rows must be int (got str '19')"),
    "schema type": (lambda m: m["splits"]["test"].update(schema="ids"), "splits.test.schema must be list"),
    "schema column": (lambda m: m["splits"]["test"]["schema"].append(7), "splits.test.schema[2] must be an object"),
    "schema name": (lambda m: m["splits"]["test"]["schema"][0].pop("name"), "splits.test.schema[0] lacks the key"),
    "shards type": (lambda m: m["splits"]["train"].update(shards={}), "splits.train.shards must be list"),
    "shard type": (
        lambda m: m["splits"]["train"]["shards"].append("x"),
        "splits.train.shards[8] must be an object (got str)",
    ),
    "absolute path": (
        lambda m: _shard(m).update(path="/etc/passwd"),
        "splits.train.shards[1].path '/etc/passwd' must be a plain relative path inside the dataset folder",
    ),
    "dotdot path": (
        lambda m: _shard(m).update(path="../other/part-00000.parquet"),
        "splits.train.shards[1].path '../other/part-00000.parquet' must be a plain relative path",
    ),
    "inner dotdot": (lambda m: _shard(m).update(path="train/../../x.parquet"), "shards[1].path 'train/../../x"),
    "backslash path": (lambda m: _shard(m).update(path="..\\x.parquet"), "shards[1].path '..\\\\x.parquet'"),
    "url path": (lambda m: _shard(m).update(path="s3://bucket/x.parquet"), "shards[1].path 's3://bucket/x"),
    "dot path": (lambda m: _shard(m).update(path="./train/part-00001.parquet"), "shards[1].path './train"),
    "empty path": (lambda m: _shard(m).update(path=""), "shards[1].path '' must be"),
    "path type": (lambda m: _shard(m).update(path=["a"]), "splits.train.shards[1].path must be str (got list"),
    "duplicate path": (lambda m: _shard(m).update(path="train/part-00000.parquet"), "is listed twice"),
    "shard rows": (lambda m: _shard(m).update(rows=-5), "splits.train.shards[1].rows must be an integer >= 0"),
    "shard bytes": (lambda m: _shard(m).pop("bytes"), "splits.train.shards[1] lacks the key 'bytes'"),
    "sha256 short": (lambda m: _shard(m).update(sha256="abc"), "shards[1].sha256 must be 64 lowercase hex digits"),
    "sha256 upper": (lambda m: _shard(m).update(sha256=_shard(m)["sha256"].upper()), "64 lowercase hex digits"),
    "sha256 type": (lambda m: _shard(m).update(sha256=None), "shards[1].sha256 must be str (got NoneType"),
    "text8 seq_len": (lambda m: m.pop("seq_len"), "the manifest lacks the key 'seq_len'"),
    "text8 row_chars": (
        lambda m: m["splits"]["val"].update(row_chars=0),
        "splits.val.row_chars must be an integer >= 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_manifest_is_one_clear_error(copy, case):
    edit, says = BAD[case]
    prefix = _edit(copy, edit)
    for read in (
        D.read_manifest,
        D.verify,
        lambda uri: D.num_rows(uri, "train"),
        lambda uri: list(D.iter_batches(uri, "val", "text8", batch_size=4)),
    ):
        with pytest.raises(D.DataError) as caught:
            read(str(copy))
        message = str(caught.value)
        assert message.startswith(prefix) and says in message, message
        assert caught.value.__cause__ is None  # raised by the validator, not a wrapped KeyError/TypeError


def test_not_json_and_not_an_object(copy):
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(D.DataError, match=re.escape(f"manifest {copy}/manifest.json: must be a JSON object")):
        D.read_manifest(str(copy))
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(D.DataError, match="is not valid JSON"):
        D.read_manifest(str(copy))


def test_old_format_says_to_prepare_again(copy):
    """Format 1 (one top-level schema; text8 train rows of seq_len chars) is refused by name."""
    prefix = _edit(copy, lambda m: m.update(format_version=1))
    with pytest.raises(D.DataError) as caught:
        D.verify(str(copy))
    assert str(caught.value) == (
        f"{prefix}written in data format 1, this code reads format {D.FORMAT_VERSION}; "
        f"re-run `bfn data prepare text8 --out {copy}`"
    )
    with pytest.raises(D.DataError, match="re-run `bfn data prepare text8"):
        list(D.iter_batches(str(copy), "test", "text8", batch_size=4))


def test_a_valid_manifest_passes_and_is_returned(prepared):
    man = json.loads((prepared / "manifest.json").read_text())
    assert M.validate_manifest(man, str(prepared)) is man
    assert D.read_manifest(str(prepared)) == man
    assert man["format_version"] == 2 and "schema" not in man  # the schema lives in each split


def test_check_values_names_the_shard(copy):
    """check_values (run by `bfn train` before Ray starts) reads the id column of every shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    man = D.read_manifest(str(copy))
    D.check_values(str(copy), man, ["train", "val"])
    path = copy / man["splits"]["val"]["shards"][0]["path"]
    table = pq.read_table(path)
    ids = bytearray(b"".join(table.column("ids").to_pylist()))
    ids[70] = 27
    table = table.set_column(
        0, "ids", pa.array([bytes(ids[i : i + 64]) for i in range(0, len(ids), 64)], pa.binary(64))
    )
    pq.write_table(table, path)
    with pytest.raises(
        D.DataError,
        match=re.escape(
            f"shard {copy}/val/part-00000.parquet (split 'val'): column 'ids' has values outside 0..26 (min 0, max 27)"
        ),
    ):
        D.check_values(str(copy), man, ["train", "val"])

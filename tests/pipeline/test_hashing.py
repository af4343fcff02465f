"""Streaming checksums go through ``hashlib.file_digest`` (one implementation, no read loops).

The data sources' file digests and the Tune-state digests match hashlib's own over a file larger
than one read buffer; no module in pipeline/data or pipeline/sweeps feeds a hash from a read loop of
its own (the download loop hashes as it streams, beside its size cap, and is not a pure hash loop).
"""

from __future__ import annotations

import ast
import hashlib
import os

from pipeline.data.sources import file_digests
from pipeline.sweeps.tune_state import state_files
from tests.conftest import REPO


def test_digests_match_hashlib_over_several_buffers(tmp_path):
    payload = os.urandom(3 * (1 << 18) + 12345)  # file_digest reads 256 KiB at a time
    (tmp_path / "tuner.pkl").write_bytes(payload)
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "state.pkl").write_bytes(payload[::-1])
    (tmp_path / "notes.txt").write_bytes(b"not read by a restore")
    assert file_digests(tmp_path / "tuner.pkl") == {
        "md5": hashlib.md5(payload).hexdigest(),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert state_files(str(tmp_path)) == {
        "trial/state.pkl": hashlib.sha256(payload[::-1]).hexdigest(),
        "tuner.pkl": hashlib.sha256(payload).hexdigest(),
    }


def _pure_hash_loops(tree: ast.AST) -> list[int]:
    """Lines of loops that read a stream chunk by chunk and only call ``.update`` on each chunk."""
    found = []
    for node in ast.walk(tree):
        reads = node.test if isinstance(node, ast.While) else node.iter if isinstance(node, ast.For) else None
        if reads is None or "read" not in {n.attr for n in ast.walk(reads) if isinstance(n, ast.Attribute)}:
            continue
        calls = [s.value for s in node.body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
        if len(calls) == len(node.body) and all(getattr(c.func, "attr", None) == "update" for c in calls):
            found.append(node.lineno)
    return found


def test_no_hand_written_hash_loops_in_data_and_sweeps():
    paths = sorted((REPO / "pipeline" / "data").rglob("*.py")) + sorted((REPO / "pipeline" / "sweeps").rglob("*.py"))
    loops = [f"{p.relative_to(REPO)}:{line}" for p in paths for line in _pure_hash_loops(ast.parse(p.read_text()))]
    assert not loops, f"use hashlib.file_digest: {loops}"

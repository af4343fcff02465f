"""Checkpoints prove their integrity: COMPLETE lists every file's size and sha256, written after the
files and the folder were fsynced; a checkpoint that does not match is never loaded, and a resume
falls back to the previous complete checkpoint with a warning.

Fast tests use local folders and ``ray.train.Checkpoint`` objects (no Ray runtime). The S3 tests
(``slow``: they start moto on 127.0.0.1) upload through the fault-injecting proxy of
tests/faults.py: a multipart upload whose second part fails is retried, or never marked complete;
and the run-folder lease works on S3 with conditional puts. The real 2-worker resume from a
truncated optimizer.pt is in tests/integration/test_faults.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from bfn import EMA
from pipeline.config import compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer


def make_checkpoint(root: Path, step: int) -> Path:
    overrides = ["experiment=smoke", f"data.uri={root / 'no-data'}", f"trainer.seed={step}"]
    cfg = load(overrides)
    torch.manual_seed(step)
    model = build_model(cfg)
    folder = root / f"checkpoint_{step:06d}"
    return checkpointing.save(
        folder,
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": step, "epoch": 0},
        config=compose(overrides),
    )


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_complete_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    folder = make_checkpoint(tmp_path, 2)
    marker = json.loads((folder / checkpointing.MARKER).read_text())
    assert set(marker["files"]) == set(checkpointing.FILES)
    for name, entry in marker["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    checkpointing.verify(folder)


def test_seal_fsyncs_the_files_and_the_folder_before_writing_complete(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path, 2)
    (folder / checkpointing.MARKER).unlink()
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    real_write_text = Path.write_text
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(
        Path,
        "write_text",
        lambda self, *a, **k: (events.append(("write", str(self))), real_write_text(self, *a, **k))[1],
    )
    checkpointing.seal(folder)
    written = events.index(("write", str(folder / checkpointing.MARKER)))
    synced_before = {Path(path).name for kind, path in events[:written] if kind == "fsync"}
    assert set(checkpointing.FILES) | {folder.name} <= synced_before
    assert ("fsync", str(folder / checkpointing.MARKER)) in events[written:]
    assert events[-1] == ("fsync", str(folder))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_fails_verification(tmp_path, damage):
    folder = make_checkpoint(tmp_path, 2)
    path = folder / "optimizer.pt"
    if damage == "truncate":
        truncate(path)
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(checkpointing.CheckpointError, match="optimizer.pt"):
        checkpointing.read(folder)


def test_an_unsealed_folder_is_never_loaded(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    (folder / checkpointing.MARKER).unlink()
    with pytest.raises(checkpointing.CheckpointError, match="incomplete"):
        checkpointing.read(folder)
    assert checkpointing.latest(tmp_path) is None


def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, caplog):
    from ray.train import Checkpoint

    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    truncate(newest / "optimizer.pt")
    caplog.set_level(logging.WARNING)
    state = checkpointing.read_for_resume(Checkpoint.from_directory(str(newest)), "cpu")
    assert state["train_state"]["step"] == 2
    assert "resuming from the previous complete checkpoint" in caplog.text and "optimizer.pt" in caplog.text
    # an intact newest checkpoint is used as is
    assert (
        checkpointing.read_for_resume(Checkpoint.from_directory(str(make_checkpoint(tmp_path, 6))), "cpu")[
            "train_state"
        ]["step"]
        == 6
    )


def test_resume_takes_the_newer_of_rays_checkpoint_and_the_drivers(tmp_path):
    """Ray hands its latest registered checkpoint; the driver found the run folder's newest complete
    one at launch, which a killed driver's orphaned workers may have written unregistered."""
    from ray.train import Checkpoint

    def at(step):
        return Checkpoint.from_directory(str(make_checkpoint(tmp_path, step)))

    registered, orphaned = at(8), at(12)
    assert checkpointing.newest(registered, orphaned) is orphaned
    assert checkpointing.newest(None, orphaned) is orphaned  # the driver died before any registration
    assert checkpointing.newest(orphaned, registered) is orphaned  # a restart within the fit: Ray's is newer
    assert checkpointing.newest(registered, None) is registered and checkpointing.newest(None, None) is None
    tie = Checkpoint.from_directory(str(tmp_path / "checkpoint_000008"))
    assert checkpointing.newest(registered, tie) is registered
    (tmp_path / "checkpoint_000012" / "train_state.json").write_text("{")  # unreadable: counts as no step
    assert checkpointing.newest(registered, orphaned) is registered
    assert checkpointing.step_of(orphaned) == -1 and checkpointing.step_of(registered) == 8


def test_resume_fails_clearly_when_no_checkpoint_verifies(tmp_path):
    from ray.train import Checkpoint

    older, newest = make_checkpoint(tmp_path, 2), make_checkpoint(tmp_path, 4)
    truncate(newest / "model.pt")
    truncate(older / "ema.pt")
    with pytest.raises(checkpointing.CheckpointError, match="model.pt.*no earlier complete checkpoint"):
        checkpointing.read_for_resume(Checkpoint.from_directory(str(newest)), "cpu")


def test_an_old_format_marker_is_refused_and_not_complete(tmp_path):
    """A bare "ok" COMPLETE (versions before checksums) proves nothing about the files: such a folder
    is not loaded, not listed as complete, and a resume falls back past it."""
    from ray.train import Checkpoint

    make_checkpoint(tmp_path, 2)
    folder = make_checkpoint(tmp_path, 4)
    for old in ("ok\n", '{"files": {}}', '{"format": 1}', "[]"):
        (folder / checkpointing.MARKER).write_text(old)
        with pytest.raises(checkpointing.CheckpointError, match="not a format-1 marker"):
            checkpointing.read(folder)
        with pytest.raises(checkpointing.CheckpointError, match="not a format-1 marker"):
            checkpointing.read_model_only(folder)
        assert checkpointing.latest(tmp_path) == tmp_path / "checkpoint_000002"
        state = checkpointing.read_for_resume(Checkpoint.from_directory(str(folder)), "cpu")
        assert state["train_state"]["step"] == 2 and state["path"] == str(tmp_path / "checkpoint_000002")


def test_upload_into_a_local_run_folder_fsyncs_before_and_after_complete(tmp_path, monkeypatch):
    """The copy a resume reads survives a power cut: every file, the checkpoint folder and the folders
    that name the new ones (the run folder, the storage folder it was created in) are fsynced while
    COMPLETE does not exist yet; then COMPLETE and the checkpoint folder."""
    import pyarrow.fs

    source = make_checkpoint(tmp_path / "local", 2)
    storage = tmp_path / "storage"
    storage.mkdir()
    destination = storage / "run" / "checkpoint_000002"
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append((os.readlink(f"/proc/self/fd/{fd}"), (destination / checkpointing.MARKER).exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpointing.upload(source, pyarrow.fs.LocalFileSystem(), str(destination))
    before = {path for path, sealed in events if not sealed}
    after = {path for path, sealed in events if sealed}
    assert {str(destination / name) for name in checkpointing.FILES} <= before
    assert {str(destination), str(destination.parent), str(storage)} <= before
    assert {str(destination / checkpointing.MARKER), str(destination)} <= after
    checkpointing.verify(destination)
    # a second checkpoint into the existing run folder: its own files and folder, and the run folder
    events.clear()
    checkpointing.upload(source, pyarrow.fs.LocalFileSystem(), str(storage / "run" / "checkpoint_000004"))
    synced = {path for path, _ in events}
    assert {str(storage / "run" / "checkpoint_000004"), str(storage / "run")} <= synced


def test_resume_state_on_one_worker(tmp_path):
    """One worker (no process group): the newer of Ray's and the driver's checkpoint, with the
    fallback; the state names the folder it was read from."""
    from ray.train import Checkpoint

    assert checkpointing.resume_state(None, None, "cpu", 0, 1) is None
    older = Checkpoint.from_directory(str(make_checkpoint(tmp_path, 2)))
    newer = Checkpoint.from_directory(str(make_checkpoint(tmp_path, 4)))
    state = checkpointing.resume_state(older, newer, "cpu", 0, 1)
    assert state["train_state"]["step"] == 4 and state["path"] == newer.path
    truncate(tmp_path / "checkpoint_000004" / "model.pt")
    state = checkpointing.resume_state(older, newer, "cpu", 0, 1)
    assert state["train_state"]["step"] == 2 and state["path"] == older.path
    truncate(tmp_path / "checkpoint_000002" / "model.pt")
    with pytest.raises(checkpointing.CheckpointError, match="no earlier complete checkpoint"):
        checkpointing.resume_state(older, newer, "cpu", 0, 1)


# ------------------------------------------------------------------------------ S3 (moto)


@pytest.fixture
def s3(tmp_path):
    """(moto endpoint, bucket) with the AWS environment pointing at moto."""
    from tests.servers import aws_env, create_bucket, moto_s3

    with moto_s3() as endpoint, aws_env(endpoint):
        create_bucket(endpoint, "bfn")
        yield endpoint


def s3_filesystem(endpoint: str):
    from pyarrow import fs

    from tests.servers import TEST_CREDENTIALS

    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://")[1],
        scheme="http",
        region="us-east-1",
        access_key=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def big_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint whose optimizer.pt (24 MiB) is uploaded in several parts."""
    folder = make_checkpoint(tmp_path / "local", 2)
    torch.save({"state": {0: {"exp_avg": torch.randn(6 * 1024 * 1024)}}, "param_groups": []}, folder / "optimizer.pt")
    return checkpointing.seal(folder)


class FailPart:
    """Proxy rule: the UploadPart number ``part`` of optimizer.pt fails ``times`` times."""

    def __init__(self, part: int, times: int) -> None:
        self.part, self.left, self.parts = part, times, []

    def __call__(self, method: str, path: str) -> int | None:
        if method == "PUT" and "optimizer.pt" in path and "partNumber=" in path:
            number = int(path.split("partNumber=")[1].split("&")[0])
            self.parts.append(number)
            if number == self.part and self.left > 0:
                self.left -= 1
                return 503
        return None


@pytest.mark.slow
@pytest.mark.parametrize("times", [1, 1000], ids=["transient", "permanent"])
def test_multipart_upload_whose_second_part_fails(s3, tmp_path, times):
    """Part 2 of optimizer.pt fails once (retried by the SDK: the checkpoint arrives whole and
    verifies) or for good (the upload raises and COMPLETE is never written)."""
    import boto3

    from pipeline.training.lease import Lease, LeaseError
    from tests.faults import FaultyS3Proxy

    source = big_checkpoint(tmp_path)
    rule = FailPart(part=2, times=times)
    with FaultyS3Proxy(s3, rule) as proxy:
        filesystem = s3_filesystem(proxy.url)
        destination = "bfn/ray/run/checkpoint_000002"
        if times == 1:
            checkpointing.upload(source, filesystem, destination)
        else:
            with pytest.raises(OSError):
                checkpointing.upload(source, filesystem, destination)
    assert rule.parts.count(2) >= 2 and max(rule.parts) >= 3  # a real multipart upload, part 2 retried
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="bfn").get("Contents", [])}
    marker = f"ray/run/checkpoint_000002/{checkpointing.MARKER}"
    if times == 1:
        assert marker in keys
        state = checkpointing._read_at(s3_filesystem(s3), destination, "cpu")
        assert state["optimizer"]["state"][0]["exp_avg"].numel() == 6 * 1024 * 1024
    else:
        assert marker not in keys and "ray/run/checkpoint_000002/optimizer.pt" not in keys
        assert checkpointing.complete_checkpoints(s3_filesystem(s3), "bfn/ray/run") == []
    # the lease of an S3 run folder: a conditional put; a second holder is refused
    with Lease("s3://bfn/ray/run") as lease:
        assert lease.file.read() is not None
        with pytest.raises(LeaseError, match="in use by another run"):
            Lease("s3://bfn/ray/run").acquire()
    assert lease.file.read() is None  # released


def test_a_diagnostic_checkpoint_is_never_a_resume_point(tmp_path):
    from ray.train import Checkpoint

    good = make_checkpoint(tmp_path, 2)
    diagnostic = make_checkpoint(tmp_path, 4)
    state = json.loads((diagnostic / "train_state.json").read_text())
    (diagnostic / "train_state.json").write_text(json.dumps({**state, checkpointing.DIAGNOSTIC_KEY: True}))
    checkpointing.seal(diagnostic)
    assert checkpointing.latest(tmp_path) == good
    truncate(make_checkpoint(tmp_path, 6) / "ema.pt")
    state = checkpointing.read_for_resume(Checkpoint.from_directory(str(tmp_path / "checkpoint_000006")), "cpu")
    assert state["train_state"]["step"] == 2  # the fallback skips the diagnostic one

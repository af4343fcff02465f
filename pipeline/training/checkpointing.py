"""Training checkpoints: one folder per checkpoint, loadable weights-only, proving their integrity.

Layout: model.pt, ema.pt, optimizer.pt, rng.pt (tensors only), train_state.json (step, epoch,
MLflow run id, ...), config.json (the resolved config, secrets masked), and COMPLETE, written
last: a JSON list of every file's size and sha256. Files and folder are fsynced before COMPLETE
is written, so a folder with COMPLETE survives a power cut. A folder without COMPLETE (a write cut
short) is never loaded; one whose files do not match COMPLETE (truncated, bit rot, a partial
upload) fails verification. Every .pt file is read with ``torch.load(weights_only=True)``, so a
crafted pickle cannot run code (the checksums are integrity, not authenticity: whoever can write
the storage can also rewrite COMPLETE).

Resume (``read_for_resume``): the checkpoint Ray hands the worker, or the newest complete one the
driver found in the run folder when that one is newer (``newest``), is verified; if it fails, the
newest earlier complete checkpoint of the run folder that verifies is used instead, with a
warning. Ray hands only checkpoints its controller registered; a killed driver's orphaned workers
go on writing complete checkpoints it never registers, and a rerun continues from those. A remote
(S3) checkpoint is downloaded into a folder of this process's own (``Checkpoint.as_directory``
shares one folder per node between workers: a rank could read a file another rank was still
downloading).

``persist`` is the uploader the worker hands to ``ray.train.report``: it copies a checkpoint into
Ray Train's storage file by file, COMPLETE last, and raises when a file did not arrive, so a write
cut short by a storage outage is retried (by Ray) or fails the report; it is never registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.secrets import mask_config

log = logging.getLogger(__name__)
FILES = ("model.pt", "ema.pt", "optimizer.pt", "rng.pt", "train_state.json", "config.json")
MARKER = "COMPLETE"
MARKER_FORMAT = 1
LEGACY_MARKER = "ok"  # written by versions before checksums: complete, but unverifiable
DIAGNOSTIC_KEY = "diagnostic"  # train_state.json flag of a checkpoint that is not a resume point


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or not a checkpoint of this project."""


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(json.dumps(_numpy_state()).encode(), np.uint8).copy()),
             "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8)}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (global state is what we save)
    return [name, keys.tolist(), pos, has_gauss, cached]


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(folder: str | Path, *, model, ema, optimizer, train_state: dict, config: dict) -> Path:
    """Write a checkpoint into ``folder`` (created): files, fsync, then COMPLETE (``seal``).
    Secrets in ``config`` (credentials in URIs, secret-looking keys) are masked first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(ema.state_dict(), folder / "ema.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(rng_state(), folder / "rng.pt")
    (folder / "train_state.json").write_text(json.dumps(train_state, indent=2))
    (folder / "config.json").write_text(json.dumps(mask_config(config), indent=2, default=str))
    return seal(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: str | Path) -> Path:
    """fsync the checkpoint's files and folder, then write COMPLETE (sizes + sha256) and fsync it."""
    folder = Path(folder)
    files = {}
    for name in FILES:
        _fsync(folder / name)
        files[name] = {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    _fsync(folder)
    (folder / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1))
    _fsync(folder / MARKER)
    _fsync(folder)
    return folder


def verify(folder: str | Path, names: tuple[str, ...] = FILES) -> None:
    """CheckpointError unless COMPLETE exists and ``names`` match its sizes and sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    try:
        text = (folder / MARKER).read_text()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MARKER} marker): not loaded") from None
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {', '.join(missing)}")
    if text.strip() == LEGACY_MARKER:
        log.warning("checkpoint %s has no checksums (written by an older version); not verified", folder)
        return
    try:
        expected = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {folder}: {MARKER} is unreadable") from None
    for name in names:
        size = (folder / name).stat().st_size
        want = expected.get(name, {})
        if size != want.get("size"):
            raise CheckpointError(f"checkpoint {folder}: {name} has {size} bytes, {MARKER} says {want.get('size')}")
        if _sha256(folder / name) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {folder}: {name} does not match its sha256 in {MARKER}")


def load_tensors(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True; a refused or broken file is a CheckpointError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except Exception as error:  # UnpicklingError for crafted pickles, RuntimeError for corrupt zips
        raise CheckpointError(
            f"refusing to load {path}: not a weights-only checkpoint file ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from None


def read(folder: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Everything in a checkpoint folder, verified against COMPLETE first."""
    folder = Path(folder)
    verify(folder)
    out = {name[:-3]: load_tensors(folder / name, map_location) for name in FILES if name.endswith(".pt")}
    try:
        out["train_state"] = json.loads((folder / "train_state.json").read_text())
        out["config"] = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {folder}: unreadable JSON ({error})") from None
    return out


def read_model_only(folder: str | Path, *, ema: bool = True, map_location="cpu") -> tuple[dict, dict]:
    """(weights, config) for evaluation and sampling: the EMA weights unless ema=False. Only the
    two files read are verified (a corrupt optimizer.pt does not stop an evaluation)."""
    folder = Path(folder)
    weights_file = "ema.pt" if ema else "model.pt"
    verify(folder, (weights_file, "config.json"))
    weights = load_tensors(folder / weights_file, map_location)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder}: config.json unreadable ({error})") from None
    return weights, config


def latest(run_folder: str | Path) -> Path | None:
    """The newest complete checkpoint_* folder under a Ray Train run folder (local storage)."""
    import pyarrow.fs

    found = complete_checkpoints(pyarrow.fs.LocalFileSystem(), str(Path(run_folder).resolve()))
    return Path(found[0][1]) if found else None


# ------------------------------------------------------------------------- local or remote storage
def _read_json(filesystem, path: str) -> Any:
    with filesystem.open_input_stream(path) as f:
        return json.loads(f.read())


def complete_checkpoints(filesystem, run_folder: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint_* folders of a run folder that have COMPLETE and a readable
    train_state.json not flagged ``diagnostic``, newest first; ``filesystem``: a pyarrow
    filesystem (local or S3)."""
    import pyarrow.fs

    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder.rstrip("/"), allow_not_found=True))
    except OSError as error:
        raise CheckpointError(f"cannot list the run folder {run_folder} ({error})") from None
    found = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        if filesystem.get_file_info(f"{entry.path}/{MARKER}").type != pyarrow.fs.FileType.File:
            continue
        try:
            state = _read_json(filesystem, f"{entry.path}/train_state.json")
            if not state.get(DIAGNOSTIC_KEY):  # kept for inspection, never resumed from
                found.append((int(state["step"]), entry.path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(found, reverse=True)


def _read_at(filesystem, path: str, map_location) -> dict[str, Any]:
    """``read`` for a checkpoint on any pyarrow filesystem; a remote one is downloaded first."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return read(path, map_location)
    with tempfile.TemporaryDirectory(prefix="bfn-ckpt-") as folder:
        try:
            pyarrow.fs.copy_files(path, folder, source_filesystem=filesystem,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())  # fmt: skip
        except OSError as error:
            raise CheckpointError(f"checkpoint {path}: download failed ({error})") from None
        return read(folder, map_location)


def step_of(checkpoint) -> int:
    """The step in a checkpoint's train_state.json (a ``ray.train.Checkpoint``); -1 if unreadable."""
    try:
        return int(_read_json(checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/train_state.json")["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def newest(handed, found):
    """The checkpoint to resume from: ``handed`` (Ray's latest registered, or None) unless ``found``
    (the newest complete one in the run folder when the driver started, or None) has a higher step.
    Every rank reads the same two files, so every rank makes the same choice."""
    if found is None or (handed is not None and step_of(handed) >= step_of(found)):
        return handed
    return found


def read_for_resume(checkpoint, device, run_folder: str | None = None) -> dict[str, Any]:
    """The state to resume from: ``checkpoint`` (a ``ray.train.Checkpoint``, local or remote),
    verified; if it fails, the newest earlier complete checkpoint of ``run_folder`` (default: the
    checkpoint's parent) that verifies, with a warning. CheckpointError when none does."""
    filesystem, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        return _read_at(filesystem, path, device)
    except CheckpointError as error:
        failure = error
    run_folder = run_folder or path.rsplit("/", 1)[0]
    candidates = complete_checkpoints(filesystem, run_folder)
    failed_step = next((step for step, other in candidates if other == path), None)
    for step, other in candidates:
        if other == path or (failed_step is not None and step >= failed_step):
            continue
        try:
            state = _read_at(filesystem, other, device)
        except CheckpointError as error:
            log.warning("skipping checkpoint %s too: %s", other, error)
            continue
        log.warning("checkpoint %s is unusable (%s); resuming from the previous complete checkpoint %s "
                    "(step %d) instead", path, failure, other, step)  # fmt: skip
        return state
    raise CheckpointError(f"{failure}; no earlier complete checkpoint in {run_folder} could be read either")


def read_for_init(source: str, map_location="cpu") -> dict[str, Any]:
    """``run.init_from``: the model and EMA weights (and config) of another run's checkpoint
    folder (local path or s3:// URI), verified; the optimiser, RNG and step are not taken."""
    import pyarrow.fs

    if "://" in source:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(source)
    else:
        filesystem, path = pyarrow.fs.LocalFileSystem(), str(Path(source).resolve())
    state = _read_at(filesystem, path, map_location)
    return {"model": state["model"], "ema": state["ema"], "config": state["config"]}


def latest_config(filesystem, run_folder: str) -> tuple[str, dict] | None:
    """(checkpoint path, config) of the newest complete checkpoint whose config.json reads."""
    for _, path in complete_checkpoints(filesystem, run_folder):
        try:
            return path, _read_json(filesystem, f"{path}/config.json")
        except (OSError, ValueError) as error:
            log.warning("checkpoint %s: config.json unreadable (%s); trying an earlier one", path, error)
    return None


# ------------------------------------------------------------------------------------ upload
def upload(source: str | Path, filesystem, destination: str) -> None:
    """Copy a checkpoint folder to ``destination`` on ``filesystem``, COMPLETE last.

    Ray's default uploader, ``pyarrow.fs.copy_files``, does not report a failed S3 upload: with Ray
    2.60 / pyarrow 25, a 503 on an UploadPart printed "Error ignored when destroying file" and the
    copy returned normally, leaving a folder without ema.pt and COMPLETE that Ray registered as the
    latest checkpoint. Here every output stream is closed explicitly (close raises on a failed
    upload) and the stored sizes are checked, so a failed file raises before COMPLETE is written.
    """
    import shutil

    source = Path(source)
    files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: (p.name == MARKER, str(p)))
    filesystem.create_dir(destination, recursive=True)
    for path in files:
        target = f"{destination}/{path.relative_to(source).as_posix()}"
        if path.parent != source:
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with path.open("rb") as reader, filesystem.open_output_stream(target) as writer:
            shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)  # close() raises if the upload failed
        size = filesystem.get_file_info(target).size
        if size != path.stat().st_size:
            raise OSError(f"checkpoint upload of {target}: {size} bytes stored, {path.stat().st_size} written")


def persist(checkpoint, checkpoint_dir_name: str):
    """``ray.train.report(checkpoint_upload_fn=persist)``: upload a local checkpoint folder into
    the run's storage (local or S3) and return it as a ``ray.train.Checkpoint`` there. A failed
    upload raises: Ray's retry (3 attempts for AWS errors) runs, and if storage stays down the
    report fails and the run restarts from the last complete checkpoint (FailureConfig)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    upload(checkpoint.path, storage.storage_filesystem, destination)
    return ray.train.Checkpoint(destination, storage.storage_filesystem)

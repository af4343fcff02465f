"""Training checkpoints: one folder per checkpoint, loadable weights-only, proving their integrity.

Layout: model.pt, ema.pt, optimizer.pt, rng.pt (tensors only), train_state.json (step, epoch,
MLflow run id, ...), config.json (the resolved config, secrets masked), and COMPLETE, written
last: a JSON list of every file's size and sha256 (``{"format": 1, "files": ...}``). Files and
folder are fsynced before COMPLETE is written, so a folder with COMPLETE survives a power cut; the
upload into a local run folder (``upload``) fsyncs them again there, and the folders that name the
checkpoint. A folder without COMPLETE (a write cut short), or with a COMPLETE of another format
(the bare "ok" of versions before checksums), is never loaded; one whose files do not match
COMPLETE (truncated, bit rot, a partial upload) fails verification. Every .pt file is read with
``torch.load(weights_only=True)``, so a crafted pickle cannot run code (the checksums are
integrity, not authenticity: whoever can write the storage can also rewrite COMPLETE).

Resume (``resume_state``): rank 0 alone chooses the checkpoint, and every other rank loads that
one or fails the attempt (a transient read error on one rank must never resume the ranks from
different checkpoints: mismatched optimiser state and steps hang the first collective or diverge
silently). Rank 0's choice: the checkpoint Ray hands the worker, or the newest complete one the
driver found in the run folder when that one is newer (``newest``), verified; if it fails, the
newest earlier complete checkpoint of the run folder that verifies, with a warning
(``read_for_resume``). Ray hands only checkpoints its controller registered; a killed driver's
orphaned workers go on writing complete checkpoints it never registers, and a rerun continues
from those. A remote (S3) checkpoint is downloaded into a folder of this process's own
(``Checkpoint.as_directory`` shares one folder per node between workers: a rank could read a file
another rank was still downloading).

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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import torch
import torch.distributed as dist

from pipeline.core import storage as core_storage
from pipeline.secrets import mask_config

log = logging.getLogger(__name__)
FILES = ("model.pt", "ema.pt", "optimizer.pt", "rng.pt", "train_state.json", "config.json")
MARKER = "COMPLETE"
MARKER_FORMAT = 1
DIAGNOSTIC_KEY = "diagnostic"  # train_state.json flag of a checkpoint that is not a resume point


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or not a checkpoint of this project."""


def rng_state() -> dict[str, torch.Tensor]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(json.dumps(_numpy_state()).encode(), np.uint8).copy()),
        "python": torch.tensor(list(json.dumps(random.getstate()).encode()), dtype=torch.uint8),
    }
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


def _marker_files(text: str | bytes) -> dict | None:
    """The ``files`` of a COMPLETE marker in the current format; None for any other content."""
    try:
        marker = json.loads(text)
    except ValueError:
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    return marker["files"] if isinstance(marker.get("files"), dict) else None


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
    expected = _marker_files(text)
    if expected is None:
        raise CheckpointError(
            f"checkpoint {folder}: {MARKER} is not a format-{MARKER_FORMAT} marker with sizes and sha256 (a bare "
            f"'ok' was written by versions before checksums): its files cannot be verified, not loaded"
        )
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
    found = complete_checkpoints(*core_storage.resolve(Path(run_folder)))
    return Path(found[0][1]) if found else None


# ------------------------------------------------------------------------- local or remote storage
def _read_json(filesystem, path: str) -> Any:
    with filesystem.open_input_stream(path) as f:
        return json.loads(f.read())


def complete_checkpoints(filesystem, run_folder: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint_* folders of a run folder that have a COMPLETE of the current
    format and a readable train_state.json not flagged ``diagnostic``, newest first; ``filesystem``:
    a pyarrow filesystem (local or S3)."""
    try:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(run_folder.rstrip("/"), allow_not_found=True))
    except OSError as error:
        raise CheckpointError(f"cannot list the run folder {run_folder} ({error})") from None
    found = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        try:
            with filesystem.open_input_stream(f"{entry.path}/{MARKER}") as f:
                if _marker_files(f.read()) is None:  # an older format cannot be verified: not complete
                    continue
            state = _read_json(filesystem, f"{entry.path}/train_state.json")
            if not state.get(DIAGNOSTIC_KEY):  # kept for inspection, never resumed from
                found.append((int(state["step"]), entry.path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(found, reverse=True)


def _on_any_filesystem(reader, filesystem, path: str):
    """``reader(local folder)`` for a checkpoint on any pyarrow filesystem; a remote one is downloaded first."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return reader(path)
    with tempfile.TemporaryDirectory(prefix="bfn-ckpt-") as folder:
        try:
            pyarrow.fs.copy_files(
                path, folder, source_filesystem=filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem()
            )
        except OSError as error:
            raise CheckpointError(f"checkpoint {path}: download failed ({error})") from None
        return reader(folder)


def _read_at(filesystem, path: str, map_location) -> dict[str, Any]:
    """``read`` for a checkpoint on any pyarrow filesystem."""
    return _on_any_filesystem(lambda folder: read(folder, map_location), filesystem, path)


def read_model_at(filesystem, path: str, *, ema: bool = True) -> tuple[dict, dict]:
    """``read_model_only`` for a checkpoint on any pyarrow filesystem."""
    return _on_any_filesystem(lambda folder: read_model_only(folder, ema=ema), filesystem, path)


def step_of(checkpoint) -> int:
    """The step in a checkpoint's train_state.json (a ``ray.train.Checkpoint``); -1 if unreadable."""
    return read_step(checkpoint.filesystem, checkpoint.path)


def read_step(filesystem, path: str) -> int:
    """The step in the train_state.json of the checkpoint at ``path`` on ``filesystem``; -1 if unreadable."""
    try:
        return int(_read_json(filesystem, f"{path.rstrip('/')}/train_state.json")["step"])
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
    checkpoint's parent) that verifies, with a warning. CheckpointError when none does. The state's
    ``path`` is the folder it was read from (on ``checkpoint.filesystem``)."""
    filesystem, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        return {**_read_at(filesystem, path, device), "path": path}
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
        log.warning(
            "checkpoint %s is unusable (%s); resuming from the previous complete checkpoint %s (step %d) instead",
            path,
            failure,
            other,
            step,
        )
        return {**state, "path": other}
    raise CheckpointError(f"{failure}; no earlier complete checkpoint in {run_folder} could be read either")


def resume_state(handed, found, device, rank: int, world: int) -> dict[str, Any] | None:
    """The state every rank resumes from (None: no checkpoint, a fresh start), the same on every rank.

    Rank 0 alone chooses: ``newest(handed, found)``, read with ``read_for_resume``'s fallback; it
    broadcasts the folder it loaded (or its CheckpointError). The other ranks read exactly that folder,
    with no fallback of their own, and every rank learns whether all of them could: if one could not,
    every rank raises CheckpointError, so the attempt fails (FailureConfig retries it) instead of
    resuming the ranks from different checkpoints. ``handed``: Ray's checkpoint of this worker
    (``ray.train.get_checkpoint()``); ``found``: the driver's newest complete one (both may be None)."""
    together = world > 1 and dist.is_initialized()
    state, decision = None, None
    if rank == 0 or not together:
        checkpoint = newest(handed, found)
        if checkpoint is not None:
            try:
                state = read_for_resume(checkpoint, device)
                decision = ("handed" if checkpoint is handed else "found", state["path"])
            except CheckpointError as error:
                decision = ("failed", str(error))
    if together:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    if decision is None:
        return None
    source, path = decision
    if source == "failed":
        raise CheckpointError(path if rank == 0 else f"rank 0 could not resume: {path}")
    error = None
    if state is None:  # a rank other than 0: the folder rank 0 loaded, or nothing
        chosen = handed if source == "handed" else found
        try:
            if chosen is None:
                raise CheckpointError(f"rank {rank} has no {source} checkpoint to read {path} from")
            state = {**_read_at(chosen.filesystem, path, device), "path": path}
        except CheckpointError as failure:
            error = f"rank {rank} cannot read {path}, the checkpoint rank 0 resumed from ({failure})"
            log.warning("%s; this attempt fails rather than resume the ranks from different checkpoints", error)
    errors = [error]
    if together:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise CheckpointError(
            f"{'; '.join(failed)}: this attempt fails rather than resume the ranks from "
            f"different checkpoints (no rank loads another)"
        )
    return state


def read_for_init(source: str, map_location="cpu") -> dict[str, Any]:
    """``run.init_from``: the model and EMA weights (and config) of another run's checkpoint
    folder (local path or s3:// URI), verified; the optimiser, RNG and step are not taken."""
    state = _read_at(*core_storage.resolve(source), map_location)
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

    Into a local run folder (pyarrow ``LocalFileSystem``) the copy is made durable as ``seal`` makes
    the original: every file, its folders and the folders that name the new ones are fsynced before
    COMPLETE is written, then COMPLETE and its folder; a power cut never leaves a COMPLETE naming
    files that did not reach the disk.
    """
    source = Path(source)
    files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: (p.name == MARKER, str(p)))
    local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    created = _missing_folders(Path(destination)) if local else []
    filesystem.create_dir(destination, recursive=True)
    for path in files:
        target = f"{destination}/{path.relative_to(source).as_posix()}"
        if local and path.name == MARKER and path.parent == source:
            _fsync_folders(Path(destination), created)  # the files' entries on disk before COMPLETE names them
        if path.parent != source:
            if local:
                created += _missing_folders(Path(target).parent)
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with path.open("rb") as reader, filesystem.open_output_stream(target) as writer:
            shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)  # close() raises if the upload failed
        size = filesystem.get_file_info(target).size
        if size != path.stat().st_size:
            raise OSError(f"checkpoint upload of {target}: {size} bytes stored, {path.stat().st_size} written")
        if local:
            _fsync(Path(target))
    if local:
        _fsync_folders(Path(destination), created)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet (``create_dir`` will make them)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _fsync_folders(top: Path, created: list[Path]) -> None:
    """fsync every folder under ``top`` (itself included), then the parent of each created folder (its entry)."""
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
        _fsync(folder)
    _fsync(top)
    for parent in sorted({folder.parent for folder in created}, reverse=True):
        _fsync(parent)


def persist(checkpoint, checkpoint_dir_name: str):
    """``ray.train.report(checkpoint_upload_fn=persist)``: upload a local checkpoint folder into
    the run's storage (local or S3) and return it as a ``ray.train.Checkpoint`` there. A failed
    upload raises: Ray's retry (3 attempts for AWS errors) runs, and if storage stays down the
    report fails and the run restarts from the last complete checkpoint (FailureConfig)."""
    # the CLI imports this module before ray_env_at_entry: Ray reads its node address at import
    import ray.train

    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    upload(checkpoint.path, storage.storage_filesystem, destination)
    return ray.train.Checkpoint(destination, storage.storage_filesystem)

"""Training checkpoints: one folder per checkpoint, loadable weights-only.

Layout: model.pt, ema.pt, optimizer.pt, rng.pt (tensors only), train_state.json (step, epoch,
MLflow run id, ...), config.json (the resolved config), and COMPLETE, written last: a folder
without it (a write cut short) is never loaded. Every .pt file is read with
``torch.load(weights_only=True)``, so a crafted pickle cannot run code.

``persist`` is the uploader the worker hands to ``ray.train.report``: it copies a checkpoint into
Ray Train's storage file by file, COMPLETE last, and raises when a file did not arrive, so a write
cut short by a storage outage is retried (by Ray) or fails the report; it is never registered.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILES = ("model.pt", "ema.pt", "optimizer.pt", "rng.pt", "train_state.json", "config.json")
MARKER = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not a checkpoint of this project."""


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
    """Write a checkpoint into ``folder`` (created); COMPLETE is written last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save(ema.state_dict(), folder / "ema.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(rng_state(), folder / "rng.pt")
    (folder / "train_state.json").write_text(json.dumps(train_state, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (folder / MARKER).write_text("ok\n")
    return folder


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
    """Everything in a checkpoint folder, checked for completeness first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not (folder / MARKER).exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MARKER} marker): not loaded")
    missing = [name for name in FILES if not (folder / name).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {', '.join(missing)}")
    out = {name[:-3]: load_tensors(folder / name, map_location) for name in FILES if name.endswith(".pt")}
    try:
        out["train_state"] = json.loads((folder / "train_state.json").read_text())
        out["config"] = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {folder}: unreadable JSON ({error})") from None
    return out


def read_model_only(folder: str | Path, *, ema: bool = True, map_location="cpu") -> tuple[dict, dict]:
    """(weights, config) for evaluation and sampling: the EMA weights unless ema=False."""
    folder = Path(folder)
    if not (folder / MARKER).exists():
        raise CheckpointError(f"checkpoint {folder} is incomplete or missing (no {MARKER} marker)")
    weights = load_tensors(folder / ("ema.pt" if ema else "model.pt"), map_location)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {folder}: config.json unreadable ({error})") from None
    return weights, config


def latest(run_folder: str | Path) -> Path | None:
    """The newest complete checkpoint_* folder under a Ray Train run folder (local storage)."""
    candidates = []
    for path in Path(run_folder).glob("checkpoint_*"):
        if (path / MARKER).exists() and (path / "train_state.json").exists():
            step = json.loads((path / "train_state.json").read_text()).get("step", -1)
            candidates.append((step, path.name, path))
    return max(candidates)[2] if candidates else None


def persist(checkpoint, checkpoint_dir_name: str):
    """``ray.train.report(checkpoint_upload_fn=persist)``: upload a local checkpoint folder into
    the run's storage (local or S3) and return it as a ``ray.train.Checkpoint`` there.

    Ray's default uploader, ``pyarrow.fs.copy_files``, does not report a failed S3 upload: with Ray
    2.60 / pyarrow 25, a 503 on an UploadPart printed "Error ignored when destroying file" and the
    copy returned normally, leaving a folder without ema.pt and COMPLETE that Ray registered as
    the latest checkpoint (its upload retry never ran). Here every output stream is closed
    explicitly, which raises on a failed upload, COMPLETE goes last, and the sizes are checked;
    Ray's retry (3 attempts for AWS errors) then runs, and if storage stays down the report fails
    and the run restarts from the last complete checkpoint (FailureConfig).
    """
    import shutil

    import ray.train

    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    source = Path(checkpoint.path)
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
    return ray.train.Checkpoint(destination, filesystem)


def read_for_resume(checkpoint, map_location) -> dict[str, Any]:
    """The state of a Ray Train checkpoint, read weights-only. A remote (S3) checkpoint is
    downloaded into a folder of this process's own: ``Checkpoint.as_directory`` shares one folder
    per checkpoint between the workers of a node, so a rank could read a half-downloaded file."""
    import tempfile

    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return read(checkpoint.path, map_location=map_location)
    with tempfile.TemporaryDirectory(prefix="bfn-ckpt-") as folder:
        checkpoint.to_directory(folder)
        return read(folder, map_location=map_location)

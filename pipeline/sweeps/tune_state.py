"""The integrity of a sweep's Tune state, which `Tuner.restore` unpickles.

`bfn tune resume=true` hands the sweep's storage folder to ``Tuner.restore``, which unpickles
``tuner.pkl``, ``trainable.pkl``, the searcher and callback states and the trials' pickled
errors, and decodes pickles embedded in ``experiment_state-*.json``: whoever can write that
folder can run code in the driver. So the driver records, at every save, the sha256 of what Tune
itself wrote: Tune saves into a staging folder in the driver's private Ray temp root and then
uploads that folder over the storage, so the storage after the upload is "what it held before +
the staging folder" (``expected``), hashed in the process that wrote it before the upload
starts. The record keeps the last ``RECENT`` digests: a crash between a save and the end of its
upload leaves the storage at an earlier save, which Tune wrote too. A resume first checks the
folder against that record and refuses on any other content (a file planted during the sweep is
never recorded). The record lives in MLflow, a separate system from the storage; the storage
must still be trusted not to be changed between a check and the restore that follows it
(seconds).

Pure apart from the filesystem: pyarrow and hashlib. The MLflow side is ``store``'s.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from pyarrow import fs

from pipeline.config import ConfigError
from pipeline.core.storage import resolve
from pipeline.sweeps import store


def _is_restore_file(relative: str) -> bool:
    """What restore reads: the experiment folder's .pkl/.json files and pickles at any depth."""
    return relative.endswith(".pkl") or ("/" not in relative and relative.endswith(".json"))


def state_files(path: str, filesystem=None) -> dict[str, str]:
    """{path relative to the experiment folder: sha256} of the files a restore unpickles."""
    filesystem, root = resolve(path, filesystem)
    root = root.rstrip("/")
    infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        relative = posixpath.relpath(info.path, root)
        if info.type != fs.FileType.File or not _is_restore_file(relative):
            continue
        with filesystem.open_input_stream(info.path) as stream:
            out[relative] = hashlib.file_digest(stream, "sha256").hexdigest()
    return dict(sorted(out.items()))


RECENT = 8  # digests kept: a save whose upload is still running when the next one comes is skipped by Tune


def expected(base: dict[str, str], staging: str) -> dict[str, str]:
    """The storage's state files once Tune's upload of ``staging`` (copied over it) is done."""
    return {**base, **state_files(staging)}


def digest(files: dict[str, str]) -> str:
    """One sha256 over every (path, sha256) pair: the value recorded and compared."""
    lines = "".join(f"{name}\t{sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def top_level(files: dict[str, str]) -> str:
    """The experiment folder's own files with short hashes (JSON, a few hundred characters): kept
    beside the digest so that a refusal can name the file that changed."""
    return json.dumps({k: v[:16] for k, v in files.items() if "/" not in k}, sort_keys=True)


def check(files: dict[str, str], recorded: dict | None, where: str) -> None:
    """Raise ConfigError unless ``files`` match the ``recorded`` {"digest", "files", "top"}."""
    why = (
        "Tune restores this state with pickle, which runs any code it holds, so resume=true "
        "only restores the state this sweep itself last saved"
    )
    if recorded is None or not recorded.get("digest"):
        raise ConfigError(
            f"resume: no sha256 of the Tune state at {where} is recorded in the sweep's MLflow "
            f"run (tracking off, MLflow unreachable while it ran, or a sweep from an older "
            f"version). {why}. If you trust that folder, pass trust_storage=true"
        )
    if digest(files) in accepted(recorded):
        return
    changed = _differences(files, recorded)
    raise ConfigError(
        f"resume: the Tune state at {where} differs from the sha256 recorded in the sweep's "
        f"MLflow run ({changed}). {why}. Start a new sweep (sweep=<new name>), or, if you "
        f"changed those files yourself and trust them, pass trust_storage=true"
    )


def _differences(files: dict[str, str], recorded: dict) -> str:
    try:
        top = json.loads(recorded.get("top") or "{}")
    except ValueError:
        top = {}
    now = json.loads(top_level(files))
    names = sorted(k for k in set(top) | set(now) if top.get(k) != now.get(k))
    if names:
        return "changed, added or removed: " + ", ".join(names)
    return f"a file in a trial folder: {recorded.get('files')} files recorded, {len(files)} now"


def accepted(recorded: dict) -> list[str]:
    """The digests a resume accepts: the newest save's and those of the saves before it."""
    return [recorded["digest"], *(recorded.get("recent") or "").split()]


def record_of(files: dict[str, str], before: list[str] = ()) -> dict:
    """What is written to the parent run (``store.record_state``): the digest of ``files``, and
    the ``RECENT`` - 1 digests ``before`` it (newest first) under "recent"."""
    now = digest(files)
    recent = [d for d in before if d != now][: RECENT - 1]
    return {"digest": now, "recent": " ".join(recent), "files": len(files), "top": top_level(files)}


def verify(cfg, sweep_name: str, path: str, filesystem=None) -> dict[str, str]:
    """Before ``Tuner.restore``: the sweep's Tune state at ``path`` must match a sha256 recorded
    in its MLflow parent run. Raises ConfigError otherwise; reads the files, unpickles nothing.
    Returns the files checked ({path: sha256}): what the resumed sweep's record starts from."""
    recorded = None
    if cfg.tracking.enabled:
        try:
            run_id = store.find_parent(cfg, sweep_name)
            recorded = store.recorded_state(cfg.tracking.uri, run_id) if run_id else None
        except Exception as error:
            raise ConfigError(
                f"resume: cannot read the sweep's recorded sha256 from MLflow ({store.masked(error)})"
            ) from None
    files = state_files(path, filesystem)
    check(files, recorded, path)
    return files

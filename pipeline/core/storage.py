"""Where run folders and checkpoints live: a local path or a URI resolved to a pyarrow filesystem.

Not here: what is read or written there (``checkpointing``), the dataset's own access (``pipeline.data``,
whose ``s3_filesystem`` is the one S3 filesystem every URI here gets), Ray Train's storage arguments
(``pipeline.training.resume.storage``).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from pipeline.data import storage as data_storage


def resolve(path_or_uri: str | Path, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a local path (made absolute, symlinks resolved) or a URI
    (``s3://`` with the project's S3 filesystem, endpoint and credentials from the environment;
    the path without its scheme). With ``filesystem``, ``path_or_uri`` is already a path on it."""
    if filesystem is not None:
        return filesystem, str(path_or_uri)
    text = str(path_or_uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    return data_storage.resolve(text)

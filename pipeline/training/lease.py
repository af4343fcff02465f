"""One writer per run folder: a lease file with a heartbeat, on local storage or S3.

A run folder (``<run.storage_path>/<run.name>``) holds checkpoints that only one training run may
write. ``Lease.acquire`` creates ``<run folder>/bfn-lease.json`` exclusively (local: a hard link,
which fails if the name exists; S3: a conditional put, ``If-None-Match: *``) holding who holds it:
host, pid, start time and a heartbeat time that a thread renews every ``heartbeat_s`` seconds
(a compare-and-swap: local under ``flock``, S3 with ``If-Match: <etag>``). A second run of the same
folder fails fast with a ``LeaseError`` naming the holder. The lease can be taken over when its
holder is provably gone: same host and the pid is dead (a SIGKILLed driver: the rerun continues at
once), or its heartbeat is older than ``stale_s`` (a holder on another machine that died).
``release`` deletes it only if it is still ours.

Other storage (gs://) has no lease: a warning says so and the run goes on.

``experiment_differences`` decides whether a rerun may resume a run folder: every config key
defines the experiment except those in ``RESUMABLE`` (where things run and are tracked, how long
and how often, evaluation settings). Changing e.g. ``optim.lr`` and rerunning the same name is
refused with the keys named; ``run.init_from=<checkpoint folder>`` starts a new run from another
run's weights instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pipeline.config import ConfigError, flatten, is_under, keys_marked

log = logging.getLogger(__name__)
LEASE_FILE = "bfn-lease.json"
# keys a resumed run may change (marked on the schema's fields): machine, paths, tracking, run length
# and cadence, evaluation
RESUMABLE = keys_marked("resumable")
HEARTBEAT_S = 30.0
STALE_S = 180.0


class LeaseError(ConfigError):
    """The run folder is held by another live run (the message names it): a run.name in use, so
    the CLI reports it like any bad config value, in one line, before Ray starts."""


# ---------------------------------------------------------------------------------- backends
class LocalLeaseFile:
    """Compare-and-swap on a local (or NFS) file; the version is the sha256 of its content."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.uri = str(self.path)

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        temporary.write_bytes(data)
        try:
            os.link(temporary, self.path)  # atomic, fails if the name exists: an exclusive create of full content
        except FileExistsError:
            return None
        finally:
            temporary.unlink()
        return self._version(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, self._version(data)

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
            temporary.write_bytes(data)
            os.replace(temporary, self.path)
        return self._version(data)

    def delete(self, version: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == version:
                self.path.unlink()


class S3LeaseFile:
    """Compare-and-swap on an S3 object with conditional requests; the version is its ETag."""

    def __init__(self, bucket: str, key: str) -> None:
        import boto3

        self.client = boto3.client("s3")  # endpoint and credentials from the environment
        self.bucket, self.key = bucket, key
        self.uri = f"s3://{bucket}/{key}"

    @staticmethod
    def _refused(error) -> bool:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (404, 409, 412) or error.response.get("Error", {}).get("Code") == "NoSuchKey"

    def _put(self, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as error:
            if self._refused(error):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as error:
            if self._refused(error):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):  # gone or taken over: not ours to delete
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)


def lease_file(run_folder: str) -> LocalLeaseFile | S3LeaseFile | None:
    """The lease file of a run folder (a local path or an s3:// URI); None where unsupported."""
    if run_folder.startswith("s3://"):
        bucket, _, prefix = run_folder[len("s3://") :].partition("/")
        return S3LeaseFile(bucket, f"{prefix.strip('/')}/{LEASE_FILE}".lstrip("/"))
    if "://" in run_folder:
        return None
    return LocalLeaseFile(Path(run_folder) / LEASE_FILE)


# ------------------------------------------------------------------------------------- lease
def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host')} pid {holder.get('pid')} (started {started})"


class Lease:
    """The lease of one run folder; ``acquire`` / ``release``, or use it as a context manager."""

    def __init__(self, run_folder: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.run_folder = run_folder
        self.file = lease_file(run_folder)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "process_started": _process_started(os.getpid()), "started": time.time()}  # fmt: skip
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> bytes:
        return json.dumps({**self.holder, "heartbeat": time.time(), "run_folder": self.run_folder}).encode()

    def _gone(self, other: dict) -> str | None:
        """Why ``other``'s lease may be taken over, or None while it may be alive."""
        age = time.time() - float(other.get("heartbeat", 0))
        if age > self.stale_s:
            return f"its last heartbeat was {age:.0f} s ago (> {self.stale_s:.0f} s)"
        if other.get("host") == self.holder["host"]:
            started = _process_started(int(other.get("pid", -1)))
            if started is None or (other.get("process_started") and abs(started - other["process_started"]) > 1):
                return f"process {other.get('pid')} no longer runs on this host"
        return None

    def acquire(self) -> Lease:
        if self.file is None:
            log.warning("run folder %s: no lease on this storage; make sure no other run uses this run.name",
                        self.run_folder)  # fmt: skip
            return self
        for _ in range(3):  # the holder may release or be taken over between our calls
            self.version = self.file.create(self._content())
            if self.version:
                break
            current = self.file.read()
            if current is None:
                continue
            try:
                other = json.loads(current[0])
            except ValueError:
                other = {}
            reason = self._gone(other) if other else "its lease file is unreadable"
            if reason is None:
                raise LeaseError(
                    f"run folder {self.run_folder} is in use by another run: {describe(other)}, last heartbeat "
                    f"{time.time() - float(other.get('heartbeat', 0)):.0f} s ago. Use another run.name, or wait for "
                    f"it to finish (a lease older than {self.stale_s:.0f} s is taken over; lease: {self.file.uri})"
                )
            self.version = self.file.replace(self._content(), current[1])
            if self.version:
                log.warning("run folder %s: took over the lease of %s: %s", self.run_folder,
                            describe(other) if other else "an unknown holder", reason)  # fmt: skip
                break
        else:
            raise LeaseError(f"run folder {self.run_folder}: could not acquire its lease {self.file.uri}")
        self._thread = threading.Thread(target=self._beat, name="bfn-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                version = self.file.replace(self._content(), self.version)
            except Exception as error:  # storage hiccup: try again at the next beat
                log.warning("run folder %s: lease heartbeat failed (%s)", self.run_folder, error)
                continue
            if version is None:
                self.lost = True
                log.error("run folder %s: the lease was taken over by another run; this run no longer owns "
                          "its checkpoints (lease: %s)", self.run_folder, self.file.uri)  # fmt: skip
                return
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
        if self.file is not None and self.version and not self.lost:
            try:
                self.file.delete(self.version)
            except Exception as error:  # a stale lease is taken over by the next run anyway
                log.warning("run folder %s: lease not released (%s)", self.run_folder, error)
        self.version = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- one experiment
def experiment_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each experiment-defining key that differs."""
    old = flatten({k: v for k, v in saved.items() if not k.startswith("_")})
    new = flatten({k: v for k, v in current.items() if not k.startswith("_")})
    missing = "(missing)"
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted(set(old) | set(new))
            if not is_under(key, RESUMABLE) and old.get(key, missing) != new.get(key, missing)]  # fmt: skip

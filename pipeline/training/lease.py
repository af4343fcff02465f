"""One writer per run folder: a lease file with a heartbeat, on local storage or S3.

A run folder (``<run.storage_path>/<run.name>``) holds checkpoints that only one training run may
write. ``Lease.acquire`` creates ``<run folder>/bfn-lease.json`` exclusively (local: a hard link,
which fails if the name exists; S3: a conditional put, ``If-None-Match: *``) holding who holds it:
host, pid, start time and a heartbeat time that a thread renews every ``heartbeat_s`` seconds
(a compare-and-swap: local under ``flock``, S3 with ``If-Match: <etag>``). A second run of the same
folder fails fast with a ``LeaseError`` naming the holder. The lease can be taken over when its
holder is provably gone: same host, boot and PID namespace and the pid is dead (a SIGKILLed driver:
the rerun continues at once), or its lease file did not change for ``stale_s`` as timed by the
newcomer's own monotonic clock (a holder on another machine that died; two hosts' wall clocks are
never compared to take a lease over). ``release`` deletes it only if it is still ours.

A holder whose lease was taken over stops: its Train workers read the lease before each report or
checkpoint (``lost_to``) and end the run with a ``LeaseError`` naming the new holder. An S3 store
that ignores conditional writes (``If-None-Match``/``If-Match``) is refused: every write is read
back and checked.

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

import psutil
from botocore.exceptions import ClientError

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


def _namespace() -> dict:
    """What tells two processes of one hostname apart: the boot and the PID namespace (containers on the
    host network share the hostname, not the pids)."""
    found = {}
    with contextlib.suppress(OSError):
        found["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        found["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return found


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
        # boto3 (~0.3 s) only for a lease on s3://
        import boto3

        self.client = boto3.client("s3")  # endpoint and credentials from the environment
        self.bucket, self.key = bucket, key
        self.uri = f"s3://{bucket}/{key}"

    @staticmethod
    def _refused(error) -> bool:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (404, 409, 412) or error.response.get("Error", {}).get("Code") == "NoSuchKey"

    def _put(self, data: bytes, key: str | None = None, **condition) -> str | None:

        try:
            return self.client.put_object(Bucket=self.bucket, Key=key or self.key, Body=data, **condition)["ETag"]
        except ClientError as error:
            if self._refused(error):
                return None
            raise

    def _checked(self, data: bytes, etag: str | None) -> str | None:
        """The write's ETag if the object now holds ``data`` (read back: a store that ignores conditional
        requests lets a second writer overwrite a lease it should have been refused)."""
        if etag is None:
            return None
        current = self.read()
        if current is None or current[0] != data or current[1] != etag:
            return None
        return etag

    def _check_conditions(self) -> None:
        """Refuse a store that ignores conditional writes (it would let two runs hold one folder): a put
        conditional on an ETag that cannot match, to a probe key beside the lease, must be refused."""
        probe = f"{self.key}.probe-{uuid.uuid4().hex}"
        if self._put(b"probe", key=probe, IfMatch=f'"{uuid.uuid4().hex}"') is None:
            return
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        raise LeaseError(
            f"lease {self.uri}: this S3 store ignores conditional writes (If-Match / If-None-Match), so two runs "
            "could both hold the run folder; use a store that honours them (AWS S3, MinIO) or another run.storage_path"
        )

    def create(self, data: bytes) -> str | None:
        self._check_conditions()
        return self._checked(data, self._put(data, IfNoneMatch="*"))

    def read(self) -> tuple[bytes, str] | None:

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as error:
            if self._refused(error):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def replace(self, data: bytes, version: str) -> str | None:
        return self._checked(data, self._put(data, IfMatch=version))

    def delete(self, version: str) -> None:

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
        self.holder = {
            "id": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_started": _process_started(os.getpid()),
            "started": time.time(),
            **_namespace(),
        }
        self.version: str | None = None
        self.beats = 0  # renewals so far: the file changes at every beat, whatever the holder's clock says
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> bytes:
        return json.dumps(
            {**self.holder, "heartbeat": time.time(), "beats": self.beats, "run_folder": self.run_folder}
        ).encode()

    def _dead_here(self, other: dict) -> str | None:
        """Why ``other``'s holder is provably gone, if it ran in this very PID namespace (same host, boot and
        namespace: a pid means the same process here), else None."""
        same = ("host", "boot_id", "pid_ns")
        if any(other.get(key) is None or other.get(key) != self.holder.get(key) for key in same):
            return None
        started = _process_started(int(other.get("pid", -1)))
        if started is None or (other.get("process_started") and abs(started - other["process_started"]) > 1):
            return f"process {other.get('pid')} no longer runs on this host"
        return None

    def _unchanged_for_stale_s(self, version: str) -> bool:
        """Watch the lease file for ``stale_s`` on this process's monotonic clock: True if it never changed
        (its holder stopped renewing), False as soon as it changes (alive, or taken by someone else)."""
        log.warning(
            "run folder %s: its lease looks stale; watching it for %.0f s before taking it over",
            self.run_folder,
            self.stale_s,
        )
        deadline = time.monotonic() + self.stale_s
        while True:
            current = self.file.read()
            if current is None or current[1] != version:
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(min(max(self.heartbeat_s / 4, 0.05), max(deadline - time.monotonic(), 0.0), 5.0))

    def _gone(self, other: dict, version: str) -> str | None:
        """Why ``other``'s lease may be taken over, or None while it may be alive. Its heartbeat time comes
        from another clock: a fresh one is believed (refusing is safe), an old or future one only makes us
        watch the file ourselves."""
        dead = self._dead_here(other)
        if dead:
            return dead
        age = time.time() - float(other.get("heartbeat", 0))
        if abs(age) <= self.stale_s:
            return None
        if self._unchanged_for_stale_s(version):
            return f"its lease file did not change for {self.stale_s:.0f} s (heartbeat stamped {age:.0f} s ago)"
        return None

    def acquire(self) -> Lease:
        if self.file is None:
            log.warning(
                "run folder %s: no lease on this storage; make sure no other run uses this run.name", self.run_folder
            )
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
            reason = self._gone(other, current[1]) if other else "its lease file is unreadable"
            if reason is None:
                raise LeaseError(
                    f"run folder {self.run_folder} is in use by another run: {describe(other)}, last heartbeat "
                    f"{time.time() - float(other.get('heartbeat', 0)):.0f} s ago. Use another run.name, or wait for "
                    f"it to finish (a lease unchanged for {self.stale_s:.0f} s is taken over; lease: {self.file.uri})"
                )
            self.version = self.file.replace(self._content(), current[1])
            if self.version:
                log.warning(
                    "run folder %s: took over the lease of %s: %s",
                    self.run_folder,
                    describe(other) if other else "an unknown holder",
                    reason,
                )
                break
        else:
            raise LeaseError(f"run folder {self.run_folder}: could not acquire its lease {self.file.uri}")
        self._thread = threading.Thread(target=self._beat, name="bfn-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beats += 1
            try:
                version = self.file.replace(self._content(), self.version)
            except Exception as error:  # storage hiccup: try again at the next beat
                log.warning("run folder %s: lease heartbeat failed (%s)", self.run_folder, error)
                continue
            if version is None:
                self.lost = True
                log.error(
                    "%s",
                    lost_to(self.run_folder, self.holder["id"])
                    or f"run folder {self.run_folder}: "
                    f"the lease was taken over by another run (lease: {self.file.uri})",
                )
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

    @property
    def token(self) -> dict:
        """What a Train worker needs to check that this run still holds its folder (``lost_to``)."""
        return {"run_folder": self.run_folder, "id": self.holder["id"]} if self.file is not None else {}

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lost_to(run_folder: str, holder_id: str, file: LocalLeaseFile | S3LeaseFile | None = None) -> str | None:
    """Why the run holding lease ``holder_id`` must stop (its folder's lease is gone or another run's), or
    None while it holds it (or the lease cannot be read now: its checkpoint write would fail as well).
    ``file``: the folder's ``lease_file``, for a caller that checks often (default: made here)."""
    file = file or lease_file(run_folder)
    if file is None:
        return None
    try:
        current = file.read()
    except Exception as error:  # storage hiccup: the next check decides
        log.warning("run folder %s: lease not readable (%s)", run_folder, error)
        return None
    try:
        other = json.loads(current[0]) if current else {}
    except ValueError:
        other = {}
    if other.get("id") == holder_id:
        return None
    holder = describe(other) if other else "nobody (the lease file is gone or unreadable)"
    return (
        f"run folder {run_folder}: the lease was taken over by {holder}; this run stops and writes no more "
        f"checkpoints into a folder it no longer owns (lease: {file.uri})"
    )


# ---------------------------------------------------------------------------- one experiment
def experiment_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each experiment-defining key that differs."""
    old = flatten({k: v for k, v in saved.items() if not k.startswith("_")})
    new = flatten({k: v for k, v in current.items() if not k.startswith("_")})
    missing = "(missing)"
    return [
        (key, old.get(key, missing), new.get(key, missing))
        for key in sorted(set(old) | set(new))
        if not is_under(key, RESUMABLE)
        and old.get(key, missing) != new.get(key, missing)
        # a key the schema gained since the checkpoint (flow.beta_1_times_k) is the same experiment while null
        and not (old.get(key, missing) in (missing, None) and new.get(key, missing) in (missing, None))
    ]

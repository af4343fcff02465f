"""The Ray runtime of a `bfn` command: the environment an embedded one needs, then ``ray.init``.

The embedded runtime (no ``run.ray_address``) listens on loopback only (``ray_env_at_entry``, set
by the CLI before anything imports ray), requires a token that is generated per runtime (a 0600
file in a private temporary folder, never printed; see ``secure_local_ray``), keeps its sessions
under a temp root only this user can enter (``ray_temp_root``) and never joins a cluster a
bootstrap file names (``ray.init(address="local")``). Joining a cluster (``run.ray_address``)
changes none of that environment.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from pipeline import logs
from pipeline.config import Config, ConfigError, set_env_defaults
from pipeline.secrets import write_secret_file

log = logging.getLogger(__name__)
# Ray then takes 127.0.0.1 as the node address: every service of a single-node runtime binds
# loopback (Linux default: the machine's routable address). Read when `ray` is first imported.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's sockets sit ~70 bytes below <root>/ray and a Unix socket path has at most 107
RAY_ROOT_MAX_LEN = 32
RAY_ROOT_BASE = Path("/tmp")  # where the default temp root, bfn-ray-<uid>, is made (short, like Ray's /tmp/ray)
_local_token_path: Path | None = None


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _local_token() -> Path:
    """This process's token file for embedded runtimes (one per process: Ray caches the token)."""
    global _local_token_path
    if _local_token_path is None or not _local_token_path.exists():
        folder = Path(tempfile.mkdtemp(prefix="bfn-ray-auth-"))  # mode 0700
        atexit.register(shutil.rmtree, folder, True)
        _local_token_path = write_secret_file(folder / "auth_token", secrets.token_hex(32))
    return _local_token_path


def secure_local_ray(cfg: Config) -> None:
    """Before an embedded Ray starts: token auth (RAY_AUTH_TOKEN_PATH, RAY_AUTH_MODE unset so that
    ``ray.init`` turns token mode on and reloads its settings) and loopback-only addresses. Call it
    before ``import ray`` for the loopback part; joining a cluster (run.ray_address) changes nothing."""
    if not (cfg.run.ray_address or _ray_running()):
        embedded_ray_env()


def ray_env_at_entry() -> None:
    """What every `bfn` command sets before anything imports ray: the quiet defaults and Ray's loopback
    node address (read once, when ray is imported). Joining a cluster is unaffected: a driver takes
    the address of the node it connects to."""
    set_env_defaults()
    _warn_if_ray_binds_the_network()
    os.environ[LOOPBACK_ENV] = "0"


def _ray_binds_loopback() -> bool:
    """Whether an embedded runtime started by this process binds loopback (the setting Ray read at import)."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None:
        return "ray" not in sys.modules and os.environ.get(LOOPBACK_ENV) == "0"
    return not getattr(constants, "ENABLE_RAY_CLUSTER", True)


def _warn_if_ray_binds_the_network() -> None:
    if "ray" in sys.modules and not _ray_binds_loopback():
        log.warning(
            "ray was imported before the embedded runtime was configured: its services may listen "
            "on this machine's network address (token auth still applies)"
        )


def ray_temp_root() -> Path:
    """The embedded runtime's temp root: $RAY_TMPDIR, else /tmp/bfn-ray-<uid>. A folder of this user that
    nobody else can enter: Ray makes the folders below it world-writable, and its sessions hold logs,
    sockets and Tune's local copy of a sweep's state (unpickled on resume). Short, for Unix sockets."""
    given = os.environ.get("RAY_TMPDIR")
    root = Path(given) if given else RAY_ROOT_BASE / f"bfn-ray-{os.getuid()}"
    what = f"RAY_TMPDIR={given}" if given else f"Ray's temp root {root}"
    if not root.is_absolute() or len(str(root)) > RAY_ROOT_MAX_LEN:
        raise ConfigError(
            f"{what}: Ray's temp root must be an absolute path of at most {RAY_ROOT_MAX_LEN} "
            "characters (Ray's Unix sockets live below it; their paths are limited to 107 bytes)"
        )
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700, parents=bool(given))
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} is not a folder (a symlink or a file): Ray's temp root must be a private folder")
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{what} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): "
            "Ray's temp root must be a private folder of this user; set RAY_TMPDIR to one"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        if given:
            raise ConfigError(
                f"{what} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}): Ray's "
                "temp root must be private (chmod 700 it, or unset RAY_TMPDIR)"
            )
        os.chmod(root, 0o700)  # our own folder, opened by someone's chmod: close it again
    return root


def embedded_ray_env() -> None:
    """The environment of a new embedded runtime (``secure_local_ray``; the test fixture too)."""
    _warn_if_ray_binds_the_network()
    os.environ[LOOPBACK_ENV] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # torch's gloo connections between workers: loopback too
    # one machine is never drained by a cloud provider: the watcher would be one more process polling every 5 s
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # the controller sees a finished worker group at its next poll (default every 2 s): ~1.5 s less per fit,
    # no measurable cost to the steady state (docs/benchmarks.md)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_local_token())
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_AUTH_MODE", None)
    # its notice suggests opting out of token auth; the token here is generated, nothing to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def check_storage_is_shared(storage_path: str, shared: bool, alive_nodes: int) -> None:
    """A run folder on a local path works on one node only, unless every node mounts it (``shared``)."""
    local = "://" not in str(storage_path) or str(storage_path).startswith("file://")
    if alive_nodes > 1 and local and not shared:
        raise ConfigError(
            f"run.storage_path: {storage_path} is a local path and this Ray cluster has {alive_nodes} nodes: "
            "each node would write checkpoints into its own folder and a resume would not find them. Use "
            "shared storage (s3://bucket/prefix), or set run.shared_storage=true if every node mounts this "
            "path (NFS)"
        )


def init_ray(cfg: Config) -> None:
    secure_local_ray(cfg)  # before ray is imported (nothing to do when joining a cluster or when Ray runs)
    # configured first: Ray reads its node address at import
    import ray

    if ray.is_initialized():
        return
    set_env_defaults()
    quiet = logs.ray_init_kwargs()
    if cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, **quiet)
        # before any worker starts: a cluster of several nodes needs a run folder they all see
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        check_storage_is_shared(cfg.run.storage_path, cfg.run.shared_storage, alive)
    else:
        if not _ray_binds_loopback():
            raise RuntimeError(
                f"ray was imported before {LOOPBACK_ENV}=0 was set: an embedded runtime would "
                "listen on this machine's network address (set it before importing ray)"
            )
        root = ray_temp_root()
        os.environ["RAY_TMPDIR"] = str(root)  # Ray's workers and Tune look their temp folder up there too
        if os.environ.get("RAY_ADDRESS"):
            log.info(
                "RAY_ADDRESS is set but run.ray_address is not: starting an embedded runtime "
                "(run.ray_address=auto or run=cluster joins a cluster)"
            )
        # "local": always a runtime of our own, never the cluster a bootstrap file names (a killed
        # `ray start` leaves one behind) nor RAY_ADDRESS; joining a cluster is what run.ray_address is for
        ray.init(
            address="local",
            num_cpus=cfg.run.ray_num_cpus,
            object_store_memory=768 * 1024**2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            _temp_dir=str(root / "ray"),
            **quiet,
        )
    logs.restore()

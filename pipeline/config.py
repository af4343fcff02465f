"""Config: compose the Hydra tree (pipeline/conf), validate it, and hand Ray a plain dict.

``compose(overrides)`` returns the resolved config as a plain dict with absolute paths;
``Config.from_dict`` turns it into typed, validated sections. Every check raises ``ConfigError``
naming the dotted key and the allowed values, before Ray or any worker starts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent / "conf"
UNITS = ("nats/dim", "bits/dim", "nats/image", "bits/char")
HEADS = ("bernoulli", "categorical", "discretized_normal", "delta")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def _fail(key: str, message: str, value: Any) -> None:
    from pipeline.tracking import SECRET_KEY, mask_secrets

    shown = "***" if SECRET_KEY.search(key) else mask_secrets({"value": value})["value"]
    raise ConfigError(f"{key}: {message} (got {shown!r})")


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> dict:
    """Compose pipeline/conf/<config_name>.yaml with Hydra overrides; resolved, paths absolute."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"config: {error}".replace("\n", " ")) from None
    return absolutize(resolved)


def absolutize(config: dict) -> dict:
    """Make the local paths absolute: Ray Train workers chdir to their own folder."""
    def local(path: str | None) -> str | None:
        if path is None or "://" in str(path):
            return path
        return str(Path(path).expanduser().resolve())

    for section, key in (("paths", "root"), ("paths", "data_dir"), ("paths", "runs_dir"),
                         ("data", "uri"), ("run", "storage_path"), ("run", "init_from"),
                         ("tracking", "artifact_location")):  # fmt: skip
        if section in config and config[section].get(key) is not None:
            config[section][key] = local(config[section][key])
    uri = config.get("tracking", {}).get("uri")
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        config["tracking"]["uri"] = "sqlite:///" + local(uri[len("sqlite:///"):])
    return config


# ----------------------------------------------------------------------------------- sections
def _number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(key, "must be a finite number", value)
    if integer and int(value) != value:
        _fail(key, "must be an integer", value)
    if low is not None and (value <= low if low_open else value < low):
        _fail(key, f"must be {'>' if low_open else '>='} {low}", value)
    if high is not None and (value >= high if high_open else value > high):
        _fail(key, f"must be {'<' if high_open else '<='} {high}", value)


@dataclass(frozen=True)
class DataConfig:
    name: str
    uri: str
    num_bins: int
    seq_len: int
    fraction: float
    batch_size: int
    val_batch_size: int

    def validate(self, config: Config) -> None:
        if self.name not in ("mnist", "cifar10", "text8"):
            _fail("data.name", "must be one of mnist, cifar10, text8", self.name)
        _number("data.fraction", self.fraction, low=0, high=1, low_open=True)
        _number("data.batch_size", self.batch_size, low=1, integer=True)
        _number("data.val_batch_size", self.val_batch_size, low=1, integer=True)
        if self.name == "cifar10":
            _number("data.num_bins", self.num_bins, low=2, high=256, integer=True)
        if self.name == "text8":
            _number("data.seq_len", self.seq_len, low=1, integer=True)
        workers = config.trainer.num_workers
        if self.batch_size % workers:
            _fail("data.batch_size", f"must be divisible by trainer.num_workers={workers}",
                  self.batch_size)  # fmt: skip

    @property
    def data_shape(self) -> tuple[int, ...]:
        return {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}.get(self.name, (self.seq_len,))


@dataclass(frozen=True)
class FlowConfig:
    kind: str
    num_classes: int
    beta_1: float | None
    sigma_1: float | None
    head: str
    num_bins: int
    noise_prediction: bool
    receiver: str
    num_mc_samples: int
    reconstruction_bins: int
    reconstruction_std_scale: float

    def validate(self, config: Config) -> None:
        data = config.data
        if self.head not in HEADS:
            _fail("flow.head", f"must be one of {', '.join(HEADS)}", self.head)
        if self.receiver not in ("reference", "paper"):
            _fail("flow.receiver", "must be reference or paper", self.receiver)
        _number("flow.num_mc_samples", self.num_mc_samples, low=1, integer=True)
        if self.kind == "discrete":
            _number("flow.beta_1", self.beta_1, low=0, low_open=True)
            expected = {"mnist": 2, "text8": 27}.get(data.name)
            if expected is None:
                _fail("flow.kind", f"discrete flows need discrete data, data.name is {data.name}",
                      self.kind)  # fmt: skip
            if self.num_classes != expected:
                _fail("flow.num_classes", f"must be {expected} for data.name={data.name}",
                      self.num_classes)  # fmt: skip
            if self.head not in ("bernoulli", "categorical") or (
                self.head == "bernoulli" and self.num_classes != 2
            ):
                _fail("flow.head", f"{self.num_classes}-class data need "
                      f"{'bernoulli or categorical' if self.num_classes == 2 else 'categorical'}",
                      self.head)  # fmt: skip
        elif self.kind == "continuous":
            _number("flow.sigma_1", self.sigma_1, low=0, high=1, low_open=True, high_open=True)
            if data.name != "cifar10":
                _fail("flow.kind", f"continuous flows need image data (cifar10), data.name is "
                      f"{data.name}", self.kind)  # fmt: skip
            if self.head not in ("discretized_normal", "delta"):
                _fail("flow.head", "continuous data need discretized_normal or delta", self.head)
            _number("flow.num_bins", self.num_bins, low=2, integer=True)
            if self.head == "discretized_normal" and self.num_bins != data.num_bins:
                _fail("flow.num_bins", f"must equal data.num_bins={data.num_bins}", self.num_bins)
            _number("flow.reconstruction_bins", self.reconstruction_bins, low=2, integer=True)
            _number("flow.reconstruction_std_scale", self.reconstruction_std_scale, low=0,
                    low_open=True)  # fmt: skip
        else:
            _fail("flow.kind", "must be discrete or continuous", self.kind)


@dataclass(frozen=True)
class NetConfig:
    name: str
    kwargs: dict

    def validate(self, config: Config) -> None:
        from bfn.networks import PRESETS

        if self.name not in PRESETS:
            _fail("net.name", f"must be one of {', '.join(sorted(PRESETS))}", self.name)
        kind = PRESETS[self.name]["kind"]
        if (kind == "text") != (config.data.name == "text8"):
            _fail("net.name", f"a {kind} network does not fit data.name={config.data.name}",
                  self.name)  # fmt: skip


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    betas: list
    eps: float
    weight_decay: float
    grad_clip: float
    ema_decay: float
    warmup_steps: int

    def validate(self, config: Config) -> None:
        _number("optim.lr", self.lr, low=0, low_open=True)
        if len(self.betas) != 2:
            _fail("optim.betas", "must be two numbers", self.betas)
        for i, beta in enumerate(self.betas):
            _number(f"optim.betas[{i}]", beta, low=0, high=1, high_open=True)
        _number("optim.eps", self.eps, low=0, low_open=True)
        _number("optim.weight_decay", self.weight_decay, low=0)
        _number("optim.grad_clip", self.grad_clip, low=0)
        _number("optim.ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        _number("optim.warmup_steps", self.warmup_steps, low=0, integer=True)


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    amp: bool
    max_steps: int
    log_every: int
    val_every: int
    checkpoint_every: int
    num_to_keep: int
    max_failures: int
    max_bad_steps: int
    seed: int
    compile: bool
    max_minutes: float

    def validate(self, config: Config) -> None:
        _number("trainer.num_workers", self.num_workers, low=1, integer=True)
        _number("trainer.cpus_per_worker", self.cpus_per_worker, low=0, low_open=True)
        for key in ("max_steps", "log_every", "val_every", "checkpoint_every", "num_to_keep",
                    "max_bad_steps"):  # fmt: skip
            _number(f"trainer.{key}", getattr(self, key), low=1, integer=True)
        _number("trainer.max_failures", self.max_failures, low=-1, integer=True)
        _number("trainer.max_minutes", self.max_minutes, low=0)
        _number("trainer.seed", self.seed, low=0, integer=True)
        for key in ("use_gpu", "amp", "compile"):
            if not isinstance(getattr(self, key), bool):
                _fail(f"trainer.{key}", "must be true or false", getattr(self, key))


@dataclass(frozen=True)
class RunConfig:
    name: str
    storage_path: str
    ray_address: str | None
    ray_num_cpus: int | None
    init_from: str | None

    def validate(self, config: Config) -> None:
        # a name is one folder below run.storage_path: never "." / ".." / hidden, at most 128 characters
        if not isinstance(self.name, str) or not RUN_NAME.fullmatch(self.name):
            _fail("run.name", "must start with a letter or digit, then letters, digits, '-', '_' or '.' "
                  "(at most 128 characters)", self.name)  # fmt: skip
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip() or (
            "://" in self.init_from and not self.init_from.startswith(("s3://", "gs://"))
        )):  # fmt: skip
            _fail("run.init_from", "must be null or a checkpoint folder (local path or s3:// URI)", self.init_from)
        if not self.storage_path or (
            "://" in self.storage_path and not self.storage_path.startswith(("s3://", "gs://"))
        ):
            _fail("run.storage_path", "must be a local folder or an s3:// or gs:// URI",
                  self.storage_path)  # fmt: skip
        if self.ray_num_cpus is not None:
            _number("run.ray_num_cpus", self.ray_num_cpus, low=1, integer=True)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool
    uri: str | None
    artifact_location: str | None
    experiment: str

    def validate(self, config: Config) -> None:
        if self.enabled and not self.uri:
            _fail("tracking.uri", "must be set when tracking.enabled is true", self.uri)
        schemes = ("sqlite:///", "http://", "https://", "file:", "databricks", "postgresql")
        if self.enabled and not str(self.uri).startswith(schemes):
            _fail("tracking.uri", f"must start with one of {', '.join(schemes)}", self.uri)


@dataclass(frozen=True)
class EvalConfig:
    val_batches: int
    nll_steps: int
    nll_repeats: int
    num_samples: int
    sample_steps: int
    unit: str

    def validate(self, config: Config) -> None:
        for key in ("val_batches", "nll_steps", "num_samples"):
            _number(f"eval.{key}", getattr(self, key), low=0, integer=True)
        for key in ("nll_repeats", "sample_steps"):
            _number(f"eval.{key}", getattr(self, key), low=1, integer=True)
        if self.unit not in UNITS:
            _fail("eval.unit", f"must be one of {', '.join(UNITS)}", self.unit)


SECTIONS = {
    "data": DataConfig, "flow": FlowConfig, "net": NetConfig, "optim": OptimConfig,
    "trainer": TrainerConfig, "run": RunConfig, "tracking": TrackingConfig, "eval": EvalConfig,
}  # fmt: skip


@dataclass(frozen=True)
class Config:
    data: DataConfig
    flow: FlowConfig
    net: NetConfig
    optim: OptimConfig
    trainer: TrainerConfig
    run: RunConfig
    tracking: TrackingConfig
    eval: EvalConfig
    raw: dict

    @classmethod
    def from_dict(cls, config: dict) -> Config:
        """Typed, validated view of a composed config. Unknown or missing keys are errors."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = config.get(name)
            if not isinstance(values, dict):
                _fail(name, "section is missing", values)
            names = {f.name for f in fields(section_cls)}
            for key in values:
                if key not in names:
                    _fail(f"{name}.{key}", f"unknown key; {name} takes {', '.join(sorted(names))}",
                          values[key])  # fmt: skip
            for key in names - set(values):
                _fail(f"{name}.{key}", "is missing", None)
            sections[name] = section_cls(**values)
        parsed = cls(**sections, raw=config)
        # trainer first: other sections' checks use its worker count
        for name in ("trainer", *(n for n in SECTIONS if n != "trainer")):
            getattr(parsed, name).validate(parsed)
        return parsed


def load(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """compose + validate: what every CLI command does first."""
    return Config.from_dict(compose(overrides))


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params of a resolved config."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def set_env_defaults() -> None:
    """Quiet, local-only defaults for Ray and MLflow; set before ray.init (workers inherit them)."""
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_DEDUP_LOGS": "0",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)

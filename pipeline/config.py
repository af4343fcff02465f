"""Config: compose the Hydra tree (pipeline/conf), validate it once against one typed schema, and
hand Ray a plain dict.

(Longer than 500 lines because it is the one schema: every config group's dataclass and its checks,
so each key's rule and metadata read in one place.)

``compose(overrides)`` returns the resolved config as a plain dict with absolute paths;
``Config.from_dict`` turns it into the typed sections below and validates them. The dataclasses are
the schema: every key of the YAML tree is a field, and every check raises ``ConfigError`` naming
the dotted key, before Ray or any worker starts. Network sizes live in ``conf/net/*.yaml``
(architecture + constructor arguments); ``bfn.networks.NETWORKS`` only maps architectures to classes.

A key the chosen setup does not use is ``null`` in the YAML (``flow.sigma_1`` of a discrete flow,
``data.seq_len`` of images, ...). Setting it is an error that says which choice makes it unused, and
leaving null a key the setup needs is an error too: no value is ever silently ignored.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

import bfn.samplers
from bfn.networks import NETWORKS, constructor_args
from bfn.schedules import identifiable_beta_1_times_k
from pipeline.secrets import MASK, is_secret_key, mask_params

CONF_DIR = Path(__file__).resolve().parent / "conf"
UNITS = ("nats/dim", "bits/dim", "nats/image", "bits/char")
HEADS = {"discrete": ("bernoulli", "categorical"), "continuous": ("discretized_normal", "delta")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _key(*, resumable: bool = False, weights: bool = False, default: Any = MISSING):
    """A schema field with its metadata: ``resumable``, a rerun may change it and still resume the run
    folder; ``weights``, the network's parameter shapes depend on it (``run.init_from`` must match)."""
    return field(default=default, metadata={"resumable": resumable, "weights": weights})


@dataclass(frozen=True)
class Dataset:
    """What a dataset fixes: the flow its data need, its classes, the network kind, its shape, and
    the class labels its rows carry (``num_labels``; None: unlabelled, no conditional model)."""

    flow_kind: str
    num_classes: int | None
    network_kind: str
    shape: tuple[int, ...] | None  # None: (data.seq_len,)
    min_quality_samples: int = 2  # a Frechet distance needs a covariance: two feature vectors
    num_labels: int | None = None


DATASETS = {
    "mnist": Dataset("discrete", 2, "image", (28, 28, 1), num_labels=10),
    "cifar10": Dataset("continuous", None, "image", (32, 32, 3), num_labels=10),
    "text8": Dataset("discrete", 27, "text", None, min_quality_samples=1),  # text metrics score one window
    # subword tokens: K is the tokenizer's vocabulary, set in flow.num_classes and checked against the dataset
    "text_bpe": Dataset("discrete", None, "text", None, min_quality_samples=1),
}


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def _fail(key: str, message: str, value: Any) -> None:
    shown = MASK if is_secret_key(key) else mask_params({"value": value})["value"]
    raise ConfigError(f"{key}: {message} (got {shown!r})")


# ------------------------------------------------------------------------------------ compose
def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> dict:
    """Compose pipeline/conf/<config_name>.yaml with Hydra overrides; resolved, paths absolute."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"config: {error}".replace("\n", " ")) from None
    net = resolved.get("net")
    if isinstance(net, dict) and choices.get("net") and net.get("name") != choices["net"]:
        _fail(
            "net.name",
            f"names the network preset the config was composed from (net={choices['net']}); "
            "choose a network with the group, net=<preset>",
            net.get("name"),
        )
    return absolutize(resolved)


def default_runs_dir() -> Path:
    """runs/ of the environment running the command (BFN_RUNS_DIR / BFN_ROOT), as `bfn train` uses."""
    return Path(compose([])["paths"]["runs_dir"])


def absolutize(config: dict) -> dict:
    """Make the local paths absolute: Ray Train workers chdir to their own folder."""

    def local(path: str | None) -> str | None:
        if not path or "://" in str(path):  # empty: left for validation to name
            return path
        return str(Path(path).expanduser().resolve())

    for section, key in (
        ("paths", "root"),
        ("paths", "data_dir"),
        ("paths", "runs_dir"),
        ("data", "uri"),
        ("run", "storage_path"),
        ("run", "init_from"),
        ("tracking", "artifact_location"),
    ):
        if isinstance(config.get(section), dict) and config[section].get(key) is not None:
            config[section][key] = local(config[section][key])
    uri = config.get("tracking", {}).get("uri")
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        config["tracking"]["uri"] = "sqlite:///" + local(uri[len("sqlite:///") :])
    return config


def apply_overrides(config: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Hydra's ``key=value`` overrides (its own parser and value grammar) on a stored, resolved config,
    e.g. a checkpoint's: only keys the config has; paths made absolute."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(f"override: {error}".replace("\n", " ")) from None
    tree = OmegaConf.create(config)
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override() or override.type.name != "CHANGE":
            raise ConfigError(f"{override.input_line}: only key=value changes a stored config")
        if OmegaConf.select(tree, key, default=_ABSENT) is _ABSENT:
            raise ConfigError(f"{key}: unknown key")
        OmegaConf.update(tree, key, override.value(), merge=False)
    return absolutize(OmegaConf.to_container(tree))


_ABSENT = object()


def net_presets() -> dict[str, dict]:
    """conf/net/<name>.yaml -> {"name", "arch", "kwargs"}: what ``net=<name>`` composes."""
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF_DIR / "net").glob("*.yaml"))}


# ------------------------------------------------------------------------------- value checks
def _number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(key, "must be a finite number", value)
    if integer and int(value) != value:
        _fail(key, "must be an integer", value)
    if low is not None and (value <= low if low_open else value < low):
        _fail(key, f"must be {'>' if low_open else '>='} {low}", value)
    if high is not None and (value >= high if high_open else value > high):
        _fail(key, f"must be {'<' if high_open else '<='} {high}", value)


def _flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, "must be true or false", value)


def _choice(key: str, value: Any, options) -> None:
    if not isinstance(value, str) or value not in options:
        _fail(key, f"must be one of {', '.join(options)}", value)


def _text(key: str, value: Any, *, local: bool = False) -> None:
    if not isinstance(value, str) or not value:
        _fail(key, "must be a non-empty string", value)
    if local and "://" in value:
        _fail(key, "must be a local folder", value)


def _uri(key: str, value: Any) -> None:
    _text(key, value)
    if "://" in value and not value.startswith(("s3://", "gs://")):
        _fail(key, "must be a local folder or an s3:// or gs:// URI", value)


def _whole(item) -> int | None:
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        return int(item)
    if isinstance(item, str) and item.strip().isdigit():
        return int(item)
    return None


def parse_samplers(text: str | list[str], flag: str = "--sampler", *, several: bool = True) -> list[str]:
    """Sampler names (bfn.samplers.SAMPLERS) from a comma-separated string or a list; ConfigError names ``flag``."""
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    known = sorted(bfn.samplers.SAMPLERS)
    for name in names:
        if name not in bfn.samplers.SAMPLERS or (len(names) > 1 and not several):
            raise ConfigError(
                f"{flag}: must be one of {', '.join(known)}"
                f"{', or a comma-separated list of them' if several else ''} (got {text!r})"
            )
    if not names:
        raise ConfigError(f"{flag}: name at least one sampler ({', '.join(known)})")
    return list(dict.fromkeys(names))


def parse_nfe(text: str | int | list, flag: str = "--nfe") -> list[int]:
    """Numbers of network calls from "5,10", 10 or [5, 10]; ConfigError names ``flag``."""
    items = text.split(",") if isinstance(text, str) else [text] if isinstance(text, int) else list(text)
    values = [_whole(item) for item in items]
    for item, value in zip(items, values, strict=True):
        if value is None or value < 1:
            raise ConfigError(f"{flag}: network calls must be whole numbers >= 1 (got {item!r})")
    if not values:
        raise ConfigError(f"{flag}: give at least one number of network calls")
    return list(dict.fromkeys(values))


def parse_guidance(text: str | float | list, flag: str = "--guidance") -> list[float]:
    """Classifier-free guidance scales from "0,0.5,2", 2.0 or [0, 2]: finite numbers; ConfigError names ``flag``."""
    items = text.split(",") if isinstance(text, str) else [text] if isinstance(text, int | float) else list(text)
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or isinstance(item, bool):
            raise ConfigError(f"{flag}: guidance scales must be finite numbers, e.g. 0,0.5,1,2,4 (got {item!r})")
        values.append(value)
    if not values:
        raise ConfigError(f"{flag}: give at least one guidance scale")
    return list(dict.fromkeys(values))


def check_count(flag: str, value: int | str, low: int, why: str = "") -> int:
    """A whole number >= ``low`` given as an int or as command-line text; ConfigError names ``flag``."""
    number = _whole(value)
    if number is None or number < low:
        raise ConfigError(f"{flag}: must be a whole number >= {low}{why} (got {value!r})")
    return number


def parse_grid(grid: str | None, flag: str = "--grid") -> str | None:
    """The BFN-Solvers' time grid (bfn.samplers.GRIDS) or None (the flow's default); ConfigError names ``flag``."""
    if grid is not None and grid not in bfn.samplers.GRIDS:
        raise ConfigError(f"{flag}: must be one of {', '.join(bfn.samplers.GRIDS)} (got {grid!r})")
    return grid


def _applies(key: str, value: Any, used: bool, choice: str, reason: str) -> bool:
    """Null where the setup does not use ``key``, set where it does; ``choice`` is the config value
    that decides, ``reason`` says why. Returns ``used`` (whether to check the value itself)."""
    if not used and value is not None:
        _fail(key, f"is not used with {choice} ({reason}); leave it null", value)
    if used and value is None:
        _fail(key, f"is required with {choice} ({reason})", value)
    return used


# ----------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class PathsConfig:
    RESUMABLE: ClassVar[bool] = True  # every key of the section: where things live, not what is trained

    root: str  # project folder (BFN_ROOT)
    data_dir: str  # where `bfn data prepare` writes shards by default
    runs_dir: str  # local folder for Ray results, MLflow's sqlite store, outputs (BFN_RUNS_DIR)

    def validate(self, config: Config) -> None:
        _text("paths.root", self.root, local=True)
        _uri("paths.data_dir", self.data_dir)
        _text("paths.runs_dir", self.runs_dir, local=True)


@dataclass(frozen=True)
class DataConfig:
    name: str = _key(weights=True)
    uri: str = _key(resumable=True)
    num_bins: int | None = _key(weights=True)  # cifar10 only
    seq_len: int | None = _key(weights=True)  # text8 only
    fraction: float = _key()
    batch_size: int = _key()  # global: all workers together
    val_batch_size: int = _key(resumable=True)

    def validate(self, config: Config) -> None:
        _choice("data.name", self.name, DATASETS)
        _uri("data.uri", self.uri)
        choice = f"data.name={self.name}"
        if _applies("data.num_bins", self.num_bins, self.name == "cifar10", choice, "only cifar10 is quantised"):
            _number("data.num_bins", self.num_bins, low=2, high=256, integer=True)
        text = DATASETS[self.name].network_kind == "text"
        if _applies("data.seq_len", self.seq_len, text, choice, "only text is cut into windows"):
            _number("data.seq_len", self.seq_len, low=1, integer=True)
        _number("data.fraction", self.fraction, low=0, high=1, low_open=True)
        _number("data.batch_size", self.batch_size, low=1, integer=True)
        _number("data.val_batch_size", self.val_batch_size, low=1, integer=True)
        trainer = config.trainer
        # the global batch is split evenly at every world size an elastic run may take (no accumulation)
        sizes = range(trainer.min_workers, trainer.max_workers + 1)
        if any(self.batch_size % workers for workers in sizes):
            which = f"trainer.num_workers={trainer.num_workers}"
            if trainer.elastic:
                every = ", ".join(map(str, sizes))
                which = f"every world size of trainer.num_workers={list(trainer.num_workers)} ({every})"
            _fail("data.batch_size", f"is the global batch: must be divisible by {which}", self.batch_size)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return DATASETS[self.name].shape or (self.seq_len,)


@dataclass(frozen=True)
class FlowConfig:
    kind: str = _key(weights=True)  # discrete | continuous
    head: str = _key(weights=True)  # output distribution: bernoulli, categorical | discretized_normal, delta
    num_classes: int | None = _key(weights=True)  # discrete
    beta_1: float | None  # discrete (or flow.beta_1_times_k)
    sigma_1: float | None  # continuous
    noise_prediction: bool | None  # continuous
    receiver: str | None  # discrete
    num_mc_samples: int | None  # every head but delta (its n-step loss is closed-form)
    reconstruction_std_scale: float | None  # delta
    # discrete: beta_1 = this / K, instead of flow.beta_1; "auto": bfn.schedules.identifiable_beta_1_times_k(K)
    beta_1_times_k: float | str | None = _key(default=None)

    @property
    def beta_1_value(self) -> float | None:
        """beta_1 of a discrete flow: flow.beta_1, or flow.beta_1_times_k / K, where "auto" takes the
        beta_1 K that leaves text8's number of rival classes at t = 1 (docs/vocabulary.md)."""
        if self.beta_1_times_k == "auto":
            return identifiable_beta_1_times_k(self.num_classes) / self.num_classes
        if self.beta_1_times_k is not None:
            return self.beta_1_times_k / self.num_classes
        return self.beta_1

    def validate(self, config: Config) -> None:
        data = DATASETS[config.data.name]
        _choice("flow.kind", self.kind, HEADS)
        if self.kind != data.flow_kind:
            _fail("flow.kind", f"data.name={config.data.name} needs a {data.flow_kind} flow", self.kind)
        if self.head not in HEADS[self.kind]:
            _fail("flow.head", f"{self.kind} flows take {' or '.join(HEADS[self.kind])}", self.head)
        discrete, delta = self.kind == "discrete", self.head == "delta"
        kind, head = f"flow.kind={self.kind}", f"flow.head={self.head}"
        if _applies("flow.num_classes", self.num_classes, discrete, kind, "classes of discrete data"):
            if data.num_classes is None:  # a tokenizer's vocabulary: checked against the dataset before a run
                _number("flow.num_classes", self.num_classes, low=2, integer=True)
            elif self.num_classes != data.num_classes:
                _fail(
                    "flow.num_classes", f"must be {data.num_classes} for data.name={config.data.name}", self.num_classes
                )
            if self.head == "bernoulli" and self.num_classes != 2:
                _fail("flow.head", f"{self.num_classes}-class data need categorical", self.head)
        if discrete and (self.beta_1 is None) == (self.beta_1_times_k is None):
            _fail(
                "flow.beta_1",
                "set exactly one of flow.beta_1 and flow.beta_1_times_k (beta_1 = beta_1_times_k / K) for a "
                f"discrete flow (flow.beta_1_times_k={self.beta_1_times_k!r})",
                self.beta_1,
            )
        if self.beta_1 is not None and _applies(
            "flow.beta_1", self.beta_1, discrete, kind, "discrete schedule; continuous uses flow.sigma_1"
        ):
            _number("flow.beta_1", self.beta_1, low=0, low_open=True)
        if (
            self.beta_1_times_k is not None
            and _applies(
                "flow.beta_1_times_k", self.beta_1_times_k, discrete, kind, "discrete schedule; continuous uses sigma_1"
            )
            and self.beta_1_times_k != "auto"
        ):
            _number("flow.beta_1_times_k", self.beta_1_times_k, low=0, low_open=True)
        if _applies("flow.sigma_1", self.sigma_1, not discrete, kind, "continuous schedule; discrete uses flow.beta_1"):
            _number("flow.sigma_1", self.sigma_1, low=0, high=1, low_open=True, high_open=True)
        if _applies("flow.noise_prediction", self.noise_prediction, not discrete, kind, "continuous outputs only"):
            _flag("flow.noise_prediction", self.noise_prediction)
        if _applies("flow.receiver", self.receiver, discrete, kind, "the n-step receiver of discrete data"):
            _choice("flow.receiver", self.receiver, ("reference", "paper"))
        if _applies(
            "flow.num_mc_samples",
            self.num_mc_samples,
            not delta,
            head,
            "sender draws of the n-step loss; the delta output's is closed-form",
        ):
            _number("flow.num_mc_samples", self.num_mc_samples, low=1, integer=True)
        if _applies(
            "flow.reconstruction_std_scale",
            self.reconstruction_std_scale,
            delta,
            head,
            "width of the delta output's reconstruction; other heads score the data directly",
        ):
            _number("flow.reconstruction_std_scale", self.reconstruction_std_scale, low=0, low_open=True)


@dataclass(frozen=True)
class NetConfig:
    WEIGHTS: ClassVar[bool] = True  # every key of the section shapes the network

    name: str  # the conf/net preset these arguments were composed from (a label)
    arch: str  # key of bfn.networks.NETWORKS
    kwargs: dict  # constructor arguments except the data-dependent ones

    @property
    def kind(self) -> str:
        return NETWORKS[self.arch].kind

    def validate(self, config: Config) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            _fail("net.name", "must be a preset name (letters, digits, '-', '_', '.')", self.name)
        _choice("net.arch", self.arch, NETWORKS)
        network, need = NETWORKS[self.arch], DATASETS[config.data.name].network_kind
        if network.kind != need:
            _fail(
                "net.arch",
                f"takes {network.kind} data; data.name={config.data.name} needs a network for "
                f"{need} data (net=<preset>)",
                self.arch,
            )
        if not isinstance(self.kwargs, dict):
            _fail("net.kwargs", "must be a mapping of constructor arguments", self.kwargs)
        takes = [a for a in constructor_args(self.arch) if a not in (*network.data_keys, "num_labels")]
        for key, value in self.kwargs.items():
            if key in network.data_keys:
                _fail(f"net.kwargs.{key}", "is set from the data and flow groups; remove it", value)
            if key == "num_labels":
                _fail("net.kwargs.num_labels", "is set from model.num_labels (class conditioning); remove it", value)
            if key not in takes:
                _fail(
                    f"net.kwargs.{key}",
                    f"is not an argument of {network.cls.__name__}; it takes {', '.join(takes)}",
                    value,
                )


@dataclass(frozen=True)
class ModelConfig:
    """Class conditioning of the BFN (bfn.conditioning): both null is an unconditional model, the
    network and losses of a config without this section. Older configs lack the section: read as nulls."""

    OPTIONAL: ClassVar[bool] = True  # a config (checkpoint) written before the section existed has none

    num_labels: int | None = _key(weights=True, default=None)  # the dataset's classes: a label embedding
    cond_drop: float | None = _key(default=None)  # training labels dropped to "no condition" (guidance)

    def validate(self, config: Config) -> None:
        name = config.data.name
        labels = DATASETS[name].num_labels
        if self.num_labels is not None:
            if labels is None:
                _fail("model.num_labels", f"data.name={name} has no class labels; leave it null", self.num_labels)
            _number("model.num_labels", self.num_labels, integer=True)
            if self.num_labels != labels:
                _fail(
                    "model.num_labels", f"must be {labels}, the classes of data.name={name} (or null)", self.num_labels
                )
        choice = f"model.num_labels={self.num_labels}"
        if _applies(
            "model.cond_drop",
            self.cond_drop,
            self.num_labels is not None,
            choice,
            "probability that a training label becomes 'no condition'; only a conditional model has labels",
        ):
            _number("model.cond_drop", self.cond_drop, low=0, high=1)

    @property
    def conditional(self) -> bool:
        return self.num_labels is not None


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
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
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
    num_workers: int = _key(resumable=True)  # processes (one GPU each when use_gpu)
    use_gpu: bool = _key(resumable=True)
    cpus_per_worker: float = _key(resumable=True)
    amp: bool = _key(resumable=True)  # bf16 autocast (GPU only)
    max_steps: int = _key(resumable=True)
    log_every: int = _key(resumable=True)
    val_every: int = _key(resumable=True)
    checkpoint_every: int = _key(resumable=True)
    num_to_keep: int = _key(resumable=True)
    max_failures: int = _key(resumable=True)
    max_bad_steps: int = _key(resumable=True)
    seed: int = _key()
    compile: bool = _key(resumable=True)
    max_minutes: float = _key(resumable=True)
    # Ray resources each worker needs beside its CPUs/GPU, e.g. {bfn_worker: 1}: a custom resource that
    # only the training nodes offer keeps workers off the head node
    resources: dict | None = _key(resumable=True, default=None)
    # elastic runs (num_workers [min, max]): seconds between Ray Train's checks for room to grow
    resize_check_s: float | None = _key(resumable=True, default=None)

    def validate(self, config: Config) -> None:
        if self.elastic:
            low, high = self.num_workers
            for key, value in (("trainer.num_workers[0]", low), ("trainer.num_workers[1]", high)):
                _number(key, value, low=1, integer=True)
            if low > high:
                _fail("trainer.num_workers", "is a range [min, max]: min must not exceed max", self.num_workers)
        elif isinstance(self.num_workers, list | tuple):
            _fail("trainer.num_workers", "must be a number of workers or a range [min, max]", self.num_workers)
        else:
            _number("trainer.num_workers", self.num_workers, low=1, integer=True)
        if self.resources is not None:
            if not isinstance(self.resources, dict) or not all(isinstance(k, str) for k in self.resources):
                _fail("trainer.resources", "must map resource names to amounts", self.resources)
            for name, amount in self.resources.items():
                if name in ("CPU", "GPU"):
                    _fail(f"trainer.resources.{name}", "is set by trainer.cpus_per_worker / use_gpu", amount)
                _number(f"trainer.resources.{name}", amount, low=0, low_open=True)
        if self.resize_check_s is not None:  # null: Ray's default (60 s)
            if not self.elastic:
                _fail(
                    "trainer.resize_check_s",
                    f"is not used with trainer.num_workers={self.num_workers} (a fixed number of workers never "
                    "resizes); leave it null",
                    self.resize_check_s,
                )
            _number("trainer.resize_check_s", self.resize_check_s, low=0, low_open=True)
        _number("trainer.cpus_per_worker", self.cpus_per_worker, low=0, low_open=True)
        for key in ("max_steps", "log_every", "val_every", "checkpoint_every", "num_to_keep", "max_bad_steps"):
            _number(f"trainer.{key}", getattr(self, key), low=1, integer=True)
        _number("trainer.max_failures", self.max_failures, low=-1, integer=True)
        _number("trainer.max_minutes", self.max_minutes, low=0)
        _number("trainer.seed", self.seed, low=0, integer=True)
        for key in ("use_gpu", "amp", "compile"):
            _flag(f"trainer.{key}", getattr(self, key))
        if self.amp and not self.use_gpu:
            _fail(
                "trainer.amp", "bf16 autocast runs on GPUs only and trainer.use_gpu is false; set it to false", self.amp
            )

    @property
    def elastic(self) -> bool:
        """A range [min, max] of workers: Ray Train's elastic ScalingConfig, resized as nodes come and go."""
        return isinstance(self.num_workers, list | tuple) and len(self.num_workers) == 2

    @property
    def min_workers(self) -> int:
        return int(self.num_workers[0]) if self.elastic else int(self.num_workers)

    @property
    def max_workers(self) -> int:
        return int(self.num_workers[1]) if self.elastic else int(self.num_workers)


@dataclass(frozen=True)
class RunConfig:
    RESUMABLE: ClassVar[bool] = True

    name: str
    storage_path: str
    ray_address: str | None  # null: an embedded local Ray sized by ray_num_cpus
    ray_num_cpus: int | None
    init_from: str | None = None  # a checkpoint whose weights start a new run
    shared_storage: bool = False  # a local storage_path that every node of a cluster mounts (NFS)

    def validate(self, config: Config) -> None:
        # a name is one folder below run.storage_path: never "." / ".." / hidden, at most 128 characters
        if not isinstance(self.name, str) or not RUN_NAME.fullmatch(self.name):
            _fail(
                "run.name",
                "must start with a letter or digit, then letters, digits, '-', '_' or '.' (at most 128 characters)",
                self.name,
            )
        _uri("run.storage_path", self.storage_path)
        if self.ray_address is not None:
            _text("run.ray_address", self.ray_address)
        if self.ray_num_cpus is not None:
            _number("run.ray_num_cpus", self.ray_num_cpus, low=1, integer=True)
        if self.init_from is not None:
            _uri("run.init_from", self.init_from)
        _flag("run.shared_storage", self.shared_storage)


@dataclass(frozen=True)
class TrackingConfig:
    RESUMABLE: ClassVar[bool] = True

    enabled: bool
    uri: str | None
    artifact_location: str | None
    experiment: str
    system_metrics: bool = True  # each worker's CPU, memory (and GPU) per rank: system/rank<r>/...

    def validate(self, config: Config) -> None:
        _flag("tracking.enabled", self.enabled)
        _flag("tracking.system_metrics", self.system_metrics)
        _text("tracking.experiment", self.experiment)
        if self.enabled and not self.uri:
            _fail("tracking.uri", "must be set when tracking.enabled is true", self.uri)
        schemes = ("sqlite:///", "http://", "https://", "file:", "databricks", "postgresql")
        if self.enabled and not str(self.uri).startswith(schemes):
            _fail("tracking.uri", f"must start with one of {', '.join(schemes)}", self.uri)


@dataclass(frozen=True)
class EvalConfig:
    RESUMABLE: ClassVar[bool] = True

    unit: str  # benchmark unit of reported NLLs
    nll_steps: int  # n of the n-step NLL (validation and `bfn eval`); 0: continuous time, n = inf
    nll_repeats: int  # `bfn eval`: passes over the test split
    target_se: float | None  # `bfn eval`: repeat until the standard error in `unit` is at most this
    text8_stride: int | None  # text8: validation/test windows start every text8_stride characters
    val_batches: int  # batches per validation (0: the whole split)
    val_repeats: int  # passes over them at each validation
    num_samples: int  # samples rendered at each validation
    sample_steps: int
    quality_samplers: list  # samplers scored at each validation (bfn quality's metrics); [] = off
    quality_nfe: list  # network calls per sample, one quality point per value and sampler
    quality_num: int  # samples per quality point
    quality_cache: str | None  # the quality classifier's cache; null: <paths.runs_dir>/quality/classifiers
    guidance: float | None = None  # conditional models: classifier-free guidance of the validation grid

    def validate(self, config: Config) -> None:
        if _applies(
            "eval.guidance",
            self.guidance,
            config.model.conditional,
            f"model.num_labels={config.model.num_labels}",
            "guidance scale of the per-class validation samples; 0: no guidance",
        ):
            _number("eval.guidance", self.guidance)
        if isinstance(self.quality_samplers, str) or not isinstance(self.quality_samplers, list | tuple):
            _fail("eval.quality_samplers", "must be a list of sampler names", self.quality_samplers)
        if self.quality_samplers:
            parse_samplers(list(self.quality_samplers), "eval.quality_samplers")
        parse_nfe(self.quality_nfe, "eval.quality_nfe")
        check_count("eval.quality_num", self.quality_num, DATASETS[config.data.name].min_quality_samples)
        if self.quality_cache is not None:
            _text("eval.quality_cache", self.quality_cache)
        name, text = config.data.name, DATASETS[config.data.name].network_kind == "text"
        _choice("eval.unit", self.unit, UNITS)
        if (self.unit == "bits/char" and not text) or (self.unit == "nats/image" and text):
            _fail(
                "eval.unit",
                f"does not fit data.name={name} (bits/char is for text, nats/image for images; "
                f"eval={name} sets the reference's)",
                self.unit,
            )
        _number("eval.nll_steps", self.nll_steps, low=0, integer=True)
        if self.target_se is not None:
            _number("eval.target_se", self.target_se, low=0, low_open=True)
        if _applies(
            "eval.text8_stride",
            self.text8_stride,
            name == "text8",
            f"data.name={name}",
            "window stride of text8's evaluation; eval=text8 sets 1, every offset",
        ):
            _number("eval.text8_stride", self.text8_stride, low=1, integer=True)
        for key in ("val_batches", "num_samples"):
            _number(f"eval.{key}", getattr(self, key), low=0, integer=True)
        for key in ("nll_repeats", "val_repeats", "sample_steps"):
            _number(f"eval.{key}", getattr(self, key), low=1, integer=True)


# validation order: later sections' checks read the earlier ones (data -> flow -> net ...)
SECTIONS = {
    "trainer": TrainerConfig,
    "paths": PathsConfig,
    "data": DataConfig,
    "flow": FlowConfig,
    "model": ModelConfig,
    "net": NetConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "tracking": TrackingConfig,
    "eval": EvalConfig,
}
# The training driver still hands its runtime values to the workers inside the loop config.


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    data: DataConfig
    flow: FlowConfig
    model: ModelConfig
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
        if not isinstance(config, dict):
            _fail("config", "must be a mapping of sections", type(config).__name__)
        for key in config:
            if key not in SECTIONS:
                _fail(str(key), f"unknown top-level key; the config has {', '.join(SECTIONS)}", config[key])
        sections = {name: _section(name, section_cls, config.get(name)) for name, section_cls in SECTIONS.items()}
        parsed = cls(**sections, raw=config)
        for name in SECTIONS:
            getattr(parsed, name).validate(parsed)
        return parsed

    @property
    def batch_size_per_worker(self) -> int:
        """Each worker's batch at the largest world size: data.batch_size is global, split evenly over the
        workers (an elastic run's workers take data.batch_size // its world size at each launch)."""
        return self.data.batch_size // self.trainer.max_workers


def _section(name: str, section_cls: type, values: Any):
    if values is None and getattr(section_cls, "OPTIONAL", False):
        values = {}
    if not isinstance(values, dict):
        _fail(name, "section is missing", values)
    known = {f.name: f for f in fields(section_cls)}
    for key in values:
        if key not in known:
            _fail(f"{name}.{key}", f"unknown key; {name} takes {', '.join(known)}", values[key])
    for key, spec in known.items():
        if key not in values and spec.default is MISSING:
            _fail(f"{name}.{key}", "is missing", None)
    return section_cls(**values)


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


def keys_marked(flag: str) -> tuple[str, ...]:
    """Dotted keys whose schema field carries ``flag`` ("resumable" or "weights"; ``_key``), or whose
    section is marked as a whole (``RESUMABLE`` / ``WEIGHTS``)."""
    keys = []
    for name, section in SECTIONS.items():
        if getattr(section, flag.upper(), False):
            keys.append(name)  # the whole section, keys of older configs included
        else:
            keys.extend(f"{name}.{f.name}" for f in fields(section) if f.metadata.get(flag))
    return tuple(keys)


def is_under(key: str, keys: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is one of ``keys`` or inside one (``net.kwargs.width`` is under ``net.kwargs``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


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

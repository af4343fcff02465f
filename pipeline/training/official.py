"""Import a checkpoint of the official BFN code as a project checkpoint folder.

``import_official(checkpoint, official_yaml, out_dir)`` reads an official checkpoint (e.g. the
released ``mnist_ema.pt``: the whole BFN module's state dict, network keys prefixed ``net.``)
weights-only, reads the official YAML config it was trained with, converts both (the network and
its weights with ``bfn.networks.official``; the data, flow, head and optimiser settings onto this
project's config keys and presets with ``config_overrides`` here) and writes a checkpoint folder
with ``pipeline.core.checkpointing.save``: the weights go to both the model and the EMA, the
optimiser state is fresh (AdamW from the config), and config.json is a full project config
composed from the Hydra tree, so ``bfn eval`` / ``bfn sample`` (and ``bfn train`` resuming from it)
accept the folder.

Errors: a file that is not a weights-only tensor file (a pickle with code, a corrupt file) or
whose weights do not fit the config is a ``CheckpointError`` naming the file (and the key); a
YAML or config problem a ``ConfigError`` naming the file and the config key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from bfn import EMA
from bfn.networks import NETWORKS, official
from bfn.networks.official import OfficialConfigError, boolean, component, integer, number
from pipeline.config import DATASETS, Config, ConfigError, compose
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer

__all__ = [
    "PRESET_OF_CLASS",
    "config_overrides",
    "experiment_for",
    "hydra_overrides",
    "import_official",
    "project_config",
]

# the network preset (conf/net) of each official class's paper size, a label for net.name
PRESET_OF_CLASS = {"GPT": "text8_transformer", "UNetModel": "mnist_unet", "UNetVDM": "cifar_unet_vdm"}
# the official data.dataset names -> this project's data.name
OFFICIAL_DATASETS = {"bin_mnist": "mnist", "cifar10": "cifar10", "text8": "text8"}
FLOW_PARAMETERS = "model.bayesian_flow.parameters"  # where the official flow's settings sit


def config_overrides(config: Mapping) -> dict[str, Any]:
    """Project config overrides (dotted keys of pipeline/conf) equivalent to an official config:
    data, flow and output head, network, and the optimiser/EMA settings that exist in both.

    Needs the whole official config (``data`` and ``model`` sections; ``optimizer`` and
    ``training`` are used when present). Problems raise ``OfficialConfigError`` naming the official key.
    """
    if not isinstance(config, Mapping) or "data" not in config or "model" not in config:
        raise OfficialConfigError("config: need the whole official config (its data and model sections)")
    model = official.model_section(config)
    data = config["data"] or {}
    dataset = data.get("dataset")
    if dataset not in OFFICIAL_DATASETS:
        raise OfficialConfigError(
            f"data.dataset={dataset!r}: the project has {', '.join(sorted(OFFICIAL_DATASETS))} only"
        )
    name = OFFICIAL_DATASETS[dataset]
    out: dict[str, Any] = {"data.name": name}
    out.update(_flow_overrides(model, data))
    out.update(_network_overrides(config, data, out))
    out.update(_optimizer_overrides(config))
    return out


def _network_overrides(config: Mapping, data: Mapping, flow: dict[str, Any]) -> dict[str, Any]:
    """net.* (and text8's data.seq_len) of the official network, checked against the data and the flow
    overrides ``flow`` already made (its data.name, flow.num_classes, flow.head)."""
    arch, kwargs = official.network_spec(config)
    spec_cls = official.model_section(config)["net"]["class_name"]  # validated by network_spec
    name, dataset = flow["data.name"], data.get("dataset")
    if (spec_cls == "GPT") != (name == "text8"):
        raise OfficialConfigError(f"model.net.class_name={spec_cls}: does not fit data.dataset={dataset}")
    out: dict[str, Any] = {}
    if name == "text8":
        out["data.seq_len"] = _text8_seq_len(data, kwargs, flow["flow.num_classes"])
    else:
        _check_images(kwargs, name, dataset, flow)
    out.update(
        {
            "net.name": PRESET_OF_CLASS[spec_cls],
            "net.arch": arch,
            "net.kwargs": {k: v for k, v in kwargs.items() if k not in NETWORKS[arch].data_keys},
        }
    )
    return out


def _text8_seq_len(data: Mapping, kwargs: dict, num_classes: int) -> int:
    """data.seq_len of a text8 config: at most the transformer's, whose vocabulary is the flow's classes."""
    seq_len = integer("data.seq_len", data.get("seq_len", kwargs["seq_len"]), 1)
    if seq_len > kwargs["seq_len"]:
        raise OfficialConfigError(f"data.seq_len={seq_len} exceeds the net's seq_len={kwargs['seq_len']}")
    if kwargs["num_classes"] != num_classes:
        raise OfficialConfigError(
            f"model.input_adapter.parameters.vocab_size={kwargs['num_classes']} must equal"
            f" model.bayesian_flow.parameters.n_classes={num_classes}"
        )
    return seq_len


def _check_images(kwargs: dict, name: str, dataset: str, flow: dict[str, Any]) -> None:
    """An image network's input shape fits the dataset and its output height fits the flow's head."""
    shape = (kwargs["image_size"], kwargs["image_size"], kwargs["in_channels"])
    if shape != DATASETS[name].shape:
        raise OfficialConfigError(
            f"model.input_adapter: images of shape {list(shape)} do not fit data.dataset="
            f"{dataset} ({list(DATASETS[name].shape)})"
        )
    expected_height = {"bernoulli": 1, "delta": 1, "discretized_normal": 2}.get(flow["flow.head"])
    if flow["flow.head"] == "categorical":
        expected_height = flow["flow.num_classes"]
    if kwargs["out_height"] != expected_height:
        raise OfficialConfigError(
            f"model.output_adapter.parameters.output_height={kwargs['out_height']}: the"
            f" {flow['flow.head']} output needs {expected_height}"
        )


def _flow_overrides(model: Mapping, data: Mapping) -> dict[str, Any]:
    """flow.* and data.num_bins of the official flow, loss and distribution factory."""
    flow_name, flow = component(model, "bayesian_flow", ("CtsBayesianFlow", "DiscreteBayesianFlow"))
    loss_name, loss = component(model, "loss", ("CtsBayesianFlowLoss", "DiscreteBayesianFlowLoss"))
    head_name, head = component(
        model,
        "distribution_factory",
        ("BernoulliFactory", "CategoricalFactory", "DeltaFactory", "DiscretizedNormalFactory"),
    )
    if flow_name == "DiscreteBayesianFlow":
        return _discrete_flow_overrides(flow, loss_name, head_name)
    if loss_name != "CtsBayesianFlowLoss" or head_name not in ("DeltaFactory", "DiscretizedNormalFactory"):
        raise OfficialConfigError(
            "model.loss / model.distribution_factory: a CtsBayesianFlow needs CtsBayesianFlowLoss"
            " with a Delta or DiscretizedNormal factory"
        )
    min_variance = float(number(f"{FLOW_PARAMETERS}.min_variance", flow["min_variance"]))
    if not 0 < min_variance < 1:
        raise OfficialConfigError(f"{FLOW_PARAMETERS}.min_variance={min_variance}: must lie in (0, 1)")
    data_bins = integer("data.num_bins", data.get("num_bins", 256), 2)
    noise_prediction = boolean("model.loss.parameters.noise_pred", loss["noise_pred"])
    out = {
        "flow.kind": "continuous",
        "flow.num_classes": None,
        "flow.beta_1": None,
        "flow.receiver": None,
        "flow.sigma_1": math.sqrt(min_variance),
        "data.num_bins": data_bins,
        "flow.noise_prediction": noise_prediction,
    }
    out.update(_continuous_head_overrides(head_name, head, min_variance, data_bins))
    return out


def _discrete_flow_overrides(flow: Mapping, loss_name: str, head_name: str) -> dict[str, Any]:
    """flow.* of an official DiscreteBayesianFlow with its loss and Bernoulli or categorical head."""
    if loss_name != "DiscreteBayesianFlowLoss" or head_name not in ("BernoulliFactory", "CategoricalFactory"):
        raise OfficialConfigError(
            "model.loss / model.distribution_factory: a DiscreteBayesianFlow needs"
            " DiscreteBayesianFlowLoss with a Bernoulli or Categorical factory"
        )
    k = integer(f"{FLOW_PARAMETERS}.n_classes", flow["n_classes"], 2)
    sqrt_beta = float(number(f"{FLOW_PARAMETERS}.max_sqrt_beta", flow["max_sqrt_beta"]))
    if head_name == "BernoulliFactory" and k != 2:
        raise OfficialConfigError(f"model.distribution_factory: Bernoulli needs n_classes=2, got {k}")
    return {
        "flow.kind": "discrete",
        "flow.num_classes": k,
        "flow.beta_1": sqrt_beta**2,
        "flow.receiver": "reference",
        "flow.num_mc_samples": 10,
        "flow.sigma_1": None,
        "flow.noise_prediction": None,
        "flow.reconstruction_std_scale": None,
        "data.num_bins": None,
        "flow.head": "bernoulli" if head_name == "BernoulliFactory" else "categorical",
    }


def _continuous_head_overrides(head_name: str, head: Mapping, min_variance: float, data_bins: int) -> dict[str, Any]:
    """flow.head and its settings for a continuous flow: a discretised normal on the data's bins, or a
    point estimate (delta) with the official reconstruction term."""
    if head_name == "DiscretizedNormalFactory":
        bins = integer("model.distribution_factory.parameters.num_bins", head["num_bins"], 2)
        if bins != data_bins:  # the project's head and reconstruction use the data's bins
            raise OfficialConfigError(
                f"model.distribution_factory.parameters.num_bins={bins}: the project "
                f"needs it equal to data.num_bins={data_bins}"
            )
        return {"flow.head": "discretized_normal", "flow.num_mc_samples": 10, "flow.reconstruction_std_scale": None}
    # the official reconstruction term of a point estimate: N(x_hat, sigma_1) on 256 bins,
    # or on 16 bins with 0.7 sigma_1 when min_variance == 1e-3 (hard-coded there)
    sixteen = min_variance == 1e-3
    if (16 if sixteen else 256) != data_bins:
        raise OfficialConfigError(
            f"data.num_bins={data_bins}: the official delta reconstruction "
            f"uses {16 if sixteen else 256} bins here; the project needs them "
            "equal"
        )
    return {"flow.head": "delta", "flow.num_mc_samples": None, "flow.reconstruction_std_scale": 0.7 if sixteen else 1.0}


def _optimizer_overrides(config: Mapping) -> dict[str, Any]:
    """optim.* and trainer.seed of the official optimizer and training sections."""
    out: dict[str, Any] = {}
    optimizer = config.get("optimizer") or {}
    for key in optimizer:
        if key not in ("lr", "betas", "eps", "weight_decay"):
            raise OfficialConfigError(f"optimizer.{key}: not an AdamW setting the project has")
    if "lr" in optimizer:
        out["optim.lr"] = float(number("optimizer.lr", optimizer["lr"]))
    if "betas" in optimizer:
        betas = optimizer["betas"]
        if not isinstance(betas, list | tuple) or len(betas) != 2:
            raise OfficialConfigError(f"optimizer.betas: expected two numbers, got {betas!r}")
        out["optim.betas"] = [float(number("optimizer.betas", b)) for b in betas]
    out["optim.eps"] = float(number("optimizer.eps", optimizer.get("eps", 1e-8)))
    # torch's AdamW default when the config has none (the official MNIST config)
    out["optim.weight_decay"] = float(number("optimizer.weight_decay", optimizer.get("weight_decay", 0.01)))
    training = config.get("training") or {}
    if "grad_clip_norm" in training:
        clip = float(number("training.grad_clip_norm", training["grad_clip_norm"]))
        out["optim.grad_clip"] = max(clip, 0.0)
    if "ema_decay" in training:
        decay = float(number("training.ema_decay", training["ema_decay"]))
        if 0 < decay < 1:
            out["optim.ema_decay"] = decay
    if "seed" in training:
        out["trainer.seed"] = integer("training.seed", training["seed"], 0)
    return out


def experiment_for(overrides: Mapping[str, Any]) -> str:
    """The project experiment preset closest to the mapped official config (its eval settings and
    units are then the paper's); every mapped key is set explicitly on top of it anyway."""
    name, head = overrides["data.name"], overrides["flow.head"]
    if name == "mnist":
        return "mnist_binary"
    if name == "text8":
        return "text8"
    if head == "delta":
        return "cifar10_continuous_16" if overrides.get("data.num_bins") == 16 else "cifar10_continuous"
    return "cifar10_discretized_16" if overrides.get("data.num_bins") == 16 else "cifar10_discretized_256"


def _hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (the sweeps' own writer); a value it cannot carry is a ConfigError."""
    # tune_spaces imports ray.tune, and the CLI imports this module before ray_env_at_entry
    from tune_spaces.common import hydra_value

    try:
        return hydra_value(value)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def hydra_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """The mapped official config as Hydra overrides (``experiment=...`` first): what
    ``bfn train`` / ``pipeline.config.compose`` take to build the same config."""
    out = [f"experiment={experiment_for(overrides)}", f"net={overrides['net.name']}"]
    for key, value in overrides.items():
        if key == "net.name":  # a group choice, above
            continue
        # net.kwargs replaces the preset's kwargs dict ('++' merges into the existing node)
        out.append(f"{'++' if isinstance(value, Mapping) else ''}{key}={_hydra_value(value)}")
    return out


def project_config(overrides: Mapping[str, Any], extra: Sequence[str] = ()) -> dict:
    """The full project config (plain dict) for the mapped overrides, plus ``extra`` Hydra overrides."""
    config = compose([*hydra_overrides(overrides), *extra])
    for key, value in overrides.items():  # guard against merge semantics: exact values only
        node = config
        for part in key.split("."):
            node = node[part]
        if node != value:
            raise ConfigError(f"{key}: composed to {node!r}, expected {value!r}")
    return config


def _read_official(checkpoint_path: Path, yaml_path: Path) -> tuple[Mapping, dict]:
    """The official state dict (weights-only) and its YAML; errors name the file."""
    state = checkpointing.load_tensors(checkpoint_path)  # weights-only: no pickled code runs
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise checkpointing.CheckpointError(
            f"{checkpoint_path}: expected a state dict of tensors (an official ema.pt), got {type(state).__name__}"
        )
    try:
        return state, yaml.safe_load(yaml_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"official config not found: {yaml_path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{yaml_path}: not readable YAML ({str(error).splitlines()[0]})") from None


def _converted_model(cfg: Config, official_config: dict, state: Mapping, checkpoint_path: Path, yaml_path: Path):
    """The project BFN of ``cfg`` carrying the official weights."""
    try:
        model = build_model(cfg)
    except ValueError as error:  # a network option the project network refuses
        raise ConfigError(f"{yaml_path}: net.kwargs: {error}") from None
    try:
        weights = official.convert_state_dict(official_config, state, model.net)
    except official.OfficialConfigError as error:
        raise ConfigError(f"{yaml_path}: {error}") from None
    except official.OfficialCheckpointError as error:
        raise checkpointing.CheckpointError(f"{checkpoint_path}: {error}") from None
    model.net.load_state_dict(weights)
    return model.eval()


def import_official(
    checkpoint_path: str | Path,
    official_yaml_path: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
) -> Path:
    """Convert an official checkpoint + its YAML config into a project checkpoint folder.

    ``overrides``: further Hydra overrides of the project config (e.g. ``run.name=...``,
    ``data.uri=...``). ``out_dir`` must not exist or be empty. Returns ``out_dir``.
    """
    checkpoint_path, yaml_path, out_dir = Path(checkpoint_path), Path(official_yaml_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise checkpointing.CheckpointError(f"{out_dir} exists and is not an empty folder: not overwritten")
    state, official_config = _read_official(checkpoint_path, yaml_path)
    try:
        mapped = config_overrides(official_config)
    except OfficialConfigError as error:
        raise ConfigError(f"{yaml_path}: {error}") from None
    name = "official-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in yaml_path.stem)
    config = project_config(mapped, [f"run.name={name}", *overrides])
    cfg = Config.from_dict(config)
    model = _converted_model(cfg, official_config, state, checkpoint_path, yaml_path)
    ema = EMA(model, cfg.optim.ema_decay)  # a copy: the official (EMA) weights in both
    train_state = {
        "step": 0,
        "epoch": 0,
        "run_name": cfg.run.name,
        "imported_from": {
            "checkpoint": str(checkpoint_path.resolve()),
            "official_config": str(yaml_path.resolve()),
            "hydra_overrides": hydra_overrides(mapped),
        },
    }
    return checkpointing.save(
        out_dir, model=model, ema=ema, optimizer=build_optimizer(cfg, model), train_state=train_state, config=config
    )

"""Import a checkpoint of the official BFN code as a project checkpoint folder.

``import_official(checkpoint, official_yaml, out_dir)`` reads an official checkpoint (e.g. the
released ``mnist_ema.pt``: the whole BFN module's state dict, network keys prefixed ``net.``)
weights-only, reads the official YAML config it was trained with, converts both
(``bfn.networks.official``) and writes a checkpoint folder with ``pipeline.training.checkpointing.save``:
the weights go to both the model and the EMA, the optimiser state is fresh (AdamW from the
config), and config.json is a full project config composed from the Hydra tree, so
``bfn eval`` / ``bfn sample`` (and ``bfn train`` resuming from it) accept the folder.

Errors: a file that is not a weights-only tensor file (a pickle with code, a corrupt file) or
whose weights do not fit the config is a ``CheckpointError`` naming the file (and the key); a
YAML or config problem a ``ConfigError`` naming the file and the config key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, compose
from pipeline.training import checkpointing

__all__ = ["experiment_for", "hydra_overrides", "import_official", "project_config"]


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
    import torch
    import yaml

    state = checkpointing.load_tensors(checkpoint_path)  # weights-only: no pickled code runs
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise checkpointing.CheckpointError(
            f"{checkpoint_path}: expected a state dict of tensors (an official ema.pt), got"
            f" {type(state).__name__}"
        )
    try:
        return state, yaml.safe_load(yaml_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"official config not found: {yaml_path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{yaml_path}: not readable YAML ({str(error).splitlines()[0]})") from None


def _converted_model(cfg: Config, official_config: dict, state: Mapping, checkpoint_path: Path, yaml_path: Path):
    """The project BFN of ``cfg`` carrying the official weights."""
    from bfn.networks import official
    from pipeline.training.build import build_model

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
    from bfn import EMA
    from bfn.networks import official
    from pipeline.training.build import build_optimizer

    checkpoint_path, yaml_path, out_dir = Path(checkpoint_path), Path(official_yaml_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise checkpointing.CheckpointError(f"{out_dir} exists and is not an empty folder: not overwritten")
    state, official_config = _read_official(checkpoint_path, yaml_path)
    try:
        mapped = official.config_overrides(official_config)
    except official.OfficialConfigError as error:
        raise ConfigError(f"{yaml_path}: {error}") from None
    name = "official-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in yaml_path.stem)
    config = project_config(mapped, [f"run.name={name}", *overrides])
    cfg = Config.from_dict(config)
    model = _converted_model(cfg, official_config, state, checkpoint_path, yaml_path)
    ema = EMA(model, cfg.optim.ema_decay)  # a copy: the official (EMA) weights in both
    train_state = {
        "step": 0, "epoch": 0, "run_name": cfg.run.name,
        "imported_from": {"checkpoint": str(checkpoint_path.resolve()), "official_config": str(yaml_path.resolve()),
                          "hydra_overrides": hydra_overrides(mapped)},
    }  # fmt: skip
    return checkpointing.save(out_dir, model=model, ema=ema, optimizer=build_optimizer(cfg, model),
                              train_state=train_state, config=config)  # fmt: skip

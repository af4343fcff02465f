"""Export the best trial of a sweep as an override-only experiment preset.

``export_preset`` writes ``best_<sweep>.yaml`` into ``<export_dir>/experiment/`` (by default
``<runs_dir>/presets``: never the package tree), used with ``hydra.searchpath=[file://<export_dir>]``: group
overrides where the trial's choice differs from train.yaml's defaults, then every value that
differs from that group composition, machine keys (paths, tracking, storage) aside. Composing the
preset must reproduce the trial's experiment, or nothing is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from pipeline.config import CONF_DIR, ConfigError, compose, flatten

# sections that describe the machine, not the experiment: never written into an exported preset
MACHINE_KEYS = (
    "paths.",
    "tracking.",
    "run.storage_path",
    "run.ray_address",
    "run.ray_num_cpus",
    "run.init_from",
    "data.uri",
    "run.name",
)
# absolute paths of the driver, pinned in every trial's overrides (trials run in their own folders)
PINNED_PATH_KEYS = (
    "paths.root",
    "paths.data_dir",
    "paths.runs_dir",
    "data.uri",
    "run.storage_path",
    "tracking.uri",
    "tracking.artifact_location",
)


def _choices(overrides: list[str]) -> dict[str, str]:
    """Hydra's group choices (data, net, ...) of a composition."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    return {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}


def _unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _experiment_keys(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not k.startswith(MACHINE_KEYS)}


def preset_yaml(overrides: list[str], preset_name: str, *, searchpath: list[str] = ()) -> str:
    """An override-only experiment preset reproducing the config composed from ``overrides``
    (machine keys aside): group overrides where the choice differs from train.yaml's defaults,
    then every value that differs from that group composition."""
    groups = ("data", "flow", "net", "optim", "trainer", "eval")
    target = _choices(overrides)
    default = _choices(list(searchpath))
    changed = {g: target[g] for g in groups if target.get(g) != default.get(g)}
    base = flatten(compose([*searchpath, *(f"{g}={c}" for g, c in changed.items())]))
    best = flatten(compose(overrides))
    diff = {
        k: v
        for k, v in _experiment_keys(best).items()
        if base.get(k, object()) != v and not (isinstance(v, dict) and not v)
    }
    body = {"defaults": [{f"override /{g}": c} for g, c in changed.items()]} if changed else {}
    body.update(_unflatten({**diff, "run.name": preset_name}))
    header = (
        f"# @package _global_\n# Best trial of a `bfn tune` sweep.\n"
        f"# Composed from: {' '.join(o for o in overrides if not o.startswith(PINNED_PATH_KEYS))}\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def export_preset(
    overrides: list[str], sweep_name: str, export_dir: str, *, user_overrides: list[str] = ()
) -> tuple[str, str]:
    """Write best_<sweep>.yaml and check that composing it reproduces the trial's config.
    Returns (path, the `bfn train` command)."""
    preset_name = "best_" + re.sub(r"[^A-Za-z0-9_]", "_", sweep_name)
    root = Path(export_dir).expanduser().resolve()
    # the user's own search path (a preset the sweep started from) stays, the export folder first
    given = [o.split("=", 1)[1].strip("[]") for o in overrides if o.startswith("hydra.searchpath=")]
    searchpath = [f"hydra.searchpath=[{','.join([f'file://{root}', *filter(None, given)])}]"]
    path = root / "experiment" / f"{preset_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)  # before composing: Hydra checks the searchpath
    text = preset_yaml(overrides, preset_name, searchpath=searchpath)
    previous = path.read_text() if path.exists() else None
    path.write_text(text)
    # round trip: the preset composes to the trial's experiment (machine keys aside)
    machine = [o for o in overrides if o.startswith(PINNED_PATH_KEYS)]
    want = _experiment_keys(flatten(compose(overrides)))
    got = _experiment_keys(flatten(compose([*searchpath, f"experiment={preset_name}", *machine])))
    if want != got:
        if previous is None:
            path.unlink()
        else:
            path.write_text(previous)
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ConfigError(f"export: the preset would not reproduce the best trial ({wrong})")
    keep = [
        o
        for o in user_overrides
        if o.split("=")[0].lstrip("+~") in ("tracking", "paths")
        or o.split("=")[0].lstrip("+~").startswith(MACHINE_KEYS)
    ]
    keep = [o for o in keep if not o.startswith("run.name")]
    command = " ".join(["bfn train", *searchpath, f"experiment={preset_name}", *keep])
    return str(path), command

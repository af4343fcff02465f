"""Fixtures of official BFN networks (tests/data/ref_nets): configs, weights, inputs and outputs.

See tests/data/ref_nets/README.md. ``small_config(name)`` is the official YAML of the paper
config of that network (configs/*.yaml) with the network and adapter parameters replaced by the
small fixture's, so the data/flow/optimiser sections are the paper's.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import torch
import yaml

REF = Path(__file__).resolve().parents[1] / "data" / "ref_nets"
SMALL = ("gpt", "unet", "vdm")
PAPER_YAML = {"gpt": "text8_discrete", "unet": "mnist_discrete", "vdm": "cifar10_discretized_256bins"}
OFFICIAL_YAMLS = tuple(sorted(p.stem for p in (REF / "official_configs").glob("*.yaml")))


def official_yaml(name: str) -> dict:
    """An official config as the official code's YAML file gives it (read with PyYAML)."""
    return yaml.safe_load((REF / "official_configs" / f"{name}.yaml").read_text())


def _call(text: str) -> dict:
    """'OutputAdapter(input_height=64, ...)' -> {"class_name": ..., "parameters": {...}}."""
    node = ast.parse(text, mode="eval").body
    return {"class_name": node.func.id, "parameters": {k.arg: ast.literal_eval(k.value) for k in node.keywords}}


def small_config(name: str) -> dict:
    """Whole official config (data, model, optimizer, training) of the small fixture ``name``."""
    raw = json.loads((REF / f"{name}_small_config.json").read_text())
    config = official_yaml(PAPER_YAML[name])
    model = config["model"]
    cls = raw.pop("net")
    if cls == "GPT":
        seq_len = raw.pop("seq_len")
        model["input_adapter"]["parameters"].update(
            vocab_size=raw["vocab_size"], seq_len=seq_len, output_size=raw["n_embd"]
        )
    else:
        model["input_adapter"] = _call(raw.pop("input_adapter"))
        model["output_adapter"] = _call(raw.pop("output_adapter"))
    model["net"] = {"class_name": cls, "parameters": raw}
    return config


def small_state(name: str, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The fixture's official weights, keys prefixed as in a whole-BFN checkpoint."""
    with np.load(REF / f"{name}_small_state.npz") as arrays:
        return {prefix + key: torch.from_numpy(arrays[key]) for key in arrays.files}


def small_io(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(net_inputs, t broadcast to the data shape, official outputs)."""
    with np.load(REF / f"{name}_small_io.npz") as arrays:
        return tuple(torch.from_numpy(arrays[key]) for key in ("net_inputs", "t", "outputs"))


def paper_keys(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((REF / f"{name}_paper_keys.json").read_text()).items()}


def option_configs() -> dict[str, dict]:
    """Official ``model`` sections with non-default options (make_option_fixtures.py)."""
    return json.loads((REF / "options_configs.json").read_text())


def option_fixture(name: str):
    """(state dict, net_inputs, t, outputs) of options_<name>.npz."""
    with np.load(REF / f"options_{name}.npz") as arrays:
        state = {k[len("state/") :]: torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("state/")}
        io = tuple(torch.from_numpy(arrays[k]) for k in ("net_inputs", "t", "outputs"))
    return (state, *io)


def per_example_time(t: torch.Tensor) -> torch.Tensor:
    """Official t (broadcast to the data shape) -> the project's (B,): one time per example."""
    return t.reshape(t.shape[0], -1)[:, 0]


@torch.no_grad()
def project_output(net: torch.nn.Module, net_inputs: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    """The project network on the official inputs, reshaped like the official output."""
    return net(net_inputs, per_example_time(t)).reshape(like.shape)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out - ref).abs().max() / ref.abs().max()).item()


def edited(config: dict, section: str, **parameters) -> dict:
    """A copy of an official config with ``parameters`` set in ``model.<section>`` (or top-level ``section``)."""
    config = copy.deepcopy(config)
    node = config["model"][section] if section in config["model"] else config[section]
    node.get("parameters", node).update(parameters)
    return config

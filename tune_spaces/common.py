"""Read a search space's domains and apply a sampled point to a config; no checking here.

A *space* is ``{dotted_config_key: tune domain | {"grid_search": [...]} | constant}``, e.g.
``{"optim.lr": tune.loguniform(1e-4, 3e-3), "net.kwargs.model_channels": tune.choice([16, 32])}``.

``support(domain)`` says what an entry can produce, ``corner_samples(space)`` the points worth a
dry run. ``to_overrides(sample)`` turns a sampled flat dict into Hydra overrides (``++key=value``:
sets the key whether or not the composed config has it), so a trial composes and validates its
config exactly the way ``bfn train`` does; ``apply_to_dict`` sets the values on an
already-resolved config dict. Whether a space's keys exist and its values are legal is decided by
the config's own validation, in ``pipeline.sweeps.spaces`` (this package never imports the
pipeline).

Only ``ray.tune`` is imported here: no project code.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import (
    Categorical,
    Domain,
    Float,
    Function,
    Integer,
    LogUniform,
    Normal,
    Quantized,
)


def is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def support(domain: Any) -> dict[str, Any]:
    """What a space entry can produce: {"kind": "range", "low", "high", "log", "integer"} (high
    inclusive), {"kind": "values", "values": [...]}, or {"kind": "opaque"} (sample_from)."""
    if is_grid(domain):
        return {"kind": "values", "values": list(domain["grid_search"])}
    if isinstance(domain, Categorical):
        return {"kind": "values", "values": list(domain.categories)}
    if isinstance(domain, Float | Integer):
        sampler = domain.get_sampler()
        inner = sampler.sampler if isinstance(sampler, Quantized) else sampler
        integer = isinstance(domain, Integer)
        high = domain.upper - 1 if integer else domain.upper  # randint's upper bound is exclusive
        return {
            "kind": "range",
            "low": domain.lower,
            "high": high,
            "integer": integer,
            "log": isinstance(inner, LogUniform),
            "normal": isinstance(inner, Normal),
        }
    if isinstance(domain, Function):
        return {"kind": "opaque"}
    if isinstance(domain, Domain):
        return {"kind": "opaque"}
    return {"kind": "values", "values": [domain]}  # a constant


def representative_values(domain: Any, limit: int = 6) -> list[Any]:
    """Values worth a dry run: every choice (up to ``limit``), or both ends of a range."""
    info = support(domain)
    if info["kind"] == "values":
        return info["values"][:limit]
    if info["kind"] == "range" and not info.get("normal"):
        low, high = info["low"], info["high"]
        return [int(low), int(high)] if info["integer"] else [float(low), float(high)]
    return []


def corner_samples(space: Mapping[str, Any], max_samples: int = 48) -> list[dict[str, Any]]:
    """Points of the space to dry-run before any trial: the full product of the representative
    values when small enough, otherwise each key's values one at a time on the first corner."""
    keys = [k for k in space if representative_values(space[k])]
    values = [representative_values(space[k]) for k in keys]
    if not keys:
        return []
    total = math.prod(len(v) for v in values)
    if total <= max_samples:
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    base = {k: v[0] for k, v in zip(keys, values, strict=True)}
    out = [base]
    for key, vals in zip(keys, values, strict=True):
        out += [{**base, key: v} for v in vals[1:]]
    return out


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./:]*$")
_RESERVED = {"true", "false", "null", "nan", "inf", "none", "yes", "no", "on", "off"}


def hydra_value(value: Any) -> str:
    """A Python value as Hydra override syntax (numbers, bools, null, strings, lists, dicts)."""
    if hasattr(value, "item") and not isinstance(value, list | tuple | dict | str):
        value = value.item()  # numpy scalars
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot pass the non-finite value {value!r} as an override")
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot pass {type(value).__name__} {value!r} as a Hydra override")


def to_overrides(sample: Mapping[str, Any]) -> list[str]:
    """{"optim.lr": 0.001, "net.kwargs.model_channels": 32} ->
    ["++optim.lr=0.001", "++net.kwargs.model_channels=32"] (``++``: add or override).
    ``net.name`` picks a network preset, a Hydra group: ``net=<preset>``, ahead of the kwargs."""
    group = [f"net={sample['net.name']}"] if "net.name" in sample else []
    return group + [f"++{key}={hydra_value(value)}" for key, value in sample.items() if key != "net.name"]


def apply_to_dict(sample: Mapping[str, Any], config: Mapping) -> dict:
    """A deep copy of the resolved ``config`` with the dotted keys of ``sample`` set."""
    out = copy.deepcopy(dict(config))
    for key, value in sample.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def describe(domain: Any) -> str:
    """Short text of a space entry, for logs and MLflow params."""
    info = support(domain)
    if info["kind"] == "values":
        return ("grid" if is_grid(domain) else "choice") + str(info["values"])
    if info["kind"] == "range":
        kind = (
            "lograndint"
            if info["integer"] and info["log"]
            else ("randint" if info["integer"] else ("loguniform" if info["log"] else "uniform"))
        )
        return f"{kind}[{info['low']}, {info['high']}]"
    return type(domain).__name__


def is_log_scale(domain: Any) -> bool:
    info = support(domain)
    return info["kind"] == "range" and bool(info.get("log"))

"""Validate a search space against a composed config, and apply a sampled point to a config.

A *space* is ``{dotted_config_key: tune domain | {"grid_search": [...]} | constant}``, e.g.
``{"optim.lr": tune.loguniform(1e-4, 3e-3), "net.kwargs.model_channels": tune.choice([16, 32])}``.

``check_space(space, config)`` raises ``ValueError`` before any trial starts when a key is not in
the composed config (``net.kwargs.<arg>`` keys, absent from a composed config whose ``kwargs`` is
``{}``, are accepted through ``extra_keys``), when a range is empty (low >= high, an empty choice
or grid list) or when a value can leave the key's legal range (sigma_1 in (0, 1), beta_1 > 0,
0 < lr <= 1, ...). ``to_overrides(sample)`` turns a sampled flat dict into Hydra overrides
(``++key=value``: sets the key whether or not the composed config has it), so a trial composes
and validates its config exactly the way ``bfn train`` does; ``apply_to_dict`` sets the values on
an already-resolved config dict (used for quick checks of a space's corners).

Only ``ray.tune`` is imported here: no project code.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Iterable, Mapping
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

# (low, high, low_open, high_open); None = unbounded. A value outside makes the space invalid.
# Keys ending in one of SUFFIX_RANGES get that range when not listed here.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "flow.beta_1": (0.0, None, True, False),
    "flow.sigma_1": (0.0, 1.0, True, True),
    "optim.lr": (0.0, 1.0, True, False),
    "optim.ema_decay": (0.0, 1.0, False, True),
    "optim.warmup_steps": (0.0, None, False, False),
    "optim.weight_decay": (0.0, None, False, False),
    "optim.grad_clip": (0.0, None, False, False),
    "optim.eps": (0.0, None, True, False),
    "data.fraction": (0.0, 1.0, True, False),
    "data.batch_size": (1.0, None, False, False),
    "trainer.max_steps": (1.0, None, False, False),
    "net.kwargs.model_channels": (1.0, None, False, False),
    "net.kwargs.embedding_dim": (2.0, None, False, False),
    "net.kwargs.n_embd": (1.0, None, False, False),
    "net.kwargs.num_res_blocks": (1.0, None, False, False),
    "net.kwargs.n_blocks": (0.0, None, False, False),
    "net.kwargs.n_layer": (1.0, None, False, False),
}
SUFFIX_RANGES = {".dropout": (0.0, 1.0, False, True)}


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (an empty dict stays a leaf, as in pipeline.config)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def _range_for(key: str) -> tuple[float | None, float | None, bool, bool] | None:
    if key in RANGES:
        return RANGES[key]
    for suffix, bounds in SUFFIX_RANGES.items():
        if key.endswith(suffix):
            return bounds
    return None


def _describe_bounds(bounds) -> str:
    low, high, low_open, high_open = bounds
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _in_range(value: Any, bounds) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not math.isfinite(value):
        return False
    low, high, low_open, high_open = bounds
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


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
        return {"kind": "range", "low": domain.lower, "high": high, "integer": integer,
                "log": isinstance(inner, LogUniform), "normal": isinstance(inner, Normal)}  # fmt: skip
    if isinstance(domain, Function):
        return {"kind": "opaque"}
    if isinstance(domain, Domain):
        return {"kind": "opaque"}
    return {"kind": "values", "values": [domain]}  # a constant


def check_space(space: Mapping[str, Any], config: Mapping, *, extra_keys: Iterable[str] = (),
                allowed_values: Mapping[str, Iterable] | None = None) -> None:  # fmt: skip
    """Raise ValueError (naming every bad key) unless ``space`` can only produce legal values for
    keys of the composed ``config``.

    ``extra_keys``: dotted keys that are legal although absent from ``config`` (the caller knows
    them, e.g. ``net.kwargs.<constructor argument>`` from bfn.networks). ``allowed_values``:
    {key: the values a categorical entry may take}, e.g. {"net.name": presets of one kind}.
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError("the search space is empty: it must map dotted config keys to domains")
    flat = flatten(config)
    known = set(flat) | set(extra_keys)
    allowed = {k: list(v) for k, v in (allowed_values or {}).items()}
    problems: list[str] = []
    for key, domain in space.items():
        if not isinstance(key, str) or not key:
            problems.append(f"{key!r}: keys must be dotted config paths")
            continue
        if key not in known:
            near = sorted(k for k in known if k.split(".")[0] == key.split(".")[0])[:8]
            problems.append(f"{key}: unknown key (not in the composed config"
                            + (f"; {key.split('.')[0]} has {', '.join(near)}" if near else "") + ")")
            continue
        if isinstance(flat.get(key), Mapping) and flat[key]:
            problems.append(f"{key}: is a config section, not a value")
            continue
        info = support(domain)
        bounds = _range_for(key)
        if info["kind"] == "opaque":
            continue
        if info["kind"] == "values":
            values = info["values"]
            if not values:
                problems.append(f"{key}: empty {'grid' if is_grid(domain) else 'choice'} list")
                continue
            for value in values:
                if isinstance(value, Domain) or is_grid(value):
                    problems.append(f"{key}: nested domains are not supported")
                elif bounds and not _in_range(value, bounds):
                    problems.append(f"{key}: value {value!r} is outside {_describe_bounds(bounds)}")
                elif key in allowed and value not in allowed[key]:
                    problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, allowed[key]))}")
            continue
        low, high = info["low"], info["high"]
        if info.get("normal"):
            continue  # unbounded; nothing to check beyond the key
        if not (isinstance(low, int | float) and isinstance(high, int | float)) or not (low < high):
            problems.append(f"{key}: empty range (low={low!r} >= high={high!r})")
            continue
        if bounds and not (_in_range(low, bounds) and _in_range(high, bounds)):
            problems.append(f"{key}: range [{low}, {high}] leaves {_describe_bounds(bounds)}")
    if problems:
        raise ValueError("invalid search space: " + "; ".join(problems))


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
    ["++optim.lr=0.001", "++net.kwargs.model_channels=32"] (``++``: add or override)."""
    return [f"++{key}={hydra_value(value)}" for key, value in sample.items()]


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
        kind = "lograndint" if info["integer"] and info["log"] else (
            "randint" if info["integer"] else ("loguniform" if info["log"] else "uniform"))
        return f"{kind}[{info['low']}, {info['high']}]"
    return type(domain).__name__


def is_log_scale(domain: Any) -> bool:
    info = support(domain)
    return info["kind"] == "range" and bool(info.get("log"))

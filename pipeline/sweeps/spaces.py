"""Checks of a search space against the config it searches, before any trial starts.

Two layers, one source of truth for legal values:

* ``key_problems``: the space's shape. Every key is a value of the composed config (or a
  constructor argument of the networks it can select: ``net.kwargs.<arg>``), ranges are not
  empty, choice lists are not empty and hold no nested domains, ``net.name`` picks a preset of
  the config's network kind.
* ``value_problems``: the values. Each value a key can take (every choice, both ends of a range)
  is set on the base config and validated by the config's own validation
  (``pipeline.config.Config.from_dict``, what ``bfn train`` runs); then the space's corners
  (combinations) are validated together and, when they touch the network, flow or data, built on
  the meta device. No second table of legal ranges: what the config accepts, the space may use.

And ``check_objective``: the metric a search ranks trials by.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ray.tune.search.sample import Domain

from bfn.networks import DATA_KEYS, NETWORKS, constructor_args
from pipeline.config import Config, ConfigError, flatten, net_presets
from pipeline.core.build import build_model
from tune_spaces.common import apply_to_dict, corner_samples, is_grid, representative_values, support

SCHEDULE_KEYS = ("flow.beta_1", "flow.beta_1_times_k", "flow.sigma_1")
NLL_BOUND = re.compile(r"^val/nll_[a-z_]+$")


def net_constraints(cfg: Config, space: Mapping) -> tuple[set[str], dict[str, list[str]]]:
    """(extra keys, allowed values) for ``key_problems``: the constructor arguments of the
    networks the space can select (``net.kwargs.<arg>``, data-dependent ones left out) and the
    presets of the config's network kind (``net.name``)."""
    presets = net_presets()
    archs = [cfg.net.arch]
    if "net.name" in space:
        info = support(space["net.name"])
        if info["kind"] == "values":
            archs = [presets[n]["arch"] for n in info["values"] if n in presets] or archs
    arg_sets = [set(constructor_args(arch)) - DATA_KEYS for arch in archs]
    kind = NETWORKS[cfg.net.arch].kind
    allowed = {"net.name": sorted(n for n, p in presets.items() if NETWORKS[p["arch"]].kind == kind)}
    return {f"net.kwargs.{a}" for a in set.intersection(*arg_sets)}, allowed


def _entry_problems(key: str, domain: Any, allowed: Mapping[str, list]) -> list[str]:
    info = support(domain)
    if info["kind"] == "values":
        if not info["values"]:
            return [f"{key}: empty {'grid' if is_grid(domain) else 'choice'} list"]
        out = []
        for value in info["values"]:
            if isinstance(value, Domain) or is_grid(value):
                out.append(f"{key}: nested domains are not supported")
            elif key in allowed and value not in allowed[key]:
                out.append(f"{key}: {value!r} is not one of {', '.join(map(str, allowed[key]))}")
        return out
    if info["kind"] == "opaque" or info.get("normal"):
        return []  # sample_from / unbounded normal: nothing to check beyond the key
    low, high = info["low"], info["high"]
    if not (isinstance(low, int | float) and isinstance(high, int | float)) or not low < high:
        return [f"{key}: empty range (low={low!r} >= high={high!r})"]
    return []


def key_problems(
    space: Mapping[str, Any],
    config: Mapping,
    *,
    extra_keys: Iterable[str] = (),
    allowed_values: Mapping[str, Iterable] | None = None,
) -> list[str]:
    """What is wrong with the space's keys and domains (empty when nothing), every entry named."""
    if not isinstance(space, Mapping) or not space:
        return ["the search space is empty: it must map dotted config keys to domains"]
    flat = flatten(dict(config))
    known = set(flat) | set(extra_keys)
    allowed = {k: list(v) for k, v in (allowed_values or {}).items()}
    problems: list[str] = []
    for key, domain in space.items():
        if not isinstance(key, str) or not key:
            problems.append(f"{key!r}: keys must be dotted config paths")
        elif key not in known:
            near = sorted(k for k in known if k.split(".")[0] == key.split(".")[0])[:8]
            problems.append(
                f"{key}: unknown key (not in the composed config"
                + (f"; {key.split('.')[0]} has {', '.join(near)}" if near else "")
                + ")"
            )
        elif isinstance(flat.get(key), Mapping) and flat[key]:
            problems.append(f"{key}: is a config section, not a value")
        else:
            problems += _entry_problems(key, domain, allowed)
    return problems


def trial_dict(raw: Mapping, sample: Mapping[str, Any]) -> dict:
    """The config a trial composes (base overrides + ``to_overrides(sample)``), built on the resolved
    base config: ``net.name`` is a Hydra group that brings its architecture and arguments."""
    base = dict(raw)
    if "net.name" in sample:
        base["net"] = dict(net_presets()[sample["net.name"]])
    return apply_to_dict({k: v for k, v in sample.items() if k != "net.name"}, base)


def _validate_point(cfg: Config, sample: Mapping[str, Any], build: bool) -> None:
    """The trial's config for ``sample``, validated as `bfn train` validates; built on the meta
    device when ``build``."""
    candidate = Config.from_dict(trial_dict(cfg.raw, sample))
    if build:
        with torch.device("meta"):
            build_model(candidate)


def value_problems(cfg: Config, space: Mapping[str, Any]) -> list[str]:
    """Each value alone through the config's validation; then the corners, validated and built."""
    problems = []
    for key, domain in space.items():
        for value in representative_values(domain, limit=64):
            try:
                _validate_point(cfg, {key: value}, build=False)
            except (ValueError, TypeError) as error:
                problems.append(f"{key} = {value!r} fails the config's validation ({error})")
    if problems:
        return problems
    builds = any(k.startswith(("net.", "flow.", "data.")) for k in space)
    for sample in corner_samples(space):
        try:
            _validate_point(cfg, sample, build=builds)
        except (ValueError, TypeError, RuntimeError) as error:
            return [f"the point {sample} is invalid: {error}"]
    return []


def check_space(cfg: Config, space: Mapping[str, Any]) -> None:
    """Raise ConfigError naming every problem of ``space`` over the base config ``cfg``."""
    extra, allowed = net_constraints(cfg, space) if isinstance(space, Mapping) and space else (set(), {})
    problems = key_problems(space, cfg.raw, extra_keys=extra, allowed_values=allowed)
    if not problems:
        problems = value_problems(cfg, space)
    if problems:
        raise ConfigError("space: invalid search space: " + "; ".join(problems))


def check_objective(metric: str, space: Mapping[str, Any]) -> None:
    """The metric must be reported; a search over the accuracy schedule must rank by an NLL bound.

    The continuous-time loss L∞ (``val/loss``, ``train/loss``) scales with the schedule itself:
    on an untrained text8 transformer it was 2.63, 10.46 and 39.67 bits for beta_1 = 0.14, 0.56
    and 2.25, while the reconstruction term stayed at 4.77. Ranked by it, a beta_1 or sigma_1
    search just picks the smallest value. The NLL (L∞ or L^n, plus reconstruction) is comparable
    across schedules.
    """
    if not metric.startswith(("val/", "train/")):
        raise ConfigError(f"metric: must be a reported val/... or train/... metric (got {metric!r})")
    searched = [k for k in SCHEDULE_KEYS if k in space]
    if searched and (not NLL_BOUND.match(metric) or metric.endswith("_se")):
        raise ConfigError(
            f"metric: {metric} cannot rank a search over {', '.join(searched)}: the loss grows with the "
            f"accuracy schedule itself (L∞ of an untrained network: 2.6, 10.5, 39.7 bits at beta_1 = "
            f"0.14, 0.56, 2.25), so the search would just pick the smallest value. Use an NLL bound "
            f"(loss + reconstruction), e.g. metric=val/nll_bits_per_dim (the default)"
        )

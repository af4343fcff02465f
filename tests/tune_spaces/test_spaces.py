"""Search spaces (tune_spaces) and their checks (pipeline.sweeps.spaces): keys exist in the presets
they are meant for, every space samples into a config that composes and validates like `bfn train`,
bad spaces fail before any trial with the config's own validation message, a search over the
accuracy schedule refuses a loss that grows with the schedule, and the best-trial preset export
reproduces a config. No Ray runtime: these are fast tests."""

from __future__ import annotations

import ast
import inspect
import random
import re
from pathlib import Path

import pytest
from ray import tune

import tune_spaces
from pipeline.config import Config, ConfigError, compose, flatten, load
from pipeline.sweeps import runner, spaces
from pipeline.sweeps import tune as T
from pipeline.sweeps.export import export_preset
from tune_spaces import MATCHING, SPACES, get_space
from tune_spaces.common import apply_to_dict, hydra_value, support, to_overrides

PKG = Path(tune_spaces.__file__).resolve().parent


@pytest.fixture(scope="module")
def composed():
    """experiment preset -> (resolved dict, typed config); each composition costs ~0.3 s."""
    presets = sorted({p for names in MATCHING.values() for p in names})
    out = {}
    for preset in presets:
        raw = compose([f"experiment={preset}"])
        out[preset] = (raw, Config.from_dict(raw))
    return out


def test_package_imports_only_ray_tune():
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in ("bfn", "pipeline", "torch"), f"{path.name} imports {name}"
                if top == "ray":
                    assert name.startswith("ray.tune") or name == "ray", f"{path.name}: {name}"


def test_every_space_has_matching_presets():
    assert set(MATCHING) == set(SPACES)
    for name, fn in SPACES.items():
        assert callable(fn) and fn(), name
        assert MATCHING[name], name


@pytest.mark.parametrize("name", sorted(SPACES))
def test_space_keys_exist_in_matching_presets(name, composed):
    space = get_space(name)
    for preset in MATCHING[name]:
        raw, cfg = composed[preset]
        flat = flatten(raw)
        extra, _ = spaces.net_constraints(cfg, space)
        for key in space:
            if key.startswith("net.kwargs."):
                assert key in extra, f"{name}: {key} is not a constructor argument for {preset}"
            else:
                assert key in flat, f"{name}: {key} missing from experiment={preset}"
        spaces.check_space(cfg, space)  # every value validates; every corner validates and builds (meta)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_samples_into_a_valid_config(name, composed):
    space = get_space(name)
    preset = MATCHING[name][0]
    raw, _ = composed[preset]
    random.seed(0)
    for _ in range(2):
        sample = {k: (v.sample() if isinstance(v, tune.search.sample.Domain) else v) for k, v in space.items()}
        cfg = load([f"experiment={preset}", *to_overrides(sample)])  # what a trial does
        flat = flatten(cfg.raw)
        for key, value in sample.items():
            assert flat[key] == value, (key, flat[key], value)
        # composing the overrides == setting the values on the composed dict
        assert flatten(cfg.raw) == flatten(spaces.trial_dict(raw, sample))


def test_grid_and_constant_entries_are_checked(composed):
    _, cfg = composed["smoke"]
    spaces.check_space(cfg, {"optim.lr": tune.grid_search([1e-3, 3e-3]), "optim.warmup_steps": 0})
    with pytest.raises(ConfigError, match="empty grid"):
        spaces.check_space(cfg, {"optim.lr": tune.grid_search([])})
    with pytest.raises(ConfigError, match=re.escape("optim.lr = -0.001 fails the config's validation")):
        spaces.check_space(cfg, {"optim.lr": tune.grid_search([1e-3, -1e-3])})


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim.learning_rate": tune.loguniform(1e-4, 1e-2)}, "optim.learning_rate: unknown key"),
        ({"net.kwargs.width": tune.choice([16, 32])}, "net.kwargs.width: unknown key"),
        ({"optim": tune.choice([1])}, "unknown key"),
        ({"optim.lr": tune.uniform(1e-2, 1e-4)}, "optim.lr: empty range"),
        ({"optim.lr": tune.loguniform(1e-3, 1e-3)}, "optim.lr: empty range"),
        ({"optim.warmup_steps": tune.randint(5, 5)}, "optim.warmup_steps: empty range"),
        ({"optim.ema_decay": tune.choice([])}, "optim.ema_decay: empty choice"),
        ({"flow.sigma_1": tune.uniform(-0.1, 0.1)}, "flow.sigma_1 = -0.1 fails"),
        ({"flow.sigma_1": tune.choice([1e-3, -1e-3])}, "flow.sigma_1 = -0.001 fails"),
        ({"flow.sigma_1": tune.uniform(1e-3, 2.0)}, "flow.sigma_1: must be < 1 (got 2.0)"),
        ({"flow.beta_1": tune.uniform(0.0, 9.0)}, "flow.beta_1: must be > 0 (got 0.0)"),
        ({"optim.lr": tune.uniform(-1e-3, 1e-3)}, "optim.lr = -0.001 fails"),
        ({"optim.ema_decay": tune.choice([0.9, 1.0])}, "optim.ema_decay = 1.0 fails"),
        ({"net.kwargs.dropout": tune.uniform(0.0, 1.5)}, "dropout must be a float in [0, 1), got 1.5"),
        ({"net.name": tune.choice(["text8_transformer_tiny"])}, "net.name: 'text8_transformer_tiny'"),
        ({}, "empty"),
    ],
)
def test_bad_spaces_are_rejected(space, message, composed):
    preset = "cifar10_discretized_256" if any("sigma_1" in k for k in space) else "smoke"
    _, cfg = composed[preset]
    with pytest.raises(ConfigError, match=re.escape(message)):
        spaces.check_space(cfg, space)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optim.lr", 2.0),
        ("optim.lr", 0.0),
        ("optim.ema_decay", 0.0),
        ("optim.ema_decay", 1.0),
        ("optim.warmup_steps", -1),
        ("data.fraction", 1.0),
        ("data.fraction", 1.5),
        ("data.batch_size", 7),
        ("trainer.max_steps", 0),
        ("flow.beta_1", 1e-9),
    ],
)
def test_a_space_accepts_exactly_what_the_config_accepts(key, value, composed):
    """One source of truth: a space value is legal iff `bfn train` would accept it in the config."""
    raw, cfg = composed["smoke"]  # 2 workers: an odd batch size is refused by the config
    try:
        Config.from_dict(apply_to_dict({key: value}, raw))
        config_error = None
    except ConfigError as error:
        config_error = str(error)
    if config_error is None:
        spaces.check_space(cfg, {key: tune.choice([value])})
    else:
        with pytest.raises(ConfigError, match=re.escape(config_error)):
            spaces.check_space(cfg, {key: tune.choice([value])})


def test_problems_are_all_named_at_once(composed):
    _, cfg = composed["smoke"]
    with pytest.raises(ConfigError) as info:
        spaces.check_space(cfg, {"optim.nope": tune.choice([1]), "optim.lr": tune.uniform(1.0, 0.1)})
    assert "optim.nope" in str(info.value) and "optim.lr" in str(info.value)
    with pytest.raises(ConfigError) as info:
        spaces.check_space(cfg, {"optim.lr": tune.choice([-1.0]), "optim.ema_decay": tune.choice([1.0])})
    assert "optim.lr = -1.0" in str(info.value) and "optim.ema_decay = 1.0" in str(info.value)


def test_dry_run_catches_points_that_do_not_build(composed):
    """Keys and values fine, but a width the preset's GroupNorm cannot divide."""
    _, cfg = composed["mnist_local"]  # mnist_unet_small: norm_groups 32
    with pytest.raises(ConfigError, match="model_channels"):
        spaces.check_space(cfg, {"net.kwargs.model_channels": tune.choice([32, 48])})


def _no_trials(*_args, **_kwargs):
    raise AssertionError("a trial (or Ray) started for a bad space")


@pytest.mark.parametrize(
    "bad",
    [
        {"optim.nope": tune.loguniform(1e-4, 1e-2)},
        {"optim.lr": tune.uniform(3e-3, 1e-3)},
        {"flow.beta_1": tune.choice([-9.0, 9.0])},
    ],
)
def test_bfn_tune_fails_before_any_trial(bad, monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setitem(SPACES, "bad", lambda: bad)
    monkeypatch.setitem(MATCHING, "bad", ("smoke",))
    monkeypatch.setattr(runner, "start_ray", _no_trials)
    monkeypatch.setattr(runner, "run_tune", _no_trials)
    assert cli.main(["tune", "experiment=smoke", "space=bad", "num_samples=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bfn: error: space: invalid search space") and list(bad)[0] in err


def test_cli_rejects_bad_sweep_options(capsys):
    from pipeline import cli

    for args, key in (
        (["space=nope"], "space: unknown space 'nope'"),
        (["space=lr", "num_samples=0"], "num_samples: must be >= 1"),
        (["space=lr", "scheduler=hyperband"], "scheduler: must be asha or fifo"),
        (["space=lr", "search=grid"], "search: must be random or optuna"),
        (["space=lr", "resume=maybe"], "resume: must be bool"),
        (["space=lr", "metric=loss"], "metric: must be a reported"),
        (["space=lr", "trust_storage=perhaps"], "trust_storage: must be bool"),
        (["space=lr", "num_samples=true"], "num_samples: must be int"),
        (["space=lr", "num_samples=[1,2]"], "num_samples: must be int"),
        (["space=lr", "num_samples"], "override: Error parsing override 'num_samples'"),
        ([], "space: required"),
    ):
        assert cli.main(["tune", "experiment=smoke", *args]) == 2, args
        assert key in capsys.readouterr().err, (args, key)


def test_sweep_options_are_read_with_hydras_grammar():
    """`bfn tune`'s own options and the training overrides go through one parser (Hydra's): typed
    values, quoting, and a sweep option given as a Hydra sweep (a=1,2) stays a training override."""
    from pipeline.sweeps.tune import parse_args

    opts, overrides = parse_args(
        [
            "experiment=smoke",
            "space=lr",
            "num_samples=8",
            "resume=true",
            "driver_cpus=2",
            "export_dir='runs/a b'",
            "optim.lr=0.1",
            "seed=1,2",
        ]
    )
    assert (opts.num_samples, opts.resume, opts.driver_cpus, opts.export_dir) == (8, True, 2.0, "runs/a b")
    assert overrides == ["experiment=smoke", "optim.lr=0.1", "seed=1,2"] and opts.seed == 0


@pytest.mark.parametrize(
    ("args", "searched"),
    [
        (["experiment=smoke", "space=schedule_mnist", "metric=val/loss"], "flow.beta_1"),
        (["experiment=smoke", "space=optim_short+schedule_mnist", "metric=train/loss"], "flow.beta_1"),
        (
            ["experiment=cifar10_discretized_256", "space=schedule_continuous", "metric=val/loss_bits_per_dim"],
            "flow.sigma_1",
        ),
    ],
)
def test_a_schedule_search_refuses_the_loss_as_objective(args, searched, monkeypatch, capsys):
    """L-infinity grows with beta_1 / sigma_1 itself: ranked by it, the search would pick the smallest."""
    from pipeline import cli

    monkeypatch.setattr(runner, "start_ray", _no_trials)
    monkeypatch.setattr(runner, "run_tune", _no_trials)
    assert cli.main(["tune", *args, "num_samples=2"]) == 2
    err = capsys.readouterr().err
    metric = [a for a in args if a.startswith("metric=")][0].split("=")[1]
    assert f"metric: {metric} cannot rank a search over {searched}" in err
    assert "pick the smallest value" in err and "metric=val/nll_bits_per_dim" in err


def test_nll_objectives_pass_the_guard():
    schedule = get_space("schedule_text8")
    spaces.check_objective("val/nll_bits_per_dim", schedule)  # the default, also when eval.nll_steps is 0
    spaces.check_objective("val/nll_bits_per_char", schedule)
    spaces.check_objective("val/loss", get_space("lr"))  # the loss is fine where the schedule is fixed
    assert T.SweepOptions(space="lr").metric == "val/nll_bits_per_dim"
    with pytest.raises(ConfigError, match="cannot rank"):
        spaces.check_objective("val/nll_bits_per_dim_se", schedule)


def test_parse_args_splits_sweep_keys_from_hydra_overrides():
    opts, overrides = T.parse_args(
        [
            "experiment=smoke",
            "space=lr+schedule_mnist",
            "num_samples=3",
            "trainer.max_steps=8",
            "max_concurrent=2",
            "resume=true",
            "driver_cpus=0.5",
            "net=mnist_unet_tiny",
        ]
    )
    assert (opts.space, opts.num_samples, opts.max_concurrent, opts.resume, opts.driver_cpus) == (
        "lr+schedule_mnist",
        3,
        2,
        True,
        0.5,
    )
    assert overrides == ["experiment=smoke", "trainer.max_steps=8", "net=mnist_unet_tiny"]
    assert set(get_space(opts.space)) == {"optim.lr", "flow.beta_1"}


def test_concurrency_from_cluster_resources():
    per = {"CPU": 2.0, "GPU": 0.0}
    assert runner.fitting_trials({"CPU": 4.0}, per, data_cpus=1) == 1
    assert runner.fitting_trials({"CPU": 5.0}, per, data_cpus=1) == 2
    assert runner.fitting_trials({"CPU": 2.0}, per, data_cpus=1) == 0
    assert runner.fitting_trials({"CPU": 4.0}, {"CPU": 1.5, "GPU": 0.0}, data_cpus=1) == 2
    assert runner.fitting_trials({"CPU": 64.0, "GPU": 2.0}, {"CPU": 9.0, "GPU": 1.0}, data_cpus=1) == 2


def test_hydra_values():
    assert hydra_value(1e-5) == "1e-05" and hydra_value(True) == "true" and hydra_value(None) == "null"
    assert hydra_value("mnist_unet_tiny") == "mnist_unet_tiny" and hydra_value("null") == "'null'"
    assert hydra_value([0.9, 0.99]) == "[0.9,0.99]"
    assert hydra_value("it's") == "'it\\'s'"
    with pytest.raises(ValueError):
        hydra_value(float("nan"))


def test_exported_preset_reproduces_the_trial(tmp_path):
    overrides = [
        "experiment=smoke",
        "trainer=cpu_1",
        "trainer.max_steps=8",
        "++optim.lr=0.0031",
        "++net.kwargs.model_channels=32",
        "++net.kwargs.norm_groups=8",
        "++flow.beta_1=4.5",
        "run.name=whatever",
    ]
    path, command = export_preset(overrides, "smoke-lr", str(tmp_path))
    text = Path(path).read_text()
    assert path == str(tmp_path / "experiment" / "best_smoke_lr.yaml")
    assert text.startswith("# @package _global_")
    assert "override /net: mnist_unet_tiny" in text and "override /trainer: cpu_1" in text
    assert "paths" not in text.split("\n", 3)[-1] and "tracking" not in text
    assert command == f"bfn train hydra.searchpath=[file://{tmp_path}] experiment=best_smoke_lr"
    cfg = load([f"hydra.searchpath=[file://{tmp_path}]", "experiment=best_smoke_lr"])
    assert (cfg.optim.lr, cfg.net.kwargs["model_channels"], cfg.flow.beta_1) == (0.0031, 32, 4.5)
    assert (cfg.trainer.num_workers, cfg.trainer.max_steps, cfg.run.name) == (1, 8, "best_smoke_lr")
    assert cfg.data.fraction == 0.02  # from the smoke preset, kept


def test_space_modules_document_their_values():
    from tune_spaces import architecture, schedule

    beta = support(schedule.mnist()["flow.beta_1"])
    assert beta["log"] and beta["low"] < 9.0 < beta["high"]
    beta = support(schedule.text8()["flow.beta_1"])
    assert beta["log"] and beta["low"] < 0.5625 < beta["high"]
    sigma = support(schedule.continuous()["flow.sigma_1"])
    assert sigma["log"] and (sigma["low"], sigma["high"]) == (1e-4, 1e-1)
    for family in architecture.FAMILIES:
        assert architecture.family_of(architecture.FAMILIES[family]["presets"][0]) == family
    assert inspect.getdoc(tune_spaces)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_converts_for_optuna(name):
    """search=optuna: OptunaSearch must understand every domain (Tune converts it this way)."""
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space(get_space(name))
    sampled = {k: v for k, v in get_space(name).items() if isinstance(v, tune.search.sample.Domain)}
    assert len(converted) == len(sampled)

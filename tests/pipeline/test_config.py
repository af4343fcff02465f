"""Every shipped config composes, validates and builds its model; the schema is the one source of
the config's keys (network sizes included); presets match the paper (values: test_presets.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bfn.networks import count_parameters
from pipeline.config import CONF_DIR, SECTIONS, Config, ConfigError, compose, flatten, load, net_presets
from pipeline.core.build import build_model, build_optimizer

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("best_"))
PAPER = {  # preset: (network parameters in millions, data shape)
    "mnist_binary": (24.81, (28, 28, 1)),
    "cifar10_discretized_256": (30.72, (32, 32, 3)),
    "cifar10_discretized_16": (30.72, (32, 32, 3)),
    "cifar10_continuous": (30.72, (32, 32, 3)),
    "cifar10_continuous_16": (30.72, (32, 32, 3)),
    "text8": (170.18, (256,)),
}


def test_all_paper_presets_ship():
    assert set(PAPER) | {"smoke", "mnist_local", "text8_local"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_validates_and_builds(preset):
    cfg = load([f"experiment={preset}"])
    with torch.device("meta"):
        model = build_model(cfg)
    build_optimizer(cfg, model)
    assert model.data_shape == cfg.data.data_shape
    if preset in PAPER:
        millions, shape = PAPER[preset]
        assert abs(count_parameters(model.net) / 1e6 - millions) / millions < 0.01
        assert cfg.data.data_shape == shape


def test_paper_schedules():
    assert load(["experiment=mnist_binary"]).flow.beta_1 == 9.0
    assert load(["experiment=text8"]).flow.beta_1 == 0.5625
    assert load(["experiment=cifar10_discretized_256"]).flow.sigma_1 == pytest.approx(1e-3)
    assert load(["experiment=cifar10_discretized_16"]).flow.sigma_1 ** 2 == pytest.approx(1e-3)
    assert load(["experiment=cifar10_continuous_16"]).flow.sigma_1 ** 2 == pytest.approx(1e-3)


def test_every_yaml_key_is_a_schema_field_and_every_field_is_in_the_yaml():
    """The YAML tree and the dataclasses describe the same keys, for every group option."""
    for group, section_cls in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(section_cls)}
        required = {f.name for f in dataclasses.fields(section_cls) if f.default is dataclasses.MISSING}
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert options, group
        for option in options:
            keys = set(compose([f"{group}={option}"])[group])
            assert required <= keys <= names, (group, option, keys ^ names)


def test_network_sizes_live_in_the_net_group():
    """net=<preset> composes exactly conf/net/<preset>.yaml, and the built network takes exactly
    those constructor arguments (plus the data-dependent ones)."""
    from bfn.networks import NETWORKS

    presets = net_presets()
    assert set(presets) == {p.stem for p in (CONF_DIR / "net").glob("*.yaml")}
    for name, preset in presets.items():
        assert preset["name"] == name
        assert compose([f"net={name}"])["net"] == preset
        assert set(preset["kwargs"]).isdisjoint(NETWORKS[preset["arch"]].data_keys)


def test_a_network_size_override_reaches_the_network():
    with torch.device("meta"):
        net = build_model(load(["experiment=smoke", "net.kwargs.model_channels=24"])).net
    assert (net.model_channels, net.input_proj.out_features) == (24, 24)


def test_paths_are_a_typed_section():
    cfg = load(["experiment=smoke", "paths.runs_dir=rel/runs"])
    assert cfg.paths.runs_dir.endswith("/rel/runs") and cfg.paths.runs_dir.startswith("/")
    assert cfg.paths.data_dir == cfg.raw["paths"]["data_dir"]
    assert cfg.data.uri == f"{cfg.paths.data_dir}/mnist"


def test_global_batch_is_split_over_the_workers():
    cfg = load(["experiment=text8"])
    assert (cfg.trainer.num_workers, cfg.data.batch_size, cfg.batch_size_per_worker) == (8, 3328, 416)
    cfg = load(["experiment=text8", "trainer=gpu_1"])  # the same optimisation on one process
    assert (cfg.trainer.num_workers, cfg.data.batch_size, cfg.batch_size_per_worker) == (1, 3328, 3328)


def test_only_the_sections_are_top_level_keys():
    """Runtime values travel beside the config (the worker gets {"config", "runtime"}), never in it."""
    config = compose(["experiment=smoke"])
    for key in ("_runtime", "hydra"):
        with pytest.raises(ConfigError, match=f"^{key}: unknown top-level key"):
            Config.from_dict({**config, key: {}})


def test_unused_keys_are_null_in_every_preset():
    """The null-for-unused representation holds for what ships: no preset carries a value its
    setup ignores (Config.from_dict would refuse it) and each carries the ones it needs."""
    for preset in PRESETS:
        flat = flatten(compose([f"experiment={preset}"]))
        discrete = flat["flow.kind"] == "discrete"
        beta = flat["flow.beta_1"] if flat["flow.beta_1_times_k"] is None else flat["flow.beta_1_times_k"]
        assert (beta is None) != discrete and (flat["flow.sigma_1"] is None) == discrete, preset
        assert flat["flow.beta_1"] is None or flat["flow.beta_1_times_k"] is None, preset
        assert (flat["data.num_bins"] is None) == (flat["data.name"] != "cifar10"), preset
        assert (flat["data.seq_len"] is None) == (flat["data.name"] not in ("text8", "text_bpe")), preset


def test_small_preset_runs_a_real_step_on_cpu():
    from bfn import EMA
    from pipeline.training.steps import train_step

    cfg = load(["experiment=smoke"])
    model = build_model(cfg)
    optimizer, ema = build_optimizer(cfg, model), EMA(model, 0.9)
    x = torch.randint(0, 2, (4, 28, 28, 1))
    result = train_step(model, model, x, optimizer, ema, grad_clip=5.0, lr=1e-3)
    assert not result.skipped and result.loss > 0


def test_paths_are_absolute_for_ray_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = compose(["data.uri=rel/shards", "run.storage_path=rel/ray"])
    assert raw["data"]["uri"] == str(tmp_path / "rel" / "shards")
    assert raw["run"]["storage_path"] == str(tmp_path / "rel" / "ray")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("experiment=nope", "experiment"),
        ("flow.sigma_1=2.0", "flow.sigma_1"),
        ("flow.beta_1=0", "flow.beta_1"),
        ("data.num_bins=1", "data.num_bins"),
        ("data.batch_size=33", "data.batch_size"),
        ("net.name=nope", "net.name"),
        ("net=text8_transformer_tiny", "net.arch"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("optim.lr=-1", "optim.lr"),
        ("run.storage_path=ftp://x/y", "run.storage_path"),
        ("eval.unit=furlongs", "eval.unit"),
        ("flow.head=delta", "flow.head"),
        ("+data.colour=red", "data.colour"),
    ],
)
def test_bad_values_name_the_key(override, key):
    extra = ["experiment=cifar10_discretized_256"] if "sigma_1" in override or "num_bins" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load([*extra, override])


def test_key_lists_derive_from_the_schema():
    """Which keys a resume may change and which shape the weights are metadata on the schema's fields,
    so the lists cannot name a key the schema does not have (the old init_from list named flow.num_bins)."""
    from pipeline.config import is_under, keys_marked
    from pipeline.training.lease import RESUMABLE
    from pipeline.training.resume import WEIGHT_KEYS

    schema = set(SECTIONS) | {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert keys_marked("resumable") == RESUMABLE and keys_marked("weights") == WEIGHT_KEYS
    assert set(RESUMABLE) <= schema and set(WEIGHT_KEYS) <= schema
    assert not set(RESUMABLE) & set(WEIGHT_KEYS)
    assert is_under("net.kwargs.width", WEIGHT_KEYS) and is_under("trainer.max_steps", RESUMABLE)
    assert not is_under("optim.lr", RESUMABLE) and not is_under("flow.beta_1", WEIGHT_KEYS)
    assert not is_under("trainer.seed", RESUMABLE) and is_under("eval.nll_steps", RESUMABLE)


def test_apply_overrides_uses_hydras_grammar_on_a_stored_config():
    """`bfn eval CKPT key=value` parses like `bfn train` (Hydra's parser), changes only existing keys."""
    from pipeline.config import apply_overrides

    stored = compose(["experiment=smoke"])
    changed = apply_overrides(stored, ["eval.nll_steps=7", "optim.betas=[0.8,0.9]", "eval.target_se=null"])
    assert changed["eval"]["nll_steps"] == 7 and changed["optim"]["betas"] == [0.8, 0.9]
    assert changed["eval"]["target_se"] is None
    for bad, message in (
        ("eval.bogus=1", "eval.bogus: unknown key"),
        ("eval.nll_steps", "override"),
        ("+eval.x=1", "only key=value"),
        ("eval.nll_steps=1,2", "only key=value"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(stored, [bad])

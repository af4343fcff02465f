"""Every shipped config composes, validates and builds its model; presets match the paper."""

from __future__ import annotations

import pytest
import torch

from bfn.networks import count_parameters
from pipeline.config import CONF_DIR, ConfigError, compose, load
from pipeline.training.build import build_model, build_optimizer

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("best_"))
PAPER = {  # preset: (network parameters in millions, data shape)
    "mnist_binary": (24.81, (28, 28, 1)),
    "cifar10_discretized_256": (30.72, (32, 32, 3)),
    "cifar10_discretized_16": (30.72, (32, 32, 3)),
    "cifar10_continuous": (30.72, (32, 32, 3)),
    "text8": (170.18, (256,)),
}


def test_all_paper_presets_ship():
    assert set(PAPER) | {"smoke", "mnist_local"} <= set(PRESETS)


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

"""Importing an official BFN checkpoint (pipeline.training.official.import_official); fast, no Ray.

The small official networks of tests/data/ref_nets are saved as the official code saves a
checkpoint (the whole BFN's state dict: ``net.`` keys) next to an official YAML config, imported,
and loaded back the way ``bfn eval`` / ``bfn sample`` load a checkpoint (evaluate.load_model):
the network must still reproduce the official outputs. Broken, crafted and mismatched files are
refused with errors naming the file and the key.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml

from bfn.networks import NETWORKS
from bfn.networks.official import OfficialConfigError, network_spec
from pipeline.config import Config, ConfigError, compose
from pipeline.core import checkpointing
from pipeline.core.build import build_optimizer
from pipeline.evaluation.evaluate import load_model
from pipeline.training.official import config_overrides, hydra_overrides, import_official
from tests.bfn.official_fixtures import (
    OFFICIAL_YAMLS,
    SMALL,
    edited,
    official_yaml,
    project_output,
    relative_error,
    small_config,
    small_io,
    small_state,
)
from tests.conftest import REPO
from tests.faults import write_malicious_pt
from tests.pipeline.test_data import write_idx_folder

DATA = {"gpt": "text8", "unet": "mnist", "vdm": "cifar10"}


def write_official(folder, name, state=None):
    """(checkpoint path, YAML path) of the small fixture ``name``, as the official code writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = folder / f"{name}_ema.pt", folder / f"{name}.yaml"
    torch.save(small_state(name) if state is None else state, ckpt)
    cfg.write_text(yaml.safe_dump(small_config(name)))
    return ckpt, cfg


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    out = {}
    for name in SMALL:
        ckpt, cfg = write_official(root / "src", name)
        out[name] = import_official(ckpt, cfg, root / f"{name}_ckpt")
    return out


@pytest.mark.parametrize("name", SMALL)
def test_imported_checkpoint_loads_like_eval_and_reproduces_the_official_outputs(imported, name):
    folder = imported[name]
    net_inputs, t, outputs = small_io(name)
    for use_ema in (True, False):
        model, cfg = load_model(folder, use_ema=use_ema)
        assert cfg.data.name == DATA[name]
        assert relative_error(project_output(model.net, net_inputs, t, outputs), outputs) <= 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_imported_folder_is_a_complete_project_checkpoint(imported, name):
    state = checkpointing.read(imported[name])  # what a resume reads
    assert state["train_state"]["step"] == 0
    assert state["train_state"]["imported_from"]["checkpoint"].endswith(f"{name}_ema.pt")
    assert state["model"].keys() == state["ema"].keys()
    assert all(torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])
    cfg = Config.from_dict(state["config"])  # a full, valid project config
    model, _ = load_model(imported[name])
    optimizer = build_optimizer(cfg, model)
    optimizer.load_state_dict(state["optimizer"])  # fresh AdamW of the config
    assert optimizer.param_groups[0]["lr"] == cfg.optim.lr and not state["optimizer"]["state"]
    assert cfg.optim.lr == float(small_config(name)["optimizer"]["lr"])  # PyYAML: '1e-4' is a str


def test_config_is_composed_from_the_hydra_tree(imported):
    stored = json.loads((imported["vdm"] / "config.json").read_text())
    assert stored["flow"]["sigma_1"] == pytest.approx(1e-3)
    assert stored["flow"]["head"] == "discretized_normal" and stored["data"]["num_bins"] == 256
    assert stored["eval"]["unit"] == "bits/dim"  # from the cifar10_discretized_256 experiment
    source = json.loads((imported["vdm"] / "train_state.json").read_text())["imported_from"]
    recomposed = compose([*source["hydra_overrides"], f"run.name={stored['run']['name']}"])
    assert recomposed == stored


def test_bfn_sample_accepts_the_imported_folder(imported, tmp_path):
    from pipeline.evaluation.evaluate import sample

    path = sample(imported["unet"], num=2, num_steps=2, out=tmp_path / "samples")
    assert path.exists()


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    ckpt, cfg = write_official(tmp_path, "unet")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(checkpointing.CheckpointError, match=f"refusing to load {ckpt}"):
        import_official(ckpt, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    ckpt, cfg = write_official(tmp_path, "unet")
    decoy_marker = tmp_path / "decoy-ran"
    decoy = write_malicious_pt(tmp_path / "decoy.pt", decoy_marker)
    torch.load(decoy, weights_only=False)  # the payload does run code when unpickled unsafely
    assert decoy_marker.exists()
    marker = tmp_path / "pwned"
    write_malicious_pt(ckpt, marker)
    with pytest.raises(checkpointing.CheckpointError, match=rf"refusing to load {ckpt}.*weights-only"):
        import_official(ckpt, cfg, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_a_non_state_dict_payload_is_refused(tmp_path):
    ckpt, cfg = write_official(tmp_path, "unet", state={"step": 3})
    with pytest.raises(checkpointing.CheckpointError, match=str(ckpt)):
        import_official(ckpt, cfg, tmp_path / "out")


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s.pop("net.middle_block.1.qkv.weight"), "missing key 'middle_block.1.qkv.weight'"),
        (lambda s: s.update({"net.extra.weight": torch.zeros(2)}), "unknown key 'extra.weight'"),
        (
            lambda s: s.update({"net.out.2.weight": torch.zeros(32, 32, 1, 1)}),
            r"shape mismatch for key 'out\.2\.weight'",
        ),
    ],
)
def test_key_problems_are_named(tmp_path, edit, named):
    state = small_state("unet")
    edit(state)
    ckpt, cfg = write_official(tmp_path, "unet", state=state)
    with pytest.raises(checkpointing.CheckpointError, match=named) as info:
        import_official(ckpt, cfg, tmp_path / "out")
    assert str(ckpt) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_config_problems_name_the_file_and_key(tmp_path):
    ckpt, cfg = write_official(tmp_path, "unet")
    config = small_config("unet")
    config["model"]["bayesian_flow"]["parameters"]["discretize"] = True
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"{cfg}.*discretize"):
        import_official(ckpt, cfg, tmp_path / "out")
    cfg.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match=str(cfg)):
        import_official(ckpt, cfg, tmp_path / "out")


def test_hydra_overrides_start_with_the_matching_experiment():
    overrides = hydra_overrides(config_overrides(small_config("gpt")))
    assert overrides[0] == "experiment=text8"
    assert any(o.startswith("++net.kwargs={") for o in overrides)


def test_every_converted_network_option_survives_hydra_composition():
    """net.kwargs of the option fixtures (nested dicts, nulls, floats, strings) compose unchanged."""
    from tests.bfn.official_fixtures import option_configs

    for name, config in option_configs().items():
        arch, kwargs = network_spec(config)
        wanted = {k: v for k, v in kwargs.items() if k not in NETWORKS[arch].data_keys}
        mapped = {**config_overrides(config), "net.kwargs": wanted} if "data" in config else None
        if mapped is None:  # a network-only fixture: compose onto its architecture's paper preset
            preset = {"unet": "mnist_unet", "unet_vdm": "cifar_unet_vdm", "text_transformer": "text8_transformer"}
            experiment = {"unet": "mnist_binary", "unet_vdm": "cifar10_discretized_256", "text_transformer": "text8"}
            from pipeline.training.official import _hydra_value

            composed = compose(
                [f"experiment={experiment[arch]}", f"net={preset[arch]}", f"++net.kwargs={_hydra_value(wanted)}"]
            )
        else:
            composed = compose(hydra_overrides(mapped))
        assert composed["net"]["kwargs"] == wanted, name


# ----------------------------------------------------------------------------- official config -> project config


EXPECTED_OVERRIDES = {
    "mnist_discrete": {
        "data.name": "mnist",
        "flow.kind": "discrete",
        "flow.num_classes": 2,
        "flow.beta_1": 9.0,
        "flow.head": "bernoulli",
        "net.name": "mnist_unet",
        "net.arch": "unet",
        "flow.receiver": "reference",
        "flow.sigma_1": None,
        "optim.lr": 1e-4,
        "optim.betas": [0.9, 0.98],
        "optim.weight_decay": 0.01,
    },
    "text8_discrete": {
        "data.name": "text8",
        "flow.kind": "discrete",
        "flow.num_classes": 27,
        "flow.beta_1": 0.5625,
        "flow.head": "categorical",
        "data.seq_len": 256,
        "net.name": "text8_transformer",
        "net.arch": "text_transformer",
        "optim.weight_decay": 0.01,
    },
    "cifar10_discretized_256bins": {
        "data.name": "cifar10",
        "flow.kind": "continuous",
        "flow.sigma_1": 1e-3,
        "flow.head": "discretized_normal",
        "data.num_bins": 256,
        "flow.beta_1": None,
        "flow.receiver": None,
        "flow.noise_prediction": True,
        "net.name": "cifar_unet_vdm",
        "net.arch": "unet_vdm",
        "optim.lr": 2e-4,
        "optim.betas": [0.9, 0.99],
    },
    "cifar10_discretized_16bins": {
        "flow.sigma_1": math.sqrt(1e-3),
        "data.num_bins": 16,
        "flow.reconstruction_std_scale": None,
    },
    "cifar10_continuous_256bins": {
        "flow.head": "delta",
        "flow.sigma_1": 1e-3,
        "data.num_bins": 256,
        "flow.num_mc_samples": None,
        "flow.reconstruction_std_scale": 1.0,
    },
    "cifar10_continuous_16bins": {
        "flow.head": "delta",
        "flow.sigma_1": math.sqrt(1e-3),
        "data.num_bins": 16,
        "flow.reconstruction_std_scale": 0.7,
    },
}


@pytest.mark.parametrize("yaml_name", OFFICIAL_YAMLS)
def test_official_configs_map_to_project_settings(yaml_name):
    overrides = config_overrides(official_yaml(yaml_name))
    for key, value in EXPECTED_OVERRIDES[yaml_name].items():
        assert overrides[key] == (value if value is None or isinstance(value, str) else pytest.approx(value)), key
    assert overrides["optim.grad_clip"] == 5.0 and overrides["optim.ema_decay"] == 0.9999
    arch, kwargs = network_spec(official_yaml(yaml_name))
    data_keys = NETWORKS[arch].data_keys
    assert overrides["net.arch"] == arch
    assert overrides["net.kwargs"] == {k: v for k, v in kwargs.items() if k not in data_keys}
    Config.from_dict(compose(hydra_overrides(overrides)))  # every mapped key is a valid project setting


@pytest.mark.parametrize(
    ("yaml_name", "section", "change", "named"),
    [
        ("mnist_discrete", "bayesian_flow", {"min_sqrt_beta": 1e-8}, "model.bayesian_flow.parameters.min_sqrt_beta"),
        ("cifar10_discretized_256bins", "loss", {"min_loss_variance": 1e-6}, "model.loss.parameters.min_loss_variance"),
        ("cifar10_discretized_256bins", "data", {"num_bins": 16}, "model.distribution_factory.parameters.num_bins"),
        ("cifar10_continuous_16bins", "data", {"num_bins": 256}, "data.num_bins"),
        ("mnist_discrete", "bayesian_flow", {"n_classes": 3}, "n_classes=2"),
        ("mnist_discrete", "data", {"dataset": "bin_mnist_cts"}, "data.dataset"),
        ("mnist_discrete", "data", {"dataset": "cifar10"}, "data.dataset=cifar10 ([32, 32, 3])"),
        ("text8_discrete", "data", {"dataset": "bin_mnist"}, "model.net.class_name=GPT"),
        ("text8_discrete", "data", {"seq_len": 1000}, "data.seq_len"),
        ("mnist_discrete", "optimizer", {"amsgrad": True}, "optimizer.amsgrad"),
        ("mnist_discrete", "optimizer", {"lr": "x"}, "optimizer.lr"),
        ("mnist_discrete", "training", {"seed": -1}, "training.seed"),
    ],
)
def test_flow_and_data_options_the_project_lacks_are_refused(yaml_name, section, change, named):
    config = edited(official_yaml(yaml_name), section, **change)
    with pytest.raises(OfficialConfigError, match=re.escape(named)):
        config_overrides(config)


def test_unsupported_classes_and_partial_configs_are_refused():
    config = official_yaml("cifar10_discretized_256bins")
    config["model"]["distribution_factory"]["class_name"] = "DiscretizedGMMFactory"
    with pytest.raises(OfficialConfigError, match=r"model\.distribution_factory\.class_name"):
        config_overrides(config)
    with pytest.raises(OfficialConfigError, match="need the whole official config"):
        config_overrides({"model": official_yaml("mnist_discrete")["model"]})


def test_an_existing_folder_is_not_overwritten(imported, tmp_path):
    ckpt, cfg = write_official(tmp_path, "unet")
    before = (imported["unet"] / "ema.pt").read_bytes()
    with pytest.raises(checkpointing.CheckpointError, match="not an empty folder"):
        import_official(ckpt, cfg, imported["unet"])
    assert (imported["unet"] / "ema.pt").read_bytes() == before


def test_cli_imports_the_official_checkpoint_and_eval_reports_its_continuous_time_nll(tmp_path):
    """`bfn import-official` then `bfn eval --steps inf` on a tiny MNIST, as a user runs them."""
    from pipeline import data as data_lib

    def bfn(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )

    write_idx_folder(tmp_path / "idx", 300, 40)
    data_lib.prepare("mnist", str(tmp_path / "shards"), source=str(tmp_path / "idx"), progress=False)
    ckpt, cfg = write_official(tmp_path / "src", "unet")
    out = tmp_path / "imported"
    imported = bfn("import-official", str(ckpt), "--config", str(cfg), "--out", str(out))
    assert imported.returncode == 0, imported.stderr
    assert f"bfn eval {out}" in imported.stdout
    ran = bfn(
        "eval",
        str(out),
        "--steps",
        "inf",
        "--max-batches",
        "1",
        "--repeats",
        "1",
        f"data.uri={tmp_path / 'shards'}",
        "data.val_batch_size=40",
    )
    assert ran.returncode == 0, ran.stderr
    assert "n = inf (continuous time)" in ran.stdout
    number = r"(\d+\.\d+) ± (\d+\.\d+)"
    per_dim = re.search(rf"NLL {number} nats/dim .*; 1 repeats x 40 examples", ran.stdout)
    per_image = re.search(rf"NLL {number} nats/image", ran.stdout)
    assert per_dim and per_image, ran.stdout
    nll, se = float(per_image[1]), float(per_image[2])
    assert 0 < nll < float("inf") and se > 0
    assert nll == pytest.approx(784 * float(per_dim[1]), abs=0.1)  # the unit of the MNIST preset

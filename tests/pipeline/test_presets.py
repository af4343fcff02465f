"""The paper presets equal the reference's training and evaluation settings, value by value.

``REFERENCE`` holds the official settings (nnaisense/bayesian-flow-networks, commit b62568e) in the
reference's own terms (min_variance, max_sqrt_beta, per-process batch, ...), each with the file it
was read from: ``configs/<name>.yaml`` for the training configs, ``README`` for the launch and test
commands, ``utils_train`` for the defaults the configs do not override, ``torch`` for AdamW's own
defaults when a config sets none, ``model.py`` for the hard-coded reconstruction rule of continuous
data (see ../shared/BFN_SPEC.md sections 1, 5, 7 and 8). ``expected(preset)`` translates one entry
into dotted keys of our config; the test composes the preset and compares every key, so a drift on
either side fails with the key named.
"""

from __future__ import annotations

import math

import pytest

from pipeline.config import flatten, load

_ADAMW = {"optimizer.eps": 1e-8}  # torch: AdamW's default; no official config sets eps
_TRAINING = {  # configs/*.yaml training section, identical in every official config
    "training.ema_decay": 0.9999,
    "training.grad_clip_norm": 5.0,
    "training.checkpoint_interval": 10_000,
    "training.seed": 666,  # utils_train: the default config's seed, not overridden by any config
    "lr_schedule": None,  # train.py: constant learning rate, no warm-up
}
_CIFAR = {  # configs/cifar10_*.yaml: the four CIFAR-10 configs share these
    "processes": 1,  # README: "cifar10 experiment on 1 GPU (A100)"; the same batch in every CIFAR config
    "mixed_precision": False,  # README: launched without --mixed_precision
    "data.dataset": "cifar10",
    "train_loader.batch_size": 32,
    "optimizer.lr": 2e-4,
    "optimizer.betas": [0.9, 0.99],
    "optimizer.weight_decay": 0.01,  # on every parameter: UNetVDM has no get_optim_groups
    "training.n_training_steps": 1_000_000,
    "training.val_interval": 50_000,
    "training.val_repeats": 100,
    "training.max_val_batches": -1,  # utils_train default: every validation batch
    "net": (
        "UNetVDM",
        {
            "embedding_dim": 128,
            "n_blocks": 32,
            "n_attention_heads": 1,
            "dropout_prob": 0.1,
            "norm_groups": 32,
            "attention_everywhere": False,
        },
    ),
    "test": {"n_steps": 10, "n_repeats": 100},  # README: the CIFAR-10 test command
    **_ADAMW,
    **_TRAINING,
}
REFERENCE: dict[str, dict] = {
    "mnist_binary": {
        "file": "configs/mnist_discrete.yaml",
        "processes": 1,  # README: "mnist experiment on 1 GPU"
        "mixed_precision": False,  # README: launched without --mixed_precision
        "data.dataset": "bin_mnist",
        "train_loader.batch_size": 512,
        "val_loader.batch_size": 1000,
        "bayesian_flow": ("DiscreteBayesianFlow", {"n_classes": 2, "max_sqrt_beta": 3}),
        "distribution_factory": "BernoulliFactory",
        "optimizer.lr": 1e-4,
        "optimizer.betas": [0.9, 0.98],
        "optimizer.weight_decay": 0.01,  # torch: AdamW's default (the config sets none), every parameter
        "training.n_training_steps": 1_000_000,
        "training.val_interval": 50_000,
        "training.val_repeats": 1000,
        "training.max_val_batches": -1,  # utils_train default: every validation batch
        "net": (
            "UNetModel",
            {
                "model_channels": 128,
                "channel_mult": [1, 2, 2],
                "num_res_blocks": 2,
                "dropout": 0.5,
                "num_heads": 4,
                "skip": True,
            },
        ),
        "test": {"n_steps": 784, "n_repeats": 2000},  # README: the MNIST test command
        **_ADAMW,
        **_TRAINING,
    },
    "cifar10_discretized_256": {
        **_CIFAR,
        "file": "configs/cifar10_discretized_256bins.yaml",
        "data.num_bins": 256,
        "val_loader.batch_size": 1000,
        "bayesian_flow": ("CtsBayesianFlow", {"min_variance": 1e-6}),
        "loss.noise_pred": True,
        "distribution_factory": "DiscretizedNormalFactory",
    },
    "cifar10_discretized_16": {
        **_CIFAR,
        "file": "configs/cifar10_discretized_16bins.yaml",
        "data.num_bins": 16,
        "val_loader.batch_size": 1000,
        "bayesian_flow": ("CtsBayesianFlow", {"min_variance": 1e-3}),
        "loss.noise_pred": True,
        "distribution_factory": "DiscretizedNormalFactory",
    },
    "cifar10_continuous": {
        **_CIFAR,
        "file": "configs/cifar10_continuous_256bins.yaml",
        "data.num_bins": 256,
        "val_loader.batch_size": 500,
        "bayesian_flow": ("CtsBayesianFlow", {"min_variance": 1e-6}),
        "loss.noise_pred": True,
        "distribution_factory": "DeltaFactory",
        "reconstruction": {"num_bins": 256, "std": "sigma_1"},  # model.py: the general case
    },
    "cifar10_continuous_16": {
        **_CIFAR,
        "file": "configs/cifar10_continuous_16bins.yaml",
        "data.num_bins": 16,
        "val_loader.batch_size": 500,
        "bayesian_flow": ("CtsBayesianFlow", {"min_variance": 1e-3}),
        "loss.noise_pred": True,
        "distribution_factory": "DeltaFactory",
        "reconstruction": {"num_bins": 16, "std": "0.7 sigma_1"},  # model.py: the min_variance == 1e-3 case
    },
    "text8": {
        "file": "configs/text8_discrete.yaml",
        "processes": 8,  # README: accelerate launch --multi_gpu --num_processes=8
        "mixed_precision": True,  # README: --mixed_precision=fp16 (bf16 autocast here)
        "data.dataset": "text8",
        "data.seq_len": 256,
        "train_loader.batch_size": 416,  # per process: accelerate's default split_batches=False
        "val_loader.batch_size": 200,
        "bayesian_flow": ("DiscreteBayesianFlow", {"n_classes": 27, "max_sqrt_beta": 0.75}),
        "distribution_factory": "CategoricalFactory",
        "optimizer.lr": 1e-4,
        "optimizer.betas": [0.9, 0.98],
        "optimizer.weight_decay": 0.01,  # Linear weights only: GPT's get_optim_groups
        "training.n_training_steps": 10_000_000,
        "training.val_interval": 100_000,
        "training.val_repeats": 1,
        "training.max_val_batches": 5_000,
        "net": ("GPT", {"n_layer": 24, "n_head": 12, "n_embd": 768, "dropout": 0.0, "bias": True, "skip": True}),
        "test": {"n_steps": 0, "n_repeats": 1, "stride": 1},  # README (n_steps=0: continuous time); every window
        **_ADAMW,
        **_TRAINING,
    },
}

DATASETS = {"bin_mnist": "mnist", "cifar10": "cifar10", "text8": "text8"}
HEADS = {
    "BernoulliFactory": "bernoulli",
    "CategoricalFactory": "categorical",
    "DiscretizedNormalFactory": "discretized_normal",
    "DeltaFactory": "delta",
}
NETWORKS = {"UNetModel": "unet", "UNetVDM": "unet_vdm", "GPT": "text_transformer"}
NET_ARGS = {"dropout_prob": "dropout"}  # official constructor argument -> ours, where they differ
UNITS = {"mnist": "nats/image", "cifar10": "bits/dim", "text8": "bits/char"}  # the paper's tables


def _flow(ref: dict) -> dict:
    cls, params = ref["bayesian_flow"]
    head = HEADS[ref["distribution_factory"]]
    # model.py: both discrete_time_loss implementations draw n_samples=10 sender samples; the delta
    # output's is closed-form
    out = {
        "flow.head": head,
        "flow.num_mc_samples": None if head == "delta" else 10,
        "flow.reconstruction_std_scale": None,
    }
    if cls == "DiscreteBayesianFlow":
        return {
            **out,
            "flow.kind": "discrete",
            "flow.num_classes": params["n_classes"],
            "flow.beta_1": params["max_sqrt_beta"] ** 2,
            "flow.sigma_1": None,
            "flow.noise_prediction": None,
            "flow.receiver": "reference",
        }
    out.update(
        {
            "flow.kind": "continuous",
            "flow.num_classes": None,
            "flow.beta_1": None,
            "flow.receiver": None,
            "flow.sigma_1": pytest.approx(math.sqrt(params["min_variance"]), rel=1e-12),
            "flow.noise_prediction": ref["loss.noise_pred"],
        }
    )
    if "reconstruction" in ref:
        scale = {"sigma_1": 1.0, "0.7 sigma_1": 0.7}[ref["reconstruction"]["std"]]
        out.update({"flow.reconstruction_std_scale": scale, "data.num_bins": ref["reconstruction"]["num_bins"]})
    return out


def expected(preset: str) -> dict:
    """The reference entry of ``preset`` as dotted keys of our config."""
    ref = REFERENCE[preset]
    name, (net_cls, net_args) = DATASETS[ref["data.dataset"]], ref["net"]
    val_batches = ref["training.max_val_batches"]
    test = ref["test"]
    return {
        "data.name": name,
        "data.num_bins": ref.get("data.num_bins"),
        "data.seq_len": ref.get("data.seq_len"),
        "data.fraction": 1.0,
        "trainer.num_workers": ref["processes"],
        "trainer.use_gpu": True,
        "trainer.amp": ref["mixed_precision"],
        "data.batch_size": ref["train_loader.batch_size"] * ref["processes"],
        "data.val_batch_size": ref["val_loader.batch_size"],
        "optim.lr": ref["optimizer.lr"],
        "optim.betas": ref["optimizer.betas"],
        "optim.eps": ref["optimizer.eps"],
        "optim.weight_decay": ref["optimizer.weight_decay"],
        "optim.ema_decay": ref["training.ema_decay"],
        "optim.grad_clip": ref["training.grad_clip_norm"],
        "optim.warmup_steps": 0 if ref["lr_schedule"] is None else ref["lr_schedule"],
        "trainer.max_steps": ref["training.n_training_steps"],
        "trainer.val_every": ref["training.val_interval"],
        "trainer.checkpoint_every": ref["training.checkpoint_interval"],
        "trainer.seed": ref["training.seed"],
        "eval.val_repeats": ref["training.val_repeats"],
        "eval.val_batches": 0 if val_batches == -1 else val_batches,
        "eval.nll_steps": test["n_steps"],
        "eval.nll_repeats": test["n_repeats"],
        "eval.text8_stride": test.get("stride"),
        "eval.unit": UNITS[name],
        "net.arch": NETWORKS[net_cls],
        **{f"net.kwargs.{NET_ARGS.get(k, k)}": v for k, v in net_args.items()},
        **_flow(ref),
    }


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_preset_equals_the_reference(preset):
    cfg = load([f"experiment={preset}"])
    flat = flatten(cfg.raw)
    want = expected(preset)
    wrong = {key: (flat.get(key, "<missing>"), value) for key, value in want.items() if flat.get(key) != value}
    assert not wrong, f"{preset} drifts from {REFERENCE[preset]['file']}: {{key: (ours, reference)}} = {wrong}"
    assert cfg.batch_size_per_worker == REFERENCE[preset]["train_loader.batch_size"]


def test_every_paper_preset_has_a_reference_entry():
    from pipeline.config import CONF_DIR

    # small CPU presets, not the paper's
    local = {"smoke", "mnist_local", "mnist_cond_local", "cifar10_cond_local", "text8_local", "text_bpe_local"}
    shipped = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} - local
    assert shipped - {p for p in shipped if p.startswith("best_")} == set(REFERENCE)


def test_the_comparison_catches_a_drift():
    """The table is not vacuous: one changed value in a composed preset is reported by key."""
    want, flat = expected("text8"), flatten(load(["experiment=text8", "data.batch_size=416"]).raw)
    assert [key for key, value in want.items() if flat.get(key) != value] == ["data.batch_size"]


def test_the_continuous_16_bin_model_scores_its_reconstruction_on_16_bins_at_0_7_sigma_1():
    import torch

    from pipeline.core.build import build_model

    cfg = load(["experiment=cifar10_continuous_16"])
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.reconstruction_bins == 16
    assert model.reconstruction_std == pytest.approx(0.7 * math.sqrt(1e-3))

"""The one place that turns a validated Config into objects: network, flow, head, BFN, optimiser."""

from __future__ import annotations

import torch

from bfn import (
    BFN,
    BernoulliHead,
    CategoricalHead,
    ContinuousFlow,
    DeltaHead,
    DiscreteFlow,
    DiscretizedNormalHead,
)
from bfn.networks import build_network
from pipeline.config import Config


def build_flow_and_head(config: Config):
    f = config.flow
    if f.kind == "discrete":
        flow = DiscreteFlow(f.num_classes, f.beta_1_value)
        head = BernoulliHead() if f.head == "bernoulli" else CategoricalHead(f.num_classes)
        return flow, head
    flow = ContinuousFlow(f.sigma_1)
    if f.head == "discretized_normal":
        head = DiscretizedNormalHead(config.data.num_bins, sigma_1=f.sigma_1, noise_prediction=f.noise_prediction)
    else:
        head = DeltaHead(sigma_1=f.sigma_1, noise_prediction=f.noise_prediction)
    return flow, head


def build_model(config: Config) -> BFN:
    """The BFN of ``config`` (network weights freshly initialised)."""
    flow, head = build_flow_and_head(config)
    data_shape = config.data.data_shape
    data_kwargs = {
        "in_channels": data_shape[-1],
        "image_size": data_shape[0],
        "out_height": head.output_height,
        "num_classes": config.flow.num_classes,
        "seq_len": data_shape[0],
    }
    if config.model.conditional:  # a label embedding; an unconditional network is built exactly as before
        data_kwargs["num_labels"] = config.model.num_labels
    net = build_network(config.net.arch, **{**data_kwargs, **config.net.kwargs})
    f = config.flow
    options = {"receiver": f.receiver, "num_mc_samples": f.num_mc_samples}  # null where the flow/head has none
    options["cond_drop"] = config.model.cond_drop  # null (unconditional): BFN's default, no label draws
    if f.head == "delta":  # scored as a discretised Gaussian on the data's bins (paper Sec. 7.2)
        options.update(
            reconstruction_bins=config.data.num_bins, reconstruction_std=f.sigma_1 * f.reconstruction_std_scale
        )
    return BFN(net, flow, head, data_shape=data_shape, **{k: v for k, v in options.items() if v is not None})


def build_optimizer(config: Config, model: BFN) -> torch.optim.Optimizer:
    """AdamW; networks that define ``optim_groups`` (the transformer) decay Linear weights only.
    Build it after the model is on its device."""
    o = config.optim
    net = model.net
    if hasattr(net, "optim_groups"):
        groups = net.optim_groups(o.weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    # fused on CUDA: one kernel per step, and it can skip a non-finite step on the device (found_inf)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def lr_at(config: Config, step: int) -> float:
    """Linear warm-up over optim.warmup_steps, then constant (the paper uses no schedule)."""
    warmup = config.optim.warmup_steps
    return config.optim.lr * min(1.0, (step + 1) / warmup) if warmup else config.optim.lr

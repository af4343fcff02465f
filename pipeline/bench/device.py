"""`bfn bench device`: the paper networks' training step and sampler on one device, side by side.

For each network (text8 transformer, CIFAR-10 VDM U-Net, MNIST U-Net, from the experiment presets,
built by the pipeline's own builders) it times, in one process and interleaved:
  bare     the network's forward + backward alone (a lower bound for the step);
  step     the pipeline's training step (continuous-time loss, clip, fused AdamW on CUDA, EMA),
           bf16 autocast on CUDA;
  official the official code's step built from its own configs, when ``--official PATH`` names a
           checkout of nnaisense/bayesian-flow-networks (its own loss, AdamW, clip 5, EMA);
and the sampler (paper, ``--sample-steps`` steps). It prints s/step, achieved TFLOP/s (FLOPs of
one forward + backward counted by torch's FlopCounterMode), MFU against ``--peak-tflops`` and the
ratios. CUDA timings are CUDA-event medians after warm-up; on the CPU, perf_counter medians.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bfn import EMA
from pipeline.config import load
from pipeline.core.build import build_model, build_optimizer
from pipeline.training.steps import train_step

log = logging.getLogger(__name__)

NETWORKS = {  # name -> experiment preset, data shape
    "text8": ("text8", (256,)),
    "cifar10": ("cifar10_discretized_256", (32, 32, 3)),
    "mnist": ("mnist_binary", (28, 28, 1)),
}
OFFICIAL_CONFIGS = {"text8": "text8_discrete", "cifar10": "cifar10_discretized_256bins", "mnist": "mnist_discrete"}


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def example_batch(name: str, batch_size: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if name == "text8":
        return torch.randint(0, 27, (batch_size, 256), generator=generator).to(device)
    if name == "cifar10":
        bins = torch.randint(0, 256, (batch_size, 32, 32, 3), generator=generator).float()
        return ((2 * bins + 1) / 256 - 1).to(device)
    return (torch.rand(batch_size, 28, 28, 1, generator=generator) < 0.13).long().to(device)


def train_flops(model, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward of the network at this batch (counted, not estimated)."""
    inputs = model.flow.net_inputs(
        model.flow.sample(model.check_data(x), torch.rand(x.shape[0], 1, device=x.device)), model.data_shape
    )
    t = torch.rand(x.shape[0], device=x.device)
    with FlopCounterMode(display=False) as counter:
        model.net(inputs, t).float().square().mean().backward()
    model.net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def ours(name: str, device, overrides: list[str]):
    cfg = load([f"experiment={NETWORKS[name][0]}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.check_values = False
    return cfg, model, build_optimizer(cfg, model), EMA(model, cfg.optim.ema_decay)


def official(name: str, checkout: Path, device):
    """The official model and optimiser built from its own config (its code imported from ``checkout``)."""
    sys.path.insert(0, str(checkout))
    # lazy: the official code's top-level modules, importable only once its checkout is on sys.path
    import model as official_model  # noqa: PLC0415
    import networks as official_networks
    import probability as official_probability
    from networks import adapters as official_adapters

    config = yaml.safe_load((checkout / "configs" / f"{OFFICIAL_CONFIGS[name]}.yaml").read_text())["model"]

    def make(module, section, **extra):
        if section is None:
            return None
        params = {
            k: float(v) if isinstance(v, str) and v.replace(".", "").replace("e-", "").isdigit() else v
            for k, v in (section.get("parameters") or {}).items()
        }
        return getattr(module, section["class_name"])(**params, **extra)

    adapters = {k: make(official_adapters, config[k]) for k in ("input_adapter", "output_adapter")}
    net = make(official_networks, config["net"], data_adapters=adapters)
    flow = make(official_model, config["bayesian_flow"])
    loss = make(
        official_model,
        config["loss"],
        bayesian_flow=flow,
        distribution_factory=make(official_probability, config["distribution_factory"]),
    )
    bfn = official_model.BFN(net=net, bayesian_flow=flow, loss=loss).to(device)
    return bfn, torch.optim.AdamW(bfn.parameters(), lr=1e-4, weight_decay=0.01)


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def bench_network(
    name: str,
    batch_size: int,
    device,
    *,
    steps: int,
    warmup: int,
    sample_steps: int,
    overrides: list[str],
    checkout: Path | None,
) -> dict[str, float]:
    cfg, model, optimizer, ema = ours(name, device, overrides)
    x = example_batch(name, batch_size, device)
    flops = train_flops(model, x)
    inputs = model.flow.net_inputs(model.flow.prior(x.shape[0], model.num_dims, device), model.data_shape)
    t = torch.rand(batch_size, device=device)

    def bare():
        model.net.zero_grad(set_to_none=True)
        with _autocast(device):
            out = model.net(inputs, t)
        out.float().square().mean().backward()

    def step():
        train_step(
            model, model, x, optimizer, ema, grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, amp=device.type == "cuda"
        )

    def sample():
        with _autocast(device):
            model.sample(min(batch_size, 64), sample_steps)

    result = {
        "bare_s": timed(bare, device, steps, warmup),
        "step_s": timed(step, device, steps, warmup),
        "sample_s": timed(sample, device, max(steps // 5, 1), 1),
        "flops_per_step": float(flops),
    }
    if checkout is not None:
        result.update(_official_times(name, checkout, x, device, steps, warmup, sample_steps, batch_size))
    return result


def _official_times(name, checkout, x, device, steps, warmup, sample_steps, batch_size) -> dict[str, float]:
    model, optimizer = official(name, checkout, device)
    ema = copy.deepcopy(model).requires_grad_(False)

    def step():
        with _autocast(device):
            loss = model(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)
        loss.item()  # the official loop reads the loss every step

    def sample():
        with _autocast(device):
            model.sample((min(batch_size, 64), *NETWORKS[name][1]), sample_steps)

    return {
        "official_step_s": timed(step, device, steps, warmup),
        "official_sample_s": timed(sample, device, max(steps // 5, 1), 1),
    }


def report(name: str, batch_size: int, r: dict[str, float], peak_tflops: float | None) -> None:
    tflops = r["flops_per_step"] / r["step_s"] / 1e12
    mfu = f", MFU {tflops / peak_tflops:.1%}" if peak_tflops else ""
    print(f"\n== {name}, batch {batch_size} ==")
    print(f"  bare network fwd+bwd  {r['bare_s'] * 1e3:9.1f} ms")
    print(
        f"  training step         {r['step_s'] * 1e3:9.1f} ms   ({r['step_s'] / r['bare_s']:.2f}x the bare net; "
        f"{tflops:.2f} TFLOP/s{mfu})"
    )
    if "official_step_s" in r:
        print(
            f"  official step         {r['official_step_s'] * 1e3:9.1f} ms   "
            f"(ours is {r['official_step_s'] / r['step_s']:.2f}x the official speed)"
        )
    print(
        f"  sampling              {r['sample_s']:9.3f} s"
        + (
            f"    (ours is {r['official_sample_s'] / r['sample_s']:.2f}x the official speed)"
            if "official_sample_s" in r
            else ""
        )
    )


def main(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    checkout = Path(args.official).resolve() if args.official else None
    peak = args.peak_tflops if device.type == "cuda" else None
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    for spec in args.networks.split(","):
        name, _, batch = spec.partition(":")
        if name not in NETWORKS:
            raise ValueError(f"--networks: {name!r} is not one of {', '.join(NETWORKS)}")
        batch_size = int(batch) if batch else {"text8": 416, "cifar10": 32, "mnist": 512}[name]
        result = bench_network(
            name,
            batch_size,
            device,
            steps=args.steps,
            warmup=args.warmup,
            sample_steps=args.sample_steps,
            overrides=list(args.overrides),
            checkout=checkout,
        )
        report(name, batch_size, result, peak)
    return 0

"""`bfn bench vocab`: memory and time of a discrete BFN against the vocabulary size K, before and
after the O(K) rewrite, in one run.

At a fixed batch (8 windows x 128 tokens by default) and the small text transformer (4 layers, 128
wide), for each K: a training step (continuous-time loss, backward, AdamW) and the n-step NLL
(n-step loss with 10 sender draws + reconstruction). "before" is the code as it was: the loss from
an int64 one-hot, the token projection as Linear(2 theta - 1), and the reference receiver's
ln sum_{m != j} w_m from a (B, D, K, K) masked log-sum-exp (run only where that tensor fits the
memory budget). "after" is today's ``bfn``. Each measurement runs in a fresh process (peak RSS on
the CPU; ``torch.cuda.max_memory_allocated`` on a GPU), so one cannot inflate another's peak.

This module imports only torch and ``bfn``: it runs where the pipeline's packages are not installed
(``python -m pipeline.bench.vocab --device cuda`` on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

from bfn import BFN, CategoricalHead, DiscreteFlow, losses
from bfn.networks import TextTransformer

log = logging.getLogger(__name__)
VOCABS = (27, 256, 4096, 32768, 50257)
BETA_1_TIMES_K = 16.0
NUM_STEPS = 1000  # n of the n-step NLL


# ------------------------------------------------------------------------ the code before the rewrite
def _old_adapter_forward(self, theta, t, tied_weight=None):
    """TextInputAdapter.forward as it was: Linear on 2 theta - 1 (a K-wide temporary kept for backward)."""
    b, length, _ = theta.shape
    t = t.to(theta.dtype).reshape(b, -1)
    tokens = self.token_proj(2 * theta - 1)
    return tokens + self.positions[:length].to(tokens.dtype) + self.time_proj((2 * t - 1)[..., None])


def _old_continuous_time_loss(flow, dist, x, t):
    one_hot = F.one_hot(x, flow.num_classes)  # int64 (B, D, K)
    return t * flow.beta_1 * (flow.num_classes * (one_hot - dist.probs).square().sum(-1))


def _old_log_sum_of_others(log_weights):
    eye = torch.eye(log_weights.shape[-1], dtype=torch.bool, device=log_weights.device)
    return torch.logsumexp(log_weights.unsqueeze(-2).masked_fill(eye, float("-inf")), dim=-1)  # (B, D, K, K)


def old_kxk_bytes(batch: int, length: int, K: int) -> int:
    """Bytes of the old receiver's (B, D, K, K) float32 tensor and its boolean mask."""
    return batch * length * K * K * 5


# ---------------------------------------------------------------------------------- one measurement
def _model(K: int, length: int, device: torch.device, old: bool) -> BFN:
    net = TextTransformer(num_classes=K, seq_len=length, n_layer=4, n_head=4, n_embd=128)
    if old:
        net.input_adapter.forward = types.MethodType(_old_adapter_forward, net.input_adapter)
    flow = DiscreteFlow(K, BETA_1_TIMES_K / K)
    return BFN(net, flow, CategoricalHead(K), data_shape=(length,), check_values=False).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_one(what: str, K: int, old: bool, batch: int, length: int, device: str, repeats: int) -> dict:
    """Peak memory above the set-up (model, optimizer, data) and seconds per call of ``what``."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = _model(K, length, device, old)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, K, (batch, length), device=device)
    if old:
        losses.continuous_time_loss_discrete = _old_continuous_time_loss
        losses._log_sum_of_others = _old_log_sum_of_others

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        model.loss(x).backward()
        optimizer.step()

    def nll():
        model.eval()
        with torch.no_grad():
            return model.n_step_loss(x, NUM_STEPS) + model.reconstruction_loss(x).mean(-1)

    fn = {"step": step, "nll": nll}[what]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_bytes(device)  # the set-up's own peak: what the call adds is above it
    fn()  # warm-up (allocator, AdamW state), counted in the peak as a real step is
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    seconds = (time.perf_counter() - started) / repeats
    return {"peak_bytes": max(_peak_bytes(device) - base, 0), "seconds": seconds}


def _run_isolated(what: str, K: int, old: bool, args) -> dict | None:
    """``measure_one`` in a fresh Python process; None when it failed (out of memory)."""
    spec = json.dumps([what, K, old, args.batch, args.length, args.device, args.repeats])
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.vocab", "--one", spec], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        log.warning("K=%d %s (%s) failed: %s", K, what, "before" if old else "after", proc.stderr.strip()[-300:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- report
def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _ratio(after: dict | None, before: dict | None, key: str) -> str:
    if after is None or before is None or not before[key]:
        return "-"
    return f"{after[key] / before[key]:.2f}x"


def run(args) -> list[dict]:
    budget = args.budget_gib * 2**30
    rows = []
    for K in args.vocabs:
        for what in ("step", "nll"):
            fits = what == "step" or old_kxk_bytes(args.batch, args.length, K) < budget
            before = _run_isolated(what, K, True, args) if fits else None
            after = _run_isolated(what, K, False, args)
            rows.append({"K": K, "what": what, "before": before, "after": after, "before_skipped": not fits})
            log.info(
                "K=%d %s: before %s GiB, after %s GiB",
                K,
                what,
                _gib(before and before["peak_bytes"]),
                _gib(after and after["peak_bytes"]),
            )
    return rows


def table(rows: list[dict], args) -> str:
    per_k = {}
    lines = [
        f"Discrete BFN against K: batch {args.batch} x {args.length} tokens, 4-layer 128-wide transformer, "
        f"{args.device}; n-step NLL at n = {NUM_STEPS} with 10 sender draws. Peak memory above the set-up "
        "(GiB), seconds per call; ratios after/before.",
        f"{'K':>7} {'':<5} {'before GiB':>11} {'after GiB':>10} {'mem ratio':>10} "
        f"{'before s':>9} {'after s':>8} {'time ratio':>11} {'after B/(B D K)':>16}",
    ]
    for row in rows:
        before, after, K = row["before"], row["after"], row["K"]
        per_elem = after["peak_bytes"] / (args.batch * args.length * K) if after else None
        per_k.setdefault(row["what"], []).append((K, per_elem))
        skipped = f"n/a ({old_kxk_bytes(args.batch, args.length, K) / 2**30:,.0f} GiB K x K)"
        before_mem = skipped if row["before_skipped"] else _gib(before and before["peak_bytes"])
        before_s = "-" if before is None else f"{before['seconds']:.3f}"
        after_s = "-" if after is None else f"{after['seconds']:.3f}"
        elem = "-" if per_elem is None else f"{per_elem:.1f}"
        lines.append(
            f"{K:>7} {row['what']:<5} {before_mem:>11} {_gib(after and after['peak_bytes']):>10} "
            f"{_ratio(after, before, 'peak_bytes'):>10} {before_s:>9} {after_s:>8} "
            f"{_ratio(after, before, 'seconds'):>11} {elem:>16}"
        )
    for what, points in per_k.items():  # linear in K: the same memory per added class between any two K
        big = [(k, v * args.batch * args.length * k) for k, v in points if v is not None and k >= 4096]
        slopes = [
            f"{k0:,} -> {k1:,}: {(m1 - m0) / (k1 - k0) * 1000 / 2**20:.1f} MiB"
            for (k0, m0), (k1, m1) in zip(big, big[1:], strict=False)
        ]
        if slopes:
            lines.append(f"{what}: memory added per 1,000 classes, {'; '.join(slopes)} (equal = linear in K)")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.vocab", description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="comma-separated K values")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after one warm-up)")
    p.add_argument("--budget-gib", type=float, default=12.0, help="skip 'before' where K x K would exceed this")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.vocabs = [int(k) for k in str(args.vocabs).split(",")]
    if any(k < 2 for k in args.vocabs) or args.batch < 1 or args.length < 1 or args.repeats < 1:
        p.error("--vocabs values must be >= 2; --batch, --length and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one is not None:
        print(json.dumps(measure_one(*json.loads(args.one))))
        return 0
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    print(table(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure `bfn eval` against the official BFN code: same weights, same binarised MNIST images.

Usage (a measuring aid, not run by the tests; needs a checkout of nnaisense/bayesian-flow-networks,
b62568e, and MNIST shards from `bfn data prepare mnist --out SHARDS`):

    PYTHONPATH=$PWD python tests/data/ref_nets/compare_official_nll.py /path/to/official-checkout \\
        --shards SHARDS --work WORKDIR [--steps 0 784] [--repeats 5] [--max-batches 1]

1. The official BFN module is built by the official classes from the official MNIST config with the
   small U-Net of unet_small_config.json (``tests.bfn.official_fixtures.small_config("unet")``),
   loaded with unet_small_state.npz and saved as the official code saves a checkpoint (the BFN's
   state dict, ``net.`` keys), next to that YAML.
2. ``bfn import-official`` (the CLI, as a subprocess) turns it into a project checkpoint.
3. Project side: ``pipeline.evaluation.evaluate.evaluate``, which is all ``bfn eval IMPORTED
   --steps N --repeats R --max-batches M data.uri=SHARDS`` does (the command is printed).
4. Official side: the official ``BFN`` on the same weights and the exact tensors the project
   evaluated (pass r reads ``iter_batches(..., seed=r)``, as evaluate does), fed in batches of 100
   as its test.py does: ``model(x, n_steps=N)`` (N = 0: its continuous-time loss) and
   ``model.compute_reconstruction_loss(x)``; per pass the mean of the batch means, standard error
   std(correction=0) / sqrt(R) over the R passes (test.py's formula; the total's SE from the
   per-pass totals the same way).

Both sides are Monte-Carlo estimates (t, flow samples and the receiver's samples differ), so they
are compared by z = difference / sqrt(se_project^2 + se_official^2). Results also go to
WORKDIR/comparison.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import torch
import yaml

log = logging.getLogger("compare_official_nll")
REPO = Path(__file__).resolve().parents[3]
OFFICIAL_BATCH = 100  # test.py's DataLoader batch size


def build_official(checkout: Path, config: dict):
    """The official BFN module from an official config (its make_bfn, without its training deps)."""
    sys.path.insert(0, str(checkout))
    import model as official_model
    import networks
    import probability
    from networks import adapters

    def make(module, node, **extra):
        return None if node is None else getattr(module, node["class_name"])(**node["parameters"], **extra)

    cfg = config["model"]
    data_adapters = {
        "input_adapter": make(adapters, cfg["input_adapter"]),
        "output_adapter": make(adapters, cfg["output_adapter"]),
    }
    net = make(networks, cfg["net"], data_adapters=data_adapters)
    flow = make(official_model, cfg["bayesian_flow"])
    loss = make(
        official_model,
        cfg["loss"],
        bayesian_flow=flow,
        distribution_factory=make(probability, cfg["distribution_factory"]),
    )
    return official_model.BFN(net=net, bayesian_flow=flow, loss=loss)


def write_official_checkpoint(checkout: Path, work: Path):
    """(official BFN in eval mode, checkpoint path, YAML path) of the small MNIST U-Net."""
    from tests.bfn.official_fixtures import small_config, small_state

    config = small_config("unet")
    bfn = build_official(checkout, config)
    bfn.load_state_dict(small_state("unet"), strict=True)  # every official key, exactly
    ckpt, cfg_path = work / "official_mnist_small_ema.pt", work / "official_mnist_small.yaml"
    torch.save(bfn.state_dict(), ckpt)
    cfg_path.write_text(yaml.safe_dump(config))
    return bfn.eval(), ckpt, cfg_path


def bfn_cli(*args: str) -> str:
    command = [sys.executable, "-m", "pipeline.cli", *args]
    log.info("$ bfn %s", " ".join(args))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"bfn {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def mean_se(per_pass: list[float]) -> tuple[float, float]:
    values = torch.tensor(per_pass, dtype=torch.float64)
    se = values.std(correction=0).item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), se


@torch.inference_mode()
def official_nll(bfn, shards: str, batch_size: int, steps: int, repeats: int, max_batches: int, seed: int):
    """{loss, reconstruction, total} -> (mean, se) in nats/dim, test.py's way, on the project's images."""
    from pipeline import data as data_lib

    torch.manual_seed(seed)
    passes = {"loss": [], "reconstruction": [], "total": []}
    for repeat in range(repeats):
        losses, recons = [], []
        batches = data_lib.iter_batches(shards, "test", "mnist", batch_size=batch_size, seed=repeat)
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            for x in torch.from_numpy(batch["x"]).int().split(OFFICIAL_BATCH):
                losses.append(bfn(x, n_steps=steps).item())
                recons.append(bfn.compute_reconstruction_loss(x).item())
        loss, recon = sum(losses) / len(losses), sum(recons) / len(recons)
        passes["loss"].append(loss)
        passes["reconstruction"].append(recon)
        passes["total"].append(loss + recon)
        log.info("official n=%s pass %d/%d: %.5f nats/dim", steps or "inf", repeat + 1, repeats, loss + recon)
    return {key: mean_se(values) for key, values in passes.items()}


def project_nll(imported: Path, shards: str, steps: int, repeats: int, max_batches: int):
    from pipeline.evaluation.evaluate import evaluate

    print(
        f"$ bfn eval {imported} --steps {steps} --repeats {repeats} --max-batches {max_batches} data.uri={shards}",
        flush=True,
    )
    est = evaluate(
        imported, [f"data.uri={shards}"], split="test", num_steps=steps, repeats=repeats, max_batches=max_batches
    )
    return {
        "loss": (est.loss, est.loss_se),
        "reconstruction": (est.reconstruction, est.reconstruction_se),
        "total": (est.total, est.total_se),
    }, est.num_examples


def table(results: dict, num_dims: int) -> str:
    units = {"nats/image": num_dims, "bits/dim": 1 / math.log(2)}
    lines = [
        "| n | side | unit | n-step loss | reconstruction | NLL bound | z (NLL) |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps, sides in results.items():
        (p, p_se), (o, o_se) = sides["project"]["total"], sides["official"]["total"]
        z = (p - o) / math.sqrt(p_se**2 + o_se**2)
        for unit, s in units.items():
            for side in ("project", "official"):
                cells = [
                    f"{m * s:.4f} ± {se * s:.4f}"
                    for m, se in (sides[side][k] for k in ("loss", "reconstruction", "total"))
                ]
                lines.append(f"| {steps} | {side} | {unit} | {' | '.join(cells)} | {z:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="checkout of nnaisense/bayesian-flow-networks")
    parser.add_argument("--shards", required=True, help="MNIST shards (bfn data prepare mnist --out ...)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoints and results")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 784], help="0 = continuous time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-batches", type=int, default=1, help="batches of eval's val_batch_size (1000)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the official side")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    args.work.mkdir(parents=True, exist_ok=True)
    bfn, ckpt, cfg_path = write_official_checkpoint(args.checkout.resolve(), args.work)
    imported = args.work / "imported"
    if not imported.exists():
        log.info(bfn_cli("import-official", str(ckpt), "--config", str(cfg_path), "--out", str(imported)))

    from pipeline.evaluation.evaluate import load_model

    _, cfg = load_model(imported, [f"data.uri={args.shards}"])
    results = {}
    for steps in args.steps:
        project, examples = project_nll(imported, args.shards, steps, args.repeats, args.max_batches)
        official = official_nll(
            bfn, args.shards, cfg.data.val_batch_size, steps, args.repeats, args.max_batches, args.seed
        )
        results["inf" if steps == 0 else str(steps)] = {"project": project, "official": official}
    (args.work / "comparison.json").write_text(
        json.dumps(
            {"images": examples, "repeats": args.repeats, "units": "nats/dim (mean, se)", "results": results}, indent=1
        )
    )
    print(f"\n{examples} test images x {args.repeats} repeats (same binarised images on both sides)\n")
    print(table(results, 784))


if __name__ == "__main__":
    main()

"""The `bfn` command: train, eval, sample, inpaint, data, bench (+ tune, scaling, submit, jobs, stack).

Every command that builds a model takes Hydra overrides (`experiment=smoke trainer.max_steps=10`).
Bad input exits with status 2 and one line naming the culprit, before Ray starts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pipeline import data, logs, secrets
from pipeline.config import ConfigError, compose, load
from pipeline.core.checkpointing import CheckpointError
from pipeline.data import DataError
from pipeline.data.bpe import MAX_VOCAB
from pipeline.evaluation.evaluate import evaluate, inpaint_checkpoint, sample
from pipeline.evaluation.quality.table import quality
from pipeline.training.driver import fit, print_summary
from pipeline.training.official import import_official
from pipeline.training.ray_runtime import ray_env_at_entry


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")


def cmd_train(args) -> int:
    cfg = load(args.overrides)
    print_summary(cfg, fit(cfg))
    return 0


def cmd_eval(args) -> int:
    evaluate(
        args.checkpoint,
        args.overrides,
        split=args.split,
        num_steps=args.steps,
        repeats=args.repeats,
        max_batches=args.max_batches,
        use_ema=not args.raw_weights,
        target_se=args.target_se,
    )
    return 0


def cmd_sample(args) -> int:
    path = sample(
        args.checkpoint,
        num=args.num,
        num_steps=args.steps,
        nfe=args.nfe,
        sampler=args.sampler,
        seed=args.seed,
        out=args.out,
        use_ema=not args.raw_weights,
        grid=args.grid,
        classes=args.classes,
        guidance=args.guidance,
    )
    logging.getLogger(__name__).info("samples written to %s", path)
    return 0


def cmd_inpaint(args) -> int:
    path = inpaint_checkpoint(
        args.checkpoint,
        keep=args.keep,
        text=args.text,
        fill=args.fill,
        num=args.num,
        split=args.split,
        num_steps=args.steps,
        nfe=args.nfe,
        sampler=args.sampler,
        seed=args.seed,
        grid=args.grid,
        out=args.out,
        use_ema=not args.raw_weights,
        particles=args.particles,
        infer_class=args.infer_class,
    )
    logging.getLogger(__name__).info("completions written to %s", path)
    return 0


def cmd_quality(args) -> int:
    _, table = quality(
        args.checkpoint,
        args.overrides,
        samplers=args.sampler,
        nfe=args.nfe,
        num=args.num,
        seeds=args.seeds,
        batch_size=args.batch_size,
        out=args.out,
        cache=args.cache,
        device=args.device,
        use_ema=not args.raw_weights,
        grid=args.grid,
        guidance=args.guidance,
        inpaint=args.inpaint,
        fill=args.fill,
        prompt=args.prompt,
        particles=args.particles,
        infer_class=args.infer_class,
    )
    print(table)  # the table is the command's result
    return 0


def cmd_data_prepare(args) -> int:
    name = args.dataset.replace("-", "_")  # text-bpe on the command line, text_bpe in configs
    if (args.vocab is None) == (name == "text_bpe"):
        raise data.DataError("--vocab: required with text-bpe (e.g. --vocab 4096), and only there")
    seq_len = args.seq_len if args.seq_len is not None else 128 if name == "text_bpe" else 256
    out = args.out
    if out is None:
        folder = f"text_bpe_{args.vocab}" if name == "text_bpe" else name
        out = str(Path(compose([])["paths"]["data_dir"]) / folder)
    source = args.source
    if source is None:  # bundled MNIST is complete; CIFAR-10 and text8 are downloaded; text-bpe: bundled-large
        source = None if name in ("mnist", "text_bpe") else "download"
    elif source == "bundled":
        source = None if name != "text_bpe" else data.raw_dir() / "text8" / "text8_first100k.txt"
    manifest = data.prepare(name, out, source=source, seq_len=seq_len, vocab_size=args.vocab)
    rows = {split: info["rows"] for split, info in manifest["splits"].items()}
    print(f"prepared {args.dataset} at {out}: {rows} rows ({manifest['source']['description']})")
    return 0


def cmd_data_verify(args) -> int:
    manifest = data.verify(args.uri)
    rows = {split: info["rows"] for split, info in manifest["splits"].items()}
    print(f"{args.uri}: {manifest['dataset']} OK ({rows} rows, {manifest['verified']['shards']} shards checked)")
    return 0


def cmd_import_official(args) -> int:
    folder = import_official(args.checkpoint, args.config, args.out, overrides=args.overrides)
    print(
        f"imported {args.checkpoint} -> {folder}\n"
        f"  evaluate:  bfn eval {folder}\n  sample:    bfn sample {folder}\n"
        f"  fine-tune: bfn train experiment=... run.name=NEW run.init_from={folder}"
    )
    return 0


def cmd_bench(args) -> int:
    # lazy, after ray_env_at_entry: Ray reads its node address at import (bench imports ray)
    from pipeline.bench.bench import main as bench_main

    return bench_main(args)


def _add_train_and_eval(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a BFN on Ray Train")
    _overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="NLL of a checkpoint (n-step loss L^n or continuous-time L∞, + reconstruction)")
    p.add_argument("checkpoint", help="checkpoint folder (local), or a registered model models:/NAME@ALIAS")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--steps",
        default=None,
        help="n of the n-step loss L^n; 0 or inf: the continuous-time loss L∞ (default: eval.nll_steps)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="passes over the split (default: eval.nll_repeats); the cap with --target-se",
    )
    p.add_argument(
        "--target-se",
        type=float,
        default=None,
        help="repeat passes until the NLL's standard error (in eval.unit) is at most this",
    )
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    _overrides(p)
    p.set_defaults(func=cmd_eval)


GRID_HELP = "the BFN-Solvers' time grid: uniform or logsnr (default: logsnr for discrete data, uniform otherwise)"


def _add_sample_and_quality(sub) -> None:
    p = sub.add_parser("sample", help="generate samples from a checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder, or a registered model models:/NAME@ALIAS")
    p.add_argument("--num", default=64, help="number of samples")
    p.add_argument("--sampler", default="paper", help="paper, ode1, ode2, sde1 or sde2 (see bfn/samplers.py)")
    p.add_argument("--nfe", default=None, help="network calls (>= 1); nfe = steps + 1 for every sampler")
    p.add_argument(
        "--steps",
        default=None,
        help="updates before the last call (default 100, i.e. --nfe 101); give --steps or --nfe",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help=GRID_HELP)
    p.add_argument(
        "--out",
        default=None,
        help="output path stem (default: runs/samples/RUN_CKPT_SAMPLER_nfeN_seedS; never the checkpoint)",
    )
    p.add_argument(
        "--class",
        dest="classes",
        default=None,
        help="conditional models: a class, a comma list or 'all' (--num samples of each, one row per class)",
    )
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w (with --class)")
    p.add_argument("--raw-weights", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("inpaint", help="complete test images from a kept part, or text from a prompt")
    p.add_argument("checkpoint", help="checkpoint folder, or a registered model models:/NAME@ALIAS")
    p.add_argument("--keep", default=None, help="images: top-half, left-half or MASK.png (white pixels kept)")
    p.add_argument("--text", default=None, help='text8: a prompt kept at the start ("a prompt", a-z and space)')
    p.add_argument("--fill", default=64, help="text: characters sampled after the prompt")
    p.add_argument("--num", default=8, help="test images (or text completions)")
    p.add_argument("--split", default="test", help="images: the split the test images come from")
    p.add_argument("--sampler", default="paper", help="paper, ode1, ode2, sde1 or sde2 (see bfn/samplers.py)")
    p.add_argument("--nfe", default=None, help="network calls (>= 1); nfe = steps + 1")
    p.add_argument("--steps", default=None, help="updates before the last call (default 100); give --steps or --nfe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help=GRID_HELP)
    p.add_argument("--out", default=None, help="output path stem (default: runs/inpaint/RUN_CKPT_KEEP_seedS)")
    p.add_argument(
        "--particles",
        default=1,
        help="> 1: sequential Monte Carlo over that many particles per completion (paper sampler; x the compute)",
    )
    p.add_argument(
        "--infer-class",
        action="store_true",
        help="conditional models, with --particles a multiple of the number of classes K: one particle system "
        "per class, whose weights on the known part infer the class",
    )
    p.add_argument("--raw-weights", action="store_true")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("quality", help="sample quality against the number of network calls, per sampler")
    p.add_argument("checkpoint")
    p.add_argument("--sampler", default="paper,ode2,sde1,sde2", help="comma-separated sampler names")
    p.add_argument("--nfe", default="5,10,20,50,100", help="comma-separated numbers of network calls")
    p.add_argument("--num", default=256, help="samples per (sampler, NFE, seed)")
    p.add_argument("--seeds", default=3, help="seeds 0..N-1; cells show mean ± standard deviation over them")
    p.add_argument("--batch-size", default=256, help="samples drawn per batch")
    p.add_argument("--grid", default=None, help=GRID_HELP)
    p.add_argument(
        "--out",
        default=None,
        help="output stem: writes STEM.csv, STEM.md and STEM_samples/ (default: runs/quality/RUN_CKPT)",
    )
    p.add_argument("--cache", default=None, help="classifier cache folder (default: runs/quality/classifiers)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument(
        "--guidance",
        default=None,
        help="conditional models: guidance scales w, e.g. 0,0.5,1,2,4 (class accuracy, FD, FD per class; "
        "and the same network without a label)",
    )
    p.add_argument(
        "--inpaint",
        default=None,
        help="image models: complete test images from top-half, left-half or MASK.png (accuracy vs true labels)",
    )
    p.add_argument("--fill", default=None, help="text8 models: characters to fill after a prompt (accuracy vs truth)")
    p.add_argument("--prompt", default=None, help="with --fill: known characters before the span (default: the rest)")
    p.add_argument(
        "--particles",
        default=None,
        help="with --inpaint/--fill: particle counts, e.g. 1,4,16 (1: each --sampler; P > 1: sequential Monte Carlo "
        "with the paper sampler, P times the compute)",
    )
    p.add_argument(
        "--infer-class",
        action="store_true",
        help="with --inpaint and a conditional model: one SMC particle system per class, whose weights on "
        "the kept pixels infer the class; --particles a multiple of K",
    )
    _overrides(p)
    p.set_defaults(func=cmd_quality)


def _add_data_and_import(sub) -> None:
    p = sub.add_parser("data", help="prepare or verify sharded Parquet datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="raw data -> Parquet shards + manifest")
    q.add_argument("dataset", choices=["mnist", "cifar10", "text8", "text-bpe"])
    q.add_argument("--out", default=None, help="folder or s3://bucket/prefix (default: data/shards/NAME)")
    q.add_argument(
        "--source",
        default=None,
        metavar="FILE|FOLDER|URL|bundled|bundled-large|download",
        help="an archive (cifar-10-python.tar.gz, text8.zip), a folder holding the files, a URL, "
        "'bundled' (data/raw) or 'download' (the canonical file, sha256-checked); default: "
        "bundled for mnist (complete), download for cifar10 and text8; text8 and text-bpe also take "
        "'bundled-large' (text8's first 100k chars + a 3.1M-char text8-style Wikipedia sample; text-bpe's default)",
    )
    q.add_argument(
        "--seq-len", type=int, default=None, help="text window length (text8 256 chars, text-bpe 128 tokens)"
    )
    q.add_argument(
        "--vocab", type=int, default=None, help=f"text-bpe: tokens of the BPE (27 .. {MAX_VOCAB:,}; GPT-2's is 50,257)"
    )
    q.set_defaults(func=cmd_data_prepare)
    q = data_sub.add_parser("verify", help="check a prepared dataset's manifest, shards and checksums")
    q.add_argument("uri")
    q.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("import-official", help="convert an official BFN checkpoint into a project checkpoint")
    p.add_argument("checkpoint", help="the official checkpoint (e.g. ema.pt: the BFN module's state dict)")
    p.add_argument("--config", required=True, help="the official YAML the checkpoint was trained with")
    p.add_argument("--out", required=True, help="new (empty) folder for the project checkpoint")
    _overrides(p)
    p.set_defaults(func=cmd_import_official)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks, printed as ratios measured side by side")
    p.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=["all", "step", "pipeline", "device", "vocab"],
        help="device: the paper networks' step and sampler on --device (beside --official); vocab: memory "
        "and time against the vocabulary size K (`python -m pipeline.bench.vocab --help` for its options)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument(
        "--rounds", type=int, default=3, help="pipeline mode: rounds of plain loop + Ray fit; medians are printed"
    )
    p.add_argument("--device", default="cuda", help="device mode: cuda or cpu")
    p.add_argument(
        "--networks",
        default="text8:416,text8:64,cifar10:32,cifar10:128,mnist:512",
        help="device mode: NAME[:BATCH],... of text8, cifar10, mnist",
    )
    p.add_argument("--official", default=None, help="device mode: a checkout of the official BFN code")
    p.add_argument("--warmup", type=int, default=4, help="device mode: untimed steps first")
    p.add_argument("--sample-steps", type=int, default=100, help="device mode: sampler steps")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="device mode: peak for MFU (H200 bf16)")
    _overrides(p)
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bfn", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train_and_eval, _add_sample_and_quality, _add_data_and_import, _add_bench):
        add(sub)
    for module in (
        "pipeline.sweeps.tune",
        "pipeline.sweeps.scaling",
        "pipeline.cluster.submit",
        "pipeline.cluster.devstack",
    ):
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    # before anything imports ray: Ray reads its node address (loopback) and ray.data its switches then
    ray_env_at_entry()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves overrides given after the options (`bfn eval CKPT --steps 0 data.uri=...`) over
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logs.configure(args.verbose)
    secrets.register_environment()  # this environment's secrets: masked by value in logs, MLflow and manifests
    secrets.install_log_masking()
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"bfn: error: {secrets.mask_text(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bfn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

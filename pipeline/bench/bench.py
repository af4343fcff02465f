"""`bfn bench`: performance as ratios measured side by side in one run (never timed tests).

step      one full training step of the small MNIST U-Net (continuous-time loss forward and
          backward, grad clip 5, AdamW, EMA) at batch 32 on 2 threads, beside the bare network
          forward+backward of the same net and batch (a step cannot beat that), and beside a
          deliberately naive step (channels-first, float64 loss math) for scale.
pipeline  steady-state samples/s of the Ray Train loop vs a plain single-process loop of the same
          step (run before and after the Ray fits; startup reported separately); Ray Data
          throughput vs what one worker consumes; 2 workers x 1 CPU vs 1 worker x 2 CPUs at the
          same global batch (efficiency); who had the cores during the Ray loop (training worker,
          Ray's daemons and actors), and samples per CPU-second of the training process itself.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from bfn import EMA
from pipeline import data as data_lib
from pipeline.bench.device import main as device_main
from pipeline.bench.vocab import main as vocab_main
from pipeline.config import load
from pipeline.core.build import build_model, build_optimizer
from pipeline.training.driver import fit
from pipeline.training.ray_runtime import init_ray
from pipeline.training.steps import train_step

log = logging.getLogger(__name__)


def _time_interleaved(fns: dict, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so that load spikes on a
    shared machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_step(steps: int = 20, batch_size: int = 32, threads: int = 2) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load(["experiment=mnist_local"])
    model = build_model(cfg)
    ema = EMA(model, cfg.optim.ema_decay)
    optimizer = build_optimizer(cfg, model)
    x = (torch.rand(batch_size, 28, 28, 1) < 0.13).long()
    inputs = torch.randn(batch_size, 28, 28, 1)
    t = torch.rand(batch_size)

    def bare():
        model.net.zero_grad(set_to_none=True)
        model.net(inputs, t).square().mean().backward()

    def step():
        train_step(model, model, x, optimizer, ema, grad_clip=5.0, lr=cfg.optim.lr)

    results = _time_interleaved({"bare_net_fwd_bwd_s": bare, "train_step_s": step}, steps)
    results["step_over_bare"] = results["train_step_s"] / results["bare_net_fwd_bwd_s"]
    results["samples_per_s"] = batch_size / results["train_step_s"]
    print(
        f"\n== training step: {cfg.net.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params), batch {batch_size}, {threads} threads, median of {steps} =="
    )
    print(f"  bare network fwd+bwd   {results['bare_net_fwd_bwd_s'] * 1e3:8.1f} ms   (1.00x, lower bound)")
    print(
        f"  full training step     {results['train_step_s'] * 1e3:8.1f} ms   "
        f"({results['step_over_bare']:.2f}x the bare net; {results['samples_per_s']:.0f} samples/s)"
    )
    print("  reference: the official code measured 380-410 ms for this step on these machines")
    return results


IDLE = "Ray idle workers"
# roles of the processes on the machine, by the start of their command line (psutil's cmdline)
_ROLES = (
    ("training worker", ("ray::RayTrainWorker",)),
    (
        "Ray Train actors",
        ("ray::TrainController", "ray::PlacementGroupCleaner", "ray::SynchronizationActor", "ray::PreemptionWatcher"),
    ),
    (
        "Ray Data actors",
        ("ray::_StatsActor", "ray::DatasetManager", "ray::SplitCoordinator", "ray::_AutoscalingCoordinatorActor"),
    ),
    (IDLE, ("ray::IDLE",)),
    (
        "Ray daemons",
        (
            "raylet",
            "gcs_server",
            "dashboard",
            "log_monitor",
            "monitor.py",
            "ray::DashboardAgent",
            "ray::RuntimeEnvAgent",
            "ray-dashboard-",
        ),
    ),
)


def _role(cmdline: list[str], pid: int) -> str:
    if pid == os.getpid():
        return "this driver"
    line, head = " ".join(cmdline), [Path(token).name for token in cmdline[:3]]  # e.g. python -u .../log_monitor.py
    for role, starts in _ROLES:
        if any(line.startswith(start) or any(name.startswith(start) for name in head) for start in starts):
            return role
    return "rest of the machine"


class CpuMeter:
    """CPU seconds of every process on the machine, sampled every ``interval`` s in a thread, so
    that the share of the cores each role had over a time span can be read afterwards."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval, self.samples, self.roles = interval, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def _snapshot(self) -> tuple[float, dict[int, float]]:
        seconds = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                times = proc.cpu_times()
                # an idle Ray worker is renamed when it becomes an actor (the training worker among them)
                if self.roles.get(proc.pid, IDLE) == IDLE:
                    self.roles[proc.pid] = _role(proc.cmdline(), proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            seconds[proc.pid] = times.user + times.system
        return time.time(), seconds

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._snapshot())
            self._stop.wait(self.interval)

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self, start: float, end: float) -> dict[str, float]:
        """Fraction of all cores each role used between the first sample at or after ``start``
        and the last at or before ``end`` ({} when the span holds fewer than two samples)."""
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        if len(inside) < 2:
            return {}
        (t0, first), (t1, last) = inside[0], inside[-1]
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        used: dict[str, float] = {}
        for pid, seconds in last.items():
            role = self.roles.get(pid, "rest of the machine")
            used[role] = used.get(role, 0.0) + seconds - first.get(pid, 0.0)  # a new process: its whole life
        return {role: value / capacity for role, value in sorted(used.items(), key=lambda kv: -kv[1])}


def _fit_throughput(overrides: list[str], root: Path, user: list[str]) -> dict:
    cfg = load(
        [
            "experiment=mnist_local",
            *user,
            "tracking=none",
            f"run.storage_path={root / 'ray'}",
            "trainer.val_every=100000",
            "eval.val_batches=1",
            "eval.nll_steps=0",
            "eval.num_samples=0",
            "trainer.checkpoint_every=100000",
            *overrides,
        ]
    )
    started = time.perf_counter()
    with CpuMeter() as meter:
        summary = fit(cfg)
    wall = time.perf_counter() - started
    windows = summary["samples_per_s_windows"][1:] or summary["samples_per_s_windows"]
    steady = statistics.median(windows)
    loop_seconds = cfg.trainer.max_steps * cfg.data.batch_size / steady
    logged = summary["windows_logged_at"]  # the steady state: from the end of the first window to the last
    return {
        "samples_per_s": steady,
        "wall_s": wall,
        "startup_s": max(wall - loop_seconds, 0.0),
        "cpu": meter.shares(logged[0], logged[-1]),
    }


def _plain_throughput(
    uri: str, steps: int, user: list[str], batch_size: int = 32, threads: int = 2
) -> dict[str, float]:
    """The same step in one process with the plain pyarrow reader (no Ray); its share of the cores."""
    torch.set_num_threads(threads)
    cfg = load(["experiment=mnist_local", *user])
    model, batches = build_model(cfg), data_lib.iter_batches(uri, "train", "mnist", batch_size=batch_size)
    ema, optimizer = EMA(model, cfg.optim.ema_decay), build_optimizer(cfg, model)

    def one():
        x = torch.from_numpy(next(batches)["x"]).long()
        train_step(model, model, x, optimizer, ema, grad_clip=5.0, lr=cfg.optim.lr)

    for _ in range(3):
        one()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one()
    wall = time.perf_counter() - started
    share = (time.process_time() - cpu) / wall / (os.cpu_count() or 1)
    return {"samples_per_s": steps * batch_size / wall, "cpu_share": share}


def _data_throughput(uri: str, seconds: float = 10.0) -> float:
    """Rows/s Ray Data delivers to a no-op loop (batching; MNIST is preprocessed by the driver, see ray_dataset)."""
    ds = data_lib.ray_dataset(uri, "train", "mnist", seed=0)
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            rows += len(batch["x"])
            if time.perf_counter() - started > seconds:
                break
    return rows / (time.perf_counter() - started)


def bench_pipeline(steps: int = 60, overrides: list[str] | None = None, rounds: int = 3) -> dict[str, float]:
    """``rounds`` rounds of: plain loop, then Ray Train with 1 worker in a fresh runtime; a last plain
    loop closes them. Each round's ratio divides its fit's rate by the mean of the plain loops around
    it, so a drift of the machine's speed hits both sides; the results are medians over rounds (a
    slow or busy machine moves one round, not the median). The first round also fits 2 workers and
    times Ray Data's delivery. ``overrides``: Hydra overrides of the mnist_local preset."""
    user = list(overrides or [])
    common = [f"trainer.max_steps={steps}", f"trainer.log_every={max(steps // 6, 1)}"]
    cfg = load(["experiment=mnist_local", *user, *common])
    uri = cfg.data.uri
    plains, fits = [], []
    with tempfile.TemporaryDirectory(prefix="bfn-bench-") as folder:
        root = Path(folder)
        for r in range(rounds):
            plains.append(_plain_throughput(uri, steps, user))
            init_ray(cfg)
            fits.append(_fit_throughput([*common, "trainer=cpu_1", f"run.name=bench1_{r}"], root, user))
            if r == 0:
                two = _fit_throughput([*common, f"run.name=bench2_{r}"], root, user)
                data = _data_throughput(uri)
            ray.shutdown()
            log.info(
                "bench pipeline: round %d/%d: plain %.1f, Ray %.1f samples/s, start-up %.1f s",
                r + 1,
                rounds,
                plains[-1]["samples_per_s"],
                fits[-1]["samples_per_s"],
                fits[-1]["startup_s"],
            )
        plains.append(_plain_throughput(uri, steps, user))
    rates = [p["samples_per_s"] for p in plains]
    around = [(rates[r] + rates[r + 1]) / 2 for r in range(rounds)]
    ratios = [f["samples_per_s"] / plain for f, plain in zip(fits, around, strict=True)]
    startups = [f["startup_s"] for f in fits]
    plain_share = statistics.mean(p["cpu_share"] for p in plains)
    per_cpu = [  # samples per CPU-second of the training process: the loop's own host cost
        (f["samples_per_s"] / f["cpu"]["training worker"]) / (plain / plain_share)
        for f, plain in zip(fits, around, strict=True)
        if f["cpu"].get("training worker")
    ]
    one = fits[0]
    results = {
        "rounds": rounds,
        "plain_samples_per_s": statistics.median(rates),
        "plain_spread": (max(rates) - min(rates)) / statistics.median(rates),
        "ray_1worker_samples_per_s": statistics.median(f["samples_per_s"] for f in fits),
        "ray_over_plain": statistics.median(ratios),
        "ray_over_plain_rounds": ratios,
        "ray_startup_s": statistics.median(startups),
        "ray_startup_s_rounds": startups,
        "ray_2workers_samples_per_s": two["samples_per_s"],
        "two_over_one_workers": two["samples_per_s"] / one["samples_per_s"],
        "data_rows_per_s": data,
        "data_over_consumption": data / one["samples_per_s"],
        "worker_cpu_share": one["cpu"].get("training worker"),  # None: no sample found the training process
        "plain_cpu_share": plain_share,
        "per_cpu_ray_over_plain": statistics.median(per_cpu) if per_cpu else None,
    }
    _print_pipeline(results, steps, rates, one["cpu"])
    return results


def _print_pipeline(results: dict, steps: int, rates: list[float], shares: dict[str, float]) -> None:
    rounds = results["rounds"]
    listed = lambda values, fmt: ", ".join(fmt.format(v) for v in values)  # noqa: E731
    print(f"\n== pipeline: mnist_local preset, batch 32, {steps} steps per fit, medians over {rounds} rounds ==")
    print(
        f"  plain single-process loop    {results['plain_samples_per_s']:8.1f} samples/s   "
        f"(1.00x; runs {listed(rates, '{:.1f}')})"
    )
    print(
        f"  Ray Train, 1 worker x 2 CPU  {results['ray_1worker_samples_per_s']:8.1f} samples/s   "
        f"({results['ray_over_plain']:.2f}x plain, goal >= 0.95; "
        f"rounds {listed(results['ray_over_plain_rounds'], '{:.2f}x')})"
    )
    print(
        f"  start-up per fit             {results['ray_startup_s']:8.1f} s           "
        f"(goal <= 14.8 s; rounds {listed(results['ray_startup_s_rounds'], '{:.1f} s')})"
    )
    print(
        f"  Ray Train, 2 workers x 1 CPU {results['ray_2workers_samples_per_s']:8.1f} samples/s   "
        f"({results['two_over_one_workers']:.2f}x one worker, same 2 cores; round 1)"
    )
    print(
        f"  Ray Data delivery            {results['data_rows_per_s']:8.1f} rows/s      "
        f"({results['data_over_consumption']:.1f}x what one worker consumes; goal >= 10)"
    )
    print(
        f"  share of the {os.cpu_count()} cores in round 1's 1-worker steady state "
        f"(plain loop: {results['plain_cpu_share']:.1%}):"
    )
    for role, share in shares.items():
        print(f"    {role:<22} {share:6.1%}")
    if results["per_cpu_ray_over_plain"] is None:
        print("  per CPU-second of the training process: not measured (no CPU sample found the training process)")
    else:
        print(
            f"  per CPU-second of the training process, Ray Train's loop does "
            f"{results['per_cpu_ray_over_plain']:.2f}x the plain loop's samples (median)"
        )


def main(args) -> int:
    if args.which == "device":
        return device_main(args)
    if args.which == "vocab":
        return vocab_main(
            ["--device", "cpu" if args.device == "cuda" and not torch.cuda.is_available() else args.device]
        )
    if args.which in ("all", "step"):
        bench_step(args.steps)
    if args.which in ("all", "pipeline"):
        bench_pipeline(max(args.steps * 3, 12), args.overrides, rounds=args.rounds)
    return 0

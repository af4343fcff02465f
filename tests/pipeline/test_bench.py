"""The benchmark command runs (its numbers are printed by `bfn bench`, never asserted as times)."""

from __future__ import annotations

from pipeline.bench import vocab as vocab_bench
from pipeline.bench.bench import bench_step


def test_bench_step_measures_both_sides(capsys):
    results = bench_step(steps=1, batch_size=4, threads=1)
    assert results["train_step_s"] > 0 and results["bare_net_fwd_bwd_s"] > 0
    assert results["step_over_bare"] == results["train_step_s"] / results["bare_net_fwd_bwd_s"]
    assert "full training step" in capsys.readouterr().out


def test_device_bench_runs_the_paper_step_path_on_cpu(capsys):
    """The CUDA benchmark's code path (pipeline builders, train_step, sampler, FLOP count), on the CPU
    with a tiny network; the GPU numbers themselves need a GPU."""
    from pipeline.cli import main

    argv = [
        "bench",
        "device",
        "net=mnist_unet_tiny",
        "--device",
        "cpu",
        "--networks",
        "mnist:2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--sample-steps",
        "2",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== mnist, batch 2 ==" in out and "training step" in out and "TFLOP/s" in out and "sampling" in out


def test_flops_are_counted_for_a_forward_and_backward():
    import torch

    from pipeline.bench.device import example_batch, ours, train_flops

    _, model, _, _ = ours("mnist", torch.device("cpu"), ["net=mnist_unet_tiny"])
    one, two = (train_flops(model, example_batch("mnist", b, "cpu")) for b in (1, 2))
    assert one > 0 and two == 2 * one  # linear in the batch


def test_cpu_meter_attributes_core_time_to_roles(monkeypatch):
    """The pipeline benchmark's profile: processes sorted into roles by command line, and each
    role's share of all cores over a span read from the samples inside it."""
    import os

    from pipeline.bench import bench

    assert bench._role(["ray::RayTrainWorker", ""], 1) == "training worker"
    assert bench._role(["/venv/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=x"], 1) == "Ray daemons"
    assert bench._role(["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py"], 1) == "Ray daemons"
    assert bench._role(["ray::TrainController.run"], 1) == "Ray Train actors"
    assert bench._role(["ray::IDLE"], 1) == "Ray idle workers"
    assert bench._role(["/usr/sbin/sshd"], 1) == "rest of the machine"
    assert bench._role(["python"], os.getpid()) == "this driver"

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    meter = bench.CpuMeter()
    meter.roles = {1: "training worker", 2: "Ray daemons", 3: "Ray Data actors"}
    meter.samples = [
        (0.0, {1: 0.0, 2: 0.0}),
        (10.0, {1: 5.0, 2: 1.0}),
        (20.0, {1: 23.0, 2: 1.5, 3: 0.5}),
        (30.0, {1: 40.0, 2: 2.0, 3: 0.5}),
    ]
    shares = meter.shares(5.0, 25.0)  # the samples at 10 and 20 s: 20 core-seconds
    assert shares == {"training worker": 18 / 20, "Ray Data actors": 0.5 / 20, "Ray daemons": 0.5 / 20}
    assert list(shares)[0] == "training worker"  # largest first
    assert meter.shares(11.0, 19.0) == {}  # fewer than two samples inside


def test_an_idle_worker_that_becomes_the_training_worker_is_filed_as_one(monkeypatch):
    """Ray starts a worker process as ray::IDLE and renames it when it becomes an actor: the meter
    must not keep the first name (it filed the training worker under idle workers)."""
    from types import SimpleNamespace

    import psutil

    from pipeline.bench import bench

    title = ["ray::IDLE"]
    proc = SimpleNamespace(pid=4242, cpu_times=lambda: SimpleNamespace(user=1.0, system=0.0), cmdline=lambda: title)
    monkeypatch.setattr(psutil, "process_iter", lambda attrs=None: [proc])
    meter = bench.CpuMeter()
    meter._snapshot()
    assert meter.roles[4242] == bench.IDLE
    title[:] = ["ray::RayTrainWorker.run_train_fn"]
    meter._snapshot()
    assert meter.roles[4242] == "training worker"
    title[:] = ["ray::IDLE"]  # a role, once known, is kept (an actor's process is never reused)
    meter._snapshot()
    assert meter.roles[4242] == "training worker"


def test_bench_vocab_measures_before_and_after_and_reports_ratios():
    """`bfn bench vocab` at toy sizes: both versions run (in fresh processes), the table has their
    ratios, a K x K receiver over the budget is reported as skipped with its size, and memory
    linearity is stated as memory per added class."""
    args = vocab_bench.parse(["--vocabs", "300", "--batch", "2", "--length", "8", "--repeats", "1"])
    args.budget_gib = 1e-6  # K = 300's K x K receiver (1.4 MB) counts as not fitting
    rows = vocab_bench.run(args)
    assert [(r["K"], r["what"]) for r in rows] == [(300, "step"), (300, "nll")]
    assert all(r["after"]["seconds"] > 0 and r["after"]["peak_bytes"] >= 0 for r in rows)
    assert rows[0]["before"] is not None and rows[1]["before_skipped"] and rows[1]["before"] is None
    text = vocab_bench.table(rows, args)
    assert "n/a (0 GiB K x K)" in text and text.splitlines()[2].split()[7].endswith("x")  # the step's time ratio

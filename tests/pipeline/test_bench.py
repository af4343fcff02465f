"""The benchmark command runs (its numbers are printed by `bfn bench`, never asserted as times)."""

from __future__ import annotations

from pipeline.evaluation.bench import bench_step


def test_bench_step_measures_both_sides(capsys):
    results = bench_step(steps=1, batch_size=4, threads=1)
    assert results["train_step_s"] > 0 and results["bare_net_fwd_bwd_s"] > 0
    assert results["step_over_bare"] == results["train_step_s"] / results["bare_net_fwd_bwd_s"]
    assert "full training step" in capsys.readouterr().out


def test_device_bench_runs_the_paper_step_path_on_cpu(capsys):
    """The CUDA benchmark's code path (pipeline builders, train_step, sampler, FLOP count), on the CPU
    with a tiny network; the GPU numbers themselves need a GPU."""
    from pipeline.cli import main

    argv = ["bench", "device", "net=mnist_unet_tiny", "--device", "cpu", "--networks", "mnist:2",
            "--steps", "1", "--warmup", "0", "--sample-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== mnist, batch 2 ==" in out and "training step" in out and "TFLOP/s" in out and "sampling" in out


def test_flops_are_counted_for_a_forward_and_backward():
    import torch

    from pipeline.evaluation.bench_device import example_batch, ours, train_flops

    _, model, _, _ = ours("mnist", torch.device("cpu"), ["net=mnist_unet_tiny"])
    one, two = (train_flops(model, example_batch("mnist", b, "cpu")) for b in (1, 2))
    assert one > 0 and two == 2 * one  # linear in the batch

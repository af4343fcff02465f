"""The benchmark command runs (its numbers are printed by `bfn bench`, never asserted as times)."""

from __future__ import annotations

from pipeline.evaluation.bench import bench_step


def test_bench_step_measures_both_sides(capsys):
    results = bench_step(steps=1, batch_size=4, threads=1)
    assert results["train_step_s"] > 0 and results["bare_net_fwd_bwd_s"] > 0
    assert results["step_over_bare"] == results["train_step_s"] / results["bare_net_fwd_bwd_s"]
    assert "full training step" in capsys.readouterr().out

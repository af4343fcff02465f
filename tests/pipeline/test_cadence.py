"""The loop's cadence: which steps log, validate, checkpoint and report (every rank alike)."""

from __future__ import annotations

from unittest.mock import patch

from hypothesis import given
from hypothesis import strategies as st

from pipeline.training.cadence import Cadence


def test_smoke_cadence_step_by_step():
    cadence = Cadence(max_steps=6, log_every=2, val_every=3, checkpoint_every=3)
    table = {s: cadence.actions(s) for s in range(1, 7)}
    assert [s for s, a in table.items() if a.log] == [2, 4, 6]
    assert [s for s, a in table.items() if a.validate] == [3, 6]
    assert [s for s, a in table.items() if a.checkpoint] == [3, 6]
    assert [s for s, a in table.items() if a.report] == [2, 3, 4, 6]  # a validation-only step reports too
    assert [s for s, a in table.items() if a.last] == [6]


def test_stop_makes_the_step_the_last_one_with_everything():
    actions = Cadence(max_steps=100, log_every=10, val_every=50, checkpoint_every=50).actions(20, stop=True)
    assert actions.last and actions.log and actions.validate and actions.checkpoint and actions.report


@given(st.integers(1, 50), st.integers(1, 20), st.integers(1, 20), st.integers(1, 20), st.integers(1, 60))
def test_every_action_is_reported_and_the_last_step_does_everything(max_steps, log, val, ckpt, step):
    actions = Cadence(max_steps, log, val, ckpt).actions(step)
    # report is the barrier: anything rank 0 does alone (validate) or all do (log, checkpoint) reports
    assert actions.report == (actions.log or actions.validate or actions.checkpoint)
    if step >= max_steps:
        assert actions.last and actions.log and actions.validate and actions.checkpoint
    else:
        assert actions.log == (step % log == 0) and actions.validate == (step % val == 0)


def test_the_window_reads_device_statistics_once_per_log_interval():
    """Skipped steps leave the mean loss, count towards the run of bad steps (carried across
    windows) and the window's skip count; nothing is read until read()."""
    import torch

    from pipeline.training.progress import Window
    from pipeline.training.steps import StepResult

    def result(loss: float, skipped: bool) -> StepResult:
        return StepResult(torch.tensor(loss), torch.tensor(2.0), torch.tensor(skipped))

    window = Window(torch.device("cpu"))
    for loss, skipped in [(1.0, False), (float("nan"), True), (3.0, False), (float("inf"), True)]:
        window.add(result(loss, skipped))
    stats = window.read(world=1)
    assert stats["loss"] == 2.0 and stats["good"] == 2 and stats["skipped"] == 2 and stats["worst_run"] == 1
    window.add(result(float("nan"), True))  # the run that ended the last window goes on: 2 in a row
    window.add(result(float("nan"), True))
    stats = window.read(world=1)
    assert stats["worst_run"] == 3 and stats["skipped"] == 2 and stats["good"] == 0 and stats["loss"] == 0.0


def test_eta_counts_down_to_whichever_comes_first_steps_or_the_time_budget():
    from pipeline.training.progress import Progress

    by_steps = Progress(max_steps=1000, loop_started=0.0)
    budgeted = Progress(max_steps=1000, budget_seconds=60.0, loop_started=0.0)
    with patch("time.perf_counter", return_value=10.0):  # 100 steps in 10 s
        assert by_steps.eta(100) == "00:01:30"  # 900 steps left at 10 steps/s
        assert budgeted.eta(100) == "00:00:50"  # but the budget ends 50 s from now
    with patch("time.perf_counter", return_value=70.0):
        assert budgeted.eta(100) == "00:00:00"  # past the budget: stops at the next log step

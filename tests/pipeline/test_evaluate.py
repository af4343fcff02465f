"""`bfn eval` and `bfn sample` on a checkpoint written by the pipeline's own checkpointing (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bfn import EMA
from pipeline import data as data_lib
from pipeline.config import compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer
from pipeline.evaluation.evaluate import evaluate, sample
from tests.conftest import REPO
from tests.pipeline.test_data import write_idx_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    source = root / "idx"
    source.mkdir()
    write_idx_folder(source, 300, 40)
    data_lib.prepare("mnist", str(root / "shards"), source=str(source), progress=False)
    overrides = ["experiment=smoke", f"data.uri={root / 'shards'}", "data.val_batch_size=20"]
    raw = compose(overrides)
    cfg = load(overrides)
    model = build_model(cfg)
    folder = checkpointing.save(
        root / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": 3, "epoch": 0},
        config=raw,
    )
    return folder


def test_eval_reports_nll_with_standard_errors(checkpoint, capsys):
    estimate = evaluate(checkpoint, num_steps=10, repeats=2)
    assert estimate.num_repeats == 2 and estimate.num_examples == 40
    assert estimate.total == pytest.approx(estimate.loss + estimate.reconstruction)
    assert estimate.total_se > 0
    out = capsys.readouterr().out
    assert "nats/image" in out and "bits/dim" in out and "(10-step loss L^10 " in out


def test_sample_writes_a_png_grid(checkpoint, tmp_path):
    path = sample(checkpoint, num=4, num_steps=3, out=tmp_path / "grid")
    assert path.suffix == ".png" and path.stat().st_size > 0


def test_sample_writes_under_runs_never_into_the_checkpoint(checkpoint, tmp_path, monkeypatch):
    """The checkpoint folder is sealed (COMPLETE lists its files) and may be shared: by default the
    grid goes to <paths.runs_dir>/samples/, named after the run folder, checkpoint, sampler, NFE and seed."""
    monkeypatch.setenv("BFN_RUNS_DIR", str(tmp_path / "runs"))
    before = sorted(p.name for p in checkpoint.iterdir())
    path = sample(checkpoint, num=4, num_steps=3, seed=2)
    assert path == tmp_path / "runs" / "samples" / f"{checkpoint.parent.name}_ckpt_paper_nfe4_seed2.png"
    assert path.stat().st_size > 0 and sorted(p.name for p in checkpoint.iterdir()) == before
    checkpointing.verify(checkpoint)


def test_cli_eval_sample_and_errors(checkpoint, tmp_path):
    def bfn(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )

    ok = bfn("eval", str(checkpoint), "--steps", "5", "--max-batches", "1")
    bad = bfn("eval", str(checkpoint), "--steps", "many")
    assert bad.returncode == 2 and "--steps" in bad.stderr
    assert ok.returncode == 0, ok.stderr
    assert "NLL" in ok.stdout
    missing = bfn("eval", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "ema.pt").write_bytes(b"")
    partial = bfn("sample", str(tmp_path / "partial"))
    assert partial.returncode == 2 and "incomplete" in partial.stderr


def test_checkpoint_round_trip_is_exact(checkpoint):
    state = checkpointing.read(checkpoint)
    model = build_model(load(["experiment=smoke"]))
    model.load_state_dict(state["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 3


def test_eval_in_continuous_time_is_l_inf_plus_reconstruction(checkpoint, capsys):
    """--steps 0 / inf: n = infinity, the bound the reference reports for text8."""
    from pipeline.evaluation.evaluate import parse_steps

    assert parse_steps("inf") == 0 and parse_steps("0") == 0 and parse_steps("784") == 784
    estimate = evaluate(checkpoint, num_steps="inf", repeats=2)
    assert estimate.num_repeats == 2 and estimate.total == pytest.approx(estimate.loss + estimate.reconstruction)
    out = capsys.readouterr().out
    assert "n = inf" in out and "(continuous-time loss L∞ " in out and "n-step" not in out  # the paper's name


def test_eval_repeats_until_the_target_standard_error(checkpoint, caplog):
    loose = evaluate(checkpoint, num_steps=5, repeats=6, target_se=1e9)
    assert loose.num_repeats == 2  # at least two passes give a standard error over passes
    tight = evaluate(checkpoint, num_steps=5, repeats=3, target_se=1e-12)
    assert tight.num_repeats == 3 and "not reached" in caplog.text
    with pytest.raises(Exception, match="--target-se"):
        evaluate(checkpoint, num_steps=5, target_se=-1.0)


def test_text8_eval_windows_follow_eval_text8_stride(tmp_path):
    """The reference evaluates text8 at every offset: eval.text8_stride sets where test windows start."""
    from pipeline.config import load

    source = tmp_path / "src"
    source.mkdir()
    (source / "text8").write_text(" the cat sat on the mat" * 400)
    data_lib.prepare("text8", str(tmp_path / "text8"), source=str(source), seq_len=46, progress=False)
    overrides = [
        "experiment=text8",
        "net=text8_transformer_tiny",
        f"data.uri={tmp_path / 'text8'}",
        "data.seq_len=46",
        "data.batch_size=4",
        "trainer=cpu_1",
        "data.val_batch_size=64",
    ]
    cfg = load(overrides)
    model = build_model(cfg)
    folder = checkpointing.save(
        tmp_path / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": 0, "epoch": 0},
        config=compose(overrides),
    )
    rows = evaluate(folder, ["eval.text8_stride=46"], num_steps=0, repeats=1)
    every_23 = evaluate(folder, ["eval.text8_stride=23"], num_steps=0, repeats=1)
    assert every_23.num_examples == 2 * rows.num_examples - 1  # a window between each pair of rows


def test_matplotlib_builds_its_font_cache_silently(tmp_path):
    """A first plot on a machine (as `make run`'s worker draws the loss curves) builds matplotlib's
    font cache; its INFO notice "generated new fontManager" is not for a person. A fresh process,
    the worker's logging (root at INFO) and an empty MPLCONFIGDIR, so the cache is really built."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='[bfn] %(message)s')\n"
        "from pipeline.evaluation import figures\n"
        "figures.save_curves({'loss': [(1, 2.0), (2, 1.0)]}, 'curves.png', 'run')\n"
    )
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "curves.png").stat().st_size > 0 and list((tmp_path / "mpl").glob("fontlist-*.json"))
    assert "fontManager" not in result.stdout + result.stderr, result.stderr

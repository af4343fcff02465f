"""Sample-quality metrics, the classifier cache, `bfn quality` and `bfn sample --sampler/--nfe` (no Ray).

Longer than 500 lines: the metrics, the unconditional and conditional rows and the CLI share one checkpoint fixture.
"""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

import bfn.samplers
from bfn import EMA
from pipeline import data as data_lib
from pipeline.cli import main as bfn_main
from pipeline.config import Config, ConfigError, compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_model, build_optimizer
from pipeline.evaluation.quality import classifier as clf
from pipeline.evaluation.quality import metrics as qm
from pipeline.evaluation.quality.hook import quality_point
from tests.conftest import REPO
from tests.pipeline.test_data import write_idx_folder

SMALL = clf.ClassifierSpec(channels=(4, 8), feature_dim=8, epochs=1, min_steps=4, batch_size=32)


def _prepare_mnist(root, *, seed: int = 0):
    source = root / f"idx{seed}"
    write_idx_folder(source, 300, 40, seed=seed)
    data_lib.prepare("mnist", str(root / f"shards{seed}"), source=str(source), progress=False)
    return str(root / f"shards{seed}")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return _prepare_mnist(tmp_path_factory.mktemp("quality_data"))


def _save_fresh(folder, overrides: list[str]):
    """A checkpoint of a freshly built model (seed 0) for ``overrides``."""
    cfg = load(overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    return checkpointing.save(
        folder / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(cfg, model),
        train_state={"step": 3, "epoch": 0},
        config=compose(overrides),
    )


@pytest.fixture(scope="module")
def checkpoint(mnist, tmp_path_factory):
    return _save_fresh(
        tmp_path_factory.mktemp("quality_ckpt"), ["experiment=smoke", f"data.uri={mnist}", "data.val_batch_size=20"]
    )


@pytest.fixture(scope="module")
def cache(mnist, tmp_path_factory):
    """A cache holding the default classifier for the tiny data (trained once, ~10 s)."""
    folder = tmp_path_factory.mktemp("quality_cache")
    clf.load_or_train(mnist, "mnist", 2, folder)
    return folder


# ---------------------------------------------------------------------------------- the metrics
def test_frechet_distance_is_zero_for_identical_features_and_grows_with_a_mean_shift():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    stats = qm.feature_stats(features)
    assert qm.frechet_distance(*stats, *qm.feature_stats(features.copy())) == pytest.approx(0, abs=1e-9)
    shifts = [qm.frechet_distance(*stats, stats[0] + d, stats[1]) for d in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([6 * 0.25, 6 * 1.0, 6 * 4.0], rel=1e-9)  # ||d 1||^2 for equal covariances


def test_frechet_distance_matches_closed_forms_for_gaussians():
    # diagonal (commuting) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert qm.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 M with real non-negative eigenvalues
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    cross = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * cross
    assert qm.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        qm.feature_stats(np.ones((1, 3)))


def test_label_statistics_and_character_distance():
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert qm.label_stats(one_hot) == pytest.approx({"confidence": 1.0, "label_entropy_bits": np.log2(10)})
    collapsed = qm.label_stats(np.tile([0.5, 0.5] + [0.0] * 8, (7, 1)))
    assert collapsed == pytest.approx({"confidence": 0.5, "label_entropy_bits": 1.0})
    assert qm.js_divergence_bits([1, 2, 3], [2, 4, 6]) == pytest.approx(0, abs=1e-12)
    assert qm.js_divergence_bits([1, 0], [0, 1]) == pytest.approx(1.0)


def test_spelling_accuracy_on_a_known_string():
    vocabulary = {"the", "cat", "sat", "on", "mat"}
    accuracy, words = qm.spelling_accuracy(["ca the cat sat on teh mat xy", "nospaces"], vocabulary)
    assert (accuracy, words) == (pytest.approx(5 / 6), 6)  # the cut pieces 'ca', 'xy' and 'nospaces' are not words
    assert qm.spelling_accuracy(["nospaces"], vocabulary) == (0.0, 0)


def test_text_scorer_on_a_prepared_text8(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "text8").write_text(" the cat sat on the mat" * 400)
    data_lib.prepare("text8", str(tmp_path / "text8"), source=str(source), seq_len=46, progress=False)
    scorer = qm.TextScorer(str(tmp_path / "text8"))
    assert scorer.vocabulary == {"the", "cat", "sat", "on", "mat"}
    ids = torch.from_numpy(data_lib.text8_encode("x the cat sta on teh mat x" * 2).astype(np.int64))
    scores = scorer.score(ids.reshape(2, -1))
    assert scores["spelling_accuracy"] == pytest.approx(4 / 6) and scores["words"] == 12
    exact = next(data_lib.iter_batches(str(tmp_path / "text8"), "test", "text8", batch_size=1000))["x"]
    assert scorer.score(exact)["char_js_bits"] == pytest.approx(0, abs=1e-12)
    assert 0 < scores["char_js_bits"] < 0.1


# ------------------------------------------------------------------------------ classifier cache
def test_classifier_cache_is_reused_and_invalidated_by_new_data(mnist, tmp_path, monkeypatch):
    net, meta = clf.load_or_train(mnist, "mnist", 2, tmp_path / "cache", spec=SMALL)
    assert 0 <= meta["test_accuracy"] <= 1 and meta["test_rows"] == 40
    assert sorted(p.name for p in (tmp_path / "cache" / f"mnist-{meta['key']}").iterdir()) == [
        "classifier.pt",
        "meta.json",
    ]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(clf, "train", no_training)
    again, meta2 = clf.load_or_train(mnist, "mnist", 2, tmp_path / "cache", spec=SMALL)
    assert meta2["key"] == meta["key"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    other = _prepare_mnist(tmp_path, seed=1)  # different pixels: a different manifest
    with pytest.raises(AssertionError, match="cached classifier"):
        clf.load_or_train(other, "mnist", 2, tmp_path / "cache", spec=SMALL)
    with pytest.raises(AssertionError, match="cached classifier"):  # other settings, other key
        clf.load_or_train(mnist, "mnist", 2, tmp_path / "cache", spec=dataclasses.replace(SMALL, lr=1e-3))
    with pytest.raises(ConfigError, match="inside the pipeline package"):
        clf.load_or_train(mnist, "mnist", 2, REPO / "pipeline" / "cache", spec=SMALL)


def test_image_scorer_scores_the_test_split_near_zero(mnist, cache):
    scorer = qm.ImageScorer(mnist, "mnist", 2, cache, device=torch.device("cpu"))
    test = next(data_lib.iter_batches(mnist, "test", "mnist", batch_size=1000))["x"]
    assert scorer.score(test)["fd"] == pytest.approx(0, abs=1e-6)  # the reference's own rows
    same = np.ones((40, 28, 28, 1), np.uint8)
    scores, probs = scorer.score(same), scorer.features_and_probs(same[:1])[1][0]
    assert scores["fd"] > 0  # one repeated image: no spread, another mean
    assert scores["label_entropy_bits"] == pytest.approx(qm.entropy_bits(probs))  # no diversity beyond one sample's
    assert scores["confidence"] == pytest.approx(probs.max())


# ------------------------------------------------------------------------------------- commands
def test_quality_cli_prints_the_table(checkpoint, cache, tmp_path):
    out = tmp_path / "table"
    args = [
        "quality",
        str(checkpoint),
        "--sampler",
        "paper,ode2",
        "--nfe",
        "2,3",
        "--num",
        "4",
        "--seeds",
        "2",
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--grid",
        "uniform",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("| sampler | NFE | FD ↓ | confidence ↑") for line in lines)
    cells = {(c[0], c[1]): c for c in (line.strip("| ").split(" | ") for line in lines if line.startswith("| "))}
    assert {("paper", "2"), ("paper", "3"), ("ode2", "2"), ("ode2", "3")} <= set(cells)
    assert "±" in cells[("ode2", "3")][2]  # two seeds: a spread
    assert "test accuracy" in result.stdout and "on the uniform time grid" in result.stdout
    with (tmp_path / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["sampler"].startswith("data")
    assert [r["sampler"] for r in rows][1:] == ["paper", "paper", "ode2", "ode2"]
    assert all(float(r["fd_mean"]) >= 0 and r["seeds"] == "2" for r in rows[1:])
    assert (tmp_path / "table.md").read_text().count("\n| ") >= 5
    assert (tmp_path / "table_samples" / "ode2_nfe3_seed0.png").is_file()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--sampler", "paper,euler"], "--sampler"),
        (["--nfe", "5,0"], "--nfe"),
        (["--nfe", "ten"], "--nfe"),
        (["--num", "0"], "--num"),
        (["--num", "1"], "--num"),
        (["--seeds", "0"], "--seeds"),
        (["--grid", "cos"], "--grid"),
    ],
)
def test_quality_bad_flags_exit_2_naming_the_flag(checkpoint, cache, args, flag, capsys):
    assert bfn_main(["quality", str(checkpoint), "--cache", str(cache), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bfn: error: {flag}:") and "\n" not in err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--sampler", "euler"], "--sampler"),
        (["--nfe", "0"], "--nfe"),
        (["--nfe", "2.5"], "--nfe"),
        (["--steps", "-1"], "--steps"),
        (["--steps", "3", "--nfe", "4"], "--steps and --nfe"),
        (["--num", "0"], "--num"),
        (["--sampler", "sde2", "--grid", "cos"], "--grid"),
        (["--grid", "logsnr"], "--grid"),  # paper has no grid
    ],
)
def test_sample_bad_flags_exit_2_naming_the_flag(checkpoint, args, flag, capsys):
    assert bfn_main(["sample", str(checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bfn: error: {flag}:") and "\n" not in err


def test_sample_with_a_sampler_and_nfe(checkpoint, tmp_path, monkeypatch):
    from pipeline.evaluation.evaluate import sample

    monkeypatch.setenv("BFN_RUNS_DIR", str(tmp_path / "runs"))  # where a sample without --out goes

    assert (
        bfn_main(
            [
                "sample",
                str(checkpoint),
                "--sampler",
                "sde2",
                "--nfe",
                "1",
                "--num",
                "3",
                "--out",
                str(tmp_path / "sde2"),
            ]
        )
        == 0
    )
    assert (tmp_path / "sde2.png").stat().st_size > 0
    by_steps = sample(checkpoint, num=4, num_steps=3, out=tmp_path / "steps")
    by_nfe = sample(checkpoint, num=4, nfe=4, sampler="paper", out=tmp_path / "nfe")
    assert by_steps.read_bytes() == by_nfe.read_bytes()  # --steps n is --nfe n + 1
    assert sample(checkpoint, num=2, nfe=2, sampler="ode1") == (
        tmp_path / "runs" / "samples" / f"{checkpoint.parent.name}_ckpt_ode1_nfe2_seed0.png"
    )
    # the binary flow's default grid is logsnr: naming it changes nothing; a named grid reaches the solver
    default, logsnr = (
        sample(checkpoint, num=8, nfe=4, sampler="sde2", grid=g, out=tmp_path / f"g{g}") for g in (None, "logsnr")
    )
    assert default.read_bytes() == logsnr.read_bytes()
    seen = []
    solver_times = bfn.samplers.solver_times
    with patch("bfn.samplers.solver_times", lambda *a: seen.append(a[2]) or solver_times(*a)):
        sample(checkpoint, num=2, nfe=3, sampler="ode2", grid="uniform", out=tmp_path / "uniform")
    assert seen == ["uniform"]


# ---------------------------------------------------------------------------------- worker hook
def test_quality_point_logs_every_sampler_and_nfe(checkpoint, cache, tmp_path):
    from pipeline.evaluation.evaluate import load_model

    model, cfg = load_model(checkpoint)
    raw = {
        **cfg.raw,
        "eval": {
            **cfg.raw["eval"],
            "quality_samplers": ["paper", "ode1"],
            "quality_nfe": [2, 3],
            "quality_num": 4,
            "quality_cache": str(cache),
        },
    }
    metrics = quality_point(model.train(), Config.from_dict(raw), step=7, out_dir=tmp_path)
    for sampler in ("paper", "ode1"):
        for nfe in (2, 3):
            prefix = f"quality/{sampler}/nfe_{nfe}/"
            keys = ("fd", "confidence", "label_entropy_bits", "seconds_per_sample")
            assert {prefix + k for k in keys} <= set(metrics)
            assert (tmp_path / f"{sampler}_nfe{nfe}_step00000007.png").is_file()
    assert model.training  # the caller's mode is restored
    assert quality_point(model, cfg, step=7, out_dir=tmp_path) == {}  # no quality_samplers: off


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("quality_samplers", ["paper", "bogus"]),
        ("quality_samplers", "paper"),
        ("quality_nfe", [0]),
        ("quality_num", 1),
    ],
)
def test_quality_settings_name_the_bad_key(key, value):
    config = compose(["experiment=smoke"])
    config["eval"][key] = value
    with pytest.raises(ConfigError, match=f"eval.{key}"):
        Config.from_dict(config)


def test_config_validation_loads_no_quality_stack():
    """The config layer checks eval.quality_* from bfn.samplers alone (no evaluation import, no cycle)."""
    code = (
        "import sys; import pipeline.config as c; c.load(['experiment=smoke']); "
        "print(sorted(m for m in sys.modules if m.startswith(('pipeline.evaluation', 'pipeline.training', "
        "'pipeline.tracking', 'pyarrow', 'ray', 'mlflow'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_quality_table_for_text8(tmp_path):
    from pipeline.evaluation.quality.table import quality

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
    ]
    model = build_model(load(overrides))
    folder = checkpointing.save(
        tmp_path / "ckpt",
        model=model,
        ema=EMA(model, 0.9),
        optimizer=build_optimizer(load(overrides), model),
        train_state={"step": 0, "epoch": 0},
        config=compose(overrides),
    )
    rows, text = quality(folder, samplers="sde1", nfe="3", num=2, seeds=1, out=tmp_path / "t", cache=tmp_path / "c")
    assert [r.label for r in rows] == ["data (val split, 2 rows)", "sde1"]
    assert rows[0].stat("spelling_accuracy")[0] == pytest.approx(1.0)  # real windows of a 5-word text
    assert 0 <= rows[1].stat("spelling_accuracy")[0] <= 1 and rows[1].stat("char_js_bits")[0] > 0
    assert "| sampler | NFE | spelling accuracy ↑ | char JS (bits) ↓ | s/sample |" in text
    assert (tmp_path / "t_samples" / "sde1_nfe3_seed0.txt").is_file()


# ------------------------------------------------------------- conditional generation (issue 18.5)
@pytest.fixture(scope="module")
def cond_checkpoint(mnist, tmp_path_factory):
    overrides = ["experiment=smoke", f"data.uri={mnist}", "data.val_batch_size=20", "model=conditional"]
    return _save_fresh(tmp_path_factory.mktemp("quality_cond"), [*overrides, "eval.guidance=1.0"])


@pytest.mark.parametrize(("num", "classes"), [(10, 10), (23, 10), (40, 10), (7, 3)])
def test_balanced_labels_spread_the_samples_evenly_in_blocks(num, classes):
    from pipeline.evaluation.quality.conditional import balanced_labels

    labels = balanced_labels(num, classes)
    counts = np.bincount(labels.numpy(), minlength=classes)
    assert len(labels) == num and counts.max() - counts.min() <= 1 and len(counts) == classes
    assert torch.equal(labels, labels.sort().values)  # blocks: one grid row per class


def test_conditional_scores_count_the_requested_class_and_compare_each_class_with_its_own(mnist, cache):
    scorer = qm.ImageScorer(mnist, "mnist", 2, cache, device=torch.device("cpu"))
    batch = next(data_lib.iter_batches(mnist, "test", "mnist", batch_size=1000, labels=True))
    x, truth = batch["x"], batch["label"]
    predicted = scorer.features_and_probs(x)[1].argmax(1)
    assert scorer.score_conditional(x, predicted)["class_accuracy"] == 1.0
    assert scorer.score_conditional(x, (predicted + 1) % 10)["class_accuracy"] == 0.0
    scores = scorer.score_conditional(x, truth)  # the reference's own rows, class by class
    assert scores["class_accuracy"] == pytest.approx(float((predicted == truth).mean()))
    for c in range(10):
        enough = (truth == c).sum() >= 2
        assert (scores[f"fd_class_{c}"] == pytest.approx(0, abs=1e-6)) if enough else np.isnan(scores[f"fd_class_{c}"])
    assert scores["fd_class"] == pytest.approx(0, abs=1e-6) and scores["fd"] == pytest.approx(0, abs=1e-6)
    shuffled = scorer.score_conditional(x, np.roll(truth, 7))  # the wrong class's images: farther
    assert shuffled["fd_class"] > 0.01 and shuffled["fd"] == pytest.approx(0, abs=1e-6)


def test_quality_with_guidance_has_a_row_per_scale_beside_the_network_without_a_label(cond_checkpoint, cache, tmp_path):
    from pipeline.evaluation.quality.table import quality

    rows, text = quality(
        cond_checkpoint, samplers="paper", nfe="2", num=20, seeds=2, guidance="0,2", out=tmp_path / "g", cache=cache
    )
    assert [(r.label, r.guidance) for r in rows] == [
        ("data (val split, 3 rows)", None),  # the tiny data holds 3 val rows
        ("paper, no label", None),
        ("paper", 0.0),
        ("paper", 2.0),
    ]
    assert (
        "| sampler | NFE | w | FD ↓ | confidence ↑ | label entropy (bits) ↑ | class accuracy ↑ | FD per class" in text
    )
    assert "class_accuracy" not in rows[1].values and len(rows[2].values["class_accuracy"]) == 2
    with (tmp_path / "g.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["guidance"] for r in table] == ["", "", "0", "2"]
    assert {f"fd_class_{c}_mean" for c in range(10)} <= set(table[2])
    grid = Image.open(tmp_path / "g_samples" / "paper_nfe2_w2_seed0.png")
    assert grid.size == (3 * (2 * 29 + 1), 3 * (10 * 29 + 1))  # one row per class, 2 samples each


def test_inpainting_with_every_pixel_known_scores_exactly_as_the_originals(cond_checkpoint, cache, tmp_path):
    from pipeline.evaluation.quality.table import quality

    Image.new("L", (28, 28), 255).save(tmp_path / "all.png")
    kwargs = dict(samplers="paper,sde2", nfe="2", num=12, seeds=2, cache=cache)
    rows, _ = quality(cond_checkpoint, inpaint=str(tmp_path / "all.png"), out=tmp_path / "all", **kwargs)
    assert [r.label for r in rows] == [
        "originals (test images)",
        f"{tmp_path / 'all.png'} kept, the rest blank",
        f"paper, {tmp_path / 'all.png'} kept",
        f"sde2, {tmp_path / 'all.png'} kept",
    ]
    for row in rows[1:]:  # everything known: the completions are the originals
        assert row.values["class_accuracy"] == rows[0].values["class_accuracy"]
        assert row.values["fd"] == pytest.approx(rows[0].values["fd"], abs=1e-9)
    rows, text = quality(cond_checkpoint, inpaint="top-half", out=tmp_path / "top", particles="1,3", **kwargs)
    assert [r.label for r in rows][1:] == [
        "top-half kept, the rest blank",
        "paper, top-half kept",
        "sde2, top-half kept",
        "SMC, 3 particles, top-half kept",
    ]
    assert all(0 <= v <= 1 for r in rows for v in r.values["class_accuracy"])
    assert "test images completed from the top-half kept pixels" in text
    rows, _ = quality(cond_checkpoint, inpaint="top-half", out=tmp_path / "inf", particles="10", infer_class=True,
                      **{**kwargs, "samplers": "paper", "seeds": 1})  # fmt: skip
    assert rows[-1].label == "SMC, 10 particles, class inferred, top-half kept"
    assert (tmp_path / "inf_samples" / "smc10_inferred_nfe2_top-half_seed0.png").is_file()
    assert (tmp_path / "top_samples" / "paper_nfe2_top-half_seed0.png").is_file()


def test_text_fill_accuracy_beside_exact_unigram_baselines(tmp_path):
    from pipeline.evaluation.quality.table import quality

    source = tmp_path / "src"
    source.mkdir()
    (source / "text8").write_text(" the cat sat on the mat" * 400)
    data_lib.prepare("text8", str(tmp_path / "text8"), source=str(source), seq_len=46, progress=False)
    overrides = ["experiment=text8", "net=text8_transformer_tiny", f"data.uri={tmp_path / 'text8'}"]
    overrides += ["data.seq_len=46", "data.batch_size=4", "trainer=cpu_1"]
    folder = _save_fresh(tmp_path, overrides)
    rows, text = quality(folder, samplers="paper", nfe="2", num=3, seeds=1, fill="10", prompt="30", out=tmp_path / "f")
    assert [r.label for r in rows] == [
        "unigram draw (train frequencies)",
        "unigram mode (always ' ')",
        "paper, 30 known",
    ]
    truth = next(data_lib.iter_batches(str(tmp_path / "text8"), "test", "text8", batch_size=3, shuffle=True,
                                       stride=46))["x"][:, 30:40]  # fmt: skip
    text_chars = " the cat sat on the mat"
    freq = {c: text_chars.count(c) / len(text_chars) for c in set(text_chars)}
    expected = np.mean([freq[" abcdefghijklmnopqrstuvwxyz"[i]] for i in truth.ravel()])
    assert rows[0].stat("fill_accuracy")[0] == pytest.approx(expected, abs=2e-3)  # train split: ~the same text
    assert rows[1].stat("fill_accuracy")[0] == pytest.approx(float((truth == 0).mean()))
    assert 0 <= rows[2].stat("fill_accuracy")[0] <= 1
    assert "| sampler | NFE | fill accuracy (chars) ↑ | s/sample |" in text
    assert "truth" in (tmp_path / "f_samples" / "paper_nfe2_fill10_seed0.txt").read_text()


@pytest.mark.parametrize(
    ("which", "args", "names"),
    [
        ("plain", ["--guidance", "1"], ["--guidance", "unconditional"]),
        ("cond", ["--guidance", "1,x"], ["--guidance", "'x'"]),
        ("cond", ["--guidance", "nan"], ["--guidance", "finite"]),
        ("cond", ["--guidance", "1", "--num", "12"], ["--num", ">= 20"]),
        ("cond", ["--guidance", "1", "--inpaint", "top-half"], ["--guidance and --inpaint"]),
        ("cond", ["--inpaint", "bottom-half"], ["--inpaint", "top-half"]),
        ("cond", ["--fill", "10"], ["--fill", "text8"]),
        ("cond", ["--prompt", "10"], ["--prompt", "--fill"]),
        ("cond", ["--particles", "4"], ["--particles", "--inpaint"]),
        ("cond", ["--inpaint", "top-half", "--particles", "4", "--infer-class"], ["--infer-class", "classes"]),
        ("cond", ["--inpaint", "top-half", "--particles", "1,15", "--infer-class"], ["--infer-class", "multiple"]),
        ("plain", ["--inpaint", "top-half", "--particles", "10", "--infer-class"], ["--infer-class", "num_labels"]),
        ("cond", ["--inpaint", "top-half", "--particles", "1,0"], ["--particles", ">= 1"]),
    ],
)
def test_conditional_quality_bad_flags_exit_2_naming_them(
    checkpoint, cond_checkpoint, cache, which, args, names, capsys
):
    folder = {"plain": checkpoint, "cond": cond_checkpoint}[which]
    assert bfn_main(["quality", str(folder), "--cache", str(cache), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bfn: error:") and "\n" not in err and all(n in err for n in names), err

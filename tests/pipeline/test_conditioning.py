"""Class conditioning in the pipeline (issue 18.4): config keys, the network and losses it builds (and
that an unconditional config builds exactly what it did before), labelled batches reaching the step,
the per-class validation grid, `bfn sample --class/--guidance` and `bfn inpaint`. No Ray."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from bfn import BFN, EMA
from bfn.networks import build_network, count_parameters
from pipeline import cli
from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, compose, load
from pipeline.core import checkpointing
from pipeline.core.build import build_flow_and_head, build_model, build_optimizer
from pipeline.evaluation.evaluate import evaluate, inpaint_checkpoint, sample
from pipeline.training import steps, worker
from pipeline.training.lease import experiment_differences
from tests.pipeline.test_data import write_idx_folder

COND = ["model=conditional", "eval.guidance=1.0"]


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["experiment=text8_local", "model.num_labels=10", "model.cond_drop=0.1"], "model.num_labels"),
        (["model.num_labels=7", "model.cond_drop=0.1", "eval.guidance=0"], "model.num_labels"),
        (["model.num_labels=10", "eval.guidance=0"], "model.cond_drop"),
        (["model.num_labels=10", "model.cond_drop=1.5", "eval.guidance=0"], "model.cond_drop"),
        (["model.cond_drop=0.1"], "model.cond_drop"),
        (["model.num_labels=10", "model.cond_drop=0.1"], "eval.guidance"),
        (["eval.guidance=2.0"], "eval.guidance"),
        (["+net.kwargs.num_labels=10"], "net.kwargs.num_labels"),
    ],
)
def test_conditioning_keys_are_checked(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(["experiment=smoke", *overrides])


def test_the_conditional_presets_validate():
    for preset in ("mnist_cond_local", "cifar10_cond_local"):
        cfg = load([f"experiment={preset}"])
        assert cfg.model.num_labels == 10 and cfg.model.cond_drop == 0.1 and cfg.eval.guidance is not None


def test_a_config_written_before_conditioning_loads_and_resumes_as_the_same_experiment():
    current = compose(["experiment=smoke"])
    old = {k: v for k, v in current.items() if k != "model"}
    old["eval"] = {k: v for k, v in current["eval"].items() if k != "guidance"}
    cfg = Config.from_dict(old)
    assert not cfg.model.conditional and cfg.eval.guidance is None
    assert experiment_differences(old, current) == []
    conditional = compose(["experiment=smoke", *COND])
    assert [d[0] for d in experiment_differences(old, conditional)] == ["model.cond_drop", "model.num_labels"]


# ------------------------------------------------------------------------------------------- build
def _network_without_conditioning(cfg: Config):
    """The network as build_model made it before the model section existed."""
    _, head = build_flow_and_head(cfg)
    shape = cfg.data.data_shape
    data_kwargs = {
        "in_channels": shape[-1],
        "image_size": shape[0],
        "out_height": head.output_height,
        "num_classes": cfg.flow.num_classes,
        "seq_len": shape[0],
    }
    return build_network(cfg.net.arch, **{**data_kwargs, **cfg.net.kwargs})


@pytest.mark.parametrize("preset", ["mnist_local", "text8_local"])
def test_an_unconditional_config_builds_todays_network_and_loss_exactly(preset):
    cfg = load([f"experiment={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.manual_seed(0)
    net = _network_without_conditioning(cfg)
    assert model.num_labels is None and model.cond_drop == 0
    mine, before = model.net.state_dict(), net.state_dict()
    assert list(mine) == list(before) and all(torch.equal(mine[k], before[k]) for k in mine)
    flow, head = build_flow_and_head(cfg)
    reference = BFN(net, flow, head, data_shape=cfg.data.data_shape)
    x = torch.randint(0, cfg.flow.num_classes, (2, *cfg.data.data_shape))
    torch.manual_seed(1)
    loss = model.loss(x)
    torch.manual_seed(1)
    assert torch.equal(loss, reference.loss(x))  # the same draws and the same number


def test_a_conditional_config_builds_a_label_table():
    cfg, plain = load(["experiment=mnist_cond_local"]), load(["experiment=mnist_local"])
    model = build_model(cfg)
    table = model.net.label_embedding.table.weight
    assert model.num_labels == 10 and model.cond_drop == 0.1 and table.shape[0] == 11
    assert count_parameters(model.net) == count_parameters(build_model(plain).net) + table.numel()


# -------------------------------------------------------------------------------------------- data
def test_batches_carry_labels_only_for_conditional_runs(tmp_path):
    arrays = write_idx_folder(tmp_path / "idx", 300, 20)
    data_lib.prepare("mnist", str(tmp_path / "shards"), source=str(tmp_path / "idx"), progress=False)
    plain = next(data_lib.iter_batches(str(tmp_path / "shards"), "test", "mnist", batch_size=8))
    labelled = next(data_lib.iter_batches(str(tmp_path / "shards"), "test", "mnist", batch_size=8, labels=True))
    assert set(plain) == {"x"} and set(labelled) == {"x", "label"}
    assert np.array_equal(plain["x"], labelled["x"]) and labelled["label"].dtype == np.int64
    assert np.array_equal(labelled["label"], arrays["t10k"][1][:8])


# ---------------------------------------------------------------------------------- training step
def test_the_worker_hands_the_labels_to_the_training_step():
    cfg = load(["experiment=smoke", *COND])
    rows = [{"x": torch.zeros(4, 28, 28, 1, dtype=torch.uint8), "label": torch.arange(4)}]
    dataset = SimpleNamespace(iter_torch_batches=lambda **_: iter(rows))
    epoch, stored, label = next(worker._batches(dataset, 4, "cpu", 0, seed=0))
    assert torch.equal(label, torch.arange(4))
    seen = {}

    def step_fn(model, x, optimizer, ema, **kwargs):
        seen.update(kwargs)
        return "result"

    ctx = SimpleNamespace(cfg=cfg, rank=0)
    state = SimpleNamespace(step=0, epoch=0, model=None, optimizer=None, ema=None)
    window = SimpleNamespace(add=lambda result: seen.update(result=result))
    worker._advance(ctx, state, step_fn, iter([(0, stored, label)]), window)
    assert torch.equal(seen["label"], torch.arange(4)) and state.step == 1


def test_a_conditional_training_step_conditions_the_network_on_the_labels():
    cfg = load(["experiment=smoke", *COND, "model.cond_drop=0"])
    model = build_model(cfg)
    calls = []
    forward = model.net.forward
    model.net.forward = lambda x, t, label=None: calls.append(label) or forward(x, t, label)
    label = torch.tensor([3, 1])
    x = torch.randint(0, 2, (2, 28, 28, 1))
    result = steps.train_step(
        model, model, x, build_optimizer(cfg, model), EMA(model, 0.9), grad_clip=1.0, lr=1e-3, label=label
    )
    assert torch.equal(calls[0], label) and torch.isfinite(result.loss)
    out = steps.validate(model, [(x, label)], nll_steps=3, nll_repeats=1)
    assert out["examples"] == 2 and all(torch.equal(c, label) for c in calls[1:])


def test_the_validation_grid_has_one_row_per_class(tmp_path):
    cfg = load(["experiment=smoke", *COND, "eval.num_samples=20", "eval.sample_steps=2"])
    path = worker._class_grid(cfg, build_model(cfg).eval(), torch.Generator().manual_seed(0), tmp_path / "g")
    width, height = Image.open(path).size
    assert (width, height) == (3 * (2 * 29 + 1), 3 * (10 * 29 + 1))  # 2 columns, 10 rows, scale 3


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    write_idx_folder(root / "idx", 300, 20)
    data_lib.prepare("mnist", str(root / "shards"), source=str(root / "idx"), progress=False)
    (root / "src").mkdir()
    (root / "src" / "text8").write_text(" the cat sat on the mat" * 400)
    data_lib.prepare("text8", str(root / "text8"), source=str(root / "src"), seq_len=46, progress=False)
    text8 = ["experiment=text8", "net=text8_transformer_tiny", f"data.uri={root / 'text8'}", "data.seq_len=46"]
    text8 += ["data.batch_size=4", "trainer=cpu_1"]
    mnist = ["experiment=smoke", f"data.uri={root / 'shards'}"]
    folders = {}
    for name, overrides in (("plain", mnist), ("cond", [*mnist, *COND]), ("text8", text8)):
        cfg = load(overrides)
        torch.manual_seed(0)
        model = build_model(cfg)
        folders[name] = checkpointing.save(
            root / name,
            model=model,
            ema=EMA(model, 0.9),
            optimizer=build_optimizer(cfg, model),
            train_state={"step": 1, "epoch": 0},
            config=compose(overrides),
        )
    return folders


def _fails(capsys, args, *names):
    assert cli.main(args) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("bfn: error:") and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)


def test_bad_conditioning_input_exits_2_naming_it(checkpoints, tmp_path, capsys):
    plain, cond, text8 = str(checkpoints["plain"]), str(checkpoints["cond"]), str(checkpoints["text8"])
    _fails(capsys, ["sample", plain, "--class", "3"], "--class", "unconditional")
    _fails(capsys, ["sample", plain, "--guidance", "2.0"], "--guidance", "unconditional")
    _fails(capsys, ["sample", cond, "--class", "10"], "--class", "0..9")
    _fails(capsys, ["sample", cond, "--class", "three"], "--class")
    _fails(capsys, ["sample", cond, "--guidance", "2.0"], "--guidance", "--class")
    Image.new("L", (20, 28), 255).save(tmp_path / "mask.png")
    _fails(capsys, ["inpaint", cond, "--keep", str(tmp_path / "mask.png")], "--keep", "20x28", "28x28")
    _fails(capsys, ["inpaint", cond, "--keep", "bottom-half"], "--keep", "top-half")
    _fails(capsys, ["inpaint", cond, "--text", "a prompt"], "--text", "image model")
    _fails(capsys, ["inpaint", text8, "--keep", "top-half"], "--keep", "text model")
    _fails(capsys, ["inpaint", text8, "--text", "the c@t"], "--text", "'@'", "position 5")
    _fails(capsys, ["inpaint", text8, "--text", "the cat", "--fill", "40"], "--fill", "data.seq_len=46")
    _fails(capsys, ["inpaint", cond, "--keep", "top-half", "--particles", "0"], "--particles", ">= 1")
    _fails(capsys, ["inpaint", cond, "--keep", "top-half", "--particles", "4", "--infer-class"], "--infer-class")
    _fails(capsys, ["inpaint", cond, "--keep", "top-half", "--particles", "15", "--infer-class"], "multiple")
    _fails(capsys, ["inpaint", plain, "--keep", "top-half", "--particles", "10", "--infer-class"], "--infer-class")
    _fails(
        capsys, ["inpaint", cond, "--keep", "top-half", "--particles", "4", "--sampler", "ode2"], "--particles", "paper"
    )


def test_sample_draws_one_row_per_class(checkpoints, tmp_path):
    path = sample(checkpoints["cond"], num=2, num_steps=2, classes="all", guidance=2.0, out=tmp_path / "s")
    assert Image.open(path).size == (3 * (2 * 29 + 1), 3 * (10 * 29 + 1))
    one = sample(checkpoints["cond"], num=3, num_steps=2, classes="3", out=tmp_path / "three")
    assert Image.open(one).size == (3 * (3 * 29 + 1), 3 * 30)


def _cells(path, rows: int, cols: int, size: int = 28) -> np.ndarray:
    """The (rows, cols, size, size) cells of a grid written by save_image_grid (scale 3)."""
    grid = np.asarray(Image.open(path))[::3, ::3]
    return np.stack(
        [
            np.stack([grid[1 + r * (size + 1) :][:size, 1 + q * (size + 1) :][:, :size] for q in range(cols)])
            for r in range(rows)
        ]
    )


@pytest.mark.parametrize(("keep", "particles"), [("top-half", 1), ("left-half", 1), ("mask.png", 1), ("top-half", 3)])
def test_inpaint_keeps_the_known_pixels(checkpoints, tmp_path, keep, particles):
    mask = np.zeros((28, 28), np.uint8)
    mask[5:20, 3:9] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    kept = {"top-half": np.s_[:14, :], "left-half": np.s_[:, :14], "mask.png": np.s_[5:20, 3:9]}[keep]
    arg = str(tmp_path / keep) if keep.endswith(".png") else keep
    path = inpaint_checkpoint(
        checkpoints["cond"], keep=arg, num=3, num_steps=2, out=tmp_path / "out", particles=particles
    )
    cells = _cells(path, 3, 3)
    original, shown, completed = cells
    assert np.array_equal(completed[:, kept[0], kept[1]], original[:, kept[0], kept[1]])
    assert np.array_equal(shown[:, kept[0], kept[1]], original[:, kept[0], kept[1]])
    unknown = np.ones((28, 28), bool)
    unknown[kept] = False
    assert (shown[:, unknown] == 128).all()


def test_inpaint_continues_a_text8_prompt(checkpoints, tmp_path):
    assert cli.main(["inpaint", str(checkpoints["text8"]), "--text", "the cat", "--fill", "12", "--num", "2",
                     "--steps", "2", "--out", str(tmp_path / "t")]) == 0  # fmt: skip
    lines = (tmp_path / "t.txt").read_text().splitlines()
    assert len(lines) == 2 and all(len(line) == 19 and line.startswith("the_cat") for line in lines)


def test_eval_of_a_conditional_model_conditions_on_each_examples_label(checkpoints, monkeypatch):
    seen = []
    original = BFN.bound_loss
    monkeypatch.setattr(
        BFN, "bound_loss", lambda self, x, n, label=None: seen.append(label) or original(self, x, n, label)
    )
    estimate = evaluate(checkpoints["cond"], num_steps=2, repeats=1, max_batches=1)
    assert (
        estimate.num_examples > 0 and seen and all(label is not None and label.shape == (len(label),) for label in seen)
    )
    seen.clear()
    evaluate(checkpoints["plain"], num_steps=2, repeats=1, max_batches=1)
    assert seen == [None]

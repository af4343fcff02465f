"""Batch -> model data (pipeline/data/transforms.py): the seed derivation, MNIST binarisation,
the text8 training crop, and the text8 evaluation windows at any stride."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import data as D
from pipeline.data.transforms import reader_generator, text8_rows, text8_stream
from tests.pipeline.test_data import RAW, read_raw

TEXT = (RAW / "text8" / "text8_first100k.txt").read_text()
PATTERN = torch.tensor([0, 255, 128, 51], dtype=torch.uint8).repeat(196)  # one image, 784 grey levels


def grey_batch(n: int) -> torch.Tensor:
    return PATTERN.repeat(n, 1).reshape(n, 28, 28, 1)


# ------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------


def test_batch_seed_is_the_documented_derivation():
    words = np.random.SeedSequence(entropy=42, spawn_key=(0, 3, 101)).generate_state(2, np.uint32)
    assert D.batch_seed(42, 3, 100) == int(words[0]) | (int(words[1]) << 32)
    assert D.batch_generator(42, 3, 100, "cpu").initial_seed() == D.batch_seed(42, 3, 100)
    seeds = {D.batch_seed(s, r, t) for s in (0, 1) for r in range(8) for t in [D.VALIDATION_STEP, *range(200)]}
    assert len(seeds) == 2 * 8 * 201  # no two (seed, rank, step) share a stream
    plain = {reader_generator(s, e).initial_seed() for s in (0, 1) for e in range(200)}
    assert not plain & seeds  # the plain reader's streams are separate from the workers'
    with pytest.raises(ValueError, match="must be >= 0"):
        D.batch_seed(-1, 0, 0)
    with pytest.raises(ValueError, match="VALIDATION_STEP"):
        D.batch_seed(0, 0, -2)


# ------------------------------------------------------------------------------------------------
# MNIST binarisation
# ------------------------------------------------------------------------------------------------


def test_mnist_binarisation_is_bernoulli_of_the_grey_level():
    x = D.to_model(grey_batch(4000), "mnist", seq_len=0, generator=D.batch_generator(0, 0, 7, "cpu"))
    assert x.dtype == torch.int64 and x.shape == (4000, 28, 28, 1)
    flat = x.reshape(4000, 784).float()
    assert not flat[:, 0::4].any() and flat[:, 1::4].all()  # grey 0 and 255 are exact
    assert abs(flat[:, 2::4].mean().item() - 128 / 255) < 0.005
    assert abs(flat[:, 3::4].mean().item() - 51 / 255) < 0.005
    # the reference transform, torch.bernoulli(grey / 255), with the same generator state
    want = torch.bernoulli(grey_batch(4000).float() / 255, generator=D.batch_generator(0, 0, 7, "cpu")).long()
    assert torch.equal(x, want)
    flat_input = D.to_model(
        grey_batch(4000).reshape(4000, 784), "mnist", seq_len=0, generator=D.batch_generator(0, 0, 7, "cpu")
    )
    assert torch.equal(flat_input, x)


def test_mnist_binarisation_reproducible_per_step_independent_across_steps_and_ranks():
    def draw(rank: int, step: int) -> torch.Tensor:
        return D.to_model(grey_batch(2000), "mnist", seq_len=0, generator=D.batch_generator(5, rank, step, "cpu"))

    a = draw(0, 10)
    assert torch.equal(a, draw(0, 10))
    half = slice(2, None, 4)  # the grey-128 pixels: two independent draws agree with p^2 + (1-p)^2
    agree = (128 / 255) ** 2 + (1 - 128 / 255) ** 2
    for other in (draw(0, 11), draw(1, 10), draw(0, D.VALIDATION_STEP)):
        assert abs((a.reshape(2000, 784)[:, half] == other.reshape(2000, 784)[:, half]).float().mean() - agree) < 0.01
    # every validation pass: a fresh generator at VALIDATION_STEP, the batches in order -> same draws
    passes = []
    for _ in range(2):
        generator = D.batch_generator(5, 0, D.VALIDATION_STEP, "cpu")
        passes.append([D.to_model(grey_batch(50), "mnist", seq_len=0, generator=generator) for _ in range(3)])
    assert all(torch.equal(p, q) for p, q in zip(*passes, strict=True))
    assert not torch.equal(passes[0][0], passes[0][1])  # batches within a pass differ


def test_mnist_binarisation_must_be_seeded_and_shaped():
    with pytest.raises(ValueError, match="MNIST binarisation must be seeded"):
        D.to_model(grey_batch(2), "mnist", seq_len=0, generator=None)
    with pytest.raises(D.DataError, match=r"mnist batch has shape \(2, 100\)"):
        D.to_model(torch.zeros(2, 100, dtype=torch.uint8), "mnist", seq_len=0, generator=torch.Generator())
    with pytest.raises(D.DataError, match="unknown dataset 'svhn'"):
        D.to_model(grey_batch(2), "svhn", seq_len=0, generator=torch.Generator())


def test_cifar10_passes_through_as_float32():
    x = torch.linspace(-1, 1, 2 * 3072, dtype=torch.float64).reshape(2, 32, 32, 3)
    y = D.to_model(x, "cifar10", seq_len=0, generator=None)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_model_on_cuda():
    grey = grey_batch(512).cuda()
    x = D.to_model(grey, "mnist", seq_len=0, generator=D.batch_generator(1, 0, 3, "cuda"))
    assert x.is_cuda and x.dtype == torch.int64
    assert torch.equal(x, D.to_model(grey, "mnist", seq_len=0, generator=D.batch_generator(1, 0, 3, "cuda")))
    assert not x.reshape(512, 784)[:, 0::4].any() and x.reshape(512, 784)[:, 1::4].all()
    ids = torch.arange(2 * 16, device="cuda").remainder(27).repeat(64, 1)
    crop = D.to_model(ids, "text8", seq_len=16, generator=D.batch_generator(1, 0, 3, "cuda"))
    assert crop.shape == (64, 16) and crop.is_cuda
    with pytest.raises(ValueError, match="create it on the batch's device"):
        D.to_model(grey, "mnist", seq_len=0, generator=D.batch_generator(1, 0, 3, "cpu"))


# ------------------------------------------------------------------------------------------------
# text8: the training crop
# ------------------------------------------------------------------------------------------------


def _unique_stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 27, size=n, dtype=np.uint8)  # windows of 8+ are unique


def _start(stream: bytes, window: torch.Tensor) -> int:
    return stream.find(window.to(torch.uint8).numpy().tobytes())


def test_text8_crop_windows_come_from_their_row_at_uniform_offsets():
    seq_len = 16
    stream = _unique_stream(40_000)
    rows, offsets = text8_rows(stream, seq_len, train=True)
    assert rows.shape == ((40_000 - 32) // 16 + 1, 32) and np.array_equal(offsets, np.arange(len(rows)) * 16)
    x = D.to_model(torch.from_numpy(rows), "text8", seq_len=seq_len, generator=D.batch_generator(0, 0, 0, "cpu"))
    assert x.dtype == torch.int64 and x.shape == (len(rows), seq_len)
    raw = stream.tobytes()
    crop_offsets = np.array([_start(raw, w) for w in x]) - offsets
    assert crop_offsets.min() >= 0 and crop_offsets.max() < seq_len
    counts = np.bincount(crop_offsets, minlength=seq_len)
    expected = len(rows) / seq_len  # 156 per offset
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_text8_crops_reach_every_training_start_over_epochs():
    """Rows of 2*seq_len every seq_len: the crops reach every start in [0, rows * seq_len), i.e. all
    of the stream's starts but the last < 2*seq_len (counted in the manifest)."""
    seq_len, stream = 8, _unique_stream(100, seed=3)
    rows, _ = text8_rows(stream, seq_len, train=True)
    assert len(rows) == 11  # starts 0, 8, ..., 80: the last row ends at 96 <= 100
    seen = set()
    for epoch in range(150):  # a given (row, offset) is missed with probability (7/8)^150 < 1e-8
        generator = D.batch_generator(0, 0, epoch, "cpu")
        for window in D.to_model(torch.from_numpy(rows), "text8", seq_len=seq_len, generator=generator):
            seen.add(_start(stream.tobytes(), window))
    assert seen == set(range(len(rows) * seq_len))


def test_text8_eval_rows_pass_through_and_errors():
    ids = torch.randint(0, 27, (5, 16), dtype=torch.uint8)
    out = D.to_model(ids, "text8", seq_len=16, generator=None)
    assert out.dtype == torch.int64 and torch.equal(out, ids.long())
    with pytest.raises(ValueError, match="the text8 training crop must be seeded"):
        D.to_model(torch.zeros(5, 32, dtype=torch.uint8), "text8", seq_len=16, generator=None)
    with pytest.raises(D.DataError, match=r"data.seq_len=16 expects rows of 16 \(val/test\) or 32 \(train\)"):
        D.to_model(torch.zeros(5, 20, dtype=torch.uint8), "text8", seq_len=16, generator=torch.Generator())


# ------------------------------------------------------------------------------------------------
# text8: evaluation windows at any stride
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text8_64(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("text8") / "t")
    D.prepare("text8", out, seq_len=64, rows_per_shard=20, progress=False)
    return out


def _windows(uri: str, split: str, **kw) -> np.ndarray:
    return np.concatenate([b["x"] for b in D.iter_batches(uri, split, "text8", **kw)])


def test_stride_windows_cover_every_offset(text8_64):
    stored, _ = read_raw(text8_64, "test", "text8")  # 78 rows of 64 chars = 4992 of the 5000
    same = _windows(text8_64, "test", batch_size=50, stride=64)
    assert np.array_equal(same, stored) and np.array_equal(same, _windows(text8_64, "test", batch_size=50))
    every = _windows(text8_64, "test", batch_size=1000, stride=1)
    assert every.dtype == np.int64 and every.shape == (4992 - 64 + 1, 64)
    test_text = TEXT[95_000:]
    for i in (0, 1, 63, 1000, 4928):
        assert D.text8_decode(every[i]) == test_text[i : i + 64]
    tenth = _windows(text8_64, "test", batch_size=7, stride=10)
    assert np.array_equal(tenth, every[::10])
    shuffled = _windows(text8_64, "test", batch_size=100, stride=1, shuffle=True, seed=3)
    assert not np.array_equal(shuffled, every)
    assert sorted(map(bytes, shuffled.astype(np.uint8))) == sorted(map(bytes, every.astype(np.uint8)))


def test_stride_on_the_training_stream_and_its_limits(text8_64):
    """Train rows overlap (2*seq_len every seq_len); the stream they tile is rebuilt exactly."""
    train = _windows(text8_64, "train", batch_size=500, stride=64)
    rows = D.num_rows(text8_64, "train")
    assert train.shape == (rows + 1, 64)  # (rows - 1) * 64 + 128 chars
    assert D.text8_decode(train[-1]) == TEXT[rows * 64 : rows * 64 + 64]
    with pytest.raises(ValueError, match="stride is for text8 with fraction=1 only"):
        next(D.iter_batches(text8_64, "test", "text8", batch_size=8, stride=1, fraction=0.5))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        next(D.iter_batches(text8_64, "test", "text8", batch_size=8, stride=0))
    with pytest.raises(D.DataError, match="do not tile one stream"):
        text8_stream(np.zeros((2, 4), np.uint8), np.array([0, 9]), "rows")

"""Subword text (issue 19): a BPE trained on the train split and stored with the shards, windows that
decode back to the held-out text, bits per character over the characters the tokens cover, and a
model whose K differs from the tokenizer's refused before a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bfn import NLLEstimate
from bfn.schedules import identifiable_beta_1_times_k
from pipeline import cli, config, data
from pipeline.data import bpe, sources
from pipeline.training import steps
from pipeline.training.driver import preflight

VOCAB, SEQ = 300, 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "text_bpe"
    source = data.raw_dir() / "text8" / sources.TEXT8_SUBSET  # 100k chars: fast to train on
    manifest = data.prepare("text_bpe", str(out), source=source, seq_len=SEQ, vocab_size=VOCAB, progress=False)
    return out, manifest


def _split_text(split: str) -> str:
    text = sources.text8_decode_bytes(sources.load("text8", data.raw_dir() / "text8" / sources.TEXT8_SUBSET)["ids"])
    n = len(text)
    a, b = {"train": (0, int(n * 0.9)), "val": (int(n * 0.9), int(n * 0.95)), "test": (int(n * 0.95), n)}[split]
    return text[a:b]


def test_prepared_dataset_records_its_tokenizer(prepared):
    out, manifest = prepared
    assert manifest["dataset"] == "text_bpe" and manifest["vocab_size"] == VOCAB
    record = manifest["tokenizer"]
    assert record["trained_on"] == "the train split's characters only" and record["requested_vocab_size"] == VOCAB
    vocabulary = data.load_vocabulary(str(out), data.read_manifest(str(out)))
    assert vocabulary.size == VOCAB and set(vocabulary.pieces[:27]) == set(data.TEXT8_ALPHABET)  # chars first
    data.verify(str(out))
    data.check_values(str(out), manifest, list(data.SPLITS))
    for split in ("val", "test"):
        chars = manifest["splits"][split]["chars"]
        assert chars == len(_split_text(split)) and manifest["splits"][split]["tokens"] * 2 > chars / 10


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_held_out_window_decodes_to_the_text_it_was_cut_from(prepared, split):
    out, _ = prepared
    vocabulary = data.load_vocabulary(str(out), data.read_manifest(str(out)))
    text, position, windows = _split_text(split), 0, 0
    for batch in data.iter_batches(str(out), split, "text_bpe", batch_size=7, seq_len=SEQ):
        for row in batch["x"]:
            piece = vocabulary.decode(row)
            assert text[position : position + len(piece)] == piece, (split, windows)
            assert int(vocabulary.chars(torch.from_numpy(row))) == len(piece)
            position, windows = position + len(piece), windows + 1
    assert windows > 0 and len(text) - position < SEQ * max(len(p) for p in vocabulary.pieces)


def test_a_changed_tokenizer_file_is_refused(prepared, tmp_path):
    out, manifest = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / bpe.TOKENIZER_NAME).write_text((out / bpe.TOKENIZER_NAME).read_text().replace('"a"', '"b"', 1))
    with pytest.raises(data.DataError, match="sha256 .* differs from the manifest"):
        data.load_vocabulary(str(copy), manifest)


def overrides(out) -> list[str]:
    return ["experiment=text_bpe_local", f"data.uri={out}", "data.seq_len=32", f"flow.num_classes={VOCAB}"]


def test_a_model_whose_k_differs_from_the_tokenizer_is_refused_naming_both(prepared):
    out, _ = prepared
    cfg = config.load(["experiment=text_bpe_local", f"data.uri={out}", "data.seq_len=32", "flow.num_classes=512"])
    with pytest.raises(data.DataError, match=r"flow.num_classes=512 but the tokenizer .* has 300 tokens"):
        preflight(cfg)
    cfg = config.load(overrides(out))
    assert preflight(cfg)["vocab_size"] == VOCAB
    assert cfg.flow.beta_1_value == pytest.approx(identifiable_beta_1_times_k(VOCAB) / VOCAB)  # "auto"
    assert config.load([*overrides(out), "flow.beta_1_times_k=20"]).flow.beta_1_value == pytest.approx(20 / VOCAB)
    with pytest.raises(config.ConfigError, match="set exactly one of flow.beta_1 and flow.beta_1_times_k"):
        config.load([*overrides(out), "flow.beta_1=0.1"])


def test_bits_per_char_is_total_nats_over_the_characters_the_tokens_cover():
    """Two windows of 3 tokens covering 5 and 7 characters: bits/char = sum of nats / 12 / ln 2."""
    per_token = torch.tensor([[1.0, 2.0]])  # nats/dim of each window (R = 1 repeat)
    estimate = NLLEstimate.from_terms(per_token, torch.zeros_like(per_token), num_dims=3)
    chars = torch.tensor([5, 7])

    class Model:
        num_dims = 3

        def eval(self):
            return self

        def continuous_time_loss(self, x, label=None):
            return torch.zeros(len(x), 3)

        def bound_loss(self, x, n, label=None):
            return per_token[0, x[:, 0]]

        def reconstruction_loss(self, x, label=None):
            return torch.zeros(len(x))

    batches = [torch.tensor([[0, 0, 0], [1, 1, 1]])]
    result = steps.validate(Model(), batches, nll_steps=0, nll_repeats=1, count_chars=lambda x: chars)
    total_nats = (1.0 + 2.0) * 3
    assert result["nll"].in_unit("bits/char")["total"] == pytest.approx(total_nats / 12 / math.log(2))
    assert result["nll"].in_unit("bits/dim")["total"] == pytest.approx(estimate.in_unit("bits/dim")["total"])


def test_cli_prepare_needs_vocab_for_text_bpe_only(tmp_path, capsys):
    assert cli.main(["data", "prepare", "text-bpe", "--out", str(tmp_path / "a")]) == 2
    assert "--vocab: required with text-bpe" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "text8", "--vocab", "300", "--out", str(tmp_path / "b")]) == 2
    assert cli.main(["data", "prepare", "text-bpe", "--vocab", "70000", "--out", str(tmp_path / "c")]) == 2
    assert "--vocab must be an integer in [27, 65,536]" in capsys.readouterr().err


def test_cli_prepare_text_bpe_from_the_bundled_subset(tmp_path):
    out = tmp_path / "bpe"
    argv = ["data", "prepare", "text-bpe", "--vocab", "64", "--seq-len", "16", "--source", "bundled", "--out", str(out)]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_size"] == 64 and manifest["seq_len"] == 16
    assert manifest["source"]["files"]["text8_first100k.txt"]["canonical"]
    assert np.isclose(manifest["splits"]["val"]["chars_per_token"], 5000 / manifest["splits"]["val"]["tokens"], 1e-3)

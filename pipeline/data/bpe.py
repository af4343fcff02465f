"""Subword text: a byte-pair-encoding tokenizer (Hugging Face ``tokenizers``) for text8-style text.

Tokens carry the space before a word as ``▁`` (a Metaspace pre-tokenizer that never prepends one),
so a token's text is exactly the characters it covers: decoding is concatenation, every window of
ids decodes to the text it was cut from, and bits per character is the total nats of a window over
the characters its tokens cover (``Vocabulary.chars``), comparable with a character model's.

The tokenizer is trained on the training split's characters only and stored beside the shards as
``tokenizer.json``, its sha256 in the manifest; ``load_vocabulary`` checks it before use.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.data.manifest import read_manifest
from pipeline.data.storage import TEXT8_ALPHABET, DataError, join, read_bytes, resolve

SPACE = "▁"  # U+2581, the Metaspace marker: a token's leading space
TOKENIZER_NAME = "tokenizer.json"
MIN_VOCAB = len(TEXT8_ALPHABET)  # the 27 characters themselves
MAX_VOCAB = 65_536  # ids are stored as uint16; GPT-2's 50,257 fits


def check_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise DataError(f"--vocab must be an integer in [{MIN_VOCAB}, {MAX_VOCAB:,}], got {vocab_size!r}")
    return vocab_size


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A BPE tokenizer of at most ``vocab_size`` tokens learnt from ``text`` (text8 characters).

    The 27 characters are always tokens (ids below every merge); training stops earlier when no
    pair is left to merge (a small corpus cannot fill a large vocabulary), so the size may be less.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    alphabet = [SPACE if c == " " else c for c in TEXT8_ALPHABET]
    trainer = trainers.BpeTrainer(
        vocab_size=check_vocab_size(vocab_size),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


class Vocabulary:
    """A trained tokenizer as the pipeline uses it: encode, decode, characters covered per window."""

    def __init__(self, tokenizer_json: bytes | str, where: str = TOKENIZER_NAME):
        try:
            self.tokenizer = Tokenizer.from_str(
                tokenizer_json.decode() if isinstance(tokenizer_json, bytes) else tokenizer_json
            )
        except Exception as exc:  # the Rust parser raises plain Exception; UnicodeDecodeError too
            raise DataError(f"{where}: not a tokenizers JSON file ({exc})") from exc
        self.size = self.tokenizer.get_vocab_size()
        pieces = [self.tokenizer.id_to_token(i) for i in range(self.size)]
        if any(p is None for p in pieces):
            raise DataError(f"{where}: token ids are not 0..{self.size - 1}")
        self.pieces = [p.replace(SPACE, " ") for p in pieces]  # the characters each token covers
        # characters per token id: a window's characters are a gather and a sum (int64 on any device)
        self.token_chars = torch.tensor([len(p) for p in self.pieces], dtype=torch.int64)

    def encode(self, text: str) -> np.ndarray:
        """Ids (uint16) of ``text``, which decode back to it exactly."""
        ids = np.asarray(self.tokenizer.encode(text).ids, dtype=np.uint16)
        if self.decode(ids) != text:
            raise DataError("the tokenizer does not round-trip this text (a character outside its alphabet?)")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[int(i)] for i in np.asarray(ids).reshape(-1))

    def chars(self, ids: torch.Tensor) -> torch.Tensor:
        """Characters covered by each window of ids (..., L) -> (...)."""
        return self.token_chars.to(ids.device)[ids.long()].sum(-1)

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def tokenizer_record(vocabulary: Vocabulary, requested: int) -> dict:
    """The manifest's ``tokenizer`` entry (the file's sha256 is checked on every load)."""
    data = vocabulary.to_json().encode()
    return {
        "path": TOKENIZER_NAME,
        "sha256": hashlib.sha256(data).hexdigest(),
        "library": "tokenizers (Hugging Face)",
        "model": "BPE, Metaspace pre-tokenizer ('▁' = a leading space, never prepended)",
        "requested_vocab_size": requested,
        "vocab_size": vocabulary.size,
        "trained_on": "the train split's characters only",
    }


def load_vocabulary(uri: str, manifest: dict) -> Vocabulary:
    """The tokenizer stored with a prepared ``text_bpe`` dataset, checked against its manifest."""
    record = manifest.get("tokenizer")
    where = f"{str(uri).rstrip('/')}/{TOKENIZER_NAME}"
    if not isinstance(record, dict) or record.get("path") != TOKENIZER_NAME:
        raise DataError(f"{uri}: the manifest has no tokenizer entry; re-run `bfn data prepare text-bpe --out {uri}`")
    fs, root = resolve(uri)
    try:
        data = read_bytes(fs, join(root, TOKENIZER_NAME))
    except OSError as exc:
        raise DataError(f"cannot read {where}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise DataError(f"{where}: sha256 {digest} differs from the manifest's {record.get('sha256')}")
    vocabulary = Vocabulary(data, where)
    if vocabulary.size != manifest.get("vocab_size"):
        raise DataError(f"{where}: {vocabulary.size} tokens, the manifest says {manifest.get('vocab_size')}")
    return vocabulary


def vocabulary_of(name: str, uri: str) -> Vocabulary | None:
    """The tokenizer of a prepared subword dataset (None for data without one)."""
    return load_vocabulary(uri, read_manifest(uri)) if name == "text_bpe" else None


def describe(vocabulary: Vocabulary) -> str:
    longest = max(vocabulary.pieces, key=len)
    return f"{vocabulary.size:,} tokens, longest {json.dumps(longest)} ({len(longest)} chars)"

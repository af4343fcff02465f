"""Value transforms: stored rows -> Ray batches (``preprocess``) -> model data (``to_model``).

Two stages, so that every random draw happens where the batch meets the model, from a torch
generator whose seed says which (run seed, rank, step) it belongs to:

* ``preprocess`` (deterministic, runs in Ray Data tasks and the plain reader): MNIST -> the stored
  grey levels, uint8 (B, 28, 28, 1); CIFAR-10 -> float32 (B, 32, 32, 3), the centre of the pixel's
  bin among ``num_bins`` bins in [-1, 1] (the reference transform); text8 -> uint8 ids (B, width).
* ``to_model`` (on the training device, seeded): MNIST -> one Bernoulli(grey/255) draw per pixel
  (the reference's dynamic binarisation), long {0, 1} (B, 28, 28, 1); CIFAR-10 -> float32 as is;
  text8 -> long ids (B, seq_len), a training row of 2*seq_len chars cropped at a uniform offset
  in [0, seq_len), so that over the epochs every start position of the training stream is used
  (the reference trains on every offset); val/test rows are seq_len chars and pass through.

Seeds (``batch_seed``): the 64-bit seed of (seed, rank, step) is the first two 32-bit words of
``numpy.random.SeedSequence(entropy=seed, spawn_key=(0, rank, step + 1))``: a hash, so nearby
runs, ranks and steps get unrelated streams. Validation uses ``step=VALIDATION_STEP`` (-1), i.e.
spawn key ``(0, rank, 0)``: one fresh generator per validation pass, fed the batches in order,
gives every validation the same binarisation. The plain reader (``iter_batches``) uses spawn key
``(1, epoch)``, a stream no training step can hit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.storage import IMAGE_SHAPE, NUM_CLASSES, DataError, check_name, is_text

VALIDATION_STEP = -1
_WORKER_BATCHES, _PLAIN_READER = 0, 1  # first spawn-key word: which consumer a stream belongs to


# ================================================================================================
# seeds
# ================================================================================================


def _seed64(seed: int, spawn_key: tuple[int, ...]) -> int:
    if int(seed) < 0 or any(int(k) < 0 for k in spawn_key):
        raise ValueError(f"seeds, ranks and steps must be >= 0 (got seed {seed}, key {spawn_key})")
    words = np.random.SeedSequence(entropy=int(seed), spawn_key=spawn_key).generate_state(2, np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def batch_seed(seed: int, rank: int, step: int) -> int:
    """The 64-bit seed of the training batch at ``step`` on ``rank`` (``VALIDATION_STEP``: validation)."""
    if int(step) < VALIDATION_STEP:
        raise ValueError(f"step must be >= 0 or VALIDATION_STEP ({VALIDATION_STEP}), got {step}")
    return _seed64(seed, (_WORKER_BATCHES, int(rank), int(step) + 1))


def batch_generator(seed: int, rank: int, step: int, device: Any) -> torch.Generator:
    """A torch generator on ``device`` for ``to_model`` on the batch of (rank, step).

    Used by the training worker: one per training step (``step`` = the optimiser step about to be
    taken), and one per validation pass with ``step=VALIDATION_STEP``. The seed derivation is in
    the module docstring; equal arguments give equal draws on the same device type.
    """
    return torch.Generator(device=device).manual_seed(batch_seed(seed, rank, step))


def reader_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator the plain reader (evaluation) draws pass ``epoch`` of ``seed`` from."""
    return torch.Generator().manual_seed(_seed64(seed, (_PLAIN_READER, int(epoch))))


# ================================================================================================
# stored rows -> batch (deterministic)
# ================================================================================================


def bin_centres(num_bins: int) -> np.ndarray:
    """Lookup table pixel 0..255 -> centre of its bin among ``num_bins`` bins in [-1, 1].

    x = 2p/255 - 1, index = clamp(floor((x/2 + 0.5) K), 0, K-1) = clamp(floor(pK/255), 0, K-1),
    computed in exact integer arithmetic; centre = (2 index + 1)/K - 1.
    """
    p = np.arange(256, dtype=np.int64)
    idx = np.minimum((p * num_bins) // 255, num_bins - 1)
    return ((2 * idx + 1) / num_bins - 1).astype(np.float32)


def _arrow_matrix(v: pa.Array, col: str) -> np.ndarray:
    if not pa.types.is_fixed_size_binary(v.type):
        raise DataError(f"column {col!r} has arrow type {v.type}, expected fixed_size_binary")
    if v.null_count:
        raise DataError(f"column {col!r} has {v.null_count} null values")
    w = v.type.byte_width
    if len(v) == 0:
        return np.empty((0, w), np.uint8)
    return np.frombuffer(v.buffers()[1], np.uint8, count=len(v) * w, offset=v.offset * w).reshape(len(v), w)


def as_matrix(batch: dict[str, Any], col: str, width: int | None) -> np.ndarray:
    """A (B, width) uint8 matrix from a fixed-size-binary column given as a pyarrow array, numpy
    object array of bytes, numpy 'S' array or integer array (values checked to be 0..255)."""
    if col not in batch:
        raise DataError(f"batch has no column {col!r} (columns: {', '.join(sorted(batch))})")
    v = batch[col]
    if isinstance(v, pa.ChunkedArray):
        v = v.combine_chunks()
    if isinstance(v, pa.Array):
        mat = _arrow_matrix(v, col)
    else:
        v = np.asarray(v)
        if v.dtype == object:
            items = v.ravel().tolist()
            if any(not isinstance(b, bytes | bytearray | memoryview) for b in items):
                raise DataError(f"column {col!r} holds non-bytes values (None or objects)")
            lengths = {len(b) for b in items}
            if len(lengths) > 1:
                raise DataError(f"column {col!r} rows have different lengths {sorted(lengths)}")
            w = lengths.pop() if lengths else (width or 0)
            mat = np.frombuffer(b"".join(items), np.uint8).reshape(len(items), w)
        elif v.dtype.kind == "S":
            mat = np.ascontiguousarray(v.ravel()).view(np.uint8).reshape(v.size, v.dtype.itemsize)
        elif v.dtype.kind in "ui":
            mat = v.reshape(len(v), -1)
            if mat.size and (mat.min() < 0 or mat.max() > 255):
                raise DataError(f"column {col!r} has values outside 0..255 (min {mat.min()}, max {mat.max()})")
            mat = mat.astype(np.uint8, copy=False)
        else:
            raise DataError(f"column {col!r} has unsupported dtype {v.dtype}")
    if width is not None and mat.shape[1] != width:
        raise DataError(f"column {col!r} rows have {mat.shape[1]} values, expected {width}")
    return mat


def _checked_labels(batch: dict[str, Any], n: int) -> np.ndarray | None:
    """The ``label`` column as numpy, its length and range checked (None when the batch has none)."""
    if "label" not in batch:
        return None
    y = batch["label"]
    y = np.asarray(y.to_numpy(zero_copy_only=False) if isinstance(y, pa.Array | pa.ChunkedArray) else y)
    if len(y) != n:
        raise DataError(f"column 'label' has {len(y)} rows, column 'image' {n}")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"column 'label' has values outside 0..{NUM_CLASSES - 1} (min {y.min()}, max {y.max()})")
    return y


def preprocess(name: str, batch: dict[str, Any], *, num_bins: int = 256, labels: bool = False) -> dict[str, np.ndarray]:
    """Stored rows -> ``{"x": ...}`` as the Ray datasets yield it (deterministic; pure numpy).

    ``labels`` (class-conditional runs, images only): ``{"x", "label"}``, the class ids int64 (B,).

    mnist: uint8 grey levels (B, 28, 28, 1); cifar10: float32 bin centres (B, 32, 32, 3) (for 256
    bins exactly (2p+1)/256 - 1); text8: uint8 ids (B, width); text_bpe: int32 ids (B, width) (their
    range is checked against the manifest's vocab_size by ``verify``). ``batch`` holds the Parquet columns
    (pyarrow arrays or numpy). Values out of range raise ``DataError`` naming the column.
    """
    check_name(name)
    if labels and is_text(name):
        raise ValueError(f"labels: {name} rows carry no class labels")
    if name == "text_bpe":  # two little-endian bytes per id; int32 because torch has few uint16 ops
        return {"x": as_matrix(batch, "ids", None).view("<u2").astype(np.int32)}
    if name == "text8":
        ids = as_matrix(batch, "ids", None)
        if ids.size and ids.max() > 26:
            bad = np.argwhere(ids > 26)[0]
            raise DataError(f"column 'ids' has id {ids[tuple(bad)]} > 26 at row {bad[0]}, position {bad[1]}")
        return {"x": ids.copy()}
    img = as_matrix(batch, "image", int(np.prod(IMAGE_SHAPE[name])))
    y = _checked_labels(batch, len(img))
    if name == "mnist":
        out = {"x": img.reshape(len(img), 28, 28, 1).copy()}
    else:
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        out = {"x": bin_centres(int(num_bins))[img].reshape(len(img), 32, 32, 3)}
    if labels:
        if y is None:
            raise DataError("column 'label' is missing; a class-conditional run (model.num_labels) needs it")
        out["label"] = y.astype(np.int64).reshape(len(img))  # astype copies: the block owns its labels
    return out


# ================================================================================================
# batch -> model data (seeded)
# ================================================================================================


def _check_generator(generator: torch.Generator | None, x: torch.Tensor, what: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{what} must be seeded: pass generator=batch_generator(seed, rank, step, device)")
    if generator.device.type != x.device.type:
        raise ValueError(
            f"the generator is on {generator.device}, the batch on {x.device}; create it on the batch's device"
        )
    return generator


def to_model(x: torch.Tensor, data_name: str, *, seq_len: int, generator: torch.Generator | None) -> torch.Tensor:
    """A Ray batch column ``"x"`` -> the data the model is trained or evaluated on.

    * mnist: grey levels (B, 28, 28, 1) (any integer dtype, 0..255) -> long {0, 1} (B, 28, 28, 1),
      each pixel ~ Bernoulli(grey/255) from ``generator`` (None is an error: the draw must be seeded).
    * cifar10: float32 (B, 32, 32, 3) in [-1, 1], already binned; returned as float32.
    * text8, text_bpe: ids (B, 2*seq_len) (training rows) -> long (B, seq_len), row b cropped at an offset
      drawn uniformly in [0, seq_len) from ``generator``; ids (B, seq_len) (val/test) -> long as is.

    ``generator`` must live on ``x``'s device (see ``batch_generator``).
    """
    if data_name == "mnist":
        generator = _check_generator(generator, x, "MNIST binarisation")
        if x.dim() == 0 or x.numel() != len(x) * 784:
            raise DataError(f"mnist batch has shape {tuple(x.shape)}, expected (B, 28, 28, 1) grey levels")
        probs = x.reshape(len(x), 28, 28, 1).float() / 255  # (B, 28, 28, 1)
        return torch.bernoulli(probs, generator=generator).long()
    if data_name == "cifar10":
        return x.float()
    if not is_text(data_name):
        raise DataError(f"unknown dataset {data_name!r}; expected mnist, cifar10, text8 or text_bpe")
    if x.dim() != 2 or x.shape[1] not in (seq_len, 2 * seq_len):
        raise DataError(
            f"{data_name} batch has shape {tuple(x.shape)}; data.seq_len={seq_len} expects rows of "
            f"{seq_len} (val/test) or {2 * seq_len} (train) ids: re-run `bfn data prepare "
            f"{data_name.replace('_', '-')} --seq-len {seq_len}`"
        )
    ids = x.long()
    if x.shape[1] == seq_len:
        return ids
    generator = _check_generator(generator, x, "the text8 training crop")
    offsets = torch.randint(0, seq_len, (len(ids), 1), generator=generator, device=ids.device)  # (B, 1)
    return ids.gather(1, offsets + torch.arange(seq_len, device=ids.device))  # (B, seq_len)


# ================================================================================================
# text8 windows
# ================================================================================================


def text8_rows(chars: np.ndarray, seq_len: int, *, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The stored rows of one split's id stream: (ids (R, width) of its dtype, offsets (R,) int64).

    Rows start every ``seq_len`` chars; a training row holds ``2 * seq_len`` chars (overlapping
    its neighbour by half, so ``to_model``'s crop can start anywhere), a val/test row ``seq_len``.
    A tail that does not fill a row is not stored.
    """
    width = 2 * seq_len if train else seq_len
    count = (len(chars) - width) // seq_len + 1 if len(chars) >= width else 0
    starts = np.arange(count, dtype=np.int64) * seq_len
    if count == 0:
        return np.empty((0, width), chars.dtype), starts
    rows = np.lib.stride_tricks.sliding_window_view(chars, width)[::seq_len][:count]
    return np.ascontiguousarray(rows), starts


def text8_stream(ids: np.ndarray, offsets: np.ndarray, where: str) -> np.ndarray:
    """The char stream that rows (ids, offsets) were cut from; gaps between rows are an error."""
    order = np.argsort(offsets, kind="stable")
    ids, offsets = ids[order], np.asarray(offsets, np.int64)[order]
    if len(ids) == 0:
        return np.empty(0, np.uint8)
    width = ids.shape[1]
    if offsets[0] != 0 or np.any(np.diff(offsets) > width) or np.any(np.diff(offsets) < 1):
        raise DataError(f"{where}: the rows' offsets do not tile one stream (first {offsets[0]}, width {width})")
    stream = np.empty(int(offsets[-1]) + width, ids.dtype)
    for row, start in zip(ids, offsets, strict=True):
        stream[start : start + width] = row
    return stream


def text8_windows(stream: np.ndarray, seq_len: int, stride: int) -> np.ndarray:
    """Windows (N, seq_len) of ``stream`` starting every ``stride`` chars (a read-only view)."""
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if len(stream) < seq_len:
        return np.empty((0, seq_len), np.uint8)
    return np.lib.stride_tricks.sliding_window_view(stream, seq_len)[:: int(stride)]

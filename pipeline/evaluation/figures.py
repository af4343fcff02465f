"""Figures a person would rather look at than read: sample grids, sample text, loss curves."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id 0 = space


def to_uint8_images(samples: torch.Tensor, data_name: str) -> np.ndarray:
    """(N, H, W, C) model-space samples -> uint8 pixels (binary {0,1} or floats in [-1, 1])."""
    x = samples.detach().cpu()
    if data_name == "mnist":
        return (x.clamp(0, 1) * 255).to(torch.uint8).numpy()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def save_image_grid(images: np.ndarray, path: str | Path, *, scale: int = 3, cols: int | None = None) -> Path:
    """Tile (N, H, W, C) uint8 images into a PNG grid (1-pixel gaps): ``cols`` per row, or roughly square."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = image
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def decode_text(ids: torch.Tensor) -> list[str]:
    """(N, L) text8 ids -> strings, spaces shown as '_' (as the paper's samples are)."""
    return ["".join(TEXT8_ALPHABET[i] for i in row).replace(" ", "_") for row in ids.tolist()]


def save_samples(
    samples: torch.Tensor, data_name: str, path_stem: str | Path, vocabulary=None, *, cols: int | None = None
) -> Path:
    """A PNG grid for images (``cols`` per row, or roughly square), a .txt file for text (subword ids
    decoded with ``vocabulary``, the dataset's tokenizer); returns the path written."""
    path_stem = Path(path_stem)
    if data_name in ("text8", "text_bpe"):
        if data_name == "text_bpe" and vocabulary is None:
            raise ValueError("subword samples need the dataset's tokenizer to be decoded (vocabulary=None)")
        rows = decode_text(samples) if vocabulary is None else [vocabulary.decode(row) for row in samples.cpu()]
        path = path_stem.with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
        return path
    return save_image_grid(to_uint8_images(samples, data_name), path_stem.with_suffix(".png"), cols=cols)


def pyplot():
    """matplotlib.pyplot on the Agg backend. Its first import on a machine builds the font cache and
    logs "generated new fontManager" at INFO, which a Train worker's root logger would print: that
    notice is kept from a person unless someone set matplotlib's logging (``bfn -v``)."""
    # lazy: matplotlib (~0.25 s) is for curves only (eval, sample and quality never plot); pyplot after use("Agg")
    import matplotlib

    matplotlib.use("Agg")
    font_log = logging.getLogger("matplotlib.font_manager")
    if font_log.level == logging.NOTSET and logging.getLogger("matplotlib").level == logging.NOTSET:
        font_log.setLevel(logging.WARNING)
    import matplotlib.pyplot as plt  # after use("Agg") and the font log's level

    return plt


def save_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Line plot of each metric against the step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], history.items(), strict=True):
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None)
            if min(values) > 0 and max(values) / min(values) > 10:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""`bfn inpaint` and the conditioning flags of `bfn sample`: class labels, guidance, known pixels or a prompt.

* ``labels_for`` checks ``--class`` (one class, a comma list, or ``all``) and ``--guidance`` against
  the checkpoint's model (``model.num_labels``) and returns the (N,) labels to draw.
* ``inpaint`` keeps part of N test images (``--keep top-half | left-half | MASK.png``, white pixels
  kept) and samples the rest with ``bfn.conditioning.Known``; a PNG grid of three rows: the
  originals, the kept part (the rest grey), the completions. For text8 (``--text "a prompt" --fill
  64``) the prompt's characters are known at the start and the next ``fill`` are sampled; the
  completions are written one per line. ``--particles P`` > 1 completes by sequential Monte Carlo
  over P particles each (``bfn.samplers.smc``).

Bad input raises ``ConfigError`` naming the flag: the CLI exits with status 2.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bfn.conditioning import Known
from bfn.samplers import sample as draw
from pipeline import data as data_lib
from pipeline.config import Config, ConfigError, check_count, default_runs_dir, parse_grid, parse_samplers
from pipeline.evaluation import figures, models

KEEPS = ("top-half", "left-half")


def labels_for(cfg: Config, classes: str | int | None, guidance: float | None, per_class: int):
    """(labels (C * per_class,) long or None, guidance scale) for ``--class`` and ``--guidance``;
    ``classes`` is "3", "1,7", "all" or None (unconditional samples)."""
    num_labels = cfg.model.num_labels
    if num_labels is None and classes is not None:
        raise ConfigError(f"--class: the model is unconditional (trained without labels, data.name={cfg.data.name})")
    if num_labels is None and guidance is not None:
        raise ConfigError(f"--guidance: the model is unconditional (trained without labels, data.name={cfg.data.name})")
    if guidance is not None and classes is None:
        raise ConfigError(f"--guidance: guides towards a class; give --class too (got --guidance {guidance})")
    if classes is None:
        return None, 0.0
    text = str(classes).strip()
    items = range(num_labels) if text == "all" else [item.strip() for item in text.split(",")]
    chosen = []
    for item in items:
        value = item if isinstance(item, int) else (int(item) if re.fullmatch(r"\d+", item) else None)
        if value is None or value >= num_labels:
            raise ConfigError(
                f"--class: the model was trained with classes 0..{num_labels - 1}; give one, a comma list "
                f"or 'all' (got {classes!r})"
            )
        chosen.append(value)
    if guidance is not None and not np.isfinite(guidance):
        raise ConfigError(f"--guidance: must be a finite number (got {guidance})")
    labels = torch.tensor(list(dict.fromkeys(chosen)), dtype=torch.long).repeat_interleave(per_class)
    return labels, float(guidance or 0.0)


def image_mask(keep: str, shape: tuple[int, ...], flag: str = "--keep") -> torch.Tensor:
    """``--keep`` -> a bool mask of the data shape (H, W, C): True where pixels are kept; errors name ``flag``."""
    h, w, c = shape
    mask = torch.zeros(h, w, dtype=torch.bool)
    if keep == "top-half":
        mask[: h // 2] = True
    elif keep == "left-half":
        mask[:, : w // 2] = True
    elif keep.lower().endswith(".png"):
        path = Path(keep)
        try:
            picture = Image.open(path)
            picture.load()
        except (OSError, UnidentifiedImageError) as error:
            raise ConfigError(f"{flag}: cannot read the mask {path} ({type(error).__name__})") from None
        if picture.size != (w, h):
            raise ConfigError(
                f"{flag}: the mask {path} is {picture.size[0]}x{picture.size[1]} pixels; the model's images are {w}x{h}"
            )
        mask = torch.from_numpy(np.asarray(picture.convert("L")) >= 128)  # white: kept
    else:
        raise ConfigError(f"{flag}: must be {', '.join(KEEPS)} or a MASK.png (white pixels kept) (got {keep!r})")
    return mask.unsqueeze(-1).expand(h, w, c).clone()


def prompt_ids(text: str, fill: int, seq_len: int) -> torch.Tensor:
    """A text8 prompt -> its ids (P,); every character must be in the alphabet (a-z and space)."""
    for position, char in enumerate(text):
        if char not in figures.TEXT8_ALPHABET:
            raise ConfigError(
                f"--text: character {char!r} at position {position} is not in the text8 alphabet (a-z and space)"
            )
    if not text:
        raise ConfigError("--text: give a prompt of at least one character")
    if len(text) + fill > seq_len:
        raise ConfigError(
            f"--fill: the prompt ({len(text)} characters) and the fill ({fill}) exceed the model's window "
            f"data.seq_len={seq_len}"
        )
    return torch.tensor([figures.TEXT8_ALPHABET.index(char) for char in text], dtype=torch.long)


def check_mode(cfg: Config, keep: str | None, text: str | None) -> None:
    """``--keep`` for image models, ``--text`` for text8 models: exactly one, matching the data."""
    name = cfg.data.name
    image = not data_lib.is_text(name)
    if keep is not None and text is not None:
        raise ConfigError("--keep and --text: give one (--keep for image models, --text for text models)")
    if keep is None and text is None:
        raise ConfigError(f"--keep or --text: give one ({'--keep' if image else '--text'} for data.name={name})")
    if text is not None and image:
        raise ConfigError(f"--text: the model is an image model (data.name={name}); use --keep")
    if keep is not None and not image:
        raise ConfigError(f"--keep: the model is a text model (data.name={name}); use --text")
    if text is not None and name != "text8":
        raise ConfigError(f"--text: prompts are read in text8's alphabet; data.name={name} is not text8")


def check_infer_class(num_labels: int | None, particles: list[int]) -> None:
    """``--infer-class`` runs one SMC particle system per class: a conditional model, and every
    ``--particles`` count above 1 a multiple of the number of classes (at least one such count)."""
    smc = [count for count in particles if count > 1]
    if num_labels is None or not smc or any(count % num_labels for count in smc):
        raise ConfigError(
            f"--infer-class: needs a conditional model (model.num_labels={num_labels}) and --particles a "
            f"multiple of the number of classes, the same number of particles per class "
            f"(got --particles {','.join(map(str, particles))})"
        )


@torch.no_grad()
def inpaint(model, cfg: Config, checkpoint, *, keep=None, text=None, fill=64, num=8, split="test", **options) -> Path:
    """Complete ``num`` test images (``keep``) or ``num`` continuations of a prompt (``text``);
    ``options``: nfe, sampler, seed, grid, out, particles. Returns the path written."""
    check_mode(cfg, keep, text)
    num = check_count("--num", num, 1)
    sampler = parse_samplers(options.get("sampler", "paper"), several=False)[0]
    grid = parse_grid(options.get("grid"))
    seed, nfe = int(options.get("seed", 0)), options["nfe"]
    particles = check_count("--particles", options.get("particles", 1), 1)
    if particles > 1 and sampler != "paper":
        raise ConfigError(f"--particles: sequential Monte Carlo runs the paper sampler (got --sampler {sampler})")
    infer = bool(options.get("infer_class", False))
    if infer:
        check_infer_class(cfg.model.num_labels, [particles])
    generator = torch.Generator().manual_seed(seed)
    tag = "text" if text is not None else Path(keep).stem
    out = Path(options.get("out") or _default_out(checkpoint, tag, seed))
    if text is not None:
        fill = check_count("--fill", fill, 1)
        ids = prompt_ids(text, fill, cfg.data.seq_len)
        mask = torch.zeros(cfg.data.seq_len, dtype=torch.bool)
        mask[: len(ids)] = True
        values = torch.zeros(cfg.data.seq_len, dtype=torch.long)
        values[: len(ids)] = ids
        known = Known(mask, values)
        drawn = draw(
            model, num, sampler=sampler, nfe=nfe, generator=generator, grid=grid, known=known, particles=particles
        )
        rows = figures.decode_text(drawn[:, : len(ids) + fill])
        path = out.with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n")
        return path
    mask = image_mask(keep, cfg.data.data_shape)
    x = _test_images(cfg, split, num, seed)
    known = Known(mask, x)
    drawn = draw(
        model,
        len(x),
        sampler=sampler,
        nfe=nfe,
        generator=generator,
        grid=grid,
        known=known,
        particles=particles,
        infer_label=infer,
    )
    original = figures.to_uint8_images(x, cfg.data.name)
    kept = np.where(mask.numpy(), original, np.uint8(128))  # the unknown pixels grey
    completed = figures.to_uint8_images(drawn, cfg.data.name)
    images = np.concatenate([original, kept, completed])
    return figures.save_image_grid(images, out.with_suffix(".png"), cols=len(x))


def _test_images(cfg: Config, split: str, num: int, seed: int) -> torch.Tensor:
    """The first ``num`` images of ``split`` in the model's data space (MNIST binarised with ``seed``)."""
    data_lib.verify(cfg.data.uri, splits=[split])
    batch = next(
        data_lib.iter_batches(
            cfg.data.uri, split, cfg.data.name, batch_size=num, num_bins=cfg.data.num_bins, seed=seed
        ),
        None,
    )
    if batch is None:
        raise data_lib.DataError(f"{cfg.data.uri} split {split!r} holds no rows")
    x = torch.from_numpy(batch["x"])
    return x.long() if cfg.flow.kind == "discrete" else x.float()


def _default_out(checkpoint, tag: str, seed: int) -> Path:
    """<runs>/inpaint/<run>_<checkpoint>_<keep>_seed<S>: never into the (sealed) checkpoint folder."""
    if models.is_model_uri(checkpoint):
        name = "model_" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(checkpoint)[len("models:/") :])
    else:
        folder = Path(checkpoint).resolve()
        name = f"{folder.parent.name}_{folder.name}"
    return default_runs_dir() / "inpaint" / f"{name}_{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}_seed{seed}"

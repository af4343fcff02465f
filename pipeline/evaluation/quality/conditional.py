"""`bfn quality` for conditional generation: guidance, inpainting and text infilling, measured.

Three tables, one per flag (each row: mean ± standard deviation over seeds, as the plain table):

* ``--guidance 0,0.5,1,2,4`` (class-conditional image models): for every (sampler, NFE, w),
  ``num`` samples with the labels spread evenly over the classes (``balanced_labels``). Metrics:
  the conditional accuracy (the held-out classifier's argmax equals the requested class), the FD
  of all samples against the test split, and the FD per class (the samples requested as class c
  against the test images of class c), averaged over classes; each class's FD goes to the CSV.
  Beside them, per (sampler, NFE), the same network without a label (its "no condition" entry:
  the unconditional model that classifier-free guidance is trained into).
* ``--inpaint top-half`` (image models): ``num`` test images (a new draw of the test split for
  every seed) with the kept pixels known (``bfn.conditioning.Known``), completed without a label,
  by each sampler and, for each ``--particles`` count P > 1, by sequential Monte Carlo over P
  particles (``bfn.samplers.smc``; ``--fill`` likewise). With ``--infer-class`` (a conditional
  model) the SMC particles carry classes that the known pixels' weights infer.
  Metric: the classifier's accuracy on the completions against the images' true labels. Two
  baselines bound it: the classifier on the originals (the ceiling) and on the kept part alone
  with the rest set to the background (what the kept half already tells the classifier).
* ``--fill N`` (text8 models): ``num`` test windows whose first ``--prompt P`` characters are known
  (default: all but the last N); the next N are sampled. Metric: the share of filled characters
  equal to the held-out truth. Baselines on the same spans: a draw from the train split's unigram
  distribution (its expected accuracy, computed exactly) and always its most frequent character.

The ``data`` rows score real held-out images with their true labels through the same metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

import bfn.samplers
from bfn.conditioning import Known
from pipeline import data as data_lib
from pipeline.config import ConfigError
from pipeline.evaluation import figures
from pipeline.evaluation.inpaint import image_mask
from pipeline.evaluation.quality import metrics as qm
from pipeline.evaluation.quality.row import Row

log = logging.getLogger(__name__)

BACKGROUND = {"mnist": 0.0, "cifar10": 0.0}  # the value unknown pixels get in the kept-only baseline


def balanced_labels(num: int, num_labels: int) -> torch.Tensor:
    """(num,) class ids in contiguous blocks whose sizes differ by at most one: 0 0 0 1 1 1 2 ..."""
    return torch.arange(num) * num_labels // num


def check_guidances(model_cfg, values: list[float], num: int) -> None:
    """``--guidance`` needs a conditional model and at least two samples per class (a covariance)."""
    num_labels = model_cfg.num_labels
    if num_labels is None:
        raise ConfigError("--guidance: the model is unconditional (model.num_labels is null); nothing to guide")
    if num < 2 * num_labels:
        raise ConfigError(
            f"--num: the FD per class needs at least 2 samples of each of the {num_labels} classes; "
            f"give --num >= {2 * num_labels} (got {num})"
        )


def draw(
    model,
    sampler: str,
    nfe: int,
    num: int,
    *,
    seed: int,
    batch_size: int,
    device: torch.device,
    grid: str | None = None,
    label: torch.Tensor | None = None,
    guidance: float = 0.0,
    known: Known | None = None,
    particles: int = 1,
    infer_label: bool = False,
) -> tuple[torch.Tensor, float]:
    """``num`` samples in batches of ``batch_size`` from one seeded generator; (samples, seconds).
    ``grid``: the solvers' time grid (None: the flow's default); the paper's sampler has none.
    ``label`` (num,) and ``known`` values (num, ...) are sliced per batch."""
    generator = torch.Generator(device=device).manual_seed(seed)
    grid = None if sampler == "paper" else grid  # one table mixes the paper's sampler with the solvers
    started, chunks = time.perf_counter(), []
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        part = None if known is None else Known(known.mask, known.values[start:stop].to(device))
        chunks.append(
            bfn.samplers.sample(
                model,
                stop - start,
                sampler=sampler,
                nfe=nfe,
                generator=generator,
                device=device,
                grid=grid,
                label=None if label is None else label[start:stop].to(device),
                guidance=guidance,
                known=part,
                particles=particles,
                infer_label=infer_label,
            ).cpu()
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(chunks), time.perf_counter() - started


def _class_grid(samples: torch.Tensor, labels: torch.Tensor, name: str, path: Path) -> None:
    """One row per class: the first num // classes samples requested as each class."""
    classes = int(labels.max()) + 1
    per_class = len(labels) // classes
    rows = [samples[labels == c][:per_class] for c in range(classes)]
    figures.save_samples(torch.cat(rows), name, path, cols=per_class)


# ------------------------------------------------------------------------------- class guidance
def guidance_rows(
    model, cfg, scorer, *, samplers, nfes, guidances, num, seeds, batch_size, device, samples_dir=None, grid=None
) -> list[Row]:
    """Per (sampler, NFE): a row without a label, then one per guidance scale w."""
    labels = balanced_labels(num, cfg.model.num_labels)
    rows = [_data_row(cfg, scorer, num, seeds)]
    for sampler in samplers:
        for nfe in nfes:
            for w in [None, *guidances]:
                row = Row(f"{sampler}, no label" if w is None else sampler, nfe, num, guidance=w)
                for seed in range(seeds):
                    drawn, seconds = draw(
                        model,
                        sampler,
                        nfe,
                        num,
                        seed=seed,
                        batch_size=batch_size,
                        device=device,
                        grid=grid,
                        label=None if w is None else labels,
                        guidance=w or 0.0,
                    )
                    scores = scorer.score(drawn) if w is None else scorer.score_conditional(drawn, labels.numpy())
                    row.add({**scores, "seconds_per_sample": seconds / num})
                    if seed == 0 and samples_dir is not None:
                        tag = "nolabel" if w is None else f"w{w:g}"
                        path = Path(samples_dir) / f"{sampler}_nfe{nfe}_{tag}_seed0"
                        if w is None:
                            figures.save_samples(drawn, cfg.data.name, path)
                        else:
                            _class_grid(drawn, labels, cfg.data.name, path)
                    _log(row, seed)
                rows.append(row)
    return rows


def _data_row(cfg, scorer, num: int, seeds: int) -> Row:
    """Val-split images with their true labels: the conditional metrics a perfect model reaches."""
    n = min(num, data_lib.num_rows(cfg.data.uri, "val"))
    row = Row(f"data (val split, {n} rows)", None, n)
    if n < 2:
        log.warning("the val split has %d rows: no data row", n)
        return row
    for seed in range(seeds):
        batch = _batch(cfg, "val", n, seed)
        row.add(scorer.score_conditional(batch["x"], batch["label"]))
    return row


def _batch(cfg, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` rows of ``split`` with labels, shuffled (and MNIST binarised) with ``seed``."""
    return next(
        data_lib.iter_batches(
            cfg.data.uri,
            split,
            cfg.data.name,
            batch_size=n,
            num_bins=cfg.data.num_bins,
            seed=seed,
            shuffle=True,
            labels=True,
        )
    )


# ----------------------------------------------------------------------------------- inpainting
def inpaint_rows(
    model,
    cfg,
    scorer,
    *,
    keep,
    samplers,
    nfes,
    num,
    seeds,
    batch_size,
    device,
    samples_dir=None,
    grid=None,
    particles=(1,),
    infer_label=False,
) -> list[Row]:
    """Completions of ``num`` test images per (sampler, NFE, seed), then the two baselines.
    ``infer_label``: the SMC rows infer each image's class with a conditional network."""
    mask = image_mask(keep, cfg.data.data_shape, flag="--inpaint")
    num = min(num, data_lib.num_rows(cfg.data.uri, "test"))
    batches = [_batch(cfg, "test", num, seed) for seed in range(seeds)]
    dtype = torch.long if cfg.flow.kind == "discrete" else torch.float32
    ceiling, kept_only = Row("originals (test images)", None, num), Row(f"{keep} kept, the rest blank", None, num)
    for batch in batches:
        x = torch.from_numpy(batch["x"])
        ceiling.add(scorer.score_labelled(x, batch["label"]))
        blank = torch.where(mask, x, torch.full_like(x, BACKGROUND[cfg.data.name]))
        kept_only.add(scorer.score_labelled(blank, batch["label"]))
    rows = []
    for sampler, count in _runs(samplers, particles):
        for nfe in nfes:
            inferred = infer_label and count > 1  # the class is inferred by SMC particles only
            name = _name(sampler, count) + (", class inferred" if inferred else "")
            row = Row(f"{name}, {keep} kept", nfe, num)
            for seed, batch in enumerate(batches):
                x = torch.from_numpy(batch["x"]).to(dtype)
                drawn, seconds = draw(
                    model,
                    sampler,
                    nfe,
                    num,
                    seed=seed,
                    batch_size=batch_size,
                    device=device,
                    grid=grid,
                    known=Known(mask.to(device), x),
                    particles=count,
                    infer_label=inferred,
                )
                row.add({**scorer.score_labelled(drawn, batch["label"]), "seconds_per_sample": seconds / num})
                if seed == 0 and samples_dir is not None:
                    shown = min(num, 16)
                    original = figures.to_uint8_images(x[:shown], cfg.data.name)
                    kept = np.where(mask.numpy(), original, np.uint8(128))
                    completed = figures.to_uint8_images(drawn[:shown], cfg.data.name)
                    tag = sampler if count == 1 else f"smc{count}" + ("_inferred" if inferred else "")
                    path = Path(samples_dir) / f"{tag}_nfe{nfe}_{Path(keep).stem}_seed0.png"
                    figures.save_image_grid(np.concatenate([original, kept, completed]), path, cols=shown)
                _log(row, seed)
            rows.append(row)
    return [ceiling, kept_only, *rows]


# -------------------------------------------------------------------------------- text infilling
def check_fill(cfg, fill: int, prompt: int | None) -> int:
    """The prompt length: ``prompt`` known characters, then ``fill`` sampled, within the window."""
    seq_len = int(cfg.data.seq_len)
    prompt = seq_len - fill if prompt is None else prompt
    if fill < 1 or prompt < 1 or prompt + fill > seq_len:
        raise ConfigError(
            f"--prompt/--fill: need prompt >= 1, fill >= 1 and prompt + fill <= data.seq_len={seq_len} "
            f"(got prompt {prompt}, fill {fill})"
        )
    return prompt


def unigram(uri: str) -> np.ndarray:
    """The train split's character frequencies (27,), float64."""
    counts = sum(qm.char_counts(b["x"]) for b in data_lib.iter_batches(uri, "train", "text8", batch_size=4096))
    return counts / counts.sum()


def fill_rows(
    model,
    cfg,
    *,
    fill,
    prompt,
    samplers,
    nfes,
    num,
    seeds,
    batch_size,
    device,
    samples_dir=None,
    grid=None,
    particles=(1,),
) -> list[Row]:
    """Per (sampler, NFE): accuracy of the ``fill`` characters after a ``prompt``-character prompt."""
    seq_len = int(cfg.data.seq_len)
    span = slice(prompt, prompt + fill)
    windows = [_text_windows(cfg, num, seed) for seed in range(seeds)]
    freq = unigram(cfg.data.uri)
    draw_row = Row("unigram draw (train frequencies)", None, num)
    mode_row = Row(f"unigram mode (always {qm.decode(np.array([freq.argmax()]))!r})", None, num)
    for truth in windows:
        target = truth[:, span].numpy()
        draw_row.add({"fill_accuracy": float(freq[target].mean())})  # E[draw == truth] = p_train(truth)
        mode_row.add({"fill_accuracy": float((target == freq.argmax()).mean())})
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[:prompt] = True
    rows = []
    for sampler, count in _runs(samplers, particles):
        for nfe in nfes:
            row = Row(f"{_name(sampler, count)}, {prompt} known", nfe, num)
            for seed, truth in enumerate(windows):
                drawn, seconds = draw(
                    model,
                    sampler,
                    nfe,
                    len(truth),
                    seed=seed,
                    batch_size=batch_size,
                    device=device,
                    grid=grid,
                    known=Known(mask.to(device), truth),
                    particles=count,
                )
                accuracy = float((drawn[:, span] == truth[:, span]).double().mean())
                row.add({"fill_accuracy": accuracy, "seconds_per_sample": seconds / len(truth)})
                if seed == 0 and samples_dir is not None:
                    tag = sampler if count == 1 else f"smc{count}"
                    path = Path(samples_dir) / f"{tag}_nfe{nfe}_fill{fill}_seed0.txt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    lines = []
                    for got, want in zip(drawn[:8], truth[:8], strict=True):
                        head = qm.decode(want[:prompt].numpy())[-40:]
                        lines += [f"prompt …{head}", f"  truth  {qm.decode(want[span].numpy())}"]
                        lines += [f"  filled {qm.decode(got[span].numpy())}", ""]
                    path.write_text("\n".join(lines))
                _log(row, seed)
            rows.append(row)
    return [draw_row, mode_row, *rows]


def _runs(samplers: list[str], particles) -> list[tuple[str, int]]:
    """(sampler, particles) pairs: every sampler alone, then SMC (the paper sampler) per count > 1."""
    return [(sampler, 1) for sampler in samplers if 1 in particles] + [("paper", p) for p in particles if p > 1]


def _name(sampler: str, particles: int) -> str:
    return sampler if particles == 1 else f"SMC, {particles} particles"


def _text_windows(cfg, num: int, seed: int) -> torch.Tensor:
    """``num`` stored test windows (N, seq_len), a different draw for every seed."""
    rows = data_lib.num_rows(cfg.data.uri, "test")
    batch = next(
        data_lib.iter_batches(
            cfg.data.uri, "test", "text8", batch_size=min(num, rows), seed=seed, shuffle=True, stride=cfg.data.seq_len
        )
    )
    return torch.from_numpy(batch["x"]).long()


def _log(row: Row, seed: int) -> None:
    values = ", ".join(f"{k} {v[-1]:.4g}" for k, v in row.values.items() if not k.startswith("fd_class_"))
    w = "" if row.guidance is None else f" w {row.guidance:g}"
    log.info("quality: %s nfe %s%s seed %d: %s", row.label, row.nfe, w, seed, values)

"""The small image classifier whose features the Fréchet distance is measured in.

One classifier per (architecture, training settings, data): it is trained on the dataset's train
split (preprocessed exactly as the BFN sees it: dynamically binarised MNIST, bin-centre CIFAR-10),
scored on the test split, and cached in ``<cache>/<dataset>-<key>/`` (``classifier.pt`` weights,
read weights-only, and ``meta.json`` with its test accuracy). ``key`` hashes the architecture, the
training settings and the data manifest's train/test shards, so new data or settings train anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import data as data_lib
from pipeline.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
ARCHITECTURE_VERSION = 1  # bump when SmallCNN changes: old caches then no longer match


class SmallCNN(nn.Module):
    """conv(c1)-pool-conv(c2)-pool -> Linear(feature_dim) + ReLU (the features) -> Linear(10)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        *,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, feature_dim): the penultimate activations."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and training settings; every field is part of the cache key."""

    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 64
    epochs: int = 2
    min_steps: int = 300  # small splits (the bundled CIFAR-10 subset) still get this many steps
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def key_fields(self) -> dict:
        return {"architecture": "SmallCNN", "architecture_version": ARCHITECTURE_VERSION, **asdict(self)}


DEFAULT_SPEC = ClassifierSpec()


def to_input(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Model-space images (B, H, W, C): MNIST {0, 1}, CIFAR-10 [-1, 1] -> float (B, C, H, W)."""
    x = torch.as_tensor(x)
    if tuple(x.shape[1:]) != IMAGE_SHAPES[name]:
        raise ValueError(
            f"{name} images must be (batch, {', '.join(map(str, IMAGE_SHAPES[name]))}), got {tuple(x.shape)}"
        )
    return x.float().permute(0, 3, 1, 2).contiguous()


def manifest_digest(uri: str, splits: tuple[str, ...] = ("train", "test")) -> str:
    """sha256 of what identifies the data: dataset, format, schema and the splits' shard hashes."""
    man = data_lib.read_manifest(uri)
    ident = {
        "dataset": man["dataset"],
        "format_version": man["format_version"],
        "splits": {
            s: {
                "schema": man["splits"][s]["schema"],
                "shards": [(sh["sha256"], sh["rows"]) for sh in man["splits"][s]["shards"]],
            }
            for s in splits
            if s in man["splits"]
        },
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cache_key(name: str, num_bins: int, spec: ClassifierSpec, digest: str) -> str:
    fields = {
        "dataset": name,
        "num_bins": None if num_bins is None else int(num_bins),
        **spec.key_fields(),
        "data": digest,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_cache_dir(cache_dir: str | Path) -> Path:
    """The cache folder, refused inside the installed packages (caches belong under runs/)."""
    path = Path(cache_dir).expanduser().resolve()
    for package in ("pipeline", "bfn"):
        root = Path(__import__(package).__file__).resolve().parent
        if path == root or root in path.parents:
            raise ConfigError(
                f"classifier cache {path}: must not lie inside the {package} package; use a folder under runs/"
            )
    return path


def split_arrays(uri: str, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """All stored rows of an image split: (uint8 pixels (N, H*W*C), int64 labels (N,))."""
    return data_lib.labelled_images(uri, split, name)


def _inputs(name: str, images: np.ndarray, num_bins: int, rng: np.random.Generator) -> torch.Tensor:
    """Raw pixels -> classifier input through the BFN's own data path (``preprocess``, then
    ``to_model``: MNIST binarised with a generator drawn from ``rng``)."""
    stored = torch.from_numpy(data_lib.preprocess(name, {"image": images}, num_bins=num_bins)["x"])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return to_input(data_lib.to_model(stored, name, seq_len=0, generator=generator).numpy(), name)


@torch.no_grad()
def accuracy(
    net: SmallCNN, name: str, images: np.ndarray, labels: np.ndarray, num_bins: int, device: torch.device, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    net.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        x = _inputs(name, images[start : start + 1000], num_bins, rng).to(device)
        correct += (net(x).argmax(1).cpu().numpy() == labels[start : start + 1000]).sum()
    return float(correct / max(len(images), 1))


def train(uri: str, name: str, num_bins: int, spec: ClassifierSpec, device: torch.device) -> tuple[SmallCNN, dict]:
    """Train on the train split (AdamW, cross-entropy, fresh binarisation each epoch); test accuracy."""
    images, labels = split_arrays(uri, "train", name)
    if not len(images):
        raise ConfigError(f"data.uri={uri}: the train split is empty; the classifier has nothing to learn")
    height, _, channels = IMAGE_SHAPES[name]
    torch.manual_seed(spec.seed)
    net = SmallCNN(channels, height, channels=spec.channels, feature_dim=spec.feature_dim).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=spec.lr)
    rng = np.random.default_rng(spec.seed)
    per_epoch = max(1, -(-len(images) // spec.batch_size))
    total = max(spec.epochs * per_epoch, spec.min_steps)
    started, step = time.perf_counter(), 0
    net.train()
    while step < total:
        order = rng.permutation(len(images))
        for start in range(0, len(images), spec.batch_size):
            rows = order[start : start + spec.batch_size]
            x = _inputs(name, images[rows], num_bins, rng).to(device)
            loss = F.cross_entropy(net(x), torch.from_numpy(labels[rows]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 200 == 0 or step == total:
                log.info("quality classifier (%s): step %d/%d, loss %.3f", name, step, total, loss.item())
            if step >= total:
                break
    seconds = time.perf_counter() - started
    test_images, test_labels = split_arrays(uri, "test", name)
    meta = {
        "train_rows": len(images),
        "steps": total,
        "train_seconds": round(seconds, 1),
        "test_rows": len(test_images),
        "test_accuracy": accuracy(net, name, test_images, test_labels, num_bins, device, spec.seed),
    }
    return net.eval(), meta


def load_or_train(
    uri: str,
    name: str,
    num_bins: int,
    cache_dir: str | Path,
    *,
    spec: ClassifierSpec = DEFAULT_SPEC,
    device: torch.device | None = None,
) -> tuple[SmallCNN, dict]:
    """The cached classifier for (spec, data), trained and stored first when there is none.

    Returns the network (eval mode, on ``device``) and its meta (key, test accuracy, folder).
    """
    if name not in IMAGE_SHAPES:
        raise ConfigError(f"data.name: a classifier exists for {', '.join(IMAGE_SHAPES)} only (got {name!r})")
    device = device or torch.device("cpu")
    digest = manifest_digest(uri)
    key = cache_key(name, num_bins, spec, digest)
    folder = check_cache_dir(cache_dir) / f"{name}-{key}"
    height, _, channels = IMAGE_SHAPES[name]
    net = SmallCNN(channels, height, channels=spec.channels, feature_dim=spec.feature_dim)
    if (folder / "meta.json").is_file() and (folder / "classifier.pt").is_file():
        net.load_state_dict(torch.load(folder / "classifier.pt", map_location="cpu", weights_only=True))
        meta = json.loads((folder / "meta.json").read_text())
        log.info("quality classifier %s (test accuracy %.4f) from %s", key, meta["test_accuracy"], folder)
        return net.to(device).eval(), {**meta, "folder": str(folder)}
    log.info("quality classifier %s: training on %s's train split (cached in %s)", key, name, folder)
    trained, meta = train(uri, name, num_bins, spec, device)
    meta = {
        "key": key,
        "dataset": name,
        "num_bins": num_bins,
        "data_manifest_sha256": digest,
        "spec": spec.key_fields(),
        "torch": torch.__version__,
        **meta,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-{key}-", dir=folder.parent))
    torch.save(trained.state_dict(), staging / "classifier.pt")
    (staging / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:
        staging.rename(folder)  # atomic: a concurrent trainer of the same key leaves one complete copy
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "quality classifier %s: test accuracy %.4f on %d rows (%.0f s)",
        key,
        meta["test_accuracy"],
        meta["test_rows"],
        meta["train_seconds"],
    )
    return trained.to(device).eval(), {**meta, "folder": str(folder)}

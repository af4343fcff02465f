"""Sample-quality metrics: pure functions, and the per-dataset scorers that apply them.

Images (MNIST binarised, CIFAR-10), in the features of ``classifier.SmallCNN``:
  * ``fd``: Fréchet distance ||mu_s - mu_d||^2 + tr(S_s + S_d - 2 (S_d^1/2 S_s S_d^1/2)^1/2) between
    Gaussians fitted (float64, unbiased covariance) to the samples' and the test split's penultimate
    features. Lower is better; with few samples it is biased upwards (see the table's data row).
  * ``confidence``: mean over samples of the classifier's largest class probability (recognisable digits).
  * ``label_entropy_bits``: entropy of the mean predicted label distribution, bits (diversity; at most
    log2 10 = 3.32).
  * ``class_accuracy`` (labelled images): share of images whose classifier argmax is their label: the
    requested class for conditional samples, the true class for completed test images.
  * ``fd_class`` (conditional samples): the FD of the samples requested as class c against the test
    images of class c, averaged over classes (each class's value is ``fd_class_c``; NaN, and left
    out of the mean, where the samples or the test images of a class are fewer than two).
text8 infilling: ``fill_accuracy``, the share of sampled characters equal to the held-out truth.
text8 (27 symbols, id 0 = space):
  * ``spelling_accuracy``: share of generated words found in the train split's vocabulary. Words are
    split on spaces; each sample's first and last piece are dropped, since a window cuts words.
  * ``char_js_bits``: Jensen-Shannon divergence, base 2 (in [0, 1]), between the samples' and the test
    split's character frequencies.
The matrix square root uses numpy's ``eigh`` on symmetric products (no scipy).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import data as data_lib
from pipeline.config import DATASETS
from pipeline.evaluation.quality import classifier as clf

TEXT8_SYMBOLS = 27


# ------------------------------------------------------------------------------------- pure math
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), float64, of (N, d) features; N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (N >= 2, d), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2), float64.

    tr((cov1 cov2)^1/2) = tr((A cov2 A)^1/2) with A = cov1^1/2: a symmetric PSD product, so two
    ``eigh`` calls replace scipy's ``sqrtm`` and stay real for singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root = _sqrt_psd(cov1)
    cross = np.trace(_sqrt_psd(root @ cov2 @ root))
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross)
    return max(value, 0.0)


def features_fd(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """FD of (N >= 2, d) features against reference (mean, covariance)."""
    return frechet_distance(*feature_stats(features), *reference)


def entropy_bits(p: np.ndarray) -> float:
    p = np.asarray(p, np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def label_stats(probs: np.ndarray) -> dict[str, float]:
    """(N, classes) probabilities -> confidence (mean max) and entropy of the mean, bits."""
    probs = np.asarray(probs, np.float64)
    return {"confidence": float(probs.max(1).mean()), "label_entropy_bits": entropy_bits(probs.mean(0))}


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two histograms (normalised here), in [0, 1]."""
    p = np.asarray(p, np.float64) / np.sum(p)
    q = np.asarray(q, np.float64) / np.sum(q)
    m = (p + q) / 2
    return max(entropy_bits(m) - (entropy_bits(p) + entropy_bits(q)) / 2, 0.0)


def char_counts(ids: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(ids, np.int64).ravel(), minlength=TEXT8_SYMBOLS)[:TEXT8_SYMBOLS]


_ALPHABET = np.frombuffer(data_lib.TEXT8_ALPHABET.encode(), np.uint8)


def decode(ids: np.ndarray) -> str:
    """text8 ids -> text, vectorised (the train split of full text8 has 90M characters)."""
    return _ALPHABET[np.asarray(ids, np.int64)].tobytes().decode("ascii")


def sample_words(text: str) -> list[str]:
    """The whole words of one window: split on spaces, the first and last (cut) pieces dropped."""
    return [w for w in text.split(" ")[1:-1] if w]


def spelling_accuracy(texts: list[str], vocabulary: set[str]) -> tuple[float, int]:
    """(share of words in ``vocabulary``, number of words) over all windows; 0.0 without words."""
    words = [w for text in texts for w in sample_words(text)]
    return (sum(w in vocabulary for w in words) / len(words) if words else 0.0), len(words)


# --------------------------------------------------------------------------------------- scorers
class ImageScorer:
    """Classifier features/probabilities of samples against the test split's feature statistics."""

    def __init__(
        self,
        uri: str,
        name: str,
        num_bins: int,
        cache_dir,
        *,
        device: torch.device,
        spec: clf.ClassifierSpec = clf.DEFAULT_SPEC,
        max_reference_rows: int = 10_000,
    ) -> None:
        self.name, self.device = name, device
        self.net, self.classifier = clf.load_or_train(uri, name, num_bins, cache_dir, spec=spec, device=device)
        features, labels = [], []
        for batch in data_lib.iter_batches(uri, "test", name, batch_size=1000, num_bins=num_bins, labels=True):
            features.append(self.features_and_probs(batch["x"])[0])
            labels.append(batch["label"])
            if sum(len(f) for f in features) >= max_reference_rows:
                break
        features = np.concatenate(features)[:max_reference_rows]
        self.reference = feature_stats(features)
        self.reference_rows = len(features)
        self._test_features, self._test_labels = features, np.concatenate(labels)[:max_reference_rows]
        self._class_reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray]:
        feats, probs = [], []
        images = torch.as_tensor(images)
        for start in range(0, len(images), 1000):
            x = clf.to_input(images[start : start + 1000], self.name).to(self.device)
            f = self.net.features(x)
            feats.append(f.double().cpu().numpy())
            probs.append(torch.softmax(self.net.head(f).double(), -1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)

    def score(self, samples) -> dict[str, float]:
        """(N >= 2, H, W, C) model-space images -> fd, confidence, label_entropy_bits."""
        features, probs = self.features_and_probs(samples)
        return {"fd": features_fd(features, self.reference), **label_stats(probs)}

    def class_reference(self, label: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Feature statistics of the test images of class ``label`` (computed once); None with
        fewer than two such images (no covariance)."""
        if label not in self._class_reference:
            rows = self._test_features[self._test_labels == label]
            self._class_reference[label] = feature_stats(rows) if len(rows) >= 2 else None
        return self._class_reference[label]

    def _class_fd(self, features: np.ndarray, label: int) -> float:
        reference = self.class_reference(label)
        return math.nan if reference is None or len(features) < 2 else features_fd(features, reference)

    def score_labelled(self, samples, labels) -> dict[str, float]:
        """``score`` plus ``class_accuracy``: the classifier's argmax equals ``labels`` (N,)."""
        features, probs = self.features_and_probs(samples)
        return {
            "fd": features_fd(features, self.reference),
            **label_stats(probs),
            "class_accuracy": float((probs.argmax(1) == np.asarray(labels)).mean()),
        }

    def score_conditional(self, samples, labels) -> dict[str, float]:
        """``score_labelled`` for samples requested as ``labels``, plus the FD of each class's
        samples against that class's test images (``fd_class_c``) and their mean (``fd_class``)."""
        features, probs = self.features_and_probs(samples)
        labels = np.asarray(labels)
        per_class = {f"fd_class_{c}": self._class_fd(features[labels == c], int(c)) for c in np.unique(labels)}
        finite = [v for v in per_class.values() if math.isfinite(v)]
        return {
            "fd": features_fd(features, self.reference),
            **label_stats(probs),
            "class_accuracy": float((probs.argmax(1) == labels).mean()),
            "fd_class": float(np.mean(finite)) if finite else math.nan,
            **per_class,
        }

    def describe(self) -> str:
        c = self.classifier
        return (
            f"classifier {c['key']} ({c['dataset']}, penultimate {c['spec']['feature_dim']} features): "
            f"test accuracy {c['test_accuracy']:.4f} on {c['test_rows']} rows; FD reference: "
            f"{self.reference_rows} test rows; {c['folder']}"
        )


class TextScorer:
    """Spelling against the train split's words, character frequencies against the test split's."""

    def __init__(self, uri: str) -> None:
        seq_len = int(data_lib.read_manifest(uri)["seq_len"])
        batches = data_lib.iter_batches(uri, "train", "text8", batch_size=4096, stride=seq_len)
        train = np.concatenate([b["x"].ravel().astype(np.uint8) for b in batches])
        # windows every seq_len characters do not overlap: joined, they are the split's text
        self.vocabulary = set(sample_words(decode(train)))
        self.reference = sum(char_counts(b["x"]) for b in data_lib.iter_batches(uri, "test", "text8", batch_size=4096))

    def score(self, samples) -> dict[str, float]:
        """(N, L) ids -> spelling_accuracy, char_js_bits (and the word count, for the record)."""
        ids = torch.as_tensor(samples).cpu().numpy()
        accuracy, words = spelling_accuracy([decode(row) for row in ids], self.vocabulary)
        return {
            "spelling_accuracy": accuracy,
            "char_js_bits": js_divergence_bits(char_counts(ids), self.reference),
            "words": float(words),
        }

    def describe(self) -> str:
        return (
            f"train vocabulary: {len(self.vocabulary)} words; character reference: "
            f"{int(self.reference.sum())} test characters"
        )


METRICS = {  # name -> (label, better direction), in table order
    "fd": ("FD", "lower"),
    "confidence": ("confidence", "higher"),
    "label_entropy_bits": ("label entropy (bits)", "higher"),
    "class_accuracy": ("class accuracy", "higher"),
    "fd_class": ("FD per class (mean)", "lower"),
    "fill_accuracy": ("fill accuracy (chars)", "higher"),
    "spelling_accuracy": ("spelling accuracy", "higher"),
    "char_js_bits": ("char JS (bits)", "lower"),
}


def make_scorer(
    uri: str, name: str, num_bins: int, cache_dir, *, device: torch.device, spec: clf.ClassifierSpec = clf.DEFAULT_SPEC
) -> ImageScorer | TextScorer:
    if name == "text8":
        return TextScorer(uri)
    return ImageScorer(uri, name, num_bins, cache_dir, device=device, spec=spec)


def min_samples(name: str) -> int:
    """Samples a quality point needs for dataset ``name`` (``config.DATASETS``)."""
    return DATASETS[name].min_quality_samples

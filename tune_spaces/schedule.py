"""Accuracy-schedule spaces: beta_1 for discrete data, sigma_1 for continuous/discretised data.

beta_1 is log-uniform over [paper / 4, paper * 4] around the paper's values (MNIST 9, i.e. the
official max_sqrt_beta = 3; text8 0.5625, max_sqrt_beta = 0.75); sigma_1 is log-uniform over
[1e-4, 1e-1] (the paper uses 1e-3 for 256-bin and continuous CIFAR-10, sqrt(1e-3) for 16 bins).
"""

from __future__ import annotations

from ray import tune

PAPER_BETA_1 = {"mnist": 9.0, "text8": 0.5625}
BETA_1_FACTOR = 4.0
SIGMA_1_RANGE = (1e-4, 1e-1)


def beta_1_around(paper_value: float, factor: float = BETA_1_FACTOR):
    return tune.loguniform(paper_value / factor, paper_value * factor)


def mnist() -> dict:
    """Binarised MNIST (discrete, K = 2): beta_1 in [2.25, 36]."""
    return {"flow.beta_1": beta_1_around(PAPER_BETA_1["mnist"])}


def text8() -> dict:
    """text8 (discrete, K = 27): beta_1 in [0.140625, 2.25]."""
    return {"flow.beta_1": beta_1_around(PAPER_BETA_1["text8"])}


def continuous() -> dict:
    """CIFAR-10, continuous or discretised: sigma_1 in [1e-4, 1e-1]."""
    return {"flow.sigma_1": tune.loguniform(*SIGMA_1_RANGE)}


BETA_1_TIMES_K_RULE = 16.0  # the paper's beta_1 K: text8 0.5625 x 27 = 15.2, MNIST 9 x 2 = 18


def vocabulary() -> dict:
    """Any vocabulary (subword text, K up to 65,536): beta_1 = beta_1_times_k / K, with beta_1 K
    log-uniform in [8, 64]: around the paper's 16 and skewed upwards, because K - 1 rivals ask for a
    larger product as K grows ("auto" gives 34 at K = 4,096 and 44 at 50,257; docs/vocabulary.md)."""
    return {
        "flow.beta_1": None,
        "flow.beta_1_times_k": tune.loguniform(BETA_1_TIMES_K_RULE / 2, BETA_1_TIMES_K_RULE * 4),
    }

"""One row of a `bfn quality` table: a label, NFE, guidance scale and each metric's values over seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Row:
    label: str
    nfe: int | None
    num: int
    guidance: float | None = None  # conditional rows: the classifier-free guidance scale w
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, scores: dict[str, float]) -> None:
        for key, value in scores.items():
            self.values.setdefault(key, []).append(float(value))

    def stat(self, key: str) -> tuple[float, float]:
        v = self.values.get(key, [])
        if not v:
            return math.nan, math.nan
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan

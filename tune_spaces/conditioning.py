"""Class-conditioning space: how often training drops the label (``model.cond_drop``) and the
classifier-free guidance scale of the validation samples (``eval.guidance``). For the conditional
presets (``model.num_labels`` set); an unconditional config rejects both keys.
"""

from __future__ import annotations

from ray import tune


def conditioning() -> dict:
    return {
        "model.cond_drop": tune.uniform(0.0, 0.3),
        "eval.guidance": tune.choice([0.0, 0.5, 1.0, 2.0, 4.0]),
    }

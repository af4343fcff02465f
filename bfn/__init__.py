"""Bayesian Flow Networks (Graves et al. 2023, arXiv 2308.07037) in pure PyTorch.

Reading guide: schedules.py (accuracy schedules) -> flows.py (Bayesian flows) ->
distributions.py (output distributions and heads) -> losses.py -> model.py (BFN) -> nll.py, ema.py;
samplers.py (the paper's sampler and BFN-Solvers, by name and NFE); networks/ holds the paper's
networks and small CPU presets. This package never imports Ray, MLflow, Hydra or the pipeline.
"""

from bfn.distributions import BernoulliHead, CategoricalHead, DeltaHead, DiscretizedNormalHead
from bfn.ema import EMA
from bfn.flows import ContinuousFlow, ContinuousParams, DiscreteFlow, DiscreteParams
from bfn.model import BFN
from bfn.nll import NLLEstimate
from bfn.samplers import SAMPLERS, sample
from bfn.schedules import ContinuousSchedule, DiscreteSchedule

__all__ = [
    "BFN",
    "EMA",
    "BernoulliHead",
    "CategoricalHead",
    "ContinuousFlow",
    "ContinuousParams",
    "ContinuousSchedule",
    "DeltaHead",
    "DiscreteFlow",
    "DiscreteParams",
    "DiscreteSchedule",
    "DiscretizedNormalHead",
    "NLLEstimate",
    "SAMPLERS",
    "sample",
]

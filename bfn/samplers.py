"""Samplers for a trained BFN, chosen by name, with a budget of network calls (NFE).
(Longer than 500 lines: every sampler, guidance and SMC share one step, one condition and one NFE contract.)

Shapes: B samples, D = prod(data_shape), K classes.

Every sampler makes exactly ``nfe`` network calls: nfe - 1 updates of the input distribution,
then one last call whose output distribution p_O gives the samples, its mode (the paper's choice)
or, with ``return_sample=True``, a draw. The result has the contract of ``BFN.sample``:
(B, *data_shape), long class ids for discrete data, floats in [-1, 1] otherwise (bin centres for
discretised data).

Samplers (``SAMPLERS``):
  * ``paper``  Graves et al. Algorithms 3, 6, 9, as in the official code: n = nfe - 1 steps at
    t = (i - 1)/n, each draws x ~ p_O, sends y ~ p_S(. | x; alpha_i) and updates by Bayes; the
    last call is at t = 1. nfe = 1 is the prior's prediction at t = 1.
  * ``ode1``, ``ode2``, ``sde1``, ``sde2``  BFN-Solver (Xue et al., ICML 2024, arXiv 2404.15766):
    first/second-order solvers of the probability-flow ODE or the reverse SDE of the Bayesian
    flow, written with the network's data prediction x_hat (E[x] under p_O). Second order is the
    multistep kind: the previous call's prediction makes x_hat linear over the step, at no extra
    call; the first step is first order. The SDE steps are exact for an x_hat that is constant
    (order 1) or linear (order 2) over the step, like the ODE steps.

Solver call times t_0 = t_start < t_1 < ... < t_{nfe-1} (``solver_times``): the state starts at
t_start > 0 (at t = 0 it is a point and the ODE is singular) from the flow's marginal with its data
term dropped ("zero_mean_and_std"), moves t_0 -> t_1 -> ... -> t_{nfe-1}, and the prediction of
the call at t_{nfe-1} is the result. Two grids:
  * ``uniform``  t_j = t_start + (1 - t_start) j / nfe: BFN-Solver's grid with its ``last_drop``
    (the last call is at 1 - (1 - t_start)/nfe, not at 1).
  * ``logsnr``   uniform in the flow's log-SNR (lambda_t below; ln beta_t for discrete data, so
    geometric in t) from t_start to 1, the last call at t = 1 as in the paper's sampler:
    DPM-Solver's spacing, short steps where the input distribution changes fastest relative to its
    noise. Ending at 1 matters where the schedule's accuracy comes late (text8's beta_1 = 0.5625):
    ending one log-step early left the last prediction near the prior there (docs/sampling.md).
Defaults (``DEFAULT_GRID``, ``DEFAULT_T_START``): the Gaussian-mean flow keeps BFN-Solver's CIFAR-10
setting (uniform, t_start 1e-2; not measured here); discrete data uses logsnr from t_start 1e-3,
measured on binarised MNIST and text8 checkpoints (docs/sampling.md).

Continuous and discretised data (state: input mean mu, (B, D)). The flow is
mu_t ~ N(gamma_t x, gamma_t (1 - gamma_t)), gamma_t = 1 - sigma_1^(2t): in diffusion notation
alpha_t = gamma_t, sigma_t = sqrt(gamma_t (1 - gamma_t)), log-SNR lambda_t = ln(alpha_t/sigma_t)
= ln(beta_t)/2. With h = lambda_t - lambda_s and x_hat taken linear in lambda through the previous
prediction x_hat_r (h_r = lambda_s - lambda_r), exactly integrated:
  ode: mu_t = (sigma_t/sigma_s) mu_s + alpha_t (1 - e^-h) x_hat_s
              + alpha_t (h - 1 + e^-h) (x_hat_s - x_hat_r)/h_r
  sde: mu_t = (sigma_t/sigma_s) e^-h mu_s + alpha_t (1 - e^-2h) x_hat_s
              + alpha_t (h - (1 - e^-2h)/2) (x_hat_s - x_hat_r)/h_r + sigma_t sqrt(1 - e^-2h) z
(DPM-Solver++ forms; BFN-Solver's code approximates the second-order weights by alpha_t(1-e^-h)/2
and alpha_t(1-e^-2h)/2, the same to second order). sde1 with a point prediction is the paper's
Bayesian update: (sigma_t/sigma_s) e^-h = rho_s/rho_t, alpha_t (1 - e^-2h) = alpha/rho_t with
alpha = rho_t - rho_s, the noise (1 - gamma_t) sqrt(alpha) z.

Discrete data (state: logits y, (B, D, K), theta = softmax(y)). The flow is
y_t ~ N(beta_t (K e_x - 1), beta_t K I), beta_t = beta_1 t^2. Its reverse SDE is
dy = beta'_t (K p_hat - 1) dt + sqrt(K beta'_t) dw (p_hat: p_O's probabilities), its
probability-flow ODE dy/dt = y/t + beta_1 t (K p_hat - 1). With p_hat linear in t through the
previous prediction p_hat_r (D1 = (p_hat_s - p_hat_r)/(s - r)), exactly integrated:
  ode: y_t = (t/s) y_s + beta_1 t (t - s) (K p_hat_s - 1) + beta_1 K t (t - s)^2/2 D1
  sde: y_t = y_s + (beta_t - beta_s)(K p_hat_s - 1) + beta_1 K (t - s)^2 (2t + s)/3 D1
             + sqrt(K (beta_t - beta_s)) z
sde1 is the paper's step with p_hat in place of a one-hot draw from p_O.

Conditioning (every sampler, through ``bfn.conditioning.SamplingCondition``): ``label`` conditions
a class-conditional network; ``guidance`` w != 0 adds classifier-free guidance, (1 + w) z_c - w z_u
on the raw outputs (logits; noise or data prediction), evaluated by ONE call on a doubled batch
per step: the same NFE, about twice the compute per call; w = 0 is plain conditional sampling.
``known`` (inpainting, infilling) keeps given coordinates: before every call the input
distribution there is the data (one-hot theta; mean = x), the paper's sender draws there come
from the data, the solvers' predictions there are the data, and so is the result.
``particles`` P > 1 (the paper's sampler, with ``known``) is twisted sequential Monte Carlo
instead: P particles per sample, whose known inputs follow the data's own flow (what the network
was trained on). Over the known coordinates, each step multiplies a particle's weight by
p_R(y) / p_S(y | x) (its sender draw came from the data, not from its receiver) and by the twist
psi(theta_i) / psi(theta_{i-1}), psi(theta) = p_O(x_known | theta) from the step's own network call
(so it costs nothing extra); the last call's p_O(x_known) replaces the last psi. The twists cancel
in the product, so the target is exactly the model's own conditional p(x_unknown | x_known); they
steer resampling (below an effective sample size of P / 2) towards particles whose unknown part
already predicts the known part. One particle per sample is drawn by its final weight. P times the
compute of one sample. ``infer_label`` runs one such particle system per class of a conditional
network and takes the class of largest total weight (``smc``).

Numerics: step coefficients are python floats computed in float64; the state math runs in float32
with autocast off, so the network may run under bf16 autocast.
What is not here: single-step (extra-call) second-order solvers; SMC for the BFN-Solvers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bfn import losses
from bfn.conditioning import Known, SamplingCondition, check_label
from bfn.distributions import Delta
from bfn.flows import ContinuousFlow, ContinuousParams, DiscreteFlow, DiscreteParams
from bfn.numerics import normal_log_prob

if TYPE_CHECKING:
    from bfn.model import BFN


# ------------------------------------------------------------------------------------ entry point
@torch.no_grad()
def sample(
    model: BFN,
    num_samples: int,
    *,
    sampler: str = "paper",
    nfe: int = 100,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    return_sample: bool = False,
    t_start: float | None = None,
    grid: str | None = None,
    label: Tensor | int | None = None,
    guidance: float = 0.0,
    known: Known | None = None,
    particles: int = 1,
    infer_label: bool = False,
) -> Tensor:
    """Draw (num_samples, *data_shape) from ``model`` with ``nfe`` network calls (after training).

    Args:
        model: the BFN (network, flow and head).
        num_samples: batch size B.
        sampler: a name in ``SAMPLERS``.
        nfe: number of network calls, an int >= 1.
        generator: the source of every random draw; the result is deterministic given it.
        device: where to sample; the model's device by default.
        return_sample: return a draw from the last p_O instead of its mode.
        t_start: solvers only: the first time of the grid, in (0, 1).
        grid: solvers only: ``uniform`` or ``logsnr`` (see the module docstring).
        label: a class id (int) or (num_samples,) ids, for a conditional network.
        guidance: classifier-free guidance scale w (needs a label); each call then runs on a
            doubled batch (about 2x the compute, the same NFE).
        known: ``bfn.conditioning.Known(mask, values)``: coordinates the samples keep.
        particles: > 1: sequential Monte Carlo over that many particles per sample (``paper``
            sampler and ``known`` only; see the module docstring), particles x the compute.
        infer_label: SMC with a conditional network: the class is inferred from the known
            coordinates instead of given, with ``particles`` / num_labels particles per class (``smc``).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"nfe (number of network calls) must be an int >= 1, got {nfe!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if grid is not None and grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if isinstance(particles, bool) or not isinstance(particles, numbers.Integral) or particles < 1:
        raise ValueError(f"particles must be an int >= 1, got {particles!r}")
    device = device or _model_device(model)
    if infer_label and particles == 1:
        raise ValueError("infer_label weighs particles of every class: give particles a multiple of num_labels")
    if particles > 1:
        if sampler != "paper" or known is None:
            raise ValueError(
                f"particles={particles}: sequential Monte Carlo runs the 'paper' sampler with known coordinates "
                f"(got sampler={sampler!r}, known={'given' if known is not None else None})"
            )
        if t_start is not None or grid is not None:
            raise ValueError("t_start and grid apply to the BFN-Solver samplers, not to 'paper' (uniform steps)")
        return smc(
            model,
            num_samples,
            int(nfe),
            int(particles),
            generator=generator,
            device=device,
            return_sample=return_sample,
            label=label,
            guidance=guidance,
            known=known,
            infer_label=infer_label,
        )
    return SAMPLERS[sampler](
        model,
        num_samples,
        int(nfe),
        generator=generator,
        device=device,
        return_sample=return_sample,
        t_start=t_start,
        grid=grid,
        label=label,
        guidance=guidance,
        known=known,
    )


def paper(
    model: BFN,
    num_samples: int,
    nfe: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    return_sample: bool = False,
    t_start: float | None = None,
    grid: str | None = None,
    label: Tensor | int | None = None,
    guidance: float = 0.0,
    known: Known | None = None,
) -> Tensor:
    """The paper's sampler (Algorithms 3, 6, 9): nfe - 1 Bayesian updates, then p_O at t = 1.

    Draws in the official order (per step: x ~ p_O, then y ~ p_S), so it reproduces the
    pre-existing ``BFN.sample(num_steps=nfe - 1)`` bit for bit. Known coordinates replace the
    draw x before the sender draw, so y comes from the data there (the same random draws).
    """
    if t_start is not None or grid is not None:
        raise ValueError("t_start and grid apply to the BFN-Solver samplers, not to 'paper' (uniform steps)")
    device = device or _model_device(model)
    condition = SamplingCondition(model, num_samples, device, label=label, guidance=guidance, known=known)
    num_steps = nfe - 1
    params = model.flow.prior(num_samples, model.num_dims, device)
    for i in range(1, num_steps + 1):
        t = torch.full((num_samples, 1), (i - 1) / num_steps, device=device)
        x_out = condition.data(condition.output(params, t).sample(generator))
        alpha = model.flow.alpha(i, num_steps)
        y = model.flow.sender_sample(x_out, alpha, generator)
        params = model.flow.update(params, y, alpha)
    dist = condition.output(params, torch.ones(num_samples, 1, device=device))
    return _result(model, dist, num_samples, generator, return_sample, condition)


def smc(
    model: BFN,
    num_samples: int,
    nfe: int,
    particles: int,
    *,
    known: Known,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    return_sample: bool = False,
    label: Tensor | int | None = None,
    guidance: float = 0.0,
    infer_label: bool = False,
) -> Tensor:
    """Sequential Monte Carlo inpainting with the paper's sampler (see the module docstring).

    Particles of sample b are rows b P .. b P + P - 1 of one batch of B P rows. Without resampling
    and with P = 1 it is the paper's sampler whose known inputs follow the data's flow.
    ``infer_label`` (a class-conditional network, no ``label``, P a multiple of num_labels C):
    particle j of a sample carries class j // (P / C), and each class's P / C particles are their
    own particle system: resampling stays within a class and keeps the class's total weight, so
    that weight estimates p(x_known | c) and no class is dropped on an early step's weights. The
    particles of a sample share the sender draws at known coordinates: the classes are compared on
    one draw of the data's flow, not each on its own noise (the class posterior is then the one
    given that draw, the same where the network's receiver matches the sender). The result is a
    particle of the most probable class (with ``return_sample``, of a class drawn by its weight),
    drawn by weight within it.
    """
    B, P = num_samples, particles
    device = device or _model_device(model)
    label = check_label(label, model.num_labels, B, device)
    blocks = 1  # particle systems per sample: one per class when the class is inferred
    if infer_label:
        blocks = model.num_labels
        if blocks is None or label is not None or P % blocks:
            raise ValueError(
                f"infer_label needs a conditional network (num_labels={blocks}), no label "
                f"(got {'one' if label is not None else None}) and particles a multiple of num_labels (got {P})"
            )
        per_particle = torch.arange(B * P, device=device) % P // (P // blocks)
    else:
        per_particle = None if label is None else label.repeat_interleave(P)
    mask, values = known.mask, known.values
    if mask.dim() > len(model.data_shape):  # per-sample coordinates: one copy per particle
        mask = mask.repeat_interleave(P, 0)
    if values.dim() > len(model.data_shape):
        values = values.repeat_interleave(P, 0)
    condition = SamplingCondition(
        model,
        B * P,
        device,
        label=per_particle,
        guidance=guidance,
        known=Known(mask, values),
        replace_input=False,
    )
    mask, x = condition.mask, condition.values  # (B P, D)
    num_steps = nfe - 1
    params = model.flow.prior(B * P, model.num_dims, device)
    log_weights = torch.zeros(B, P, device=device)
    twist = torch.zeros(B * P, device=device)  # ln psi of each particle's current input
    for i in range(1, num_steps + 1):
        t = torch.full((B * P, 1), (i - 1) / num_steps, device=device)
        dist = condition.output(params, t)
        new_twist = torch.where(mask, _twist_log_prob(model, dist, x, t), 0.0).sum(-1)
        log_weights = log_weights + (new_twist - twist).view(B, P)
        twist = new_twist
        x_out = condition.data(dist.sample(generator))
        alpha = model.flow.alpha(i, num_steps)
        y = model.flow.sender_sample(x_out, alpha, generator)
        if infer_label:  # every particle of a sample takes its first particle's draw at known coordinates
            first = y.view(B, P, *y.shape[1:])[:, :1].expand(B, P, *y.shape[1:]).reshape(y.shape)
            y = torch.where(mask.view(*mask.shape, *(1,) * (y.dim() - mask.dim())), first, y)
        log_ratio = torch.where(mask, -losses.sender_log_ratio(dist, y, x, alpha), 0.0)  # ln p_R - ln p_S
        log_weights = log_weights + log_ratio.sum(-1).view(B, P)
        params = model.flow.update(params, y, alpha)
        rows, log_weights = _resample(log_weights.view(B * blocks, P // blocks), generator)
        params, twist, log_weights = _take(params, rows), twist[rows], log_weights.view(B, P)
    dist = condition.output(params, torch.ones(B * P, 1, device=device))
    final = torch.where(mask, _log_prob(model, dist, x), 0.0).sum(-1) - twist
    log_weights = log_weights + final.view(B, P)
    if infer_label and not return_sample:  # the mode over classes, as p_O's mode over values
        mass = log_weights.view(B, blocks, P // blocks).logsumexp(-1)  # ln of each class's weight
        best = per_particle.view(B, P) == mass.argmax(-1, keepdim=True)
        log_weights = torch.where(best, log_weights, -math.inf)
    chosen = torch.multinomial(torch.softmax(log_weights, -1), 1, generator=generator)[:, 0]  # (B,)
    out = _result(model, dist, B * P, generator, return_sample, condition)
    return out.view(B, P, *model.data_shape)[torch.arange(B, device=device), chosen]


def _resample(log_weights: Tensor, generator) -> tuple[Tensor, Tensor]:
    """Multinomial resampling of the particle systems (rows of (S, P)) whose effective sample size
    is below P / 2, without a sync: (the rows (S P,) each particle continues from, the log weights
    after). A resampled system keeps its total weight, spread evenly over its particles."""
    S, P = log_weights.shape
    weights = torch.softmax(log_weights, -1)
    low = (1 / weights.square().sum(-1) < P / 2)[:, None]  # (S, 1)
    drawn = torch.multinomial(weights, P, replacement=True, generator=generator)  # (S, P)
    index = torch.where(low, drawn, torch.arange(P, device=drawn.device))
    rows = (index + P * torch.arange(S, device=drawn.device)[:, None]).reshape(-1)
    mean = log_weights.logsumexp(-1, keepdim=True) - math.log(P)
    return rows, torch.where(low, mean, log_weights)


def _take(params, rows: Tensor):
    """Input params of the given rows; the precision is a float shared by every row while sampling."""
    if isinstance(params, DiscreteParams):
        return DiscreteParams(params.probs[rows])
    return ContinuousParams(params.mean[rows], params.precision)


def _twist_log_prob(model: BFN, dist, x: Tensor, t: Tensor) -> Tensor:
    """ln psi per dimension: p_O(x | theta) of the network's current prediction; a Delta output
    as N(x; x_hat, 1/beta(t)), the flow's own noise level in data space (sigma_1^2 near t = 1)."""
    if isinstance(dist, Delta):
        std = model.flow.schedule.beta(t).clamp(min=1e-6).rsqrt()  # (B, 1): at t = 0 every particle is alike
        return normal_log_prob(x, dist.data_mean, std)
    return _log_prob(model, dist, x)


def _log_prob(model: BFN, dist, x: Tensor) -> Tensor:
    """ln p_O(x | theta(1)) per dimension; a Delta output is scored as the reconstruction loss does."""
    if model.discrete:
        return losses.reconstruction_loss_discrete(dist, x).neg()
    bins, std = model.reconstruction_bins, model.reconstruction_std
    return losses.reconstruction_loss_continuous(dist, x, num_bins=bins, std=std).neg()


def ode1(model: BFN, num_samples: int, nfe: int, **kwargs) -> Tensor:
    """First-order probability-flow ODE solver (BFN-Solver ``ode_bfnsolver1``)."""
    return _solve(model, num_samples, nfe, order=1, stochastic=False, **kwargs)


def ode2(model: BFN, num_samples: int, nfe: int, **kwargs) -> Tensor:
    """Second-order multistep ODE solver (BFN-Solver ``ode_bfnsolver2_multi_step``)."""
    return _solve(model, num_samples, nfe, order=2, stochastic=False, **kwargs)


def sde1(model: BFN, num_samples: int, nfe: int, **kwargs) -> Tensor:
    """First-order reverse-SDE solver (BFN-Solver ``sde_bfnsolver1``; the paper's step with x_hat)."""
    return _solve(model, num_samples, nfe, order=1, stochastic=True, **kwargs)


def sde2(model: BFN, num_samples: int, nfe: int, **kwargs) -> Tensor:
    """Second-order multistep reverse-SDE solver (BFN-Solver ``sde_bfnsolver2_multi_step``)."""
    return _solve(model, num_samples, nfe, order=2, stochastic=True, **kwargs)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "paper": paper,
    "ode1": ode1,
    "ode2": ode2,
    "sde1": sde1,
    "sde2": sde2,
}


# ---------------------------------------------------------------------------------- solver driver
GRIDS = ("uniform", "logsnr")


def solver_times(
    nfe: int, t_start: float, grid: str = "uniform", solver: ContinuousSolver | DiscreteSolver | None = None
) -> list[float]:
    """The ``nfe`` call times from t_start: BFN-Solver's uniform grid, or uniform in ``solver``'s
    log-SNR up to t = 1 (one call: t_start alone)."""
    if not 0.0 < t_start < 1.0:
        raise ValueError(f"t_start must lie in the open interval (0, 1), got {t_start}")
    if grid == "uniform":
        return [t_start + (1.0 - t_start) * j / nfe for j in range(nfe)]
    if grid != "logsnr" or solver is None:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)} (logsnr needs the solver), got {grid!r}")
    if nfe == 1:
        return [t_start]
    low, high = solver.log_snr(t_start), solver.log_snr(1.0)
    return [t_start, *(solver.time_at(low + (high - low) * j / (nfe - 1)) for j in range(1, nfe - 1)), 1.0]


def _solve(
    model: BFN,
    num_samples: int,
    nfe: int,
    *,
    order: int,
    stochastic: bool,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    return_sample: bool = False,
    t_start: float | None = None,
    grid: str | None = None,
    label: Tensor | int | None = None,
    guidance: float = 0.0,
    known: Known | None = None,
) -> Tensor:
    """Run a BFN-Solver: nfe - 1 solver steps on ``solver_times``, then the last prediction."""
    device = device or _model_device(model)
    condition = SamplingCondition(model, num_samples, device, label=label, guidance=guidance, known=known)
    solver = make_solver(model.flow)
    times = solver_times(
        nfe,
        solver.DEFAULT_T_START if t_start is None else t_start,
        solver.DEFAULT_GRID if grid is None else grid,
        solver,
    )
    state = solver.initial_state(num_samples, model.num_dims, times[0], generator, device)
    previous = None  # (time, prediction) of the call before, for the second-order steps
    for j in range(nfe - 1):
        prediction = condition.prediction(solver.prediction(_output(condition, solver, state, times[j])))
        noise = _standard_normal(state, generator) if stochastic else None
        with torch.autocast(device_type=state.device.type, enabled=False):
            state = solver.step(
                state, prediction, times[j], times[j + 1], previous=previous if order == 2 else None, noise=noise
            )
        previous = (times[j], prediction)
    dist = _output(condition, solver, state, times[nfe - 1])
    return _result(model, dist, num_samples, generator, return_sample, condition)


def _output(condition: SamplingCondition, solver: ContinuousSolver | DiscreteSolver, state: Tensor, t: float):
    """p_O from one network call on the solver state at time t."""
    with torch.autocast(device_type=state.device.type, enabled=False):
        params = solver.input_params(state, t)
    return condition.output(params, torch.full((state.shape[0], 1), t, device=state.device))


def _result(model: BFN, dist, num_samples: int, generator, return_sample: bool, condition: SamplingCondition) -> Tensor:
    out = condition.data(dist.sample(generator) if return_sample else dist.mode)
    return out.reshape(num_samples, *model.data_shape)


def _standard_normal(like: Tensor, generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def _model_device(model: BFN) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def make_solver(flow: ContinuousFlow | DiscreteFlow) -> ContinuousSolver | DiscreteSolver:
    """The solver steps that match a flow."""
    if isinstance(flow, DiscreteFlow):
        return DiscreteSolver(flow)
    return ContinuousSolver(flow)


# ------------------------------------------------------------------------------- solver steps
class ContinuousSolver:
    """BFN-Solver steps for the Gaussian-mean flow (continuous and discretised data).

    State: the input mean mu (B, D). The prediction is p_O's data mean x_hat (B, D): the clipped
    point estimate (Delta) or sum_k p(k) centre_k (discretised), the x_hat of the training loss.
    """

    DEFAULT_T_START = 1e-2
    DEFAULT_GRID = "uniform"

    def __init__(self, flow: ContinuousFlow) -> None:
        self.log_sigma_1 = math.log(flow.sigma_1)

    def log_snr(self, t: float) -> float:
        return self.coefficients(t)[2]

    def time_at(self, log_snr: float) -> float:
        """The t with lambda_t = log_snr: 1 - gamma = sigmoid(-2 lambda) = sigma_1^(2t)."""
        log_posterior_variance = -math.log1p(math.exp(2 * log_snr)) if log_snr < 20 else -2 * log_snr
        return log_posterior_variance / (2 * self.log_sigma_1)

    def coefficients(self, t: float) -> tuple[float, float, float]:
        """alpha_t = gamma(t), sigma_t = sqrt(gamma (1 - gamma)) and lambda_t = ln(alpha_t/sigma_t)."""
        gamma = -math.expm1(2 * t * self.log_sigma_1)  # 1 - sigma_1^(2t) without cancellation
        posterior_variance = 1.0 - gamma
        return gamma, math.sqrt(gamma * posterior_variance), 0.5 * math.log(gamma / posterior_variance)

    def initial_state(self, num_samples: int, num_dims: int, t: float, generator, device) -> Tensor:
        """mu_t ~ N(0, sigma_t^2): the flow's marginal without its gamma x term."""
        noise = torch.randn(num_samples, num_dims, generator=generator, device=device)
        return self.coefficients(t)[1] * noise  # (B, D)

    def input_params(self, mean: Tensor, t: float) -> ContinuousParams:
        return ContinuousParams(mean, 1.0 / (1.0 - self.coefficients(t)[0]))

    def prediction(self, dist) -> Tensor:
        return dist.data_mean.float()  # (B, D)

    def step(
        self,
        mean: Tensor,
        prediction: Tensor,
        s: float,
        t: float,
        *,
        previous: tuple[float, Tensor] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """mu_s -> mu_t (s < t): an ODE step, or an SDE step when ``noise`` (B, D) is given."""
        alpha_s, sigma_s, lambda_s = self.coefficients(s)
        alpha_t, sigma_t, lambda_t = self.coefficients(t)
        h = lambda_t - lambda_s
        if noise is None:
            decay, weight, slope_weight = sigma_t / sigma_s, -math.expm1(-h), h + math.expm1(-h)
        else:
            decay, weight = sigma_t / sigma_s * math.exp(-h), -math.expm1(-2 * h)
            slope_weight = h + 0.5 * math.expm1(-2 * h)
        out = decay * mean + alpha_t * weight * prediction
        if previous is not None:
            r, prediction_r = previous
            slope = (prediction - prediction_r) / (lambda_s - self.coefficients(r)[2])
            out = out + alpha_t * slope_weight * slope
        if noise is not None:
            out = out + sigma_t * math.sqrt(weight) * noise
        return out


class DiscreteSolver:
    """BFN-Solver steps for discrete data: the flow on logits y, theta = softmax(y).

    State: logits y (B, D, K). The prediction is p_O's probabilities p_hat (B, D, K).
    """

    DEFAULT_T_START = 1e-3
    DEFAULT_GRID = "logsnr"

    def __init__(self, flow: DiscreteFlow) -> None:
        self.num_classes = flow.num_classes
        self.beta_1 = flow.beta_1

    def log_snr(self, t: float) -> float:
        """ln beta_t: the flow's signal-to-noise ratio is K beta_t, up to the constant K."""
        return math.log(self.beta(t))

    def time_at(self, log_snr: float) -> float:
        return math.sqrt(math.exp(log_snr) / self.beta_1)

    def beta(self, t: float) -> float:
        return self.beta_1 * t * t

    def initial_state(self, num_samples: int, num_dims: int, t: float, generator, device) -> Tensor:
        """y_t ~ N(0, K beta_t I): the flow's marginal without its beta_t (K e_x - 1) term."""
        K = self.num_classes
        noise = torch.randn(num_samples, num_dims, K, generator=generator, device=device)
        return math.sqrt(K * self.beta(t)) * noise  # (B, D, K)

    def input_params(self, logits: Tensor, t: float) -> DiscreteParams:
        return DiscreteParams(torch.softmax(logits, dim=-1))

    def prediction(self, dist) -> Tensor:
        return dist.probs.float()  # (B, D, K)

    def step(
        self,
        logits: Tensor,
        prediction: Tensor,
        s: float,
        t: float,
        *,
        previous: tuple[float, Tensor] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """y_s -> y_t (s < t): an ODE step, or an SDE step when ``noise`` (B, D, K) is given."""
        K, beta_1 = self.num_classes, self.beta_1
        drift = K * prediction - 1
        if noise is None:
            out = (t / s) * logits + beta_1 * t * (t - s) * drift
            slope_weight = beta_1 * K * t * (t - s) ** 2 / 2
        else:
            accuracy = self.beta(t) - self.beta(s)
            out = logits + accuracy * drift + math.sqrt(K * accuracy) * noise
            slope_weight = beta_1 * K * (t - s) ** 2 * (2 * t + s) / 3
        if previous is not None:
            r, prediction_r = previous
            out = out + slope_weight * (prediction - prediction_r) / (s - r)
        return out

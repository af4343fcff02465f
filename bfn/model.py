"""The BFN module: network + Bayesian flow + output head, with losses, NLL and sampling.

Shapes: B batch, D = prod(data_shape), K classes, h network output values per dimension.
Data x has shape (B, *data_shape): long class ids in [0, K) for discrete data, floats in [-1, 1]
for continuous and discretised data. The network is called as net(net_inputs, t) with t of shape
(B,) and returns (B, *data_shape, h); a class-conditional network (one with a ``num_labels``
attribute that is not None, see bfn.networks) as net(net_inputs, t, label) when there is a label.

Conditioning: the losses take ``label`` (B,) and, in training mode, replace it by the network's
"no condition" entry with probability ``cond_drop``, so one network learns both p(x | label) and
p(x); ``sample`` takes a label, a guidance scale and known coordinates (bfn.conditioning).

Usage:
    model = BFN(net, DiscreteFlow(2, beta_1=9.0), BernoulliHead(), data_shape=(28, 28, 1))
    loss = model(x); loss.backward()            # continuous-time loss (the training loss)
    nll = model.nll(x, num_steps=784)           # n-step loss + reconstruction, NLLEstimate
    images = model.sample(16, num_steps=100)    # (16, 28, 28, 1) long
    loss = model(x, label=y)                    # conditional net (num_labels): y (B,) long
    sevens = model.sample(16, 100, label=7, guidance=2.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bfn import losses, samplers
from bfn.conditioning import Known, check_guidance, check_label, guide
from bfn.distributions import BernoulliHead, CategoricalHead, DeltaHead, DiscretizedNormalHead
from bfn.flows import ContinuousFlow, DiscreteFlow
from bfn.nll import NLLEstimate


class BFN(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        flow: ContinuousFlow | DiscreteFlow,
        head,
        *,
        data_shape: Sequence[int],
        receiver: str = "reference",
        num_mc_samples: int = 10,
        reconstruction_bins: int = 256,
        reconstruction_std: float | None = None,
        check_values: bool = True,
        cond_drop: float | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.flow = flow
        self.head = head
        self.data_shape = tuple(int(d) for d in data_shape)
        self.num_dims = math.prod(self.data_shape)
        self.discrete = isinstance(flow, DiscreteFlow)
        _check_pairing(flow, head)
        if receiver not in losses.RECEIVERS:
            raise ValueError(f"receiver must be one of {losses.RECEIVERS}, got {receiver!r}")
        if num_mc_samples < 1:
            raise ValueError(f"num_mc_samples must be >= 1, got {num_mc_samples}")
        if reconstruction_bins < 2:
            raise ValueError(f"reconstruction_bins must be >= 2, got {reconstruction_bins}")
        self.receiver = receiver
        self.num_mc_samples = num_mc_samples
        self.reconstruction_bins = reconstruction_bins
        # value checks read the data back to the host; a pipeline that checks batches where they
        # enter turns them off so the training step never waits on the GPU
        self.check_values = check_values
        # the reference scores a Delta output as N(x_hat, sigma_1^2) discretised at t = 1
        sigma = getattr(flow, "sigma_1", None)
        self.reconstruction_std = reconstruction_std if reconstruction_std is not None else sigma
        # conditional iff the network has a label table (bfn.networks: num_labels)
        self.num_labels = getattr(net, "num_labels", None)
        self.cond_drop = _check_cond_drop(cond_drop, self.num_labels)

    # ---------------------------------------------------------------------------------- helpers
    def check_data(self, x: Tensor) -> Tensor:
        """Validate a batch and flatten it to (B, D). Raises ValueError naming what is wrong.

        Shape and dtype always; values (range, finiteness) when ``check_values`` is on."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"data shape must be (batch, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}"
            )
        if self.discrete:
            if x.dtype.is_floating_point or x.dtype == torch.bool:
                raise ValueError(f"discrete data must be integer class ids, got dtype {x.dtype}")
        elif not x.dtype.is_floating_point:
            raise ValueError(f"continuous data must be floating point, got dtype {x.dtype}")
        if self.check_values:
            self.check_data_values(x)
        x = x.reshape(x.shape[0], -1)
        return x.long() if self.discrete else x.float()

    def check_data_values(self, x: Tensor) -> None:
        """Range and finiteness of a batch; reads it back to the host (a sync on a GPU)."""
        if not x.numel():
            return
        if self.discrete:
            K = self.flow.num_classes
            if x.min() < 0 or x.max() >= K:
                raise ValueError(f"discrete data must lie in [0, {K - 1}], got [{x.min().item()}, {x.max().item()}]")
        elif x.min() < -1 or x.max() > 1 or not torch.isfinite(x).all():
            raise ValueError(f"continuous data must lie in [-1, 1], got [{x.min().item()}, {x.max().item()}]")

    def output_distribution(self, params, t: Tensor, label: Tensor | None = None, guidance: float = 0.0):
        """Run the network on input params at t (B, 1) and build p_O. Loss math stays float32.

        ``label`` (B,) long conditions a conditional network (None: no condition). ``guidance``
        w != 0 is classifier-free guidance: ONE network call on the doubled batch (the labels,
        then "no condition"), raw outputs combined as (1 + w) z_c - w z_u before the head; about
        twice the compute of an unguided call. w = 0 is the plain call.
        """
        net_inputs = self.flow.net_inputs(params, self.data_shape)
        if guidance != 0:
            check_guidance(guidance, self.num_labels, label)
            null = torch.full_like(label, self.num_labels)
            both = self.net(
                torch.cat([net_inputs, net_inputs]), torch.cat([t[:, 0], t[:, 0]]), torch.cat([label, null])
            )
            output = guide(*both.float().chunk(2), guidance)  # (B, *data_shape, h)
        elif label is not None:
            output = self.net(net_inputs, t[:, 0], label)
        else:
            output = self.net(net_inputs, t[:, 0])  # (B, *data_shape, h)
        output = output.float().reshape(t.shape[0], self.num_dims, -1)  # (B, D, h)
        input_mean = None if self.discrete else params.mean
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.head(output, input_mean, t)

    def _no_autocast(self, t: Tensor):
        return torch.autocast(device_type=t.device.type, enabled=False)

    def training_label(self, label: Tensor | int | None, x: Tensor) -> Tensor | None:
        """The label (B,) a loss conditions on: in training mode replaced by "no condition" with
        probability ``cond_drop`` (a draw only when there is a label and cond_drop > 0)."""
        label = check_label(label, self.num_labels, x.shape[0], x.device, check_values=self.check_values)
        if label is None or not self.training or self.cond_drop == 0:
            return label
        drop = torch.rand(label.shape, device=label.device) < self.cond_drop  # (B,)
        return torch.where(drop, self.num_labels, label)

    # ----------------------------------------------------------------------------------- losses
    def forward(self, x: Tensor, t: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        return self.loss(x, t, label)

    def continuous_time_loss(self, x: Tensor, t: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """L_inf per example and dimension, (B, D). t (B,) ~ U[0, 1) unless given; label (B,) long."""
        x = self.check_data(x)
        t = torch.rand(x.shape[0], 1, device=x.device) if t is None else t.reshape(-1, 1).float()
        params = self.flow.sample(x, t)
        dist = self.output_distribution(params, t, self.training_label(label, x))
        with self._no_autocast(t):
            if self.discrete:
                return losses.continuous_time_loss_discrete(self.flow, dist, x, t)
            return losses.continuous_time_loss_continuous(self.flow, dist, x, t)

    def loss(self, x: Tensor, t: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """The training loss: the continuous-time loss averaged over dimensions and batch."""
        return self.continuous_time_loss(x, t, label).mean()

    def n_step_loss(self, x: Tensor, num_steps: int, t: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        """n-step loss per example (B,), t = (i - 1)/n with i uniform in 1..n unless given."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        x = self.check_data(x)
        if t is None:
            i = torch.randint(0, num_steps, (x.shape[0], 1), device=x.device)
            t = i / num_steps
        t = t.reshape(-1, 1).float()
        params = self.flow.sample(x, t)
        dist = self.output_distribution(params, t, self.training_label(label, x))
        with self._no_autocast(t):
            if self.discrete:
                return losses.n_step_loss_discrete(
                    self.flow,
                    dist,
                    x,
                    t,
                    num_steps,
                    num_samples=self.num_mc_samples,
                    receiver=self.receiver,
                )
            return losses.n_step_loss_continuous(self.flow, dist, x, t, num_steps, num_samples=self.num_mc_samples)

    def bound_loss(self, x: Tensor, num_steps: int, label: Tensor | None = None) -> Tensor:
        """The loss term of the NLL bound per example (B,): L^n for n >= 1, L^inf for n = 0.

        n = 0 means continuous time (n = infinity, as the reference evaluates text8): the
        continuous-time loss at one t ~ U[0, 1) per example, averaged over dimensions."""
        if num_steps == 0:
            return self.continuous_time_loss(x, label=label).mean(-1)
        return self.n_step_loss(x, num_steps, label=label)

    def reconstruction_loss(self, x: Tensor, label: Tensor | None = None) -> Tensor:
        """-ln p_O(x | theta(1)) averaged over dimensions, (B,)."""
        x = self.check_data(x)
        t = torch.ones(x.shape[0], 1, device=x.device)
        params = self.flow.sample(x, t)
        dist = self.output_distribution(params, t, self.training_label(label, x))
        with self._no_autocast(t):
            if self.discrete:
                return losses.reconstruction_loss_discrete(dist, x).mean(-1)
            return losses.reconstruction_loss_continuous(
                dist, x, num_bins=self.reconstruction_bins, std=self.reconstruction_std
            ).mean(-1)

    @torch.no_grad()
    def nll(self, x: Tensor, num_steps: int, repeats: int = 1, label: Tensor | None = None) -> NLLEstimate:
        """NLL of one batch: n-step loss (n = 0: continuous time) + reconstruction over ``repeats``,
        nats/dim with SEs; with ``label``, of p(x | label) (in eval mode; training mode drops labels)."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        loss = torch.stack([self.bound_loss(x, num_steps, label) for _ in range(repeats)])
        reconstruction = torch.stack([self.reconstruction_loss(x, label) for _ in range(repeats)])
        return NLLEstimate.from_terms(loss, reconstruction, self.num_dims)

    # --------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        num_steps: int,
        *,
        sampler: str = "paper",
        generator: torch.Generator | None = None,
        return_sample: bool = False,
        device: torch.device | None = None,
        t_start: float | None = None,
        label: Tensor | int | None = None,
        guidance: float = 0.0,
        known: Known | None = None,
    ) -> Tensor:
        """Generate (batch_size, *data_shape) in ``num_steps`` steps (paper Algorithms 3, 6, 9).

        Makes num_steps + 1 network calls: ``num_steps`` updates, then one call whose output
        distribution gives the result, its mode as in the paper (class argmax, bin centre or the
        point estimate); ``return_sample=True`` returns a draw from it instead. ``sampler`` picks
        the paper's sampler (the default) or a BFN-Solver (see ``bfn.samplers``; ``t_start``
        applies to those). Deterministic given ``generator``. ``label``, ``guidance`` (classifier-
        free, each call then on a doubled batch) and ``known`` (inpainting) as in
        ``bfn.samplers.sample``.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return samplers.sample(
            self,
            batch_size,
            sampler=sampler,
            nfe=num_steps + 1,
            generator=generator,
            device=device,
            return_sample=return_sample,
            t_start=t_start,
            label=label,
            guidance=guidance,
            known=known,
        )


def _check_cond_drop(cond_drop: float | None, num_labels: int | None) -> float:
    """The label drop probability: 0.1 for a conditional network unless given, 0 otherwise."""
    if cond_drop is None:
        return 0.0 if num_labels is None else 0.1
    if isinstance(cond_drop, bool) or not isinstance(cond_drop, numbers.Real) or not 0 <= cond_drop <= 1:
        raise ValueError(f"cond_drop must be a probability in [0, 1], got {cond_drop!r}")
    if cond_drop and num_labels is None:
        raise ValueError(f"cond_drop={cond_drop} needs a conditional network (built with num_labels)")
    return float(cond_drop)


def _check_pairing(flow, head) -> None:
    """Discrete flows need a discrete head with the same K; continuous flows a continuous head."""
    if isinstance(flow, DiscreteFlow):
        K = flow.num_classes
        if K == 2 and not isinstance(head, BernoulliHead | CategoricalHead):
            raise ValueError(f"binary data need a Bernoulli or categorical head, got {head}")
        if isinstance(head, CategoricalHead) and head.output_height != K:
            raise ValueError(f"head has {head.output_height} classes but the flow has {K}")
        if K > 2 and not isinstance(head, CategoricalHead):
            raise ValueError(f"{K}-class data need a categorical head, got {type(head).__name__}")
    elif isinstance(flow, ContinuousFlow):
        if not isinstance(head, DiscretizedNormalHead | DeltaHead):
            raise ValueError(f"continuous data need a discretized-normal or delta head, got {type(head).__name__}")
    else:
        raise ValueError(f"flow must be a ContinuousFlow or DiscreteFlow, got {type(flow).__name__}")

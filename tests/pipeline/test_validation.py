"""Validation's NLL bound, including n = infinity (eval.nll_steps = 0): L_inf + reconstruction."""

from __future__ import annotations

import math

import torch

from pipeline.config import load
from pipeline.core.build import build_model
from pipeline.training import steps


def test_continuous_time_nll_is_l_inf_plus_reconstruction_by_hand():
    cfg = load(["experiment=smoke"])
    torch.manual_seed(0)
    model = build_model(cfg).eval().requires_grad_(False)
    x = torch.randint(0, 2, (8, 28, 28, 1), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    result = steps.validate(model, [x], nll_steps=0, nll_repeats=3)
    # by hand, same draws: per repeat the continuous-time loss at one t ~ U[0,1) per example (its
    # mean over dimensions) and the reconstruction loss, in nats/dim; SE over the repeats' means
    torch.manual_seed(11)
    model.continuous_time_loss(x)  # validate's own L_inf for "loss" comes first
    l_inf = [model.continuous_time_loss(x).mean(-1) for _ in range(3)]
    recon = [model.reconstruction_loss(x) for _ in range(3)]
    totals = (torch.stack(l_inf).double() + torch.stack(recon).double()).mean(1)
    nll = result["nll"]
    assert math.isclose(nll.total, totals.mean().item(), rel_tol=1e-9)
    assert math.isclose(nll.total_se, (totals.std(correction=0) / math.sqrt(3)).item(), rel_tol=1e-9)
    assert math.isclose(nll.loss, torch.stack(l_inf).double().mean().item(), rel_tol=1e-9)
    metrics = steps.nll_metrics(nll, "nats/image")
    assert math.isclose(metrics["val/nll_nats_per_image"], nll.total * 784, rel_tol=1e-12)
    assert math.isclose(metrics["val/nll_bits_per_dim"], nll.total / math.log(2), rel_tol=1e-12)
    table = steps.validation_table(5, result, 0, "nats/image")
    assert "n = inf" in table and "NLL bound" in table and "nats/image" in table


def test_the_summary_states_the_nll_in_the_runs_unit(capsys):
    from pipeline.training.driver import print_summary

    nll = {"val/nll_bits_per_dim": 1.5, "val/nll_bits_per_dim_se": 0.01}
    print_summary(
        load(["experiment=text8_local"]),
        {"step": 9, **nll, "val/nll_bits_per_char": 1.5, "val/nll_bits_per_char_se": 0.01},
    )
    assert "validation NLL: 1.5000 ± 0.0100 bits/char\n" in capsys.readouterr().out  # one character is one dim
    print_summary(
        load(["experiment=mnist_local"]),
        {"step": 9, **nll, "val/nll_nats_per_image": 815.1, "val/nll_nats_per_image_se": 5.4},
    )
    assert "validation NLL: 1.5000 ± 0.0100 bits/dim, 815.10 ± 5.40 nats/image" in capsys.readouterr().out

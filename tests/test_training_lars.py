"""LARS: the trust ratio, the 1-D exclusion, momentum, and that it trains under Opacus."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_dpdedup.training import LARS


def test_step_scales_by_trust_ratio():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    w.grad = torch.tensor([[0.0, 2.0]])  # ‖g‖ = 2
    LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.1, eps=0.0).step()
    # update = lr · η‖w‖/‖g‖ · g = 0.25 · g
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 3.5]]))


def test_one_dimensional_tensors_take_plain_sgd_steps():
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    b.grad = torch.tensor([1.0, -2.0])
    LARS([b], lr=0.5, momentum=0.0, trust_coefficient=0.001).step()
    assert torch.allclose(b.detach(), torch.tensor([0.5, 2.0]))


def test_zero_weight_falls_back_to_ratio_one():
    w = nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=0.1, momentum=0.0).step()
    assert torch.allclose(w.detach(), torch.full((2, 2), -0.1))


def test_momentum_accumulates_scaled_updates():
    w = nn.Parameter(torch.tensor([[1.0, 0.0]]))
    opt = LARS([w], lr=1.0, momentum=0.5, trust_coefficient=1.0, eps=0.0)
    w.grad = torch.tensor([[0.0, 1.0]])
    opt.step()  # ‖w‖=1, ‖g‖=1 → update g; w = [1, -1]
    w.grad = torch.tensor([[0.0, 1.0]])
    opt.step()  # ‖w‖=√2 → update √2·g; buffer = 0.5·g + √2·g
    expected = -1.0 - (0.5 + 2**0.5)
    assert w.detach()[0, 1].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": 1.0, "momentum": 1.0}, {"lr": 1.0, "trust_coefficient": 0.0}])
def test_rejects_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(1))], **kwargs)


def test_minimises_a_least_squares_problem():
    torch.manual_seed(0)
    x, true_w = torch.randn(256, 8), torch.randn(8, 1)
    y = x @ true_w
    model = nn.Linear(8, 1, bias=False)
    opt = LARS(model.parameters(), lr=5.0, momentum=0.9, trust_coefficient=0.01)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first

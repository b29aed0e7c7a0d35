"""Guidance and the student's surrogate loss against facts that do not restate their code:
known values and the gradient VSD is defined by (the process-shaped parts: test_process)."""

import torch

from wadi.engine.losses import vsd_loss
from wadi.models.guidance import guide


def test_guide_known_values():
    u, c = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(guide(u, c, 1.5), torch.tensor([1.5, 0.5]))  # past the conditional, away from u
    torch.testing.assert_close(guide(u, c, 1.0), c)
    torch.testing.assert_close(guide(u, c, 0.0), u)


def test_vsd_gradient_is_g_over_n():
    """The defining property: dL/dx0 = g / N, whatever x0 is."""
    torch.manual_seed(0)
    g = torch.randn(2, 4, 8, 8)
    for start in (torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8)):
        x0 = start.clone().requires_grad_(True)
        vsd_loss(x0, g).backward()
        torch.testing.assert_close(x0.grad, g / x0.numel())


def test_vsd_loss_value_is_half_the_mean_square_difference():
    g = torch.tensor([[[[3.0, 4.0]]]])
    loss = vsd_loss(torch.randn(1, 1, 1, 2, requires_grad=True), g)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (9 + 16) / 2))


def test_vsd_loss_zeroes_isolated_non_finite_elements():
    x0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    g = torch.tensor([[[[float("nan"), 1.0], [0.0, 0.0]]]])
    loss = vsd_loss(x0, g)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.0 / 4))
    loss.backward()
    torch.testing.assert_close(x0.grad, torch.tensor([[[[0.0, 0.25], [0.0, 0.0]]]]))

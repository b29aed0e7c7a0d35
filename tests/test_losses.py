"""The WaDi losses against facts that do not restate their code: known values, the forward
process they invert, and the gradient VSD is defined by."""

import torch

from wadi.losses import add_noise, fake_loss, guide, one_step_x0, score_difference, vsd_loss


def test_one_step_x0_inverts_the_forward_process():
    x0 = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(x0)
    abar = torch.tensor(0.0047)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z = add_noise(x0, eps, a, s)
    torch.testing.assert_close(one_step_x0(z, eps, a, s), x0, rtol=1e-4, atol=1e-4)


def test_add_noise_known_values():
    # alpha = 0.6, sigma = 0.8 (alpha^2 + sigma^2 = 1): x0 = 1, eps = -1 gives -0.2
    out = add_noise(torch.ones(2), -torch.ones(2), torch.tensor(0.6), torch.tensor(0.8))
    torch.testing.assert_close(out, torch.full((2,), -0.2))


def test_guide_known_values():
    u, c = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(guide(u, c, 1.5), torch.tensor([1.5, 0.5]))  # past the conditional, away from u
    torch.testing.assert_close(guide(u, c, 1.0), c)
    torch.testing.assert_close(guide(u, c, 0.0), u)


def test_vsd_gradient_is_the_weighted_score_difference():
    """The defining property: dL/dx0 = sigma^2 (e_real - e_fake) / N, whatever x0 is."""
    torch.manual_seed(0)
    e_real, e_fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.5, 1.0]).view(2, 1, 1, 1)
    for start in (torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8)):
        x0 = start.clone().requires_grad_(True)
        vsd_loss(x0, score_difference(e_real, e_fake, sigma)).backward()
        expected = torch.stack([0.25 * (e_real[0] - e_fake[0]), e_real[1] - e_fake[1]]) / x0.numel()
        torch.testing.assert_close(x0.grad, expected)


def test_vsd_loss_value_is_half_the_mean_square_difference():
    g = torch.tensor([[[[3.0, 4.0]]]])
    loss = vsd_loss(torch.randn(1, 1, 1, 2, requires_grad=True), g)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (9 + 16) / 2))


def test_vsd_loss_zeroes_isolated_non_finite_elements():
    x0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    e_real = torch.tensor([[[[float("nan"), 1.0], [0.0, 0.0]]]])
    g = score_difference(e_real, torch.zeros_like(e_real), torch.ones(1, 1, 1, 1))
    assert int((~torch.isfinite(g)).sum()) == 1
    loss = vsd_loss(x0, g)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.0 / 4))
    loss.backward()
    torch.testing.assert_close(x0.grad, torch.tensor([[[[0.0, 0.25], [0.0, 0.0]]]]))


def test_fake_loss_known_values():
    # eps_pred misses eps by 2 in one of four elements; alpha = 0.5 weighs the square by 1/4
    eps = torch.zeros(1, 1, 2, 2)
    eps_pred = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(fake_loss(eps_pred, eps, torch.full((1, 1, 1, 1), 0.5)), torch.tensor(0.25 * 4 / 4))
    torch.testing.assert_close(fake_loss(eps, eps, torch.ones(1, 1, 1, 1)), torch.tensor(0.0))

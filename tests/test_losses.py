"""The WaDi losses against a direct transcription of SPEC section 3."""

import torch

from wadi.losses import add_noise, fake_loss, guide, one_step_x0, vsd_loss


def test_one_step_x0_inverts_the_forward_process():
    x0 = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(x0)
    abar = torch.tensor(0.0047)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    z = a * x0 + s * eps
    torch.testing.assert_close(one_step_x0(z, eps, a, s), x0, rtol=1e-4, atol=1e-4)


def test_guide_is_cfg():
    u, c = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(guide(u, c, 1.5), u + 1.5 * (c - u))
    torch.testing.assert_close(guide(u, c, 1.0), c)


def test_vsd_loss_value_and_gradient_match_spec():
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    e_real, e_fake = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.rand(2, 1, 1, 1)
    loss = vsd_loss(x0, e_real, e_fake, sigma)
    # SPEC: g = nan_to_num(sigma^2 (e_real - e_fake)); target = sg(x0 - g); L = 0.5 mean((x0 - target)^2)
    g = sigma ** 2 * (e_real - e_fake)
    target = (x0 - g).detach()
    expected = 0.5 * ((x0 - target) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, 0.5 * (g ** 2).mean())
    loss.backward()
    torch.testing.assert_close(x0.grad, g / x0.numel())  # the VSD gradient, weighted


def test_vsd_loss_replaces_non_finite_score_differences():
    x0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    e_real = torch.tensor([[[[float("nan"), 1.0], [0.0, 0.0]]]])
    loss = vsd_loss(x0, e_real, torch.zeros_like(e_real), torch.ones(1, 1, 1, 1))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.0 / 4))


def test_fake_loss_matches_spec():
    eps_pred, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    alpha = torch.rand(3, 1, 1, 1)
    expected = ((alpha * eps_pred - alpha * eps) ** 2).mean()
    torch.testing.assert_close(fake_loss(eps_pred, eps, alpha), expected)


def test_add_noise():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    torch.testing.assert_close(add_noise(x0, eps, a, s), 0.6 * x0 + 0.8 * eps)

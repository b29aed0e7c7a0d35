"""LoRaDLinear against the rotation written out pair by pair, autograd, and its invariants."""

import math

import pytest
import torch
import torch.nn as nn

from wadi.adapters.lorad import LoRaDLinear, _LoRaDMatmul, wrap_angle


def looped_rotated_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rotation of docs/method.md, written column pair by column pair with plain loops."""
    theta = a @ b
    theta = ((theta + math.pi) % (2 * math.pi)) - math.pi
    out = w.clone()
    for j in range(w.shape[1] // 2):
        c, s = torch.cos(theta[:, j]), torch.sin(theta[:, j])
        out[:, 2 * j] = w[:, 2 * j] * c - w[:, 2 * j + 1] * s
        out[:, 2 * j + 1] = w[:, 2 * j] * s + w[:, 2 * j + 1] * c
    return out


def make_layer(out=6, inp=8, rank=3, seed=0, randomize=True) -> LoRaDLinear:
    torch.manual_seed(seed)
    layer = LoRaDLinear(nn.Linear(inp, out), rank)
    if randomize:  # move away from the zero initialisation of theta_a
        with torch.no_grad():
            layer.theta_a.normal_(0, 2.0)
    return layer


def test_identity_at_initialisation():
    torch.manual_seed(0)
    base = nn.Linear(16, 10)
    x = torch.randn(5, 16)
    ref = base(x)
    layer = LoRaDLinear(base, 4)
    assert torch.all(layer.theta_a == 0)
    assert layer.theta_a.shape == (10, 4) and layer.theta_b.shape == (4, 8)
    assert layer.theta_b.abs().sum() > 0  # Xavier, not zeros
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


def test_output_equals_spec_formula():
    layer = make_layer()
    x = torch.randn(2, 3, 8)
    w_spec = looped_rotated_weight(layer.base.weight.detach(), layer.theta_a.detach(), layer.theta_b.detach())
    expected = x @ w_spec.T + layer.base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_wrap_angle_range_and_period():
    t = torch.linspace(-20, 20, 1001)
    w = wrap_angle(t)
    assert w.min() >= -math.pi and w.max() < math.pi
    torch.testing.assert_close(torch.cos(w), torch.cos(t), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.sin(w), torch.sin(t), atol=1e-5, rtol=0)


def test_backward_equals_autograd_through_formula():
    layer = make_layer().double()
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 5, 6, dtype=torch.float64)

    layer(x).backward(grad_out)
    ours = [x.grad.clone(), layer.theta_a.grad.clone(), layer.theta_b.grad.clone()]

    x2 = x.detach().clone().requires_grad_(True)
    a = layer.theta_a.detach().clone().requires_grad_(True)
    b = layer.theta_b.detach().clone().requires_grad_(True)
    w_spec = looped_rotated_weight(layer.base.weight.detach(), a, b)
    (x2 @ w_spec.T + layer.base.bias.detach()).backward(grad_out)
    for got, want in zip(ours, [x2.grad, a.grad, b.grad]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    layer = make_layer(out=4, inp=6, rank=2).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a, b: _LoRaDMatmul.apply(x, layer.base.weight, layer.base.bias, a, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, layer.theta_a, layer.theta_b))


def test_row_norms_preserved_after_training_steps():
    layer = make_layer(out=12, inp=16, rank=4, randomize=False)
    w0 = layer.base.weight.detach().clone()
    opt = torch.optim.AdamW([layer.theta_a, layer.theta_b], lr=0.1)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    w_rot = layer.rotated_weight()
    assert (w_rot - w0).abs().max() > 1e-2  # directions moved
    torch.testing.assert_close(w_rot.norm(dim=1), w0.norm(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.base.weight, w0)  # the frozen weight itself never changes


def test_merge_unmerge_round_trip_and_merged_output():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(7, 8)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.base.weight.norm(dim=1), w0.norm(dim=1), rtol=1e-6, atol=1e-6)
        layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-6, atol=1e-6)


def test_eval_mode_caches_rotated_weight_and_invalidates_on_change(monkeypatch):
    layer = make_layer()
    layer.eval()
    calls = []
    original = layer.rotated_weight
    monkeypatch.setattr(layer, "rotated_weight", lambda: calls.append(1) or original())
    x = torch.randn(2, 8)
    with torch.no_grad():
        y1 = layer(x)
        layer(x)
        assert len(calls) == 1
        layer.theta_a.add_(0.5)  # an in-place change must be seen
        y2 = layer(x)
    assert len(calls) == 2
    assert not torch.allclose(y1, y2)


def test_training_mode_gradients_reach_only_adapter():
    layer = make_layer()
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.theta_a.grad is not None and layer.theta_b.grad is not None


def test_bf16_autocast_matches_fp32_closely():
    layer = make_layer(out=16, inp=32, rank=4)
    x = torch.randn(8, 32)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.theta_a.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("base, rank, match", [
    (nn.Linear(7, 4), 2, "odd in_features=7"),
    (nn.Linear(8, 4), 0, "rank .* must be a positive integer"),
    (nn.Linear(8, 4), -3, "rank .* must be a positive integer"),
    (nn.Conv2d(4, 4, 1), 2, "is a Conv2d, not nn.Linear"),
])
def test_bad_inputs_name_the_layer(base, rank, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        LoRaDLinear(base, rank, name="blocks.0.ff")
    assert "blocks.0.ff" in str(err.value)

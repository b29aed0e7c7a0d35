"""LoRaD: low-rank rotation of weight directions (docs/method.md).

A frozen nn.Linear with weight W (out x in) gets trainable theta_a (out x r, zeros) and
theta_b (r x in/2, Xavier). Theta = wrap(theta_a @ theta_b) rotates each pair of input
columns (2j, 2j+1) of every row by the angle Theta[:, j]:

    W'[:, 2j]   = W[:, 2j] cos - W[:, 2j+1] sin
    W'[:, 2j+1] = W[:, 2j] sin + W[:, 2j+1] cos

Rotations keep every 2-vector's length, so every row norm of W is kept exactly.

Viewing each column pair as a complex number w = W[:, 2j] + i W[:, 2j+1], the rotation is
w' = w e^{i Theta}: one contiguous complex multiply.

The forward runs one matmul with W' and saves only the input x for backward. The
backward rebuilds W' from the frozen W and the angles (elementwise, cheap) and uses the
closed form  dL/dTheta = G_odd * W'_even - G_even * W'_odd = Im(G conj(W'))  with
G = dL/dW' = dy^T x.
That is three matmuls per step and the memory of full fine-tuning, where autograd
through the formula would keep W', cos, sin and both halves of W alive.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _atleast_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32; float32/float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    """Map angles to [-pi, pi): ((theta + pi) mod 2pi) - pi."""
    return _wrap_(theta.clone())


def _wrap_(theta: torch.Tensor) -> torch.Tensor:
    """wrap_angle in place: the angles are rebuilt twice a step, temporaries cost time."""
    return theta.add_(math.pi).remainder_(2 * math.pi).sub_(math.pi)


def _angles(theta_a: torch.Tensor, theta_b: torch.Tensor) -> torch.Tensor:
    """Theta = wrap(theta_a @ theta_b), in at least float32."""
    return _wrap_(_atleast_fp32(theta_a) @ _atleast_fp32(theta_b))


def _rotation(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """W' as complex (out x in/2): column pair (2j, 2j+1) is one complex number, times e^{i theta}.

    One contiguous complex multiply instead of strided even/odd slices (several times
    slower on CPU, where stride-2 elementwise ops do not vectorise).
    """
    w = _atleast_fp32(weight).contiguous()
    # e^{i theta} from vectorised cos and sin: torch.polar is several times slower on CPU.
    unit = torch.complex(torch.cos(theta), torch.sin(theta))
    return unit.mul_(torch.view_as_complex(w.view(w.shape[0], -1, 2)))


def rotate_pairs(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the column pairs (2j, 2j+1) of `weight` by `theta[:, j]`, in at least float32."""
    return torch.view_as_real(_rotation(weight, theta)).flatten(1)


class _LoRaDMatmul(torch.autograd.Function):
    """y = x W'^T + b with W' = rotate_pairs(W, wrap(theta_a @ theta_b))."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b):
        w_rot = rotate_pairs(weight, _angles(theta_a, theta_b)).to(x.dtype)
        ctx.save_for_backward(x, weight, theta_a, theta_b)
        ctx.has_bias = bias is not None
        return F.linear(x, w_rot, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, theta_a, theta_b = ctx.saved_tensors
        w_rot = _rotation(weight, _angles(theta_a, theta_b))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ torch.view_as_real(w_rot).flatten(1).to(grad_out.dtype)
        # G = dL/dW' summed over every token of the batch.
        g = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
        g = _atleast_fp32(g)
        # G_odd W'_even - G_even W'_odd = Im(G conj(W')) with pairs as complex numbers.
        grad_theta = torch.view_as_complex(g.view(g.shape[0], -1, 2)).mul_(w_rot.conj()).imag.contiguous()
        # The wrap is a shift by multiples of 2pi: its derivative is 1.
        grad_a = grad_theta @ _atleast_fp32(theta_b).t() if ctx.needs_input_grad[3] else None
        grad_b = _atleast_fp32(theta_a).t() @ grad_theta if ctx.needs_input_grad[4] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b


class LoRaDLinear(nn.Module):
    """A frozen nn.Linear whose weight directions are rotated by a low-rank angle map."""

    def __init__(self, base: nn.Linear, rank: int, name: str = "<linear>"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRaD target {name!r} is a {type(base).__name__}, not nn.Linear; "
                            "remove it from the target patterns")
        if base.in_features % 2:
            raise ValueError(f"LoRaD target {name!r} has odd in_features={base.in_features}; "
                             "rotation pairs need an even input width: exclude this layer")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRaD rank for {name!r} must be a positive integer, got {rank!r}")
        self.base = base
        self.rank = rank
        self.base.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=torch.float32)
        # Adapter parameters stay fp32 under mixed precision.
        self.theta_a = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.theta_b = nn.Parameter(torch.empty(rank, base.in_features // 2, **factory))
        nn.init.xavier_uniform_(self.theta_b)
        self.merged = False
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def get_base_layer(self) -> nn.Linear:
        """The wrapped frozen layer (the same accessor peft's layers have)."""
        return self.base

    def angles(self) -> torch.Tensor:
        """Theta (out x in/2), wrapped to [-pi, pi)."""
        return _angles(self.theta_a, self.theta_b)

    def rotated_weight(self) -> torch.Tensor:
        """W' in float32."""
        return rotate_pairs(self.base.weight, self.angles())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.training or (torch.is_grad_enabled() and self.theta_a.requires_grad):
            device = x.device.type
            if not torch.amp.is_autocast_available(device):  # the meta device (wadi plan)
                return _LoRaDMatmul.apply(x, self.base.weight, self.base.bias, self.theta_a, self.theta_b)
            if torch.is_autocast_enabled(device):
                # Run the Function in the autocast dtype itself so forward and backward agree.
                x = x.to(torch.get_autocast_dtype(device))
            with torch.autocast(device, enabled=False):
                return _LoRaDMatmul.apply(x, self.base.weight, self.base.bias, self.theta_a, self.theta_b)
        return F.linear(x, self._cached_weight(), self.base.bias)

    def _cached_weight(self) -> torch.Tensor:
        # Eval mode: rebuild W' only when the angles or the weight changed in place.
        key = (self.theta_a._version, self.theta_b._version, self.base.weight._version,
               self.theta_a.data_ptr(), self.theta_b.data_ptr(), self.base.weight.data_ptr())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.rotated_weight().to(self.base.weight.dtype))
        return self._cache[1]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    @torch.no_grad()
    def merge(self) -> None:
        """Write W' into the frozen layer; forward becomes the plain layer."""
        if self.merged:
            return
        self.base.weight.copy_(self.rotated_weight().to(self.base.weight.dtype))
        self.merged = True
        self._cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Rotate back by -Theta: the inverse of a rotation is its transpose, no inverse needed."""
        if not self.merged:
            return
        restored = rotate_pairs(self.base.weight, -self.angles())
        self.base.weight.copy_(restored.to(self.base.weight.dtype))
        self.merged = False
        self._cache = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, merged={self.merged}"


def merge_angles(state: dict[str, torch.Tensor], angles: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every layer of `angles` (`<layer>.theta_a`, `<layer>.theta_b`, the
    layout of the authors' training outputs) rotated into its `<layer>.weight`; the angle
    tensors themselves are dropped. The result loads strict into the plain architecture."""
    layers = sorted({k.rsplit(".", 1)[0] for k in angles if k.endswith((".theta_a", ".theta_b"))})
    if not layers:
        raise ValueError("no LoRaD angles found: expected keys ending in .theta_a and .theta_b")
    out = {k: v for k, v in state.items() if not k.endswith((".theta_a", ".theta_b"))}
    for layer in layers:
        a, b, key = angles.get(f"{layer}.theta_a"), angles.get(f"{layer}.theta_b"), f"{layer}.weight"
        if a is None or b is None:
            raise ValueError(f"layer {layer!r} has only one of theta_a and theta_b")
        if key not in out:
            raise ValueError(f"the angles name layer {layer!r}, which the weights do not have")
        w = out[key]
        if a.shape[0] != w.shape[0] or b.shape[1] * 2 != w.shape[1] or a.shape[1] != b.shape[0]:
            raise ValueError(f"angles of {layer!r} ({tuple(a.shape)} @ {tuple(b.shape)}) do not fit its "
                             f"weight {tuple(w.shape)}")
        out[key] = rotate_pairs(w, _angles(a, b)).to(w.dtype)
    return out

"""The layer that lets one frozen denoiser carry several roles' adapters (wadi.adapters.shared_base):
a `Switch` holds each role's adapter layer by name around the one frozen linear layer, and
`plain_copy` gives the base architecture back. Apart from the adapter classes, so that they
can make plain copies without importing what builds on them."""

from __future__ import annotations

import copy

import torch.nn as nn


class Switch(nn.Module):
    """A frozen nn.Linear and the adapter layers wrapped around it, by role. `active` picks
    the layer a call runs: a role without a layer here, or none (the teacher), runs the
    frozen layer itself."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.roles = nn.ModuleDict()
        self.active: str | None = None

    def forward(self, x, *args, **kwargs):
        layer = self.roles[self.active] if self.active in self.roles else self.base
        return layer(x, *args, **kwargs)

    # The frozen layer's attributes, for code that reads them off the model's linears.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


def switches(net: nn.Module) -> list[Switch]:
    return [m for m in net.modules() if isinstance(m, Switch)]


def plain_copy(net: nn.Module, keep: str | None = None) -> nn.Module:
    """`net` with every Switch replaced by its frozen layer (or by role `keep`'s layer where
    it has one): the base architecture, sharing every tensor with `net` (only the module
    objects are new), so changing a module of the copy leaves `net` as it was."""
    memo = {id(t): t for t in (*net.parameters(), *net.buffers())}
    out = copy.deepcopy(net, memo)
    for name, m in list(out.named_modules()):
        if isinstance(m, Switch):
            out.set_submodule(name, m.roles[keep] if keep in m.roles else m.base)
    return out

"""One denoiser for teacher, student and fake model.

The frozen layers are held once. Each adapted layer becomes a `Switch`: the frozen
nn.Linear and, by role name, the adapter layers of the roles that target it; which role a
call is made for is switched around the call (`SharedDenoiser.use`), the teacher being the
denoiser with every adapter off. peft's multi-adapter models do the same with set_adapter
and disable_adapter; a Switch also holds LoRaD layers, and a mix of kinds on one layer.

A role's adapter layers are the single-adapter layers of wadi.adapters.core (LoRaDLinear,
peft's), wrapped around the one frozen nn.Linear: a role's call is the computation a
separate adapted copy of the teacher made, operation for operation. Sharding,
checkpointing and export see one module.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch.nn as nn

from wadi.adapters.core import Adapter, AdapterConfig, attach
from wadi.adapters.switch import Switch, plain_copy, switches  # noqa: F401 (the names this module's users read)


def _tree(layers: dict[str, nn.Module]) -> nn.Module:
    """A module holding `layers` at their qualified names and nothing else: what file names,
    peft's state-dict functions and the merge see of one role."""
    root = nn.Module()
    for name, layer in layers.items():
        *path, last = name.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(last, layer)
    return root


class SharedDenoiser:
    """The teacher's denoiser carrying the adapters of the roles attached to it."""

    def __init__(self, net: nn.Module):
        self.net = net
        self._switches: list[Switch] = []

    def attach(self, role: str, config: AdapterConfig, backbone: str) -> Adapter:
        """Attach an adapter for `role` (not full fine-tuning, whose weights are its own).

        It is attached as to a plain copy of the teacher (the same layer choice, initial
        values and random draws as a separate copy), then its layers move into the denoiser.
        """
        view = plain_copy(self.net)
        adapter = attach(view, config, backbone)
        layers = adapter.layers()
        for name, layer in layers.items():
            switch = self.net.get_submodule(name)
            if not isinstance(switch, Switch):
                switch = Switch(switch)
                self.net.set_submodule(name, switch)
            # The copy's frozen nn.Linear holds the same tensors; the denoiser's own module
            # object goes in its place, so that there is one module per frozen layer (FSDP
            # replaces a module's parameters in place, and every role must see that).
            _rewrap(layer, switch.base)
            switch.roles[role] = layer
        holder = _tree(layers)
        if hasattr(view, "peft_config"):
            holder.peft_config = view.peft_config
        self._switches = switches(self.net)
        return dataclasses.replace(adapter, model=self.net, view=holder, role=role)

    @contextmanager
    def use(self, role: str | None):
        """Within the block the denoiser is `role`'s (train mode), or the teacher's (None:
        every adapter off, eval mode). Backward passes that recompute (gradient
        checkpointing) must run inside the role's block too."""
        before = [s.active for s in self._switches]
        for s in self._switches:
            s.active = role
        if self.net.training != (role is not None):
            self.net.train(role is not None)
        try:
            yield self.net
        finally:
            for s, active in zip(self._switches, before):
                s.active = active


def _rewrap(layer: nn.Module, base: nn.Linear) -> None:
    """Point an adapter layer (LoRaD's `.base`, peft's `.base_layer`) at `base`."""
    attr = "base_layer" if hasattr(layer, "base_layer") else "base"
    setattr(layer, attr, base)

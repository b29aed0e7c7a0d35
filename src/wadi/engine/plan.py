"""Memory per process of a distillation run, before it runs (`wadi plan`).

Four parts, in bytes per process:
- frozen base: the denoiser's frozen weights in the run's dtype; under fsdp2 a 1/N share
  plus the largest sharded unit gathered whole while it runs;
- adapters: the student's and the fake model's trainable weights (float32) and the larger
  role's gradients (the two roles' backward passes do not overlap);
- optimizer: AdamW's two moments per trainable weight (float32, or one byte each with
  8-bit AdamW), and the EMA's copy of the student's;
- activations: the peak of one student update beyond weights and gradients, played on an
  empty (meta-device) copy of the architecture with its adapters (no memory, no weights):
  the student's pass at the per-process batch with its graph kept, the teacher's and the
  fake model's guided passes at twice the batch, the backward pass (with gradient
  checkpointing on, its recomputation); every storage the operations make is counted
  while it lives. Attention runs as a fused kernel does (flash or memory-efficient: the
  output and a log-sum-exp per row, not the probabilities the meta device's own path
  would keep). The fake model's update needs less: its graph is the same at the same batch
  and nothing runs beside it.

Text encoders and the VAE are not counted (cache_embeddings frees the encoders' work, not
their weights), nor transient buffers of single operations.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wadi.adapters.core import AdapterConfig
from wadi.models.backbones import KINDS, get_kind
from wadi.models.conditioning import Cond

# The latent is the image over the VAE's factor; the text tokens each kind's encoders give.
VAE_FACTOR = 8
BYTES = {"no": 4, "bf16": 2, "fp16": 2}


@dataclass
class Plan:
    frozen: int
    adapters: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen + self.adapters + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def plan(net: nn.Module, kind: str, student: AdapterConfig, fake: AdapterConfig, latent: int, batch: int,
         processes: int = 1, parallel: str = "ddp", precision: str = "no", checkpointing: bool = False,
         adam_8bit: bool = False, ema: bool = False, tokens: int | None = None) -> Plan:
    """The plan for `net`, an architecture on the meta device (it gets the adapters)."""
    from wadi.adapters.shared_base import SharedDenoiser

    if get_kind(kind).plan_inputs is None:
        known = [k.name for k in KINDS.values() if k.plan_inputs]
        raise ValueError(f"wadi plan knows the inputs of {', '.join(known)}, not {kind}")
    size = BYTES[precision]
    dtype = torch.float32 if size == 4 else torch.bfloat16
    shared = SharedDenoiser(net.to(dtype))
    roles = {role: shared.attach(role, cfg, kind) for role, cfg in (("student", student), ("fake", fake))}
    for adapter in roles.values():  # as the engine holds them: float32 whatever the base
        for p in adapter.trainable_parameters().values():
            p.data = p.data.float()
    trainable = {role: sum(p.numel() for p in a.trainable_parameters().values()) for role, a in roles.items()}
    frozen_params = {id(p): p.numel() for p in net.parameters() if not p.requires_grad}
    frozen = sum(frozen_params.values()) * size
    if parallel == "fsdp2" and processes > 1:
        frozen = frozen // processes + _largest_unit(net, frozen_params) * size * (processes - 1) // processes
    adapters = 4 * (sum(trainable.values()) + max(trainable.values()))
    optimizer = (2 if adam_8bit else 8) * sum(trainable.values()) + (4 * trainable["student"] if ema else 0)
    if checkpointing:
        net.enable_gradient_checkpointing()
    peak = step_peak(shared, kind, latent, batch, tokens or get_kind(kind).plan_inputs[0], dtype)
    return Plan(frozen, adapters, optimizer, peak - 4 * trainable["student"])  # its gradients are the adapters'



def _largest_unit(net: nn.Module, frozen: dict[int, int]) -> int:
    """The frozen weights of the largest sharded unit (a unit's own: inner units are theirs)."""
    from wadi.engine.parallel import blocks

    taken, sizes = set(), []
    for unit in [*blocks(net), net]:
        own = {id(p) for p in unit.parameters() if id(p) in frozen} - taken
        sizes.append(sum(frozen[i] for i in own))
        taken |= own
    return max(sizes)


def _inputs(net: nn.Module, kind: str, latent: int, batch: int, tokens: int, dtype) -> tuple[torch.Tensor, Cond]:
    """Empty latents and the conditioning the kind's denoiser takes, on the meta device."""
    x = torch.zeros(batch, net.config.in_channels, latent, latent, device="meta", dtype=dtype)
    return x, get_kind(kind).plan_inputs[1](net, batch, tokens, dtype)


class LiveBytes(TorchDispatchMode):
    """The most bytes of storages made by operations that were alive at once.

    Which storages are gone is looked up every `every` operations (a look-up walks all of
    them); in between, frees are not seen, so the peak may exceed the truth by what those
    operations made: never less than the truth.
    """

    def __init__(self, every: int = 1):
        super().__init__()
        self.every, self.alive, self.current, self.peak, self.ops = every, {}, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.alive:
                    self.alive[s._cdata] = (StorageWeakRef(s), s.nbytes())
                    self.current += s.nbytes()
        self.ops += 1
        if self.ops % self.every == 0:
            self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
            self.current = sum(n for _, n in self.alive.values())
        self.peak = max(self.peak, self.current)
        return out


def step_peak(shared, kind: str, latent: int, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """The peak of one student update on the meta device, beyond the weights: the student's
    pass at `batch` (its graph kept), the teacher's and the fake model's guided passes at
    twice the batch without gradient, then the student's backward pass."""
    net, call = shared.net, get_kind(kind).call
    live = LiveBytes(every=16)  # a layer's few operations at most: the plan errs on the safe side
    with _fused_attention(), live:
        x, cond = _inputs(net, kind, latent, batch, tokens, dtype)
        x2, cond2 = _inputs(net, kind, latent, 2 * batch, tokens, dtype)
        t, t2 = torch.zeros(batch, device="meta"), torch.zeros(2 * batch, device="meta")
        with shared.use("student"):
            out = call(None, net, x, t, cond)
        for role in (None, "fake"):
            with torch.no_grad(), shared.use(role):
                call(None, net, x2, t2, cond2)
        with shared.use("student"):
            out.float().square().mean().backward()
    return live.peak


@contextmanager
def _fused_attention():
    """scaled_dot_product_attention as a fused kernel saves for backward (its CPU flash
    kernel, which has a meta implementation); with a mask, as it is."""
    import torch.nn.functional as F

    plain = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal, scale=scale)[0]

    with mock.patch.object(F, "scaled_dot_product_attention", fused):
        yield

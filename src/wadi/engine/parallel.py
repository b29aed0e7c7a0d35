"""The frozen base sharded over the processes (`train.parallel=fsdp2`).

torch's FSDP2 (`fully_shard`) shards each block of the shared denoiser (a UNet's down, mid
and up blocks and the resnets and attentions in them; a transformer's blocks) and the rest
at the root: every process holds its
share of the frozen weights and gathers a block's whole weights only while the block runs.
The adapters are left out of the sharding, replicated on every process as under ddp: they
are small, the engine averages their gradients as under ddp, and so every piece of trained
state (adapters, optimizers, EMA) is whole and the same on each process; checkpoints and
exports read it as on one process.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def blocks(net: nn.Module) -> list[nn.Module]:
    """The units to shard, inner ones first: the denoiser's top-level blocks (the entries of
    its `*blocks` lists and its mid block) and, within a UNet's block, each entry of its
    lists (resnets, attentions, samplers), whose single weights are large: a unit's weights
    are whole on every process while it runs, so smaller units mean a lower peak."""
    out = []
    for name, child in net.named_children():
        tops = (list(child) if isinstance(child, nn.ModuleList) and name.endswith("blocks") else
                [child] if name == "mid_block" and child is not None else [])
        for top in tops:
            for part in top.children():
                if isinstance(part, nn.ModuleList):
                    out.extend(part)
            out.append(top)
    return out


def shard(net: nn.Module, replicated: list[nn.Parameter], train_cfg) -> None:
    """Shard `net`'s parameters but `replicated` over every process (one mesh dimension)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    gathered = torch.bfloat16 if train_cfg.fsdp_param_dtype == "bf16" else None  # None: each its own dtype
    options = dict(mesh=mesh, ignored_params=set(replicated),
                   mp_policy=MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if train_cfg.cpu_offload else OffloadPolicy())
    for block in blocks(net):
        fully_shard(block, **options)
    fully_shard(net, **options)


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def frozen_bytes(net: nn.Module) -> int:
    """This process's bytes of frozen weights between uses (under fsdp2 its shards)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in net.parameters() if not p.requires_grad]
    return sum(t.numel() * t.element_size() for t in local)

"""The frozen base sharded over the processes (`train.parallel=fsdp2`).

torch's FSDP2 (`fully_shard`) shards each block of the shared denoiser (a UNet's down, mid
and up blocks; a transformer's blocks) and the rest at the root: every process holds its
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
    """The denoiser's top-level blocks: the entries of its `*blocks` lists and its mid block."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            out.extend(child)
        elif name == "mid_block" and child is not None:
            out.append(child)
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


def frozen_bytes(net: nn.Module) -> tuple[int, int]:
    """This process's bytes of frozen weights held between uses, and the most it holds while
    one sharded unit (a block, or the root's own weights) is gathered whole."""
    from torch.distributed.tensor import DTensor

    def nbytes(p, whole: bool) -> int:
        t = p if whole or not isinstance(p, DTensor) else p.to_local()
        return t.numel() * t.element_size()

    frozen = {id(p): p for p in net.parameters() if not p.requires_grad}
    units = [[p for p in b.parameters() if id(p) in frozen] for b in blocks(net)] if is_sharded(net) else []
    in_blocks = {id(p) for u in units for p in u}
    units.append([p for i, p in frozen.items() if i not in in_blocks])
    held = sum(nbytes(p, False) for p in frozen.values())
    if not is_sharded(net):
        return held, held
    return held, held + max(sum(nbytes(p, True) - nbytes(p, False) for p in u) for u in units)

"""A student's weight change as a LoRA file that the rest of the ecosystem loads.

Per linear layer the change W_student - W_teacher is factored by a truncated SVD,
D ~ U_r S_r V_r^T, into lora_B = U_r sqrt(S_r) and lora_A = sqrt(S_r) V_r^T (scale 1):
exact at full rank, and at a lower rank the share of each layer's squared singular values
kept says what was lost. Every layer carries the same rank, layers narrower than it padded
with zeros: a file of one rank, without alphas, is what every loader reads at scale 1
(diffusers' loaders take one alpha for a file that records none). The rank is capped at the
widest changed layer's full rank, where every layer is exact: beyond it, only zeros. Written with diffusers' own
writers: `save_lora_weights` (what `load_lora_weights` reads) or
`convert_state_dict_to_kohya` (A1111, ComfyUI).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers writes and looks for
KOHYA_FILE = "lora_kohya.safetensors"


@dataclass
class LoraReport:
    rank: int
    layers: int = 0
    energy: list[float] = field(default_factory=list)  # per layer: share of sum S^2 kept
    left_out: dict[str, float] = field(default_factory=dict)  # changed tensors a LoRA cannot carry: max change

    def to_dict(self) -> dict:
        e = self.energy or [1.0]
        return {"rank": self.rank, "layers": self.layers, "energy_min": min(e), "energy_median": statistics.median(e),
                "left_out": self.left_out}


@torch.no_grad()
def delta_lora(student: nn.Module, teacher: nn.Module, rank: int) -> tuple[dict[str, torch.Tensor], LoraReport]:
    """peft-style tensors (`<layer>.lora_A.weight`, `.lora_B.weight`) of every linear layer
    whose weight the student changed, and what the rank keeps (its `rank`: the one written)."""
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}")
    base = dict(teacher.named_parameters())
    linear = {f"{name}.weight": module for name, module in student.named_modules() if isinstance(module, nn.Linear)}
    changed = {name: m for name, m in linear.items() if not torch.equal(m.weight, base[name])}
    rank = min(rank, max((min(m.weight.shape) for m in changed.values()), default=rank))
    tensors, report = {}, LoraReport(rank)
    for weight, module in changed.items():
        name = weight.removesuffix(".weight")
        delta = module.weight.double() - base[weight].double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        # Every layer gets the same rank (zeros past its own): one alpha for all, which is
        # what loaders assume when a file carries no per-layer ranks.
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a[:r], b[:, :r] = root[:, None] * vh[:r], u[:, :r] * root
        tensors[f"{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{name}.lora_B.weight"] = b.float().contiguous()
        report.energy.append(float((s[:r] ** 2).sum() / (s ** 2).sum()))
        report.layers += 1
    for name, p in student.named_parameters():
        if name not in linear and not torch.equal(p, base[name]):
            report.left_out[name] = float((p.double() - base[name].double()).abs().max())
    if not tensors:
        raise ValueError("the student's linear layers equal the teacher's: there is no change to export as a LoRA")
    return tensors, report


def save_lora(tensors: dict[str, torch.Tensor], out: Path, pipeline_class, denoiser: str, kohya: bool) -> Path:
    """Write the LoRA of the pipeline's `denoiser` (unet or transformer) into the folder
    `out` in diffusers' layout or kohya's (the kinds that declare it: UNets); returns the file."""
    if kohya:
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in tensors.items()})
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / KOHYA_FILE))
        return out / KOHYA_FILE

    # peft's key layout (lora_A / lora_B), which every diffusers LoRA loader reads as it is;
    # diffusers' older layout (lora.down / lora.up) is lost on SDXL's and SD3's attention.
    layers = {f"{denoiser}_lora_layers": tensors}
    pipeline_class.save_lora_weights(out, **layers, safe_serialization=True)
    return out / LORA_FILE

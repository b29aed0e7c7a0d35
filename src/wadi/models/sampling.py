"""Sampling: the one-step student (one network evaluation at t = T-1) and the multi-step
teacher with classifier-free guidance.

Noise and pixels follow the stock diffusers pipelines, so that an exported student run by
`StableDiffusionPipeline` / `PixArtAlphaPipeline` with one step, no guidance and
`generator=[torch.Generator().manual_seed(s) for s in seeds]` gives the same images: each
image's latent is `torch.randn` of one seeded CPU generator, and pixels are quantised the
way `VaeImageProcessor` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wadi.files.images import save_grid, save_png, to_uint8
from wadi.models.backbones import Backbone
from wadi.models.process import run_student


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so a seed gives the same image anywhere."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


@torch.no_grad()
def sample_student(backbone: Backbone, net: torch.nn.Module, prompts: list[str], seeds: list[int],
             batch_size: int = 16, guidance: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] from the student: one evaluation at the generator's time (T-1), x0 by
    the process's generator (VP: (z - sigma_T eps) / alpha_T; flow: z - v); a student of N
    steps (`model.student_steps`) re-noises that x0 to its next time and goes on, as the
    exported stock scheduler does.

    The student samples without guidance (1.0: the conditional pass alone). Another scale
    guides the prediction from one batched [uncond; cond] pass: a teacher sampled in one
    step, which is what the exported scheduler does in its single step.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    device = next(net.parameters()).device
    # Inputs in the frozen weights' dtype (fp32 trainable adapters cast their own W').
    dtype = next((p for p in net.parameters() if not p.requires_grad), next(net.parameters())).dtype
    images = []
    for i in range(0, len(prompts), batch_size):
        cond = backbone.encode_prompts(prompts[i:i + batch_size]).to(device, dtype)
        z = seeded_noise(backbone.latent_shape, seeds[i:i + batch_size], device).to(dtype)
        x0 = run_student(backbone.process, backbone.student_times(device),
                         lambda x, t: backbone.guided(net, x.to(dtype), t, cond, guidance), z)
        images.append(backbone.decode(x0).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def sample_teacher(backbone: Backbone, net: torch.nn.Module, prompts: list[str], seeds: list[int], steps: int = 25,
               guidance: float = 3.0, scheduler: str | None = None, batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] from the multi-step teacher with classifier-free guidance.

    `scheduler` names a diffusers scheduler of the backbone's process (wadi.models.process): VP
    "ddim" (deterministic, the default), "dpm" (DPM-Solver++) or "euler"; flow "euler"
    (flow-matching Euler, the default) or "dpm".
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    proc = backbone.process
    sched = proc.sampler(scheduler)
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    images = []
    for i in range(0, len(prompts), batch_size):
        cond = backbone.encode_prompts(prompts[i:i + batch_size]).to(device, dtype)
        # Flow-matching schedulers neither scale the noise nor the model input.
        x = seeded_noise(backbone.latent_shape, seeds[i:i + batch_size], device) * getattr(sched, "init_noise_sigma", 1)
        backbone.set_timesteps(sched, steps, device)
        for t in sched.timesteps:
            x_in = (sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x).to(dtype)
            tt = proc.time_tensor(t, len(x_in), device)
            x = sched.step(backbone.guided(net, x_in, tt, cond, guidance), t, x).prev_sample
        images.append(backbone.decode(x).float().cpu())
    return torch.cat(images)


@dataclass
class Sampling:
    """How images are made: the student's own sampling (one step, or the steps its backbone
    says), or the teacher with its scheduler."""

    student: bool = True  # the student's own sampling; False: the multi-step teacher's
    steps: int | None = None  # the teacher's steps (None: 25); for the student, its own (None: 1), as recorded
    guidance: float | None = None  # None: 3.0 for the multi-step teacher, none (1.0) for the student
    scheduler: str | None = None  # multi-step only: ddim | dpm | euler; None: the process's default

    @staticmethod
    def for_student(backbone: Backbone, guidance: float | None = None) -> "Sampling":
        return Sampling(steps=backbone.student_steps, guidance=guidance)

    @property
    def scale(self) -> float:
        return self.guidance if self.guidance is not None else (1.0 if self.student else 3.0)

    @property
    def num_steps(self) -> int:
        return self.steps or (1 if self.student else 25)

    @property
    def nfe(self) -> int:
        """Network evaluations per image: guidance doubles every step."""
        return self.num_steps * (2 if self.scale != 1 else 1)

    def __call__(self, backbone: Backbone, net: torch.nn.Module, prompts: list[str], seeds: list[int],
                 batch_size: int = 16) -> torch.Tensor:
        if self.student:
            return sample_student(backbone, net, prompts, seeds, batch_size, self.scale)
        return sample_teacher(backbone, net, prompts, seeds, self.num_steps, self.scale, self.scheduler, batch_size)

    def check(self, backbone: Backbone) -> None:
        """Name the teacher's scheduler (None: the process's default), refusing, before
        anything is written, one the backbone's process has not, and guidance where the
        model has none."""
        if self.scale != 1 and backbone.guidance_mode == "none":
            raise ValueError(f"this {backbone.kind.name} model has no guidance (guidance {self.scale:g} asked); "
                             "use guidance 1")
        if not self.student:
            self.scheduler = backbone.process.sampler_name(self.scheduler)

    def to_dict(self) -> dict:
        if self.student:
            return {"student": True, "steps": self.num_steps, "guidance": None if self.scale == 1 else self.scale}
        return {**asdict(self), "steps": self.num_steps, "guidance": self.scale}


def sample_to_folder(backbone: Backbone, net: torch.nn.Module, sampling: Sampling, prompts: list[str],
                     seeds: list[int], out: str | Path, batch_size: int = 8, text: dict | None = None,
                     with_grid: bool = True, progress: bool = True) -> list[Path]:
    """Every prompt with every seed as PNGs `NNNNN-seedS.png` (prompt, seed and `text` in
    their metadata), and `grid.png` with a row per prompt and a column per seed."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(k, p, s) for k, p in enumerate(prompts) for s in seeds]
    paths, images = [], []
    for i in tqdm(range(0, len(jobs), batch_size), desc="sampling", unit="batch", disable=not progress):
        chunk = jobs[i:i + batch_size]
        batch = sampling(backbone, net, [p for _, p, _ in chunk], [s for _, _, s in chunk], batch_size)
        for (k, p, s), img in zip(chunk, to_uint8(batch)):
            meta = {"prompt": p, "seed": s, **(text or {}), "sampling": sampling.to_dict()}
            paths.append(save_png(img, out / f"{k:05d}-seed{s}.png", meta))
        if with_grid:
            images.append(batch)
    if with_grid:
        save_grid(torch.cat(images), out / "grid.png", nrow=len(seeds))
        paths.append(out / "grid.png")
    return paths

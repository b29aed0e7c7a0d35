"""The digits teacher: a small pixel-space UNet2DConditionModel on MiniLM token states,
laid out like Stable Diffusion's, trained with the v-prediction loss (SD 2.1's) and
classifier-free-guidance dropout.

Its noise schedule is Stable Diffusion's (1000 steps, scaled-linear betas 0.00085 to
0.012), so the one-step generator at t = 999 meets the same abar_T = 0.0047 as on SD.
Saved as a diffusers folder (unet/, scheduler/) that `wadi.backbones.load_backbone`
loads as the "pixel" kind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import Backbone, BackboneSpec, load_backbone
from ..distill import lr_lambda
from ..files import atomic_path
from . import paths, world

UNET_CONFIG = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    # Laid out like Stable Diffusion: cross-attention at every level but the lowest (here
    # the 8x8 one) and in the middle block, linear projections as in SD 2.1, so the
    # adapters reach the full resolution as they do on SD.
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=384, attention_head_dim=4, norm_num_groups=16, use_linear_projection=True,
)
# Stable Diffusion's noise schedule with SD 2.1's v-prediction. With epsilon prediction the
# one-step generator x0 = (z - sigma_T eps) / alpha_T multiplies every error of eps by
# sigma_T / alpha_T = 14.6 straight into 8x8 pixels, and no student got far from the
# teacher's grainy one-step images (docs/digits.md); with v it is x0 = alpha_T z - sigma_T v.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                        beta_end=0.012, prediction_type="v_prediction", clip_sample=False,
                        steps_offset=1)


def load_teacher(folder: str | Path = paths.TEACHER) -> Backbone:
    """The (shipped) teacher as a pixel backbone with the MiniLM text encoder."""
    from .plugin import teacher_spec

    spec = teacher_spec()
    spec.path = str(folder)
    return load_backbone(spec)


def _fresh_backbone(seed: int) -> Backbone:
    """An untrained teacher with the MiniLM text encoder, as `load_teacher` would return it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    net = UNet2DConditionModel(**UNET_CONFIG)
    folder = paths.minilm_dir()
    encoder = AutoModel.from_pretrained(folder).requires_grad_(False).eval()
    spec = BackboneSpec(kind="pixel", path="", text_encoder=str(folder), max_length=paths.MAX_LENGTH)
    return Backbone(spec, net, encoder, AutoTokenizer.from_pretrained(folder), dict(DDPMScheduler(**SCHEDULER_CONFIG).config))


def train_teacher(out: str | Path, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                  uncond_prob: float = 0.1, ema_decay: float = 0.999, progress: bool = True) -> Path:
    """Train the teacher on the train split and save its EMA weights to `out`."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch size must be positive, got {steps} and {batch_size}")
    out = Path(out)
    bb = _fresh_backbone(seed)
    net = bb.net.train()
    images, labels = world.load("train")
    prompts = world.all_prompts()
    per_class = len(world.TEMPLATES)
    table, empty = bb.encode_prompts(prompts), bb.empty_cond()  # MiniLM once, up front
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps // 20, "cosine", steps))
    ema = EMAModel(params, decay=ema_decay)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    for step in tqdm(range(steps), desc="digits teacher", disable=not progress, dynamic_ncols=True):
        b = torch.randint(len(images), (batch_size,), generator=g)
        # Each image gets a random phrasing of its class; uncond_prob of them the empty prompt.
        which = labels[b] * per_class + torch.randint(per_class, (batch_size,), generator=g)
        keep = torch.rand(batch_size, generator=g) >= uncond_prob
        cond = table[which].where(keep, empty)
        t = bb.process.time(torch.randint(bb.num_train_timesteps, (batch_size,), generator=g))
        eps = torch.randn(images[b].shape, generator=g)
        x_t = bb.process.add_noise(images[b], eps, t)
        # The loss on what the net predicts: v = alpha eps - sigma x0 (or eps).
        loss = F.mse_loss(bb.kind.call(bb, net, x_t, t, cond), bb.process.target(images[b], eps, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    from diffusers import DDPMScheduler

    window = max(1, steps // 20)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "uncond_prob": uncond_prob,
              "ema_decay": ema_decay, "wall_time_s": round(time.time() - t0, 1),
              "final_loss": sum(losses[-window:]) / window,
              "command": f"wadi digits-teacher --out {out} --steps {steps} --batch-size {batch_size} "
                         f"--lr {lr} --seed {seed}"}
    with atomic_path(out) as tmp:  # the folder appears whole
        net.eval().save_pretrained(tmp / "unet")
        DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out

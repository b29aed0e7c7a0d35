"""The digits teachers: small pixel-space networks on MiniLM token states, trained on the
train digits with their process's loss and classifier-free-guidance dropout, one per world:

- `digits`: a UNet2DConditionModel laid out like Stable Diffusion's, on Stable Diffusion's
  noise schedule (1000 steps, scaled-linear betas 0.00085 to 0.012) with SD 2.1's
  v-prediction, so the one-step generator at t = 999 meets the same abar_T = 0.0047 as on
  SD; loaded as the "pixel" kind.
- `digits-flow`: an SD3Transformer2DModel (MMDiT) over 8x8 pixels (patch size 1) as a
  rectified flow (SD3's velocity loss, FlowMatchEulerDiscreteScheduler); loaded as the
  "pixel-mmdit" kind.

Each is saved as a diffusers folder (the kind's denoiser folder, scheduler/, training.json)
that `wadi.models.backbones.load_backbone` loads.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wadi.digits import paths, world
from wadi.engine.distiller import lr_lambda
from wadi.files.atomic import atomic_path
from wadi.files.weights import check_finite
from wadi.models.backbones import Backbone, BackboneSpec, get_kind, load_backbone

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
# SD3's joint blocks on 64 one-pixel tokens and the 16 MiniLM tokens (their 384-wide states
# and masked mean are the context and pooled inputs): about the UNet teacher's size.
MMDIT_CONFIG = dict(
    sample_size=8, patch_size=1, in_channels=1, out_channels=1, num_layers=6, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=384, caption_projection_dim=64, pooled_projection_dim=384,
    pos_embed_max_size=8,
)
# Rectified flow as SD3 trains it, unshifted: at 8x8 there is little to gain from spending
# more training time at high noise (SD3's shift 3 is for 1024 px).
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


@dataclass(frozen=True)
class Recipe:
    """What a world's teacher is: its backbone kind, its network and its noise process."""

    kind: str
    net: Callable[[], torch.nn.Module]
    scheduler: Callable[[], object]
    folder: Path  # the shipped one


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def _mmdit():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**MMDIT_CONFIG)


def _flow():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)


RECIPES = {"digits": Recipe("pixel", _unet, _ddpm, paths.TEACHERS["digits"]),
           "digits-flow": Recipe("pixel-mmdit", _mmdit, _flow, paths.TEACHERS["digits-flow"])}
DEFAULT_WORLD = "digits"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown digits world {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def teacher_spec(name: str = DEFAULT_WORLD, folder: str | Path | None = None) -> BackboneSpec:
    """A world's (shipped) teacher with the MiniLM text encoder (raises the install hint if it is missing)."""
    r = recipe(name)
    return BackboneSpec(kind=r.kind, path=str(folder or r.folder), text_encoder=str(paths.minilm_dir()),
                        max_length=paths.MAX_LENGTH)


def load_teacher(folder: str | Path | None = None, name: str = DEFAULT_WORLD) -> Backbone:
    """A world's (shipped) teacher as its backbone kind with the MiniLM text encoder."""
    return load_backbone(teacher_spec(name, folder))


def _fresh_backbone(r: Recipe, seed: int) -> Backbone:
    """An untrained teacher with the MiniLM text encoder, as `load_teacher` would return it."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    net = r.net()
    folder = paths.minilm_dir()
    encoder = AutoModel.from_pretrained(folder).requires_grad_(False).eval()
    spec = BackboneSpec(kind=r.kind, path="", text_encoder=str(folder), max_length=paths.MAX_LENGTH)
    scheduler = r.scheduler()
    # The class name, as in the saved config, is what says which process it is.
    config = {"_class_name": type(scheduler).__name__, **scheduler.config}
    return Backbone(spec, net, encoder, AutoTokenizer.from_pretrained(folder), config)


def train_teacher(out: str | Path, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                  uncond_prob: float = 0.1, ema_decay: float = 0.999, name: str = DEFAULT_WORLD,
                  progress: bool = True) -> Path:
    """Train world `name`'s teacher on the train split and save its EMA weights to `out`."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch size must be positive, got {steps} and {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate (--lr) must be a positive number, got {lr}")
    r = recipe(name)
    out = Path(out)
    bb = _fresh_backbone(r, seed)
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
    for step in tqdm(range(steps), desc=f"{name} teacher", disable=not progress, dynamic_ncols=True):
        b = torch.randint(len(images), (batch_size,), generator=g)
        # Each image gets a random phrasing of its class; uncond_prob of them the empty prompt.
        which = labels[b] * per_class + torch.randint(per_class, (batch_size,), generator=g)
        keep = torch.rand(batch_size, generator=g) >= uncond_prob
        cond = table[which].where(keep, empty)
        t = bb.process.time(torch.randint(bb.num_train_timesteps, (batch_size,), generator=g))
        eps = torch.randn(images[b].shape, generator=g)
        x_t = bb.process.add_noise(images[b], eps, t)
        # The loss on what the net predicts (v or eps on VP, the velocity eps - x0 on a flow).
        loss = F.mse_loss(bb.kind.call(bb, net, x_t, t, cond), bb.process.target(images[b], eps, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    check_finite(net.named_parameters(), f"the {name} teacher diverged (lower --lr); not written")
    window = max(1, steps // 20)
    # The default world needs no --world: its recorded command stays the one it was made with.
    flag = "" if name == DEFAULT_WORLD else f" --world {name}"
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "uncond_prob": uncond_prob,
              "ema_decay": ema_decay, "wall_time_s": round(time.time() - t0, 1),
              "final_loss": sum(losses[-window:]) / window,
              "command": f"wadi digits-teacher{flag} --out {out} --steps {steps} --batch-size {batch_size} "
                         f"--lr {lr} --seed {seed}"}
    with atomic_path(out) as tmp:  # the folder appears whole
        net.eval().save_pretrained(tmp / get_kind(r.kind).subfolder)
        r.scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out

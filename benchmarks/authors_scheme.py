"""The authors' WaDi scheme, rewritten as they run it: the baseline of our benchmarks, not library code.

- HookLoRaD: LoRaD as a forward hook on the frozen nn.Linear. The frozen layer computes
  its output, the hook throws it away and computes it again with W' built by plain torch
  ops under autograd: every adapted matmul runs twice, and autograd keeps W' (for dx)
  and Theta (for the cos and sin backward) alive until backward, beside views of the
  frozen W; cos and sin themselves are only saved where W requires grad.
- install_hook_lorad: HookLoRaD on every target layer of a model (a wadi.adapters.targets preset).
- AuthorsScheme: one WaDi iteration with those layers and four separate denoiser calls
  for the guided scores, every network a full copy. Losses, optimizer, clipping and order are
  wadi's (docs/method.md).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wadi.adapters.targets import resolve_rule, select_linears
from wadi.engine.distiller import Noise
from wadi.engine.losses import vsd_loss
from wadi.models.backbones import dtype_of
from wadi.models.guidance import guide


class HookLoRaD(nn.Module):
    """One frozen nn.Linear with the authors' LoRaD forward hook (see above); trains theta_a, theta_b."""

    def __init__(self, base: nn.Linear, theta_a: torch.Tensor, theta_b: torch.Tensor):
        super().__init__()
        self.layer = base.requires_grad_(False)
        self.theta_a = nn.Parameter(theta_a.clone())
        self.theta_b = nn.Parameter(theta_b.clone())
        self.layer.register_forward_hook(self._rotate)

    def _rotate(self, module, inputs, _frozen_output):
        theta = torch.remainder(self.theta_a @ self.theta_b + math.pi, 2 * math.pi) - math.pi
        cos, sin = torch.cos(theta), torch.sin(theta)
        w_even, w_odd = module.weight[:, 0::2], module.weight[:, 1::2]
        w_rot = torch.empty_like(module.weight)
        w_rot[:, 0::2] = w_even * cos - w_odd * sin
        w_rot[:, 1::2] = w_even * sin + w_odd * cos
        return F.linear(inputs[0], w_rot, module.bias)

    def forward(self, x):
        return self.layer(x)


def install_hook_lorad(model: nn.Module, targets: str, rank: int) -> nn.Module:
    """Freeze `model` and put HookLoRaD on every layer the target preset takes.

    The angles start as LoRaDLinear's do, drawn in the same order (theta_a zeros,
    theta_b Xavier-uniform, layer by layer), so under the same torch seed both schemes
    start from identical adapters.
    """
    model.requires_grad_(False)
    for name in select_linears(model, resolve_rule(targets)):
        base = model.get_submodule(name)
        factory = dict(device=base.weight.device, dtype=torch.float32)
        theta_a = torch.zeros(base.out_features, rank, **factory)
        theta_b = nn.init.xavier_uniform_(torch.empty(rank, base.in_features // 2, **factory))
        model.set_submodule(name, HookLoRaD(base, theta_a, theta_b))
    return model


class AuthorsScheme:
    """Student and fake model with hooked LoRaD, trained the authors' way on a wadi Backbone.

    Built from the same torch.manual_seed as a wadi Distiller with the same config, and
    while the backbone is still on the CPU (where the Distiller draws its angles), it
    holds the same initial adapters and, given the same sample positions, draws the same
    per-sample noise, so both do the same work.
    """

    def __init__(self, cfg, backbone, accelerator):
        self.cfg, self.bb, self.acc = cfg, backbone, accelerator
        self.weight_dtype = dtype_of(cfg.train.mixed_precision)
        self.student = self._hooked_copy(cfg.student)
        self.fake = self._hooked_copy(cfg.fake)
        tc = cfg.train
        kwargs = dict(betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.opt_s = torch.optim.AdamW(self._trainable(self.student), lr=tc.lr_student, **kwargs)
        self.opt_f = torch.optim.AdamW(self._trainable(self.fake), lr=tc.lr_fake, **kwargs)
        self.opt_s, self.opt_f = accelerator.prepare(self.opt_s, self.opt_f)

    def _hooked_copy(self, adapter_cfg) -> nn.Module:
        net = install_hook_lorad(copy.deepcopy(self.bb.net), adapter_cfg.targets, adapter_cfg.rank)
        for p in net.parameters():  # frozen weights in the training dtype, angles fp32
            p.data = p.data.float() if p.requires_grad else p.data.to(self.weight_dtype)
        return net.to(self.acc.device).train()

    @staticmethod
    def _trainable(net: nn.Module) -> list[nn.Parameter]:
        return [p for p in net.parameters() if p.requires_grad]

    def _scores(self, net, x_t, t, cond, uncond) -> torch.Tensor:
        """Guided eps of `net`: two separate calls, as the authors' script makes them."""
        e_c = self.bb.predict(net, x_t, t, cond).float()
        e_u = self.bb.predict(net, x_t, t, uncond).float()
        return guide(e_u, e_c, self.cfg.train.guidance)

    def _update(self, loss, net, opt) -> None:
        self.acc.backward(loss)
        self.acc.clip_grad_norm_(self._trainable(net), self.cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step(self, prompts: list[str], positions: list[int]) -> dict:
        # The same per-sample draws, in the same order, as wadi.engine.distiller.Distiller.train_step.
        tc, bb, device, wd = self.cfg.train, self.bb, self.acc.device, self.weight_dtype
        n, noise = len(prompts), Noise(tc.seed, positions, device)
        cond = bb.encode_prompts(prompts).to(device, wd)
        uncond = bb.empty_cond().to(device, wd).expand(n)
        proc = bb.process
        T = bb.num_train_timesteps - 1
        t_T = proc.time(torch.full((n,), proc.num_train_timesteps - 1, device=device, dtype=torch.long))
        z = noise.normal(bb.latent_shape)
        with self.acc.autocast():
            eps = bb.predict(self.student, z.to(wd), t_T, cond)
        x0 = proc.generate(eps, z)
        t = proc.time(noise.integers(tc.t_min, tc.t_max))
        x_t = proc.add_noise(x0.detach(), noise.normal(x0.shape[1:]), t).to(wd)
        with torch.no_grad(), self.acc.autocast():
            e_real = self._scores(bb.net, x_t, t, cond, uncond)
            e_fake = self._scores(self.fake, x_t, t, cond, uncond)
        loss_g = vsd_loss(x0, proc.score_difference(e_real, e_fake, t))
        self._update(loss_g, self.student, self.opt_s)
        t_f = proc.time(noise.integers(0, T))
        eps_f = noise.normal(x0.shape[1:])
        x_tf = proc.add_noise(x0.detach(), eps_f, t_f).to(wd)
        keep = noise.uniform() >= tc.fake_uncond_prob
        with self.acc.autocast():
            pred = bb.predict(self.fake, x_tf, t_f, cond.where(keep, uncond))
        loss_f = proc.fake_loss(pred, x0.detach(), eps_f, t_f)
        self._update(loss_f, self.fake, self.opt_f)
        return {"loss_student": loss_g.item(), "loss_fake": loss_f.item()}

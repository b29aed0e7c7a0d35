"""The WaDi training loop (SPEC section 3): VSD with LoRaD on student and fake score model.

One step: the student makes x0 in one evaluation at t = T-1; it is noised at t in
[t_min, t_max] and scored by the frozen teacher and the fake model, each with guidance
in one batched forward of [uncond; cond]; the student descends the VSD loss. Then the
fake model learns to denoise the student's x0 (10% empty prompts). AdamW, constant
learning rates, clipping at 1.0. accelerate spreads it over processes.

Run folders are numbered (runs/00003-sd15-wadi/) and hold the resolved config, a
JSON-lines log, TensorBoard events, sample grids, checkpoints and the exported student.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
import yaml

from . import checkpoint as ckpt
from .adapters import Adapter, attach
from .backbones import Backbone, Cond, check_model_path, load_backbone
from .config import DistillConfig, resolve
from .losses import add_noise, fake_loss, guide, one_step_x0, vsd_loss
from .prompts import read_prompts
from .sampling import one_step, save_grid

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PromptStream:
    """An endless stream of prompts, reshuffled every epoch with a seeded permutation.

    The batch of a given step is a pure function of (seed, step), so a resumed run sees
    exactly the prompts an uninterrupted one would.
    """

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed, self._perms = prompts, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def take(self, start: int, size: int) -> list[str]:
        n = len(self.prompts)
        return [self.prompts[int(self._perm(i // n)[i % n])] for i in range(start, start + size)]


def make_optimizer(params, lr: float, cfg) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.adam_8bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            warnings.warn("train.adam_8bit is set but bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def constant_with_warmup(opt, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)


def adapted_copy(net: torch.nn.Module, adapter_cfg, weight_dtype, checkpointing: bool) -> Adapter:
    """A copy of the teacher's net with an adapter; frozen weights in weight_dtype, trainable fp32."""
    adapter = attach(copy.deepcopy(net), adapter_cfg)
    for p in adapter.model.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(weight_dtype)
    if checkpointing:
        adapter.model.enable_gradient_checkpointing()
    adapter.model.train()
    return adapter


class Distiller:
    """Everything one WaDi run holds: backbone, teacher, student, fake model, optimizers, state."""

    def __init__(self, cfg: DistillConfig, run_dir: Path, backbone: Backbone, prompts: list[str], accelerator):
        self.cfg, self.run_dir, self.bb, self.acc = cfg, run_dir, backbone, accelerator
        tc = cfg.train
        self.weight_dtype = WEIGHT_DTYPES[tc.mixed_precision]
        device = accelerator.device
        self.student = adapted_copy(backbone.net, cfg.student, self.weight_dtype, tc.gradient_checkpointing)
        self.fake = adapted_copy(backbone.net, cfg.fake, self.weight_dtype, tc.gradient_checkpointing)
        backbone.to(device, self.weight_dtype)  # the teacher and the frozen encoders
        self.opt_s = make_optimizer(list(self.student.trainable_parameters().values()), tc.lr_student, tc)
        self.opt_f = make_optimizer(list(self.fake.trainable_parameters().values()), tc.lr_fake, tc)
        self.sched_s = constant_with_warmup(self.opt_s, tc.warmup_steps)
        self.sched_f = constant_with_warmup(self.opt_f, tc.warmup_steps)
        self.student_net, self.fake_net, self.opt_s, self.opt_f = accelerator.prepare(
            self.student.model, self.fake.model, self.opt_s, self.opt_f)
        self.ema = None
        if tc.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(list(self.student.trainable_parameters().values()), decay=tc.ema_decay)
        self.prompts = PromptStream(prompts, tc.seed)
        self.embed_cache = self._encode_all(prompts) if cfg.data.cache_embeddings else None
        self.noise = torch.Generator(device=device).manual_seed(tc.seed * 1000 + accelerator.process_index)
        self.step = 0
        self.nonfinite_streak = 0

    # --- conditioning --------------------------------------------------------------
    def _encode_all(self, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        cache = {}
        for i in range(0, len(prompts), 64):
            chunk = prompts[i:i + 64]
            c = self.bb.encode_prompts(chunk)
            for j, p in enumerate(chunk):
                cache[p] = (c.embeds[j], None if c.mask is None else c.mask[j])
        return cache

    def _cond(self, prompts: list[str]) -> Cond:
        if self.embed_cache is None:
            return self.bb.encode_prompts(prompts)
        rows = [self.embed_cache[p] for p in prompts]
        mask = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return Cond(torch.stack([r[0] for r in rows]), mask)

    def _randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (n,), generator=self.noise, device=self.acc.device)

    # --- one iteration ---------------------------------------------------------------
    def _scores(self, net, x_t, t, cond, uncond) -> torch.Tensor:
        """Guided eps of `net`: one batched forward of [uncond; cond]."""
        e_u, e_c = self.bb.predict_eps(net, torch.cat([x_t, x_t]), torch.cat([t, t]), uncond.cat(cond)).chunk(2)
        return guide(e_u.float(), e_c.float(), self.cfg.train.guidance)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Agreed by every process, so that all skip together (DDP would hang otherwise)."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.acc.device)
        return self.acc.reduce(bad, reduction="sum").item() == 0

    def _update(self, loss, net, opt, sched) -> None:
        self.acc.backward(loss)
        if self.acc.sync_gradients:
            self.acc.clip_grad_norm_(net.parameters(), self.cfg.train.max_grad_norm)
        opt.step()
        if self.acc.sync_gradients:
            sched.step()
        opt.zero_grad(set_to_none=True)

    def micro_step(self, prompts: list[str]) -> dict:
        tc, bb, device = self.cfg.train, self.bb, self.acc.device
        n = len(prompts)
        cond = self._cond(prompts).to(device, self.weight_dtype)
        uncond = bb.empty_cond().to(device, self.weight_dtype).expand(n)
        T = bb.num_train_timesteps - 1
        t_T = torch.full((n,), T, device=device, dtype=torch.long)
        z = torch.randn((n, *bb.latent_shape), generator=self.noise, device=device)
        skipped = 0
        with self.acc.accumulate(self.student_net, self.fake_net):
            # 1. generator
            alpha_T, sigma_T = bb.alpha_sigma(t_T)
            with self.acc.autocast():
                eps = bb.predict_eps(self.student_net, z.to(self.weight_dtype), t_T, cond)
            x0 = one_step_x0(z, eps.float(), alpha_T, sigma_T)
            # 2. student loss: teacher and fake scores with guidance, no gradient
            t = self._randint(tc.t_min, tc.t_max, n)
            alpha, sigma = bb.alpha_sigma(t)
            x_t = add_noise(x0.detach(), torch.randn(x0.shape, generator=self.noise, device=device), alpha, sigma)
            x_t = x_t.to(self.weight_dtype)
            with torch.no_grad(), self.acc.autocast():
                e_real = self._scores(bb.net, x_t, t, cond, uncond)
                e_fake = self._scores(self.acc.unwrap_model(self.fake_net), x_t, t, cond, uncond)
            loss_g = vsd_loss(x0, e_real, e_fake, sigma)
            if self._all_finite(loss_g):
                self._update(loss_g, self.student_net, self.opt_s, self.sched_s)
            else:
                skipped += 1
            # 3. fake loss on the (detached) student images, 10% empty prompts
            t_f = self._randint(0, T, n)
            alpha_f, sigma_f = bb.alpha_sigma(t_f)
            eps_f = torch.randn(x0.shape, generator=self.noise, device=device)
            x_tf = add_noise(x0.detach(), eps_f, alpha_f, sigma_f).to(self.weight_dtype)
            keep = torch.rand(n, generator=self.noise, device=device) >= tc.fake_uncond_prob
            with self.acc.autocast():
                pred = bb.predict_eps(self.fake_net, x_tf, t_f, cond.where(keep, uncond))
            loss_f = fake_loss(pred, eps_f, alpha_f)
            if self._all_finite(loss_f):
                self._update(loss_f, self.fake_net, self.opt_f, self.sched_f)
            else:
                skipped += 1
        return {"loss_student": loss_g.item(), "loss_fake": loss_f.item(), "skipped": skipped}

    def train_step(self) -> dict:
        tc = self.cfg.train
        per_step = tc.batch_size * self.acc.num_processes
        logs = []
        for micro in range(tc.grad_accum):
            start = (self.step * tc.grad_accum + micro) * per_step + self.acc.process_index * tc.batch_size
            logs.append(self.micro_step(self.prompts.take(start, tc.batch_size)))
        if self.ema is not None:
            self.ema.step(list(self.student.trainable_parameters().values()))
        self.step += 1
        out = {k: sum(d[k] for d in logs) / len(logs) for k in ("loss_student", "loss_fake")}
        out["skipped"] = sum(d["skipped"] for d in logs)
        return out

    # --- state -----------------------------------------------------------------------
    def adapter_checksums(self) -> list[list[float]]:
        """Per process: (sum, sum of squares) of the student's and fake's trainable weights.
        Equal rows mean the processes hold the same adapters (DDP kept them in sync)."""
        params = list(self.student.trainable_parameters().values()) + list(self.fake.trainable_parameters().values())
        local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().pow(2).sum() for p in params)])
        return self.acc.gather(local.to(self.acc.device).unsqueeze(0)).tolist()

    def save_checkpoint(self) -> Path | None:
        tmp = self.run_dir / "checkpoints" / f"step-{self.step:07d}.tmp"
        if self.acc.is_main_process:
            ckpt.begin(tmp)
        self.acc.wait_for_everyone()
        # Every process writes its own RNG state; the main process writes the rest.
        ckpt.save_state(tmp / f"rng-{self.acc.process_index}.safetensors", ckpt.rng_state(self.noise))
        checksums = self.adapter_checksums()
        if self.acc.is_main_process:
            self.student.save(tmp / "student.safetensors", {"step": self.step})
            self.fake.save(tmp / "fake.safetensors", {"step": self.step})
            ckpt.save_state(tmp / "optim-student.safetensors", self.opt_s.state_dict())
            ckpt.save_state(tmp / "optim-fake.safetensors", self.opt_f.state_dict())
            if self.ema is not None:
                ckpt.save_state(tmp / "ema.safetensors", self.ema.state_dict())
            state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak,
                     "sched_student": self.sched_s.state_dict(), "sched_fake": self.sched_f.state_dict(),
                     "python_random": random.getstate(), "num_processes": self.acc.num_processes,
                     "adapter_checksums": checksums}
            (tmp / "state.json").write_text(json.dumps(state))
        self.acc.wait_for_everyone()
        final = None
        if self.acc.is_main_process:
            final = ckpt.commit(tmp, self.cfg.run.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        if state["num_processes"] != self.acc.num_processes:
            raise ValueError(f"checkpoint {folder} was written by {state['num_processes']} processes, "
                             f"this run has {self.acc.num_processes}; resume with the same number")
        self.student.load(folder / "student.safetensors")
        self.fake.load(folder / "fake.safetensors")
        self.opt_s.load_state_dict(ckpt.load_state(folder / "optim-student.safetensors"))
        self.opt_f.load_state_dict(ckpt.load_state(folder / "optim-fake.safetensors"))
        self.sched_s.load_state_dict(state["sched_student"])
        self.sched_f.load_state_dict(state["sched_fake"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.load_state(folder / "ema.safetensors"))
        rng = ckpt.load_state(folder / f"rng-{self.acc.process_index}.safetensors")
        ckpt.set_rng_state(rng, self.noise, state["python_random"])
        self.step, self.nonfinite_streak = state["step"], state["nonfinite_streak"]

    # --- outputs ---------------------------------------------------------------------
    def sample_grid(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        prompts = [p for p in self.cfg.data.sample_prompts for _ in self.cfg.run.sample_seeds]
        seeds = [s for _ in self.cfg.data.sample_prompts for s in self.cfg.run.sample_seeds]
        net = self.acc.unwrap_model(self.student_net)
        net.eval()
        images = one_step(self.bb, net, prompts, seeds)
        net.train()
        scale = max(1, 128 // images.shape[-1])  # tiny worlds get blown up to be seen
        return save_grid(images, self.run_dir / "samples" / f"step-{self.step:07d}.png",
                         nrow=len(self.cfg.run.sample_seeds), scale=scale)

    def export(self) -> Path:
        """The final student: adapter files and a merged plain diffusers model."""
        out = self.run_dir / "student"
        self.student.save(self.run_dir / "student.safetensors", {"step": self.step})
        self.fake.save(self.run_dir / "fake.safetensors", {"step": self.step})
        if self.ema is not None:  # the exported model carries the EMA weights
            self.ema.copy_to(list(self.student.trainable_parameters().values()))
        self.student.merged_model().save_pretrained(out)
        return out


def _logger(run_dir: Path, start_step: int):
    """A JSON-lines log (entries past a resumed checkpoint are dropped) and TensorBoard writer."""
    from torch.utils.tensorboard import SummaryWriter

    log = run_dir / "log.jsonl"
    if log.exists():
        kept = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
        log.write_text("".join(ln + "\n" for ln in kept))
    return log.open("a"), SummaryWriter(run_dir / "tb", purge_step=start_step or None)


def prepare(cfg: DistillConfig) -> tuple[list[str], Backbone]:
    """Everything that can fail on bad input, before any run folder is written."""
    if not cfg.data.prompts:
        raise ValueError("no prompt file: set data.prompts=PATH")
    prompts = read_prompts(cfg.data.prompts, cfg.data.format, dedupe=cfg.data.dedupe)
    if not cfg.model.path:
        raise ValueError("no model: set model.path=FOLDER_OR_HUB_ID")
    check_model_path(cfg.model.path)
    if cfg.train.mixed_precision not in WEIGHT_DTYPES:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(WEIGHT_DTYPES)}")
    m = cfg.model
    backbone = load_backbone(m.kind, m.path, text_encoder=m.text_encoder, resolution=m.resolution,
                             max_length=m.max_length)
    return prompts, backbone


def distill(config: str | DistillConfig, overrides: list[str] = (), resume: str | None = None,
            progress: bool = True) -> Path:
    """Run (or continue) a distillation; returns the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    if resume:
        root = config.run.root if isinstance(config, DistillConfig) else (
            resolve(config, overrides).run.root if config else "runs")
        run_dir = ckpt.find_resume_dir(Path(root), resume)
        cfg = resolve(str(run_dir / "config.yaml"), overrides)
    else:
        cfg = config if isinstance(config, DistillConfig) else resolve(config, overrides)
    prompts, backbone = prepare(cfg)
    tc, rc = cfg.train, cfg.run
    # Several processes and no CUDA: gloo on the CPU (accelerate needs cpu=True to pick it).
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum, cpu=multi_cpu)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if not resume:
        name = "-".join(x for x in (cfg.preset or "custom", rc.desc) if x)
        run_dir = broadcast_object_list([ckpt.next_run_dir(Path(rc.root), name) if acc.is_main_process else None])[0]
    distiller = Distiller(cfg, run_dir, backbone, prompts, acc)
    if resume:
        distiller.load_checkpoint(ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    elif acc.is_main_process:
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    acc.wait_for_everyone()

    log_file, tb = _logger(run_dir, distiller.step) if acc.is_main_process else (None, None)
    bar = tqdm(total=tc.steps, initial=distiller.step, disable=not (progress and acc.is_main_process),
               desc=run_dir.name, dynamic_ncols=True)
    t0 = time.time()
    while distiller.step < tc.steps:
        out = distiller.train_step()
        distiller.nonfinite_streak = distiller.nonfinite_streak + 1 if out["skipped"] else 0
        if out["skipped"]:
            warnings.warn(f"step {distiller.step}: non-finite loss, update skipped")
        if distiller.nonfinite_streak >= tc.max_nonfinite:
            last = ckpt.list_checkpoints(run_dir / "checkpoints")
            raise RuntimeError(f"stopped: {distiller.nonfinite_streak} non-finite losses in a row at step "
                               f"{distiller.step}; last good checkpoint: {last[-1] if last else 'none'}")
        step = distiller.step
        bar.update(1)
        bar.set_postfix(student=f"{out['loss_student']:.4g}", fake=f"{out['loss_fake']:.4g}")
        if acc.is_main_process and (step % rc.log_every == 0 or step == tc.steps):
            record = {"step": step, **out, "lr_student": distiller.sched_s.get_last_lr()[0],
                      "lr_fake": distiller.sched_f.get_last_lr()[0], "time": round(time.time() - t0, 3)}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(k, v, step)
        if rc.sample_every and (step % rc.sample_every == 0 or step == tc.steps):
            distiller.sample_grid()
        if rc.checkpoint_every and step % rc.checkpoint_every == 0:
            distiller.save_checkpoint()
    bar.close()
    if acc.is_main_process:
        log_file.close()
        tb.close()
        if rc.export:
            distiller.export()
    acc.wait_for_everyone()
    acc.end_training()
    return run_dir

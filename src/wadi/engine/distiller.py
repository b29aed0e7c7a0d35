"""The WaDi training step (docs/method.md): VSD with LoRaD on student and fake score model.

One step: the student makes x0 in one evaluation at t = T-1; it is noised at t in
[t_min, t_max] and scored by the frozen teacher and the fake model, each with guidance
in one batched forward of [uncond; cond]; the student descends the VSD loss. Then the
fake model learns to denoise the student's x0 (10% empty prompts), `fake_steps` times.
A student of N steps is trained at one of its steps per sample, on the input its own
earlier steps make; the fake model learns its last step's images, the ones it samples.
AdamW, clipping at 1.0, gradient accumulation over micro-batches; accelerate spreads it
over processes. Teacher, student and fake model are one denoiser whose adapters are switched
per call (wadi.adapters.shared_base). The run around it (folders, logs, checkpoints) is wadi.engine.training.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from wadi.engine import checkpoint as ckpt
from wadi.adapters.core import Adapter, adapter_class, attach
from wadi.models.backbones import Backbone, Cond, dtype_of
from wadi.engine.config import DistillConfig
from wadi.engine.losses import vsd_loss
from wadi.models.process import run_student
from wadi.models.sampling import sample_student
from wadi.adapters.shared_base import SharedDenoiser, plain_copy
from wadi.engine.provenance import TRAINED_WITH, record_of

# A step whose scores are non-finite beyond this share of their elements is skipped; below
# it, the authors' nan_to_num zeroes the isolated elements (fp16 overflow, say).
MAX_NONFINITE_SCORE_FRACTION = 0.01


class PromptStream:
    """An endless stream of prompts, reshuffled every epoch with a seeded permutation.

    The prompt at a position is a pure function of (seed, position), so a resumed run sees
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


class Noise:
    """The random draws of a batch, sample by sample: each sample's noise is a pure function
    of (seed, the sample's position in the prompt stream), drawn in a fixed order.

    So a step gives the same numbers whatever the batch is split into: micro-batches of
    gradient accumulation, or processes; and a resumed run needs no generator state.
    Drawn on the CPU (a position gives the same noise on any device), then moved.
    """

    def __init__(self, seed: int, positions: list[int], device):
        self.device = device
        self.generators = [torch.Generator().manual_seed(_mix(seed, p)) for p in positions]

    def normal(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def integers(self, low: int, high: int) -> torch.Tensor:
        """One integer in [low, high] per sample."""
        return torch.cat([torch.randint(low, high + 1, (1,), generator=g) for g in self.generators]).to(self.device)

    def uniform(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(self.device)


def _mix(seed: int, position: int) -> int:
    """A 63-bit generator seed from (run seed, sample position)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def optimizer_class(cfg) -> type:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and installed (one warning if not)."""
    if cfg.adam_8bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit
        except ImportError:
            warnings.warn("train.adam_8bit is set but bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW


def lr_lambda(warmup: int, schedule: str, total: int):
    """The learning-rate factor at a step: linear warm-up over `warmup` steps, then
    constant, a cosine or a linear decay that reaches 0 at step `total`."""
    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        decay = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}[schedule]
        return ramp * decay

    return factor


def role_adapter(shared: SharedDenoiser, role: str, adapter_cfg, checkpointing: bool, backbone: str) -> Adapter:
    """The adapter of `role` on the shared denoiser; full fine-tuning, whose weights are
    all its own, on a copy of the teacher. The trainable parameters in float32 whatever the
    frozen dtype."""
    if adapter_cfg.kind == "full":
        adapter = attach(adapter_class("full").base_copy(plain_copy(shared.net)), adapter_cfg, backbone)
    else:
        adapter = shared.attach(role, adapter_cfg, backbone)
    for p in adapter.trainable_parameters().values():
        p.data = p.data.float()
    if checkpointing:
        adapter.model.enable_gradient_checkpointing()
    adapter.model.train()
    return adapter


@dataclass
class Batch:
    """One micro-batch: its conditioning, its samples' noise, and what the student made of it."""

    cond: Cond
    noise: Noise
    x0: torch.Tensor | None = None  # detached, for the fake model


class Distiller:
    """Everything one WaDi run holds: backbone, teacher, student, fake model, optimizers, state."""

    def __init__(self, cfg: DistillConfig, backbone: Backbone, prompts: list[str], accelerator):
        self.cfg, self.bb, self.acc = cfg, backbone, accelerator
        tc = cfg.train
        self.weight_dtype = dtype_of(tc.mixed_precision)
        device = accelerator.device
        backbone.to(device, self.weight_dtype)  # the teacher and the frozen encoders, shared below
        self.shared = SharedDenoiser(backbone.net)
        self.student = role_adapter(self.shared, "student", cfg.student, tc.gradient_checkpointing, backbone.kind.name)
        self.fake = role_adapter(self.shared, "fake", cfg.fake, tc.gradient_checkpointing, backbone.kind.name)
        if tc.parallel == "fsdp2" and accelerator.num_processes > 1:
            from wadi.engine.parallel import shard

            shard(self.shared.net, self._student_params() + list(self.fake.trainable_parameters().values()), tc)
        adamw = optimizer_class(tc)
        kwargs = dict(betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.opt_s = adamw(list(self.student.trainable_parameters().values()), lr=tc.lr_student, **kwargs)
        self.opt_f = adamw(list(self.fake.trainable_parameters().values()), lr=tc.lr_fake, **kwargs)
        factor = lr_lambda(tc.warmup_steps, tc.lr_schedule, tc.steps)
        self.sched_s = torch.optim.lr_scheduler.LambdaLR(self.opt_s, factor)
        self.sched_f = torch.optim.lr_scheduler.LambdaLR(self.opt_f, factor)
        self.opt_s, self.opt_f = accelerator.prepare(self.opt_s, self.opt_f)
        self.ema = None
        if tc.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._student_params(), decay=tc.ema_decay)
        self.prompts = PromptStream(prompts, tc.seed)
        self.embed_cache = self._encode_all(prompts) if cfg.data.cache_embeddings else None
        self.step = 0
        self.nonfinite_streak = 0

    def _student_params(self) -> list[torch.nn.Parameter]:
        return list(self.student.trainable_parameters().values())

    @contextmanager
    def as_role(self, adapter: Adapter | None):
        """The denoiser as `adapter`'s role (None: the teacher) within the block."""
        if adapter is not None and adapter.role is None:  # full fine-tuning: its own model
            yield adapter.model
            return
        with self.shared.use(adapter and adapter.role) as net:
            yield net

    # --- conditioning --------------------------------------------------------------
    def _encode_all(self, prompts: list[str]) -> dict[str, Cond]:
        cache = {}
        for i in range(0, len(prompts), 64):
            chunk = prompts[i:i + 64]
            c = self.bb.encode_prompts(chunk, self.cfg.data.mask_prompts)
            cache.update({p: c[j] for j, p in enumerate(chunk)})
        return cache

    def _cond(self, prompts: list[str]) -> Cond:
        if self.embed_cache is None:
            cond = self.bb.encode_prompts(prompts, self.cfg.data.mask_prompts)
        else:
            cond = Cond.stack([self.embed_cache[p] for p in prompts])
        return cond.to(self.acc.device, self.weight_dtype)

    # --- one iteration ---------------------------------------------------------------
    def _time(self, noise: Noise, low: int, high: int) -> torch.Tensor:
        """Each sample's process time, from an index drawn uniformly in [low, high]."""
        return self.bb.process.time(noise.integers(low, high))

    def _generate(self, cond: Cond, noise: Noise) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's x0 from fresh noise, in float32 (graph kept when grad is on), and the
        images it samples (detached). A student of N steps is trained at one of them per
        sample, drawn uniformly, on the input its own earlier steps make (without gradient);
        its samples are its last step's x0: the fake model learns those alone, for a fake
        model of every step's x0 would score the last step against a blurrier mixture and
        push it past the teacher (docs/method.md)."""
        bb = self.bb
        z = noise.normal(bb.latent_shape)
        stop = (noise.integers(0, bb.student_steps - 1) if bb.student_steps > 1 else
                torch.zeros(len(z), dtype=torch.long, device=z.device))

        def predict(x, t):
            with self.as_role(self.student) as net, self.acc.autocast():
                return bb.predict(net, x.to(self.weight_dtype), t, cond)

        return run_student(bb.process, bb.student_times(self.acc.device), predict, z, stop)

    def _student_loss(self, x0: torch.Tensor, cond: Cond, noise: Noise) -> tuple[torch.Tensor, int]:
        """The VSD loss of x0, and how many elements of its score difference were non-finite."""
        tc, bb = self.cfg.train, self.bb
        t = self._time(noise, tc.t_min, tc.t_max)
        x_t = bb.process.add_noise(x0.detach(), noise.normal(x0.shape[1:]), t).to(self.weight_dtype)
        with torch.no_grad(), self.acc.autocast():
            with self.as_role(None) as net:
                real = bb.guided(net, x_t, t, cond, tc.guidance, **tc.guidance_options)
            with self.as_role(self.fake) as net:
                fake = bb.guided(net, x_t, t, cond, tc.guidance, **tc.guidance_options)
        g = bb.process.score_difference(real, fake, t)
        return vsd_loss(x0, g), int((~torch.isfinite(g)).sum())

    def _fake_loss(self, x0: torch.Tensor, cond: Cond, noise: Noise) -> torch.Tensor:
        """Denoising loss of the fake model on the student's (detached) x0, some prompts empty."""
        tc, bb = self.cfg.train, self.bb
        t = self._time(noise, 0, bb.num_train_timesteps - 1)
        eps = noise.normal(x0.shape[1:])
        x_t = bb.process.add_noise(x0, eps, t).to(self.weight_dtype)
        keep = noise.uniform() >= tc.fake_uncond_prob
        uncond = bb.empty_cond().to(self.acc.device, self.weight_dtype)
        with self.as_role(self.fake) as net, self.acc.autocast():
            pred = bb.predict(net, x_t, t, cond.where(keep, uncond))
        return bb.process.fake_loss(pred, x0, eps, t)

    def _agreed_ok(self, loss: torch.Tensor, nonfinite_fraction: float = 0.0) -> bool:
        """Whether every process's loss is finite (all skip together, or DDP would hang)."""
        ok = bool(torch.isfinite(loss)) and nonfinite_fraction <= MAX_NONFINITE_SCORE_FRACTION
        bad = torch.tensor([0.0 if ok else 1.0], device=self.acc.device)
        return self.acc.reduce(bad, reduction="sum").item() == 0

    def _average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """The processes' mean gradient, after the last micro-batch (what DDP does, for the
        one role's parameters that a backward pass of the shared denoiser reaches)."""
        if self.acc.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(self.acc.num_processes)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def _apply(self, adapter: Adapter, opt, ok: bool) -> float | None:
        """Average over processes, clip and step (or drop the gradients of a skipped update);
        the gradient norm."""
        params = list(adapter.trainable_parameters().values())
        self._average_gradients(params)
        norm = None
        if ok:
            norm = float(self.acc.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
            opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def train_step(self) -> dict:
        """One optimisation step of the student and `fake_steps` of the fake model."""
        tc = self.cfg.train
        ga, per_step = tc.grad_accum, tc.batch_size * self.acc.num_processes
        batches = []
        for micro in range(ga):
            start = (self.step * ga + micro) * per_step + self.acc.process_index * tc.batch_size
            positions = list(range(start, start + tc.batch_size))
            batches.append(Batch(self._cond(self.prompts.take(start, tc.batch_size)),
                                 Noise(tc.seed, positions, self.acc.device)))
        # 1. the student: VSD against the teacher and the current fake model
        loss_s, nonfinite = 0.0, 0
        for b in batches:
            x0, b.x0 = self._generate(b.cond, b.noise)
            loss, bad = self._student_loss(x0, b.cond, b.noise)
            with self.as_role(self.student):  # a checkpointed block recomputes as the student
                self.acc.backward(loss / ga)
            loss_s, nonfinite = loss_s + loss.item() / ga, nonfinite + bad
        numel = sum(b.x0.numel() for b in batches)
        ok_s = self._agreed_ok(torch.tensor(loss_s), nonfinite / numel)
        norm_s = self._apply(self.student, self.opt_s, ok_s)
        # 2. the fake model: first on what the student just made, then on fresh samples
        losses_f, norms_f, skipped = [], [], int(not ok_s)
        for k in range(tc.fake_steps):
            loss_f = 0.0
            for b in batches:
                x0 = b.x0
                if k:
                    with torch.no_grad():
                        x0 = self._generate(b.cond, b.noise)[1]
                loss = self._fake_loss(x0, b.cond, b.noise)
                with self.as_role(self.fake):  # a checkpointed block recomputes as the fake model
                    self.acc.backward(loss / ga)
                loss_f += loss.item() / ga
            ok = self._agreed_ok(torch.tensor(loss_f))
            norms_f.append(self._apply(self.fake, self.opt_f, ok))
            losses_f, skipped = losses_f + [loss_f], skipped + int(not ok)
        log = {"loss_student": loss_s, "loss_fake": sum(losses_f) / len(losses_f), "skipped": skipped,
               "nonfinite_scores": nonfinite, "grad_norm_student": norm_s, "grad_norm_fake": norms_f[-1],
               "lr_student": self.sched_s.get_last_lr()[0], "lr_fake": self.sched_f.get_last_lr()[0]}
        self.sched_s.step()  # the learning rates are functions of the step
        self.sched_f.step()
        if self.ema is not None:
            self.ema.step(self._student_params())
        self.step += 1
        return log

    # --- state -----------------------------------------------------------------------
    def adapter_checksums(self) -> list[list[float]]:
        """Per process: (sum, sum of squares) of the student's and fake's trainable weights.
        Equal rows mean the processes hold the same adapters (DDP kept them in sync)."""
        params = self._student_params() + list(self.fake.trainable_parameters().values())
        local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().pow(2).sum() for p in params)])
        return self.acc.gather(local.to(self.acc.device).unsqueeze(0)).tolist()

    def student_metadata(self) -> dict:
        """What the student's adapter files record: the step and what it samples with (wadi.engine.provenance)."""
        return {"step": self.step, TRAINED_WITH: record_of(self.bb).to_json()}

    def state_pieces(self, checksums: list | None = None) -> list[ckpt.Piece]:
        """Every piece of training state, named once for saving and loading."""
        batch, processes = self.cfg.train.batch_size, self.acc.num_processes

        def loop_state() -> dict:
            return {"step": self.step, "nonfinite_streak": self.nonfinite_streak, "num_processes": processes,
                    "global_batch": batch * processes, "adapter_checksums": checksums}

        def set_loop_state(state: dict) -> None:
            if not all(type(state.get(k)) is int and state[k] >= 0 for k in ("step", "nonfinite_streak")):
                raise ckpt.CorruptFile("step and nonfinite_streak are not counts")
            written, theirs = state["num_processes"], state.get("global_batch")
            if theirs is None and written != processes:  # written before the global batch was recorded
                raise ValueError(f"written by {written} processes, this run has {processes}; resume with the "
                                 "same number")
            if theirs is not None and theirs != batch * processes:
                fits = (f"train.batch_size={theirs // processes}" if theirs % processes == 0 else
                        f"a number of processes that divides {theirs}")
                raise ValueError(f"written with a global batch of {theirs} ({written} processes), this run's is "
                                 f"{batch * processes} ({processes} x train.batch_size {batch}); resume with {fits}")
            self.step, self.nonfinite_streak = state["step"], state["nonfinite_streak"]

        pieces = [ckpt.json_piece("state", loop_state, set_loop_state),
                  ckpt.Piece("student.safetensors", lambda p: self.student.save(p, self.student_metadata()),
                             self.student.load),
                  ckpt.Piece("fake.safetensors", lambda p: self.fake.save(p, {"step": self.step}), self.fake.load),
                  ckpt.stateful("optim-student", self.opt_s), ckpt.stateful("optim-fake", self.opt_f),
                  ckpt.stateful("sched-student", self.sched_s), ckpt.stateful("sched-fake", self.sched_f)]
        if self.ema is not None:
            pieces.append(ckpt.stateful("ema", self.ema))
        return pieces

    def rng_piece(self) -> ckpt.Piece:
        """This process's random generators: nothing the step draws uses them (Noise is a
        function of the sample's position), but a model's dropout would. A process that
        a checkpoint has no file for (more processes now) takes the first process's."""
        def save(path) -> None:
            ckpt.save_state(path, {"cpu": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})

        def load(path) -> None:
            if not path.is_file():
                path = path.with_name(ckpt.rng_file(0))
            if not path.is_file():
                return  # a checkpoint from before generators were saved
            state = ckpt.load_state(path)
            torch.set_rng_state(state["cpu"])
            if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])

        return ckpt.Piece(ckpt.rng_file(self.acc.process_index), save, load)

    # --- outputs ---------------------------------------------------------------------
    @contextmanager
    def final_weights(self):
        """Within the block the student holds its final weights: the EMA when there is one."""
        if self.ema is None:
            yield
            return
        params = self._student_params()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def merged_student(self, adapter_file) -> torch.nn.Module:
        """The student (its saved `adapter_file`) merged into a plain model of the base
        architecture. A sharded base is not whole on any process: the base is read again."""
        from wadi.engine.parallel import is_sharded

        if not is_sharded(self.shared.net):
            return self.student.merged_model()
        from wadi.models.backbones import load_base_denoiser

        student = attach(load_base_denoiser(self.cfg.model, self.weight_dtype), self.student.config,
                         self.bb.kind.name)
        for p in student.trainable_parameters().values():
            p.data = p.data.float()
        student.load(adapter_file)
        return student.merged_model()

    def samples(self) -> torch.Tensor:
        """One-step images of the sample prompts x seeds (the final weights)."""
        prompts = [p for p in self.cfg.data.sample_prompts for _ in self.cfg.run.sample_seeds]
        seeds = [s for _ in self.cfg.data.sample_prompts for s in self.cfg.run.sample_seeds]
        with self.as_role(self.student) as net:
            net.eval()
            with self.final_weights():
                images = sample_student(self.bb, net, prompts, seeds)
            net.train()
        return images

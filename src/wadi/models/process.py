"""The noise process: the one owner of how images become noise and back (docs/method.md).

Both processes write x_t = alpha_t x0 + sigma_t eps. A `Process` knows:
- its time: what the network and the stock schedulers call a timestep. Training draws an
  *index* i in 0..N-1 (`train.t_min`, `train.t_max` are indices) and `time(i)` turns it
  into process time: the index itself for VP, the shifted sigma times N for flow, exactly
  as the model's own training scheduler lists its timesteps;
- the prediction the engine works in (VP: eps, converted from v when the net predicts v;
  flow: the velocity v = eps - x0), and from it x0 and the VSD score difference;
- the student's generator: one step at the last time (x0 from the student's prediction at
  fresh noise), or N steps, each from the previous step's x0 re-noised to the next time
  the way the exported stock scheduler steps (DDIM with eta 0, flow-matching Euler);
- the fake model's denoising loss, the teacher's training target;
- the stock diffusers schedulers: the multi-step samplers of a teacher and the one that
  makes one step of a stock pipeline the student's one step (exports).

Nothing else reads `alphas_cumprod` or picks a scheduler class.
"""

from __future__ import annotations

import inspect
import math

import torch

# abar_T of the VP one-step generator in the authors' training and inference scripts, for
# every backbone (docs/method.md). Stable Diffusion's own abar_999 is 0.00466; PixArt-alpha's
# linear schedule ends at 4.0e-5, a different generator that their students are not.
AUTHORS_ONE_STEP_ABAR = 0.0047
SCHEDULER = "scheduler"  # one_step_abar: the scheduler's own abar at T-1

# Scheduler classes whose config describes a rectified flow (SD3, FLUX, Qwen-Image, Z-Image).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Scheduler classes whose config describes the DDPM schedule (beta_* and num_train_timesteps);
# DPM-Solver also samples flows (Sana: flow_prediction / use_flow_sigmas). EDM's and others'
# configs describe other processes and are refused.
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "UniPCMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # what DDPMScheduler builds


def _view(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 1, 1)


class _Samplers:
    """What both processes say about their stock samplers."""

    name: str
    samplers: tuple[str, ...]
    default_sampler: str

    def sampler_name(self, name: str | None) -> str:
        """`name`, or this process's default sampler; a sampler of another process refused."""
        name = name or self.default_sampler
        if name not in self.samplers:
            raise ValueError(f"scheduler {name!r} does not sample a {self.name} model; "
                             f"choose one of {', '.join(self.samplers)}")
        return name


class VP(_Samplers):
    """The variance-preserving (DDPM) process of SD 1.5 / 2.1 / PixArt-alpha:
    abar_t from the schedule, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); the net
    predicts eps or v = alpha eps - sigma x0; the engine works in eps."""

    name = "vp"
    samplers = ("ddim", "dpm", "euler")
    default_sampler = "ddim"

    def __init__(self, scheduler_config: dict, one_step_abar: float | str | None = None):
        from diffusers import DDPMScheduler

        _check_vp(scheduler_config)
        ddpm = DDPMScheduler.from_config(scheduler_config)
        self.config = dict(ddpm.config)
        self.prediction_type = self.config["prediction_type"]
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported; "
                             "use an epsilon or v_prediction checkpoint")
        self.num_train_timesteps = self.config["num_train_timesteps"]
        self.alphas_cumprod = ddpm.alphas_cumprod.float()
        last = float(self.alphas_cumprod[-1])
        self.one_step_abar = (last if one_step_abar == SCHEDULER else
                              AUTHORS_ONE_STEP_ABAR if one_step_abar is None else float(one_step_abar))

    # --- time -------------------------------------------------------------------------
    def time(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def time_tensor(self, value, n: int, device) -> torch.Tensor:
        """A batch of one process time (a sampler's timestep) as the net takes it."""
        return torch.full((n,), int(value), device=device, dtype=torch.long)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t shaped (B, 1, 1, 1)."""
        abar = _view(self.alphas_cumprod.to(t.device)[t])
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.coefficients(t)
        return alpha * x0 + sigma * eps

    # --- predictions --------------------------------------------------------------------
    def to_work(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps from the net's output (v = alpha eps - sigma x0  =>  eps = sigma x_t + alpha v)."""
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = self.coefficients(t)
        return sigma.to(out.dtype) * x_t + alpha.to(out.dtype) * out

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the net is trained to output at x_t (a teacher's loss)."""
        if self.prediction_type == "epsilon":
            return eps
        alpha, sigma = self.coefficients(t)
        return alpha * eps - sigma * x0

    def score_difference(self, real: torch.Tensor, fake: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """g = sigma_t^2 (eps_real - eps_fake) in float32: the VSD gradient of x0, up to 1/N."""
        sigma = self.coefficients(t)[1]
        return sigma.float() ** 2 * (real.float() - fake.float())

    def fake_loss(self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The authors' fake score loss: mean((alpha_t eps_phi(x_t) - alpha_t eps)^2)."""
        alpha = self.coefficients(t)[0].float()
        return ((alpha * pred.float() - alpha * eps.float()) ** 2).mean()

    # --- the one-step generator ---------------------------------------------------------
    def generate(self, pred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x0 = (z - sigma_T eps) / alpha_T with abar_T = one_step_abar, in float32."""
        abar = torch.tensor(self.one_step_abar, dtype=torch.float32, device=z.device)
        return (z.float() - (1 - abar).sqrt() * pred.float()) / abar.sqrt()

    def recorded_abar(self) -> float:
        return self.one_step_abar

    def denoise(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sigma_t eps) / alpha_t in float32, at a student step after the first."""
        alpha, sigma = self.coefficients(t)
        return (x.float() - sigma * pred.float()) / alpha

    def renoise(self, x0: torch.Tensor, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                t_next: torch.Tensor) -> torch.Tensor:
        """DDIM's deterministic step to t_next: alpha_next x0 + sigma_next eps_predicted."""
        alpha, sigma = self.coefficients(t_next)
        return alpha * x0 + sigma * pred.float()

    # --- stock schedulers ---------------------------------------------------------------
    def sampler(self, name: str | None):
        """A multi-step diffusers scheduler on this schedule, fed eps."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
        name = self.sampler_name(name)
        return classes[name].from_config(self.config, prediction_type="epsilon")

    def student_scheduler(self, steps: int = 1, sigmas: bool = False):
        """The stock scheduler whose `steps`-step sampling is the student's (DDIM is the same
        object for every number of steps: trailing spacing puts N steps at T-1, T-1-T/N, ...)."""
        return self.one_step_scheduler()

    def set_timesteps(self, scheduler, steps: int, sigmas=None, device=None) -> None:
        scheduler.set_timesteps(steps, device=device)

    def one_step_scheduler(self):
        """The stock scheduler that makes one pipeline step the one-step student's sampling.

        DDIM with "trailing" spacing puts its only timestep at T-1, and with
        `set_alpha_to_one` the step to the final alpha (1) returns
        x0 = (x - sqrt(1 - abar_T) eps) / sqrt(abar_T) and adds nothing (eta = 0). Its
        cumulative alpha at T-1 must be the generator's abar_T, which is not the schedule's
        own: the last beta is set (a stock `trained_betas` setting) so that the float32
        product of the alphas lands exactly on abar_T; every earlier timestep keeps its value.
        """
        import numpy as np
        from diffusers import DDIMScheduler

        options = dict(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
                       steps_offset=1)
        plain = DDIMScheduler.from_config(self.config, **options)
        target = torch.tensor(self.one_step_abar, dtype=torch.float32)
        if plain.alphas_cumprod[-1] == target:
            return plain
        betas = plain.betas.clone()
        before = plain.alphas_cumprod[-2]
        beta = np.float32(1 - self.one_step_abar / float(before))
        for _ in range(64):  # a few float32 neighbours of the exact value
            betas[-1] = float(beta)
            last = before * (1 - betas[-1])
            if last == target:
                return DDIMScheduler.from_config(self.config, trained_betas=betas.tolist(), **options)
            beta = np.nextafter(beta, np.float32(np.inf) if last > target else np.float32(-np.inf))
        raise ValueError(f"no float32 beta gives abar_T = {self.one_step_abar} after {float(before)}")


class Flow(_Samplers):
    """Rectified flow (SD3 / SD3.5, Sana, FLUX): x_t = (1 - s) x0 + s eps with s in [0, 1]
    shifted as s' = shift s / (1 + (shift - 1) s); the net predicts the velocity
    v = eps - x0 at time s N and the engine works in v. x0 = x_t - s v, eps = x_t + (1 - s) v."""

    name = "flow"
    samplers = ("euler", "dpm")
    default_sampler = "euler"

    def __init__(self, scheduler_config: dict, one_step_abar: float | str | None = None,
                 image_tokens: int | None = None):
        if one_step_abar is not None:
            raise ValueError(f"model.one_step_abar={one_step_abar!r} is a setting of VP (DDPM) models; this model is "
                             "a rectified flow, whose one-step generator x0 = z - v(z, 1) has no such constant")
        self.config = dict(scheduler_config)
        self.num_train_timesteps = _count(self.config.get("num_train_timesteps", 1000))
        self.dynamic = bool(self.config.get("use_dynamic_shifting"))
        self.mu = None
        if self.dynamic:
            # FLUX, Qwen-Image: the shift grows with the image's token count; at one resolution
            # it is the fixed shift exp(mu) (exponential time shift) or mu (linear), the same
            # formula as a fixed shift (docs/method.md).
            if image_tokens is None:
                raise ValueError("this scheduler shifts its times by the image size (use_dynamic_shifting), which the "
                                 "model's kind does not declare; give a scheduler with a fixed shift")
            self.mu = _dynamic_mu(self.config, image_tokens)
            self.shift = math.exp(self.mu) if self.config.get("time_shift_type", "exponential") == "exponential" \
                else self.mu
        else:
            shift = self.config.get("shift")
            self.shift = _positive(self.config.get("flow_shift", 1.0) if shift is None else shift, "shift")
        terminal = self.config.get("shift_terminal")
        if terminal is not None and not (_finite(terminal) and 0 < terminal < 1):
            raise ValueError(f"scheduler setting shift_terminal={terminal!r} must be a number in (0, 1)")

    # --- time -------------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def time(self, index: torch.Tensor) -> torch.Tensor:
        """sigma N of the training scheduler's index-th timestep: s = shift((i + 1) / N)."""
        u = (index.float() + 1) / self.num_train_timesteps
        return self.shift * u / (1 + (self.shift - 1) * u) * self.num_train_timesteps

    def time_tensor(self, value, n: int, device) -> torch.Tensor:
        return torch.full((n,), float(value), device=device, dtype=torch.float32)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = _view(self.sigma(t))
        return 1 - s, s

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _view(self.sigma(t))
        return (1 - s) * x0 + s * eps

    # --- predictions --------------------------------------------------------------------
    def to_work(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0

    def score_difference(self, real: torch.Tensor, fake: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """g = sigma_t^2 (eps_real - eps_fake) as on VP; eps = x_t + (1 - s) v makes it
        s^2 (1 - s) (v_real - v_fake), in float32."""
        s = _view(self.sigma(t))
        return s ** 2 * (1 - s) * (real.float() - fake.float())

    def fake_loss(self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow-matching loss on the student's samples: mean((v_phi(x_t) - (eps - x0))^2)."""
        return ((pred.float() - (eps.float() - x0.float())) ** 2).mean()

    # --- the one-step generator ---------------------------------------------------------
    def generate(self, pred: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x0 = z - v(z, s = 1), in float32."""
        return z.float() - pred.float()

    def recorded_abar(self) -> None:
        return None

    def denoise(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - s v in float32."""
        return x.float() - _view(self.sigma(t)) * pred.float()

    def renoise(self, x0: torch.Tensor, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                t_next: torch.Tensor) -> torch.Tensor:
        """The Euler step to t_next, x + (s_next - s) v: the same point as (1 - s_next) x0 +
        s_next eps_predicted, in the stock scheduler's arithmetic."""
        return x.float() + _view(self.sigma(t_next) - self.sigma(t)) * pred.float()

    # --- stock schedulers ---------------------------------------------------------------
    def _euler(self, **options):
        """Flow-matching Euler on this flow: a fixed shift, or the resolution-dependent one
        (which a pipeline completes with mu); never the terminal stretch of a teacher's
        config, which the student's schedules set for themselves."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not self.dynamic:
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift,
                                                   **options)
        keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, use_dynamic_shifting=True,
                                               **{k: self.config[k] for k in keys if k in self.config}, **options)

    def sampler(self, name: str | None):
        """A multi-step diffusers scheduler of this flow, fed the velocity."""
        from diffusers import DPMSolverMultistepScheduler

        if self.sampler_name(name) == "euler":
            return self._euler()
        if self.dynamic:
            raise ValueError("scheduler 'dpm' does not take this model's resolution-dependent shift; use 'euler'")
        return DPMSolverMultistepScheduler(num_train_timesteps=self.num_train_timesteps, prediction_type="flow_prediction",
                                           use_flow_sigmas=True, flow_shift=self.shift)

    def student_scheduler(self, steps: int = 1, sigmas: bool = False):
        """Flow-matching Euler. One step goes from s = 1 to 0, x0 = z + (0 - 1) v. For N
        steps of a pipeline that passes its own sigmas (`sigmas`: FLUX, Qwen-Image, Z-Image
        pass 1 .. 1/N evenly before the shift) that is all; for a pipeline that passes none
        (SD3, Sana) its times are spread evenly before the shift and its last time stretched
        to shift(1 / N) (`shift_terminal`), so that no step is spent near s = 0 as its
        default spacing (down to s = 0.001) would."""
        if steps == 1 or sigmas:
            return self._euler()
        u = 1 / steps
        return self._euler(shift_terminal=self.shift * u / (1 + (self.shift - 1) * u))

    def one_step_scheduler(self):
        return self.student_scheduler(1)

    def set_timesteps(self, scheduler, steps: int, sigmas=None, device=None) -> None:
        """The scheduler's timesteps for `steps` steps as a pipeline sets them: the kind's
        `sigmas(steps)` where its pipeline passes some, and mu where the shift is dynamic."""
        kwargs = {"mu": self.mu} if self.dynamic else {}
        if sigmas is not None and "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
            scheduler.set_timesteps(sigmas=sigmas(steps), device=device, **kwargs)
        else:
            scheduler.set_timesteps(steps, device=device, **kwargs)


Process = VP | Flow


def student_times(process: Process, steps: int, sigmas=None) -> list:
    """The process times of an N-step student: those of its stock scheduler at N steps as the
    pipeline sets them (`sigmas`: the kind's, where its pipeline passes some); VP: 999, 749,
    499, 249 for four; one step: T-1. So export and sampler agree."""
    sched = process.student_scheduler(steps, sigmas is not None)
    process.set_timesteps(sched, steps, sigmas)
    return [t.item() for t in sched.timesteps]


def run_student(process: Process, times: list[torch.Tensor], predict, z: torch.Tensor,
                stop: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x0 of the student's sampling from noise z, in float32: at each time its prediction
    `predict(x, t)`, x0 from it (the generator's formula at the first time), re-noised to the
    next time as the stock scheduler steps.

    With `stop` (a step index per sample: the backward simulation of training several steps),
    a pair: each sample's x0 at its stop step, the only step run with gradient for it, and
    the last step's x0 of every sample without gradient, the images the student samples
    (what the fake model learns)."""
    n, last = len(z), len(times) - 1
    stops = torch.full((n,), last, device=z.device) if stop is None else stop
    x, out = z, None
    for k, t in enumerate(times):
        t = t.expand(n)
        here = stops == k
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(here.any())):
            pred = predict(x, t)
            x0 = process.generate(pred, x) if k == 0 else process.denoise(pred, x, t)
        out = x0 if out is None else torch.where(_view(here), x0, out)
        if k < last:
            with torch.no_grad():
                x = process.renoise(x0.detach(), pred.detach(), x, t, times[k + 1].expand(n))
    return out if stop is None else (out, x0.detach())


def process_of(scheduler_config: dict, one_step_abar: float | str | None = None,
               image_tokens: int | None = None) -> Process:
    """The process a diffusers scheduler config describes: a flow-matching scheduler (or one
    set to flow prediction, as Sana's DPM-Solver) is a rectified flow, a DDPM-family one VP;
    any other class is refused. `image_tokens` completes a resolution-dependent shift."""
    if not isinstance(scheduler_config, dict):
        raise ValueError(f"the scheduler config is a JSON {type(scheduler_config).__name__}, not an object")
    cls = scheduler_config.get("_class_name", "")
    flow = (cls in FLOW_SCHEDULERS or scheduler_config.get("prediction_type") == "flow_prediction"
            or scheduler_config.get("use_flow_sigmas", False))
    if flow:
        return Flow(scheduler_config, one_step_abar, image_tokens)
    ddpm_shaped = not cls and any(k in scheduler_config for k in ("beta_schedule", "beta_start", "trained_betas"))
    if cls not in VP_SCHEDULERS and not ddpm_shaped:  # a config made in code has no class name
        raise ValueError(f"scheduler class {cls or '(none)'!r} is not a noise process wadi knows; supported: "
                         f"{', '.join(FLOW_SCHEDULERS)} (rectified flow) and {', '.join(VP_SCHEDULERS)} (DDPM)")
    return VP(scheduler_config, one_step_abar)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value, name: str) -> float:
    if not (_finite(value) and value > 0):
        raise ValueError(f"scheduler setting {name}={value!r} must be a positive finite number")
    return float(value)


def _count(value) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
        raise ValueError(f"scheduler setting num_train_timesteps={value!r} must be an integer of at least 2")
    return value


def _check_vp(config: dict) -> None:
    """The DDPM settings that can be, before diffusers builds (or fails to build) the schedule."""
    _count(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return
    schedule = config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"scheduler setting beta_schedule={schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if not (_finite(start) and _finite(end) and 0 < start <= end < 1):
        raise ValueError(f"scheduler settings beta_start={start!r}, beta_end={end!r} must satisfy "
                         "0 < beta_start <= beta_end < 1")


def _dynamic_mu(config: dict, image_tokens: int) -> float:
    """mu of a resolution-dependent shift at `image_tokens`, as the FLUX-family pipelines
    compute it (diffusers' calculate_shift: linear in the token count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    kind = config.get("time_shift_type", "exponential")
    if not (all(_finite(v) for v in (base, top, low, high)) and 0 < base < top) or kind not in ("exponential", "linear"):
        raise ValueError(f"the scheduler's dynamic shift settings (base_image_seq_len={base!r}, max_image_seq_len="
                         f"{top!r}, base_shift={low!r}, max_shift={high!r}, time_shift_type={kind!r}) cannot be")
    mu = calculate_shift(image_tokens, base, top, low, high)
    if kind == "linear" and mu <= 0:
        raise ValueError(f"the scheduler's linear dynamic shift is {mu:.3g} at {image_tokens} image tokens; it must "
                         "be positive")
    return mu

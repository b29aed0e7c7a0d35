"""What the tests of a kind module check it with against its stock pipeline: a stand-in
for the backbone built from the pipeline's components, and the kind's sampling as an
Euler loop over its own functions."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def backbone_of(kind, pipe, path, resolution=16, max_length=24):
    """What a kind's functions read of a backbone, from a pipeline loaded from `path`."""
    bb = SimpleNamespace(text={"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}, net=pipe.transformer,
                         vae=pipe.vae, vae_scale=pipe.vae_scale_factor, resolution=resolution, max_length=max_length,
                         spec=SimpleNamespace(path=str(path)))
    bb.empty_cond = lambda: kind.encode(bb, [""], False)
    return bb


def euler(kind, pipe, bb, prompts, seeds, steps, scale, mu=None, **options):
    """Images in [0, 1] and the timesteps of the kind's sampling: noise per seed as the
    engine draws it, the pipeline's scheduler over the kind's sigmas (and shift `mu`),
    Euler steps on the kind's guided velocity, the kind's decode."""
    noise = torch.stack([torch.randn(kind.noise_shape(bb), generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=kind.sigmas(steps), mu=mu)
    with torch.no_grad():
        cond = kind.encode(bb, prompts, False)
        x = noise
        for i, t in enumerate(scheduler.timesteps):
            v = kind.guide(bb, bb.net, x, t.expand(len(x)), cond, scale, **options)
            x = x + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * v
        return (kind.decode(bb, x) / 2 + 0.5).clamp(0, 1), scheduler.timesteps

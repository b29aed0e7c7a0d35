"""The flux kind against the stock FluxPipeline on tiny dev-like and schnell-like pipelines:
its encoding is encode_prompt's, and an Euler loop over its call, noise shape and decoding
at the pipeline's own timesteps gives the pipeline's images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from tiny_pipes_flux import MAX_LENGTH, save_tiny_flux

from wadi.models.kinds import flux

RESOLUTION = 16
PROMPTS = ["a photo of a cat", "red car on the table"]


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def pipe(request, tmp_path_factory):
    folder = save_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe", guidance=request.param)
    return FluxPipeline.from_pretrained(folder)


def _backbone(pipe: FluxPipeline) -> SimpleNamespace:
    """What the kind's functions read of a backbone, from the loaded pipeline's parts."""
    scale = pipe.vae_scale_factor
    return SimpleNamespace(net=pipe.transformer, vae=pipe.vae, max_length=MAX_LENGTH, vae_scale=scale,
                           latent_size=RESOLUTION // scale, resolution=RESOLUTION,
                           text={"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
                                 "text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2})


def test_encode_is_encode_prompt(pipe):
    backbone = _backbone(pipe)
    cond = flux.encode(backbone, PROMPTS, False)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_LENGTH)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.extra["pooled"], pooled) and cond.mask is None
    assert not torch.allclose(pooled[0], pooled[1])  # read at each prompt's end-of-text token
    assert text_ids.shape == (MAX_LENGTH, 3) and not text_ids.any()  # what call builds from the states' length
    if pipe.transformer.config.guidance_embeds:
        assert cond.extra["guidance"].tolist() == [flux.GUIDANCE] * len(PROMPTS)
    else:
        assert "guidance" not in cond.extra


@pytest.mark.parametrize("steps", [1, 4])
def test_euler_loop_reproduces_pipeline(pipe, steps):
    """The engine's layout end to end: noise drawn per image in noise_shape from one seeded
    generator each, the velocity from `call` (packing inside), Euler steps at the timesteps the
    pipeline sets (its sigmas and the shift of image_tokens), `decode`."""
    backbone = _backbone(pipe)
    seeds, guidance = [3, 7], 2.5
    args = {**flux.pipeline_call(backbone, steps), "guidance_scale": guidance}
    if not pipe.transformer.config.guidance_embeds:
        args["guidance_scale"] = 0.0
    expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                    **args).images

    cfg = pipe.scheduler.config
    mu = calculate_shift(flux.image_tokens(backbone), cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)
    pipe.scheduler.set_timesteps(sigmas=flux.sigmas(steps), mu=mu)
    sigmas = pipe.scheduler.sigmas
    x = torch.stack([torch.randn(flux.noise_shape(backbone), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    cond = flux.encode(backbone, PROMPTS, False)
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            t = t.expand(len(x))
            v = (flux.guide(backbone, backbone.net, x, t, cond, guidance) if "guidance" in cond.extra
                 else flux.call(backbone, backbone.net, x, t, cond))
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        images = (flux.decode(backbone, x) / 2 + 0.5).clamp(0, 1)
    assert images.shape == expected.shape == (2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_pipeline_call_names_the_guidance(pipe):
    backbone = _backbone(pipe)
    args = flux.pipeline_call(backbone, 4)
    assert args == {"num_inference_steps": 4, "height": RESOLUTION, "width": RESOLUTION,
                    "max_sequence_length": MAX_LENGTH,
                    "guidance_scale": flux.GUIDANCE if pipe.transformer.config.guidance_embeds else 0.0}


def test_schnell_refuses_guidance(pipe):
    backbone = _backbone(pipe)
    cond = flux.encode(backbone, PROMPTS[:1], False)
    x, t = torch.randn(1, *flux.noise_shape(backbone)), torch.tensor([1000.0])
    if pipe.transformer.config.guidance_embeds:
        # the guidance input changes the prediction: it is read
        assert not torch.allclose(flux.guide(backbone, backbone.net, x, t, cond, 1.0),
                                  flux.guide(backbone, backbone.net, x, t, cond, 4.0))
    else:
        with pytest.raises(ValueError, match="no guidance input"):
            flux.guide(backbone, backbone.net, x, t, cond, 3.5)

"""The flux2-klein kind against the stock Flux2KleinPipeline on a tiny pipeline loaded by
path: its encoding is the pipeline's, an Euler loop over the kind's functions reproduces
the pipeline's images with and without guidance, and a distilled klein takes none."""

from __future__ import annotations

import pytest
import torch
from kind_loop import backbone_of, euler
from tiny_pipes_flux2_klein import save_tiny_flux2_klein

from wadi.models.kinds import flux2_klein

PROMPTS = ["a photo of a cat", "the red car on the table"]
SEEDS = [3, 7]


def _load(folder):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _load(save_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "base"))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return _load(save_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "distilled", is_distilled=True))


def test_encode_is_the_pipelines(base):
    pipe, folder = base
    bb = backbone_of(flux2_klein, pipe, folder)
    with torch.no_grad():
        cond = flux2_klein.encode(bb, PROMPTS, False)
        theirs, _ = pipe.encode_prompt(list(PROMPTS), max_sequence_length=24)
    assert cond.mask is None and cond.embeds.shape == (2, 24, 24)
    torch.testing.assert_close(cond.embeds, theirs, rtol=0, atol=0)  # the same computation


def klein_loop(pipe, bb, steps, scale):
    return euler(flux2_klein, pipe, bb, PROMPTS, SEEDS, steps, scale, mu=flux2_klein.mu(bb, steps))


@pytest.mark.parametrize("steps,scale", [(1, 1.0), (4, 1.0), (1, 4.0), (4, 4.0)])
def test_euler_loop_reproduces_the_pipeline(base, steps, scale):
    pipe, folder = base
    bb = backbone_of(flux2_klein, pipe, folder)
    ours, timesteps = klein_loop(pipe, bb, steps, scale)
    theirs = pipe(prompt=list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                  **{**flux2_klein.pipeline_call(bb, steps), "guidance_scale": scale}).images
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    assert theirs.shape == (2, 3, 16, 16) and theirs.std() > 0.01
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_guidance_and_the_statistics_matter(base):
    """Guidance and the batch-norm statistics change the image, so the test above tells
    a loop without them from the pipeline."""
    pipe, folder = base
    bb = backbone_of(flux2_klein, pipe, folder)
    plain, _ = klein_loop(pipe, bb, 4, 1.0)
    assert (klein_loop(pipe, bb, 4, 4.0)[0] - plain).abs().max() > 1e-3
    x = torch.randn(1, *flux2_klein.noise_shape(bb))
    with torch.no_grad():
        unnormalised = pipe.vae.decode(pipe._unpatchify_latents(x)).sample.clamp(-1, 1)
        assert (flux2_klein.decode(bb, x) - unnormalised).abs().max() > 1e-3


def test_shapes_and_shift(base):
    pipe, folder = base
    bb = backbone_of(flux2_klein, pipe, folder)
    assert flux2_klein.noise_shape(bb) == (16, 4, 4) and flux2_klein.image_tokens(bb) == 16
    assert flux2_klein.sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    # The empirical shift depends on the steps as well as the tokens.
    assert flux2_klein.mu(bb, 1) != flux2_klein.mu(bb, 4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        flux2_klein.noise_shape(backbone_of(flux2_klein, pipe, folder, resolution=18))


def test_a_distilled_klein_takes_no_guidance(distilled):
    pipe, folder = distilled
    bb = backbone_of(flux2_klein, pipe, folder)
    assert flux2_klein.is_distilled(bb)
    x, t = torch.randn(1, *flux2_klein.noise_shape(bb)), torch.tensor([500.0])
    with torch.no_grad():
        cond = flux2_klein.encode(bb, PROMPTS[:1], False)
        flux2_klein.guide(bb, bb.net, x, t, cond, 1.0)
    with pytest.raises(ValueError, match="step-distilled FLUX.2 klein"):
        flux2_klein.guide(bb, bb.net, x, t, cond, 4.0)
    # Its pipeline ignores guidance too: the student's call arguments sample it as the loop does.
    ours, _ = klein_loop(pipe, bb, 4, 1.0)
    theirs = pipe(prompt=list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                  **{**flux2_klein.pipeline_call(bb, 4), "guidance_scale": 4.0}).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

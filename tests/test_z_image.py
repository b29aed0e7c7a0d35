"""The z-image kind against the stock ZImagePipeline on a tiny pipeline loaded by path:
its encoding is the pipeline's, and an Euler loop over the kind's functions reproduces the
pipeline's images, with and without guidance and its options."""

from __future__ import annotations

import pytest
import torch
from kind_loop import backbone_of, euler
from tiny_pipes_z_image import save_tiny_z_image

from wadi.models.kinds import z_image

PROMPTS = ["a photo of a cat", "the red car on the table"]
SEEDS = [3, 7]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers import ZImagePipeline

    folder = save_tiny_z_image(tmp_path_factory.mktemp("z_image") / "pipe")
    pipe = ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.path = folder
    return pipe


def test_encode_is_the_pipelines(pipe):
    bb = backbone_of(z_image, pipe, pipe.path)
    with torch.no_grad():
        cond = z_image.encode(bb, PROMPTS, False)
        theirs, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=24)
    ours = z_image._captions(cond)
    assert [len(c) for c in ours] == [len(c) for c in theirs] and len(ours[0]) != len(ours[1])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation


def z_loop(pipe, bb, steps, scale, **options):
    return euler(z_image, pipe, bb, PROMPTS, SEEDS, steps, scale, **options)


@pytest.mark.parametrize("steps,scale,options", [
    (1, 1.0, {}), (4, 1.0, {}), (1, 3.0, {}), (4, 3.0, {}),
    (4, 4.0, {"cfg_normalization": 1.0}),  # the cap binds: guided norms exceed the conditional ones
    (4, 3.0, {"cfg_truncation": 0.2}),  # the last two steps (net times 0.25, 0.5) unguided
])
def test_euler_loop_reproduces_the_pipeline(pipe, steps, scale, options):
    bb = backbone_of(z_image, pipe, pipe.path)
    ours, timesteps = z_loop(pipe, bb, steps, scale, **options)
    call = z_image.pipeline_call(bb, steps) if scale == 1 else {
        **z_image.pipeline_call(bb, steps), "guidance_scale": z_image.pipeline_guidance(scale), **options}
    theirs = pipe(prompt=list(PROMPTS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                  output_type="pt", **call).images
    torch.testing.assert_close(timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    assert theirs.shape == (2, 3, 16, 16) and theirs.std() > 0.01
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_guidance_options_change_the_image(pipe):
    """The options are not no-ops on this pipeline, so the tests above tell them apart."""
    bb = backbone_of(z_image, pipe, pipe.path)
    plain, _ = z_loop(pipe, bb, 4, 4.0)
    for options in ({"cfg_normalization": 1.0}, {"cfg_truncation": 0.2}):
        assert (z_loop(pipe, bb, 4, 4.0, **options)[0] - plain).abs().max() > 1e-3


def test_schedule_is_a_static_shift_of_three(pipe):
    bb = backbone_of(z_image, pipe, pipe.path)
    assert z_image.image_tokens(bb) == 16 and z_image.noise_shape(bb) == (16, 8, 8)
    s = torch.tensor(z_image.sigmas(4))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=z_image.sigmas(4))
    torch.testing.assert_close(scheduler.sigmas[:-1], 3 * s / (1 + 2 * s))


def test_a_size_the_patches_cannot_take_is_refused(pipe):
    with pytest.raises(ValueError, match="not a multiple of 4"):
        z_image.noise_shape(backbone_of(z_image, pipe, pipe.path, resolution=18))

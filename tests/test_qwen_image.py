"""The qwen-image kind against diffusers' QwenImagePipeline on a tiny pipeline loaded by
path: its conditioning is the pipeline's encode_prompt, and a sampling loop of the kind's
functions (call, guide, noise shape, decode) on the pipeline's own timesteps is the
pipeline's images, with and without true CFG."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from tiny_pipes_qwen import RESOLUTION, save_tiny_qwen

from wadi.models.backbones import BackboneSpec
from wadi.models.kinds import qwen_image
from wadi.models.sampling import seeded_noise

PROMPTS = ["a cat", "a red car on the table"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_qwen(tmp_path_factory.mktemp("qwen") / "pipe")


@pytest.fixture(scope="module")
def bb(base):
    return BackboneSpec(path=str(base), resolution=RESOLUTION).load()


@pytest.fixture(scope="module")
def pipe(base):
    pipe = QwenImagePipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_folder_is_read_as_qwen_image(bb):
    assert bb.kind.name == "qwen-image" and bb.max_length == 512
    assert bb.latent_shape == (4, 8, 8) and bb.kind.image_tokens(bb) == 16
    assert bb.process.dynamic  # the shift at 16 image tokens


def test_conditioning_is_the_pipelines_encode_prompt(bb, pipe):
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=bb.max_length)
    n = embeds.shape[1]
    assert cond.embeds.shape == (2, bb.max_length, 16) and cond.mask.shape == (2, bb.max_length)
    # The same encoder run on the same tokens: equal; past the batch's longest prompt, zeros under mask 0.
    assert torch.equal(cond.embeds[:, :n], embeds) and torch.equal(cond.mask[:, :n], mask)
    assert not cond.embeds[:, n:].any() and not cond.mask[:, n:].any()
    # The template's system part is dropped: "a cat" keeps its own 2 tokens and the template's last 5.
    assert cond.mask.sum(1).tolist() == [7, 11]


def test_a_short_max_length_truncates_as_the_pipeline_does(base, pipe):
    short = BackboneSpec(path=str(base), resolution=RESOLUTION, max_length=5).load()
    cond = short.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=5)
    assert mask is None  # both prompts fill the five tokens: the pipeline passes no mask
    assert torch.equal(cond.embeds, embeds) and cond.mask.all()


def test_packing_is_the_pipelines(bb):
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(qwen_image.pack(x), QwenImagePipeline._pack_latents(x, 2, 4, 8, 8), rtol=0, atol=0)
    assert torch.equal(qwen_image.unpack(qwen_image.pack(x), 8, 8), x)


def _pipeline_timesteps(bb, pipe, steps):
    """The pipeline's own schedule: its scheduler set with its sigmas and its mu."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    c = sched.config
    mu = calculate_shift(bb.kind.image_tokens(bb), c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    sched.set_timesteps(sigmas=qwen_image.sigmas(steps), mu=mu)
    return sched


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_an_euler_loop_of_the_kinds_functions_is_the_pipeline(bb, pipe, scale):
    steps = 4
    sched = _pipeline_timesteps(bb, pipe, steps)
    assert sched.sigmas[-2].item() == pytest.approx(0.02)  # the teacher's terminal stretch is in play
    cond = bb.encode_prompts(PROMPTS)
    x = seeded_noise(bb.latent_shape, SEEDS, "cpu")
    with torch.no_grad():
        for t in sched.timesteps:
            v = bb.guided(bb.net, x, t.expand(len(x)), cond, scale)
            x = sched.step(v, t, x).prev_sample
        ours = bb.decode(x) / 2 + 0.5
    negative = {"negative_prompt": [""] * 2} if scale > 1 else {}
    stock = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], num_inference_steps=steps,
                 true_cfg_scale=scale, height=RESOLUTION, width=RESOLUTION, max_sequence_length=bb.max_length,
                 output_type="pt", **negative).images
    assert (ours - stock).abs().max() < 1e-5
    if scale > 1:  # true CFG changed the images (the rescale included)
        plain = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                     num_inference_steps=steps, true_cfg_scale=1.0, height=RESOLUTION, width=RESOLUTION,
                     output_type="pt").images
        assert (plain - stock).abs().max() > 1e-3


def test_guidance_is_the_pipelines_rescaled_combination(bb):
    """The norm rescale against its formula written on the unpacked layout: per 2x2 patch,
    over all channels."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, *bb.latent_shape, generator=g), torch.tensor([700.0, 300.0])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        got = bb.guided(bb.net, x, t, cond, 2.5)
        pos = bb.predict(bb.net, x, t, cond)
        neg = bb.predict(bb.net, x, t, bb.empty_cond().expand(2))
    comb = neg + 2.5 * (pos - neg)

    def patches(v):  # (B, C, 4, 2, 4, 2): each 2x2 patch's values over dims 1, 3, 5
        return v.unflatten(2, (4, 2)).unflatten(4, (4, 2))

    def patch_norm(v):
        return torch.linalg.vector_norm(patches(v), dim=(1, 3, 5), keepdim=True)

    want = (patches(comb) * patch_norm(pos) / patch_norm(comb)).flatten(4).flatten(2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, comb, atol=1e-3)


def test_guidance_below_one_is_refused(bb):
    x = torch.randn(1, *bb.latent_shape)
    with pytest.raises(ValueError, match="below 1, where QwenImagePipeline's true CFG is off"):
        bb.guided(bb.net, x, torch.tensor([500.0]), bb.encode_prompts(["a cat"]), 0.5)

"""The paper's downstream uses of the one-step student, on the exported tiny student inside
stock diffusers: ControlNet, a learned token embedding (relation inversion), a LoRA
(DreamBooth customisation) and sampling above the trained resolution (docs/inference.md)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wadi.artifacts.export import export_pipeline
from wadi.artifacts.students import load_student
from wadi.models.backbones import BackboneSpec, load_backbone
from wadi.models.sampling import sample_student

PROMPT = "a cat"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    _, run = tiny_run("sd")
    return export_pipeline(load_student(run), tmp_path_factory.mktemp("export") / "student")


def stock(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_step_image(pipe, prompt=PROMPT, seed=0, **kwargs):
    """The stock one-step call: one inference step, no guidance, a seeded CPU generator."""
    return pipe(prompt, num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **kwargs).images


def test_controlnet_on_the_student(exported):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = stock(exported)
    plain = one_step_image(pipe)
    # A ControlNet initialised from the student, as ControlNet training starts; the tiny VAE
    # downsamples 2x, so the condition encoder downsamples once.
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
    cn_pipe = StableDiffusionControlNetPipeline(**{**pipe.components, "requires_safety_checker": False},
                                                controlnet=controlnet)
    cn_pipe.set_progress_bar_config(disable=True)
    edges = torch.zeros(1, 3, 16, 16)
    edges[..., 4:12, 8] = 1.0
    # Its zero convolutions add nothing yet: the image is the student's own.
    torch.testing.assert_close(one_step_image(cn_pipe, image=edges), plain, rtol=0, atol=1e-6)
    with torch.no_grad():  # a trained ControlNet: the condition now steers the one step
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.5)
    controlled = one_step_image(cn_pipe, image=edges)
    assert controlled.shape == plain.shape and torch.isfinite(controlled).all()
    assert (controlled - plain).abs().max() > 1e-3
    assert (one_step_image(cn_pipe, image=1 - edges) - controlled).abs().max() > 1e-3


def test_learned_token_embedding_with_load_textual_inversion(exported, tmp_path):
    pipe = stock(exported)
    hidden = pipe.text_encoder.config.hidden_size
    vector = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    save_file({"<rel>": vector}, str(tmp_path / "relation.safetensors"))  # one learned token, as ReVersion makes
    before = one_step_image(pipe, "a <rel> cat")
    pipe.load_textual_inversion(str(tmp_path / "relation.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<rel>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id].detach(), vector)
    after = one_step_image(pipe, "a <rel> cat")
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


def test_lora_with_load_lora_weights(exported, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    # A DreamBooth-LoRA-style file: peft LoRA on the attention projections, saved as diffusers does.
    torch.manual_seed(0)
    tuned = UNet2DConditionModel.from_pretrained(exported / "unet")
    tuned.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(tuned))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True)

    pipe = stock(exported)
    plain = one_step_image(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = one_step_image(pipe)
    assert (with_lora - plain).abs().max() > 1e-4
    reference = stock(exported)
    reference.unet = tuned  # the LoRA-tuned UNet itself
    torch.testing.assert_close(with_lora, one_step_image(reference), rtol=0, atol=1e-5)
    pipe.unload_lora_weights()
    torch.testing.assert_close(one_step_image(pipe), plain, rtol=0, atol=1e-6)


def test_higher_resolution_than_trained(exported):
    pipe = stock(exported)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16
    big = one_step_image(pipe, height=32, width=48)
    assert big.shape == (1, 3, 32, 48) and torch.isfinite(big).all()
    # The same one step as the library's sampler at that size: the export's folder as a plain
    # model (a student refuses a resolution other than the one it records), whose
    # scheduler's abar at T-1 is the generator's.
    with pytest.raises(ValueError, match="distilled with resolution 16, not 32"):
        load_student(exported, BackboneSpec(resolution=32))
    bb = load_backbone(BackboneSpec(kind="sd", path=str(exported), resolution=32, one_step_abar="scheduler"))
    ours = sample_student(bb, bb.net, [PROMPT], [0])
    square = one_step_image(pipe, height=32, width=32)
    np.testing.assert_allclose(square.numpy(), (ours / 2 + 0.5).numpy(), atol=1e-6, rtol=0)

"""SDXL against its stock pipeline: the conditioning StableDiffusionXLPipeline builds (two
CLIPs, the pooled embedding, size micro-conditions, zeros for the empty prompt), LoRA files
in diffusers' and kohya's layout, one original-layout checkpoint for from_single_file,
the VAE in float32 under half precision. (The stock pipeline reproducing `wadi sample`:
test_sample_export.)"""

import json

import pytest
import tiny_pipes
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from wadi.cli import main
from wadi.models.backbones import BackboneSpec, detect_kind

PROMPTS = ["a cat", "a red car"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL base and a student moved well off it (a large learning rate)."""
    from wadi.engine.training import distill

    root = tmp_path_factory.mktemp("sdxl")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sdxl": tiny_pipes.save_tiny_sdxl(root / "sdxl"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, kind="sdxl", steps=3, lr_student=3e-2)
    cfg.run.checkpoint_every = 0
    run = distill(cfg, progress=False)
    return pipes["sdxl"], run, UNet2DConditionModel.from_pretrained(run / "student")


def stock(base) -> StableDiffusionXLPipeline:
    bb = BackboneSpec(path=str(base), resolution=16).load()
    return StableDiffusionXLPipeline(vae=bb.vae, unet=bb.net, scheduler=bb.process.one_step_scheduler(), **bb.text)


def unet_out(unet, pipe):
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 40, generator=g)
    added = {"text_embeds": torch.randn(2, 24, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([999, 400]), encoder_hidden_states=c, added_cond_kwargs=added).sample


def test_an_sdxl_folder_is_sdxl_and_its_conditioning_is_the_pipelines(sdxl):
    base, _, _ = sdxl
    assert detect_kind(str(base)) == "sdxl" and detect_kind("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    bb = BackboneSpec(path=str(base), resolution=16).load()
    pipe = stock(base)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    cond, empty = bb.encode_prompts(PROMPTS), bb.empty_cond()
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["text_embeds"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["time_ids"], time_ids.expand(2, 6), rtol=0, atol=0)
    assert not neg.any() and not neg_pooled.any()  # the pipeline zeroes the empty prompt
    torch.testing.assert_close(empty.embeds, neg[:1], rtol=0, atol=0)
    torch.testing.assert_close(empty.extra["text_embeds"], neg_pooled[:1], rtol=0, atol=0)


@pytest.mark.parametrize("fmt, file", [("lora", "pytorch_lora_weights.safetensors"),
                                       ("lora-kohya", "lora_kohya.safetensors")])
def test_lora_exports_load_in_the_sdxl_pipeline_exactly(sdxl, tmp_path, fmt, file):
    base, run, student = sdxl
    assert main(["export", str(run), "--format", fmt, "--rank", "64", "--out", str(tmp_path / "lora")]) == 0
    assert json.loads((tmp_path / "lora" / "lora_report.json").read_text())["energy_min"] > 1 - 1e-9
    pipe = stock(base)
    before = unet_out(pipe.unet, pipe)
    pipe.load_lora_weights(tmp_path / "lora" / file)
    err = (unet_out(pipe.unet, pipe) - unet_out(student, pipe)).abs().max()
    assert err < 2e-5 and (unet_out(student, pipe) - before).abs().max() > 1e-2


def test_single_file_export_loads_with_sdxl_from_single_file(sdxl, tmp_path):
    base, run, student = sdxl
    tiny_pipes.save_template(base, tmp_path / "base.safetensors")  # its label_emb included
    assert main(["export", str(run), "--format", "single-file", "--template", str(tmp_path / "base.safetensors"),
                 "--out", str(tmp_path / "single")]) == 0
    reference = stock(base)
    reference.save_pretrained(tmp_path / "base-pipeline")
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "single" / "student.safetensors"), config=str(tmp_path / "base-pipeline"),
        vae=reference.vae, text_encoder=reference.text_encoder, text_encoder_2=reference.text_encoder_2,
        tokenizer=reference.tokenizer, tokenizer_2=reference.tokenizer_2)
    torch.testing.assert_close(unet_out(loaded.unet, loaded), unet_out(student, loaded), rtol=0, atol=1e-6)
    assert "StableDiffusionXLPipeline.from_single_file" in (tmp_path / "single" / "README.md").read_text()


def test_the_vae_decodes_in_float32_under_half_precision(sdxl):
    base, _, _ = sdxl
    bb = BackboneSpec(path=str(base), resolution=16).load(torch.float16)
    x0 = torch.randn(1, *bb.latent_shape, dtype=torch.float16)
    images = bb.decode(x0)
    assert next(bb.vae.parameters()).dtype == torch.float32 and images.dtype == torch.float32
    sd = BackboneSpec(kind="sd", path=str(base), resolution=16)
    with pytest.raises(ValueError, match="is a sdxl pipeline folder, not sd"):
        sd.load()

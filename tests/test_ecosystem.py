"""Where diffusion users already work: LoRA files for diffusers' load_lora_weights and for
kohya-based UIs, adapter files of the LoRA kinds, model cards, the hub, trackers."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import tiny_pipes
from wadi.cli import main
from wadi.training import distill


def unet_out(unet):
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 400]), encoder_hidden_states=c).sample


def pipe(base):
    """The stock pipeline of a tiny base folder (saved as components, without model_index.json)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def lorad_run(tmp_path_factory):
    """A tiny SD student moved well off its teacher (a large learning rate)."""
    root = tmp_path_factory.mktemp("eco")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, steps=3, lr_student=3e-2)
    cfg.run.checkpoint_every = 0
    run = distill(cfg, progress=False)
    return pipes["sd"], run, UNet2DConditionModel.from_pretrained(run / "student")


@pytest.mark.parametrize("fmt, file", [("lora", "pytorch_lora_weights.safetensors"), ("lora-kohya",
                                                                                   "lora_kohya.safetensors")])
def test_lora_export_at_full_rank_is_the_student(lorad_run, tmp_path, capsys, fmt, file):
    base, run, student = lorad_run
    assert main(["export", str(run), "--format", fmt, "--rank", "64", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0 and not report["left_out"]
    p = pipe(base)
    before = unet_out(p.unet)
    p.load_lora_weights(tmp_path / "lora" / file)  # kohya's layout goes through diffusers' own conversion
    torch.testing.assert_close(unet_out(p.unet), unet_out(student), rtol=0, atol=2e-5)
    assert (unet_out(student) - before).abs().max() > 1e-2  # the student is not its base
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "base_model" not in card or str(base) not in card.split("---")[1]  # a local base is no hub id
    assert "load_lora_weights" in card or "A1111" in card


def test_lora_export_at_a_lower_rank_reports_what_it_loses(lorad_run, tmp_path):
    base, run, student = lorad_run
    assert main(["export", str(run), "--format", "lora", "--rank", "1", "--out", str(tmp_path / "r1")]) == 0
    report = json.loads((tmp_path / "r1" / "lora_report.json").read_text())
    assert report["rank"] == 1 and report["energy_min"] < 1
    p = pipe(base)
    p.load_lora_weights(tmp_path / "r1")
    err = (unet_out(p.unet) - unet_out(student)).abs().max()
    assert 0 < err < (unet_out(pipe(base).unet) - unet_out(student)).abs().max()  # part of the way


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_files_of_the_lora_kinds_load_in_diffusers(tmp_path, kind):
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, student=kind, steps=2)
    cfg.run.checkpoint_every = 0
    run = distill(cfg, progress=False)
    p = pipe(pipes["sd"])
    p.load_lora_weights(run / "student.safetensors")
    torch.testing.assert_close(unet_out(p.unet), unet_out(UNet2DConditionModel.from_pretrained(run / "student")),
                               rtol=0, atol=2e-5)


def test_every_export_carries_a_model_card(lorad_run, tmp_path):
    base, run, _ = lorad_run
    for fmt in ("pipeline", "adapter"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        card = (tmp_path / fmt / "README.md").read_text()
        assert card.startswith("---") and "license:" in card and "2603.08258" in card
        assert str(base) in card and "guidance" in card  # the run's settings
    assert "num_inference_steps=1" in (tmp_path / "pipeline" / "README.md").read_text()

"""Sampling and training as the authors' released scripts do them (infer_sd_model.py,
infer_pixart.py, train_dkd_*.py), transcribed here independently of our code, on tiny
SD and PixArt pipelines; and the file formats of their outputs and of DMD2's."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import tiny_pipes
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from wadi.cli import main
from wadi.engine.training import distill
from wadi.models.backbones import BackboneSpec

ABAR_T = 0.0047  # hard-coded in the authors' inference and training scripts
PROMPT = "a red car"


def released_file(net, path):
    """The authors' layout: every tensor of the (merged) denoiser in one flat file."""
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def perturbed(net, seed=1):
    """A 'student': the teacher's net with every weight nudged."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


@torch.no_grad()
def authors_sd_image(base, released, seed):
    """infer_sd_model.py: CLIP without a mask, eps at t = 999, x0 with abar 0.0047, VAE decode."""
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.load_state_dict(load_file(str(released)), strict=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    embeds = enc(ids)[0]
    latents = torch.randn((1, 4, unet.config.sample_size, unet.config.sample_size),
                          generator=torch.Generator().manual_seed(seed))
    pred = unet(latents, torch.full((1,), 999), embeds).sample
    x0 = (latents - (1 - ABAR_T) ** 0.5 * pred) / ABAR_T ** 0.5
    return vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def authors_pixart_image(base, released, seed, resolution):
    """infer_pixart.py: T5 with its mask, micro-conditions at sample_size 128, the first
    half of the output channels, x0 with abar 0.0047."""
    transformer = PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer")
    transformer.load_state_dict(load_file(str(released)), strict=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    tok = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
    enc = T5EncoderModel.from_pretrained(base, subfolder="text_encoder")
    inputs = tok([PROMPT], padding="max_length", max_length=120, truncation=True, add_special_tokens=True,
                 return_tensors="pt")
    embeds = enc(inputs.input_ids, attention_mask=inputs.attention_mask)[0]
    size = resolution // 2  # the tiny VAE halves
    latents = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(seed))
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.config.sample_size == 128:
        added = {"resolution": torch.tensor([[resolution, resolution]], dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[1.0]])}
    pred = transformer(latents, encoder_hidden_states=embeds, timestep=torch.full((1,), 999),
                       encoder_attention_mask=inputs.attention_mask, added_cond_kwargs=added)["sample"].chunk(2, 1)[0]
    x0 = (latents - (1 - ABAR_T) ** 0.5 * pred) / ABAR_T ** 0.5
    return vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)


def wadi_image(released, base, tmp_path, seed, *extra):
    out = tmp_path / f"sample-{seed}"
    assert main(["sample", str(released), "--base", str(base), "--prompt", PROMPT, "--seeds", str(seed),
                 "--out", str(out), "--no-grid", *extra]) == 0
    return np.asarray(Image.open(out / f"00000-seed{seed}.png")).astype(np.float32)


def as_png_pixels(image):
    """[-1, 1] float to uint8 the way diffusers (and wadi) round."""
    return ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()


def test_sd_released_student_samples_as_the_authors_script(tmp_path):
    base = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    released = released_file(perturbed(UNet2DConditionModel.from_pretrained(base, subfolder="unet")),
                              tmp_path / "rotated_unet.safetensors")
    for seed in (0, 3):
        ours = wadi_image(released, base, tmp_path, seed)
        np.testing.assert_allclose(ours, as_png_pixels(authors_sd_image(base, released, seed)), atol=1)
    # the scheduler's own abar_999 (0.00466, 0.4% away) is another generator: other pixels
    other = wadi_image(released, base, tmp_path / "sched", 0, "--one-step-abar", "scheduler")
    assert np.abs(other - wadi_image(released, base, tmp_path / "again", 0)).max() > 0


@pytest.mark.parametrize("sample_size", [128, 64])
def test_pixart_512_and_1024_train_and_sample_as_the_authors_script(tmp_path, sample_size):
    """PixArt-alpha 1024 (sample_size 128) takes resolution and aspect-ratio micro-conditions,
    512 (64) does not; both train and sample, and sampling is the authors' formula with
    abar 0.0047, not the linear schedule's 4.0e-5."""
    # 3 heads: the micro-condition embeddings take a third of the width each
    base = tiny_pipes.save_tiny_pixart(tmp_path / "pixart", sample_size=sample_size, use_additional_conditions=None,
                                       num_attention_heads=3, cross_attention_dim=24)
    assert PixArtTransformer2DModel.from_pretrained(base, subfolder="transformer").use_additional_conditions == (
        sample_size == 128)
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    cfg = tiny_pipes.make_cfg({"pixart": base, "prompts": tmp_path / "prompts.txt"}, tmp_path, kind="pixart", steps=1)
    run = distill(cfg, progress=False)  # resolution 16: 8x8 latents, whatever the sample size
    assert (run / "student.safetensors").is_file()

    student = PixArtTransformer2DModel.from_pretrained(run / "student")
    released = released_file(student, tmp_path / "rotated_transformer.safetensors")
    ours = wadi_image(released, base, tmp_path, 0, "--resolution", "16")
    np.testing.assert_allclose(ours, as_png_pixels(authors_pixart_image(base, released, 0, 16)), atol=1)
    # the linear schedule's abar_999 (4.0e-5) is another generator, beyond the comparison's tolerance
    other = wadi_image(released, base, tmp_path / "sched", 0, "--resolution", "16", "--one-step-abar", "scheduler")
    assert np.abs(other - ours).max() > 1
    assert main(["sample", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "from-run")]) == 0


def test_stock_scheduler_of_an_export_lands_on_the_generators_abar(tiny_run, tmp_path):
    from diffusers import DDIMScheduler

    for kind in ("sd", "pixart"):
        _, run = tiny_run(kind)
        assert main(["export", str(run), "--out", str(tmp_path / kind)]) == 0
        sched = DDIMScheduler.from_pretrained(tmp_path / kind, subfolder="scheduler")
        assert sched.alphas_cumprod[-1] == torch.tensor(ABAR_T)
        assert torch.equal(sched.alphas_cumprod[:-1], DDIMScheduler.from_pretrained(
            tiny_run(kind)[0], subfolder="scheduler").alphas_cumprod[:-1])  # every other timestep as it was


def test_authors_training_outputs_convert_to_a_merged_student(tmp_path):
    """Their final/unet holds the unrotated weights with theta_a / theta_b among its tensors;
    kduv.pth holds the angles alone. Both convert to the student our LoRaD merge makes."""
    from wadi import AdapterConfig, attach

    base = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    adapter = attach(UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                     AdapterConfig("lorad", 4, "unet-student"))
    with torch.no_grad():
        for p in adapter.trainable_parameters().values():
            p.normal_(0, 0.3)
    angles = {k: v.detach().clone() for k, v in adapter.state_dict().items()}  # <layer>.theta_a, as theirs
    assert all(k.endswith((".theta_a", ".theta_b")) for k in angles)
    expected = adapter.merged_model().state_dict()
    plain = UNet2DConditionModel.from_pretrained(base, subfolder="unet").state_dict()
    final = tmp_path / "final" / "unet"  # the unrotated UNet with the angles as extra tensors
    final.mkdir(parents=True)
    (final / "config.json").write_text((base / "unet" / "config.json").read_text())
    save_file({**{k: v.contiguous() for k, v in plain.items()}, **angles}, str(final / "diffusion_pytorch_model.safetensors"))
    torch.save(angles, tmp_path / "kduv.pth")

    assert main(["convert", str(final), "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", str(base), "--angles", str(tmp_path / "kduv.pth"), "--out", str(tmp_path / "b.safetensors")]) == 0
    a = UNet2DConditionModel.from_pretrained(tmp_path / "a").state_dict()
    b = load_file(str(tmp_path / "b.safetensors"))
    for k, v in expected.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/wadi-pickle-ran", "w"))


def test_torch_state_dicts_are_read_without_running_code(tiny_run, tmp_path, capsys):
    base, run = tiny_run("sd")
    student = UNet2DConditionModel.from_pretrained(run / "student")
    torch.save(student.state_dict(), tmp_path / "dmd2.bin")  # DMD2 publishes its students so
    safe = released_file(student, tmp_path / "student.safetensors")
    assert main(["sample", str(tmp_path / "dmd2.bin"), "--base", str(base), "--prompt", "a cat",
                 "--out", str(tmp_path / "x")]) == 2
    assert "is a torch state dict: pass --allow-bin to read it" in capsys.readouterr().err
    from_bin = wadi_image(tmp_path / "dmd2.bin", base, tmp_path / "bin", 0, "--allow-bin")
    np.testing.assert_array_equal(from_bin, wadi_image(safe, base, tmp_path / "st", 0))

    marker = Path("/tmp/wadi-pickle-ran")
    marker.unlink(missing_ok=True)
    capsys.readouterr()
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    for cmd in (["sample", str(tmp_path / "evil.bin"), "--base", str(base), "--allow-bin", "--prompt", "a",
                 "--out", str(tmp_path / "e")],
                ["analyze", str(base), str(tmp_path / "evil.bin"), "--out", str(tmp_path / "e2")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "without running code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists(), "unpickling ran code from the file"


def test_clip_mask_switch_changes_training_prompts_only(tmp_path):
    """SD pipelines (and the teacher's training) pass CLIP no mask; the authors' training
    loader masks training prompts. Only the switch changes the states, at padded positions."""
    base = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    bb = BackboneSpec(kind="sd", path=str(base)).load()
    plain, masked = bb.encode_prompts(["a cat"]), bb.encode_prompts(["a cat"], mask_encoder=True)
    assert plain.mask is None and masked.mask is None  # the UNet never gets a mask
    n = len(bb.tokenizer("a cat").input_ids)
    torch.testing.assert_close(plain.embeds[:, :n], masked.embeds[:, :n])  # causal: real tokens see no padding
    assert not torch.allclose(plain.embeds[:, n:], masked.embeds[:, n:])
    assert torch.equal(bb.empty_cond().embeds, bb.encode_prompts([""]).embeds)

    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": base, "prompts": tmp_path / "prompts.txt"}
    runs = {}
    for on in (False, True):
        cfg = tiny_pipes.make_cfg(pipes, tmp_path / str(on), steps=2)
        cfg.data.mask_prompts = on
        runs[on] = load_file(str(distill(cfg, progress=False) / "student.safetensors"))
    assert any(not torch.equal(runs[False][k], runs[True][k]) for k in runs[False])

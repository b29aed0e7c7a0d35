"""The flux kind (FLUX.1-dev / schnell) on tiny dev-like and schnell-like FluxPipelines loaded by
path: its encoding is encode_prompt's; its call, noise and decoding in an Euler loop give the
stock pipeline's images; tiny distillations of one and four steps export pipelines that the
stock FluxPipeline, called as wadi.json says, samples as `wadi sample` does; the LoRA export
loads through FluxPipeline.load_lora_weights; bad inputs end in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_pipes
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image
from tiny_pipes_flux import MAX_LENGTH, flux_cfg, save_tiny_flux

from wadi.artifacts.students import load_student, load_teacher
from wadi.cli import main
from wadi.models.backbones import BackboneSpec, detect_kind
from wadi.models.kinds import flux
from wadi.models.sampling import sample_student

RESOLUTION = 16
PROMPTS = ["a photo of a cat", "red car on the table"]
SEEDS = [3, 7]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """variant -> tiny pipeline folder (dev: a guidance input and the dynamic shift; schnell:
    neither), and the prompt file."""
    root = tmp_path_factory.mktemp("flux")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    return {"dev": save_tiny_flux(root / "dev", guidance=True),
            "schnell": save_tiny_flux(root / "schnell", guidance=False), "prompts": root / "prompts.txt"}


@pytest.fixture(scope="module")
def runs(pipes, tmp_path_factory):
    """(variant, student steps) -> a finished tiny run (two steps; a large learning rate moves
    the student well off its teacher)."""
    from wadi.engine.training import distill

    made = {}

    def get(variant: str, steps: int):
        if (variant, steps) not in made:
            root = tmp_path_factory.mktemp(f"run-{variant}-{steps}")
            made[variant, steps] = distill(flux_cfg(pipes[variant], pipes["prompts"], root, student_steps=steps,
                                                    lr_student=3e-2), progress=False)
        return made[variant, steps]

    return get


def backbone(folder, **spec):
    return BackboneSpec(path=str(folder), resolution=RESOLUTION, max_length=MAX_LENGTH, **spec).load()


def stock(folder) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folders_and_hub_ids_are_recognised(pipes):
    assert detect_kind(str(pipes["dev"])) == detect_kind(str(pipes["schnell"])) == "flux"
    assert detect_kind("black-forest-labs/FLUX.1-dev") == detect_kind("black-forest-labs/FLUX.1-schnell") == "flux"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_encode_is_encode_prompt(pipes, variant):
    bb = backbone(pipes[variant])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():  # as the backbone encodes (attention may take another kernel under autograd)
        embeds, pooled, text_ids = stock(pipes[variant]).encode_prompt(PROMPTS, max_sequence_length=MAX_LENGTH)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.extra["pooled"], pooled) and cond.mask is None
    assert not torch.allclose(pooled[0], pooled[1])  # read at each prompt's end-of-text token
    assert text_ids.shape == (MAX_LENGTH, 3) and not text_ids.any()  # what call builds from the states' length
    guidance = cond.extra.get("guidance")
    assert (guidance.tolist() == [flux.GUIDANCE] * 2) if variant == "dev" else guidance is None


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_euler_loop_reproduces_the_pipeline(pipes, variant, steps):
    """The engine's layout end to end: noise drawn per image in the kind's noise shape from one
    seeded generator each, the velocity from its call (packing inside), Euler steps at the
    timesteps the pipeline sets (its sigmas, the shift at the kind's image tokens), its decoding."""
    bb, pipe = backbone(pipes[variant]), stock(pipes[variant])
    scale = 2.5 if variant == "dev" else 1.0
    expected = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                    **{**bb.kind.pipeline_call(bb, steps), "guidance_scale": scale}).images

    cfg = pipe.scheduler.config
    mu = calculate_shift(bb.kind.image_tokens(bb), cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)
    pipe.scheduler.set_timesteps(sigmas=bb.kind.sigmas(steps), mu=mu)
    sigmas = pipe.scheduler.sigmas
    x = torch.stack([torch.randn(bb.latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            x = x + (sigmas[i + 1] - sigmas[i]) * bb.guided(bb.net, x, t.expand(len(x)), cond, scale)
        images = bb.decode(x) / 2 + 0.5
    assert images.shape == expected.shape == (2, 3, RESOLUTION, RESOLUTION)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_teacher_sampling_is_the_pipelines(pipes, variant):
    """`wadi sample --teacher`: the flow's Euler sampler at the pipeline's timesteps, the
    guidance input at the asked scale (dev), none (schnell)."""
    from wadi.models.sampling import sample_teacher

    bb, scale = backbone(pipes[variant]), 2.5 if variant == "dev" else 1.0
    ours = sample_teacher(bb, bb.net, PROMPTS, SEEDS, steps=4, guidance=scale) / 2 + 0.5
    theirs = stock(pipes[variant])(prompt=PROMPTS, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                                   output_type="pt", **{**bb.pipeline_call(), "num_inference_steps": 4,
                                                        "guidance_scale": scale}).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def read_png(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_stock_pipeline_reproduces_wadi_sample(runs, tmp_path, variant, steps):
    run = runs(variant, steps)
    args = ["sample", str(run), "--out", str(tmp_path / "samples"), "--seeds", ",".join(map(str, SEEDS))]
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "wadi.json").read_text())
    assert info["pipeline"] == "FluxPipeline" and info["call"] == {
        "num_inference_steps": steps, "guidance_scale": flux.GUIDANCE if variant == "dev" else 0.0,
        "height": RESOLUTION, "width": RESOLUTION, "max_sequence_length": MAX_LENGTH}

    prompts, seeds = [p for p in PROMPTS for _ in SEEDS], SEEDS * len(PROMPTS)
    pngs = [read_png(tmp_path / "samples" / f"{k:05d}-seed{s}.png") for k in range(len(PROMPTS)) for s in SEEDS]
    theirs = tiny_pipes.stock_images(tmp_path / "export", prompts, seeds, output_type="pil")
    for ours, image in zip(pngs, theirs):
        assert np.abs(ours.astype(int) - np.asarray(image).astype(int)).max() <= 1
    student = load_student(run)
    expected = sample_student(student.backbone, student.net, prompts, seeds)
    got = tiny_pipes.stock_images(tmp_path / "export", prompts, seeds, output_type="pt")
    err = (got - (expected / 2 + 0.5)).abs().max().item()
    moved = (expected - sample_student(student.backbone, student.backbone.net, prompts, seeds)).abs().max().item() / 2
    assert err < 1 / 255 and moved > 20 * err, (err, moved)  # the trained student is not its teacher


def test_lora_export_loads_in_fluxpipeline_exactly(runs, tmp_path):
    run = runs("dev", 1)
    assert main(["export", str(run), "--format", "lora", "--rank", "32", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0 and not report["left_out"]
    teacher, student = load_teacher(run), load_student(run)
    pipe = FluxPipeline(vae=teacher.backbone.vae, transformer=teacher.net,
                        scheduler=student.backbone.student_scheduler(), **teacher.backbone.text)
    pipe.load_lora_weights(tmp_path / "lora")
    bb = student.backbone
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    t = bb.process.time(torch.tensor([999, 400]))
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        got, want = bb.predict(pipe.transformer, x, t, cond), bb.predict(student.net, x, t, cond)
        base = bb.predict(bb.net, x, t, cond)
    # float32 rounding of W + BA against the rotated W: far below the student's own change
    err, moved = (got - want).abs().max(), (want - base).abs().max()
    assert err < 1e-4 and moved > 20 * err, (err, moved)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "guidance_scale=3.5" in card and "ComfyUI loads this file as it is" in card


def test_the_lora_cards_snippet_runs_as_written(runs, tmp_path, monkeypatch):
    run = runs("dev", 4)
    assert main(["export", str(run), "--format", "lora", "--rank", "32", "--out", str(tmp_path / "lora")]) == 0
    card = (tmp_path / "lora" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "num_inference_steps=4" in snippet and "guidance_scale=3.5" in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    assert Image.open(tmp_path / "image.png").size == (RESOLUTION, RESOLUTION)


def test_teacher_fake_and_student_share_the_guidance_input(pipes, runs, tmp_path):
    """The first step's VSD loss is zero (the fake starts as the teacher, at the same input),
    model.guidance sets the input of all three and the export's call."""
    run = runs("dev", 1)
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss_student"] == 0
    bb = backbone(pipes["dev"], guidance=2.5)
    cond = bb.encode_prompts(PROMPTS)
    assert cond.extra["guidance"].tolist() == [2.5, 2.5] and bb.pipeline_call()["guidance_scale"] == 2.5
    x, t = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0)), torch.full((2,), 1000.0)
    with torch.no_grad():
        own, at = bb.guided(bb.net, x, t, cond, 1.0), bb.guided(bb.net, x, t, cond, 2.5)
        other = bb.guided(bb.net, x, t, cond, 4.0)
    assert torch.equal(own, at) and not torch.allclose(own, other)


def refused(capsys, args: list[str], text: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_bad_inputs_are_one_line(pipes, runs, tiny_run, tmp_path, capsys):
    sd = tiny_run("sd")[0]
    prompts, root = f"data.prompts={pipes['prompts']}", f"run.root={tmp_path / 'runs'}"
    distill = ["distill", "--config", "flux-wadi", prompts, root, "train.mixed_precision=no", "student.rank=4",
               "fake.rank=2", "train.steps=1"]  # a refusal that failed would train one step, not the preset's
    refused(capsys, [*distill, f"model.path={sd}"], "is a sd pipeline folder, not flux")
    refused(capsys, ["distill", "--config", "sd3-wadi", f"model.path={pipes['dev']}", prompts, root,
                     "train.mixed_precision=no"], "is a flux pipeline folder, not sd3")
    refused(capsys, [*distill, f"model.path={pipes['dev']}", "model.resolution=18"],
            "must be a multiple of 4 (what the FluxTransformer2DModel's VAE factor and patches take), got 18")
    refused(capsys, [*distill, f"model.path={pipes['dev']}", "model.resolution=16", "train.guidance=3.5"],
            "takes its guidance as an input")
    refused(capsys, [*distill, f"model.path={pipes['schnell']}", "model.resolution=16", "model.guidance=2"],
            "this flux model has none")
    refused(capsys, ["distill", "--config", "sd15-wadi", f"model.path={sd}", prompts, root, "train.mixed_precision=no",
                     "model.resolution=16", "model.guidance=2"], "this sd model has none")
    refused(capsys, [*distill, f"model.path={pipes['dev']}", "model.guidance=-1"], "model.guidance must be a positive")
    out = str(tmp_path / "o")
    refused(capsys, ["sample", "--teacher", str(pipes["schnell"]), "--resolution", "16", "--prompt", "a cat",
                     "--out", out], "this flux model has no guidance (guidance 3 asked)")
    refused(capsys, ["export", str(runs("dev", 1)), "--format", "lora-kohya", "--rank", "4", "--out", out],
            "has no lora-kohya export")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "o").exists()


def test_params_of_the_released_sizes(capsys):
    """`wadi params` builds FLUX.1 [dev] / [schnell] from their released configs without weights:
    11.9B parameters, schnell less the guidance embedder; LoRaD's r (out + in/2) per layer taken."""
    from wadi.adapters.targets import PRESETS
    from wadi.models.archs import build

    counts = {}
    for model, role, rank in (("flux-dev", "student", 256), ("flux-schnell", "student", 256), ("flux-dev", "fake", 32)):
        assert main(["params", "--model", model, "--role", role, "--rank", str(rank), "--json"]) == 0
        counts[model, role] = json.loads(capsys.readouterr().out)
    dev = counts["flux-dev", "student"]
    assert dev["total"] == 11_901_408_320 and dev["layers"] == 498 and dev["targets"] == "mmdit-student"
    embedder = 256 * 3072 + 3072 + 3072 * 3072 + 3072  # guidance_embedder.linear_1 / linear_2
    assert dev["total"] - counts["flux-schnell", "student"]["total"] == embedder
    for (model, role), out in counts.items():
        net = build(model)
        rule = PRESETS[out["targets"]]
        layers = [m for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and rule.matches(n)]
        assert out["trainable"] == sum(out["rank"] * (m.out_features + m.in_features // 2) for m in layers)
    assert round(100 * dev["fraction"], 1) == 9.1 and counts["flux-dev", "fake"]["layers"] == 418
    fake = build("flux-dev")
    assert not [n for n, m in fake.named_modules() if isinstance(m, torch.nn.Linear)
                and PRESETS["flux-fake"].matches(n) and "norm" in n]  # no modulation in the fake

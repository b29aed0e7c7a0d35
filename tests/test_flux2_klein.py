"""The flux2-klein kind against the stock Flux2KleinPipeline on a tiny pipeline loaded by
path: its encoding is the pipeline's, its teacher sampling reproduces the pipeline's images
with and without guidance (the shift by tokens and steps included), a distilled student of
one and of four steps exports to a pipeline folder and a LoRA the stock pipeline
reproduces, a distilled klein takes no guidance, and what does not fit is refused."""

from __future__ import annotations

import json

import pytest
import torch
from kind_runs import PROMPTS, SEEDS, backbone, distil, run_card, stock, stock_teacher, student_images, wadi_teacher
from tiny_pipes_flux2_klein import save_tiny_flux2_klein

from wadi.cli import main
from wadi.models.kinds import flux2_klein
from wadi.models.registry import detect_kind


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "base")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "distilled", is_distilled=True)


@pytest.fixture(scope="module")
def bb(folder):
    return backbone(folder)


def test_folders_and_hub_ids_are_recognised(folder):
    assert detect_kind(str(folder)) == "flux2-klein"
    assert detect_kind("black-forest-labs/FLUX.2-klein-base-4B") == "flux2-klein"


def test_encode_is_the_pipelines(folder, bb):
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        theirs, _ = stock(folder).encode_prompt(list(PROMPTS), max_sequence_length=24)
    assert cond.mask is None and cond.embeds.shape == (2, 24, 24)
    torch.testing.assert_close(cond.embeds, theirs, rtol=0, atol=0)  # the same computation


@pytest.mark.parametrize("steps,scale", [(1, 1.0), (4, 1.0), (1, 4.0), (4, 4.0)])
def test_teacher_sampling_reproduces_the_pipeline(folder, bb, steps, scale):
    ours = wadi_teacher(bb, steps, scale)
    theirs = stock_teacher(folder, bb, steps, guidance_scale=scale)
    assert theirs.shape == (2, 3, 16, 16) and theirs.std() > 0.01
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_guidance_and_the_statistics_matter(folder, bb):
    """Guidance and the batch-norm statistics change the image, so the tests above tell a
    sampler without them from the pipeline."""
    assert (wadi_teacher(bb, 4, 4.0) - wadi_teacher(bb, 4, 1.0)).abs().max() > 1e-3
    pipe = stock(folder)
    x = torch.randn(1, *bb.latent_shape)
    with torch.no_grad():
        unnormalised = pipe.vae.decode(pipe._unpatchify_latents(x)).sample.clamp(-1, 1)
        assert (bb.decode(x) - unnormalised).abs().max() > 1e-3


def test_shapes_and_the_shift_by_tokens_and_steps(bb):
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert bb.latent_shape == (16, 4, 4) and flux2_klein.image_tokens(bb) == 16
    assert flux2_klein.sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    assert flux2_klein.mu(bb, 1) != flux2_klein.mu(bb, 4)
    four = backbone(bb.spec.path, student_steps=4)
    stock_sched = FlowMatchEulerDiscreteScheduler.from_config(bb.process.config)
    stock_sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=flux2_klein.mu(bb, 4))
    assert [t.item() for t in four.student_times()] == stock_sched.timesteps.tolist()


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    made = {}

    def get(steps):
        if steps not in made:
            made[steps] = distil("flux2-klein", folder, tmp_path_factory.mktemp(f"klein-run-{steps}"), steps)
        return made[steps]

    return get


@pytest.mark.parametrize("steps", [1, 4])
def test_the_export_reproduces_wadi_sample(runs, tmp_path, monkeypatch, steps):
    from tiny_pipes import stock_images

    run = runs(steps)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "wadi.json").read_text())
    assert info["pipeline"] == "Flux2KleinPipeline" and info["call"]["num_inference_steps"] == steps
    assert info["call"]["guidance_scale"] == 1.0 and info["call"]["max_sequence_length"] == 24
    # The student is step-distilled: its folder says so, as a distilled klein's does.
    assert json.loads((tmp_path / "export" / "model_index.json").read_text())["is_distilled"] is True
    ours = student_images(run)
    theirs = stock_images(tmp_path / "export", PROMPTS, SEEDS, output_type="pt")
    assert (ours - theirs).abs().max() < 1 / 255
    teacher = wadi_teacher(backbone(info["base"]["path"], student_steps=steps), steps, 1.0)
    assert (ours - teacher).abs().max() > 1e-2, "the trained student should differ from its teacher"
    run_card(tmp_path / "export", monkeypatch)


def test_the_lora_export_loads_in_the_stock_pipeline_exactly(runs, folder, tmp_path, monkeypatch):
    from wadi.artifacts.students import load_student

    run = runs(1)
    assert main(["export", str(run), "--format", "lora", "--rank", "32", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0
    pipe = stock(folder)
    pipe.load_lora_weights(tmp_path / "lora")
    student = load_student(run)
    bb = student.backbone
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 400.0])
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        got, want = bb.predict(pipe.transformer, x, t, cond), bb.predict(student.net, x, t, cond)
        base = bb.predict(bb.net, x, t, cond)
    err, moved = (got - want).abs().max(), (want - base).abs().max()
    assert err < 1e-4 and moved > 20 * err, (err, moved)
    run_card(tmp_path / "lora", monkeypatch)


def test_a_distilled_klein_takes_no_guidance(distilled, tmp_path, capsys):
    bb = backbone(distilled)
    assert bb.guidance_mode == "none"
    x, t = torch.randn(1, *bb.latent_shape), torch.tensor([500.0])
    cond = bb.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        bb.guided(bb.net, x, t, cond, 1.0)
        with pytest.raises(ValueError, match="has no guidance"):
            bb.guided(bb.net, x, t, cond, 4.0)
    # Its pipeline ignores guidance too: the teacher sampled unguided is the pipeline at any scale.
    torch.testing.assert_close(wadi_teacher(bb, 4, 1.0), stock_teacher(distilled, bb, 4, guidance_scale=4.0),
                               rtol=0, atol=1e-5)
    (tmp_path / "p.txt").write_text("a cat\n")
    refused(capsys, ["distill", "--config", "flux2-klein-4b-wadi", f"model.path={distilled}", "model.resolution=16",
                     f"data.prompts={tmp_path / 'p.txt'}", f"run.root={tmp_path / 'runs'}", "train.mixed_precision=no",
                     "train.guidance=3"], "has no guidance; use train.guidance=1")
    assert not (tmp_path / "runs").exists()
    # The flag is the folder's: the same weights without a model_index.json are the base,
    # and one that cannot be read is said in one line.
    import shutil

    shutil.copytree(distilled, tmp_path / "bare")
    (tmp_path / "bare" / "model_index.json").unlink()
    assert backbone(tmp_path / "bare").guidance_mode == "cfg"
    shutil.copytree(distilled, tmp_path / "broken")
    (tmp_path / "broken" / "model_index.json").write_text("[1")
    with pytest.raises(ValueError, match="could not read the model_index.json"):
        backbone(tmp_path / "broken").guidance_mode  # noqa: B018


def refused(capsys, args, text):
    capsys.readouterr()  # what came before
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_what_does_not_fit_is_refused_in_one_line(folder, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    run = [f"data.prompts={tmp_path / 'p.txt'}", f"run.root={tmp_path / 'runs'}", "train.mixed_precision=no"]
    base = ["distill", "--config", "flux2-klein-4b-wadi", f"model.path={folder}"]
    refused(capsys, [*base, "model.kind=z-image", *run], "is a flux2-klein pipeline folder, not z-image")
    refused(capsys, [*base, "model.resolution=18", *run], "must be a multiple of 4")
    refused(capsys, [*base, "model.resolution=16", "train.guidance_options.cfg_truncation=0.5", *run],
            "guidance has no such setting (it has: none)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model,preset,billions", [("flux2-klein-4b", "flux2-klein-4b-wadi", 3.88),
                                                   ("flux2-klein-9b", "flux2-klein-9b-wadi", 9.08)])
def test_params_of_the_released_models_and_the_presets_ranks(capsys, model, preset, billions):
    """FLUX.2 klein 4B and 9B built from their released configs without weights, and each
    preset's rank about the paper's tenth of the denoiser."""
    from wadi.engine.config import resolve

    rank = resolve(preset).student.rank
    assert main(["params", "--model", model, "--rank", str(rank), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total"] / 1e9, 2) == billions and 0.08 < out["fraction"] < 0.12

"""The z-image kind against the stock ZImagePipeline on a tiny pipeline loaded by path: its
encoding is the pipeline's, its teacher sampling reproduces the pipeline's images with and
without guidance and its options, a distilled student of one and of four steps exports to a
pipeline folder and a LoRA the stock pipeline reproduces, and what does not fit is refused."""

from __future__ import annotations

import json

import pytest
import torch
from kind_runs import PROMPTS, SEEDS, backbone, distil, run_card, stock, stock_teacher, student_images, wadi_teacher
from tiny_pipes_z_image import save_tiny_z_image

from wadi.cli import main
from wadi.models.kinds import z_image
from wadi.models.registry import detect_kind
from wadi.models.sampling import seeded_noise


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_z_image(tmp_path_factory.mktemp("z_image") / "pipe")


@pytest.fixture(scope="module")
def bb(folder):
    return backbone(folder)


def test_folders_and_hub_ids_are_recognised(folder):
    assert detect_kind(str(folder)) == "z-image"
    assert detect_kind("Tongyi-MAI/Z-Image-Turbo") == "z-image"


def test_encode_is_the_pipelines(folder, bb):
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        theirs, _ = stock(folder).encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                                max_sequence_length=24)
    ours = z_image._captions(cond)
    assert [len(c) for c in ours] == [len(c) for c in theirs] and len(ours[0]) != len(ours[1])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same computation


@pytest.mark.parametrize("steps,scale", [(1, 1.0), (4, 1.0), (1, 3.0), (4, 3.0)])
def test_teacher_sampling_reproduces_the_pipeline(folder, bb, steps, scale):
    ours = wadi_teacher(bb, steps, scale)
    theirs = stock_teacher(folder, bb, steps, guidance_scale=z_image.pipeline_guidance(scale))
    assert theirs.shape == (2, 3, 16, 16) and theirs.std() > 0.01
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def euler_with_options(bb, steps, scale, **options):
    """wadi's teacher sampling with the kind's guidance options (Euler on the guided velocity)."""
    sched = bb.process.sampler("euler")
    bb.set_timesteps(sched, steps)
    cond, x = bb.encode_prompts(PROMPTS), seeded_noise(bb.latent_shape, SEEDS, "cpu")
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(bb.guided(bb.net, x, t.expand(len(x)), cond, scale, **options), t, x).prev_sample
        return bb.decode(x) / 2 + 0.5


@pytest.mark.parametrize("scale,options", [
    (4.0, {"cfg_normalization": 1.0}),  # the cap binds: guided norms exceed the conditional ones
    (3.0, {"cfg_truncation": 0.2}),  # the last two of four steps (net times 0.25, 0.5) unguided
])
def test_guidance_options_are_the_pipelines(folder, bb, scale, options):
    ours = euler_with_options(bb, 4, scale, **options)
    theirs = stock_teacher(folder, bb, 4, guidance_scale=z_image.pipeline_guidance(scale), **options)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # Not a no-op on this pipeline, so the comparison tells them apart.
    assert (euler_with_options(bb, 4, scale) - ours).abs().max() > 1e-3


def test_the_guidance_options_are_the_pipelines_arguments_at_their_defaults():
    import inspect

    from diffusers import ZImagePipeline

    params = inspect.signature(ZImagePipeline.__call__).parameters
    for name, default in z_image.GUIDANCE_OPTIONS.items():
        assert params[name].default == default  # the pipeline's False is our 0.0: off


def test_schedule_is_a_static_shift_of_three(bb):
    assert z_image.image_tokens(bb) == 16 and bb.latent_shape == (16, 8, 8)
    s = torch.tensor(z_image.sigmas(4))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    times = torch.tensor([t.item() for t in bb.student_times()])
    assert times.tolist() == [1000.0]  # one step: from pure noise
    four = backbone(bb.spec.path, student_steps=4)
    torch.testing.assert_close(torch.stack(four.student_times()), 1000 * 3 * s / (1 + 2 * s))


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory):
    made = {}

    def get(steps):
        if steps not in made:
            made[steps] = distil("z-image", folder, tmp_path_factory.mktemp(f"z-run-{steps}"), steps)
        return made[steps]

    return get


@pytest.mark.parametrize("steps", [1, 4])
def test_the_export_reproduces_wadi_sample(runs, tmp_path, monkeypatch, steps):
    from tiny_pipes import stock_images

    run = runs(steps)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "wadi.json").read_text())
    assert info["pipeline"] == "ZImagePipeline" and info["call"]["num_inference_steps"] == steps
    assert info["call"]["guidance_scale"] == 0.0 and info["call"]["max_sequence_length"] == 24
    ours = student_images(run)
    theirs = stock_images(tmp_path / "export", PROMPTS, SEEDS, output_type="pt")
    assert (ours - theirs).abs().max() < 1 / 255
    teacher = wadi_teacher(backbone(info["base"]["path"], student_steps=steps), steps, 1.0)
    assert (ours - teacher).abs().max() > 1e-2, "the trained student should differ from its teacher"
    run_card(tmp_path / "export", monkeypatch)


def test_the_lora_export_loads_in_the_stock_pipeline_exactly(runs, folder, tmp_path, monkeypatch):
    from wadi.artifacts.students import load_student

    run = runs(1)
    assert main(["export", str(run), "--format", "lora", "--rank", "48", "--out", str(tmp_path / "lora")]) == 0
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


def refused(capsys, args, text):
    capsys.readouterr()  # what came before
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_what_does_not_fit_is_refused_in_one_line(folder, runs, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    run = [f"data.prompts={tmp_path / 'p.txt'}", f"run.root={tmp_path / 'runs'}", "train.mixed_precision=no"]
    refused(capsys, ["distill", "--config", "z-image-wadi", f"model.path={folder}", "model.kind=flux2-klein", *run],
            "is a z-image pipeline folder, not flux2-klein")
    refused(capsys, ["distill", "--config", "z-image-wadi", f"model.path={folder}", "model.resolution=18", *run],
            "must be a multiple of 4")
    refused(capsys, ["distill", "--config", "z-image-wadi", f"model.path={folder}", "model.resolution=16",
                     "train.guidance_options.cfg_scale=2", *run], "cfg_scale")
    refused(capsys, ["export", str(runs(1)), "--format", "lora-kohya", "--rank", "2", "--out", str(tmp_path / "o")],
            "has no lora-kohya export")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_params_of_the_released_model_and_the_presets_rank(capsys):
    """Z-Image 6B built from its released config without weights: 6.15B parameters, and the
    preset's rank is about the paper's tenth of them."""
    from wadi.engine.config import resolve

    rank = resolve("z-image-wadi").student.rank
    assert main(["params", "--model", "z-image-6b", "--rank", str(rank), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total"] / 1e9, 2) == 6.15 and 0.08 < out["fraction"] < 0.12


def test_guidance_options_reach_the_teacher_in_training(runs, folder, tmp_path):
    """Truncation at net time 0 leaves no training time guided: the run is the unguided one
    bit for bit, and not the guided one it would otherwise be."""
    from safetensors.torch import load_file

    def student(run):
        return load_file(str(run / "student.safetensors"))

    cut = distil("z-image", folder, tmp_path / "cut", 1, guidance=1.5, guidance_options={"cfg_truncation": 0.0})
    plain = distil("z-image", folder, tmp_path / "plain", 1, guidance=1.0)
    a, b, guided = student(cut), student(plain), student(runs(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], guided[k]) for k in a)

"""The flow-matching kinds (SD3 / SD3.5, Sana) against their stock diffusers pipelines:
conditioning exactly as the pipelines' own encode_prompt makes it, LoRA exports their
load_lora_weights reads (exact at full rank), and refusals of what does not fit.
(The stock pipelines reproducing `wadi sample`: test_sample_export.)"""

import inspect
import json

import pytest
import torch

from wadi.artifacts.students import load_student, load_teacher
from conftest import assert_close_ulps

from wadi.models.backbones import BackboneSpec, detect_kind
from wadi.cli import main

PROMPTS = ["a cat", "The red car  "]


def stock(bb, net=None):
    """The stock pipeline of a backbone's components (the teacher's net unless given)."""
    import diffusers

    return getattr(diffusers, bb.kind.pipeline)(vae=bb.vae, transformer=net or bb.net,
                                                 scheduler=bb.process.one_step_scheduler(), **bb.text)


@pytest.fixture(scope="module")
def backbones(tiny_run):
    return lambda kind: BackboneSpec(path=str(tiny_run(kind)[0]), resolution=32 if kind == "sana" else 16).load()


def test_folders_are_recognised_by_their_components(tiny_run):
    assert detect_kind(str(tiny_run("sd3")[0])) == "sd3"
    assert detect_kind(str(tiny_run("sana")[0])) == "sana"
    assert detect_kind(str(tiny_run("sd")[0])) == "sd"
    assert detect_kind("stabilityai/stable-diffusion-3.5-medium") == "sd3"
    assert detect_kind("Efficient-Large-Model/Sana_1600M_1024px_diffusers") == "sana"


def test_sd3_conditioning_is_the_pipelines(backbones):
    bb = backbones("sd3")
    cond, empty = bb.encode_prompts(PROMPTS), bb.empty_cond()
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = stock(bb).encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=bb.max_length)
    assert cond.mask is None and set(cond.extra) == {"pooled"}
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["pooled"], pooled, rtol=0, atol=0)
    # The pipeline encodes the empty prompt once per prompt, a batch of 2: another GEMM shape.
    assert_close_ulps(empty.embeds, neg[:1], what="the empty prompt's states")
    assert_close_ulps(empty.extra["pooled"], neg_pooled[:1], what="the empty prompt's pooled embedding")


def test_sana_conditioning_is_the_pipelines_with_its_instruction(backbones):
    from diffusers import SanaPipeline

    bb = backbones("sana")
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        embeds, mask, neg, neg_mask = stock(bb).encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=bb.max_length,
            complex_human_instruction=instruction)
    cond, empty = bb.encode_prompts(PROMPTS), bb.empty_cond()
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    assert torch.equal(cond.mask, mask) and torch.equal(empty.mask, neg_mask[:1])
    assert_close_ulps(empty.embeds, neg[:1], what="the empty prompt's states")  # encoded in a batch of 2 there
    plain = stock(bb).encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=bb.max_length)[0]
    assert not torch.allclose(cond.embeds, plain)  # the instruction changes the states


@pytest.fixture(scope="module")
def moved_run(tiny_run, tmp_path_factory):
    """A tiny student moved well off its teacher (a large learning rate)."""
    import tiny_pipes

    from wadi.engine.training import distill

    def make(kind):
        root = tmp_path_factory.mktemp(f"moved-{kind}")
        (root / "prompts.txt").write_text("a cat\na red car\n")
        cfg = tiny_pipes.make_cfg({kind: tiny_run(kind)[0], "prompts": root / "prompts.txt"}, root, kind=kind,
                                  steps=3, lr_student=3e-2)
        cfg.run.checkpoint_every = 0
        return distill(cfg, progress=False)

    return make


@pytest.mark.parametrize("kind", ["sd3", "sana"])
def test_lora_export_loads_in_the_stock_pipeline_exactly(moved_run, tmp_path, kind):
    run = moved_run(kind)
    assert main(["export", str(run), "--format", "lora", "--rank", "16", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0
    teacher, student = load_teacher(run), load_student(run)
    pipe = stock(teacher.backbone, teacher.net)
    pipe.load_lora_weights(tmp_path / "lora")
    bb = student.backbone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *bb.latent_shape, generator=g)
    t = bb.process.time(torch.tensor([999, 400]))
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        got, want = bb.predict(pipe.transformer, x, t, cond), bb.predict(student.net, x, t, cond)
        base = bb.predict(bb.net, x, t, cond)
    # float32 rounding of W + BA against the rotated W: far below the student's own change
    err, moved = (got - want).abs().max(), (want - base).abs().max()
    assert err < 1e-4 and moved > 20 * err, (err, moved)
    assert "FlowMatchEulerDiscreteScheduler" in (tmp_path / "lora" / "README.md").read_text()


def refused(capsys, args: list[str], text: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


def test_what_does_not_fit_a_flow_model_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    sd3, run = tiny_run("sd3")
    sd, _ = tiny_run("sd")
    out = str(tmp_path / "o")
    refused(capsys, ["sample", str(run), "--prompt", "a", "--one-step-abar", "0.0047", "--out", out],
            "one_step_abar")
    refused(capsys, ["export", str(run), "--format", "lora-kohya", "--out", out], "kohya")
    refused(capsys, ["sample", str(run), "--teacher", "--scheduler", "ddim", "--prompt", "a", "--out", out],
            "does not sample a flow model")
    (tmp_path / "p.txt").write_text("a cat\n")
    refused(capsys, ["distill", "--config", "sd3-wadi", f"model.path={sd}", f"data.prompts={tmp_path / 'p.txt'}",
                     "train.mixed_precision=no", f"run.root={tmp_path / 'runs'}"], "is a sd pipeline folder, not sd3")
    refused(capsys, ["distill", "--config", "sd3-wadi", "model.kind=hunyuan"], "unknown backbone kind 'hunyuan'")
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "o").exists()

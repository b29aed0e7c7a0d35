"""Qwen-Image students distilled on the tiny pipeline: one-step and four-step runs, their
exports called through QwenImagePipeline as wadi.json says (the one-step NaN of the released
scheduler avoided), the LoRA export through its load_lora_weights, refusals of what does not
fit, the preset and `wadi params` for the released 20B model."""

import json

import numpy as np
import pytest
import tiny_pipes
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from PIL import Image
from tiny_pipes_qwen import RESOLUTION, qwen_cfg, save_tiny_qwen

from wadi.artifacts.students import load_student
from wadi.cli import main
from wadi.engine.config import resolve
from wadi.engine.training import distill
from wadi.models.backbones import detect_kind
from wadi.models.sampling import sample_student

PROMPTS = ["a cat", "a red car"]
SEEDS = [0, 1]
PAIRS = [p for p in PROMPTS for _ in SEEDS], SEEDS * len(PROMPTS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The base folder, the prompt file, and a function steps -> a finished run of a student
    of that many steps, moved well off its teacher (a large learning rate)."""
    root = tmp_path_factory.mktemp("qwen-runs")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    base = save_tiny_qwen(root / "pipe")
    made = {}

    def run(steps: int):
        if steps not in made:
            made[steps] = distill(qwen_cfg(base, root / "prompts.txt", root / f"s{steps}", student_steps=steps, steps=3,
                                           lr_student=1e-1), progress=False)
        return made[steps]

    return base, root / "prompts.txt", run


def _pngs(folder):
    return [np.asarray(Image.open(folder / f"{k:05d}-seed{s}.png")) for k in range(len(PROMPTS)) for s in SEEDS]


@pytest.mark.parametrize("steps", [1, 4])
def test_the_export_through_its_wadi_json_call_is_wadi_sample(tiny, tmp_path, steps):
    base, _, make = tiny
    run = make(steps)
    args = ["sample", str(run), "--out", str(tmp_path / "samples"), "--seeds", "0-1"]
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "wadi.json").read_text())
    assert info["pipeline"] == "QwenImagePipeline" and info["base"]["kind"] == "qwen-image"
    assert info["call"] == {"num_inference_steps": steps, "true_cfg_scale": 1.0, "height": RESOLUTION,
                            "width": RESOLUTION, "max_sequence_length": 512}

    student = load_student(run)
    ours = sample_student(student.backbone, student.net, *PAIRS) / 2 + 0.5
    stock = tiny_pipes.stock_images(tmp_path / "export", *PAIRS, output_type="pt")
    assert (stock - ours).abs().max() < 1e-5  # the same float32 arithmetic in another order (measured 4e-7)
    for png, image in zip(_pngs(tmp_path / "samples"), tiny_pipes.stock_images(tmp_path / "export", *PAIRS)):
        assert np.abs(png.astype(int) - np.round(image * 255).astype(int)).max() <= 1
    teacher = sample_student(student.backbone, student.backbone.net, *PAIRS) / 2 + 0.5
    assert (teacher - ours).abs().max() > 4 / 255, "the trained student should differ from its teacher by more"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite([r["loss_student"], r["loss_fake"]]).all() and not r["skipped"]
                                 for r in log)
    # wadi reads the export back as the student
    args = ["sample", str(tmp_path / "export"), "--out", str(tmp_path / "again"), "--seeds", "0-1"]
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    for a, b in zip(_pngs(tmp_path / "samples"), _pngs(tmp_path / "again")):
        np.testing.assert_array_equal(a, b)


def test_the_released_scheduler_is_nan_at_one_step_and_the_exported_one_is_the_student(tiny, tmp_path):
    """Qwen-Image's scheduler stretches its last sigma to shift_terminal, which at one step
    divides by zero (diffusers' open bug); the export ships one without the stretch."""
    base, _, make = tiny
    assert main(["export", str(make(1)), "--out", str(tmp_path / "export")]) == 0
    shipped = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    assert shipped.config.shift_terminal == 0.02
    pipe = QwenImagePipeline.from_pretrained(tmp_path / "export", scheduler=shipped)
    pipe.set_progress_bar_config(disable=True)
    call = json.loads((tmp_path / "export" / "wadi.json").read_text())["call"]
    broken = pipe(prompt=PROMPTS[:1], generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    assert torch.isnan(broken).all()
    exported = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert exported.get("shift_terminal") is None and exported["use_dynamic_shifting"]
    images = tiny_pipes.stock_images(tmp_path / "export", PROMPTS[:1], [0], output_type="pt")
    assert torch.isfinite(images).all()


def test_the_lora_export_in_load_lora_weights_is_the_student(tiny, tmp_path):
    base, _, make = tiny
    run = make(1)
    assert main(["export", str(run), "--format", "lora", "--rank", "48", "--out", str(tmp_path / "lora")]) == 0
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["energy_min"] > 1 - 1e-9 and report["layers"] > 0  # full rank (48, the widest layer): every layer whole
    pipe = QwenImagePipeline.from_pretrained(
        base, scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    student = load_student(run)
    bb = student.backbone
    x = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(0))
    t = bb.process.time(torch.tensor([999, 400]))
    cond = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        got, want = bb.predict(pipe.transformer, x, t, cond), bb.predict(student.net, x, t, cond)
        base_pred = bb.predict(bb.net, x, t, cond)
    # float32 rounding of W + BA against the merged W: far below the student's own change
    err, moved = (got - want).abs().max(), (want - base_pred).abs().max()
    assert err < 1e-4 and moved > 20 * err, (err, moved)
    images = pipe(prompt=PAIRS[0], generator=[torch.Generator().manual_seed(s) for s in PAIRS[1]], output_type="pt",
                  **bb.pipeline_call()).images
    assert (images - (sample_student(bb, student.net, *PAIRS) / 2 + 0.5)).abs().max() < 1 / 255
    assert "QwenImagePipeline" in (tmp_path / "lora" / "README.md").read_text()


@pytest.mark.parametrize("fmt,extra", [("pipeline", []), ("lora", ["--rank", "8"])])
def test_the_cards_snippet_runs_as_written(tiny, tmp_path, monkeypatch, fmt, extra):
    from test_ecosystem import card_snippet

    assert main(["export", str(tiny[2](1)), "--format", fmt, "--out", str(tmp_path / fmt), *extra]) == 0
    language, code = card_snippet((tmp_path / fmt / "README.md").read_text())
    assert language == "python" and "QwenImagePipeline" in code and "true_cfg_scale=1.0" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "card", "exec"), {})
    assert np.asarray(Image.open(tmp_path / "image.png")).shape == (RESOLUTION, RESOLUTION, 3)


def refused(capsys, args: list[str], text: str, one_line: bool = True) -> None:
    """Exit 2 and one error line naming `text`; with one_line, nothing else on stderr (a
    refusal that comes at the first training step follows the progress bar's line)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and text in errors[0] and (len(err) == 1 or not one_line), err


def test_what_does_not_fit_is_refused_in_one_line(tiny, tmp_path, capsys):
    base, prompts, make = tiny
    sd = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    common = [f"data.prompts={prompts}", "train.mixed_precision=no", "train.adam_8bit=false", "train.steps=2",
              "train.batch_size=2", f"run.root={tmp_path / 'runs'}", "student.rank=2", "fake.rank=2"]
    distil = ["distill", "--config", "qwen-image-wadi", *common]
    refused(capsys, [*distil, f"model.path={sd}", "model.resolution=32"], "is a sd pipeline folder, not qwen-image")
    refused(capsys, [*distil, f"model.path={base}", "model.resolution=32", "model.kind=sd3"],
            "is a qwen-image pipeline folder, not sd3")
    refused(capsys, [*distil, f"model.path={base}", "model.resolution=36"], "must be a multiple of 8")
    refused(capsys, [*distil, f"model.path={base}", "model.resolution=32", "model.max_length=2000"],
            "beyond the 1024 text tokens")
    refused(capsys, [*distil, f"model.path={base}", "model.resolution=32", "train.guidance=0.5"],
            "below 1, where QwenImagePipeline's true CFG is off", one_line=False)
    assert not any((tmp_path / "runs").glob("*"))  # nothing left of the refused runs
    out = tmp_path / "o"
    refused(capsys, ["sample", str(base), "--teacher", "--guidance", "0.5", "--resolution", "32", "--prompt", "a cat",
                     "--out", str(out)], "below 1", one_line=False)
    refused(capsys, ["export", str(make(1)), "--format", "lora-kohya", "--rank", "2", "--out", str(out)],
            "has no lora-kohya export")
    assert not out.exists()


def test_folders_and_hub_ids_are_recognised(tiny):
    assert detect_kind(str(tiny[0])) == "qwen-image"
    assert detect_kind("Qwen/Qwen-Image") == "qwen-image"


def test_the_preset(tiny):
    cfg = resolve("qwen-image-wadi")
    assert cfg.model.kind == "qwen-image" and cfg.model.path == "Qwen/Qwen-Image" and cfg.model.resolution == 1024
    assert (cfg.student.rank, cfg.student.targets, cfg.fake.targets) == (128, "mmdit-student", "qwen-fake")


@pytest.mark.parametrize("role,rank,layers", [("student", 128, 844), ("fake", 32, 720)])
def test_params_of_the_released_20b_model(capsys, role, rank, layers):
    """The released transformer's 40.86 GB of bf16 weights are 20.43B parameters; the student
    takes 14 linear layers in each of 60 blocks and the 4 outside, the fake the blocks'
    12 without the two modulations."""
    assert main(["params", "--model", "qwen-image", "--role", role, "--rank", str(rank), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total"] / 1e9, 2) == 20.43 and out["layers"] == layers
    assert 0 < out["trainable"] < out["total"] / 10

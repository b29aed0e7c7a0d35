"""What a student's files carry and what `--force` may touch: a few-step student distilled at
a resolution and text length of its own samples the same from its run, its adapter file,
its merged folder and its export; options that contradict it are refused; a resumed run
refuses another teacher; `--force` writes into a folder but never into a run, a runs root
or the command's own input."""

import json
import shutil

import numpy as np
import pytest
import tiny_pipes
from PIL import Image

from wadi.cli import main
from wadi.engine.training import distill


def refused(capsys, args, text: str) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
    return err[0]


def png(folder, name="00000-seed0.png"):
    return np.asarray(Image.open(folder / name))


@pytest.fixture(scope="module")
def two_step(tmp_path_factory):
    """A two-step student distilled at 32 px (its base's own size is 16) and text length 8
    (the tokenizer's is 16): (base, run)."""
    root = tmp_path_factory.mktemp("artifacts")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, steps=2)
    cfg.model.resolution, cfg.model.max_length, cfg.model.student_steps = 32, 8, 2
    cfg.run.checkpoint_every = 0
    return pipes["sd"], distill(cfg, progress=False)


def sample(source, out, *extra) -> np.ndarray:
    assert main(["sample", str(source), "--prompt", "a red car", "--out", str(out), "--no-grid", *map(str, extra)]) == 0
    return png(out)


# --- a student carries its settings ------------------------------------------------------------

def test_a_few_step_student_samples_the_same_from_every_file_that_holds_it(two_step, tmp_path):
    base, run = two_step
    ours = sample(run, tmp_path / "run")
    assert ours.shape == (32, 32, 3)
    assert json.loads((tmp_path / "run" / "samples.json").read_text())["sampling"]["steps"] == 2
    for name, source in (("adapter", run / "student.safetensors"), ("merged", run / "student")):
        np.testing.assert_array_equal(sample(source, tmp_path / name, "--base", base), ours, err_msg=name)
    assert main(["export", str(run / "student.safetensors"), "--base", str(base), "--out", str(tmp_path / "e")]) == 0
    manifest = json.loads((tmp_path / "e" / "wadi.json").read_text())
    assert {k: manifest["base"][k] for k in ("student_steps", "resolution", "max_length", "one_step_abar")} == \
        {"student_steps": 2, "resolution": 32, "max_length": 8, "one_step_abar": 0.0047}
    assert manifest["process"]["prediction type"] == "epsilon" and manifest["process"]["beta_schedule"] == "scaled_linear"
    assert "num_inference_steps=2" in (tmp_path / "e" / "README.md").read_text()
    np.testing.assert_array_equal(sample(tmp_path / "e", tmp_path / "export"), ours)


def test_the_records_are_in_the_files(two_step):
    from safetensors import safe_open

    _, run = two_step
    with safe_open(str(run / "student.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["trained_with"])
    beside = json.loads((run / "student" / "wadi_student.json").read_text())
    assert record == beside
    assert record["spec"] == {"kind": "sd", "resolution": 32, "max_length": 8, "one_step_abar": 0.0047,
                              "student_steps": 2, "student_timesteps": None}
    assert record["process"]["process"] == "vp" and record["process"]["num_train_timesteps"] == 1000


@pytest.mark.parametrize("option, value, text", [
    ("--resolution", "16", "resolution 32, not 16"),
    ("--max-length", "12", "max length 8, not 12"),
    ("--one-step-abar", "0.01", "one step abar 0.0047, not 0.01"),
    ("--kind", "sdxl", "kind sd, not sdxl"),
])
def test_an_option_that_contradicts_the_student_is_refused(two_step, tmp_path, capsys, option, value, text):
    base, run = two_step
    for source in (run, run / "student.safetensors", run / "student"):
        refused(capsys, ["sample", source, "--base", base, "--prompt", "a", "--out", tmp_path / "o", option, value],
                text)
    assert not (tmp_path / "o").exists()


def test_the_same_value_as_recorded_is_no_contradiction(two_step, tmp_path):
    base, run = two_step
    ours = sample(run, tmp_path / "a")
    np.testing.assert_array_equal(sample(run / "student.safetensors", tmp_path / "b", "--base", base,
                                         "--resolution", "32", "--max-length", "8"), ours)


@pytest.mark.parametrize("option, value", [("--steps", "4"), ("--guidance", "2"), ("--scheduler", "dpm")])
def test_teacher_options_without_teacher_are_refused(two_step, tmp_path, capsys, option, value):
    _, run = two_step
    refused(capsys, ["sample", run, "--prompt", "a", "--out", tmp_path / "o", option, value],
            f"{option} is the teacher's")
    assert not (tmp_path / "o").exists()


def test_a_base_of_another_process_is_refused(two_step, tmp_path, capsys):
    """The adapter file on a copy of its base whose scheduler predicts v: the weights are the
    same, the process is not."""
    from diffusers import DDPMScheduler

    base, run = two_step
    other = tmp_path / "v-base"
    shutil.copytree(base, other)
    config = DDPMScheduler.load_config(other, subfolder="scheduler")
    DDPMScheduler.from_config(config, prediction_type="v_prediction").save_pretrained(other / "scheduler")
    refused(capsys, ["sample", run / "student.safetensors", "--base", other, "--prompt", "a",
                     "--out", tmp_path / "o"], "prediction type 'epsilon'")
    # an export's teacher (a LoRA is the student's change of it) is checked the same way
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    refused(capsys, ["export", tmp_path / "e", "--base", other, "--format", "lora", "--rank", "2",
                     "--out", tmp_path / "lora"], "prediction type 'epsilon'")


# --- --resume refuses another teacher ---------------------------------------------------------

def _stopped_run(tmp_path, kind: str, student_steps: int | None = None):
    """A run of one step with its checkpoint: (base, run)."""
    (tmp_path / "prompts.txt").write_text("a cat\n")
    saver = {"sd": tiny_pipes.save_tiny_sd,
             "pixel-mmdit": lambda p: tiny_pipes.save_tiny_pixel_mmdit(p, shift=3.0)}[kind]
    pipes = {kind: saver(tmp_path / kind), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, kind=kind, steps=1)
    cfg.model.student_steps = student_steps
    return pipes[kind], distill(cfg, progress=False)


def test_a_checkpoints_adapter_samples_in_the_students_steps(tmp_path):
    base, run = _stopped_run(tmp_path, "sd", student_steps=4)
    checkpoint = run / "checkpoints" / "step-0000001" / "student.safetensors"
    assert main(["sample", str(checkpoint), "--base", str(base), "--prompt", "a", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["sampling"]["steps"] == 4


def _rescheduled(base, **changes):
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.load_config(base, subfolder="scheduler"))
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("kind, change, text", [
    ("pixel-mmdit", {"shift": 1.0}, "flow shift was 3.0 when the run started and is 1.0 now"),
    ("sd", {"prediction_type": "v_prediction"}, "prediction type was 'epsilon' when the run started"),
    ("sd", {"beta_schedule": "linear"}, "beta_schedule was 'scaled_linear'"),
])
def test_resume_refuses_a_teacher_of_another_process(tmp_path, capsys, kind, change, text):
    base, run = _stopped_run(tmp_path, kind)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    _rescheduled(base, **change)
    refused(capsys, ["distill", "--resume", run, "train.steps=2"], text)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing trained


def test_resume_refuses_a_teacher_with_other_weights_and_takes_the_same_one(tmp_path, capsys):
    from conftest import tiny_unet

    base, run = _stopped_run(tmp_path, "sd")
    shutil.copytree(base / "unet", tmp_path / "unet-kept")
    tiny_unet(seed=1).save_pretrained(base / "unet")  # the same shapes, other values
    refused(capsys, ["distill", "--resume", run, "train.steps=2"], "the teacher has other weights")
    shutil.rmtree(base / "unet")
    shutil.copytree(tmp_path / "unet-kept", base / "unet")
    assert main(["distill", "--resume", str(run), "train.steps=2"]) == 0


def test_a_run_from_before_teachers_were_recorded_resumes_and_records_it(tmp_path):
    _, run = _stopped_run(tmp_path, "sd")
    recorded = json.loads((run / "teacher.json").read_text())
    assert recorded["kind"] == "sd" and recorded["process"]["prediction type"] == "epsilon"
    (run / "teacher.json").unlink()
    assert main(["distill", "--resume", str(run), "train.steps=2"]) == 0
    assert json.loads((run / "teacher.json").read_text()) == recorded


# --- --force -----------------------------------------------------------------------------------

def test_force_never_writes_into_a_run_a_runs_root_or_the_input(two_step, tmp_path, capsys):
    base, run = two_step
    root = run.parent
    def files():  # (a command's lock comes and goes beside its --out: folders' times change)
        return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    before = files()
    for args, text in (
            (["export", run, "--out", root, "--force"], "holds the run folder"),
            (["export", run, "--out", run, "--force"], "is the run folder"),
            (["export", run, "--format", "adapter", "--out", run, "--force"], "is the run folder"),
            (["export", run, "--out", run / "student", "--force"], "is inside the run folder"),
            (["sample", run, "--prompt", "a", "--out", root, "--force"], "holds the run folder"),
            (["sample", run, "--prompt", "a", "--out", run / "student", "--force"], "is inside the run folder"),
            (["export", run / "student.safetensors", "--base", base, "--format", "single-file", "--template",
              run / "student.safetensors", "--out", run / "student.safetensors", "--force"], "inside the run folder"),
    ):
        refused(capsys, args, text)
    assert files() == before  # nothing removed, nothing written


def test_force_never_writes_over_the_input(two_step, tmp_path, capsys):
    _, run = two_step
    export = tmp_path / "e"
    assert main(["export", str(run), "--out", str(export)]) == 0
    refused(capsys, ["export", export, "--out", export, "--force"], "overlaps the input")
    refused(capsys, ["sample", export, "--prompt", "a", "--out", export, "--force"], "overlaps the input")
    refused(capsys, ["export", export, "--out", export / "unet", "--force"], "overlaps the input")
    assert (export / "wadi.json").is_file() and (export / "unet" / "config.json").is_file()


def test_force_writes_into_a_folder_and_removes_nothing_else(two_step, tmp_path):
    _, run = two_step
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "unet").mkdir()
    (out / "unet" / "stale.bin").write_text("an older export's")
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine"  # not the export's: kept
    assert not (out / "unet" / "stale.bin").exists()  # the export's unet/ replaced the old one whole
    assert (out / "wadi.json").is_file() and not (tmp_path / "out.tmp").exists()
    samples = tmp_path / "s"
    assert main(["sample", str(out), "--prompt", "a", "--out", str(samples)]) == 0
    assert main(["sample", str(out), "--prompt", "a", "--out", str(samples), "--seeds", "1", "--force"]) == 0
    assert {p.name for p in samples.iterdir()} == {"00000-seed0.png", "00000-seed1.png", "grid.png", "samples.json"}
    assert json.loads((samples / "samples.json").read_text())["seeds"] == [1]  # replaced: the second call's


def test_force_means_the_same_in_every_command():
    from wadi.cli import build_parser
    from wadi.files.atomic import FORCE_HELP

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    helps = {name: action.help for name, p in commands.items() for action in p._actions
             if "--force" in action.option_strings}
    assert {"sample", "export", "analyze", "convert", "eval", "demo"} <= set(helps)
    for name, text in helps.items():
        if name != "digits-classifier":  # a file, not a folder: replaced
            assert text.startswith(FORCE_HELP), name

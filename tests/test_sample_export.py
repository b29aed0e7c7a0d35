"""`wadi sample` and `wadi export` on tiny runs: the stock diffusers pipelines reproduce the
one-step sampler bit for bit, and every kind of student source loads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_pipes
import torch
from PIL import Image
from safetensors.torch import save_file

from wadi.artifacts.students import load_student, load_teacher
from wadi.cli import main
from wadi.files.images import png_text, to_uint8
from wadi.models.backbones import BackboneSpec
from wadi.models.sampling import sample_student, sample_teacher

PROMPTS = ["a cat", "a red car"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def runs(tiny_run):
    """kind -> (base pipeline folder, finished run folder)."""
    return tiny_run


def read_png(path):
    return np.asarray(Image.open(path))


def cli_sample(source, out, *extra):
    args = ["sample", str(source), "--out", str(out), "--seeds", "0-1"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args + list(extra)) == 0
    return {(k, s): read_png(out / f"{k:05d}-seed{s}.png") for k in range(len(PROMPTS)) for s in SEEDS}


def stock_images(folder, output_type="np"):
    """The export's stock pipeline as its wadi.json says, for every prompt x seed."""
    return tiny_pipes.stock_images(folder, [p for p in PROMPTS for _ in SEEDS], SEEDS * len(PROMPTS), output_type)


@pytest.mark.parametrize("kind", ["sd", "pixart", "sdxl", "sd3", "sana"])
def test_stock_pipeline_reproduces_wadi_sample(runs, tmp_path, kind):
    base, run = runs(kind)
    ours = cli_sample(run, tmp_path / "samples")
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "wadi.json").read_text())
    assert info["base"]["kind"] == kind and info["base"]["path"] == str(base)

    # Pixels: the PNGs equal the stock pipeline's images exactly.
    stock = stock_images(tmp_path / "export", output_type="pil")
    for i, key in enumerate(ours):
        np.testing.assert_array_equal(ours[key], np.asarray(stock[i]))
    # Floats: the library sampler against the pipeline's [0, 1] tensors.
    student = load_student(run)
    expected = sample_student(student.backbone, student.net, [p for p in PROMPTS for _ in SEEDS], SEEDS * 2)
    got = stock_images(tmp_path / "export", output_type="pt")
    assert (got - (expected / 2 + 0.5)).abs().max().item() < 1e-6
    assert not torch.equal(expected, sample_student(student.backbone, student.backbone.net, PROMPTS * 2, SEEDS * 2)), \
        "the trained student should differ from its teacher"


def test_png_metadata_and_grid(runs, tmp_path):
    _, run = runs("sd")
    cli_sample(run, tmp_path)
    text = png_text(tmp_path / "00001-seed0.png")
    assert text["prompt"] == "a red car" and text["seed"] == "0" and text["role"] == "student"
    assert json.loads(text["sampling"])["steps"] == 1
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == ((2 * 17 + 1) * 8,) * 2  # 2 x 2 images of 16 px with 1 px borders, blown up 8x
    assert json.loads((tmp_path / "samples.json").read_text())["seeds"] == SEEDS


def test_pixel_export_loads_back(runs, tmp_path):
    _, run = runs("pixel")
    ours = cli_sample(run, tmp_path / "a")
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert not (tmp_path / "export" / "model_index.json").exists()  # no stock pipeline for this kind
    again = cli_sample(tmp_path / "export", tmp_path / "b")
    for key in ours:
        np.testing.assert_array_equal(ours[key], again[key])


def test_released_state_dict_and_adapter_only_files(runs, tmp_path):
    base, run = runs("sd")
    base = str(base)
    ours = cli_sample(run, tmp_path / "run")
    # The authors' layout: every tensor of a stock UNet in one flat safetensors file.
    student = load_student(run)
    released = tmp_path / "rotated_unet-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in student.net.state_dict().items()}, str(released))
    got = cli_sample(released, tmp_path / "released", "--base", base)
    # A diffusers model folder (what `wadi analyze --hybrids` writes) of the same weights.
    student.net.save_pretrained(tmp_path / "unet-folder")
    from_folder = cli_sample(tmp_path / "unet-folder", tmp_path / "folder-samples", "--base", base)
    assert main(["export", str(run), "--format", "adapter", "--fake", "--out", str(tmp_path / "adapter")]) == 0
    from_adapter = cli_sample(tmp_path / "adapter" / "student.safetensors", tmp_path / "adapter-samples", "--base", base)
    for key in ours:
        np.testing.assert_array_equal(ours[key], got[key])
        np.testing.assert_array_equal(ours[key], from_adapter[key])
        np.testing.assert_array_equal(ours[key], from_folder[key])
    assert (tmp_path / "adapter" / "fake.safetensors").is_file()


def test_released_file_with_wrong_keys_names_the_first(runs, tmp_path):
    base, run = runs("sd")
    state = load_student(run).net.state_dict()
    first = next(iter(state))
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k != first}, str(bad))
    with pytest.raises(ValueError, match=f"1 missing, 0 unexpected keys; first missing '{first}'"):
        load_student(bad, BackboneSpec(path=str(base)))
    with pytest.raises(ValueError, match="pass --base"):
        load_student(bad)
    folder = tmp_path / "other"  # a diffusers folder of another class than the base's denoiser
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match="holds a PixArtTransformer2DModel, the base model's denoiser is a "
                                         "UNet2DConditionModel"):
        load_student(folder, BackboneSpec(path=str(base)))


def test_teacher_sampling_matches_multi_step(runs, tmp_path):
    _, run = runs("sd")
    ours = cli_sample(run, tmp_path, "--teacher", "--steps", "2", "--guidance", "2.0")
    teacher = load_teacher(run)
    expected = sample_teacher(teacher.backbone, teacher.net, [p for p in PROMPTS for _ in SEEDS], SEEDS * 2,
                          steps=2, guidance=2.0)
    for i, key in enumerate(ours):
        np.testing.assert_array_equal(ours[key], to_uint8(expected)[i])
    assert png_text(tmp_path / "00000-seed0.png")["role"] == "teacher"


def test_guided_one_step_is_one_trailing_ddim_step(runs):
    # A teacher sampled in one step with guidance: the single step of DDIM with trailing
    # spacing starts at t = T-1 and, with alpha_0 = 1 and no clipping, returns its x0 prediction.
    _, run = runs("sd")
    teacher = load_teacher(run)
    bb = teacher.backbone
    guided = sample_student(bb, teacher.net, PROMPTS, SEEDS, guidance=3.0)
    from wadi.models.process import VP  # the export's DDIM, trailing, its last alpha the generator's 0.0047

    bb.process = VP(dict(bb.process.one_step_scheduler().config), bb.process.one_step_abar)
    ddim = sample_teacher(bb, teacher.net, PROMPTS, SEEDS, steps=1, guidance=3.0)
    assert (guided - ddim).abs().max().item() < 1e-5
    assert (guided - sample_student(bb, teacher.net, PROMPTS, SEEDS)).abs().max().item() > 1e-3


def test_refusals_are_one_line_errors(runs, tmp_path, capsys):
    _, run = runs("sd")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["sample", str(run), "--prompt", "a", "--out", str(tmp_path / "full")]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "full")]) == 2
    assert main(["sample", str(tmp_path / "nothing"), "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    assert main(["sample", str(run), "--prompt", "a", "--seeds", "x", "--out", str(tmp_path / "o")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "--force" in errors[0] and "--force" in errors[1]
    assert "does not exist" in errors[2] and "--seeds" in errors[3]


def test_students_read_exports_without_importing_the_exporter():
    """The manifest has its own module: loading a student does not pull in export.py (no cycle)."""
    code = "import sys, wadi.artifacts.students; assert 'wadi.artifacts.export' not in sys.modules, 'wadi.artifacts.export imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_normal_output_is_progress_and_one_summary_line(runs, tmp_path):
    """The libraries' logger warnings (tiny CLIP configs trigger transformers' token-id one;
    a machine without torchvision its image-processor one) stay out of what a user reads."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WADI_DEBUG", None)
    _, run = runs("sd")
    for args in (["export", str(run), "--out", str(tmp_path / "export")],
                 ["sample", str(tmp_path / "export"), "--prompt", "a cat", "--out", str(tmp_path / "s")]):
        done = subprocess.run([sys.executable, "-m", "wadi.cli", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.strip().splitlines()) == 1 and done.stdout.startswith("wrote "), done.stdout
        noise = [line for line in done.stderr.replace("\r", "\n").splitlines() if line and "sampling" not in line]
        assert noise == [], noise


def test_the_python_api_names_its_arguments_where_the_command_line_names_flags(runs, tmp_path, capsys):
    from wadi.artifacts.export import export_pipeline

    _, run = runs("sd")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x.bin is a torch state dict: pass allow_bin=True to read it"):
        load_student(tmp_path / "x.bin")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; pass force=True to write into it$"):
        export_pipeline(load_student(run), tmp_path / "out")
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not empty; pass --force to write into it" in capsys.readouterr().err

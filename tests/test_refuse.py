"""Inputs that cannot give a right result are refused before any work starts: one line,
exit 2, nothing written. Incomplete model folders, settings no model can run, crafted
manifests, ranks and templates that do not fit, options that would be ignored."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import tiny_pipes
from test_bad_inputs import refused


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """kind -> a tiny pipeline folder, saved once per module."""
    root = tmp_path_factory.mktemp("refuse")
    savers = {"sd": tiny_pipes.save_tiny_sd, "sd3": tiny_pipes.save_tiny_sd3, "sdxl": tiny_pipes.save_tiny_sdxl,
              "pixel-mmdit": tiny_pipes.save_tiny_pixel_mmdit}
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = savers[kind](root / kind)
        return made[kind]

    return get


def without_tensor(pipe: Path, component: str, key: str, to: Path) -> Path:
    """A copy of the pipeline folder `pipe` whose `component` lacks the tensor `key`."""
    shutil.copytree(pipe, to)
    file = next((to / component).glob("*.safetensors"))
    tensors = load_file(file)
    assert key in tensors, sorted(tensors)
    del tensors[key]
    save_file(tensors, str(file), metadata={"format": "pt"})
    return to


# --- incomplete model folders ------------------------------------------------------------

@pytest.mark.parametrize("kind, component, key", [
    ("sd3", "text_encoder_3", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),  # T5
    ("sdxl", "text_encoder_2", "text_projection.weight"),
    ("sd3", "transformer", "norm_out.linear.weight"),
    ("sd3", "vae", "decoder.conv_norm_out.weight"),
])
def test_a_component_missing_a_tensor_is_refused_not_filled(pipes, tmp_path, capsys, kind, component, key):
    broken = without_tensor(pipes(kind), component, key, tmp_path / "broken")
    out = tmp_path / "out"
    err = refused(capsys, ["sample", broken, "--teacher", "--steps", "1", "--prompt", "a cat", "--out", out,
                           "--resolution", "16"], "lacks 1 of its tensors", broken)
    assert key in err and component in err
    assert not out.exists()


def test_an_sdxl_folder_without_its_second_encoder_says_so(pipes, tmp_path, capsys):
    broken = tmp_path / "sdxl"
    shutil.copytree(pipes("sdxl"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    for kind in ([], ["--kind", "sdxl"], ["--kind", "sd"]):
        err = refused(capsys, ["sample", broken, "--teacher", "--steps", "1", "--prompt", "a cat", "--out",
                               tmp_path / "out", *kind], "a sdxl pipeline folder without text_encoder_2/", broken)
        assert "model.kind=sd" not in err
    assert not (tmp_path / "out").exists()


# --- settings no model can run ---------------------------------------------------------------

def distill_refused(capsys, pipe: Path, tmp_path: Path, kind: str, overrides: list[str], message: str) -> str:
    """`wadi distill` of a tiny `kind` run with `overrides` is refused, and leaves no runs root."""
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("a cat\na red car\n")
    cfg = tiny_pipes.make_cfg({kind: pipe, "prompts": prompts}, tmp_path, kind=kind, steps=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    err = refused(capsys, ["distill", "--config", config, *overrides], message, pipe, prompts)
    assert not (tmp_path / "runs").exists()
    return err


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "pixel-mmdit"])
def test_mask_prompts_is_refused_where_it_would_change_nothing(pipes, tmp_path, capsys, kind):
    distill_refused(capsys, pipes(kind), tmp_path, kind, ["data.mask_prompts=true"], "data.mask_prompts")


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    from wadi.files.prompts import read_prompts

    for name, text in [("p.txt", "a cat\nthe dog\n"), ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "the dog"}\n'),
                       ("p.json", json.dumps({"annotations": [{"caption": "a cat"}, {"caption": "the dog"}]}))]:
        (tmp_path / name).write_bytes("\ufeff".encode() + text.encode())
        assert read_prompts(tmp_path / name) == ["a cat", "the dog"], name


@pytest.mark.parametrize("kind, steps, most", [("pixel-mmdit", 100000, 1000), ("sd", 1001, 1000)])
def test_more_student_steps_than_the_schedule_has_are_refused(pipes, tmp_path, capsys, kind, steps, most):
    distill_refused(capsys, pipes(kind), tmp_path, kind, [f"model.student_steps={steps}"],
                    f"model.student_steps must be at most {most}")


@pytest.mark.parametrize("resolution, multiple", [(18, 4), (22, 4), (48, 4)])
def test_a_resolution_the_transformer_cannot_take_is_refused_before_the_run(pipes, tmp_path, capsys, resolution,
                                                                           multiple):
    # The tiny SD3: a VAE of factor 2, patches of 2, a position table of 8 patches (32 px).
    message = f"multiple of {multiple}" if resolution % multiple else "must be at most 32"
    distill_refused(capsys, pipes("sd3"), tmp_path, "sd3", [f"model.resolution={resolution}"], message)


def test_a_unet_resolution_the_vae_does_not_divide_is_refused(pipes, tmp_path, capsys):
    distill_refused(capsys, pipes("sd"), tmp_path, "sd", ["model.resolution=17"], "multiple of 2")


@pytest.mark.parametrize("timesteps, message", [([500, 999], "strictly decreasing"), ([999, 999], "strictly decreasing"),
                                                ([999, 1500], "strictly decreasing"),
                                                ([1500, 400], "must start at 999")])
def test_a_crafted_manifest_with_impossible_timesteps_is_refused(tiny_run, tmp_path, capsys, timesteps, message):
    from wadi.cli import main

    _, run = tiny_run("sd")
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    manifest = json.loads((export / "wadi.json").read_text())
    manifest["base"].update(student_steps=2, student_timesteps=timesteps)
    (export / "wadi.json").write_text(json.dumps(manifest))
    err = refused(capsys, ["sample", export, "--prompt", "a cat", "--out", tmp_path / "out"], message, export)
    assert "wadi.json" in err
    assert not (tmp_path / "out").exists()


# --- exports that cannot be written right -----------------------------------------------------

def test_a_lora_rank_beyond_the_widest_layer_is_capped_there(tiny_run, tmp_path, capsys):
    import torch

    from wadi.cli import main
    from wadi.artifacts.students import load_student, teacher_for

    _, run = tiny_run("sd")
    student = load_student(run)
    teacher = teacher_for(student)
    widest = max(min(m.weight.shape) for n, m in student.net.named_modules()
                 if isinstance(m, torch.nn.Linear) and not torch.equal(m.weight, teacher.net.get_submodule(n).weight))
    assert main(["export", str(run), "--format", "lora", "--rank", "3000", "--out", str(tmp_path / "lora")]) == 0
    assert f'"rank": {widest},' in capsys.readouterr().out
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report["rank"] == widest and report["energy_min"] > 1 - 1e-9  # exact, without padding past it
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert {t.shape[0] for k, t in lora.items() if "lora_A" in k} == {widest}
    assert f"rank {widest} " in (tmp_path / "lora" / "README.md").read_text()


@pytest.mark.parametrize("template", ["sd", "junk"])
def test_an_sdxl_single_file_export_on_another_models_template_is_one_line(tiny_run, pipes, tmp_path, capsys,
                                                                          template):
    import torch

    _, run = tiny_run("sdxl")
    file = tmp_path / "template.safetensors"
    if template == "sd":
        tiny_pipes.save_template(pipes("sd"), file)
    else:
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3), "junk": torch.ones(2)}, str(file))
    refused(capsys, ["export", run, "--format", "single-file", "--template", file, "--out", tmp_path / "out"],
            "template", run, file)
    assert not (tmp_path / "out").exists()


# --- options that would be ignored or misread ---------------------------------------------------

@pytest.mark.parametrize("lr", ["inf", "nan", "0", "-1e-3"])
def test_a_digits_teacher_learning_rate_that_cannot_train_is_refused(tmp_path, capsys, lr):
    refused(capsys, ["digits-teacher", "--out", tmp_path / "t", "--steps", "2", f"--lr={lr}"],
            "must be a positive number")
    assert not (tmp_path / "t").exists()


def test_digits_teacher_on_an_existing_folder_does_not_offer_a_force_it_lacks(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    err = refused(capsys, ["digits-teacher", "--out", tmp_path / "t", "--steps", "2"], "exists", tmp_path / "t")
    assert "--force" not in err


def bin_pipe(pipe: Path, to: Path, component: str, damage: bytes | None = None) -> Path:
    """A copy of `pipe` whose `component` holds its weights as a torch .bin (`damage`: those bytes instead)."""
    import torch

    shutil.copytree(pipe, to)
    file = next((to / component).glob("*.safetensors"))
    name = "pytorch_model.bin" if component.startswith("text_encoder") else "diffusion_pytorch_model.bin"
    torch.save(load_file(file), to / component / name)
    file.unlink()
    if damage is not None:
        (to / component / name).write_bytes(damage)
    return to


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_allow_bin_reads_the_teachers_bin_weights(pipes, tmp_path, capsys, component):
    from wadi.cli import main

    base = bin_pipe(pipes("sd"), tmp_path / "bin", component)
    args = ["sample", str(base), "--teacher", "--steps", "1", "--prompt", "a cat", "--resolution", "16", "--out"]
    refused(capsys, [*args, tmp_path / "refused"], "safetensors", base)  # not without --allow-bin
    assert main([*args, str(tmp_path / "out"), "--allow-bin"]) == 0
    assert (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.parametrize("damage", [b"junk" * 100, b"", b"\x80\x04\x95"])
def test_a_damaged_bin_text_encoder_is_one_line(tiny_run, tmp_path, capsys, damage):
    pipe, run = tiny_run("sd")
    base = bin_pipe(pipe, tmp_path / "bin", "text_encoder", damage)
    for model in (["--teacher", "--steps", "1", base], [run / "student.safetensors", "--base", base]):
        refused(capsys, ["sample", *model, "--prompt", "a cat", "--allow-bin", "--out",
                         tmp_path / "out"], "its weights file is unreadable", base)
        assert not (tmp_path / "out").exists()

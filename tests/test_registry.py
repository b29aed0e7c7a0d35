"""The backbone registry: kinds declare what they can do, nothing else asks a kind by name,
and the noise process refuses what it does not know (classes and values), before work."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from wadi.cli import main
from wadi.models.process import Flow, process_of
from wadi.models.registry import KINDS, detect_kind

SRC = Path(__file__).resolve().parents[1] / "src" / "wadi"
SD = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
      "beta_schedule": "scaled_linear"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1's scheduler config (its released scheduler_config.json values).
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}


def test_no_module_outside_the_registry_compares_a_kind_name():
    """A kind's capabilities are declared in its registry entry: a comparison with a kind's
    name anywhere else (`kind.name == "sd"`, `name in ("sd", "sdxl")`) is a fact without an owner."""
    owners = {SRC / "models" / "registry.py", *(SRC / "models" / "kinds").glob("*.py")}
    found = []
    for path in SRC.rglob("*.py"):
        if path in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and const.value in KINDS:
                        found.append(f"{path.relative_to(SRC)}:{node.lineno} {const.value!r}")
    assert not found, found


def test_an_edm_scheduler_is_refused_not_read_as_vp():
    edm = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5,
           "num_train_timesteps": 1000}
    with pytest.raises(ValueError, match="EDMEulerScheduler.*not a noise process wadi knows; supported: "):
        process_of(edm)


@pytest.mark.parametrize("config,text", [
    ({**FLOW, "shift": -1}, "shift=-1 must be a positive"),
    ({**FLOW, "shift": 0}, "shift=0 must be a positive"),
    ({**FLOW, "shift": float("nan")}, "shift=nan must be a positive"),
    ({**SD, "beta_schedule": "foo"}, "beta_schedule='foo' is not one of"),
    ({**SD, "num_train_timesteps": 0}, "num_train_timesteps=0 must be an integer"),
    ({**FLOW, "num_train_timesteps": 0}, "num_train_timesteps=0 must be an integer"),
    ({**SD, "beta_end": 1.5}, "beta_end=1.5 must satisfy"),
    ({**FLOW, "shift_terminal": 2.0}, "shift_terminal=2.0 must be"),
    ({**FLUX, "time_shift_type": "cubic"}, "cannot be"),
    ([1, 2], "JSON list, not an object"),
])
def test_scheduler_values_that_cannot_be_are_refused(config, text):
    with pytest.raises(ValueError, match=text):
        process_of(config, image_tokens=256)


def test_a_scheduler_config_that_is_not_an_object_is_one_line_through_the_cli(tiny_run, tmp_path, capsys):
    import shutil

    base = tmp_path / "sd"
    shutil.copytree(tiny_run("sd")[0], base)
    (base / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    capsys.readouterr()  # the fixture's own output
    assert main(["sample", "--teacher", str(base), "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a JSON object" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("tokens", [64, 1024, 4096])
def test_the_dynamic_shift_is_the_stock_schedulers_at_the_image_size(tokens):
    """FLUX's pipeline sets sigmas 1 .. 1/N shifted by mu(tokens); our training times and
    student times at that size are the same numbers."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flow = Flow(FLUX, image_tokens=tokens)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert flow.shift == pytest.approx(math.exp(mu), rel=1e-12)
    stock = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    stock.set_timesteps(sigmas=sigmas, mu=mu)
    ours = flow.time(torch.tensor([999, 749, 499, 249]))  # index i is sigma (i + 1) / N before the shift
    torch.testing.assert_close(ours, stock.timesteps.float(), rtol=1e-6, atol=1e-3)


def test_a_dynamic_shift_needs_the_image_size():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        process_of(FLUX)


def test_the_student_scheduler_of_a_terminal_stretched_flow_samples_one_step():
    """Qwen-Image ships shift_terminal 0.02, which gives NaN sigmas for one step: the
    student's schedulers never carry the teacher's stretch."""
    config = {**FLUX, "shift_terminal": 0.02}
    flow = Flow(config, image_tokens=1024)
    sched = flow.student_scheduler(1, sigmas=True)
    flow.set_timesteps(sched, 1, lambda n: [1.0])
    assert sched.sigmas.tolist() == [1.0, 0.0]


def test_hub_ids_of_unknown_models_are_refused_not_read_as_sd():
    with pytest.raises(ValueError, match="cannot tell which kind of model.*give model.kind"):
        detect_kind("playgroundai/playground-v2.5-1024px-aesthetic")
    assert detect_kind("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert detect_kind("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd"


def test_a_folder_is_recognised_by_its_pipeline_class(tiny_run, tmp_path):
    import shutil

    base = tmp_path / "sdxl-named"
    shutil.copytree(tiny_run("sd")[0], base)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert detect_kind(str(base)) == "sd"
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="a sdxl pipeline folder without text_encoder_2/, tokenizer_2/"):
        detect_kind(str(base))  # the pipeline's own word: an SDXL folder missing its second encoder


@pytest.mark.parametrize("kind,fmt", [("pixart", "lora"), ("sd3", "lora-kohya"), ("sana", "single-file")])
def test_exports_a_kind_does_not_declare_are_one_line(tiny_run, tmp_path, capsys, kind, fmt):
    _, run = tiny_run(kind)
    capsys.readouterr()
    extra = {"lora": ["--rank", "2"], "lora-kohya": ["--rank", "2"], "single-file": ["--template", str(tmp_path / "t")]}
    assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "o"), *extra[fmt]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"has no {fmt} export" in err and not (tmp_path / "o").exists()


def test_a_ddpm_config_made_in_code_without_a_class_name_is_vp():
    from wadi.models.process import VP

    assert isinstance(process_of({k: v for k, v in SD.items() if k != "_class_name"}), VP)
    with pytest.raises(ValueError, match="not a noise process"):
        process_of({"sigma_min": 0.002, "sigma_max": 80.0})  # an EDM-shaped config without its class

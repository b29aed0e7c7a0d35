"""The single-file export: the template must be the base model in every component, its
metadata is kept, --dtype is honoured (by the LoRA exports too), and the flow kinds are
refused with the reason."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_pipes
from wadi.cli import main
from wadi.engine.training import distill


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, steps=2, lr_student=3e-2)
    cfg.run.checkpoint_every = 0
    return pipes["sd"], distill(cfg, progress=False)


def export(run, tmp_path, template, out="single", *extra) -> int:
    return main(["export", str(run), "--format", "single-file", "--template", str(template),
                 "--out", str(tmp_path / out), *extra])


@pytest.mark.parametrize("key, factor, part", [
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", 1.05, "text encoder"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", 1 + 1e-3, "text encoder"),
    ("first_stage_model.decoder.conv_out.weight", 1.02, "VAE"),
    ("model.diffusion_model.out.2.weight", 1.01, "UNet")])  # within the old check's rtol of 2e-2
def test_a_template_that_is_not_the_base_is_refused(run, tmp_path, capsys, key, factor, part):
    base, folder = run
    template = tiny_pipes.save_template(base, tmp_path / "scaled.safetensors", **{key: factor})
    capsys.readouterr()
    assert export(folder, tmp_path, template) == 2
    err = capsys.readouterr().err.strip()
    assert f"the template's {part} is not the base model's" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "single").exists()


def test_a_template_without_its_text_encoder_or_vae_is_refused(run, tmp_path, capsys):
    from safetensors.torch import save_file

    base, folder = run
    full = load_file(str(tiny_pipes.save_template(base, tmp_path / "full.safetensors")))
    for left_out, said in (("cond_stage_model.", "no text encoder"), ("first_stage_model.", "no VAE")):
        save_file({k: v for k, v in full.items() if not k.startswith(left_out)}, str(tmp_path / "part.safetensors"))
        assert export(folder, tmp_path, tmp_path / "part.safetensors") == 2
        assert f"the template holds {said}" in capsys.readouterr().err


def test_the_templates_metadata_is_kept_with_a_note_and_dtype_is_honoured(run, tmp_path):
    base, folder = run
    template = tiny_pipes.save_template(base, tmp_path / "base.safetensors")
    assert export(folder, tmp_path, template, "fp32") == 0
    assert export(folder, tmp_path, template, "fp16", "--dtype", "fp16") == 0
    with safe_open(str(tmp_path / "fp16" / "student.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny base" and meta["modelspec.license"] == "test"
    assert "1-step student" in meta["wadi.changes"] and "cast to float16" in meta["wadi.changes"]
    fp32, fp16 = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("fp32", "fp16"))
    assert {v.dtype for v in fp32.values()} == {torch.float32} and {v.dtype for v in fp16.values()} == {torch.float16}
    for k, v in fp32.items():  # the same checkpoint, rounded once
        assert torch.equal(fp16[k], v.half()), k


@pytest.mark.parametrize("fmt, file", [("lora", "pytorch_lora_weights.safetensors"),
                                       ("lora-kohya", "lora_kohya.safetensors")])
def test_lora_exports_honour_dtype(run, tmp_path, fmt, file):
    _, folder = run
    for dtype in ("fp32", "fp16"):
        assert main(["export", str(folder), "--format", fmt, "--rank", "4", "--dtype", dtype,
                     "--out", str(tmp_path / dtype)]) == 0
    fp32, fp16 = (load_file(str(tmp_path / d / file)) for d in ("fp32", "fp16"))
    weights = [k for k in fp32 if fp32[k].is_floating_point()]
    assert weights and all(fp16[k].dtype == torch.float16 and torch.equal(fp16[k], fp32[k].half()) for k in weights)


@pytest.mark.parametrize("kind", ["sd3", "sana"])
def test_flow_kinds_refuse_the_single_file_layout_with_the_reason(tmp_path, capsys, kind):
    base = getattr(tiny_pipes, f"save_tiny_{kind}")(tmp_path / kind)
    (tmp_path / "template.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert main(["export", str(base / "transformer"), "--base", str(base), "--format", "single-file",
                 "--template", str(tmp_path / "template.safetensors"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the {kind} kind has no single-file export" in err
    assert "diffusers converts that layout only into its own" in err and not (tmp_path / "out").exists()

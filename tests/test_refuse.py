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
from wadi.backbones import BackboneSpec


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

"""`wadi plan` against measured peaks of tiny runs: the plan plays a student update on an
empty copy of the architecture; the measurement runs the engine's real step."""

import json

import pytest
import torch

import tiny_pipes
from tiny_pipes import make_cfg
from wadi.cli import main

PROMPTS = "a photo of a cat\na red car\nthe digit seven\na dog on the table\n"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    (root / "prompts.txt").write_text(PROMPTS)
    return {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "sd3": tiny_pipes.save_tiny_sd3(root / "sd3"),
            "prompts": root / "prompts.txt"}


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def measured_peak(cfg) -> int:
    """Bytes of the denoiser's weights, the adapters and the optimizer state, plus the most
    that the operations of one training step (the second: the optimizer state exists) hold
    at once. Prompts are encoded beforehand (the plan leaves the text encoders out)."""
    from accelerate import Accelerator

    from wadi.distill import Distiller
    from wadi.plan import LiveBytes
    from wadi.training import prepare

    prompts, bb = prepare(cfg)
    d = Distiller(cfg, bb, prompts, Accelerator(cpu=True))
    d.train_step()
    state = [v for opt in (d.opt_s, d.opt_f) for s in opt.state.values() for v in s.values()
             if torch.is_tensor(v) and v.dim()]
    held = storage_bytes([*bb.net.parameters(), *state])
    live = LiveBytes()
    with live:
        d.train_step()
    return held + live.peak


@pytest.mark.parametrize("kind, checkpointing", [("sd", False), ("sd", True), ("sd3", False), ("sd3", True)])
def test_the_plan_is_within_a_fifth_of_a_tiny_runs_measured_peak(pipes, tmp_path, capsys, kind, checkpointing):
    cfg = make_cfg(pipes, tmp_path, kind=kind, gradient_checkpointing=checkpointing)
    cfg.data.cache_embeddings = True
    measured = measured_peak(cfg)
    from wadi.backbones import BackboneSpec

    bb = BackboneSpec(kind=kind, path=str(pipes[kind]), resolution=16).load()
    tokens = bb.encode_prompts(["a cat"]).embeds.shape[1]
    from wadi.plan import plan
    with torch.device("meta"):
        net = type(bb.net).from_config(bb.net.config)
    planned = plan(net, kind, cfg.student, cfg.fake, bb.latent_shape[-1], cfg.train.batch_size,
                   checkpointing=checkpointing, tokens=tokens)
    assert 0.8 <= planned.total / measured <= 1.2, (planned.to_dict(), measured)

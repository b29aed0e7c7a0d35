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

    from wadi.engine.distiller import Distiller
    from wadi.engine.plan import LiveBytes
    from wadi.engine.training import prepare

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
def test_the_plan_is_within_a_fifth_of_a_tiny_runs_measured_peak(pipes, tmp_path, kind, checkpointing):
    from wadi.engine.plan import plan

    cfg = make_cfg(pipes, tmp_path, kind=kind, gradient_checkpointing=checkpointing)
    cfg.data.cache_embeddings = True
    measured = measured_peak(cfg)
    bb = cfg.model.load()
    tokens = bb.encode_prompts(["a cat"]).embeds.shape[1]
    with torch.device("meta"):
        net = type(bb.net).from_config(bb.net.config)
    planned = plan(net, kind, cfg.student, cfg.fake, bb.latent_shape[-1], cfg.train.batch_size,
                   checkpointing=checkpointing, tokens=tokens)
    assert 0.8 <= planned.total / measured <= 1.2, (planned.to_dict(), measured)


def test_wadi_plan_prints_the_parts_and_shards_the_base_under_fsdp2(pipes, capsys):
    plans = {}
    for parallel in ("ddp", "fsdp2"):
        assert main(["plan", "--model", str(pipes["sd"]), "--resolution", "16", "--batch", "2", "--processes", "2",
                     "--parallel", parallel, "--precision", "no", "--student", "lora:4", "--json"]) == 0
        plans[parallel] = json.loads(capsys.readouterr().out)
    ddp, fsdp = plans["ddp"], plans["fsdp2"]
    assert ddp["total"] == sum(ddp[k] for k in ("frozen", "adapters", "optimizer", "activations"))
    assert ddp["frozen"] / 2 < fsdp["frozen"] < ddp["frozen"]  # a half, and one unit gathered whole
    assert {k: v for k, v in fsdp.items() if k not in ("frozen", "total")} == {
        k: v for k, v in ddp.items() if k not in ("frozen", "total")}


@pytest.mark.parametrize("args, message", [
    (["--resolution", "15"], "--resolution must be a multiple of 8"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--student", "lorad"], "--student must be KIND:RANK"),
    (["--model", "sana-0.6b"], "wadi plan knows the inputs of sd, sdxl, sd3, not sana"),
])
def test_bad_plan_requests_end_in_one_line(pipes, capsys, args, message):
    base = ["plan", "--model", str(pipes["sd"]), "--resolution", "16"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err

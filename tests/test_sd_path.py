"""The settings Stable Diffusion users train with, on a tiny SD pipeline: mixed precision,
gradient checkpointing, accumulation, warm-up and schedules, EMA, the 8-bit optimizer's
fallback, and what happens to non-finite scores."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import tiny_pipes
import torch
import yaml
from safetensors.torch import load_file

from wadi.cli import main
from wadi.engine.config import resolve
from wadi.engine.training import distill


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-path")
    (root / "prompts.txt").write_text("a photo of a cat\na red car\nthe digit seven\na dog on the table\n")
    return {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}


def run(pipes, tmp_path, steps=2, **train):
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, steps=steps, **train)
    cfg.run.checkpoint_every = 1
    return distill(cfg, progress=False)


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def adapters(run_dir, which="student"):
    return load_file(str(run_dir / f"{which}.safetensors"))


def assert_same_adapters(a, b, atol=1e-5):
    """Equal up to the order of float sums: Adam turns a last-bit difference in a gradient
    near zero into ~1e-6; different data or noise moves the angles by ~lr = 1e-4."""
    for which in ("student", "fake"):
        x, y = adapters(a, which), adapters(b, which)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol)


def test_grad_accum_equals_one_step_of_the_whole_batch(pipes, tmp_path):
    accumulated = run(pipes, tmp_path / "a", grad_accum=2, batch_size=2)
    whole = run(pipes, tmp_path / "b", grad_accum=1, batch_size=4)
    assert_same_adapters(accumulated, whole)
    for x, y in zip(log(accumulated), log(whole)):  # sums in another order: float rounding, relative 1e-5
        assert x["loss_student"] == pytest.approx(y["loss_student"], rel=1e-4)
        assert x["grad_norm_student"] == pytest.approx(y["grad_norm_student"], rel=1e-4)
        assert x["grad_norm_fake"] == pytest.approx(y["grad_norm_fake"], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(pipes, tmp_path):
    on = run(pipes, tmp_path / "on", gradient_checkpointing=True)
    off = run(pipes, tmp_path / "off", gradient_checkpointing=False)
    for x, y in zip(log(on), log(off)):
        assert x["grad_norm_student"] == pytest.approx(y["grad_norm_student"], rel=1e-6)
        assert x["grad_norm_fake"] == pytest.approx(y["grad_norm_fake"], rel=1e-6)
    assert_same_adapters(on, off)


def test_bf16_autocast_on_the_cpu_is_finite_and_close_to_fp32(pipes, tmp_path):
    # accelerate fixes a process's precision at its first Accelerator: bf16 runs in its own process
    cfg = tiny_pipes.make_cfg(pipes, tmp_path / "bf16", steps=2, mixed_precision="bf16")
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    done = subprocess.run([sys.executable, "-m", "wadi.cli", "distill", "--no-progress", "--config",
                           str(tmp_path / "bf16.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    bf16 = next((tmp_path / "bf16" / "runs").iterdir())
    fp32 = run(pipes, tmp_path / "fp32", mixed_precision="no")
    for x, y in zip(log(bf16), log(fp32)):
        assert math.isfinite(x["loss_student"]) and math.isfinite(x["loss_fake"]) and x["skipped"] == 0
        assert x["loss_fake"] == pytest.approx(y["loss_fake"], rel=0.05)  # bf16 keeps ~3 digits
        # (the student's early gradients are differences of two nearly equal nets' scores,
        # which bf16 cancels to a few bits: finite, not close)
    # the adapter weights themselves stay float32
    assert all(t.dtype == torch.float32 for t in adapters(bf16).values())


def test_warmup_and_cosine_schedule_as_documented(pipes, tmp_path):
    """lr(step) = lr * min(1, (step + 1) / warmup) * schedule, the schedule decaying over the
    steps after warm-up: cosine to 0 at the last step."""
    r = run(pipes, tmp_path, steps=6, warmup_steps=2, lr_schedule="cosine", lr_student=1e-3, lr_fake=1e-2)
    for record in log(r):
        step = record["step"] - 1  # the lr a step trains with
        ramp = min(1, (step + 1) / 2)
        decay = 0.5 * (1 + math.cos(math.pi * max(0, step - 2) / 4))
        assert record["lr_student"] == pytest.approx(1e-3 * ramp * decay)
        assert record["lr_fake"] == pytest.approx(1e-2 * ramp * decay)


def test_ema_is_the_one_final_student(pipes, tmp_path):
    """With train.ema_decay the final student (student.safetensors, student/, every export)
    is the EMA of the adapter: diffusers' EMAModel, whose decay ramps as k / (9 + k) up to
    ema_decay. The raw adapter stays in the checkpoints."""
    decay, steps = 0.5, 3
    r = run(pipes, tmp_path, steps=steps, ema_decay=decay)
    raw = [adapters(r / "checkpoints" / f"step-{s:07d}") for s in range(1, steps + 1)]
    ema = dict(raw[0])  # the first update copies the weights
    for k in range(2, steps + 1):
        d = min(decay, k / (9 + k))
        ema = {n: d * ema[n] + (1 - d) * raw[k - 1][n] for n in ema}
    final = adapters(r)
    for n in ema:
        torch.testing.assert_close(final[n], ema[n], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(final[n], raw[-1][n]) for n in final)

    # the merged student/ and the adapter file sample the same images
    a, b = tmp_path / "from-run", tmp_path / "from-adapter"
    assert main(["sample", str(r), "--prompt", "a cat", "--out", str(a), "--no-grid"]) == 0
    assert main(["sample", str(r / "student.safetensors"), "--base", str(pipes["sd"]), "--resolution", "16",
                 "--prompt", "a cat", "--out", str(b), "--no-grid"]) == 0
    from wadi.files.images import read_images

    assert (read_images([a / "00000-seed0.png"]) == read_images([b / "00000-seed0.png"])).all()


def test_8bit_adam_without_bitsandbytes_warns_once(pipes, tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(pipes, tmp_path, adam_8bit=True)
    assert sum("bitsandbytes is not installed" in str(w.message) for w in caught) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_cuda_refuses_at_once(pipes, tmp_path, capsys):
    cfg = tiny_pipes.make_cfg(pipes, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["distill", "--config", str(path), "train.mixed_precision=fp16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bf16" in err and "fp16" in err
    assert not (tmp_path / "runs").exists()


def test_mixed_precision_no_from_the_command_line_and_yaml(tmp_path):
    assert resolve("sd15-wadi", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("preset: sd15-wadi\ntrain:\n  mixed_precision: no\n  gradient_checkpointing: yes\n")
    cfg = resolve(str(f))
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True


def test_non_finite_scores_are_counted_then_skip_the_step(pipes, tmp_path, monkeypatch):
    """nan_to_num keeps isolated non-finite score elements from the loss (the authors'
    guard); a step whose scores are non-finite beyond a small share is skipped, and a
    streak of them stops the run (train.max_nonfinite)."""
    from wadi.models.process import VP

    real, poison = VP.score_difference, {"share": 0.0}

    def poisoned(*args):
        g = real(*args)
        g.view(-1)[:max(1, int(poison["share"] * g.numel()))] = float("nan")
        return g

    monkeypatch.setattr(VP, "score_difference", poisoned)
    poison["share"] = 0.0  # one element of 512 per step: counted, zeroed, not skipped
    few = run(pipes, tmp_path / "few", steps=2)
    assert [(r["skipped"], r["nonfinite_scores"]) for r in log(few)] == [(0, 1), (0, 1)]
    poison["share"] = 0.5  # half the scores: every step skipped, the run stops after 2
    with pytest.raises(RuntimeError, match="non-finite"):
        run(pipes, tmp_path / "many", steps=4, max_nonfinite=2)
    assert not (next((tmp_path / "many" / "runs").iterdir()) / "student.safetensors").exists()
    assert main(["distill", "--config", "sd15-wadi", "train.guidance=nan"]) == 2  # refused up front

"""Students of several steps: the re-noising between steps against independent
transcriptions of DDIM (eta 0) and flow-matching Euler, the N-step sampler against the
stock schedulers, the backward simulation of training, the stock pipelines with
`num_inference_steps=N`, resume, and settings that cannot be."""

import importlib
import json

import numpy as np
import pytest
import tiny_pipes
import torch

from conftest import assert_close_ulps
from wadi.cli import main
from wadi.engine.training import distill
from wadi.models.process import VP, Flow, run_student, student_times

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def oracle(x, t):
    """A made-up prediction that depends on the input and the time."""
    return torch.tanh(x) * 0.7 + (t.float().view(-1, 1, 1, 1) / 1000) * 0.3


def sd_abar(t):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1 - betas)[t])


def test_default_timesteps_are_evenly_spaced_as_dmd2s():
    assert student_times(VP(SD_SCHEDULE), 4) == [999, 749, 499, 249]
    assert student_times(VP(SD_SCHEDULE), 2) == [999, 499]
    assert student_times(Flow({**FLOW, "shift": 1.0}), 4) == [1000.0, 750.0, 500.0, 250.0]
    assert student_times(Flow(FLOW), 1) == [1000.0]


def test_vp_two_steps_by_hand():
    """x0 at 999 by the generator's constant, re-noised with the predicted eps to 499
    (DDIM, eta 0), x0 again: written out here in float64."""
    vp = VP(SD_SCHEDULE)
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    times = [torch.tensor(999), torch.tensor(499)]
    got = run_student(vp, times, oracle, z)
    zd = z.double()
    e0 = oracle(z, torch.tensor([999, 999])).double()
    x0 = (zd - (1 - 0.0047) ** 0.5 * e0) / 0.0047 ** 0.5
    a = sd_abar(499)
    x1 = a ** 0.5 * x0 + (1 - a) ** 0.5 * e0
    e1 = oracle(x1.float(), torch.tensor([499, 499])).double()
    expected = (x1 - (1 - a) ** 0.5 * e1) / a ** 0.5
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("process", [VP(SD_SCHEDULE), Flow(FLOW)], ids=["vp", "flow"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_n_step_sampler_is_the_stock_scheduler(process, steps):
    sched = process.student_scheduler(steps)
    sched.set_timesteps(steps)
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    x = z
    for t in sched.timesteps:
        x = sched.step(oracle(x, t.expand(3)), t, x).prev_sample
    times = [torch.tensor(t) for t in student_times(process, steps)]
    torch.testing.assert_close(run_student(process, times, oracle, z), x, rtol=0, atol=1e-5)


def test_training_stops_each_sample_at_its_step_with_gradient_only_there():
    vp = VP(SD_SCHEDULE)
    times = [torch.tensor(t) for t in student_times(vp, 4)]
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.ones((), requires_grad=True)
    calls = []

    def predict(x, t):
        calls.append(torch.is_grad_enabled())
        return oracle(x, t) * w

    stop = torch.tensor([0, 2, 1, 2])
    got, sample = run_student(vp, times, predict, z, stop)
    assert calls == [True, True, True, False]  # steps 0..2 are some sample's stop; the last is not
    full = run_student(vp, times, oracle, z)  # every sample to the end
    for i, k in enumerate(stop.tolist()):
        alone = run_student(vp, times[:k + 1], oracle, z[i:i + 1])
        assert_close_ulps(got[i:i + 1].detach(), alone, what=f"sample {i} run alone")  # a batch of 1
    assert not torch.allclose(got, full)
    assert_close_ulps(sample, full, what="the samples")  # what the student samples
    assert not sample.requires_grad
    got.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


def test_the_fake_model_learns_the_images_the_student_samples(tmp_path, monkeypatch):
    """A four-step student is trained at each sample's drawn step, but the fake model is fed
    its last step's images (the student's samples), never the earlier steps' x0."""
    from accelerate import Accelerator

    from wadi.engine.training import prepare

    distill_module = importlib.import_module("wadi.engine.distiller")  # the package exports a function of that name

    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, steps=1, batch_size=8, fake_steps=2)
    cfg.model.student_steps = 4
    prompts, bb = prepare(cfg)
    d = distill_module.Distiller(cfg, bb, prompts, Accelerator(cpu=True))
    made, fed = [], []

    def recording(process, times, predict, z, stop):
        with torch.no_grad():  # the same noise sampled to the end, as `wadi sample` does
            made.append((run_student(process, times, predict, z), stop))
        return run_student(process, times, predict, z, stop)

    fake_loss = d._fake_loss
    monkeypatch.setattr(distill_module, "run_student", recording)
    monkeypatch.setattr(d, "_fake_loss", lambda x0, cond, noise: fed.append(x0) or fake_loss(x0, cond, noise))
    d.train_step()
    assert len(fed) == 2 and len(made) == 2  # the student's batch, then a fresh one for the second fake step
    for (samples, stop), x0 in zip(made, fed):
        torch.testing.assert_close(x0, samples, rtol=0, atol=1e-6)
    assert (made[0][1] < 3).any()  # some samples were trained at an earlier step than they are fed


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_a_two_step_student_exports_to_a_stock_pipeline_with_two_steps(tmp_path, kind):
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    saver = {"sd": tiny_pipes.save_tiny_sd, "sd3": tiny_pipes.save_tiny_sd3}[kind]
    pipes = {kind: saver(tmp_path / kind), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, kind=kind, steps=2)
    cfg.model.student_steps, cfg.run.checkpoint_every = 2, 0
    run = distill(cfg, progress=False)
    assert main(["sample", str(run), "--prompt", "a cat", "--seeds", "0-1", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["sampling"]["steps"] == 2
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "wadi.json").read_text())["call"]["num_inference_steps"] == 2
    images = tiny_pipes.stock_images(tmp_path / "e", ["a cat"] * 2, [0, 1])
    from PIL import Image

    for s in (0, 1):
        ours = np.asarray(Image.open(tmp_path / "s" / f"00000-seed{s}.png")).astype(int)
        assert np.abs(ours - np.round(images[s] * 255)).max() <= 1  # within 1/255
    assert main(["sample", str(tmp_path / "e"), "--prompt", "a cat", "--seeds", "0-1", "--out", str(tmp_path / "x")]) == 0
    for s in (0, 1):  # the export samples in its two steps too
        assert np.array_equal(np.asarray(Image.open(tmp_path / "x" / f"00000-seed{s}.png")),
                              np.asarray(Image.open(tmp_path / "s" / f"00000-seed{s}.png")))
    card = (tmp_path / "e" / "README.md").read_text()
    assert "num_inference_steps=2" in card and "2-step" in card and "one-step" not in card
    assert "sampling steps: 2" in (tmp_path / "e" / "README.md").read_text()


def test_a_resumed_two_step_run_is_the_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}

    def cfg(root, steps):
        c = tiny_pipes.make_cfg(pipes, root, steps=steps)
        c.model.student_steps = 4
        return c

    straight = distill(cfg(tmp_path / "a", 3), progress=False)
    stopped = distill(cfg(tmp_path / "b", 2), progress=False)
    distill(resume=str(stopped), overrides=["train.steps=3"], progress=False)
    for which in ("student", "fake"):
        ours, ref = load_file(str(stopped / f"{which}.safetensors")), load_file(str(straight / f"{which}.safetensors"))
        assert all(torch.equal(ours[k], ref[k]) for k in ref), which


@pytest.mark.parametrize("overrides, text", [
    (["model.student_steps=0"], "model.student_steps must be at least 1"),
    (["model.student_steps=2", "model.student_timesteps=[999,999]"], "strictly decreasing"),
    (["model.student_steps=2", "model.student_timesteps=[999,-1]"], "strictly decreasing"),
    (["model.student_steps=4", "model.student_timesteps=[999,499]"], "one timestep per student step"),
    (["model.student_steps=2", "model.student_timesteps=[900,400]"], "must start at 999"),
    (["model.student_steps=2", "model.student_timesteps=[1500,400]"], "must start at 999"),
])
def test_impossible_step_settings_are_one_line(tmp_path, capsys, overrides, text):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    base = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    capsys.readouterr()  # saving may show transformers' progress bar (before any wadi command quiets it)
    assert main(["distill", "--config", "sd15-wadi", f"model.path={base}", f"data.prompts={tmp_path / 'prompts.txt'}",
                 "train.mixed_precision=no", "model.resolution=16", f"run.root={tmp_path / 'runs'}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
    assert not (tmp_path / "runs").exists()


def test_timesteps_of_ones_own_sample_but_do_not_export(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, steps=1)
    cfg.model.student_steps, cfg.model.student_timesteps, cfg.run.checkpoint_every = 2, [999, 600], 0
    run = distill(cfg, progress=False)
    assert main(["sample", str(run), "--prompt", "a cat", "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a stock scheduler's 2 evenly spaced steps" in err[0]
    assert not (tmp_path / "e").exists()

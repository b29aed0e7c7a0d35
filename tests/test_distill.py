"""The distillation engine on tiny SD-, PixArt- and pixel-shaped pipelines loaded from disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_pipes
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_close_ulps
from tiny_pipes import make_cfg
from wadi.adapters.config import ADAPTERS
from wadi.cli import main
from wadi.engine.config import DistillConfig
from wadi.engine.training import distill

PROMPTS = "a photo of a cat\na red car\nthe digit seven\na dog on the table\n"


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    (root / "prompts.txt").write_text(PROMPTS)
    return {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "pixart": tiny_pipes.save_tiny_pixart(root / "pixart"),
            "sd21": tiny_pipes.save_tiny_sd(root / "sd21", prediction_type="v_prediction", **tiny_pipes.SD21_UNET),
            "pixel": tiny_pipes.save_tiny_pixel(root / "pixel"),
            "pixel-mmdit": tiny_pipes.save_tiny_pixel_mmdit(root / "pixel-mmdit", shift=3.0),
            "sdxl": tiny_pipes.save_tiny_sdxl(root / "sdxl"), "sd3": tiny_pipes.save_tiny_sd3(root / "sd3"),
            "sana": tiny_pipes.save_tiny_sana(root / "sana"),
            "prompts": root / "prompts.txt"}


def log_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def adapter_at(run_dir: Path, step: int, which: str = "student") -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:07d}" / f"{which}.safetensors"))


def moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("student", ADAPTERS)
def test_every_adapter_trains_on_tiny_sd(pipes, tmp_path, student):
    run = distill(make_cfg(pipes, tmp_path, student=student), progress=False)
    log = log_of(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss_student"], r["loss_fake"]])).all() for r in log)
    assert log[0]["loss_student"] == 0.0  # the fake model starts equal to the teacher
    assert log[-1]["loss_student"] > 0.0
    assert moved(adapter_at(run, 1), adapter_at(run, 3))
    assert moved(adapter_at(run, 1, "fake"), adapter_at(run, 3, "fake"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["student"]["kind"] == student and saved["train"]["steps"] == 3

    from diffusers import UNet2DConditionModel
    UNet2DConditionModel.from_pretrained(run / "student")  # the export is a stock model


@pytest.mark.parametrize("kind", ["sd21", "pixart", "pixel", "pixel-mmdit", "sdxl", "sd3", "sana"])
def test_lorad_trains_on_every_kind(pipes, tmp_path, kind):
    run = distill(make_cfg(pipes, tmp_path, kind=kind), progress=False)
    assert all(r["skipped"] == 0 for r in log_of(run))
    assert moved(adapter_at(run, 1), adapter_at(run, 3))


def test_v_prediction_is_converted_to_eps(pipes):
    from wadi.models.backbones import BackboneSpec

    bb = BackboneSpec(kind="sd", path=str(pipes["sd21"]), resolution=16).load()
    assert bb.process.prediction_type == "v_prediction"
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 300])
    alpha, sigma = bb.process.coefficients(t)
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0

    class Oracle(torch.nn.Module):  # a net that predicts the true v
        def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
            return type("Out", (), {"sample": v})()

    cond = bb.encode_prompts(["a cat", "a dog"])
    torch.testing.assert_close(bb.predict(Oracle(), x_t, t, cond), eps, rtol=1e-4, atol=1e-4)


def test_run_folder_contents(pipes, tmp_path):
    cfg = make_cfg(pipes, tmp_path, steps=2)
    cfg.run.sample_every, cfg.run.keep_checkpoints = 1, 1
    first = distill(cfg, progress=False)
    second = distill(cfg, progress=False)
    assert first.name == "00000-custom" and second.name == "00001-custom"
    assert [p.name for p in (first / "checkpoints").iterdir()] == ["step-0000002"]  # pruned to 1
    assert (first / "samples" / "step-0000002.png").is_file()
    assert any((first / "tb").iterdir())
    for name in ("student.safetensors", "fake.safetensors", "student/config.json", "config.yaml"):
        assert (first / name).exists()


def test_nonfinite_losses_skip_then_stop(pipes, tmp_path, monkeypatch):
    from wadi.models.process import VP

    calls = {"n": 0}
    real = VP.fake_loss

    def poisoned(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] > 2 else 1.0)

    monkeypatch.setattr(VP, "fake_loss", poisoned)
    cfg = make_cfg(pipes, tmp_path, steps=6, max_nonfinite=2)
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row at step 4"):
        distill(cfg, progress=False)
    run = next((tmp_path / "runs").iterdir())
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-0000001", "step-0000002", "step-0000003"]
    assert not (run / "student").exists()  # no export of a failed run
    # the skipped step left the fake model as it was
    assert not moved(adapter_at(run, 2, "fake"), adapter_at(run, 3, "fake"))


def _write_cfg(cfg: DistillConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _cli(*args):
    return [sys.executable, "-m", "wadi.cli", "distill", "--no-progress", *args]


def test_resume_after_sigkill_matches_uninterrupted_run(pipes, tmp_path):
    steps = 5
    # The reference runs in a fresh process too: both start from the same process state.
    straight = _write_cfg(make_cfg(pipes, tmp_path / "a", steps=steps), tmp_path / "a.yaml")
    subprocess.run(_cli("--config", str(straight)), check=True, capture_output=True)
    reference = next((tmp_path / "a" / "runs").iterdir())

    killed_cfg = _write_cfg(make_cfg(pipes, tmp_path / "b", steps=steps), tmp_path / "b.yaml")
    proc = subprocess.Popen(_cli("--config", str(killed_cfg)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_root = tmp_path / "b" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_root.glob("*/checkpoints/step-0000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-way through step 3, whatever it was doing
    proc.wait()
    run = next(run_root.iterdir())
    assert not (run / "student.safetensors").exists(), "the run finished before it was killed"

    result = subprocess.run(_cli("--resume", str(run)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # Float precision: a resume that lost any state (an RNG, a moment, the step) differs by
    # orders of magnitude more; a few last bits, which Adam turns into 1e-7 on near-zero
    # gradients, do not.
    for which in ("student", "fake"):
        ours, ref = load_file(str(run / f"{which}.safetensors")), load_file(str(reference / f"{which}.safetensors"))
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in log_of(run)] == list(range(1, steps + 1))


@pytest.mark.parametrize("kind", ["sdxl", "sd3", "sana"])
def test_a_resumed_run_of_the_newer_kinds_is_the_uninterrupted_one(pipes, tmp_path, kind):
    """Conditioning with extra tensors and the flow process resume exactly: two steps, then
    a resume to three, against three straight (the checkpoint holds every piece of state)."""
    straight = distill(make_cfg(pipes, tmp_path / "a", kind=kind, steps=3), progress=False)
    stopped = distill(make_cfg(pipes, tmp_path / "b", kind=kind, steps=2), progress=False)
    distill(resume=str(stopped), overrides=["train.steps=3"], progress=False)
    for which in ("student", "fake"):
        ours, ref = load_file(str(stopped / f"{which}.safetensors")), load_file(str(straight / f"{which}.safetensors"))
        assert all(torch.equal(ours[k], ref[k]) for k in ref), which
    assert [r["step"] for r in log_of(stopped)] == [1, 2, 3]


def test_two_processes_hold_the_same_adapters_as_one_with_their_batch(pipes, tmp_path):
    cfg = _write_cfg(make_cfg(pipes, tmp_path, steps=2), tmp_path / "cfg.yaml")
    # accelerate's --cpu launcher starts one process; --multi_gpu starts torchrun, and
    # with no CUDA the engine joins the processes over gloo on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "wadi.cli", "distill", "--no-progress", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    for ckpt in sorted((run / "checkpoints").iterdir()):
        sums = json.loads((ckpt / "state.json").read_text())["adapter_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1]
    # Every sample's prompt and noise follow from its place in the stream, not from the
    # process that draws it: one process with both batches trains the same adapters, up to
    # the order of a sum (DDP averages two means); other noise would move them by ~lr = 1e-4.
    single = make_cfg(pipes, tmp_path / "one", steps=2)
    single.train.batch_size = 4
    one = distill(single, progress=False)
    for which in ("student", "fake"):
        ours, ref = load_file(str(run / f"{which}.safetensors")), load_file(str(one / f"{which}.safetensors"))
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-5)


@pytest.mark.parametrize("content, message", [
    (None, "prompt file .* does not exist"),
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
    (b"\xff\xfe\x00bad", "is unreadable"),
])
def test_bad_prompt_files_fail_fast_and_write_nothing(pipes, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        prompts.write_bytes(content)
    elif content is not None:
        prompts.write_text(content)
    cfg = make_cfg(pipes, tmp_path)
    cfg.data.prompts = str(prompts)
    assert main(["distill", "--config", str(_write_cfg(cfg, tmp_path / "c.yaml")), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_fails_fast(pipes, tmp_path, capsys):
    cfg = make_cfg(pipes, tmp_path)
    cfg.model.path = str(tmp_path / "no-such-model")
    assert main(["distill", "--config", str(_write_cfg(cfg, tmp_path / "c.yaml"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    cfg.model.path = str(pipes["prompts"].parent)  # exists, but is no diffusers folder
    assert main(["distill", "--config", str(_write_cfg(cfg, tmp_path / "c.yaml"))]) == 2
    assert "could not load the scheduler" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("student", ["lorad", "dora", "full"])
def test_student_and_fake_share_the_teachers_frozen_tensors(pipes, tmp_path, student):
    """One copy of every frozen weight: the student's and the fake's frozen tensors are the
    teacher's storage; full fine-tuning's trained weights are its own. Exporting the
    student does not write into the shared weights."""
    from accelerate import Accelerator

    from wadi.engine.distiller import Distiller
    from wadi.files.run_folder import RunFolder
    from wadi.engine.training import export, prepare

    from wadi.adapters.shared_base import plain_copy

    cfg = make_cfg(pipes, tmp_path, student=student, steps=1)
    prompts, bb = prepare(cfg)
    d = Distiller(cfg, bb, prompts, Accelerator(cpu=True))
    assert d.student.model is bb.net and d.fake.model is bb.net or student == "full"
    teacher_net = plain_copy(bb.net)  # the teacher's tensors under their own names
    teacher = {p.untyped_storage().data_ptr(): n for n, p in teacher_net.named_parameters()}
    before = {n: p.detach().clone() for n, p in teacher_net.named_parameters()}

    def frozen_storages(adapter):
        return {p.untyped_storage().data_ptr() for p in adapter.model.parameters() if not p.requires_grad}

    assert frozen_storages(d.fake) <= set(teacher)
    if student == "full":
        trained = {p.untyped_storage().data_ptr() for p in d.student.trainable_parameters().values()}
        assert not trained & set(teacher) and len(trained) == len(teacher)
    else:
        assert frozen_storages(d.student) <= set(teacher)
        assert len(frozen_storages(d.student)) >= len(teacher) - 2 * len(d.student.target_names)
    d.train_step()
    d.train_step()  # the first student step is zero: the fake model starts as the teacher
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    export(d, run)  # merges the student
    for n, p in teacher_net.named_parameters():
        assert torch.equal(p, before[n]), f"the teacher's {n} changed"
    from diffusers import UNet2DConditionModel

    merged = UNet2DConditionModel.from_pretrained(run.student_model).state_dict()
    changed = [n for n in merged if not torch.equal(merged[n], before[n])]
    assert changed and (student == "full" or all(any(t in n for t in d.student.target_names) for n in changed))


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_cached_conditioning_with_extra_tensors_trains_as_encoded_every_step(pipes, tmp_path, kind, monkeypatch):
    """Pooled embeddings and time ids travel through the prompt cache (and CFG batching,
    prompt dropout) as the token states do: cached and uncached runs are the same run."""
    from functools import reduce

    from wadi.models.backbones import Backbone, BackboneSpec

    # The cache encodes every prompt in one batch, training its batch: another GEMM shape,
    # which may round differently in the last place; a few ulps, nothing more.
    bb = BackboneSpec(kind=kind, path=str(pipes[kind]), resolution=16).load()
    prompts = PROMPTS.split("\n")[:4]
    whole, pair = bb.encode_prompts(prompts), bb.encode_prompts(prompts[1:3])
    for name in ("embeds", *sorted(whole.extra)):
        a, b = (getattr(c, name) if name == "embeds" else c.extra[name] for c in (whole, pair))
        assert_close_ulps(a[1:3], b, what=name)
    # Training moves those last bits by far more than a few ulps (Adam's first steps are the
    # gradients' signs), so both runs encode prompt by prompt: the same computation,
    # bit-exact, whichever path holds the conditioning.
    real = Backbone.encode_prompts
    monkeypatch.setattr(Backbone, "encode_prompts",
                        lambda self, ps, mask=False: reduce(lambda a, b: a.cat(b), [real(self, [p], mask) for p in ps]))
    runs = []
    for cached in (False, True):
        cfg = make_cfg(pipes, tmp_path / str(cached), kind=kind, steps=2)
        cfg.data.cache_embeddings = cached
        runs.append(distill(cfg, progress=False))
    for which in ("student", "fake"):
        a, b = (load_file(str(r / f"{which}.safetensors")) for r in runs)
        assert all(torch.equal(a[k], b[k]) for k in a), which

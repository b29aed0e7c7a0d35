"""Hostile inputs, class by class: every bad request ends with a non-zero exit and one line
on stderr (no traceback), and the folders it touches are byte for byte as they were, with
nothing half-made left behind."""

import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import tiny_pipes
from wadi.cli import main
from wadi.training import distill


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with a checksum of its bytes."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")  # a progress bar (sampling) is not a message


def refused(capsys, args, message, *untouched: Path, code=2):
    """`wadi ARGS` exits with `code`, says `message` in one line, and changes nothing under `untouched`."""
    assert message, "name the text the refusal must say"
    before = snapshot(*untouched)
    capsys.readouterr()
    assert main([str(a) for a in args]) == code
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not PROGRESS.match(line))
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(*untouched) == before, "the refused command changed files"
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny pipelines, a prompt file, a finished run and a YAML config of it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "prompts.txt").write_text("a photo of a cat\na red car\nthe digit seven\na dog on the table\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "prompts": root / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, root, steps=2)
    run = distill(cfg, progress=False)
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_pipes.make_cfg(pipes, root / "fresh", steps=2).to_dict()))
    return {"root": root, "pipes": pipes, "run": run, "config": config, "base": pipes["sd"]}


# --- 1. nothing is overwritten without --force -----------------------------------------

def test_outputs_are_not_overwritten(world, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("another tool's output")
    run = world["run"]
    refused(capsys, ["sample", run, "--prompt", "a cat", "--out", taken], "--force", taken)
    refused(capsys, ["export", run, "--out", taken], "--force", taken)
    refused(capsys, ["export", run, "--format", "adapter", "--out", taken], "--force", taken)
    refused(capsys, ["analyze", world["base"], run / "student", "--out", taken], "--force", taken)
    refused(capsys, ["convert", world["base"], "--angles", run / "student.safetensors", "--out", taken],
            "--force", taken)
    refused(capsys, ["eval", run, "--prompts", world["pipes"]["prompts"], "--metrics", "alignment",
                     "--alignment", "test_eval:mean_brightness", "--out", taken], "--force", taken)
    classifier = tmp_path / "clf.safetensors"
    save_file({}, str(classifier))
    refused(capsys, ["digits-classifier", "--out", classifier], "--force", tmp_path)
    refused(capsys, ["digits-teacher", "--out", taken], "not empty", taken)


# --- 2. a resumed run keeps what defines it --------------------------------------------

def test_resume_refuses_changed_settings_and_records_allowed_ones(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for override, key in [("train.lr_student=0.5", "train.lr_student"), ("train.batch_size=4", "train.batch_size"),
                          (f"model.path={world['root']}", "model.path"), ("train.seed=7", "train.seed"),
                          ("student.rank=8", "student.rank")]:
        refused(capsys, ["distill", "--resume", run, override, "--no-progress"], key, run)
    assert main(["distill", "--resume", str(run), "train.steps=3", "run.log_every=1", "--no-progress"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["run"]["log_every"] == 1
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()][-1] == 3


def test_resume_refuses_a_teacher_whose_weights_changed(world, tmp_path, capsys):
    """Same folder, same shapes, other weights: the adapters' base sample tells."""
    base = tmp_path / "sd"
    shutil.copytree(world["base"], base)
    cfg = tiny_pipes.make_cfg({"sd": base, "prompts": world["pipes"]["prompts"]}, tmp_path, steps=2)
    run = distill(cfg, progress=False)
    (run / "student.safetensors").unlink()
    tiny_pipes.save_tiny_sd(tmp_path / "other", seed=5)
    shutil.rmtree(base / "unet")
    shutil.copytree(tmp_path / "other" / "unet", base / "unet")
    refused(capsys, ["distill", "--resume", run, "train.steps=3", "--no-progress"], "other weights", run)
    err = refused(capsys, ["sample", run / "checkpoints" / "step-0000002" / "student.safetensors", "--base", base,
                           "--prompt", "a cat", "--out", tmp_path / "o"], "or allow it explicitly (--allow-other-base)",
                  run)
    assert "allow_other_base=True" not in err  # the command line names its flag, not the Python argument
    assert main(["sample", str(run / "checkpoints" / "step-0000002" / "student.safetensors"), "--base", str(base),
                 "--allow-other-base", "--prompt", "a cat", "--out", str(tmp_path / "o"), "--no-grid"]) == 0


# --- 3. runs that stopped early can resume ---------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(world, tmp_path):
    run = tmp_path / "runs" / "00000-custom"
    run.mkdir(parents=True)
    shutil.copy(world["config"], run / "config.yaml")
    (run / "log.jsonl").write_text('{"step": 1, "loss_stud')  # torn by the kill
    assert main(["distill", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "student.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def _poison(path: Path, value: float, structure: str | None = None) -> None:
    """Rewrite a safetensors file with `value` in its first tensor (and another structure)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], value)
    save_file(tensors, str(path), metadata={**meta, **({"structure": structure} if structure else {})})


@pytest.mark.parametrize("damage", ["truncated optimizer", "empty state", "missing adapter", "NaN adapter",
                                    "Inf optimizer", "state of another structure", "a list for the state",
                                    "optimizer of another structure", "adapter without its config"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(world, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "student.safetensors").unlink()
    latest = run / "checkpoints" / "step-0000002"
    if damage == "truncated optimizer":
        data = (latest / "optim-student.safetensors").read_bytes()
        (latest / "optim-student.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty state":
        (latest / "state.json").write_text("")
    elif damage == "missing adapter":
        (latest / "fake.safetensors").unlink()
    elif damage == "NaN adapter":
        _poison(latest / "student.safetensors", float("nan"))
    elif damage == "Inf optimizer":
        _poison(latest / "optim-fake.safetensors", float("inf"))
    elif damage == "state of another structure":
        (latest / "state.json").write_text('{"step": "two", "nonfinite_streak": 0, "num_processes": 1}')
    elif damage == "a list for the state":
        (latest / "state.json").write_text("[2, 0, 1]")
    elif damage == "optimizer of another structure":
        _poison(latest / "optim-student.safetensors", 0.0, structure='["param_groups"]')
    else:
        from safetensors import safe_open

        with safe_open(str(latest / "fake.safetensors"), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(latest / "fake.safetensors"), metadata={k: v for k, v in meta.items() if k != "config"})
    with pytest.warns(UserWarning, match="cannot be read"):
        distill(resume=str(run), overrides=["train.steps=3"], progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # step 2 was trained again from step 1's checkpoint


# --- 4. and 7. settings are checked before anything is written --------------------------

@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be at least 1"),
    ("train.grad_accum=0", "train.grad_accum must be at least 1"),
    ("train.t_max=1000", "train.t_max must be at most 999"),
    ("train.t_min=990", "train.t_max must be at least train.t_min"),
    ("run.log_every=0", "run.log_every must be at least 1"),
    ("train.steps=-1", "train.steps must be at least 1"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("data.sample_prompts=[]", "data.sample_prompts"),
    ("run.sample_every=5", "data.sample_prompts"),
    ("model.resolution=-8", "model.resolution must be a positive"),
    ("train.fake_uncond_prob=2", "train.fake_uncond_prob must be a probability"),
    ("train.warmup_steps=-3", "train.warmup_steps must be at least 0"),
    ("data.dedupe=maybe", "data.dedupe must be true or false"),
    ("train.guidance=inf", "train.guidance must be a finite number"),
    ("student.rank=4096", "more than any target layer can use"),
    ("train.mixed_precision=fp8", "train.mixed_precision must be no or fp16 or bf16"),
    ("run.report_to=comet", "run.report_to"),
    ("model.one_step_abar=1.5", "model.one_step_abar"),
    ("run.desc=a/b", "run.desc"),
])
def test_bad_settings_fail_before_any_folder(world, tmp_path, capsys, override, message):
    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    if override.startswith(("run.sample_every", "data.sample_prompts")):
        cfg["run"]["sample_every"] = 5
        cfg["data"]["sample_prompts"] = ["  "]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    refused(capsys, ["distill", "--config", path, override, "--no-progress"], message, tmp_path)
    assert not (tmp_path / "runs").exists()


def test_bad_config_files_are_one_line(tmp_path, capsys):
    (tmp_path / "syntax.yaml").write_text("train:\n  steps: [1, 2\n")
    refused(capsys, ["distill", "--config", tmp_path / "syntax.yaml"], "not valid YAML at line", tmp_path)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    refused(capsys, ["distill", "--config", tmp_path / "list.yaml"], "must hold a mapping", tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    refused(capsys, ["distill", "--config", tmp_path / "binary.yaml"], "binary.yaml is unreadable", tmp_path)


def test_eval_checks_everything_before_generating(world, tmp_path, capsys):
    run, prompts = world["run"], world["pipes"]["prompts"]
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["eval", run, "--prompts", prompts, "--out", tmp_path / "out"]
    refused(capsys, base + ["--metrics", "fid", "--ref", tmp_path / "nothing"], "does not exist", tmp_path)
    refused(capsys, base + ["--metrics", "pr", "--ref", empty, "--features", "test_eval:pixel_features"],
            "no images", tmp_path)
    refused(capsys, base + ["--metrics", "clip", "--clip-model", tmp_path / "no-clip"], "cannot load the CLIP model",
            tmp_path)
    refused(capsys, base + ["--batch-size", "0"], "--batch-size must be at least 1", tmp_path)
    refused(capsys, base + ["--pr-k", "0"], "--pr-k must be at least 1", tmp_path)
    refused(capsys, base + ["--teacher", "--teacher-steps", "0"], "--teacher-steps must be at least 1", tmp_path)
    assert not (tmp_path / "out").exists()


# --- 5. two runs started at once get two folders ----------------------------------------

def test_simultaneous_starts_take_different_numbers(world, tmp_path):
    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "wadi.cli", "distill", "--no-progress", "--config", str(path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), [err[-500:] for _, err, _ in results]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["00000-custom", "00001-custom", "00002-custom"]
    assert all((tmp_path / "runs" / r / "student.safetensors").is_file() for r in runs)


# --- 6. faults and bad files are one line -------------------------------------------------

def test_bad_model_files_are_one_line(world, tmp_path, capsys):
    base = world["base"]
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    full = (world["run"] / "student.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    for name in ("garbage.safetensors", "truncated.safetensors"):
        refused(capsys, ["sample", tmp_path / name, "--base", base, "--prompt", "a", "--out", tmp_path / "o"],
                "not a readable safetensors file", tmp_path)
    refused(capsys, ["sample", world["run"], "--prompt", "a", "--out", tmp_path / "o", "--device", "cuda:5"],
            "--device cuda:5", tmp_path)
    refused(capsys, ["sample", world["run"], "--prompt", "a", "--out", tmp_path / "o", "--teacher", "--steps", "0"],
            "--steps must be at least 1", tmp_path)
    refused(capsys, ["sample", world["run"], "--prompt", "a", "--out", tmp_path / "o", "--resolution", "-8"],
            "--resolution must be positive", tmp_path)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a cat"}]}))
    refused(capsys, ["eval", world["run"], "--coco", coco, "--num", "1", "--metrics", "alignment", "--alignment",
                     "test_eval:mean_brightness", "--out", tmp_path / "e"], "lacks an id", tmp_path)


def test_output_under_a_regular_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    refused(capsys, ["sample", world["run"], "--prompt", "a", "--out", tmp_path / "file" / "out"], "Not a directory",
            tmp_path)
    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "file" / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    refused(capsys, ["distill", "--config", tmp_path / "c.yaml", "--no-progress"], "Not a directory", tmp_path / "file")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(world, tmp_path, capsys, monkeypatch):
    import wadi.checkpoint as ckpt

    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["train"]["steps"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    real, calls = ckpt.save_state, {"n": 0}

    def full_disk(path, state):
        calls["n"] += 1
        if calls["n"] > 5:  # the second checkpoint: its generators file (each holds five state files)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, state)

    monkeypatch.setattr(ckpt, "save_state", full_disk)
    refused(capsys, ["distill", "--config", tmp_path / "c.yaml", "--no-progress"], "No space left on device")
    run = next((tmp_path / "runs").iterdir())
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000001", "step-0000002.tmp"]
    monkeypatch.setattr(ckpt, "save_state", real)
    assert main(["distill", "--resume", str(run), "--no-progress"]) == 0  # the space is back
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-0000001", "step-0000002", "step-0000003"] and (run / "student.safetensors").is_file()


# --- 8. logs stay valid JSON ---------------------------------------------------------------

def test_log_lines_are_strict_json(world, tmp_path, monkeypatch):
    from wadi.process import VP

    real = VP.score_difference
    monkeypatch.setattr(VP, "score_difference", lambda *a: real(*a) * float("inf"))
    cfg = tiny_pipes.make_cfg(world["pipes"], tmp_path, steps=3, max_nonfinite=5)
    run = distill(cfg, progress=False)
    for line in (run / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
    assert time.time()  # the run finished despite skipped steps


def test_a_run_whose_only_checkpoint_is_damaged_starts_over_cleanly(world, tmp_path):
    """The state read in part before the damage showed is dropped: the run ends as an
    uninterrupted one does."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for f in ("student.safetensors", "fake.safetensors"):
        (run / f).unlink()
    shutil.rmtree(run / "checkpoints" / "step-0000002")
    (run / "checkpoints" / "step-0000001" / "optim-fake.safetensors").write_bytes(b"")  # after the adapters
    with pytest.warns(UserWarning, match="cannot be read"):
        distill(resume=str(run), progress=False)
    from safetensors.torch import load_file

    for which in ("student", "fake"):
        ours, ref = load_file(str(run / f"{which}.safetensors")), load_file(str(world["run"] / f"{which}.safetensors"))
        assert all(torch.equal(ours[k], ref[k]) for k in ref)

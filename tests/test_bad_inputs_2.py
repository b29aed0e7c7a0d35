"""Hostile use, second sweep: two commands on one output, real I/O errors, poisoned
numbers, crafted files that parse, sizes and settings, interrupts at the edges. Each ends
in one line (or a complete result) with the folders as they were."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import refused, snapshot, world  # noqa: F401 -- the shared finished run

from wadi.cli import main
from wadi.files import locks
from wadi.files.prompts import MAX_PROMPT_CHARS


def wadi(*args, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wadi.cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=preexec_fn, timeout=300)


def one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and message in lines[0], err[-2000:]


def rewrite(path: Path, metadata=None, **tensors) -> None:
    """Rewrite a safetensors file with some tensors and/or its metadata replaced."""
    with safe_open(str(path), framework="pt") as f:
        meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**old, **tensors}, str(path), metadata=meta if metadata is None else metadata)


# --- 1. one command per output ---------------------------------------------------------

def test_a_second_command_on_a_held_output_refuses_naming_the_holder(world, tmp_path, capsys):
    run, out = world["run"], tmp_path / "out"
    for args, held in [(["export", run, "--out", out], out), (["sample", run, "--prompt", "a", "--out", out], out),
                       (["eval", run, "--prompts", world["pipes"]["prompts"], "--metrics", "alignment",
                         "--alignment", "test_eval:mean_brightness", "--out", out], out)]:
        lock = locks.acquire(held)
        try:
            err = refused(capsys, args, "is in use by another wadi command", tmp_path)
            assert f"pid {os.getpid()}" in err
        finally:
            locks.release(lock)
        assert not out.exists()
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lock = locks.acquire(copy)
    try:
        refused(capsys, ["distill", "--resume", copy, "train.steps=3", "--no-progress"], "in use", copy)
    finally:
        locks.release(lock)


def test_the_lock_of_a_killed_command_does_not_block(world, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; import wadi.files.locks as locks; "
                               f"held = locks.acquire({str(out)!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = wadi("export", world["run"], "--format", "adapter", "--out", out)
        assert busy.returncode == 2
        one_line(busy.stderr, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "out.lock").exists()  # the dead holder's file is left, and does not block
    assert main(["export", str(world["run"]), "--format", "adapter", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "student.safetensors"]


# --- 2. real I/O errors ------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_the_os_refuses_inside_safetensors_is_one_line(world, tmp_path):
    """safetensors raises its own error type for a failed write; here the kernel refuses
    the bytes (a file-size limit), as a full disk would."""
    out = tmp_path / "merged.safetensors"
    done = wadi("convert", world["base"] / "unet", "--angles", world["run"] / "student.safetensors", "--out", out,
                preexec_fn=_file_size_limit(4096))
    assert done.returncode == 2
    one_line(done.stderr, "cannot write a safetensors file: File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; skipped where this process may not mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip() or made.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_really_full_and_a_read_only_disk_are_one_line_and_leave_nothing(world, small_disk, capsys):
    (small_disk / "keep.txt").write_text("the user's own file")
    before = snapshot(small_disk)
    for args in (["export", world["run"], "--out", small_disk / "pipe"],
                 ["convert", world["base"] / "unet", "--angles", world["run"] / "student.safetensors", "--out",
                  small_disk / "merged.safetensors"],
                 ["sample", world["run"], "--prompt", "a", "--seeds", "0-2000", "--out", small_disk / "s"]):
        refused(capsys, args, "No space left on device", small_disk)
        assert snapshot(small_disk) == before
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for args in (["export", world["run"], "--out", small_disk / "pipe"],
                 ["sample", world["run"], "--prompt", "a", "--out", small_disk / "s"]):
        refused(capsys, args, "Read-only file system", small_disk)


# --- 3. poisoned numbers -------------------------------------------------------------------

def test_non_finite_weights_and_settings_are_refused_where_they_enter(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    weights = run / "student" / "diffusion_pytorch_model.safetensors"
    name = next(k for k in load_file(str(weights)) if k.endswith("weight"))
    rewrite(weights, **{name: torch.full_like(load_file(str(weights))[name], float("nan"))})
    out = tmp_path / "out"
    refused(capsys, ["sample", run, "--prompt", "a", "--out", out], "holds NaN or infinite values", tmp_path)
    refused(capsys, ["eval", run, "--prompts", world["pipes"]["prompts"], "--metrics", "alignment", "--alignment",
                     "test_eval:mean_brightness", "--out", out], "holds NaN or infinite values", tmp_path)
    adapter = tmp_path / "adapter.safetensors"
    shutil.copy(world["run"] / "student.safetensors", adapter)
    first = next(iter(load_file(str(adapter))))
    rewrite(adapter, **{first: torch.full_like(load_file(str(adapter))[first], float("inf"))})
    refused(capsys, ["sample", adapter, "--base", world["base"], "--prompt", "a", "--out", out],
            "holds NaN or infinite values", tmp_path)
    for guidance in ("nan", "inf"):
        refused(capsys, ["sample", world["run"], "--teacher", "--guidance", guidance, "--prompt", "a", "--out", out],
                "--guidance must be a finite number", tmp_path)
    assert not out.exists()


# --- 4. crafted files that parse -------------------------------------------------------------

def test_files_of_the_wrong_structure_are_one_line(world, tmp_path, capsys):
    run, base, out = world["run"], world["base"], tmp_path / "out"
    adapter = tmp_path / "adapter.safetensors"
    shutil.copy(run / "student.safetensors", adapter)
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
    for bad in ({k: v for k, v in meta.items() if k != "config"}, {**meta, "config": "[1, 2]"},
                {**meta, "config": '{"kind": "lorad", "rank": 4, "targets": {"include": 5}}'},
                {**meta, "base_sample": '{"a": 1}'}):
        rewrite(adapter, metadata=bad)
        refused(capsys, ["sample", adapter, "--base", base, "--prompt", "a", "--out", out], "metadata is damaged",
                tmp_path)
    keys = tmp_path / "ints.pth"
    torch.save({0: torch.zeros(2), "a": torch.zeros(2)}, keys)
    refused(capsys, ["sample", keys, "--base", base, "--allow-bin", "--prompt", "a", "--out", out],
            "tensor names must be strings", tmp_path)
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    for manifest in ('["wadi-export/2"]', '{"format": "wadi-export/2", "base": [1]}',
                     '{"format": "wadi-export/2", "base": {"kind": "sd", "resolution": "big"}}',
                     '{"format": "wadi-export/2", "format": "wadi-export/2"}'):
        (export / "wadi.json").write_text(manifest)
        refused(capsys, ["sample", export, "--prompt", "a", "--out", out], "export the student again", tmp_path)
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "settings.json").write_text("[]")
    refused(capsys, ["eval", run, "--prompts", world["pipes"]["prompts"], "--metrics", "alignment", "--alignment",
                     "test_eval:mean_brightness", "--out", evaluation], "must hold a JSON object", tmp_path)
    assert not out.exists()


# --- 5. settings and sizes, checked before anything is made ----------------------------------

def _setting(section: str, key: str, value):
    def edit(cfg: dict) -> str:
        cfg[section][key] = value
        return yaml.safe_dump(cfg, sort_keys=False)
    return edit


def _deep(cfg: dict) -> str:
    text = yaml.safe_dump(cfg, sort_keys=False)
    return text.replace(f"  guidance: {cfg['train']['guidance']}\n", "  guidance: " + "[" * 3000 + "]" * 3000 + "\n")


def _billion_laughs() -> list:
    """Nine levels of nine references: a few lines of YAML (aliases), 9^9 strings spelled out."""
    level = ["lol"] * 9
    for _ in range(8):
        level = [level] * 9
    return level


@pytest.mark.parametrize("make, message", [
    (lambda cfg: yaml.safe_dump({**cfg, "preset": ["a", "b"]}, sort_keys=False), "preset must be a preset name"),
    (lambda cfg: yaml.safe_dump(cfg, sort_keys=False) + "preset: ''\n", "duplicate key 'preset'"),
    (_deep, "nested too deeply"),
    (_setting("student", "targets", {"include": 5}), "target rule include must be a list"),
    (_setting("student", "targets", [1]), "student.targets must be a preset name"),
    (_setting("fake", "targets", {"include": _billion_laughs()}), "target rule include must be a list"),
    (_setting("train", "seed", 2**64), "train.seed must be in 0.."),
    (_setting("model", "max_length", 1000), "beyond the text encoder's 16 positions"),
    (_setting("data", "sample_prompts", ["x" * (MAX_PROMPT_CHARS + 1)]), f"at most {MAX_PROMPT_CHARS}"),
])
def test_bad_settings_are_refused_before_any_folder(world, tmp_path, capsys, make, message):
    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["run"]["sample_every"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(make(cfg))
    refused(capsys, ["distill", "--config", path, "--no-progress"], message, tmp_path)
    assert not (tmp_path / "runs").exists()


def test_prompts_too_long_or_of_the_wrong_type_are_refused(world, tmp_path, capsys):
    run, out = world["run"], tmp_path / "out"
    huge = tmp_path / "huge.txt"
    huge.write_text("a cat\n" + "a" * (MAX_PROMPT_CHARS + 1) + "\n")
    refused(capsys, ["sample", run, "--prompts", huge, "--out", out], "prompt 2 is", tmp_path)
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a cat"}\n{"prompt": 5}\n')
    refused(capsys, ["sample", run, "--prompts", lines, "--out", out], "p.jsonl:2: prompt must be a string", tmp_path)
    refused(capsys, ["sample", run, "--prompt", "a \udcff", "--out", out], "not valid UTF-8", tmp_path)  # argv bytes
    for seeds in ("18446744073709551616", "0-999999999"):
        refused(capsys, ["sample", run, "--prompt", "a", "--seeds", seeds, "--out", out], "--seeds", tmp_path)
    assert not out.exists()


def test_running_out_of_cpu_memory_exits_3_and_leaves_no_folder(world, tmp_path, capsys):
    """A real allocation the machine cannot make: 10^6 pixels a side (the teacher's: a
    student samples at the resolution it was distilled at)."""
    out = tmp_path / "out"
    refused(capsys, ["sample", world["run"], "--teacher", "--prompt", "a", "--resolution", "1000000", "--out", out],
            "out of memory", tmp_path, code=3)
    assert not out.exists()


def test_a_run_that_runs_out_of_memory_at_its_first_step_leaves_no_folder(world, tmp_path, capsys):
    cfg = yaml.safe_load(world["config"].read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    refused(capsys, ["distill", "--config", tmp_path / "c.yaml", "model.resolution=1000000", "--no-progress"],
            "out of memory", code=3)
    assert not (tmp_path / "runs").exists()  # nor the root the run made


# --- 6. interrupts and kills at the edges -----------------------------------------------------

# A Ctrl-C delivered exactly when the command starts importing its engine (not after a
# sleep that a fast machine outruns): an import hook sends the process SIGINT at the first
# import of torch or wadi.engine.training, whichever comes first. Python's own handler is put back
# first, in case the child inherited an ignored SIGINT.
INTERRUPT_AT_TORCH = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "wadi.engine.training"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["wadi", "distill", "--help"]
runpy.run_module("wadi.cli", run_name="__main__")
"""


def test_ctrl_c_while_importing_is_one_line():
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH], capture_output=True, text=True, timeout=120)
    # A shell reports both as 130; Python ends with the signal itself (-2) when the interrupt
    # also passed through C code that ran Python (torch's import), after our one line.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, proc.stderr[-2000:], proc.stdout[:200])
    assert "usage" not in proc.stdout  # it stopped before the help
    one_line(proc.stderr, "wadi: interrupted")


def test_a_run_folder_appears_with_its_config_and_a_config_less_one_is_passed_over(world, tmp_path, capsys):
    from wadi.files.run_folder import RunFolder

    root = tmp_path / "runs"
    for name, age in ((".new-run-killed", 3600), (".new-run-making", 1)):  # a SIGKILLed reservation, a live one
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text("a: 0\n")
        os.utime(root / name, (time.time() - age,) * 2)
    run, lock = RunFolder.reserve(root, "custom", "a: 1\n")
    try:
        assert run.name == "00000-custom" and run.config.read_text() == "a: 1\n"
        assert sorted(p.name for p in root.iterdir()) == [".new-run-making", "00000-custom", "00000-custom.lock"]
    finally:
        locks.release(lock)
    (root / "00001-custom").mkdir()  # an older version killed between mkdir and its config
    shutil.copy(world["config"], run.config)
    assert RunFolder.find(root, "latest").path == run.path
    refused(capsys, ["distill", "--resume", root / "00001-custom"], "not a run folder (no config.yaml)", root)


def test_a_run_killed_in_its_final_export_is_not_finished_and_resumes(world, tmp_path, monkeypatch, capsys):
    import wadi.engine.training as training

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for done in ("student.safetensors", "fake.safetensors"):
        (run / done).unlink()
    shutil.rmtree(run / "student")
    real = training.atomic_path

    def killed(path):
        if Path(path).name == "student":
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(training, "atomic_path", killed)
    assert main(["distill", "--resume", str(run), "--no-progress"]) == 130
    assert not (run / "student.safetensors").exists() and not (run / "student").exists()
    assert not list(run.glob("*.tmp")) and not (tmp_path / "run.lock").exists()
    monkeypatch.undo()
    assert main(["distill", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "student.safetensors").is_file() and (run / "student" / "config.json").is_file()


def test_a_killed_exports_tmp_does_not_block_the_next_export(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "out.tmp" / "unet").mkdir(parents=True)  # a pipeline export killed half-way
    assert main(["export", str(world["run"]), "--format", "adapter", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.chdir(out)  # `--out .`: the lock goes beside the folder by its real name
    assert main(["export", str(world["run"]), "--format", "adapter", "--out", ".", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 7. silent acceptances become refusals -----------------------------------------------------

def test_config_beside_resume_and_fewer_steps_for_a_finished_run_are_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    refused(capsys, ["distill", "--resume", run, "--config", world["config"], "--no-progress"],
            "--config goes with a new run", run)
    refused(capsys, ["distill", "--resume", run, "train.steps=1", "--no-progress"], "the run finished 2 steps", run)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2

"""A command that fails or is killed leaves nothing half-written: no temporary checkpoint
on a full disk, no empty folder after a refused demo, no single-file checkpoint without
its scheduler and card."""

import errno
import os
import subprocess
import sys

import tiny_pipes
from test_bad_inputs import refused


def test_a_checkpoint_that_fills_the_disk_leaves_no_tmp_folder(tmp_path, capsys, monkeypatch):
    import json

    from wadi.engine import checkpoint

    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    pipes = {"sd": tiny_pipes.save_tiny_sd(tmp_path / "sd"), "prompts": tmp_path / "prompts.txt"}
    cfg = tiny_pipes.make_cfg(pipes, tmp_path, steps=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(cfg.to_dict()))
    write = checkpoint.write_pieces

    def full_disk(folder, pieces):  # the random state fits, the trained state's second piece does not
        if len(pieces) == 1:
            return write(folder, pieces)
        write(folder, pieces[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / pieces[1].file))

    monkeypatch.setattr(checkpoint, "write_pieces", full_disk)
    refused(capsys, ["distill", "--config", config, "--no-progress"], "No space left on device")
    runs = tmp_path / "runs"
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")], sorted(runs.rglob("*"))


def test_a_refused_demo_leaves_no_folder(tmp_path, capsys):
    # The flow world's schedule ends at index 999: a distillation refuses t_max=1500 when it starts.
    setting = ["--world", "digits-flow", "--no-progress", "train.t_max=1500"]
    refused(capsys, ["demo", *setting, "--root", tmp_path / "root"], "train.t_max must be at most 999")
    assert not (tmp_path / "root").exists()
    refused(capsys, ["demo", *setting, "--out", tmp_path / "new"], "train.t_max must be at most 999")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # an empty folder the user made stays
    refused(capsys, ["demo", *setting, "--out", tmp_path / "mine"], "train.t_max must be at most 999")
    assert (tmp_path / "mine").is_dir()


KILL_AT_FIRST_RENAME = """
import os, sys
from wadi.cli import main
targets, rename = set(sys.argv[1:4]), os.replace
def replace(src, dst):
    rename(src, dst)
    if str(dst) in targets:
        os._exit(9)  # killed between the renames: no handler runs
os.replace = replace
main(sys.argv[4:])
"""


def test_a_single_file_export_killed_between_its_renames_leaves_no_checkpoint_without_its_scheduler(
        tiny_run, tmp_path, capsys):
    from wadi.cli import main

    base, run = tiny_run("sd")
    template = tiny_pipes.save_template(base, tmp_path / "template.safetensors")
    out = tmp_path / "student.safetensors"
    paths = [out, out.with_suffix(".scheduler"), out.with_suffix(".md")]
    args = ["export", str(run), "--format", "single-file", "--template", str(template), "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_RENAME, *map(str, paths), *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not out.exists() or all(p.exists() for p in paths)
    assert any(p.exists() for p in paths)  # the kill came after a rename
    # The next export (no --force: nothing of the user's is there) completes the three.
    capsys.readouterr()
    assert main(args) == 0
    assert all(p.exists() for p in paths)
    assert (paths[1] / "scheduler_config.json").is_file()

"""train.parallel=fsdp2 on the CPU (gloo), two processes launched as a user launches them:
the frozen base sharded, the adapters replicated; the same training as one process."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_pipes
from tiny_pipes import make_cfg
from wadi.engine.training import distill

PROMPTS = "a photo of a cat\na red car\nthe digit seven\na dog on the table\n"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    (root / "prompts.txt").write_text(PROMPTS)
    return {"sd": tiny_pipes.save_tiny_sd(root / "sd"), "sd3": tiny_pipes.save_tiny_sd3(root / "sd3"),
            "prompts": root / "prompts.txt"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """`torchrun --nproc_per_node 2 --no-python wadi ...`, the documented launch."""
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python",
            str(BIN / "wadi"), *args]


def accelerate_launch(*args: str) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2 -m wadi.cli ...`: torchrun underneath;
    with no CUDA the processes join over gloo on the CPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "wadi.cli", *args]


def env() -> dict:
    src = str(Path(__file__).parent.parent / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def write_cfg(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def adapters(run: Path) -> dict[str, dict]:
    return {which: load_file(str(run / f"{which}.safetensors")) for which in ("student", "fake")}


def assert_adapters_close(ours: dict, ref: dict) -> None:
    # Two processes average two per-process means where one process takes one mean of the
    # whole batch: the same numbers up to the order of a sum (float32 rounding, which Adam
    # turns into at most ~1e-7 relative steps); other data or noise moves them by ~lr = 1e-4.
    for which in ref:
        assert sorted(ours[which]) == sorted(ref[which])
        for k in ref[which]:
            torch.testing.assert_close(ours[which][k], ref[which][k], rtol=0, atol=1e-5)


def run_two(cmd: list[str], cwd: Path):
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)


@pytest.mark.parametrize("kind, launch", [("sd3", torchrun), ("sd", accelerate_launch)])
def test_fsdp2_on_two_processes_trains_what_one_process_trains_with_their_batch(pipes, tmp_path, kind, launch):
    cfg = make_cfg(pipes, tmp_path, kind=kind, steps=2)
    result = run_two(launch("distill", "--no-progress", "--config", str(write_cfg(cfg, tmp_path / "c.yaml")),
                              "train.parallel=fsdp2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    for ckpt in sorted((run / "checkpoints").iterdir()):
        sums = json.loads((ckpt / "state.json").read_text())["adapter_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1]  # replicated adapters stayed equal
    single = make_cfg(pipes, tmp_path / "one", kind=kind, steps=2, batch_size=4)
    one = distill(single, progress=False)
    assert_adapters_close(adapters(run), adapters(one))
    # The exported student: the same merged model (merged from a freshly read base here).
    ours, ref = (load_file(str(next((r / "student").glob("*.safetensors")))) for r in (run, one))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-5)
    # One process reads the sharded run as any other: wadi export and wadi sample, no launch.
    import numpy as np
    from PIL import Image

    from wadi.models.backbones import get_kind
    from wadi.cli import main

    for r in (run, one):
        assert main(["export", str(r), "--out", str(r / "export")]) == 0
        assert main(["sample", str(r), "--prompt", "a cat", "--seeds", "0-1", "--out", str(r / "png")]) == 0
    ours, ref = (load_file(str(next((r / "export" / get_kind(kind).subfolder).glob("*.safetensors"))))
                 for r in (run, one))
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-5)
    pngs = sorted(p.name for p in (one / "png").glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in (run / "png").glob("*.png"))
    for name in pngs:
        a, b = (np.asarray(Image.open(r / "png" / name), dtype=np.int16) for r in (one, run))
        assert np.abs(a - b).max() <= 1  # at most one level, where float rounding crosses a step


def worker_of(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launched process of `rank` (a child of torchrun, RANK in its environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_sigkill_of_rank_1_then_resume_is_the_uninterrupted_run_bit_for_bit(pipes, tmp_path):
    import shutil
    import signal
    import subprocess
    import time

    steps = 8
    straight = write_cfg(make_cfg(pipes, tmp_path / "a", kind="sd3", steps=steps), tmp_path / "a.yaml")
    result = run_two(torchrun("distill", "--no-progress", "--config", str(straight), "train.parallel=fsdp2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = next((tmp_path / "a" / "runs").iterdir())

    killed = write_cfg(make_cfg(pipes, tmp_path / "b", kind="sd3", steps=steps), tmp_path / "b.yaml")
    proc = subprocess.Popen(torchrun("distill", "--no-progress", "--config", str(killed), "train.parallel=fsdp2"),
                            env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "b" / "runs").glob("*/checkpoints/step-0000002")):
        time.sleep(0.02)
    os.kill(worker_of(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=60) != 0  # torchrun ends the other rank and fails
    run = next((tmp_path / "b" / "runs").iterdir())
    assert not (run / "student.safetensors").exists(), "the run finished before it was killed"
    shutil.copytree(run, tmp_path / "copy")

    result = run_two(torchrun("distill", "--no-progress", "--resume", str(run)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = adapters(run), adapters(reference)
    for which in ref:  # the same computations in the same order: equal, not close
        assert all(torch.equal(ours[which][k], ref[which][k]) for k in ref[which]), which
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())] == list(
        range(1, steps + 1))

    # The same checkpoint on one process with the same global batch: the run continues,
    # equal to float rounding (one mean of four samples against the mean of two means).
    with pytest.raises(ValueError, match="global batch of 4 .*train.batch_size=4"):
        distill(resume=str(tmp_path / "copy"), progress=False)
    distill(resume=str(tmp_path / "copy"), overrides=["train.batch_size=4"], progress=False)
    assert_adapters_close(adapters(tmp_path / "copy"), ref)


DYING_SAVE = """
import os, sys
import wadi.engine.checkpoint as ckpt
real = ckpt.save_state

def dying(path, state):
    if os.environ["RANK"] == "1" and path.parent.name == "step-0000003.tmp":
        path.write_bytes(b"half a file")
        os.kill(os.getpid(), 9)  # killed in the middle of writing its piece
    real(path, state)

ckpt.save_state = dying
from wadi.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_two_process_save_leaves_the_previous_checkpoint_usable(pipes, tmp_path):
    script = tmp_path / "dying_save.py"
    script.write_text(DYING_SAVE)
    cfg = write_cfg(make_cfg(pipes, tmp_path / "b", kind="sd3", steps=4), tmp_path / "b.yaml")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
           "distill", "--no-progress", "--config", str(cfg), "train.parallel=fsdp2"]
    assert run_two(cmd, tmp_path).returncode != 0
    run = next((tmp_path / "b" / "runs").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002",
                                                                     "step-0000003.tmp"]
    # Resumed (here on one process, the same global batch) from step 2, as a run that never
    # stopped would be at step 4, to float rounding.
    distill(resume=str(run), overrides=["train.batch_size=4"], progress=False)
    assert [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()][-2:] == [3, 4]
    assert not (run / "checkpoints" / "step-0000003.tmp").exists()
    one = distill(make_cfg(pipes, tmp_path / "one", kind="sd3", steps=4, batch_size=4), progress=False)
    assert_adapters_close(adapters(run), adapters(one))


FAILING_RANK = """
import os, sys
from wadi.engine.distiller import Distiller

real = Distiller.train_step

def failing(self):
    if os.environ["RANK"] == "1" and self.step == 1:
        raise ValueError("a bad input only this process sees")
    return real(self)

Distiller.train_step = failing
from wadi.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_rank_that_fails_ends_every_rank_with_one_line(pipes, tmp_path, parallel):
    import time

    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    cfg = write_cfg(make_cfg(pipes, tmp_path, kind="sd3", steps=4), tmp_path / "c.yaml")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
           "distill", "--no-progress", "--config", str(cfg), f"train.parallel={parallel}"]
    t0 = time.time()
    result = run_two(cmd, tmp_path)  # a hang would be stopped by run_two's timeout and fail here
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith(("wadi", "[rank"))]
    assert "wadi distill: error: a bad input only this process sees" in lines
    # the other process ends with its own one line, or is stopped by torchrun before it sees the loss
    assert not [line for line in lines if line.startswith("[rank")], lines  # no traceback from any rank
    assert time.time() - t0 < 240

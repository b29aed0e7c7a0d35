"""Settings as a user gives them: overrides anywhere on the command line, the resolved
config printed without a run, paths that mean the same from any directory, hub revisions
and variants, what an unreachable hub says, and the W&B project."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tiny_pipes
from wadi.models.backbones import BackboneSpec
from wadi.cli import main
from wadi.engine.training import distill

TINY = ["model.resolution=16", "student.rank=4", "fake.rank=2", "student.targets=unet-student",
        "fake.targets=unet-fake", "train.batch_size=2", "train.mixed_precision=no", "train.adam_8bit=false",
        "train.gradient_checkpointing=false", "run.sample_every=0", "run.log_every=1"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    (root / "prompts.txt").write_text("a cat\na red car\n")
    return tiny_pipes.save_tiny_sd(root / "sd"), root / "prompts.txt"


def test_overrides_on_both_sides_of_a_flag_are_all_read(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--config", "sd15-wadi", "train.steps=7", "--print-config", "run.desc=x",
                 "--no-progress", "train.seed=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["steps"], printed["run"]["desc"], printed["train"]["seed"]) == (7, "x", 5)
    with pytest.raises(SystemExit) as exit:  # argparse's own refusal, now with the command's usage
        main(["distill", "--config", "sd15-wadi", "train.steps=7", "--bogus", "run.desc=x"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "usage: wadi distill" in err and "unrecognized arguments: --bogus" in err


def test_print_config_prints_what_the_run_would_record_and_writes_nothing(sd, tmp_path, capsys, monkeypatch):
    model, prompts = sd
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text(prompts.read_text())
    assert main(["distill", "--config", "sd15-wadi", f"model.path={model}", "data.prompts=p.txt",
                 "model.revision=v1", "model.variant=fp16", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["prompts"] == str(tmp_path / "p.txt") and printed["run"]["root"] == str(tmp_path / "runs")
    assert printed["model"]["revision"] == "v1" and printed["model"]["variant"] == "fp16"
    assert printed["train"]["mixed_precision"] == "fp16"  # the preset's, not checked against this machine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]  # no run folder, no lock


def test_a_run_started_with_relative_paths_resumes_from_another_directory(sd, tmp_path, monkeypatch):
    model, prompts = sd
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "models").mkdir(parents=True)
    elsewhere.mkdir()
    os.symlink(model, start / "models" / "sd")
    (start / "prompts.txt").write_text(prompts.read_text())
    monkeypatch.chdir(start)
    run = distill("sd15-wadi", ["model.path=models/sd", "data.prompts=prompts.txt", "run.root=runs",
                                "train.steps=1", "run.checkpoint_every=1", *TINY], progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["path"] == str(start / "models" / "sd") and saved["run"]["root"] == str(start / "runs")
    assert saved["data"]["prompts"] == str(start / "prompts.txt")
    monkeypatch.chdir(elsewhere)
    again = distill(resume=str(run.resolve()), overrides=["train.steps=2"], progress=False)
    assert again == run.resolve() and yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2
    assert not list(elsewhere.iterdir())


def test_revision_and_variant_reach_every_from_pretrained(sd, tmp_path, monkeypatch):
    """A variant's files load by it (and not without it); the revision goes to every loader."""
    import diffusers
    import transformers

    model, _ = sd
    variant = tmp_path / "variant"
    for src in model.rglob("*"):
        dst = variant / src.relative_to(model)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        elif src.suffix == ".safetensors":  # model.safetensors -> model.v2.safetensors
            dst.with_name(f"{src.stem}.v2{src.suffix}").write_bytes(src.read_bytes())
        else:
            dst.write_bytes(src.read_bytes())
    with pytest.raises(FileNotFoundError, match="could not load the unet"):
        BackboneSpec(path=str(variant)).load()
    calls = []
    for owner in (diffusers.ModelMixin, diffusers.ConfigMixin, transformers.PreTrainedModel,
                  transformers.PreTrainedTokenizerBase):
        for method in ("from_pretrained", "load_config"):
            if method in vars(owner):
                original = getattr(owner, method).__func__

                def spy(cls, *args, _original=original, _method=method, **kwargs):
                    calls.append((cls.__name__, _method, kwargs.get("revision"), kwargs.get("variant")))
                    return _original(cls, *args, **kwargs)

                monkeypatch.setattr(owner, method, classmethod(spy))
    bb = BackboneSpec(path=str(variant), variant="v2", revision="main").load()
    assert isinstance(bb.net, diffusers.UNet2DConditionModel)
    loaded = {name for name, _, _, _ in calls}
    assert {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTokenizer", "DDPMScheduler"} <= loaded
    assert all(revision == "main" for _, _, revision, _ in calls), calls
    weights = [c for c in calls if c[0] in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel")
               and c[1] == "from_pretrained"]
    assert len(weights) == 3 and all(c[3] == "v2" for c in weights), calls


def test_an_unreachable_hub_says_so(tmp_path):
    """No network in tests: HF_HUB_OFFLINE stands for an unreachable hub, an empty HF_HOME
    for a model that is not in the cache."""
    (tmp_path / "p.txt").write_text("a cat\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "wadi.cli", "distill", "--config", "sd15-wadi",
                           "model.path=someone/some-model", f"data.prompts={tmp_path / 'p.txt'}",
                           f"run.root={tmp_path / 'runs'}", "train.mixed_precision=no"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()[-1]
    assert "could not load the scheduler from 'someone/some-model'" in err
    assert "hub downloads are switched off (HF_HUB_OFFLINE=1) and the model is not in the local cache" in err
    assert "scheduler_config.json" not in err and not (tmp_path / "runs").exists()


def test_the_wandb_project_and_entity_are_settings(sd, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    model, prompts = sd
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    original = wandb.init

    def init(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    run = distill("sd15-wadi", [f"model.path={model}", f"data.prompts={prompts}", f"run.root={tmp_path}",
                                "train.steps=1", "run.checkpoint_every=0", "run.report_to=wandb",
                                "run.wandb_project=my-project", "run.wandb_entity=my-team", *TINY], progress=False)
    assert (seen["project"], seen["entity"], seen["name"]) == ("my-project", "my-team", run.name)
    assert Path(seen["dir"]) == run and list((run / "wandb").glob("offline-run-*"))


def test_the_progress_bar_shows_the_fake_loss_trend_gradient_norm_and_skipped_steps(sd, tmp_path, capsys):
    from wadi.engine.tracking import Progress

    records = [{"loss_fake": 2.0, "grad_norm_student": 0.5, "skipped": 0},
               {"loss_fake": float("nan"), "grad_norm_student": None, "skipped": 1},
               {"loss_fake": 1.0, "grad_norm_student": 0.25, "skipped": 0}]
    progress = Progress(smoothing=0.9)
    shown = [progress.update(r) for r in records]
    assert shown[1] == {"fake_loss": "2", "grad": "-", "skipped": "1"}  # a non-finite loss leaves the trend
    assert shown[2] == {"fake_loss": f"{0.9 * 2.0 + 0.1 * 1.0:.3g}", "grad": "0.25", "skipped": "1"}

    model, prompts = sd
    capsys.readouterr()
    distill("sd15-wadi", [f"model.path={model}", f"data.prompts={prompts}", f"run.root={tmp_path}",
                          "train.steps=2", "run.checkpoint_every=0", "run.report_to=none", *TINY])
    bar = capsys.readouterr().err
    assert "fake_loss=" in bar and "grad=" in bar and "skipped=0" in bar and "student=" not in bar

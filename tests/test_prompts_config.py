"""Prompt file readers and config resolution (presets, YAML, overrides)."""

import json

import pytest
import yaml

from wadi.engine.config import resolve
from wadi.engine.presets import PRESETS
from wadi.files.prompts import read_prompts


def test_plain_text_skips_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(f) == ["a cat", "a dog"]


def test_journeydb_annotations_and_dedupe(tmp_path):
    f = tmp_path / "train_anno.jsonl"
    rows = [{"img_path": "x.jpg", "Task2": {"Caption": "b prompt"}}, {"Task2": {"caption": "a prompt"}},
            {"Task2": {"Caption:": "b prompt"}}, {"prompt": "c prompt"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_prompts(f) == ["b prompt", "a prompt", "b prompt", "c prompt"]
    assert read_prompts(f, dedupe=True) == ["a prompt", "b prompt", "c prompt"]


def test_coco_captions(tmp_path):
    f = tmp_path / "captions_val2014.json"
    f.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "A man on a horse. "},
                                                           {"image_id": 2, "caption": "Two dogs"}]}))
    assert read_prompts(f) == ["A man on a horse.", "Two dogs"]


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"prompt": "ok"}\nnot json\n', r"p.jsonl:2 is not valid JSON"),
    ("p.jsonl", '{"url": "x"}\n', "no prompt field"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a", "prompt": "b"}\n', r"p.jsonl:2 has a duplicate key 'prompt'"),
    ("p.json", '{"images": []}', "not a COCO caption file"),
    ("p.txt", "", "holds no prompts"),
])
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(f)


def test_presets_mirror_the_authors_recipes():
    sd = resolve("sd15-wadi")
    assert (sd.student.kind, sd.student.rank, sd.student.targets) == ("lorad", 256, "unet-student")
    assert (sd.fake.kind, sd.fake.rank, sd.fake.targets) == ("lorad", 32, "unet-fake")
    t = sd.train
    assert (t.lr_student, t.lr_fake, t.betas, t.weight_decay, t.max_grad_norm) == (1e-4, 1e-2, (0.9, 0.999), 0.0, 1.0)
    assert (t.guidance, t.t_min, t.t_max, t.fake_uncond_prob, t.mixed_precision) == (1.5, 20, 980, 0.1, "fp16")
    px = resolve("pixart-wadi")
    assert (px.student.rank, px.student.targets, px.fake.rank, px.fake.targets) == (128, "dit-student", 32, "dit-fake")
    assert px.train.mixed_precision == "bf16" and px.model.kind == "pixart"
    assert resolve("sd15-wadi-r64").student.rank == 64
    for kind in ("lora", "dora", "dora-frozen", "full", "lorad"):
        ab = resolve(f"sd15-ablation-{kind}")
        assert ab.student.kind == kind and ab.train.mixed_precision == "fp16" and ab.fake.rank == 32
    assert {"sd15-wadi", "sd21-wadi", "pixart-wadi"} <= set(PRESETS)


def test_yaml_with_preset_and_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"preset": "sd21-wadi", "train": {"steps": 7}, "data": {"prompts": "p.txt"}}))
    cfg = resolve(str(f), ["train.batch_size=4", "student.rank=64", "train.ema_decay=0.999"])
    assert cfg.preset == "sd21-wadi" and cfg.model.path == "stabilityai/stable-diffusion-2-1-base"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.student.rank, cfg.train.ema_decay) == (7, 4, 64, 0.999)
    assert cfg.train.mixed_precision == "fp16"  # the rest of the preset's section stays


def test_exponent_numbers_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string, in files and in overrides alike.
    f = tmp_path / "exp.yaml"
    f.write_text("preset: sd15-wadi\ntrain:\n  lr_fake: 2e-2\n")
    cfg = resolve(str(f), ["train.lr_student=1e-3", "train.max_grad_norm=2"])
    assert (cfg.train.lr_student, cfg.train.lr_fake, cfg.train.max_grad_norm) == (1e-3, 2e-2, 2.0)
    assert isinstance(cfg.train.max_grad_norm, float)


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=1"], "unknown setting train.lr; valid keys here"),
    (["student.kind=lokr"], "unknown adapter kind 'lokr'"),
    (["steps"], "must look like section.key=value"),
    (["train=3"], "must be a section of keys"),
    (["train.lr_student=fast"], "setting train.lr_student must be a number, got 'fast'"),
    (["train.steps=1e3"], "setting train.steps must be an integer, got '1e3'"),
    (["student.rank=sixty"], "setting student.rank must be an integer"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("sd15-wadi", overrides)


def test_unknown_config_name():
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        resolve("sd99-wadi")


def test_a_run_is_read_as_saved_not_through_todays_preset(tmp_path, monkeypatch):
    """A preset that changed after a run was made does not change the run's settings."""
    from wadi.engine.config import run_config
    from wadi.engine.presets import deep_update

    saved = resolve("sd15-wadi").to_dict()
    del saved["train"]["warmup_steps"]  # a run written before this setting existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setitem(PRESETS, "sd15-wadi", deep_update(PRESETS["sd15-wadi"], {"train": {"warmup_steps": 77}}))
    assert resolve("sd15-wadi").train.warmup_steps == 77
    run = type("Run", (), {"config": tmp_path / "config.yaml"})()
    cfg = run_config(run)
    assert cfg.train.warmup_steps == 0 and cfg.preset == "sd15-wadi"

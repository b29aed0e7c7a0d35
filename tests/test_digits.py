"""The digits world behind `wadi demo`: prompts, data split, the shipped classifier and
teacher, the metrics on known inputs, and a shortened demo run end to end."""

import json
from pathlib import Path

import pytest
import torch

from wadi.adapters import KINDS
from wadi.cli import main
from wadi.config import resolve
from wadi.digits import metrics, paths, world
from wadi.digits.classifier import accuracy, load_classifier
from wadi.digits.demo import STUDENT_LR, DemoSettings, criteria, run_compare, run_demo
from wadi.digits.teacher import load_teacher, train_teacher


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


# --- the world ------------------------------------------------------------------------

def test_prompt_set():
    prompts = world.all_prompts()
    assert len(prompts) == len(set(prompts)) == 10 * len(world.TEMPLATES)
    for label, word in enumerate(world.CLASS_WORDS):
        phrasings = world.class_prompts(label)
        assert "a handwritten " + word in phrasings and f"the digit {label}" in phrasings
        assert all(word in p or str(label) in p for p in phrasings)
        assert {world.label_of(p) for p in phrasings} == {label}
    # The shipped prompt file (the digits-wadi preset's data.prompts) is the same set.
    assert paths.PROMPTS.read_text().splitlines() == prompts
    with pytest.raises(ValueError, match="not a prompt"):
        world.label_of("a handwritten eleven")
    with pytest.raises(ValueError, match="0..9"):
        world.class_prompts(10)


def test_eval_prompts_are_balanced_and_seeded():
    prompts, labels, seeds = world.eval_prompts(per_class=3, seed=5)
    assert len(prompts) == len(labels) == len(seeds) == 30
    assert [labels.count(c) for c in range(10)] == [3] * 10
    assert [world.label_of(p) for p in prompts] == labels
    assert seeds == list(range(5, 35))


def test_split_is_fixed_stratified_and_disjoint():
    x_all, y_all = world.load("all")
    x_tr, y_tr = world.load("train")
    x_ho, y_ho = world.load("heldout")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.min() == -1 and x_all.max() == 1
    assert len(x_tr) + len(x_ho) == len(x_all)
    assert abs(len(x_ho) / len(x_all) - world.HELDOUT_FRACTION) < 0.01
    assert all(abs((y_ho == c).sum().item() / (y_all == c).sum().item() - 0.2) < 0.02 for c in range(10))
    train_rows = {tuple(r) for r in x_tr.flatten(1).tolist()}
    # sklearn's digits hold a few exact duplicates; almost no held-out image may be in train.
    assert sum(tuple(r) in train_rows for r in x_ho.flatten(1).tolist()) <= 3
    with pytest.raises(ValueError, match="unknown split"):
        world.load("test")


# --- the metric networks and the metrics ------------------------------------------------

def test_classifier_accuracy_on_heldout_digits(classifier):
    assert accuracy(classifier, *world.load("heldout")) >= 0.95


def test_metrics_on_known_inputs(classifier):
    images, labels = world.load("train")
    same = metrics.score(classifier, images, labels.tolist())
    assert abs(same["frechet"]) < 1e-6 and same["precision"] == same["recall"] == 1.0
    assert same["alignment"] > 0.99
    shifted = metrics.score(classifier, (images + 0.5).clamp(-1, 1), labels.tolist())
    noise = metrics.score(classifier, torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                          [0] * 500)
    assert 1.0 < shifted["frechet"] < noise["frechet"]
    held_images, held_labels = world.load("heldout")
    held = metrics.score(classifier, held_images, held_labels.tolist())
    assert held["frechet"] < shifted["frechet"]  # unseen real digits sit close to the train set
    assert noise["alignment"] < 0.2
    predictions = metrics.classify(classifier, images[:4])[1]
    with pytest.raises(ValueError, match="predictions"):
        metrics.alignment(predictions, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        metrics.classify(classifier, torch.zeros(2, 8, 8))


def test_prompt_alignment_for_wadi_eval(classifier):
    from wadi.images import to_uint8

    images, labels = world.load("heldout")
    prompts = [world.class_prompts(int(y))[0] for y in labels[:40]]
    assert metrics.prompt_alignment(to_uint8(images[:40]), prompts) > 0.9


# --- the teacher ----------------------------------------------------------------------

def test_shipped_teacher_loads_and_predicts(teacher):
    assert teacher.kind.name == "pixel" and teacher.latent_shape == (1, 8, 8) and teacher.vae is None
    assert teacher.num_train_timesteps == 1000 and abs(teacher.alphas_cumprod[999].item() - 0.0047) < 1e-4
    cond = teacher.encode_prompts(["a handwritten seven", ""])
    assert cond.embeds.shape == (2, paths.MAX_LENGTH, 384)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = teacher.predict_eps(teacher.net, x, torch.tensor([999, 10]), cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_teacher_training_writes_a_loadable_folder(tmp_path):
    out = train_teacher(tmp_path / "t", steps=2, batch_size=4, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and "wadi digits-teacher" in record["command"]
    assert load_teacher(out).net.config.cross_attention_dim == 384


def test_preset_points_at_the_shipped_world():
    cfg = resolve("digits-wadi")
    assert cfg.model.kind == "pixel" and cfg.data.cache_embeddings
    assert (paths.TEACHER / "unet").is_dir() and (paths.TEACHER / "scheduler").is_dir()
    assert cfg.model.path == str(paths.TEACHER) and cfg.data.prompts == str(paths.PROMPTS)
    assert cfg.model.text_encoder == str(paths.minilm_dir())


# --- the demo -------------------------------------------------------------------------

def test_shortened_demo_writes_the_report(tmp_path):
    settings = DemoSettings(steps=2, per_class=1, root=str(tmp_path / "runs"),
                            overrides=["train.batch_size=4", "run.sample_every=0", "run.checkpoint_every=0"])
    out = run_demo(settings, tmp_path / "report", progress=False)
    for name in ("report.md", "grid.png", "loss.png", "metrics.json"):
        assert (out / name).is_file()
    summary = json.loads((out / "metrics.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["teacher, 25 steps", "teacher, 1 step", "teacher, 1 step, no guidance", "student, 1 step",
                     "real digits (held-out)"]
    assert summary["trainable"]["student"] > 0 and summary["distill"]["steps"] == 2
    assert {"alignment_ratio", "frechet_ratio", "teacher_1_step_far_worse"} <= set(summary["criteria"])
    report = (out / "report.md").read_text()
    assert "| teacher, 25 steps | 50 |" in report and "grid.png" in report and "loss.png" in report
    assert Path(summary["run_dir"]).parent == tmp_path / "runs"


def test_shortened_compare_writes_one_table(tmp_path):
    settings = DemoSettings(steps=1, per_class=1, root=str(tmp_path / "runs"),
                            overrides=["train.batch_size=2", "run.sample_every=0", "run.checkpoint_every=0"])
    out = run_compare(settings, tmp_path / "compare", progress=False)
    summary = json.loads((out / "compare.json").read_text())
    assert [r["adapter"] for r in summary["adapters"]] == list(KINDS)
    assert [r["lr"] for r in summary["adapters"]] == [STUDENT_LR[k] for k in KINDS]
    table = (out / "compare.md").read_text()
    assert "| lorad | 16 | 0.003 |" in table and "| full | - | 3e-06 |" in table


def test_demo_bar_against_hand_computed_ratios():
    teacher, student = {"alignment": 1.0, "frechet": 40.0}, {"alignment": 0.9, "frechet": 60.0}
    c = criteria(teacher, {"alignment": 0.95, "frechet": 120.0}, student)
    assert c["alignment_ratio"] == pytest.approx(0.9) and c["alignment_ok"]
    assert c["frechet_ratio"] == pytest.approx(1.5) and c["frechet_ok"]
    assert c["teacher_1_step_far_worse"]  # twice the student's 60
    c = criteria(teacher, {"alignment": 0.95, "frechet": 119.0}, {"alignment": 0.89, "frechet": 61.0})
    assert not (c["alignment_ok"] or c["frechet_ok"] or c["teacher_1_step_far_worse"])
    assert criteria(teacher, {"alignment": 0.4, "frechet": 50.0}, student)["teacher_1_step_far_worse"]


def test_demo_rejects_bad_settings(capsys):
    threads = torch.get_num_threads()
    assert main(["demo", "--rank", "0"]) == 2
    assert "--rank must be positive" in capsys.readouterr().err
    assert main(["demo", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert torch.get_num_threads() == threads  # a refused demo changes nothing
    with pytest.raises(SystemExit):
        main(["demo", "--adapter", "bogus"])

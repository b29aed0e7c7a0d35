"""The digits worlds behind `wadi demo`: prompts, data split, the shipped classifier and
teachers (the UNet of `digits`, the rectified-flow MMDiT of `digits-flow`), the metrics on
known inputs, and shortened demo runs end to end."""

import json

import numpy as np
import pytest
import torch

from wadi.adapters.core import ADAPTERS
from wadi.cli import main
from wadi.digits import metrics, paths, world
from wadi.digits.classifier import accuracy, load_classifier
from wadi.digits.demo import STUDENT_LR, DemoSettings, criteria, run_compare, run_demo
from wadi.digits.teacher import load_teacher, train_teacher
from wadi.engine.config import resolve
from wadi.models.process import Flow
from wadi.files.images import to_uint8
from wadi.files.run_folder import RunFolder
from wadi.worlds import get_world


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
    """The world's Frechet distance and precision/recall, in the classifier's features of
    uint8 images as evaluation reads them back."""
    from wadi.evaluation.metrics import frechet_distance_features, precision_recall
    from wadi.files.images import to_uint8

    images, labels = world.load("train")
    ref = metrics.features(to_uint8(images))

    def frechet(x):
        return frechet_distance_features(metrics.features(to_uint8(x)), ref)

    assert abs(frechet(images)) < 1e-6
    pr = precision_recall(ref, metrics.features(to_uint8(images)), device="cpu")
    assert pr.precision == pr.recall == 1.0
    shifted = frechet((images + 0.5).clamp(-1, 1))
    noise_images = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 1.0 < shifted < frechet(noise_images)
    assert frechet(world.load("heldout")[0]) < shifted  # unseen real digits sit close to the train set
    assert metrics.prompt_alignment(to_uint8(noise_images), [world.class_prompts(0)[0]] * 500) < 0.2
    predictions = metrics.classify(classifier, images[:4])[1]
    with pytest.raises(ValueError, match="predictions"):
        metrics.alignment(predictions, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        metrics.classify(classifier, torch.zeros(2, 8, 8))


def test_prompt_alignment_for_wadi_eval(classifier):
    from wadi.files.images import to_uint8

    images, labels = world.load("heldout")
    prompts = [world.class_prompts(int(y))[0] for y in labels[:40]]
    assert metrics.prompt_alignment(to_uint8(images[:40]), prompts) > 0.9


# --- the teacher ----------------------------------------------------------------------

def test_shipped_teacher_loads_and_predicts(teacher):
    assert teacher.kind.name == "pixel" and teacher.latent_shape == (1, 8, 8) and teacher.vae is None
    assert teacher.num_train_timesteps == 1000 and abs(teacher.process.alphas_cumprod[999].item() - 0.0047) < 1e-4
    cond = teacher.encode_prompts(["a handwritten seven", ""])
    assert cond.embeds.shape == (2, paths.MAX_LENGTH, 384)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = teacher.predict(teacher.net, x, torch.tensor([999, 10]), cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_teacher_training_writes_a_loadable_folder(tmp_path):
    out = train_teacher(tmp_path / "t", steps=2, batch_size=4, progress=False)
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and "wadi digits-teacher --out" in record["command"]
    assert load_teacher(out).net.config.cross_attention_dim == 384


def test_shipped_flow_teacher_loads_and_predicts_velocities():
    teacher = load_teacher(name="digits-flow")
    assert teacher.kind.name == "pixel-mmdit" and isinstance(teacher.process, Flow)
    assert teacher.latent_shape == (1, 8, 8) and teacher.vae is None
    assert teacher.net.config.joint_attention_dim == teacher.net.config.pooled_projection_dim == 384
    cond = teacher.encode_prompts(["a handwritten seven", ""])
    assert cond.embeds.shape == (2, paths.MAX_LENGTH, 384) and cond.extra["pooled"].shape == (2, 384)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    v = teacher.predict(teacher.net, x, teacher.process.time(torch.tensor([999, 10])), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # Trained, the one-step x0 = z - v(z, 1) lands in the digits' range [-1, 1], far from the noise z.
    x0 = teacher.process.generate(v[:1], x[:1])
    assert x0.abs().max() < 1.5 and (x0 - x[:1]).abs().mean() > 0.5


def test_flow_teacher_training_writes_a_loadable_folder(tmp_path):
    out = main(["digits-teacher", "--world", "digits-flow", "--out", str(tmp_path / "t"), "--steps", "2",
                "--batch-size", "4", "--no-progress"])
    assert out == 0
    record = json.loads((tmp_path / "t" / "training.json").read_text())
    assert record["steps"] == 2 and "wadi digits-teacher --world digits-flow --out" in record["command"]
    teacher = load_teacher(tmp_path / "t", name="digits-flow")
    assert teacher.kind.name == "pixel-mmdit" and isinstance(teacher.process, Flow)
    assert (tmp_path / "t" / "transformer").is_dir() and not (tmp_path / "t" / "unet").exists()


def test_preset_points_at_the_shipped_world():
    cfg = resolve("digits-wadi")
    assert cfg.model.kind == "pixel" and cfg.data.cache_embeddings
    assert (paths.TEACHER / "unet").is_dir() and (paths.TEACHER / "scheduler").is_dir()
    assert cfg.model.path == str(paths.TEACHER) and cfg.data.prompts == str(paths.PROMPTS)
    assert cfg.model.text_encoder == str(paths.minilm_dir())


def test_flow_world_registers_with_its_preset(tmp_path):
    w = get_world("digits-flow")
    assert w.name == "digits-flow" and list(w.presets) == ["digits-flow-wadi"]
    cfg = resolve("digits-flow-wadi")
    assert cfg.model.kind == "pixel-mmdit" and cfg.model.path == str(paths.FLOW_TEACHER)
    assert (cfg.student.targets, cfg.fake.targets) == ("mmdit-student", "mmdit-fake")
    assert cfg.data.prompts == str(paths.PROMPTS)  # the same prompts as the digits world
    # The same evaluation as the digits world's, against its own teacher.
    ev, digits_ev = w.evaluation(20, tmp_path), get_world("digits").evaluation(20, tmp_path)
    assert ev.teacher.path == str(paths.FLOW_TEACHER) and ev.teacher.kind == "pixel-mmdit"
    assert ev.prompts.prompts == digits_ev.prompts.prompts and ev.reference == digits_ev.reference
    assert (ev.alignment, ev.features, ev.metrics) == (digits_ev.alignment, digits_ev.features, digits_ev.metrics)


# --- the demo -------------------------------------------------------------------------

SHORT = ["train.batch_size=4", "run.sample_every=0", "run.checkpoint_every=0"]


def test_shortened_demo_over_two_seeds_writes_one_report(tmp_path):
    settings = DemoSettings(steps=2, per_class=1, seeds=[0, 3], root=str(tmp_path / "runs"), overrides=SHORT)
    out = run_demo(settings, progress=False)
    assert out.parent == tmp_path / "runs" and out.name.endswith("digits-demo")
    for name in ("report.md", "grid.png", "loss.png", "metrics.json", "eval/results.json", "eval/grid-seed3.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["teacher, 25 steps", "teacher, 1 step", "teacher, 1 step, no guidance", "student-seed0",
                     "student-seed3", "real digits (held-out, 359 images)", "real digits at 10 images (the floor)"]
    # the numbers are wadi eval's: the same results file, the same Frechet and KID
    results = json.loads((out / "eval" / "results.json").read_text())
    for key in ("fid", "kid"):
        assert summary["rows"][3][key] == results["models"]["student-seed0"][key]
    # The quality curve's last point scores the final student (adapter, not merged: float round-off apart).
    for seed, name in ((0, "student-seed0"), (3, "student-seed3")):
        (point,) = summary["curves"][str(seed)]
        assert point["step"] == 2
        assert point["fid"] == pytest.approx(results["models"][name]["fid"], rel=1e-4)
        assert point["kid"] == pytest.approx(results["models"][name]["kid"], rel=1e-4, abs=1e-3)
    assert (out / "quality.png").is_file()
    assert [r["seed"] for r in summary["rows"][3:5]] == [0, 3]
    runs = sorted((out / "runs").iterdir())
    assert [r.name for r in runs] == ["00000-digits-wadi-lorad-seed0", "00001-digits-wadi-lorad-seed3"]
    c = summary["criteria"]
    assert c["worst_fid"] == max(summary["rows"][3]["fid"], summary["rows"][4]["fid"])
    report = (out / "report.md").read_text()
    assert "| teacher, 25 steps | 50 |" in report and "| student-seed3 | 1 |" in report and "median" in report
    assert "KID (classifier)" in report and "## Time to quality" in report and "real-digits floor" in report
    assert summary["world"] == "digits" and "world `digits`" in report and "preset `digits-wadi`" in report


def test_shortened_flow_demo_names_its_world(tmp_path):
    assert main(["demo", "--world", "digits-flow", "--steps", "2", "--per-class", "1", "--root", str(tmp_path / "runs"),
                 "--no-progress", *SHORT]) == 0
    out = next((tmp_path / "runs").iterdir())
    assert out.name.endswith("digits-flow-demo")
    for name in ("report.md", "grid.png", "loss.png", "metrics.json", "eval/results.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world"] == "digits-flow" and summary["preset"] == "digits-flow-wadi"
    assert summary["teacher_sampling"]["scheduler"] == "euler"  # the flow's own sampler
    assert [r.name for r in (out / "runs").iterdir()] == ["00000-digits-flow-wadi-lorad-seed0"]
    report = (out / "report.md").read_text()
    assert "world `digits-flow`" in report and "`wadi eval --world digits-flow`" in report


def test_shortened_compare_writes_one_table(tmp_path):
    settings = DemoSettings(steps=1, per_class=1, root=str(tmp_path / "runs"),
                            overrides=["train.batch_size=2", "run.sample_every=0", "run.checkpoint_every=0"])
    out = run_compare(settings, tmp_path / "compare", progress=False)
    summary = json.loads((out / "compare.json").read_text())
    assert [r["adapter"] for r in summary["adapters"]] == list(ADAPTERS)
    assert [r["lr"] for r in summary["adapters"]] == [STUDENT_LR[k] for k in ADAPTERS]
    table = (out / "compare.md").read_text()
    assert f"| lorad | 16 | {STUDENT_LR['lorad']:g} |" in table and f"| full | - | {STUDENT_LR['full']:g} |" in table


def test_demo_bar_against_hand_computed_ratios():
    teacher, unguided, real = {"alignment": 1.0, "fid": 10.0}, {"fid": 60.0}, {"fid": 4.0}
    students = [{"alignment": 0.95, "fid": 15.0}, {"alignment": 0.99, "fid": 20.0}, {"alignment": 1.0, "fid": 30.0}]
    c = criteria(teacher, unguided, students, real)
    assert c["teacher_ok"] and c["teacher_vs_real"] == pytest.approx(2.5)
    assert c["alignment_ok"] and c["median_fid"] == 20.0 and c["median_ok"]  # 2.0x: on the bar
    assert c["worst_fid"] == 30.0 and c["worst_ok"] and c["from_start_ok"]  # 30 = half of 60
    c = criteria(teacher, {"fid": 59.0}, students + [{"alignment": 0.94, "fid": 31.0}], {"fid": 3.0})
    assert not (c["teacher_ok"] or c["alignment_ok"] or c["worst_ok"] or c["from_start_ok"])
    assert c["median_fid"] == 25.0 and not c["median_ok"]


def test_demo_rejects_bad_settings(tmp_path, capsys):
    threads = torch.get_num_threads()
    for args, message in [(["--rank", "0"], "--rank must be positive"),
                          (["--threads", "0"], "--threads must be at least 1"),
                          (["--seeds", "1,1"], "--seeds must be distinct"),
                          (["--seeds", "x"], "bad --seeds"),
                          (["train.seed=3"], "use --seeds"),
                          (["--compare", "--seeds", "1,2"], "--compare runs every adapter at one seed"),
                          (["--compare", "--adapter", "dora"], "--compare runs every adapter at one seed"),
                          (["train.batch_size=0"], "train.batch_size must be at least 1"),
                          (["--student-steps", "0"], "model.student_steps must be at least 1"),
                          (["--world", "digits-3d"], "unknown world 'digits-3d'")]:
        assert main(["demo", "--root", str(tmp_path / "runs"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert torch.get_num_threads() == threads  # a refused demo changes nothing
    assert not (tmp_path / "runs").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "report.md").write_text("another run's report")
    assert main(["demo", "--out", str(tmp_path / "taken"), "--steps", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "taken" / "report.md").read_text() == "another run's report"
    with pytest.raises(SystemExit):
        main(["demo", "--adapter", "bogus"])


MISSING_SKLEARN = ('error: the digits world needs scikit-learn, not installed here: '
                   'pip install "wadi-distill[digits]" (from a clone of wadi: pip install -e ".[digits]")')


@pytest.mark.parametrize("args", [["eval", "--world", "digits", "--teacher", "--out", "{tmp}/eval"],
                                  ["digits-classifier", "--out", "{tmp}/c.safetensors"],
                                  ["digits-teacher", "--out", "{tmp}/teacher"],
                                  ["demo", "--root", "{tmp}/runs"],
                                  ["distill", "--config", "digits-wadi", "run.root={tmp}/runs"]])
def test_every_way_into_the_world_says_what_to_install_without_its_extra(args, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)  # as if scikit-learn were not installed
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    assert capsys.readouterr().err.strip() == f"wadi {args[0]}: {MISSING_SKLEARN}"
    assert list(tmp_path.iterdir()) == []


def test_the_worlds_tools_come_from_its_plugin(monkeypatch):
    import wadi.cli
    import wadi.worlds

    assert {"demo", "digits-teacher", "digits-classifier"} <= set(wadi.cli.build_parser()._subparsers
                                                                   ._group_actions[0].choices)
    monkeypatch.setattr(wadi.worlds, "worlds", lambda: {})
    with pytest.raises(SystemExit):  # argparse: no such command without the world
        main(["digits-teacher", "--out", "x"])


def test_floor_reads_a_size_biased_metric_at_the_evaluations_size():
    """A metric that is exactly a + b / k on every balanced subset is read back at n."""
    from wadi.digits.floor import at_size, balanced_subset

    labels = np.repeat(np.arange(10), 36)
    features = np.zeros((360, 2))
    floor = at_size(lambda f: 2.0 + 700.0 / len(f), features, labels, 500)
    assert floor["measured"] == pytest.approx(2.0 + 700 / 360) and floor["at_n"] == pytest.approx(2.0 + 700 / 500)
    assert floor["slope"] == pytest.approx(700) and floor["spread"] == pytest.approx(0, abs=1e-12)
    idx = balanced_subset(labels, 0.5, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [18] * 10 and len(set(idx)) == 180


def test_quality_curve_does_not_change_the_run(tmp_path):
    """Scoring the student while it trains leaves the run's weights bit for bit as without."""
    from safetensors.torch import load_file

    from wadi.digits.curve import QualityCurve
    from wadi.digits.metrics import features
    from wadi.engine.training import distill

    cfg = lambda root: resolve("digits-wadi", [f"run.root={root}", "train.steps=3", "train.batch_size=4",  # noqa: E731
                                               "run.sample_every=0", "run.checkpoint_every=0"])
    prompts = world.eval_prompts(1)[0]
    reference = features(to_uint8(world.load("train")[0][:40]))
    curve = QualityCurve(2, prompts, list(range(10)), features, reference, 5, 10)
    with_curve = distill(cfg(tmp_path / "a"), progress=False, after_step=curve)
    without = distill(cfg(tmp_path / "b"), progress=False)
    assert [p["step"] for p in curve.points] == [2, 3]  # every 2 steps, and the last
    a, b = load_file(RunFolder(with_curve).student_adapter), load_file(RunFolder(without).student_adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

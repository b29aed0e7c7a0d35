"""The weight-space analysis (docs/method.md) on weights with known answers, and `wadi analyze`."""

import csv
import json
import math

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from wadi.adapters.lorad import rotate_pairs
from wadi.cli import main
from wadi.evaluation.analysis import (HYBRIDS, analyze, analyze_layer, as_rows, cumulative_energy, make_hybrid,
                                      rank_for_energy, row_changes, squared_singular_values, unit_rows)
from wadi.evaluation.analysis_report import format_summary
from wadi.files.weights import load_weights


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rotated(w: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Every column pair of row i turned by angles[i]: the row turns by exactly that angle."""
    return rotate_pairs(w, angles[:, None].expand(-1, w.shape[1] // 2))


def reflected_rows(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit rows t_i reflected across the hyperplane normal to v_i: still unit, and
    s_i - t_i = -2 (t_i . v_i) / ||v_i||^2 v_i lies along v_i."""
    coef = 2 * (t * v).sum(1, keepdim=True) / (v * v).sum(1, keepdim=True)
    return t - coef * v


# --- per-row measures -------------------------------------------------------------

def test_pure_rotation_changes_direction_only():
    w = torch.randn(12, 16, generator=gen(), dtype=torch.float64)
    angles = torch.linspace(0.01, 1.2, 12, dtype=torch.float64)
    norm_change, dir_change = row_changes(w, rotated(w, angles))
    torch.testing.assert_close(norm_change, torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(dir_change, 1 - torch.cos(angles), atol=1e-12, rtol=0)

    layer = analyze_layer("l", w, rotated(w, angles))
    expected = 1 - torch.cos(angles)
    assert layer.norm_mean < 1e-12 and layer.rows == 12
    assert layer.dir_mean == pytest.approx(expected.mean().item(), abs=1e-12)
    assert layer.dir_std == pytest.approx(expected.std(correction=0).item(), abs=1e-12)


def test_pure_rescale_changes_norm_only_also_for_convs():
    w = torch.randn(6, 3, 3, 3, generator=gen(1), dtype=torch.float64)  # conv: rows of 3*3*3
    scale = torch.tensor([0.5, 0.9, 1.0, 1.1, 2.0, 3.0], dtype=torch.float64)
    layer = analyze_layer("conv", w, w * scale[:, None, None, None])
    expected = (scale - 1).abs()
    assert layer.dir_mean < 1e-12 and layer.dir_std < 1e-12
    assert layer.norm_mean == pytest.approx(expected.mean().item(), abs=1e-12)
    assert layer.norm_std == pytest.approx(expected.std(correction=0).item(), abs=1e-12)
    assert layer.full_rank == 6 and layer.rank_needed == 0  # same directions: no residual


def test_zero_rows_are_safe():
    t = torch.randn(4, 6, generator=gen(2), dtype=torch.float64)
    s = t.clone()
    t[0] = 0  # no teacher direction: left out of the statistics
    s[1] = 0  # vanished student row: orthogonal, norm change 1
    layer = analyze_layer("l", t, s)
    assert (layer.rows, layer.zero_rows) == (3, 1)
    assert layer.norm_mean == pytest.approx(1 / 3) and layer.dir_mean == pytest.approx(1 / 3)
    assert all(math.isfinite(x) for x in (layer.norm_std, layer.dir_std))
    all_zero = analyze_layer("z", torch.zeros(3, 4), torch.zeros(3, 4))
    assert all_zero.rows == 0 and all_zero.rank_needed == 0 and all_zero.to_dict()["norm_change_mean"] is None


# --- the direction residual -------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5])
def test_rank_k_residual_needs_exactly_rank_k(k):
    out, inp = 24, 40
    basis = torch.randn(k, inp, generator=gen(3), dtype=torch.float64)
    t_dirs = unit_rows(torch.randn(out, inp, generator=gen(4), dtype=torch.float64))
    s_dirs = reflected_rows(t_dirs, torch.randn(out, k, generator=gen(5), dtype=torch.float64) @ basis)
    # Arbitrary row norms: the residual is between row-normalised matrices.
    teacher = t_dirs * torch.rand(out, 1, generator=gen(6), dtype=torch.float64).add(0.5)
    student = s_dirs * torch.rand(out, 1, generator=gen(7), dtype=torch.float64).add(0.5)
    assert torch.linalg.matrix_rank(unit_rows(student) - unit_rows(teacher)) == k

    layer = analyze_layer("l", teacher, student, threshold=1.0)
    assert layer.rank_needed == k and layer.rank_fraction == k / 24
    assert layer.energy[k - 1] == pytest.approx(1.0, abs=1e-9)
    if k > 1:
        assert layer.energy[k - 2] < 1 - 1e-3


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_squared_singular_values_match_svd(shape):
    m = torch.randn(*shape, generator=gen(9), dtype=torch.float64)
    torch.testing.assert_close(squared_singular_values(m), torch.linalg.svdvals(m) ** 2)


def test_rank_for_energy_threshold():
    energy = torch.tensor([0.5, 0.9, 0.93, 0.99, 1.0], dtype=torch.float64)
    assert rank_for_energy(energy, 0.93) == 3
    assert rank_for_energy(energy, 0.5) == 1 and rank_for_energy(energy, 0.95) == 4
    assert rank_for_energy(torch.zeros(5, dtype=torch.float64), 0.93) == 0
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))  # energies 9, 4, 1, 0 of 14
    torch.testing.assert_close(cumulative_energy(d), torch.tensor([9, 13, 14, 14], dtype=torch.float64) / 14)


# --- aggregation over layers ------------------------------------------------------

def test_summary_layer_averaged_and_pooled():
    # Layer a: 2 rows, norm changes (0.1, 0.3), no direction change.
    # Layer b: 1 row rotated by 90 degrees (direction change 1), no norm change.
    wa = torch.eye(2, 4, dtype=torch.float64)
    wb = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    student = {"a.weight": wa * torch.tensor([[1.1], [0.7]], dtype=torch.float64),
               "b.weight": torch.tensor([[0.0, 1.0]], dtype=torch.float64),
               "b.bias": torch.zeros(1)}
    result = analyze({"a.weight": wa, "b.weight": wb, "b.bias": torch.ones(1)}, student)
    assert [l.name for l in result.layers] == ["a.weight", "b.weight"]  # 1-D tensors skipped
    s = result.summary()
    avg, pooled = s["layer_averaged"], s["pooled"]
    assert avg["norm_change_mean"] == pytest.approx(0.1) and avg["direction_change_mean"] == pytest.approx(0.5)
    assert avg["mean_ratio"] == pytest.approx(5.0)
    # Per-layer norm stds 0.1 and 0; direction stds 0 and 0 (one value each).
    assert avg["norm_change_std"] == pytest.approx(0.05) and avg["std_ratio"] == 0
    assert pooled["norm_change_mean"] == pytest.approx(0.4 / 3)
    assert pooled["direction_change_mean"] == pytest.approx(1 / 3)
    rows_norm = torch.tensor([0.1, 0.3, 0.0])
    assert pooled["norm_change_std"] == pytest.approx(rows_norm.std(correction=0).item(), abs=1e-7)
    # Layer a keeps its directions (no residual); b's residual has rank 1 of 1.
    assert s["changed_layers"] == 1 and s["rank_fraction_median"] == 1.0


def test_summary_text_of_a_pure_rotation_and_of_no_change():
    # Integer entries and a quarter turn of every pair, (a, b) -> (-b, a): the norms are
    # kept bit for bit, so the norm change is exactly 0.
    w = torch.randint(1, 6, (8, 6), generator=gen(10)).to(torch.float64)
    quarter_turn = torch.empty_like(w)
    quarter_turn[:, 0::2], quarter_turn[:, 1::2] = -w[:, 1::2], w[:, 0::2]
    s = analyze({"w.weight": w}, {"w.weight": quarter_turn}).summary()
    assert s["layer_averaged"]["mean_ratio"] is None  # infinite: JSON has no infinity
    text = format_summary(s)
    assert "layer-averaged: mean inf" in text and "over 1 changed layers" in text

    same = analyze({"w.weight": w}, {"w.weight": w.clone()})
    assert same.layers[0].dir_mean == 0 and same.layers[0].rank_needed == 0  # exactly, no rounding
    assert "no layer changed direction" in format_summary(same.summary())


def test_mismatched_architectures_name_the_parameter():
    a = {"x.weight": torch.ones(2, 2), "y.weight": torch.ones(3, 2)}
    with pytest.raises(ValueError, match=r"'y.weight' has shape \(2, 3\), expected \(3, 2\)"):
        analyze(a, {"x.weight": torch.ones(2, 2), "y.weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="1 missing, 0 unexpected keys; first missing 'y.weight'"):
        analyze(a, {"x.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="0 missing, 1 unexpected keys; first unexpected 'z.weight'"):
        analyze(a, {**a, "z.weight": torch.ones(1, 1)})


# --- swap hybrids -----------------------------------------------------------------

def test_hybrids_swap_norms_and_directions_row_by_row():
    model = tiny_unet(1)
    teacher, student = tiny_unet(0).state_dict(), model.state_dict()
    hybrids = {name: make_hybrid(teacher, student, *sources) for name, sources in HYBRIDS.items()}
    models = {"teacher": teacher, "student": student}
    for name, (norms_from, dirs_from) in HYBRIDS.items():
        hybrid = hybrids[name]
        for key, w in hybrid.items():
            assert w.dtype == student[key].dtype and w.shape == student[key].shape
            if key.endswith("weight") and w.ndim >= 2:
                rows = as_rows(w)
                torch.testing.assert_close(rows.norm(dim=1), as_rows(models[norms_from][key]).norm(dim=1),
                                           rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(unit_rows(rows), unit_rows(as_rows(models[dirs_from][key])),
                                           rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(w, student[key])  # biases, norms: the student's
    model.load_state_dict(hybrids["teacher_dir_student_norm"])  # strict: a plain model again


def test_hybrid_sources_are_checked():
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        make_hybrid({}, {}, "fake", "student")


# --- loading and the command line -------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny UNet and a copy whose linear rows turn a little and whose conv rows grow a
    little, saved once as teacher/ (a model folder) and pipe/unet/ (a pipeline folder)."""
    root = tmp_path_factory.mktemp("pair")
    teacher = tiny_unet(0)
    student = tiny_unet(0)
    g = gen(8)
    with torch.no_grad():
        for _, p in student.named_parameters():
            if p.ndim == 2 and p.shape[1] % 2 == 0:
                p.copy_(rotated(p, 0.05 * torch.rand(p.shape[0], generator=g)))
            elif p.ndim == 4:
                p.mul_(1 + 0.01 * torch.rand(p.shape[0], 1, 1, 1, generator=g))
    teacher.save_pretrained(root / "teacher")
    student.save_pretrained(root / "pipe" / "unet")
    return root, teacher.state_dict(), student.state_dict()


def test_cli_round_trip(pair, tmp_path, capsys):
    root, teacher, student = pair
    out = tmp_path / "out"
    assert main(["analyze", str(root / "teacher"), str(root / "pipe"), "--out", str(out), "--hybrids"]) == 0
    stdout = capsys.readouterr().out
    assert "layer-averaged: mean" in stdout and "median rank fraction" in stdout

    report = json.loads((out / "analysis.json").read_text())
    expected = analyze(teacher, student).summary()
    assert report["summary"]["layer_averaged"] == pytest.approx(expected["layer_averaged"])
    assert report["summary"]["energy_threshold"] == 0.93
    with open(out / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [l["name"] for l in report["layers"]]
    assert rows[0]["shape"] == "32x4x3x3"  # conv_in
    for png in ("changes.png", "energy.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    hybrid = UNet2DConditionModel.from_pretrained(out / "hybrids" / "student_dir_teacher_norm")
    expected = make_hybrid(teacher, student, "teacher", "student")
    for key, w in hybrid.state_dict().items():
        torch.testing.assert_close(w, expected[key])
    assert (out / "hybrids" / "teacher_dir_student_norm" / "config.json").is_file()


def test_cli_safetensors_state_dicts(pair, tmp_path, capsys):
    root, _, student = pair
    # Like the authors' released students: a plain state dict, here in half precision.
    save_file({k: v.half() for k, v in student.items()}, tmp_path / "rotated_unet.safetensors")
    out = tmp_path / "out"
    args = ["analyze", str(root / "teacher"), str(tmp_path / "rotated_unet.safetensors"), "--out", str(out)]
    assert main(args + ["--hybrids", "--energy", "0.5"]) == 0
    stdout = capsys.readouterr().out
    assert "50% of the direction-residual energy" in stdout
    assert "teacher weights are float32, student weights float16" in stdout
    # The student came as a plain state dict: so do its hybrids, in its precision.
    hybrid = load_weights(out / "hybrids" / "teacher_dir_student_norm.safetensors").state_dict
    assert hybrid.keys() == student.keys() and hybrid["conv_in.weight"].dtype == torch.float16


def test_cli_refuses_existing_out_unless_forced(pair, tmp_path, capsys):
    root = pair[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["analyze", str(root / "teacher"), str(root / "pipe"), "--out", str(out)]
    assert main(args) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0 and (out / "analysis.json").is_file() and (out / "keep.txt").is_file()


def test_cli_errors_are_one_line(pair, tmp_path, capsys):
    teacher = str(pair[0] / "teacher")
    tiny_unet(0, cross_attention_dim=16).save_pretrained(tmp_path / "other")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "model.bin").write_bytes(b"pickle")
    cases = [
        (tmp_path / "missing", "no such file or folder"),
        (tmp_path / "other", "'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' has shape"),
        (tmp_path / "junk.safetensors", "is not a readable safetensors file"),
        (tmp_path / "model.bin", "is not a plain state dict that loads without running code"),
        (tmp_path, "neither a diffusers model folder"),
    ]
    for student, message in cases:
        assert main(["analyze", teacher, str(student), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["analyze", teacher, teacher, "--out", str(tmp_path / "o"), "--energy", "1.5"]) == 2
    assert "energy threshold must be in (0, 1]" in capsys.readouterr().err

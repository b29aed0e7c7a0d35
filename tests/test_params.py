"""`wadi params` reproduces the paper's trainable-parameter counts (docs/method.md)."""

import json

import pytest

from wadi.cli import main


@pytest.mark.parametrize("model, rank, millions", [
    ("sd15", 64, 20.95), ("sd15", 128, 41.90), ("sd15", 256, 83.80), ("sd15", 512, 167.59),
    ("sd21", 256, 94.43), ("pixart", 128, 81.22),
])
def test_student_counts_match_paper(model, rank, millions, capsys):
    assert main(["params", "--model", model, "--role", "student", "--rank", str(rank), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["trainable"] / 1e6, 2) == millions
    assert out["layers"] > 0 and out["total"] > out["trainable"]


def test_paper_fractions(capsys):
    main(["params", "--model", "sd15", "--rank", "256", "--json"])
    sd15 = json.loads(capsys.readouterr().out)
    assert round(sd15["total"] / 1e6) == 860 and round(100 * sd15["fraction"], 1) == 9.7
    main(["params", "--model", "pixart", "--rank", "128", "--json"])
    pixart = json.loads(capsys.readouterr().out)
    assert round(pixart["total"] / 1e6, 2) == 610.86 and round(100 * pixart["fraction"], 1) == 13.3


def test_fake_model_excludes_projections(capsys):
    main(["params", "--model", "sd15", "--role", "student", "--rank", "32", "--json"])
    student = json.loads(capsys.readouterr().out)
    main(["params", "--model", "sd15", "--role", "fake", "--rank", "32", "--json"])
    fake = json.loads(capsys.readouterr().out)
    assert fake["layers"] < student["layers"] and fake["trainable"] < student["trainable"]


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["params", "--model", "sd3", "--rank", "8"])
    assert e.value.code == 2
    assert "invalid choice: 'sd3'" in capsys.readouterr().err


def test_bad_rank_is_a_clear_error(capsys):
    assert main(["params", "--model", "sd15", "--rank", "0"]) == 2
    assert "rank must be a positive integer" in capsys.readouterr().err

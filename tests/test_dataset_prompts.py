"""data.prompts as a Hugging Face dataset: a folder saved with save_to_disk, a parquet,
JSON or CSV file, split and column; a prompt file stays the default. Everything is made
here; with the hub switched off nothing can reach the network."""

import pytest

from wadi.files.prompts import read_prompts

datasets = pytest.importorskip("datasets")

ROWS = {"caption": ["a cat", "  a red car ", "a cat", ""], "prompt_en": ["one", "two", "three", "four"],
        "score": [1, 2, 3, 4]}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No network, and datasets' cache in the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


def test_a_saved_dataset_folder_its_split_and_column(tmp_path):
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                              "validation": datasets.Dataset.from_dict({"caption": ["a dog"]})})
    d.save_to_disk(str(tmp_path / "saved"))
    assert read_prompts(tmp_path / "saved") == ["a cat", "a red car", "a cat"]  # caption found, blank left out
    assert read_prompts(tmp_path / "saved", dedupe=True) == ["a cat", "a red car"]
    assert read_prompts(str(tmp_path / "saved"), split="validation") == ["a dog"]
    assert read_prompts(tmp_path / "saved", column="prompt_en") == ROWS["prompt_en"]
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "one"))  # a single split, saved alone
    assert read_prompts(tmp_path / "one", column="prompt_en") == ROWS["prompt_en"]


def test_data_files_in_datasets_formats(tmp_path):
    ds = datasets.Dataset.from_dict(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.to_csv(str(tmp_path / "p.csv"))
    ds.to_json(str(tmp_path / "p.json"))
    expected = ["a cat", "a red car", "a cat"]
    assert read_prompts(tmp_path / "p.parquet") == expected
    assert read_prompts(tmp_path / "p.csv", column="prompt_en") == ROWS["prompt_en"]
    assert read_prompts(tmp_path / "p.json", "dataset") == expected  # .json is COCO's unless asked for
    (tmp_path / "p.txt").write_text("a plain\nfile\n")
    assert read_prompts(tmp_path / "p.txt") == ["a plain", "file"]  # a text file stays a prompt file


@pytest.mark.parametrize("source, options, message", [
    ("saved", {"split": "test"}, "no split 'test' (data.split); its splits: train"),
    ("saved", {"column": "nope"}, "has no column 'nope' (data.column); its columns: caption, prompt_en, score"),
    ("saved", {"column": "score"}, "row 0 of column 'score' is int, not text"),
    ("numbers", {}, "has no prompt, caption, text column; its columns: score: choose one with data.column"),
    ("p.parquet", {"split": "validation"}, "one data file is one split"),
    ("someone/no-such-prompts", {}, "cannot read the dataset someone/no-such-prompts")])
def test_what_does_not_fit_is_one_line(tmp_path, source, options, message):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict({"score": [1]}).save_to_disk(str(tmp_path / "numbers"))
    datasets.Dataset.from_dict(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    where = source if "/" in source else str(tmp_path / source)
    with pytest.raises(ValueError, match="^[^\n]*$") as e:
        read_prompts(where, **options)
    assert message in str(e.value)


def test_a_run_reads_its_prompts_from_a_dataset(tmp_path):
    """The settings reach the reader: a tiny run on a saved dataset's column."""
    import tiny_pipes
    from wadi.engine.config import resolve
    from wadi.engine.training import prepare

    datasets.DatasetDict({"val": datasets.Dataset.from_dict(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    base = tiny_pipes.save_tiny_sd(tmp_path / "sd")
    cfg = resolve("sd15-wadi", [f"model.path={base}", f"data.prompts={tmp_path / 'saved'}", "data.split=val",
                                "data.column=prompt_en", "train.mixed_precision=no", "model.resolution=16",
                                "student.rank=4", "fake.rank=2"])
    prompts, _ = prepare(cfg)
    assert prompts == sorted(ROWS["prompt_en"])  # the preset dedupes (sorted unique)

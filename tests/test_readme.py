"""The README as a user meets it: the install lines name extras that exist, and its Python
runs as written on a CPU.

Every ```python block of README.md runs on its own (a reader copies one), in its own
namespace, one after the other in a fresh folder.
A line `NAME = ...  # yours: ...` assigns what a reader changes (a model, a prompt file,
more settings); the test assigns YOURS[NAME] instead: a tiny model built in code, its
prompts, and settings that make the run two steps of a tiny student.
"""

import re
from pathlib import Path

import tiny_pipes
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
YOURS_LINE = re.compile(r"^(\w+) = .*# yours\b.*$", re.M)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_the_documented_install_extras_exist():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    texts = [README.read_text(), (ROOT / "Makefile").read_text(), *(p.read_text() for p in (ROOT / "docs").glob("*.md")),
             *(p.read_text() for p in (ROOT / "src").rglob("*.py"))]
    named = [m for t in texts for m in re.findall(r'(?:wadi-distill|-e \\?"?\.)\[([a-z0-9,]+)\]', t)]
    assert named, "no install line found"
    for group in named:
        assert set(group.split(",")) <= extras, group
    assert project["name"] == "wadi-distill" and 'pip install -e ".[digits,fid]"' in README.read_text()
    assert "pip install wadi-distill " not in README.read_text()  # not published yet: not the first line


def test_the_readme_python_runs_as_written_on_tiny_models(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("a cat\na red car\n")
    yours = {"MODEL": str(tiny_pipes.save_tiny_sd(tmp_path / "sd")), "PROMPTS": str(tmp_path / "prompts.txt"),
             "SETTINGS": ["model.resolution=16", "train.steps=2", "train.batch_size=2", "student.rank=4",
                          "fake.rank=2", "train.adam_8bit=false", "run.checkpoint_every=0", "run.sample_every=0"]}
    found = set()

    def assign(m):
        found.add(m[1])
        return f"{m[1]} = {yours[m[1]]!r}"

    blocks = [YOURS_LINE.sub(assign, b) for b in python_blocks(README.read_text())]
    assert len(blocks) == 2 and found == set(yours)
    monkeypatch.chdir(tmp_path)
    namespaces = [{} for _ in blocks]
    for i, (block, namespace) in enumerate(zip(blocks, namespaces)):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert tuple(namespaces[0]["images"].shape) == (1, 3, 16, 16)
    assert (tmp_path / "sd15-wadi-pipeline" / "model_index.json").is_file()
    assert (tmp_path / "student-unet" / "config.json").is_file() and namespaces[1]["again"].backbone == "sd"


def test_wadi_distill_is_the_function_whatever_is_loaded():
    """The engine's step lives in wadi.engine.distiller: no module shadows the function."""
    import importlib

    import wadi
    import wadi.engine.training

    importlib.import_module("wadi.engine.distiller")
    function = getattr(wadi, "distill")
    assert function is wadi.engine.training.distill and callable(function)

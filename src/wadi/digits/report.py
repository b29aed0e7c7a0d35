"""The demo's report: a side-by-side sample grid, the loss curve, Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..images import grid
from . import world

GRID_COLUMNS = len(world.TEMPLATES)  # one column per phrasing
SCALE = 5  # 8x8 digits become 40x40 pixels
TITLE_HEIGHT = 18


def class_by_phrasing(images: torch.Tensor, columns: int = GRID_COLUMNS) -> torch.Tensor:
    """Evaluation images (ordered round by round, one digit of each class per round) as
    a row per class and a column per round; round i uses phrasing i (world.eval_prompts)."""
    classes = len(world.CLASS_WORDS)
    columns = min(columns, len(images) // classes)
    return torch.stack([images[i * classes + c] for c in range(classes) for i in range(columns)])


def side_by_side(panels: dict[str, torch.Tensor], columns: int = GRID_COLUMNS, scale: int = SCALE) -> Image.Image:
    """One titled grid per model, left to right, for the same prompts and seeds."""
    tiles = {name: grid(class_by_phrasing(images, columns), nrow=min(columns, len(images) // 10), scale=scale)
             for name, images in panels.items()}
    gap = 2 * scale
    width = sum(t.width for t in tiles.values()) + gap * (len(tiles) - 1)
    height = TITLE_HEIGHT + max(t.height for t in tiles.values())
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, tile in tiles.items():
        draw.text((x + 2, 3), name, fill=0)
        canvas.paste(tile.convert("L"), (x, TITLE_HEIGHT))
        x += tile.width + gap
    return canvas


def loss_plot(log_file: Path, out: Path) -> Path:
    """Student (VSD) and fake-model losses against the step, from the run's log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in zip(axes, ("loss_student", "loss_fake"), ("student (VSD) loss", "fake score model loss")):
        ax.plot(steps, [r[key] for r in records], marker="." if len(records) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(rows: list[dict]) -> str:
    fid = any("inception_fid" in r for r in rows)
    header = ["model", "NFE", "alignment", "Frechet (classifier)", "precision", "recall", "images/s"]
    header += ["Inception FID"] if fid else []
    body = [[r["name"], r["nfe"], r["alignment"], r["frechet"], r["precision"], r["recall"], r["images_per_s"]]
            + ([r.get("inception_fid")] if fid else []) for r in rows]
    return markdown_table(header, body)


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def demo_markdown(s: dict) -> str:
    d, n, sec, c = s["distill"], s["trainable"], s["seconds"], s["criteria"]
    rows = {r["name"]: r for r in s["rows"]}
    teacher, student = rows[s["rows"][0]["name"]], rows["student, 1 step"]
    multi = f"{s['teacher_sampling']['steps']}-step"
    adapter = d["adapter"] + (f" r={d['student_rank']}" if d["student_rank"] else "")
    lines = [
        "# WaDi on handwritten digits",
        "",
        f"A one-step student distilled from the {_millions(n['teacher'])}-parameter digits teacher by `wadi.distill` "
        f"(preset `digits-wadi`, run folder `{s['run_dir']}`): VSD with guidance {d['guidance']} on teacher and "
        f"fake score model, {d['steps']} steps of batch {d['batch_size']}, learning rates {d['lr_student']:g} "
        f"(student) and {d['lr_fake']:g} (fake).",
        "",
        f"- student adapter: {adapter}, **{_millions(n['student'])} trainable parameters** "
        f"({100 * n['student'] / n['teacher']:.1f}% of the teacher); fake model: {d['fake_adapter']} "
        f"r={d['fake_rank']}, {_millions(n['fake'])} trainable",
        f"- wall time: distillation {sec['distill']:.0f} s, evaluation {sec['evaluate']:.0f} s, "
        f"total {sec['total']:.0f} s",
        f"- evaluation: {teacher['n']} images per model, {teacher['n'] // 10} per digit, the same prompts and seeds "
        f"for every model; the teacher samples with DDIM and guidance {s['teacher_sampling']['guidance']}",
        "",
        metrics_table(s["rows"]),
        "",
        "Alignment: the share of images the shipped digits classifier assigns to the prompted digit. "
        "Frechet: distance between Gaussians fitted to the classifier's penultimate features of the images and of "
        "the real train-split digits (lower is better). Precision / recall: improved precision and recall in the "
        "same features. The last row scores real held-out digits the same way: the floor.",
        "",
        "## Against the bar",
        "",
        f"- student alignment / teacher ({multi}) alignment = {c['alignment_ratio']:.3f} "
        f"(at least 0.9: {_verdict(c['alignment_ok'])})",
        f"- student Frechet / teacher Frechet = {c['frechet_ratio']:.3f} (at most 1.5: {_verdict(c['frechet_ok'])})",
        f"- teacher at 1 step (its sampler and guidance, one step) far worse than both (below half their alignment "
        f"or at least 2x their Frechet): {_verdict(c['teacher_1_step_far_worse'])} (alignment "
        f"{rows['teacher, 1 step']['alignment']:.3f}, Frechet {rows['teacher, 1 step']['frechet']:.1f}; without "
        f"guidance, the student's starting point: {rows['teacher, 1 step, no guidance']['alignment']:.3f} and "
        f"{rows['teacher, 1 step, no guidance']['frechet']:.1f})",
        f"- the student makes {student['images_per_s'] / teacher['images_per_s']:.0f}x as many images per second "
        f"as the {multi} teacher",
        "",
        "## Samples",
        "",
        "A row per digit, a column per phrasing of the prompt (\"a handwritten seven\", \"the digit 7\", ...), "
        "the same noise seed in the same cell of every panel.",
        "",
        "![samples](grid.png)",
        "",
        "## Training",
        "",
        "![losses](loss.png)",
        "",
    ]
    return "\n".join(lines)


def compare_markdown(s: dict) -> str:
    header = ["adapter", "rank", "lr", "trainable", "alignment", "Frechet", "precision", "recall",
              "distill time (s)"]
    body = [[r["adapter"], r["rank"], f"{r['lr']:g}", _millions(r["trainable"]), r["alignment"], r["frechet"],
             r["precision"], r["recall"], f"{r['distill_seconds']:.0f}"] for r in s["adapters"]]
    st = s["settings"]
    lines = [
        "# Adapter ablation on handwritten digits",
        "",
        f"The same distillation (preset `digits-wadi`{', ' + str(st['steps']) + ' steps' if st['steps'] else ''}) "
        f"with each adapter on the student; the teacher has {_millions(s['teacher_params'])} parameters. "
        f"{s['teachers'][0]['n']} one-step images per student, the same prompts and seeds. Each adapter trains "
        f"at its own learning rate (`lr`, in its own units: angles, low-rank factors, weights); everything else "
        f"is shared.",
        "",
        markdown_table(header, body),
        "",
        "For reference, the teacher on the same prompts:",
        "",
        metrics_table(s["teachers"]),
        "",
        f"Total wall time: {s['seconds']:.0f} s.",
        "",
        "![samples](grid.png)",
        "",
    ]
    return "\n".join(lines)

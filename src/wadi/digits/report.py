"""The demo's report: side-by-side sample grids, the loss curves, Markdown tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wadi.files.images import grid
from wadi.evaluation.metrics.registry import LABELS
from wadi.engine.tracking import read_log
from wadi.digits import world

GRID_COLUMNS = len(world.TEMPLATES)  # one column per phrasing
SCALE = 5  # 8x8 digits become 40x40 pixels
TITLE_HEIGHT = 18
SAMPLERS = {"ddim": "DDIM", "dpm": "DPM-Solver", "euler": "flow-matching Euler"}  # the processes' stock samplers


def _steps_word(d: dict) -> str:
    steps = d.get("student_steps") or 1
    return "One-step" if steps == 1 else f"{steps}-step"


def class_by_phrasing(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """Evaluation images (ordered round by round, one digit of each class per round) as
    a row per class and a column per round; round i uses phrasing i (world.eval_prompts)."""
    classes = len(world.CLASS_WORDS)
    columns = min(columns, len(images) // classes)
    return np.stack([images[i * classes + c] for c in range(classes) for i in range(columns)])


def side_by_side(panels: dict[str, np.ndarray], columns: int = GRID_COLUMNS, scale: int = SCALE) -> Image.Image:
    """One titled grid per model, left to right, for the same prompts and seeds ((N, H, W, C) uint8 each)."""
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


def loss_plot(logs: dict[str, Path], out: Path) -> Path:
    """Student (VSD) and fake-model losses against the step, one line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for label, path in logs.items():
        records = read_log(path)
        steps = [r["step"] for r in records]
        for ax, key in zip(axes, ("loss_student", "loss_fake")):
            ax.plot(steps, [r[key] for r in records], label=label, linewidth=1)
    for ax, title in zip(axes, ("student (VSD) loss", "fake score model loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(logs) > 1:
        axes[1].legend(fontsize="small")
    fig.savefig(out, dpi=100)
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


# The world's metric keys in table order, and their titles where they differ from the registry's.
KEYS = ("alignment", "fid", "kid", "precision", "recall")
TITLES = {"fid": "Frechet (classifier)", "kid": "KID (classifier)"}


def _keys(rows: list[dict]) -> list[str]:
    return [k for k in KEYS if any(k in r for r in rows)]


def _title(key: str) -> str:
    return TITLES.get(key, LABELS[key])


def metrics_table(rows: list[dict]) -> str:
    keys = _keys(rows)
    header = ["model", "NFE", *map(_title, keys), "images/s"]
    return markdown_table(header, [[r["name"], r["nfe"], *(r.get(k) for k in keys), r["images_per_s"]] for r in rows])


def quality_plot(s: dict, out: Path) -> Path:
    """Frechet distance and KID of each student against the training step, with the bar
    (the median's, times the 25-step teacher's Frechet distance) and the real-digits floor."""
    from matplotlib.figure import Figure

    teacher, floor = s["rows"][0], s["rows"][-1]
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for seed, points in s["curves"].items():
        steps = [p["step"] for p in points]
        for ax, key in zip(axes, ("fid", "kid")):
            ax.plot(steps, [p[key] for p in points], marker=".", label=f"seed {seed}", linewidth=1)
    axes[0].axhline(s["bar"]["median"] * teacher["fid"], color="k", linestyle="--", linewidth=0.8,
                    label=f"bar: {s['bar']['median']:g}x the teacher")
    for ax, key in zip(axes, ("fid", "kid")):
        ax.axhline(teacher[key], color="tab:gray", linewidth=0.8, label="teacher, 25 steps")
        ax.axhline(floor[key], color="tab:green", linestyle=":", linewidth=0.8, label="real digits (floor)")
        ax.set_title(f"student {_title(key)}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize="small")
    fig.savefig(out, dpi=100)
    return out


def time_to_quality(s: dict) -> list[str]:
    """The report's lines on when each seed first reached the bar."""
    from wadi.digits.curve import first_at_or_below

    if not s.get("curves"):
        return []
    bar = s["bar"]["median"] * s["rows"][0]["fid"]
    table = markdown_table(["seed", f"first step at or under {bar:.2f}", "Frechet then", "Frechet at the end"],
                           [[seed, first_at_or_below(p, "fid", bar) or "not reached",
                             next((q["fid"] for q in p if q["fid"] <= bar), None), p[-1]["fid"]]
                            for seed, p in s["curves"].items()])
    return ["## Time to quality", "",
            f"Each student scored on the evaluation's prompts and seeds every {s['eval_every']} steps while it "
            f"trained (its final weights at that step), against the bar {s['bar']['median']:g}x the 25-step "
            f"teacher's Frechet distance ({bar:.2f}):", "", table, "", "![quality](quality.png)", ""]


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def demo_markdown(s: dict) -> str:
    d, n, sec, c, bar = s["distill"], s["trainable"], s["seconds"], s["criteria"], s["bar"]
    rows = s["rows"]
    teacher, unguided, measured, real = rows[0], rows[2], rows[-2], rows[-1]
    students = [r for r in rows if "seed" in r]
    floor = real["floor"]
    adapter = d["adapter"] + (f" r={d['student_rank']}" if d["student_rank"] else "")
    seeds = ", ".join(str(r["seed"]) for r in students)
    lines = [
        f"# WaDi on handwritten digits (world `{s['world']}`)",
        "",
        f"{_steps_word(d)} students distilled from the {_millions(n['teacher'])}-parameter {s['world']} teacher by the WaDi "
        f"engine (preset `{s['preset']}`), one per seed ({seeds}): VSD with guidance {d['guidance']} on teacher and "
        f"fake score model, t in [{d['t_min']}, {d['t_max']}], {d['steps']} steps of batch {d['batch_size']}, "
        f"learning rates {d['lr_student']:g} (student) and {d['lr_fake']:g} (fake).",
        "",
        f"- student adapter: {adapter}, **{_millions(n['student'])} trainable parameters** "
        f"({100 * n['student'] / n['teacher']:.1f}% of the teacher); fake model: LoRaD r={d['fake_rank']}, "
        f"{_millions(n['fake'])} trainable",
        f"- wall time: distillation {' + '.join(f'{x:.0f}' for x in sec['distill'])} s, scoring while training "
        f"{sec.get('quality_curve', 0):.0f} s, evaluation {sec['evaluate']:.0f} s, total {sec['total']:.0f} s",
        f"- evaluation (`eval/`, as `wadi eval --world {s['world']}` writes it): {teacher['n']} images per model, "
        f"{teacher['n'] // 10} per digit, the same prompts and seeds for every model; the teacher samples with "
        f"{SAMPLERS[s['teacher_sampling']['scheduler']]} "
        f"and guidance {s['teacher_sampling']['guidance']}",
        "",
        metrics_table(rows[:3] + students + [measured, real]),
        "",
        "Alignment: the share of images the shipped digits classifier assigns to the prompted digit. "
        "Frechet: distance between Gaussians fitted to the classifier's penultimate features of the images and of "
        "the real train-split digits (lower is better). KID: the kernel distance in the same features (unbiased "
        "MMD^2, cubic kernel, mean over 100 subsets; lower is better, 0 is two samples of one distribution, and "
        "it can go below). Precision / recall: improved precision and recall in the same features. Images per "
        "second: sampling alone, on this machine.",
        "",
        f"The last two rows score real digits the teacher never saw (the held-out split) the same way. A Frechet "
        f"distance from fewer images is larger (by about {floor['fid']['slope']:.0f} / n here), and the balanced "
        f"sets lower KID by about {-floor['kid']['slope']:.0f} / n, so {measured['n']} real digits are no floor "
        f"for {real['n']} generated ones: the floor row reads both at {real['n']} images from balanced random "
        f"subsets of the held-out digits (spread over subsets of {round(0.875 * measured['n'])}: Frechet "
        f"{floor['fid']['spread']:.2f}, KID {floor['kid']['spread']:.1f}). It is an estimate, and the reference is "
        "the split the teacher learned from: a student that reproduces those digits can come closer to it than "
        "fresh real digits do.",
        "",
        "## Against the bar",
        "",
        f"- the teacher distilled is close to real digits: {teacher['fid']:.1f} is {c['teacher_vs_real']:.2f}x the "
        f"real floor {real['fid']:.2f} (at most {bar['teacher']:g}x: {_verdict(c['teacher_ok'])})",
        "- every student stays at or above the real-digits floor (Frechet and KID): " + (
            "yes" if not c.get("below_floor") else f"**no**: {', '.join(c['below_floor'])} (within the floor's "
            "spread, the student is as close to the training digits as real digits are)"),
        f"- every seed keeps the teacher's alignment: lowest {min(c['alignment_ratios']):.3f} of it "
        f"(at least {bar['alignment']:g}: {_verdict(c['alignment_ok'])})",
        f"- median student Frechet {c['median_fid']:.1f} = {c['median_ratio']:.2f}x the {teacher['name']} "
        f"(at most {bar['median']:g}x: {_verdict(c['median_ok'])})",
        f"- worst seed {c['worst_fid']:.1f} = {c['worst_ratio']:.2f}x (at most {bar['worst']:g}x: "
        f"{_verdict(c['worst_ok'])})",
        f"- every seed covers at least half the way from where it starts (the unguided one-step teacher, "
        f"{unguided['fid']:.1f}): at most {max(c['from_start_ratios']):.2f} of it remains "
        f"(at most {bar['from_start']:g}: {_verdict(c['from_start_ok'])})",
        f"- one student image costs {students[0]['nfe']} network evaluation(s), the {teacher['name']} "
        f"{teacher['nfe']}",
        "",
        "## Samples",
        "",
        "A row per digit, a column per phrasing of the prompt (\"a handwritten seven\", \"the digit 7\", ...), "
        "the same noise seed in the same cell of every panel. Every seed's own grid is in `eval/`.",
        "",
        "![samples](grid.png)",
        "",
        *time_to_quality(s),
        "## Training",
        "",
        "![losses](loss.png)",
        "",
    ]
    return "\n".join(lines)


def compare_markdown(s: dict) -> str:
    keys = _keys(s["adapters"])
    header = ["adapter", "rank", "lr", "trainable", *map(_title, keys), "distill time (s)"]
    body = [[r["adapter"], r["rank"], f"{r['lr']:g}", _millions(r["trainable"]), *(r.get(k) for k in keys),
             f"{r['distill_seconds']:.0f}"] for r in s["adapters"]]
    st = s["settings"]
    lines = [
        f"# Adapter ablation on handwritten digits (world `{s['world']}`)",
        "",
        f"The same distillation (preset `{s['preset']}`{', ' + str(st['steps']) + ' steps' if st['steps'] else ''}, "
        f"seed {st['seeds'][0]}) with each adapter on the student; the teacher has "
        f"{_millions(s['teacher_params'])} parameters. {s['teachers'][0]['n']} one-step images per student, the "
        f"same prompts and seeds. Each adapter trains at its own learning rate (`lr`, in its own units: angles, "
        f"low-rank factors, weights); everything else is shared.",
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

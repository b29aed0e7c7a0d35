"""`wadi analyze`: the weight-space analysis (docs/method.md) of a teacher and a student.

Writes OUT/analysis.json (summary and per layer), OUT/layers.csv, OUT/changes.png (per
layer: mean direction change vs mean norm change), OUT/energy.png (cumulative energy of
the direction residual vs rank fraction) and, with --hybrids, the two norm/direction swap
models under OUT/hybrids/.
"""

from __future__ import annotations

from pathlib import Path

from wadi.evaluation.analysis import DEFAULT_ENERGY, HYBRIDS, analyze, check_threshold, make_hybrid
from wadi.evaluation.analysis_report import dtype_note, format_summary, plot_changes, plot_energy, write_csv, write_json
from wadi.files.atomic import FORCE_HELP, check_out
from wadi.files.weights import load_weights, save_weights
from wadi.models.backbones import DENOISER_SUBFOLDERS


def register(sub) -> None:
    p = sub.add_parser("analyze", help="norm vs direction change of a student's weights against its teacher's")
    p.add_argument("teacher", help="diffusers model folder, pipeline folder (unet/ or transformer/) "
                                   "or weights file (.safetensors; .bin/.pth read without running code)")
    p.add_argument("student", help="the same, for the student (same architecture)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    p.add_argument("--energy", type=float, default=DEFAULT_ENERGY,
                   help="share of the direction-residual energy the rank fraction keeps (default 0.93)")
    p.add_argument("--hybrids", action="store_true",
                   help="also write the student with the teacher's directions and the student with "
                        "the teacher's norms to OUT/hybrids/")
    p.set_defaults(func=run)


def run(args) -> int:
    # Cheap checks first: loading and analyzing a real UNet takes minutes.
    check_threshold(args.energy)
    check_out(args.out, args.force, inputs=[args.teacher, args.student])
    teacher, student = (load_weights(p, subfolders=DENOISER_SUBFOLDERS) for p in (args.teacher, args.student))
    result = analyze(teacher.state_dict, student.state_dict, args.energy, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [write_json(result, args.out / "analysis.json", args.teacher, args.student),
               write_csv(result, args.out / "layers.csv"),
               plot_changes(result, args.out / "changes.png"),
               plot_energy(result, args.out / "energy.png")]
    if args.hybrids:
        for name, (norms, directions) in HYBRIDS.items():
            hybrid = make_hybrid(teacher.state_dict, student.state_dict, norms, directions)
            written.append(save_weights(hybrid, args.out / "hybrids" / name, like=student))
    print(format_summary(result.summary()))
    note = dtype_note(teacher.state_dict, student.state_dict)
    if note:
        print(note)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

"""`wadi distill`: train a one-step student with WaDi (or an ablation adapter)."""

from __future__ import annotations

import os

from wadi.engine.presets import preset_names


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a one-step student (single process, or under accelerate launch)",
                       description="Presets: " + ", ".join(preset_names()))
    p.add_argument("--config", help="preset name or YAML file (not with --resume RUN_DIR; with --resume latest "
                                    "its run.root is where the latest run is looked for)")
    p.add_argument("--resume", metavar="RUN_DIR|latest", help="continue a run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (the run's config.yaml, before the model fills in its kind) "
                        "and exit without loading or writing anything")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.path=/data/sd15 train.steps=100")
    p.set_defaults(func=run)


def run(args) -> int:
    from wadi.engine.training import distill, settings

    if not args.config and not args.resume:
        raise ValueError("give --config PRESET_OR_YAML (or --resume RUN_DIR|latest)")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(settings(args.config, args.overrides, args.resume).to_dict(), sort_keys=False), end="")
        return 0
    run_dir = distill(args.config, args.overrides, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"run folder: {run_dir}")
    return 0

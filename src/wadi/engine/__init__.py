"""The engine that trains: settings, presets, the distillation step, the run, checkpoints, tracking."""

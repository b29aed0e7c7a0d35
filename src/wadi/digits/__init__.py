"""The embedded digits world: a real text-to-image distillation small enough for a CPU.

scikit-learn's 1797 handwritten 8x8 digits, plain-English prompts, the all-MiniLM-L6-v2
text encoder from its PyPI package, a shipped pixel-space teacher UNet and a shipped
digits classifier for the metrics. `wadi demo` distills the teacher with the same engine
as Stable Diffusion (wadi.engine.distiller) and reports what the one-step student got.

Modules: world (images, splits, prompts), paths (shipped assets, the text encoder),
teacher and classifier (how the shipped networks were trained), metrics, demo, report.
"""

"""wadi: one-step text-to-image distillation with LoRaD (Weight Direction-aware Distillation).

The main jobs, importable from here (loaded on first use, so `import wadi` stays light):

    run = wadi.distill("sd15-wadi", ["model.path=/data/sd15", "data.prompts=prompts.txt"])
    student = wadi.load_student(run)                      # or an export, adapter, released file
    images = wadi.one_step(student.backbone, student.net, ["a cat"], seeds=[0])
    wadi.export_pipeline(student, "exported/")            # a stock diffusers pipeline folder
    result = wadi.analyze(wadi.load_teacher(run).net, student.net)

`wadi.evaluate` scores students and teachers (see wadi.evaluate), `attach` / `load_adapter`
put LoRaD (or LoRA, DoRA, full fine-tuning) on any diffusers model.
"""

import importlib
import importlib.metadata

from .adapters import KINDS, Adapter, AdapterConfig, attach, load_adapter
from .lorad import LoRaDLinear

__version__ = importlib.metadata.version("wadi-distill")

_LAZY = {
    "distill": "training", "resolve": "config", "load_student": "students", "load_teacher": "students",
    "one_step": "sampling", "multi_step": "sampling", "export_pipeline": "export", "export_lora": "export",
    "evaluate": "evaluate", "analyze": "analysis", "load_weights": "weights", "BackboneSpec": "backbones",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'wadi' has no attribute {name!r}")


__all__ = ["KINDS", "Adapter", "AdapterConfig", "LoRaDLinear", "attach", "load_adapter", "__version__", *_LAZY]

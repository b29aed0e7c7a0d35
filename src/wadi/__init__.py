"""wadi: one-step text-to-image distillation with LoRaD (Weight Direction-aware Distillation).

The main jobs, importable from here (loaded on first use, so `import wadi` stays light):

    run = wadi.distill("sd15-wadi", ["model.path=/data/sd15", "data.prompts=prompts.txt"])
    student = wadi.load_student(run)                      # or an export, adapter, released file
    images = wadi.sample_student(student.backbone, student.net, ["a cat"], seeds=[0])
    wadi.export_pipeline(student, "exported/")            # a stock diffusers pipeline folder
    result = wadi.analyze(wadi.load_teacher(run).net, student.net)

`wadi.evaluation.evaluate` scores students and teachers (see wadi.evaluation.evaluate), `attach` /
`load_adapter` put LoRaD (or LoRA, DoRA, full fine-tuning) on any diffusers model.
"""

import importlib
import importlib.metadata

__version__ = importlib.metadata.version("wadi-distill")

# Nothing heavy is imported with the package: `wadi` on the command line answers Ctrl-C
# from its first line (wadi.cli), which an import of torch here would come before.
_LAZY = {
    "ADAPTERS": "adapters.config", "Adapter": "adapters.core", "AdapterConfig": "adapters.config",
    "attach": "adapters.core", "load_adapter": "adapters.core", "LoRaDLinear": "adapters.lorad",
    "distill": "engine.training", "resolve": "engine.config", "load_student": "artifacts.students",
    "load_teacher": "artifacts.students", "sample_student": "models.sampling", "sample_teacher": "models.sampling",
    "export_pipeline": "artifacts.export", "export_lora": "artifacts.export", "evaluate": "evaluation.evaluate",
    "analyze": "evaluation.analysis", "load_weights": "files.weights", "BackboneSpec": "models.backbones",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"wadi.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'wadi' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]

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
import sys
import types

__version__ = importlib.metadata.version("wadi-distill")

# Nothing heavy is imported with the package: `wadi` on the command line answers Ctrl-C
# from its first line (wadi.cli), which an import of torch here would come before.
_LAZY = {
    "KINDS": "adapters", "Adapter": "adapters", "AdapterConfig": "adapters", "attach": "adapters",
    "load_adapter": "adapters", "LoRaDLinear": "lorad",
    "resolve": "config", "load_student": "students", "load_teacher": "students",
    "one_step": "sampling", "multi_step": "sampling", "export_pipeline": "export", "export_lora": "export",
    "evaluate": "evaluate", "analyze": "analysis", "load_weights": "weights", "BackboneSpec": "backbones",
}


class _Package(types.ModuleType):
    """`wadi.distill` is the function, also after the engine module of the same name
    (wadi/distill.py) is imported: the import system sets a package attribute for each
    submodule it loads, which would otherwise replace the function with the module. The
    module stays importable by its full name (`from wadi.distill import Distiller`)."""

    @property
    def distill(self):
        from .training import distill

        return distill

    @distill.setter
    def distill(self, module) -> None:
        pass  # the submodule, set by the import system: sys.modules["wadi.distill"] keeps it


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'wadi' has no attribute {name!r}")


__all__ = ["distill", "__version__", *_LAZY]

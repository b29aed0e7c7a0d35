"""Model cards: the README.md every export carries (huggingface_hub's ModelCard): the base
model and its licence, the method, the settings and metrics when known, and how to run the
student with stock diffusers in one step."""

from __future__ import annotations

import json
from pathlib import Path

from wadi.files.run_folder import RunFolder
from wadi.errors import CorruptFile
from wadi.files.atomic import read_json_object
from wadi.models.backbones import BackboneSpec, Kind, get_kind

PAPER = "https://arxiv.org/abs/2603.08258"
AUTHORS_CODE = "https://github.com/gudaochangsheng/WaDi"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A {{ steps_text }} text-to-image student of [{{ base }}]({{ base_link }}), distilled with WaDi
(Weight Direction-aware Distillation, CVPR 2026; [paper]({{ paper }}), [authors' code]({{ code }}))
by wadi (the `wadi-distill` Python package): variational score distillation in which the student
and the fake score model are adapted by LoRaD, a low-rank rotation of weight directions.

- format: {{ format }}
- base model: `{{ base }}` (licence: {{ license }}; the student inherits it)
{% for line in settings %}- {{ line }}
{% endfor %}
{% if metrics %}## Metrics

{% for line in metrics %}- {{ line }}
{% endfor %}{% endif %}
## Use

{{ steps_text | capitalize }}, one network evaluation per step, no classifier-free guidance{% if note %}. {{ note }}{% endif %}:

```{{ language }}
{{ usage }}
```
"""

PROMPT = "a photo of a cat"


def _arguments(call: dict) -> str:
    """The call's keyword arguments as Python source."""
    return "".join(f", {k}={_py(v) if isinstance(v, str) else repr(v)}" for k, v in call.items())


def _call(call: dict, pipe: str = "pipe") -> str:
    """The stock pipeline's call that samples the student, ending with the image; the prompt
    is passed by name (FLUX.2 klein's pipeline takes an image first)."""
    return f"{pipe}(prompt={_py(PROMPT)}{_arguments(call)}).images[0]"


def _sample(call: dict) -> str:
    return f"image = {_call(call)}\nimage.save(\"image.png\")"


def one_liner(kind: Kind, folder: Path, call: dict | None) -> str:
    """One line that samples an exported pipeline folder (what `wadi export` prints)."""
    if kind.pipeline is None:
        return f"wadi sample {_quoted(folder)} --prompt {_quoted(PROMPT)} --out samples"
    return _call(call, f"{kind.pipeline}.from_pretrained({_py(folder)})")


def pipeline_usage(kind: Kind, folder: Path, call: dict | None) -> tuple[str, str]:
    """(language, snippet) that samples an exported pipeline folder as written."""
    if kind.pipeline is None:
        return "bash", one_liner(kind, folder, call)
    return "python", (f"from diffusers import {kind.pipeline}\n\n"
                      f"pipe = {kind.pipeline}.from_pretrained({_py(folder)})\n{_sample(call)}")


def lora_usage(kind: Kind, base: str, folder: Path, weight_name: str, scheduler: str, call: dict) -> tuple[str, str]:
    """(language, snippet) that samples the base model with an exported LoRA and the
    scheduler class beside it."""
    return "python", (f"from diffusers import {scheduler}, {kind.pipeline}\n\n"
                      f"pipe = {kind.pipeline}.from_pretrained({_py(base)})\n"
                      f"pipe.load_lora_weights({_py(folder)}, weight_name={_py(weight_name)})\n"
                      f"pipe.scheduler = {scheduler}.from_pretrained({_py(folder)}, subfolder=\"scheduler\")\n"
                      f"{_sample(call)}")


def single_file_usage(kind: Kind, base: str, file: Path, scheduler: Path, scheduler_class: str,
                      call: dict) -> tuple[str, str]:
    """(language, snippet) that samples a single-file checkpoint; `base` gives the configs."""
    config = f", config={_py(base)}" if base else ""
    return "python", (f"from diffusers import {scheduler_class}, {kind.pipeline}\n\n"
                      f"pipe = {kind.pipeline}.from_single_file({_py(file)}{config})\n"
                      f"pipe.scheduler = {scheduler_class}.from_pretrained({_py(scheduler)})\n{_sample(call)}")


def ui_settings(backbone, model: str) -> str:
    """How to reproduce the student in A1111 or ComfyUI, by those interfaces' names (VP
    students: DDIM from the last timestep; the interfaces space further steps their own way)."""
    steps = backbone.student_steps
    spacing = ("" if steps == 1 else f" (their DDIM spaces {steps} steps from timestep 1, not from the last one as the "
               "student was trained; expect small differences, or use diffusers)")
    return (f"In A1111 or ComfyUI: {model}, sampler DDIM (ComfyUI: sampler ddim, scheduler ddim_uniform), {steps} "
            f"step(s), CFG scale 1{spacing}. In diffusers")


def adapter_usage(file: Path, base: str) -> tuple[str, str]:
    """(language, snippet) that samples an adapter file on its base."""
    return "bash", (f"wadi sample {_quoted(file)} --base {_quoted(base)} --prompt {_quoted(PROMPT)} "
                    "--out samples")


def _py(text) -> str:
    """A Python string literal of `text`, in double quotes as the rest of a snippet."""
    return json.dumps(str(text))


def _quoted(text) -> str:
    import shlex

    return shlex.quote(str(text))


def base_license(spec: BackboneSpec) -> str:
    """The licence the base model's own card declares (a local folder), else a pointer to it."""
    readme = Path(spec.path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            found = ModelCard.load(readme).data.license
        except Exception:  # a README without card metadata says nothing about the licence
            found = None
        if found:
            return found
    return "other"


def run_settings(source: str) -> tuple[list[str], list[str]]:
    """What a run folder says about how the student was made, and any metrics beside it."""
    if not RunFolder.is_run(source):
        return [f"source: `{source}`"], []
    from wadi.engine.config import run_config

    cfg = run_config(RunFolder(source))
    s, t = cfg.student, cfg.train
    settings = [f"student adapter: {s.kind}" + (f" rank {s.rank}" if s.kind != "full" else ""),
                f"fake score model: {cfg.fake.kind} rank {cfg.fake.rank}",
                f"{t.steps} steps of {t.batch_size} prompts per process, guidance {t.guidance}, learning rates "
                f"{t.lr_student:g} / {t.lr_fake:g}" + (f", EMA {t.ema_decay}" if t.ema_decay else ""),
                f"sampling steps: {cfg.model.student_steps or 1}"]
    if cfg.model.one_step_abar is not None:  # VP models only
        settings.append(f"generator abar_T: {cfg.model.one_step_abar}")
    metrics = []
    results = Path(source) / "eval" / "results.json"
    if results.is_file():
        try:
            models = read_json_object(results).get("models")
        except (OSError, CorruptFile):
            models = None  # a damaged evaluation leaves the card without scores
        for name, r in models.items() if isinstance(models, dict) else ():
            if not isinstance(r, dict):
                continue
            scores = ", ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "num_images"  # every score results.json holds
                               and isinstance(v, (int, float)) and not isinstance(v, bool))
            metrics.append(f"{name}: {scores} ({r.get('num_images')} images)")
    return settings, metrics


def write_card(folder: Path, fmt: str, base: BackboneSpec, source: str, usage: tuple[str, str], steps: int,
               note: str = "", name: str = "README.md") -> Path:
    """The card as `folder/name`; `usage` is (language, snippet) from the *_usage functions,
    `steps` the student's sampling steps."""
    from huggingface_hub import ModelCard, ModelCardData

    steps_text = "one-step" if steps == 1 else f"{steps}-step"
    kind = get_kind(base.kind) if base.kind else None
    license_ = base_license(base)
    hub_id = base.path if base.path.count("/") == 1 and not Path(base.path).exists() else None
    data = ModelCardData(license=license_, base_model=hub_id, library_name="diffusers" if kind and kind.pipeline
                         else None, pipeline_tag="text-to-image",
                         tags=["wadi", "lorad", "one-step" if steps == 1 else "few-step", "distillation"])
    settings, metrics = run_settings(source)
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, title=f"{steps_text.capitalize()} WaDi student of {Path(base.path).name or 'its base'}",
        steps_text=steps_text,
        base=base.path or "unknown", base_link=f"https://huggingface.co/{hub_id}" if hub_id else base.path,
        paper=PAPER, code=AUTHORS_CODE, format=fmt, license=license_, settings=settings, metrics=metrics,
        language=usage[0], usage=usage[1], note=note)
    path = folder / name
    card.save(path)
    return path

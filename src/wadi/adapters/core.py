"""One interface for the paper's five adapters: attach, trainable parameters, merge, save, load.

- lorad: our LoRaDLinear on the target layers.
- lora, dora: peft's layers on the same target layers.
- dora-frozen: DoRA whose magnitude vectors stay at the base weight norms (peft has no
  switch for it; we freeze them and leave them out of the trainable set).
- full: full fine-tuning of every parameter of the model (the paper's 860M baseline).

Adapter files (their format: wadi.adapters.file) hold only the adapter's tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from wadi.adapters import file as adapter_file
from wadi.adapters.config import ADAPTERS, UNRANKED, AdapterConfig
from wadi.adapters.file import AdapterFile, content_sample, fingerprint
from wadi.adapters.lorad import LoRaDLinear
from wadi.adapters.targets import select_linears


@dataclass
class Adapter:
    """An adapter attached to `model`. Create with `attach`."""

    model: nn.Module
    config: AdapterConfig
    backbone: str  # the backbone kind (wadi.models.backbones.KINDS) of the model
    target_names: list[str]
    base_fingerprint: str
    base_sample: list[float] | None = None  # content_sample of the base at attach time
    merged: bool = False
    _shared: dict = field(default_factory=dict, repr=False)  # target name -> the base weight merge set aside
    # A model that carries several roles' adapters (wadi.adapters.shared_base): `role` names this
    # one, and `view` holds its layers alone, at their names.
    view: nn.Module | None = field(default=None, repr=False)
    role: str | None = None

    ranked = True  # has a rank and target layers (all but full fine-tuning)

    # --- what subclasses define -------------------------------------------------
    @property
    def holder(self) -> nn.Module:
        """The module whose submodules at the target names are this adapter's layers."""
        return self.model if self.view is None else self.view

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        # attach() froze everything the adapter does not train.
        return {n: p for n, p in self.holder.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors, keyed by stable names."""
        raise NotImplementedError

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @classmethod
    def select(cls, model: nn.Module, config: AdapterConfig) -> list[str]:
        """The names of the modules the adapter takes; a rank no target layer can use is refused."""
        names = select_linears(model, config.rule)
        most = max(cls.full_rank(model.get_submodule(n)) for n in names)
        if config.rank > most:
            raise ValueError(f"{config.kind} rank {config.rank} is more than any target layer can use "
                             f"(at most {most} here); choose a rank of at most {most}")
        return names

    @staticmethod
    def full_rank(layer: nn.Linear) -> int:
        """The largest rank that changes something in `layer`."""
        return min(layer.out_features, layer.in_features)

    @classmethod
    def inject(cls, model: nn.Module, config: AdapterConfig, names: list[str]) -> None:
        """Put the adapter into the (frozen) model's target modules."""
        raise NotImplementedError

    @classmethod
    def base_copy(cls, model: nn.Module) -> nn.Module:
        """A copy of `model` to attach this adapter to. Its frozen tensors are `model`'s own
        (the same storage), so teacher, student and fake model hold one copy of them."""
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
        return copy.deepcopy(model, memo)

    # --- shared -----------------------------------------------------------------
    def layers(self) -> dict[str, nn.Module]:
        """The adapter layers by target name (LoRaDLinear or peft layers)."""
        return {n: self.holder.get_submodule(n) for n in self.target_names}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def merge(self) -> None:
        """Fold the adapter into the base weights; the adapter stays attached (see unmerge).

        Each merged base weight is a fresh tensor: the weight the model may share with
        another (the teacher's) is set aside untouched, and unmerge puts it back.
        """
        if self.role is not None:
            raise RuntimeError(f"the {self.role} adapter shares its model with other roles: take merged_model()")
        for name, layer in self.layers().items():
            if name in self._shared:
                continue
            base = layer.get_base_layer()
            self._shared[name] = base.weight
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
            layer.merge()
        self.merged = True

    def unmerge(self) -> None:
        for name, layer in self.layers().items():
            if name in self._shared:
                layer.unmerge()
                layer.get_base_layer().weight = self._shared.pop(name)
        self.merged = False

    def merged_model(self) -> nn.Module:
        """Merge and put the plain base layers back: a model of the base architecture,
        whose untouched tensors are still those the adapter's model shares.

        The adapter is spent afterwards; save it first if it is still needed. An adapter
        sharing its model with other roles is not: its merged model is a plain copy.
        """
        if self.role is not None:
            from wadi.adapters.switch import plain_copy

            alone = dataclasses.replace(self, model=plain_copy(self.model, self.role), view=None, role=None,
                                        _shared={})
            return alone.merged_model()
        self.merge()
        for n, layer in self.layers().items():
            self.model.set_submodule(n, layer.get_base_layer())
        return self.model

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
        """Write the adapter tensors with their metadata (atomically)."""
        if self.merged:
            raise RuntimeError("adapter is merged; unmerge before saving so the saved tensors are the adapter's")
        meta = adapter_file.metadata(self.config.to_dict(), self.model, self.backbone, self.base_fingerprint,
                                     self.base_sample, len(self.target_names), extra_metadata)
        return adapter_file.write(path, self.state_dict(), meta)

    def load(self, source: str | os.PathLike | AdapterFile, allow_other_base: bool = False) -> None:
        """Load an adapter file saved for this base model, kind and rank; checks all before writing."""
        if self.merged:
            raise RuntimeError("adapter is merged; unmerge before loading another state")
        file = source if isinstance(source, AdapterFile) else adapter_file.read(source)
        file.check(self.config.kind, self.config.rank, self.ranked, self.model, self.backbone,
                   self.base_fingerprint, self.base_sample, allow_other_base)
        self._load_tensors(file)

    def _load_tensors(self, file: AdapterFile) -> None:
        """The file's tensors into the adapter, their names and shapes checked first."""
        tensors, path = file.tensors, file.path
        current = self.state_dict()
        missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        if missing or extra:
            raise ValueError(f"{path}: tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in tensors.items():
            if v.shape != current[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(current[k].shape)}")
        self._assign(tensors)


class LoRaDAdapter(Adapter):
    @staticmethod
    def full_rank(layer):
        return min(layer.out_features, layer.in_features // 2)  # the angle matrix is out x in/2

    @classmethod
    def inject(cls, model, config, names):
        for n in names:
            model.set_submodule(n, LoRaDLinear(model.get_submodule(n), config.rank, name=n))

    def state_dict(self):
        return dict(self.trainable_parameters())

    @torch.no_grad()
    def _assign(self, tensors):
        for k, p in self.trainable_parameters().items():
            p.copy_(tensors[k])


class PeftAdapter(Adapter):
    """LoRA, DoRA and DoRA with frozen magnitude, through peft. Files name the tensors as
    diffusers' LoRA files do (`unet.<layer>.lora_A.weight`, or `transformer.`), so that
    `load_lora_weights` of a stock pipeline reads them too."""

    @classmethod
    def inject(cls, model, config, names):
        from peft import LoraConfig, inject_adapter_in_model

        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha or config.rank,
                                 target_modules=names, use_dora=config.kind != "lora", init_lora_weights=True)
        inject_adapter_in_model(peft_config, model)
        if config.kind == "dora-frozen":
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.requires_grad_(False)

    def _prefix(self) -> str:
        from wadi.models.backbones import get_kind

        return f"{get_kind(self.backbone).subfolder}."

    def state_dict(self):
        from peft import get_peft_model_state_dict

        return {self._prefix() + k: v for k, v in get_peft_model_state_dict(self.holder).items()}

    def _assign(self, tensors):
        from peft import set_peft_model_state_dict

        n = len(self._prefix())
        set_peft_model_state_dict(self.holder, {k[n:]: v for k, v in tensors.items()})


class FullAdapter(Adapter):
    """Full fine-tuning: every parameter of the model trains; the 'adapter' is the model,
    so there is nothing to merge."""

    ranked = False

    @classmethod
    def select(cls, model, config):
        return [n for n, _ in model.named_modules() if n]

    @classmethod
    def inject(cls, model, config, names):
        model.requires_grad_(True)

    @classmethod
    def base_copy(cls, model):
        return copy.deepcopy(model)  # every weight trains: none can be shared

    def layers(self):
        return {}

    def merge(self):
        pass

    def unmerge(self):
        pass

    def state_dict(self):
        return self.model.state_dict()

    def _assign(self, tensors):
        self.model.load_state_dict(tensors, strict=True)


_CLASSES = {"lorad": LoRaDAdapter, "lora": PeftAdapter, "dora": PeftAdapter, "dora-frozen": PeftAdapter,
            "full": FullAdapter}
assert tuple(_CLASSES) == ADAPTERS and {k for k, c in _CLASSES.items() if not c.ranked} == UNRANKED


def adapter_class(kind: str) -> type[Adapter]:
    return _CLASSES[kind]


def check_attach(model: nn.Module, config: AdapterConfig, backbone: str | None = None) -> None:
    """Raise what `attach` would raise, on an empty (meta-device) copy of the architecture."""
    with torch.device("meta"):
        empty = type(model).from_config(model.config)
    attach(empty, config, backbone)


def attach(model: nn.Module, config: AdapterConfig, backbone: str | None = None) -> Adapter:
    """Freeze `model` and attach the adapter that `config` names to its target layers
    (without targets: the student preset of the backbone kind). `backbone` names the kind
    (backbones.KINDS); without it, the first kind whose denoiser class the model is."""
    from wadi.models.backbones import get_kind, kind_of

    kind = get_kind(backbone) if backbone else kind_of(model)
    if config.targets is None:
        config = dataclasses.replace(config, targets=kind.targets[0])
    cls = adapter_class(config.kind)
    names = cls.select(model, config)
    fp, sample = fingerprint(model, names), content_sample(model, names)
    model.requires_grad_(False)
    cls.inject(model, config, names)
    return cls(model, config, kind.name, names, fp, sample)


def adapter_base_copy(file: AdapterFile, model: nn.Module) -> nn.Module:
    """The copy of `model` the adapter in `file` attaches to (see Adapter.base_copy)."""
    return adapter_class(file.config["kind"]).base_copy(model)


def load_adapter(model: nn.Module, source: str | os.PathLike | AdapterFile, allow_other_base: bool = False,
                 backbone: str | None = None) -> Adapter:
    """Attach the adapter described by a saved file to `model` and load its tensors.

    The file is checked against the model before anything is attached (class, backbone
    kind, layers, and a sample of the base weights, unless `allow_other_base`), so a
    mismatch leaves the model as it was. The backbone kind is the file's (`backbone` for
    files that do not record it).
    """
    file = source if isinstance(source, AdapterFile) else adapter_file.read(source)
    config = AdapterConfig(**file.config)
    cls = adapter_class(config.kind)
    try:
        names = cls.select(model, config)
    except ValueError:
        file.check(config.kind, config.rank, cls.ranked, model)  # a file of another model says so first
        raise
    file.check(config.kind, config.rank, cls.ranked, model, backbone, fingerprint(model, names),
               content_sample(model, names), allow_other_base)  # once, before the model is touched
    adapter = attach(model, config, file.backbone or backbone)
    adapter._load_tensors(file)
    return adapter

"""One interface for the paper's five adapters: attach, trainable parameters, merge, save, load.

- lorad: our LoRaDLinear on the target layers.
- lora, dora: peft's layers on the same target layers.
- dora-frozen: DoRA whose magnitude vectors stay at the base weight norms (peft has no
  switch for it; we freeze them and leave them out of the trainable set).
- full: full fine-tuning of every parameter of the model (the paper's 860M baseline).

Adapter files are safetensors holding only the adapter's tensors, with the kind, rank,
target rule and a fingerprint of the base model in their metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CorruptFile, describe

from .lorad import LoRaDLinear
from .targets import TargetRule, resolve_rule, select_linears
from .weights import check_finite

FORMAT = "wadi-adapter/1"


@dataclass
class AdapterConfig:
    kind: str = "lorad"
    rank: int = 256
    targets: str | dict | None = None  # preset name or include/exclude rule; None: the backbone kind's preset
    alpha: float | None = None  # LoRA/DoRA scale numerator; None means alpha = rank

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if adapter_class(self.kind).ranked and (not isinstance(self.rank, int) or isinstance(self.rank, bool)
                                                or self.rank <= 0):
            raise ValueError(f"adapter rank must be a positive integer, got {self.rank!r}")

    @property
    def rule(self) -> TargetRule:
        return resolve_rule(self.targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else self.rule.to_dict()
        return d


def fingerprint(model: nn.Module, names: list[str]) -> str:
    """A short hash of the model class and the names and shapes of the adapted layers."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name in names:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            h.update(f"{name}.{pname}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


SAMPLE_LAYERS, SAMPLE_PER_LAYER = 16, 4
SAMPLE_RTOL = 2e-2  # a base stored in bf16 is the same base; a fine-tune of it is not


def content_sample(model: nn.Module, names: list[str]) -> list[float] | None:
    """A few base weights at fixed places of up to 16 adapted layers: enough to tell a base
    from another of the same shapes, cheap on any size (None on the meta device)."""
    picked = names[:: max(1, len(names) // SAMPLE_LAYERS)][:SAMPLE_LAYERS]
    values = []
    for name in picked:
        w = getattr(model.get_submodule(name), "weight", None)
        if w is None:
            continue
        if w.is_meta:
            return None
        flat = w.detach().reshape(-1)
        values += flat[torch.linspace(0, flat.numel() - 1, SAMPLE_PER_LAYER).long()].float().tolist()
    return values


@dataclass
class Adapter:
    """An adapter attached to `model`. Create with `attach`."""

    model: nn.Module
    config: AdapterConfig
    target_names: list[str]
    base_fingerprint: str
    base_sample: list[float] | None = None  # content_sample of the base at attach time
    merged: bool = False
    _shared: dict = field(default_factory=dict, repr=False)  # target name -> the base weight merge set aside

    ranked = True  # has a rank and target layers (all but full fine-tuning)

    # --- what subclasses define -------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        # attach() froze everything the adapter does not train.
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

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
        return {n: self.model.get_submodule(n) for n in self.target_names}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def merge(self) -> None:
        """Fold the adapter into the base weights; the adapter stays attached (see unmerge).

        Each merged base weight is a fresh tensor: the weight the model may share with
        another (the teacher's) is set aside untouched, and unmerge puts it back.
        """
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

        The adapter is spent afterwards; save it first if it is still needed.
        """
        self.merge()
        for n, layer in self.layers().items():
            self.model.set_submodule(n, layer.get_base_layer())
        return self.model

    def metadata(self, extra: dict | None = None) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "config": json.dumps(self.config.to_dict()),
            "base_class": type(self.model).__name__,
            "base_fingerprint": self.base_fingerprint,
            "base_sample": json.dumps(self.base_sample),
            "base_model": str(getattr(getattr(self.model, "config", None), "_name_or_path", "") or ""),
            "num_layers": str(len(self.target_names)),
        }
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        return meta

    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
        """Write the adapter tensors as safetensors (atomically: temp file, then rename)."""
        if self.merged:
            raise RuntimeError("adapter is merged; unmerge before saving so the saved tensors are the adapter's")
        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=self.metadata(extra_metadata))
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike, allow_other_base: bool = False) -> None:
        """Load an adapter file saved for this base model, kind and rank; checks all before writing."""
        if self.merged:
            raise RuntimeError("adapter is merged; unmerge before loading another state")
        meta, tensors = read_adapter_file(path)
        _check_compatible(path, meta, self.config, self.model, self.base_fingerprint, self.base_sample,
                          allow_other_base)
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
        from .backbones import kind_of

        return f"{kind_of(self.model).subfolder}."

    def state_dict(self):
        from peft import get_peft_model_state_dict

        return {self._prefix() + k: v for k, v in get_peft_model_state_dict(self.model).items()}

    def _assign(self, tensors):
        from peft import set_peft_model_state_dict

        n = len(self._prefix())
        set_peft_model_state_dict(self.model, {k[n:]: v for k, v in tensors.items()})


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
KINDS = tuple(_CLASSES)


def adapter_class(kind: str) -> type[Adapter]:
    return _CLASSES[kind]


def check_attach(model: nn.Module, config: AdapterConfig) -> None:
    """Raise what `attach` would raise, on an empty (meta-device) copy of the architecture."""
    with torch.device("meta"):
        empty = type(model).from_config(model.config)
    attach(empty, config)


def attach(model: nn.Module, config: AdapterConfig) -> Adapter:
    """Freeze `model` and attach the adapter that `config` names to its target layers
    (without targets: the student preset of the model's backbone kind)."""
    if config.targets is None:
        from .backbones import kind_of

        config = dataclasses.replace(config, targets=kind_of(model).targets[0])
    cls = adapter_class(config.kind)
    names = cls.select(model, config)
    fp, sample = fingerprint(model, names), content_sample(model, names)
    model.requires_grad_(False)
    cls.inject(model, config, names)
    return cls(model, config, names, fp, sample)


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a wadi adapter file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CorruptFile(f"{path} is not a readable safetensors file ({describe(e)})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a wadi adapter file (metadata format {meta.get('format')!r})")
    _check_metadata(path, meta)
    check_finite(tensors.items(), str(path))
    return meta, tensors


def _check_metadata(path: Path, meta: dict[str, str]) -> None:
    """The metadata the loaders read: a config that builds an AdapterConfig, a base sample
    that is a list of numbers or null. Damage is a CorruptFile, before anything reads it."""
    try:
        config = json.loads(meta["config"])
        AdapterConfig(**config).rule  # noqa: B018 -- builds the target rule, which raises on damage
        sample = json.loads(meta.get("base_sample", "null"))
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CorruptFile(f"{path}: its adapter metadata is damaged ({describe(e) or type(e).__name__})") from None
    if sample is not None and not (isinstance(sample, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in sample)):
        raise CorruptFile(f"{path}: its adapter metadata is damaged (base_sample is not a list of numbers)")


def _check_compatible(path, meta: dict, config: AdapterConfig, model: nn.Module, fp: str | None,
                      sample: list[float] | None = None, allow_other_base: bool = False) -> None:
    """Raise if the file's adapter does not fit `model`: class, kind, rank; the layers'
    fingerprint and the base weights' sample when given."""
    saved = AdapterConfig(**json.loads(meta["config"]))
    checks = [("base model class", type(model).__name__, meta.get("base_class")),
              ("kind", config.kind, saved.kind), ("rank", config.rank, saved.rank)]
    if fp is not None:
        checks.append(("base model layers (fingerprint)", fp, meta.get("base_fingerprint")))
    for key, ours, theirs in checks:
        if ours != theirs:
            raise ValueError(f"{path}: adapter {key} is {theirs!r} but this model's is {ours!r}; "
                             "load it into the model and adapter it was trained with")
    theirs = json.loads(meta.get("base_sample", "null"))
    if allow_other_base or sample is None or theirs is None or not adapter_class(config.kind).ranked:
        return
    if len(theirs) != len(sample) or not torch.allclose(torch.tensor(theirs), torch.tensor(sample),
                                                         rtol=SAMPLE_RTOL, atol=1e-6):
        raise ValueError(f"{path} was trained on a base model with other weights (the same shapes, other "
                         "values); load it on the model it was distilled from, or allow it explicitly "
                         "(--allow-other-base)")


def adapter_base_copy(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """The copy of `model` the adapter file at `path` attaches to (see Adapter.base_copy)."""
    meta, _ = read_adapter_file(path)
    return adapter_class(json.loads(meta["config"])["kind"]).base_copy(model)


def load_adapter(model: nn.Module, path: str | os.PathLike, allow_other_base: bool = False) -> Adapter:
    """Attach the adapter described by a saved file to `model` and load its tensors.

    The file is checked against the model before anything is attached (class, layers,
    and a sample of the base weights, unless `allow_other_base`), so a mismatch leaves the
    model as it was.
    """
    meta, _ = read_adapter_file(path)
    config = AdapterConfig(**json.loads(meta["config"]))
    _check_compatible(path, meta, config, model, fp=None)
    names = adapter_class(config.kind).select(model, config)
    _check_compatible(path, meta, config, model, fingerprint(model, names), content_sample(model, names),
                      allow_other_base)
    adapter = attach(model, config)
    adapter.load(path, allow_other_base)
    return adapter

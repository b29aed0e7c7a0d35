"""An adapter's settings: which of the five adapters, its rank, target layers and scale.

Kept apart from the adapters themselves so that the adapter file format
(wadi.adapters.file) can check a file's recorded settings without the adapter classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wadi.adapters.targets import TargetRule, resolve_rule

ADAPTERS = ("lorad", "lora", "dora", "dora-frozen", "full")  # the paper's five, as settings name them
UNRANKED = {"full"}  # adapters without a rank or target layers (full fine-tuning)


@dataclass
class AdapterConfig:
    kind: str = "lorad"
    rank: int = 256
    targets: str | dict | None = None  # preset name or include/exclude rule; None: the backbone kind's preset
    alpha: float | None = None  # LoRA/DoRA scale numerator; None means alpha = rank

    def __post_init__(self):
        if self.kind not in ADAPTERS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose one of {', '.join(ADAPTERS)}")
        if self.kind not in UNRANKED and (not isinstance(self.rank, int) or isinstance(self.rank, bool)
                                                or self.rank <= 0):
            raise ValueError(f"adapter rank must be a positive integer, got {self.rank!r}")

    @property
    def rule(self) -> TargetRule:
        return resolve_rule(self.targets)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else self.rule.to_dict()
        return d

"""wadi: one-step text-to-image distillation with LoRaD (Weight Direction-aware Distillation)."""

__version__ = "0.1.0"

from .adapters import KINDS, Adapter, AdapterConfig, attach, load_adapter  # noqa: E402
from .lorad import LoRaDLinear  # noqa: E402

__all__ = ["KINDS", "Adapter", "AdapterConfig", "LoRaDLinear", "attach", "load_adapter", "__version__"]

"""hf_deepen: depth up-scaling for Hugging Face Transformers models (OpT-DeUS and baselines)."""

from ._version import __version__
from .config import UpscaleConfig
from .errors import (
    AlignmentWarning,
    ConfigError,
    DeepenError,
    PlanError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
)
from .plan import DepthPlan
from .provenance import new_layer_indices, provenance
from .streaming import upscale_checkpoint
from .upscaler import DepthUpscaler

__all__ = [
    "AlignmentWarning",
    "ConfigError",
    "DeepenError",
    "DepthPlan",
    "DepthUpscaler",
    "PlanError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "UpscaleConfig",
    "__version__",
    "new_layer_indices",
    "provenance",
    "upscale_checkpoint",
]

"""hf_deepen: depth up-scaling for Hugging Face Transformers models (OpT-DeUS and baselines)."""

from ._version import __version__
from .config import UpscaleConfig
from .errors import (
    AlignmentWarning,
    CheckpointError,
    ConfigError,
    DeepenError,
    Interrupted,
    LayoutWarning,
    ModelNotFoundError,
    OutputError,
    PlanError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
    WeightError,
)
from .plan import DepthPlan
from .provenance import new_layer_indices, provenance
from .streaming import upscale_checkpoint
from .upscaler import DepthUpscaler

__all__ = [
    "AlignmentWarning",
    "CheckpointError",
    "ConfigError",
    "DeepenError",
    "DepthPlan",
    "DepthUpscaler",
    "Interrupted",
    "LayoutWarning",
    "ModelNotFoundError",
    "OutputError",
    "PlanError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "UpscaleConfig",
    "WeightError",
    "__version__",
    "new_layer_indices",
    "provenance",
    "upscale_checkpoint",
]

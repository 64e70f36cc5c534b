"""Architecture specs: how each model family stores a decoder layer, as data."""

from . import families as _families  # noqa: F401  (registers the built-in specs)
from . import fused as _fused  # noqa: F401  (Phi-3, GPT-2, GPT-NeoX)
from . import variants as _variants  # noqa: F401  (OLMo-2, OPT)
from . import moe as _moe  # noqa: F401  (Mixtral, Qwen2-MoE, Qwen3-MoE)
from .fused import GPT2Spec, GPTNeoXSpec, Phi3Spec
from .moe import MoESpec
from .discover import DiscoveredSpec, discover_spec
from .registry import get_module, get_spec, register_spec, registered_model_types
from .spec import ArchitectureWarning, ArchSpec, HeadShape, llama_like
from .variants import Olmo2Spec, OptSpec

__all__ = [
    "ArchSpec",
    "ArchitectureWarning",
    "DiscoveredSpec",
    "GPT2Spec",
    "GPTNeoXSpec",
    "HeadShape",
    "MoESpec",
    "Olmo2Spec",
    "OptSpec",
    "Phi3Spec",
    "discover_spec",
    "get_module",
    "get_spec",
    "llama_like",
    "register_spec",
    "registered_model_types",
]

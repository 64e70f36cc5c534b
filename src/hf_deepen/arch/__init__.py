"""Architecture specs: how each model family stores a decoder layer, as data."""

from . import families as _families  # noqa: F401  (registers the built-in specs)
from .registry import get_module, get_spec, register_spec, registered_model_types
from .spec import ArchSpec, HeadShape, llama_like

__all__ = ["ArchSpec", "HeadShape", "get_module", "get_spec", "llama_like", "register_spec", "registered_model_types"]

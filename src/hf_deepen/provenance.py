"""Reading the provenance an upscaled model carries in its config (``config.hf_deepen``)."""

from __future__ import annotations

from typing import Any

from .surgery import PROVENANCE_KEY


def provenance(config: Any) -> dict[str, Any] | None:
    """The ``hf_deepen`` record of a model's config (or a model), or ``None``."""
    config = getattr(config, "config", config)
    return getattr(config, PROVENANCE_KEY, None)


def new_layer_indices(config: Any, stage: int | None = None) -> list[int]:
    """Indices of the layers hf_deepen inserted: all stages by default, or one (``-1``: latest)."""
    rec = provenance(config)
    if not rec:
        return []
    if stage is None:
        return list(rec["new_layer_indices"])
    return list(rec["stages"][stage]["new_layer_indices"])

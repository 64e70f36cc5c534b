"""DepthPlan: a pure, JSON-able description of the deeper layer list.

A plan says, for every layer of the deeper model, where it comes from: a base layer kept as it is,
or a new layer made by a fusion method from one or two base layers. Nothing here touches a model;
the same plan drives the in-memory surgery and can drive a streaming writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerSource:
    """One layer of the deeper model.

    ``kind == "base"``: base layer ``sources[0]`` kept as is (``method`` is ``None``).
    ``kind == "new"``: a new layer made by ``method`` from base layers ``sources`` (one base layer
    for copies, the two neighbours ``(p, p + 1)`` for fusions).
    """

    kind: str
    sources: tuple[int, ...]
    method: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sources": list(self.sources), "method": self.method}


@dataclass(frozen=True)
class DepthPlan:
    base_num_layers: int
    layers: tuple[LayerSource, ...]
    layout: str
    #: why the positions were chosen (``layout="auto"``: the calibration scores and the rule); else None
    reason: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def new_layer_indices(self) -> list[int]:
        """Indices, in the deeper model, of the layers that are new."""
        return [i for i, s in enumerate(self.layers) if s.kind == "new"]

    def base_index_map(self) -> dict[int, int]:
        """Base layer index -> its index in the deeper model (first occurrence)."""
        out: dict[int, int] = {}
        for i, s in enumerate(self.layers):
            if s.kind == "base":
                out.setdefault(s.sources[0], i)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_num_layers": self.base_num_layers,
            "num_layers": self.num_layers,
            "layout": self.layout,
            "new_layer_indices": self.new_layer_indices,
            "layers": [s.to_dict() for s in self.layers],
            **({"reason": self.reason} if self.reason else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DepthPlan":
        layers = tuple(LayerSource(s["kind"], tuple(s["sources"]), s.get("method")) for s in d["layers"])
        return cls(base_num_layers=d["base_num_layers"], layers=layers, layout=d["layout"], reason=d.get("reason"))

    def describe(self) -> str:
        parts = []
        for i, s in enumerate(self.layers):
            if s.kind == "new":
                parts.append(f"{i}:{s.method}({','.join(map(str, s.sources))})")
        return f"{self.base_num_layers} -> {self.num_layers} layers ({self.layout}); new: " + " ".join(parts)

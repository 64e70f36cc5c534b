"""Families whose layer tensors are fused or transposed: Phi-3, GPT-2, GPT-NeoX.

Each spec splits its fused tensors into the canonical roles in :meth:`to_canonical` and re-fuses
them, bit for bit, in :meth:`from_canonical` (``from_canonical(to_canonical(s)[0]) == s``); the
alignment and fusion code only ever sees the canonical layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import UnsupportedArchitectureError
from .registry import register_spec
from .spec import ArchSpec, HeadShape

Tensor = torch.Tensor


def _split_rest(spec: ArchSpec, state: Mapping[str, Tensor], canon: dict[str, Tensor], used: set[str]) -> list[str]:
    """Copy the tensors not consumed by a split; return the names that are not residual either."""
    unknown = []
    for name, t in state.items():
        if name in used:
            continue
        canon[name] = t
        if not any(fnmatch.fnmatchcase(name, pat) for pat in spec.residual):
            unknown.append(name)
    return unknown


def _need(canon: Mapping[str, Tensor], roles: tuple[str, ...], spec: ArchSpec) -> bool:
    """True if all ``roles`` are present, False if none is; raise on a partial set."""
    have = [r for r in roles if r in canon]
    if have and len(have) != len(roles):
        raise UnsupportedArchitectureError(
            f"{spec.name}: cannot re-fuse {', '.join(roles)}: only {', '.join(have)} given"
        )
    return bool(have)


# ---- Phi-3 ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phi3Spec(ArchSpec):
    """Phi-3: ``qkv_proj`` = rows ``[q; k; v]`` and ``gate_up_proj`` = rows ``[gate; up]``.

    The split needs no config: ``o_proj`` has ``num_heads * head_dim`` columns, which gives the
    size of ``q``; ``k`` and ``v`` share the rest equally; ``gate_up_proj`` is two equal halves
    (``gate, up = chunk(2)`` in ``Phi3MLP``).
    """

    QKV = "self_attn.qkv_proj.weight"
    GATE_UP = "mlp.gate_up_proj.weight"

    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        canon: dict[str, Tensor] = {}
        used: set[str] = set()
        o_name = self.tensors["o"]
        if self.QKV in state and o_name in state:
            qkv = state[self.QKV]
            hq = state[o_name].shape[1]
            hkv, rem = divmod(qkv.shape[0] - hq, 2)
            if rem or hkv <= 0:
                raise UnsupportedArchitectureError(
                    f"{self.name}: {self.QKV} has {qkv.shape[0]} rows, which is not {hq} query rows plus two"
                    " equal K and V blocks"
                )
            canon["q"], canon["k"], canon["v"] = torch.split(qkv, [hq, hkv, hkv], dim=0)
            used.add(self.QKV)
        if self.GATE_UP in state:
            canon["gate"], canon["up"] = torch.chunk(state[self.GATE_UP], 2, dim=0)
            used.add(self.GATE_UP)
        for role in ("o", "down"):
            name = self.tensors[role]
            if name in state:
                canon[role] = state[name]
                used.add(name)
        return canon, _split_rest(self, state, canon, used)

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if _need(canon, ("q", "k", "v"), self):
            out[self.QKV] = torch.cat([canon["q"], canon["k"], canon["v"]], dim=0)
        if _need(canon, ("gate", "up"), self):
            out[self.GATE_UP] = torch.cat([canon["gate"], canon["up"]], dim=0)
        for k, v in canon.items():
            if k in ("q", "k", "v", "gate", "up"):
                continue
            out[self.tensors.get(k, k)] = v
        return out


register_spec(
    Phi3Spec(
        name="phi3",
        model_types=("phi3",),
        tensors={"o": "self_attn.o_proj.weight", "down": "mlp.down_proj.weight"},
        notes="fused qkv_proj and gate_up_proj, split and re-fused exactly",
    )
)


# ---- GPT-2 ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPT2Spec(ArchSpec):
    """GPT-2: ``Conv1D`` weights stored ``[in, out]`` (the transpose of ``nn.Linear``), fused
    ``attn.c_attn`` = columns ``[q | k | v]`` (with a fused bias), non-gated MLP ``c_fc`` /
    ``c_proj``, LayerNorms ``ln_1`` / ``ln_2`` with weight and bias.

    ``scale_attn_by_inverse_layer_idx=True`` scales each layer's attention by ``1 / (idx + 1)``:
    inserting layers changes the index, so the scaling, of every layer above, and a reloaded model
    would differ from the base model. Such configs are refused.
    """

    # canonical role -> Conv1D weight name (stored transposed); biases are stored as is
    CONV = {
        "o": "attn.c_proj.weight",
        "up": "mlp.c_fc.weight",
        "down": "mlp.c_proj.weight",
    }
    PLAIN = {"o_bias": "attn.c_proj.bias", "up_bias": "mlp.c_fc.bias", "down_bias": "mlp.c_proj.bias"}
    QKV_W = "attn.c_attn.weight"
    QKV_B = "attn.c_attn.bias"
    KV_HEADS_FIELD = None

    def head_shape(self, config: Any) -> HeadShape:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError(
                f"{config.model_type}: scale_attn_by_inverse_layer_idx=True ties each layer's attention scale to its"
                " index, so inserting layers changes every layer above and the model is not preserved: not supported"
            )
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedArchitectureError(f"{config.model_type}: layers with cross-attention are not supported")
        return super().head_shape(config)

    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        canon: dict[str, Tensor] = {}
        used: set[str] = set()
        if self.QKV_W in state:
            w = state[self.QKV_W]  # [hidden, 3 * hidden]
            canon["q"], canon["k"], canon["v"] = (t.T for t in torch.chunk(w, 3, dim=1))
            used.add(self.QKV_W)
        if self.QKV_B in state:
            canon["q_bias"], canon["k_bias"], canon["v_bias"] = torch.chunk(state[self.QKV_B], 3, dim=0)
            used.add(self.QKV_B)
        for role, name in self.CONV.items():
            if name in state:
                canon[role] = state[name].T
                used.add(name)
        for role, name in self.PLAIN.items():
            if name in state:
                canon[role] = state[name]
                used.add(name)
        return canon, _split_rest(self, state, canon, used)

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if _need(canon, ("q", "k", "v"), self):
            out[self.QKV_W] = torch.cat([canon["q"], canon["k"], canon["v"]], dim=0).T.contiguous()
        if _need(canon, ("q_bias", "k_bias", "v_bias"), self):
            out[self.QKV_B] = torch.cat([canon["q_bias"], canon["k_bias"], canon["v_bias"]], dim=0)
        skip = {"q", "k", "v", "q_bias", "k_bias", "v_bias"}
        for k, v in canon.items():
            if k in skip:
                continue
            if k in self.CONV:
                out[self.CONV[k]] = v.T.contiguous()
            else:
                out[self.PLAIN.get(k, k)] = v
        return out


register_spec(
    GPT2Spec(
        name="gpt2",
        model_types=("gpt2",),
        tensors={**GPT2Spec.CONV, **GPT2Spec.PLAIN},
        residual=("ln_1.*", "ln_2.*"),
        layers_path="transformer.h",
        per_layer_config=(),
        notes="Conv1D (transposed) weights, fused c_attn with bias",
    )
)


# ---- GPT-NeoX ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTNeoXSpec(ArchSpec):
    """GPT-NeoX / Pythia: ``attention.query_key_value`` interleaved *per head*: its rows are
    ``[q_0; k_0; v_0; q_1; k_1; v_1; ...]`` (``head_dim`` rows each), as
    ``qkv.view(..., num_heads, 3 * head_dim).chunk(3)`` reads them. Splitting needs ``head_dim``,
    so the spec is bound to the config (:meth:`bind`). Non-gated MLP ``dense_h_to_4h`` /
    ``dense_4h_to_h``, LayerNorms with bias; ``use_parallel_residual`` (``x + attn(ln1(x)) +
    mlp(ln2(x))``) or sequential, both function preserving with ``dense`` / ``dense_4h_to_h``
    (and biases) zeroed.
    """

    QKV_W = "attention.query_key_value.weight"
    QKV_B = "attention.query_key_value.bias"
    KV_HEADS_FIELD = None

    def bind(self, config: Any) -> ArchSpec:
        return dataclasses.replace(self, extra={**self.extra, "head_shape": self.head_shape(config)})

    def _shape(self) -> HeadShape:
        shape = self.extra.get("head_shape")
        if shape is None:
            raise UnsupportedArchitectureError(
                f"{self.name}: query_key_value is interleaved per head, so the spec needs the head count: use"
                " hf_deepen.arch.get_spec(model) or spec.bind(model.config)"
            )
        return shape

    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        canon: dict[str, Tensor] = {}
        used: set[str] = set()
        if self.QKV_W in state or self.QKV_B in state:
            s = self._shape()
            for name, suffix in ((self.QKV_W, ""), (self.QKV_B, "_bias")):
                if name not in state:
                    continue
                t = state[name]
                per_head = t.reshape(s.num_heads, 3, s.head_dim, *t.shape[1:])
                for i, role in enumerate(("q", "k", "v")):
                    canon[role + suffix] = per_head[:, i].reshape(s.num_heads * s.head_dim, *t.shape[1:])
                used.add(name)
        for role, name in self.tensors.items():
            if name in state:
                canon[role] = state[name]
                used.add(name)
        return canon, _split_rest(self, state, canon, used)

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, suffix in ((self.QKV_W, ""), (self.QKV_B, "_bias")):
            roles = tuple(r + suffix for r in ("q", "k", "v"))
            if _need(canon, roles, self):
                s = self._shape()
                q = canon[roles[0]]
                parts = [canon[r].reshape(s.num_heads, 1, s.head_dim, *q.shape[1:]) for r in roles]
                out[name] = torch.cat(parts, dim=1).reshape(3 * s.num_heads * s.head_dim, *q.shape[1:])
        skip = {"q", "k", "v", "q_bias", "k_bias", "v_bias"}
        for k, v in canon.items():
            if k not in skip:
                out[self.tensors.get(k, k)] = v
        return out

    def head_shape(self, config: Any) -> HeadShape:
        shape = super().head_shape(config)
        if shape.num_kv_heads != shape.num_heads:
            raise UnsupportedArchitectureError(
                f"{config.model_type}: query_key_value with GQA is not a GPT-NeoX layout"
            )
        return shape


register_spec(
    GPTNeoXSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        tensors={
            "o": "attention.dense.weight",
            "o_bias": "attention.dense.bias",
            "up": "mlp.dense_h_to_4h.weight",
            "up_bias": "mlp.dense_h_to_4h.bias",
            "down": "mlp.dense_4h_to_h.weight",
            "down_bias": "mlp.dense_4h_to_h.bias",
        },
        residual=("input_layernorm.*", "post_attention_layernorm.*"),
        layers_path="gpt_neox.layers",
        per_layer_config=(),
        notes="query_key_value interleaved per head (bound to the config), parallel residual",
    )
)

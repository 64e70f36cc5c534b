"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE.

A sparse MoE block is a router ``mlp.gate.weight`` ``[E, hidden]`` (softmax, top-k) and ``E``
experts, each a gated MLP. transformers 5 keeps the experts of one layer as two 3-D parameters,
``mlp.experts.gate_up_proj`` ``[E, 2I, hidden]`` (rows ``[gate; up]`` of each expert) and
``mlp.experts.down_proj`` ``[E, hidden, I]``; checkpoints store one tensor per expert
(``mlp.experts.{e}.gate_proj.weight``, or Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``),
which transformers merges on load and splits again on save. :class:`MoESpec` reads both layouts
into the same canonical roles (``router``, ``experts_gate``, ``experts_up``, ``experts_down``; see
``arch/spec.py``) and writes a layer back in the layout it was read from
(:meth:`MoESpec.for_state`): the model's own in memory, the checkpoint's when streaming.

Permutation structure. Experts are units: permuting them (with the router rows, so that each
token still reaches the same expert with the same weight) is a symmetry of the block, and so is
permuting the neurons inside one expert. Qwen2-MoE's shared expert is an ordinary MLP that every
token goes through (it takes the dense ``gate`` / ``up`` / ``down`` roles, with its own neuron
permutation), scaled by ``sigmoid(shared_expert_gate(x))``: that gate reads the residual stream and
is never permuted.

Function preservation: a new layer's ``experts_down`` and (shared or dense) ``down`` are zeroed
with ``o``, so the block adds zero whatever the router picks; the router is left as fused, so
routing still trains.

Dense and sparse layers. Qwen2/3-MoE layer ``i`` is sparse iff ``i not in mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0`` (and ``num_experts > 0``); Mixtral is sparse throughout. A
new layer takes its lower neighbour's type; :meth:`MoESpec.update_layer_config` rewrites
``mlp_only_layers`` (and ``decoder_sparse_step`` to 1 when the new pattern is not a multiple of the
old step) so that the saved config builds exactly the new layer list: a mismatch would make
``from_pretrained`` re-initialise the mismatched layers with only a warning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import PlanError, UnsupportedArchitectureError
from .families import _PRE_NORMS, _QK_HEAD_NORMS
from .registry import register_spec
from .spec import EXPERT_ROLES, ArchSpec, HeadShape, llama_like

Tensor = torch.Tensor

#: the dense-MLP roles, which a sparse layer's shared expert takes
MLP_ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")
#: layer_pattern values: every layer sparse, or Qwen's mlp_only_layers / decoder_sparse_step rule
ALL_SPARSE, QWEN_PATTERN = "all", "mlp_only_layers"


@dataclass(frozen=True)
class MoESpec(ArchSpec):
    """An ArchSpec whose layers may hold a sparse MoE block.

    Parameters (beyond :class:`ArchSpec`; ``tensors`` names the attention and the *dense* MLP)
    ----------
    experts:
        In-memory names: ``"gate_up"`` (``[E, 2I, hidden]``, rows ``[gate; up]`` per expert),
        ``"down"`` (``[E, hidden, I]``) and ``"router"`` (``[E, hidden]``).
    checkpoint_experts:
        On-disk names, ``{e}`` standing for the expert index: ``"experts_gate"``, ``"experts_up"``,
        ``"experts_down"`` (one ``[I, hidden]`` / ``[hidden, I]`` tensor per expert) and
        ``"router"``.
    shared_expert:
        Dense role -> name of the shared expert's tensor in a sparse layer (empty: none).
    layer_pattern:
        ``"all"`` (every layer sparse) or ``"mlp_only_layers"`` (Qwen's rule, see the module doc).
    layout:
        ``"model"`` or ``"checkpoint"``: the layout :meth:`from_canonical` writes (set by
        :meth:`for_state`).
    """

    experts: Mapping[str, str] = field(default_factory=dict)
    checkpoint_experts: Mapping[str, str] = field(default_factory=dict)
    shared_expert: Mapping[str, str] = field(default_factory=dict)
    layer_pattern: str = ALL_SPARSE
    layout: str = "model"

    # ---- layouts ------------------------------------------------------------------------------
    def _expert_re(self, role: str) -> re.Pattern:
        return re.compile(re.escape(self.checkpoint_experts[role]).replace(re.escape("{e}"), r"(\d+)"))

    def for_state(self, state: Mapping[str, Tensor]) -> ArchSpec:
        pat = self._expert_re("experts_down")
        on_disk = any(pat.fullmatch(k) for k in state)
        return dataclasses.replace(self, layout="checkpoint" if on_disk else "model")

    def _names(self, sparse: bool) -> dict[str, str]:
        """Role -> tensor name for attention and the dense roles of a sparse or dense layer."""
        names = {r: n for r, n in self.tensors.items() if r not in MLP_ROLES}
        if sparse:
            names.update(self.shared_expert)
        else:
            names.update({r: n for r, n in self.tensors.items() if r in MLP_ROLES})
        return names

    def _router_name(self) -> str:
        return self.experts["router"] if self.layout == "model" else self.checkpoint_experts["router"]

    def _read_experts(self, state: Mapping[str, Tensor], canon: dict[str, Tensor], used: set[str]) -> None:
        if self.layout == "model":
            gu, down = self.experts["gate_up"], self.experts["down"]
            if gu in state:
                canon["experts_gate"], canon["experts_up"] = torch.chunk(state[gu], 2, dim=1)
                used.add(gu)
            if down in state:
                canon["experts_down"] = state[down]
                used.add(down)
        else:
            for role in ("experts_gate", "experts_up", "experts_down"):
                pat = self._expert_re(role)
                found = {int(m.group(1)): k for k in state if (m := pat.fullmatch(k))}
                if not found:
                    continue
                if sorted(found) != list(range(len(found))):
                    raise UnsupportedArchitectureError(
                        f"{self.name}: experts {sorted(found)} of {self.checkpoint_experts[role]!r} are not 0..E-1"
                    )
                canon[role] = torch.stack([state[found[e]] for e in range(len(found))])
                used.update(found.values())
        router = self._router_name()
        if router in state:
            canon["router"] = state[router]
            used.add(router)

    def to_canonical(self, state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        canon: dict[str, Tensor] = {}
        used: set[str] = set()
        self._read_experts(state, canon, used)
        by_name = {n: r for r, n in self._names(sparse=bool(canon)).items()}
        unknown = []
        for name, t in state.items():
            if name in used:
                continue
            if name in by_name:
                canon[by_name[name]] = t
                continue
            canon[name] = t
            if not any(fnmatch.fnmatchcase(name, pat) for pat in self.residual):
                unknown.append(name)
        return canon, unknown

    def from_canonical(self, canon: Mapping[str, Tensor]) -> dict[str, Tensor]:
        sparse = any(r in canon for r in EXPERT_ROLES)
        out: dict[str, Tensor] = {}
        if sparse:
            have = [r for r in EXPERT_ROLES if r in canon]
            if len(have) != len(EXPERT_ROLES):
                raise UnsupportedArchitectureError(f"{self.name}: cannot write a MoE block from only {', '.join(have)}")
            if self.layout == "model":
                out[self.experts["gate_up"]] = torch.cat([canon["experts_gate"], canon["experts_up"]], dim=1)
                out[self.experts["down"]] = canon["experts_down"]
            else:
                for role in ("experts_gate", "experts_up", "experts_down"):
                    for e, t in enumerate(canon[role]):
                        # clone: one tensor per expert, not views sharing storage (safetensors refuses those)
                        out[self.checkpoint_experts[role].format(e=e)] = t.clone()
            out[self._router_name()] = canon["router"]
        names = self._names(sparse)
        for k, v in canon.items():
            if k not in EXPERT_ROLES:
                out[names.get(k, k)] = v
        return out

    # ---- shapes -------------------------------------------------------------------------------
    def check_shapes(self, canon: Mapping[str, Tensor], shape: HeadShape, where: str) -> None:
        if not any(r in canon for r in EXPERT_ROLES):
            return super().check_shapes(canon, shape, where)  # a dense layer
        missing = [r for r in EXPERT_ROLES if r not in canon]
        if missing:
            raise UnsupportedArchitectureError(f"{where}: the MoE block has no tensor for role(s) {', '.join(missing)}")
        g, u, d, router = (canon[r] for r in ("experts_gate", "experts_up", "experts_down", "router"))
        e, i, h = g.shape
        if u.shape != g.shape or d.shape != (e, h, i) or router.shape != (e, h):
            raise UnsupportedArchitectureError(
                f"{where}: expert tensors disagree: gate {tuple(g.shape)}, up {tuple(u.shape)}, down {tuple(d.shape)},"
                f" router {tuple(router.shape)} (expected [E, I, H], [E, I, H], [E, H, I], [E, H])"
            )
        # the attention checks (and the shared expert's, if any) of a dense layer; without a shared
        # expert, expert 0 stands in for the MLP so the same rules apply
        dense = {k: v for k, v in canon.items() if k not in EXPERT_ROLES}
        if "down" not in dense:
            dense.update(gate=g[0], up=u[0], down=d[0])
        super().check_shapes(dense, shape, where)

    # ---- dense / sparse layers ------------------------------------------------------------------
    def sparse_layers(self, config: Any) -> list[bool]:
        """For each layer of ``config``, whether it holds a sparse MoE block (the modeling rule)."""
        n = config.num_hidden_layers
        if self.layer_pattern == ALL_SPARSE:
            return [True] * n
        only = set(getattr(config, "mlp_only_layers", None) or ())
        step = getattr(config, "decoder_sparse_step", None) or 1
        experts = getattr(config, "num_experts", 0) or 0
        return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(n)]

    def check_plan(self, plan: Any, config: Any) -> None:
        """Refuse to fuse a dense layer with a sparse one: their MLP tensors cannot be aligned or averaged."""
        sparse = self.sparse_layers(config)
        kind = {True: "sparse MoE", False: "dense MLP"}
        for i, s in enumerate(plan.layers):
            if s.kind != "new" or len(s.sources) < 2:
                continue
            kinds = {sparse[j] for j in s.sources}
            if len(kinds) > 1:
                ok = [p for p in range(len(sparse) - 1) if sparse[p] == sparse[p + 1]]
                raise PlanError(
                    f"{config.model_type}: new layer {i} would fuse layers {list(s.sources)}, which are "
                    f"{' and '.join(kind[sparse[j]] for j in s.sources)} (mlp_only_layers="
                    f"{getattr(config, 'mlp_only_layers', None)}, decoder_sparse_step="
                    f"{getattr(config, 'decoder_sparse_step', None)}): a dense and a sparse layer cannot be aligned or"
                    f" averaged. Insert only between two layers of the same kind (positions= from {ok}), or use"
                    " method='copy' (a copy takes the type of the layer below)"
                )

    def update_layer_config(self, config: Any, sources: list[int]) -> tuple[str, ...]:
        """Rewrite ``mlp_only_layers`` / ``decoder_sparse_step`` for the new layer list.

        Layer ``i`` of the new model takes the type of base layer ``sources[i]``. The step is kept
        when every new sparse layer still satisfies ``(i + 1) % step == 0`` (the dense layers the
        step would make sparse are listed in ``mlp_only_layers``); otherwise the pattern is not
        expressible with that step, and it is rewritten as ``decoder_sparse_step = 1`` with an
        explicit ``mlp_only_layers`` list of every dense layer.
        """
        if self.layer_pattern != QWEN_PATTERN or not (getattr(config, "num_experts", 0) or 0) > 0:
            return ()
        base = self.sparse_layers(config)
        new = [base[j] for j in sources]
        step = getattr(config, "decoder_sparse_step", None) or 1
        if any(sp and (i + 1) % step for i, sp in enumerate(new)):
            step = 1
        config.decoder_sparse_step = step
        config.mlp_only_layers = [i for i, sp in enumerate(new) if not sp and (i + 1) % step == 0]
        return ("mlp_only_layers", "decoder_sparse_step")


def _moe_spec(name: str, model_types: tuple[str, ...], **kw: Any) -> MoESpec:
    base = llama_like(name, model_types, residual=kw.pop("residual", _PRE_NORMS))
    return MoESpec(**{**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **kw})


_QWEN_EXPERTS = {"gate_up": "mlp.experts.gate_up_proj", "down": "mlp.experts.down_proj", "router": "mlp.gate.weight"}
_QWEN_CHECKPOINT = {
    "experts_gate": "mlp.experts.{e}.gate_proj.weight",
    "experts_up": "mlp.experts.{e}.up_proj.weight",
    "experts_down": "mlp.experts.{e}.down_proj.weight",
    "router": "mlp.gate.weight",
}

# Mixtral: every layer sparse; on disk the block is "block_sparse_moe" and the experts' projections
# are w1 (gate), w3 (up), w2 (down). One global sliding_window, no per-layer config.
register_spec(
    _moe_spec(
        "mixtral",
        ("mixtral",),
        experts=_QWEN_EXPERTS,
        checkpoint_experts={
            "experts_gate": "block_sparse_moe.experts.{e}.w1.weight",
            "experts_up": "block_sparse_moe.experts.{e}.w3.weight",
            "experts_down": "block_sparse_moe.experts.{e}.w2.weight",
            "router": "block_sparse_moe.gate.weight",
        },
        layer_pattern=ALL_SPARSE,
        notes="sparse MoE in every layer; experts aligned as units with nested neuron plans",
    )
)

# Qwen2-MoE: q/k/v biases, a shared expert (a plain MLP, gated by sigmoid(shared_expert_gate(x)),
# which reads the residual stream), dense layers by mlp_only_layers / decoder_sparse_step, and
# layer_types (sliding window) updated by the generic per-layer rule.
register_spec(
    _moe_spec(
        "qwen2_moe",
        ("qwen2_moe",),
        residual=_PRE_NORMS + ("mlp.shared_expert_gate.weight",),
        experts=_QWEN_EXPERTS,
        checkpoint_experts=_QWEN_CHECKPOINT,
        shared_expert={
            "gate": "mlp.shared_expert.gate_proj.weight",
            "up": "mlp.shared_expert.up_proj.weight",
            "down": "mlp.shared_expert.down_proj.weight",
        },
        layer_pattern=QWEN_PATTERN,
        notes="shared expert aligned as an ordinary MLP; mlp_only_layers rewritten at the insertion points",
    )
)

# Qwen3-MoE: per-head q_norm / k_norm (as Qwen3), no shared expert, dense layers as Qwen2-MoE.
register_spec(
    _moe_spec(
        "qwen3_moe",
        ("qwen3_moe",),
        residual=_PRE_NORMS + _QK_HEAD_NORMS,
        experts=_QWEN_EXPERTS,
        checkpoint_experts=_QWEN_CHECKPOINT,
        layer_pattern=QWEN_PATTERN,
        notes="experts aligned as units with nested neuron plans; mlp_only_layers rewritten at the insertion points",
    )
)

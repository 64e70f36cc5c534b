"""OT alignment of attention heads, MLP neurons and MoE experts between two decoder layers."""

from .alignment import LayerAlignment, align_layers, neuron_features
from .experts import MoELayerAlignment, align_experts, align_layer_pair
from .solvers import Plan, solve, solve_exact, solve_sinkhorn, sq_dists

__all__ = [
    "LayerAlignment",
    "MoELayerAlignment",
    "Plan",
    "align_experts",
    "align_layer_pair",
    "align_layers",
    "neuron_features",
    "solve",
    "solve_exact",
    "solve_sinkhorn",
    "sq_dists",
]

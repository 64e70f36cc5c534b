"""OT alignment of attention heads and MLP neurons between two decoder layers."""

from .alignment import LayerAlignment, align_layers, neuron_features
from .solvers import Plan, solve, solve_exact, solve_sinkhorn, sq_dists

__all__ = ["LayerAlignment", "Plan", "align_layers", "neuron_features", "solve", "solve_exact", "solve_sinkhorn", "sq_dists"]

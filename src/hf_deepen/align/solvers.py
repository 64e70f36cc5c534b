r"""OT solvers between two equal-size uniform clouds of units (heads or neurons).

Problem. Given a cost matrix :math:`M \in \mathbb{R}^{n \times n}`, :math:`M_{ij}` the squared
distance between unit *i* of the lower layer and unit *j* of the upper layer, find a plan

.. math:: P^\star = \arg\min_{P \in U(a, b)} \langle P, M \rangle (+ \varepsilon H(P)),\qquad a = b = \mathbf{1}/n.

* ``solve_exact``: without entropy the optimum is a permutation (Birkhoff); it is found as a linear
  assignment with SciPy's ``linear_sum_assignment`` (the Jonker-Volgenant algorithm, exact), which
  is what POT's ``emd`` would return here, faster.
* ``solve_sinkhorn``: entropic OT with POT's log-domain Sinkhorn (``ot.sinkhorn(...,
  method="sinkhorn_log")``), which cannot underflow, on the cost divided by its mean so that
  ``reg`` is relative and means the same on every model and dtype. (The reference script runs the
  plain-domain algorithm at ``reg=0.06`` on raw costs; its plan underflows to ~0 on real weights.)

Both return a :class:`Plan` whose ``matrix`` has the marginals ``1/n``; apply it as a barycentric
map, ``n * P``, whose columns sum to one, so aligned weights keep their scale.

Example
-------
>>> import torch
>>> M = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> solve_exact(M).permutation.tolist()
[1, 0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor


@dataclass
class Plan:
    """A transport plan between ``n`` lower units (rows) and ``n`` upper units (columns).

    Attributes
    ----------
    matrix:
        ``[n, n]`` float64, marginals ``1/n`` (exactly for the exact solver).
    cost:
        Mean cost per unit under the plan, ``<P, M>``.
    identity_cost:
        Mean cost of leaving units where they are, ``trace(M) / n``.
    marginal_error:
        ``max |n * P 1 - 1|, |n * P^T 1 - 1|``: 0 for a permutation; checked for Sinkhorn.
    sharpness:
        Mean over upper units of the largest weight of the barycentric map (1 for a permutation,
        ``1/n`` for the uniform plan).
    """

    matrix: Tensor
    cost: float
    identity_cost: float
    marginal_error: float
    sharpness: float
    solver: str

    @property
    def n(self) -> int:
        return self.matrix.shape[0]

    @property
    def barycentric(self) -> Tensor:
        """``n * P``: column ``j`` holds the weights of lower units that make aligned unit ``j``."""
        return self.matrix * self.n

    @property
    def permutation(self) -> Tensor:
        """For each upper unit ``j``, the lower unit with the most mass (exact for exact plans)."""
        return self.matrix.argmax(dim=0)


def _finish(P: Tensor, M: Tensor, solver: str) -> Plan:
    n = P.shape[0]
    Mf = M.to(torch.float64)
    rows = (P.sum(1) * n - 1).abs().max().item()
    cols = (P.sum(0) * n - 1).abs().max().item()
    return Plan(
        matrix=P,
        cost=float((P * Mf).sum()),
        identity_cost=float(torch.diagonal(Mf).mean()),
        marginal_error=max(rows, cols),
        sharpness=float((P * n).max(dim=0).values.mean()),
        solver=solver,
    )


def solve_exact(M: Tensor) -> Plan:
    """Exact OT between uniform clouds: the optimal assignment, as a plan with entries 0 or 1/n."""
    n = M.shape[0]
    cost = M.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(cost)
    P = torch.zeros(n, n, dtype=torch.float64)
    P[torch.from_numpy(rows), torch.from_numpy(cols)] = 1.0 / n
    return _finish(P, M.detach().cpu(), "exact")


def solve_sinkhorn(M: Tensor, reg: float = 0.01, max_iter: int = 3000, tol: float = 1e-4) -> Plan:
    """Entropic OT (log-domain Sinkhorn, POT) on ``M / mean(M)`` with regularisation ``reg``.

    Runs in float32 on the cost's device (POT's torch backend; a GPU when the cost is there);
    stops when the relative marginal error is about ``tol`` or after ``max_iter`` iterations. The
    resulting marginals are checked by the caller (``Plan.marginal_error``).
    """
    import ot  # POT; imported here so that the exact path does not pay for it

    n = M.shape[0]
    if n == 1:
        return _finish(torch.ones(1, 1, dtype=torch.float64), M.detach().cpu(), "sinkhorn")
    Md = M.detach().to(torch.float64)
    scale = Md.mean()
    Mn = (Md / scale if scale > 0 else Md).to(torch.float32)
    a = torch.full((n,), 1.0 / n, dtype=torch.float32, device=Mn.device)
    # POT stops on the L2 norm of the absolute marginal gap (entries 1/n): bound it by tol / n
    P = ot.sinkhorn(a, a, Mn, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=tol / n, warn=False)
    return _finish(P.to("cpu", torch.float64), Md.cpu(), "sinkhorn")


def solve(M: Tensor, solver: str = "exact", reg: float = 0.01, max_iter: int = 3000) -> Plan:
    """Dispatch on ``solver`` (``"exact"`` or ``"sinkhorn"``)."""
    if solver == "exact":
        return solve_exact(M)
    if solver == "sinkhorn":
        return solve_sinkhorn(M, reg=reg, max_iter=max_iter)
    raise ValueError(f"unknown solver {solver!r}")


def sq_dists(A: Tensor, B: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``A`` and ``B``, in float64."""
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return d.clamp_min_(0.0)



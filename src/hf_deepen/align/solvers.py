r"""OT solvers between two equal-size uniform clouds of units (heads or neurons).

Problem. Given a cost matrix :math:`M \in \mathbb{R}^{n \times n}`, :math:`M_{ij}` the squared
distance between unit *i* of the lower layer and unit *j* of the upper layer, find a plan

.. math:: P^\star = \arg\min_{P \in U(a, b)} \langle P, M \rangle (+ \varepsilon H(P)),\qquad a = b = \mathbf{1}/n.

* ``solve_exact``: without entropy the optimum is a permutation (Birkhoff); it is found as a linear
  assignment with SciPy's ``linear_sum_assignment`` (the Jonker-Volgenant algorithm, exact), which
  is what POT's ``emd`` would return here, faster. Large problems (``n >= SPARSE_MIN_N``) are
  solved on a sparse candidate graph with SciPy's LAPJVsp and *certified* optimal on the full
  matrix by LP duality, with the dense solver as the fallback (:func:`_assignment_certified`).
* ``solve_sinkhorn``: entropic OT with POT's Sinkhorn on the cost divided by its mean (so that
  ``reg`` is relative and means the same on every model and dtype) and shifted by its minimum:
  the fast kernel domain when ``exp(-M / reg)`` cannot underflow, else the log domain
  (``method="sinkhorn_log"``), which never underflows. (The reference script runs the
  plain-domain algorithm at ``reg=0.06`` on raw costs; its plan underflows to ~0 on real weights.)
  Large problems (Llama-3.1-8B's 14,336 neurons) run the same two algorithms by hand, in place
  in the cost matrix and over row blocks (:func:`_sinkhorn_inplace`): POT's allocate several
  ``n x n`` temporaries, 1.6 GB each at that size, and memory is what bounds a streaming upscale.

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

import math
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor


#: kernel-domain Sinkhorn is used when ``(max - min) / reg`` of the normalised, min-shifted cost is
#: below this: ``exp(-600) = 2.6e-261`` and its inverse stay inside float64's range, so neither the
#: kernel nor the scalings under- or overflow; above it the log domain is used (slower, safe)
KERNEL_MAX_RANGE = 600.0

#: problems with more plan entries than this (n > 5,792) run in place (:func:`_sinkhorn_inplace`);
#: smaller ones through POT
INPLACE_MIN_ENTRIES = 2**25

#: rows per block in the in-place Sinkhorn, the certificate and dense plan application, at most,
#: and bytes per float64 block: the temporaries stay ~32 MB whatever ``n`` (292 rows at 14,336)
_BLOCK = 1024
_BLOCK_BYTES = 1 << 25


def _rows(n: int) -> int:
    """Rows per block for an ``[*, n]`` float64 temporary."""
    return max(1, min(_BLOCK, _BLOCK_BYTES // (8 * n)))

#: exact problems this large are solved on a sparse candidate graph and certified
#: (:func:`_assignment_certified`); smaller ones by the dense solver directly
SPARSE_MIN_N = 4096
#: candidate edges: the ``SPARSE_K`` cheapest per row and per column
SPARSE_K = 32
#: certification rounds (each adds the violated edges) before falling back to the dense solver
SPARSE_ROUNDS = 8
#: Bellman-Ford passes for the dual potentials before falling back (typically 100-250 at n = 14,336;
#: the cap bounds a pathological case at seconds, and the fallback is exact anyway)
SPARSE_MAX_PASSES = 2000


@dataclass
class Plan:
    """A transport plan between ``n`` lower units (rows) and ``n`` upper units (columns).

    An exact plan is stored as its assignment (``n`` indices), not as an ``n x n`` matrix: at
    Llama-3.1-8B's 14,336 neurons the dense matrix would be 1.6 GB of zeros. ``matrix`` builds
    the dense form on demand.

    Attributes
    ----------
    cost:
        Mean cost per unit under the plan, ``<P, M>``.
    identity_cost:
        Mean cost of leaving units where they are, ``trace(M) / n``.
    marginal_error:
        ``max |n * P 1 - 1|, |n * P^T 1 - 1|``: 0 for a permutation; checked for Sinkhorn.
    sharpness:
        Mean over upper units of the largest weight of the barycentric map (1 for a permutation,
        ``1/n`` for the uniform plan).
    solver:
        ``"exact"``, ``"sinkhorn"`` (kernel domain) or ``"sinkhorn_log"``.
    dense:
        ``[n, n]`` plan with marginals ``1/n`` (Sinkhorn), else ``None``: float64, or float32 for a
        problem solved in place (above :data:`INPLACE_MIN_ENTRIES`; half the memory while the
        layer is fused: an entry is ~``1/n**2`` and keeps 7 significant digits, and the
        diagnostics are computed in float64 before rounding).
    assignment:
        ``[n]`` int64: upper unit ``j`` receives lower unit ``assignment[j]`` (exact), else ``None``.
    """

    cost: float
    identity_cost: float
    marginal_error: float
    sharpness: float
    solver: str
    dense: Tensor | None = None
    assignment: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.assignment) if self.assignment is not None else self.dense.shape[0]

    @property
    def is_permutation(self) -> bool:
        return self.assignment is not None

    @property
    def matrix(self) -> Tensor:
        """``[n, n]``, marginals ``1/n`` (exactly for the exact solver); the dtype of ``dense``, float64
        for an exact plan."""
        if self.dense is not None:
            return self.dense
        n = self.n
        P = torch.zeros(n, n, dtype=torch.float64)
        P[self.assignment, torch.arange(n)] = 1.0 / n
        return P

    @property
    def barycentric(self) -> Tensor:
        """``n * P``: column ``j`` holds the weights of lower units that make aligned unit ``j``."""
        return self.matrix * self.n

    @property
    def permutation(self) -> Tensor:
        """For each upper unit ``j``, the lower unit with the most mass (exact for exact plans)."""
        return self.assignment if self.assignment is not None else self.dense.argmax(dim=0)

    def move(self, x: Tensor, dim: int = 0) -> Tensor:
        """The barycentric map applied to ``x``, whose ``dim`` indexes the lower units: float64,
        the same shape, ``dim`` now indexing the upper units (``(n P)^T x`` for ``dim=0``).

        An exact plan is an index gather (exact, free). A dense plan is a matmul: in float64, or,
        when ``x`` is 16-bit, in float32 over row blocks of the plan (the precision rule of
        :func:`pairwise_sq_dists`: a float32 sum of 14,336 products is accurate to ~1e-5
        relative, far below bf16's 4e-3; twice as fast, and no float64 copy of ``x``).
        """
        if self.assignment is not None:  # gather first, then widen: one float64 copy, not two
            return x.detach().index_select(dim, self.assignment.to(x.device)).to(torch.float64)
        P = self.dense  # computed where the plan is (the GPU, if Sinkhorn ran there), returned to x's device
        n = self.n
        x = x.detach()
        last = dim in (-1, x.dim() - 1) and x.dim() > 1
        # units first (x2 [n, m]: out = P^T x2) or units last (x2 [m, n]: out = x2 P); either way the
        # result comes out contiguous in x's own layout, so no caller has to copy it again
        x2 = (x.reshape(-1, n) if last else x.movedim(dim, 0).reshape(n, -1)).to(P.device)
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else torch.float64
        acc = torch.zeros(x2.shape, dtype=cdt, device=P.device)
        step = _rows(n)
        for i in range(0, n, step):  # over row blocks of the plan: no full-size converted copy
            Pb = P[i : i + step].to(cdt)
            if last:
                acc.addmm_(x2[:, i : i + step].to(cdt), Pb)
            else:
                acc.addmm_(Pb.T, x2[i : i + step].to(cdt))
        out = acc.to(x.device, torch.float64)
        del acc
        out.mul_(n)
        if last:
            return out.reshape(x.shape)
        return out.reshape(x.movedim(dim, 0).shape).movedim(0, dim)


def _finish(P: Tensor, M: Tensor, solver: str) -> Plan:
    """Wrap a dense plan with its diagnostics (no ``n x n`` temporaries: 1.6 GB each at 8B)."""
    n = P.shape[0]
    Mf = M.to(torch.float64)
    rows = (P.sum(1) * n - 1).abs().max().item()
    cols = (P.sum(0) * n - 1).abs().max().item()
    return Plan(
        cost=float(P.reshape(-1) @ Mf.reshape(-1)),
        identity_cost=float(torch.diagonal(Mf).mean()),
        marginal_error=max(rows, cols),
        sharpness=float(P.max(dim=0).values.mean() * n),
        solver=solver,
        dense=P,
    )


def _duals(C: Tensor, sigma: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, Tensor] | None:
    """Dual potentials ``u, v`` (``u_i + v_j <= C_ij`` on the edges ``(r, c)``, equality on the
    assignment ``sigma``: row ``i`` -> column ``sigma[i]``), or None if ``sigma`` is not optimal there.

    Node ``p_k`` stands for the matched pair ``(k, sigma[k])``; an edge ``(i, j)`` gives the arc
    ``p_i -> p_k`` (``j = sigma[k]``) of weight ``C_ij - C_i,sigma(i)``: moving row ``i`` onto ``j``.
    An optimal ``sigma`` has no negative cycle, and the shortest distances ``d`` from a virtual source
    joined to every node (Bellman-Ford, vectorised: all arcs relaxed per pass) give ``v_sigma(k) = d_k``,
    ``u_i = C_i,sigma(i) - v_sigma(i)``. None also after :data:`SPARSE_MAX_PASSES` passes.
    """
    n = C.shape[0]
    inv = torch.empty(n, dtype=torch.int64)
    inv[sigma] = torch.arange(n)
    base = C[torch.arange(n), sigma]
    dst, w = inv[c], C[r, c] - base[r]
    d = torch.zeros(n, dtype=torch.float64)
    for _ in range(min(n + 1, SPARSE_MAX_PASSES)):
        nd = d.clone().scatter_reduce_(0, dst, d[r] + w, reduce="amin")
        if torch.equal(nd, d):
            v = torch.empty(n, dtype=torch.float64)
            v[sigma] = d
            return base - v[sigma], v
        d = nd
    return None  # a negative cycle (sigma can be improved on these edges), or the pass cap


def _assignment_certified(C: Tensor) -> Tensor | None:
    """The optimal assignment of the dense cost ``C`` (float64, CPU), via a sparse candidate graph.

    1. Candidates: the :data:`SPARSE_K` cheapest edges of every row and of every column.
    2. Solve the assignment on them with SciPy's LAPJVsp (``min_weight_full_bipartite_matching``).
    3. Certify on the *full* matrix: dual potentials of the sparse optimum (:func:`_duals`) that are
       feasible for every entry, ``C_ij - u_i - v_j >= 0``, prove it optimal for the dense problem
       (LP duality), up to a rounding tolerance of ``2^-40 max |C|`` per entry. Violated entries join
       the candidates and the sparse problem is solved again.

    Returns the assignment (``sigma[i]``: the column of row ``i``), or None when there is no full
    matching on the candidates or no certificate after :data:`SPARSE_ROUNDS` rounds (the caller
    then runs the dense solver). On Llama-8B-shaped random layers it is 4-5 rounds, ~5x faster than
    the dense solver at n = 8,192 (``benchmarks/README.md``, "Scale").
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n = C.shape[0]
    k = min(SPARSE_K, n)
    rows = torch.topk(C, k, dim=1, largest=False).indices
    # per column in blocks of columns (a top-k along dim 0 of the whole matrix may copy it)
    step = _rows(n)  # rows (or columns) per block: bounds every temporary below
    cols = torch.cat([torch.topk(C[:, j : j + step], k, dim=0, largest=False).indices for j in range(0, n, step)], dim=1)
    r = torch.cat([torch.arange(n).repeat_interleave(k), cols.reshape(-1)])
    c = torch.cat([rows.reshape(-1), torch.arange(n).repeat(k)])
    key = torch.unique(r * n + c)
    shift = float(C.min()) - 1.0  # LAPJVsp reads a zero weight as a missing edge: every weight >= 1
    tol = 2.0**-40 * max(abs(float(C.max())), abs(float(C.min())))  # (C.abs() would copy the matrix)
    buf = torch.empty(step, n, dtype=torch.float64)  # reduced costs of one block of rows
    for _ in range(SPARSE_ROUNDS):
        r, c = key // n, key % n
        graph = csr_array(((C[r, c] - shift).numpy(), (r.numpy(), c.numpy())), shape=(n, n))
        try:
            _, col = min_weight_full_bipartite_matching(graph)
        except ValueError:  # no full matching on the candidates
            return None
        sigma = torch.from_numpy(col).to(torch.int64)
        uv = _duals(C, sigma, r, c)
        if uv is None:
            return None
        u, v = uv
        bad = []
        for i in range(0, n, step):
            red = torch.sub(C[i : i + step], u[i : i + step, None], out=buf[: min(step, n - i)]).sub_(v)
            if float(red.min()) < -tol:
                hit = (red < -tol).nonzero()
                bad.append((hit[:, 0] + i) * n + hit[:, 1])
        if not bad:
            return sigma
        key = torch.unique(torch.cat([key, *bad]))
    return None


def solve_exact(M: Tensor) -> Plan:
    """Exact OT between uniform clouds: the optimal assignment (entries 0 or 1/n), stored as indices.

    SciPy solves in float64 whatever it is given (it copies other dtypes), so the cost matrix is
    built in float64 upstream and passed without a copy. From :data:`SPARSE_MIN_N` units the
    assignment is found on a sparse candidate graph and certified optimal on the whole matrix
    (:func:`_assignment_certified`), else (or if that fails) by the dense solver.
    """
    n = M.shape[0]
    Mc = M.detach().to("cpu", torch.float64)
    sigma = _assignment_certified(Mc) if n >= SPARSE_MIN_N else None
    if sigma is not None:
        rows_t, cols_t = torch.arange(n), sigma
    else:
        rows, cols = linear_sum_assignment(Mc.numpy())
        rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
    assignment = torch.empty(n, dtype=torch.int64)
    assignment[cols_t] = rows_t
    return Plan(
        cost=float(Mc[rows_t, cols_t].sum()) / n,
        identity_cost=float(torch.diagonal(Mc).mean()),
        marginal_error=0.0,
        sharpness=1.0,
        solver="exact",
        assignment=assignment,
    )


def _kernel_scalings(K: Tensor, max_iter: int, stop: float) -> tuple[Tensor, Tensor]:
    """Kernel-domain Sinkhorn scalings ``u, v`` for ``K`` ``[..., n, n]`` and uniform marginals ``1/n``,
    in POT's order (``v`` then ``u``), stopping when every problem's column-marginal error (checked
    every 10 iterations) is below ``stop``: the plan is ``u[..., :, None] * K * v[..., None, :]``."""
    a = 1.0 / K.shape[-1]
    u = torch.full(K.shape[:-1], a, dtype=K.dtype, device=K.device)
    v = u.clone()
    for it in range(max_iter):
        v = a / torch.einsum("...ij,...i->...j", K, u)
        u = a / torch.einsum("...ij,...j->...i", K, v)
        if it % 10 == 0 and float((torch.einsum("...ij,...i->...j", K, u) * v - a).norm(dim=-1).max()) < stop:
            break
    return u, v


def _col_lse(logK: Tensor, f: Tensor) -> Tensor:
    """``logsumexp_i (logK[i, j] + f[i])`` for every ``j``, over row blocks (running max)."""
    n, step = logK.shape[0], _rows(logK.shape[1])
    m = torch.full((logK.shape[1],), -math.inf, dtype=logK.dtype, device=logK.device)
    acc = torch.zeros_like(m)
    for i in range(0, n, step):
        t = logK[i : i + step] + f[i : i + step, None]
        m_new = torch.maximum(m, t.amax(dim=0))
        acc.mul_(torch.exp(m - m_new)).add_(torch.exp(t.sub_(m_new)).sum(dim=0))
        m = m_new
    return m + torch.log(acc)


def _row_lse(logK: Tensor, g: Tensor) -> Tensor:
    """``logsumexp_j (logK[i, j] + g[j])`` for every ``i``, over row blocks."""
    step = _rows(logK.shape[1])
    return torch.cat([torch.logsumexp(logK[i : i + step] + g[None, :], dim=1) for i in range(0, logK.shape[0], step)])


def _sinkhorn_inplace(M: Tensor, reg: float, max_iter: int, tol: float) -> Plan:
    """:func:`solve_sinkhorn` for large problems, overwriting ``M`` (float64, ``[n, n]``).

    The same normalisation and the same two algorithms (POT's iteration order and stopping rule),
    written so that the only ``n x n`` buffers are ``M`` itself, which becomes the kernel
    ``exp(-M / reg)`` (or ``-M / reg`` for the log domain) in place, and the float32 plan; every
    other temporary is a vector or a block of rows. At Llama-3.1-8B's 14,336 neurons that is
    1.6 + 0.8 GB, and 0.8 GB once the caller drops ``M``, where POT's ``sinkhorn`` holds about
    five 1.6 GB matrices (``benchmarks/README.md``, "Scale").
    """
    n = M.shape[0]
    identity = float(torch.diagonal(M).mean())
    scale = float(M.mean())
    if scale > 0:
        M.div_(scale)
    lo = float(M.min())
    M.sub_(lo)
    a = 1.0 / n
    stop = tol / n
    if float(M.max()) / reg < KERNEL_MAX_RANGE:
        name = "sinkhorn"
        u, v = _kernel_scalings(M.mul_(-1.0 / reg).exp_(), max_iter, stop)  # M is now the kernel
        logK = None
    else:
        name = "sinkhorn_log"
        logK = M.mul_(-1.0 / reg)
        la = math.log(a)
        f = torch.zeros(n, dtype=torch.float64, device=M.device)
        g = f.clone()
        for it in range(max_iter):
            g = la - _col_lse(logK, f)
            f = la - _row_lse(logK, g)
            if it % 10 == 0 and float((torch.exp(_col_lse(logK, f) + g) - a).norm()) < stop:
                break
    # the plan, block by block, with its diagnostics in float64; stored in float32 (see Plan.dense)
    P = torch.empty(n, n, dtype=torch.float32, device=M.device)
    rows = torch.empty(n, dtype=torch.float64, device=M.device)
    cols = torch.zeros(n, dtype=torch.float64, device=M.device)
    colmax = torch.zeros(n, dtype=torch.float64, device=M.device)
    cost = 0.0
    step = _rows(n)
    for i in range(0, n, step):
        blk = M[i : i + step]
        if logK is None:  # blk is K: P = u K v, and -M / reg = log K
            Pb = blk * u[i : i + step, None] * v[None, :]
            cost += float((Pb * torch.log(blk)).sum()) * -reg
        else:  # blk is -M / reg
            Pb = torch.exp(blk + f[i : i + step, None] + g[None, :])
            cost += float((Pb * blk).sum()) * -reg
        rows[i : i + step] = Pb.sum(dim=1)
        cols += Pb.sum(dim=0)
        colmax = torch.maximum(colmax, Pb.amax(dim=0))
        P[i : i + step] = Pb
        del Pb
    total = float(rows.sum())
    return Plan(
        cost=(cost + lo * total) * (scale if scale > 0 else 1.0),
        identity_cost=identity,
        marginal_error=max(float((rows * n - 1).abs().max()), float((cols * n - 1).abs().max())),
        sharpness=float(colmax.mean() * n),
        solver=name,
        dense=P,
    )


def solve_sinkhorn(M: Tensor, reg: float = 0.01, max_iter: int = 3000, tol: float = 1e-4,
                   overwrite: bool = False) -> Plan:
    """Entropic OT (POT) on ``M / mean(M)`` with regularisation ``reg``, on the cost's device.

    The normalised cost is shifted by its minimum (which leaves the plan unchanged). When its range
    over ``reg`` is below :data:`KERNEL_MAX_RANGE`, the kernel-domain algorithm
    (``method="sinkhorn"``) runs in float64: ``exp(-M / reg)`` cannot underflow there, and it is an
    order of magnitude faster than the log domain (13x on SmolLM2's 1,536-neuron problems, same
    plan to 6e-6). Otherwise the log-domain algorithm (``method="sinkhorn_log"``), which cannot
    underflow at any range, runs in float32. Stops when the relative marginal error is about
    ``tol`` or after ``max_iter`` iterations; the caller checks ``Plan.marginal_error``.

    Problems with more than :data:`INPLACE_MIN_ENTRIES` entries run in place
    (:func:`_sinkhorn_inplace`); ``overwrite=True`` lets them use ``M``'s memory (else a copy).
    """
    n = M.shape[0]
    if n == 1:
        return _finish(torch.ones(1, 1, dtype=torch.float64), M.detach().cpu(), "sinkhorn")
    if n * n > INPLACE_MIN_ENTRIES:
        own = overwrite and M.dtype == torch.float64 and M.is_contiguous()
        return _sinkhorn_inplace(M.detach() if own else M.detach().to(torch.float64, copy=True), reg, max_iter, tol)
    import ot  # POT; imported here so that the exact path does not pay for it

    Md = M.detach().to(torch.float64)
    scale = Md.mean()
    Mn = Md / scale if scale > 0 else Md.clone()
    Mn -= Mn.min()
    # POT stops on the L2 norm of the absolute marginal gap (entries 1/n): bound it by tol / n
    if float(Mn.max()) / reg < KERNEL_MAX_RANGE:
        a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=Mn.device)
        P = ot.sinkhorn(a, a, Mn, reg, method="sinkhorn", numItermax=max_iter, stopThr=tol / n, warn=False)
        name = "sinkhorn"
    else:
        Mn = Mn.to(torch.float32)
        a = torch.full((n,), 1.0 / n, dtype=torch.float32, device=Mn.device)
        P = ot.sinkhorn(a, a, Mn, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=tol / n, warn=False)
        name = "sinkhorn_log"
    del Mn
    return _finish(P.to("cpu", torch.float64), Md.cpu(), name)


def solve_sinkhorn_batch(Ms: Tensor, reg: float = 0.01, max_iter: int = 3000, tol: float = 1e-4) -> list[Plan]:
    """:func:`solve_sinkhorn` on a batch ``[B, n, n]`` of small problems at once (same algorithm).

    The query-head problems of one layer (``kv_heads**2`` of them, ``g x g``: 64 of 4 x 4 for
    Llama-3.1-8B) are tiny, but at a small ``reg`` Sinkhorn needs thousands of iterations on each;
    one POT call per problem costs ~0.4 s of Python overhead, 28 s per 8B layer, while one batched
    loop costs a fraction of a second (benchmarks/README.md, "Scale"). Each problem is normalised
    and shifted as in :func:`solve_sinkhorn`; the batch runs in the kernel domain when every
    problem is in range, else in the log domain. Iterates (in POT's order: ``v`` then ``u``,
    column marginals checked every 10 iterations) until every problem meets ``tol``.
    """
    B, n, _ = Ms.shape
    Md = Ms.detach().to(torch.float64)
    if n == 1:
        return [_finish(torch.ones(1, 1, dtype=torch.float64), Md[i].cpu(), "sinkhorn") for i in range(B)]
    scale = Md.mean(dim=(1, 2), keepdim=True)
    Mn = Md / torch.where(scale > 0, scale, torch.ones_like(scale))
    Mn -= Mn.amin(dim=(1, 2), keepdim=True)
    stop = tol / n
    if bool((Mn.amax(dim=(1, 2)) / reg < KERNEL_MAX_RANGE).all()):
        name = "sinkhorn"
        K = torch.exp(-Mn / reg)
        u, v = _kernel_scalings(K, max_iter, stop)
        P = u[:, :, None] * K * v[:, None, :]
    else:
        name = "sinkhorn_log"
        logK = -Mn / reg
        la = -math.log(n)
        f = torch.zeros(B, n, dtype=torch.float64, device=Mn.device)
        g = f.clone()
        for it in range(max_iter):
            g = la - torch.logsumexp(logK + f[:, :, None], dim=1)
            f = la - torch.logsumexp(logK + g[:, None, :], dim=2)
            if it % 10 == 0:
                cols = torch.logsumexp(logK + f[:, :, None] + g[:, None, :], dim=1).exp()
                if float((cols - 1.0 / n).norm(dim=1).max()) < stop:
                    break
        P = torch.exp(logK + f[:, :, None] + g[:, None, :])
    P = P.cpu()
    Mc = Md.cpu()
    return [_finish(P[i], Mc[i], name) for i in range(B)]


def solve(M: Tensor, solver: str = "exact", reg: float = 0.01, max_iter: int = 3000, overwrite: bool = False) -> Plan:
    """Dispatch on ``solver`` (``"exact"`` or ``"sinkhorn"``); ``overwrite``: ``M`` may be used as
    scratch memory (see :func:`solve_sinkhorn`)."""
    if solver == "exact":
        return solve_exact(M)
    if solver == "sinkhorn":
        return solve_sinkhorn(M, reg=reg, max_iter=max_iter, overwrite=overwrite)
    raise ValueError(f"unknown solver {solver!r}")


def _pow2_scale(parts: list[Tensor]) -> float:
    """A power of two ``s >= max |x|`` over ``parts``: dividing by it is exact (no rounding)."""
    m = max((float(p.abs().max()) for p in parts if p.numel()), default=0.0)
    if not math.isfinite(m):
        raise ValueError("non-finite weights: cannot compute OT costs")
    return 2.0 ** math.ceil(math.log2(m)) if m > 0 else 1.0


def pairwise_sq_dists(
    parts_a: list[Tensor], parts_b: list[Tensor], device: str | torch.device | None = None, block: int = 2048
) -> Tensor:
    r"""Squared distances between units, ``[n_a, n_b]`` float64, from per-unit feature blocks.

    Unit *i*'s feature vector is the concatenation of ``parts_a[r][i]`` over ``r`` (likewise for
    *b*); the concatenation is never built. The result is accumulated role by role and in row
    blocks, so memory is the ``n x n`` float64 output plus one role of ``b`` and one block.

    Precision and range. The output is float64 (what the exact solver needs, and room for any
    magnitude). The products run in **float64 when any input is float32 or wider**, and in
    **float32 when all inputs are 16-bit** (bf16/fp16 checkpoints): their weights carry 8-11
    significant bits, and a float32 dot product of them is accurate to ~1e-7 relative, far below
    the weights' own rounding; it is twice as fast and half the memory, which is what makes
    Llama-3.1-8B's 14,336 x 14,336 x 12,288 problem practical on a CPU. Float32 could overflow on
    bf16 inputs (bf16 reaches 3e38, its square does not fit), so every input is first divided by
    one power of two ``s >= max |x|`` (exact: only the exponent changes): then ``|x| <= 1`` and
    every dot product is at most the feature length, and the result is multiplied back by
    ``s**2`` in float64 (at most ``(3.4e38)^2 * F``, far inside float64's ``1.8e308``).
    """
    parts_a = [p.detach() for p in parts_a]
    parts_b = [p.detach() for p in parts_b]
    dev = torch.device(device) if device is not None else parts_a[0].device
    wide = any(p.dtype in (torch.float32, torch.float64) for p in parts_a + parts_b)
    cdt = torch.float64 if wide else torch.float32
    s = _pow2_scale(parts_a + parts_b)
    n_a, n_b = parts_a[0].shape[0], parts_b[0].shape[0]

    def conv(t: Tensor) -> Tensor:
        return t.to(dev, cdt, copy=True).div_(s).reshape(t.shape[0], -1)

    out = torch.zeros(n_a, n_b, dtype=torch.float64, device=dev)
    na = torch.zeros(n_a, dtype=torch.float64, device=dev)
    nb = torch.zeros(n_b, dtype=torch.float64, device=dev)
    for pa, pb in zip(parts_a, parts_b):
        B = conv(pb)
        nb += (B * B).sum(1).to(torch.float64)
        for i in range(0, n_a, block):
            A = conv(pa[i : i + block])
            na[i : i + block] += (A * A).sum(1).to(torch.float64)
            out[i : i + block].add_(A @ B.T)  # (a float32 product is widened exactly, in the add)
            del A
        del B
    out.mul_(-2.0).add_(na[:, None]).add_(nb[None, :]).clamp_min_(0.0).mul_(s * s)
    return out


def sq_dists(A: Tensor, B: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``A`` and ``B``, float64 (see
    :func:`pairwise_sq_dists` for the compute precision)."""
    return pairwise_sq_dists([A], [B])

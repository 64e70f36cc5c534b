r"""OT solvers between two equal-size uniform clouds of units (heads or neurons).

Problem. Given a cost matrix :math:`M \in \mathbb{R}^{n \times n}`, :math:`M_{ij}` the squared
distance between unit *i* of the lower layer and unit *j* of the upper layer, find a plan

.. math:: P^\star = \arg\min_{P \in U(a, b)} \langle P, M \rangle (+ \varepsilon H(P)),\qquad a = b = \mathbf{1}/n.

* ``solve_exact``: without entropy the optimum is a permutation (Birkhoff); it is found as a linear
  assignment with SciPy's ``linear_sum_assignment`` (the Jonker-Volgenant algorithm, exact), which
  is what POT's ``emd`` would return here, faster. Large problems (``n >= SPARSE_MIN_N``) are
  solved on a sparse candidate graph with SciPy's LAPJVsp and *certified* optimal on the full
  matrix by LP duality, with the dense solver as the fallback (:func:`_assignment_certified`).
  The matrix is computed in float32 arithmetic and, for the neurons, stored in float16 (row
  minima removed, one power-of-two scale: :meth:`SqDistCost.matrix` with ``compact=True``, half
  the memory); the assignment is then certified for the *true* cost (:func:`_certify_true`), or,
  where near-ties closer than the stored precision made the stored optimum wrong, re-solved on
  true float64 costs of the few entries that can matter (:func:`_resolve_true`).
* ``solve_sinkhorn``: entropic OT with POT's Sinkhorn on the cost divided by its mean (so that
  ``reg`` is relative and means the same on every model and dtype) and shifted by its minimum:
  the fast kernel domain when ``exp(-M / reg)`` cannot underflow, else the log domain
  (``method="sinkhorn_log"``), which never underflows. (The reference script runs the
  plain-domain algorithm at ``reg=0.06`` on raw costs; its plan underflows to ~0 on real weights.)
  Large problems (Llama-3.1-8B's 14,336 neurons) run the same two algorithms by hand, in place
  in the cost matrix and over row blocks (:func:`_sinkhorn_inplace`): POT's allocate several
  ``n x n`` temporaries, 1.6 GB each at that size, and memory is what bounds a streaming upscale.
  There the cost is first reduced by its row and then its column minima (an exact change of dual
  variables: the plan is the same, and the kernel domain is kept where a row or column offset alone
  would force the log domain), and the plan is written over the cost; the scalings and every
  reduction (mean, matvecs, marginals) accumulate in float64. For 16-bit weights the cost is the
  exact solver's float16 compact form, the kernel bfloat16 and the plan float16 with a power-of-two
  scale per column (0.4 GB at 8B, what :func:`Plan.move` reads); otherwise the cost and the plan
  stay float32 (0.8 GB instead of POT's 1.6 GB each).

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
from dataclasses import dataclass, replace
from typing import Callable

import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor


#: kernel-domain Sinkhorn is used when ``(max - min) / reg`` of the normalised, min-shifted cost is
#: below this: ``exp(-600) = 2.6e-261`` and its inverse stay inside float64's range, so neither the
#: kernel nor the scalings under- or overflow; above it the log domain is used (slower, safe)
KERNEL_MAX_RANGE = 600.0
#: the same bound for a float32 or bfloat16 kernel (:func:`_sinkhorn_inplace`) when nothing may
#: underflow: ``exp(-80) = 1.8e-35`` is still a normal float32 (the scalings are float64, so only the
#: kernel's entries need the range). With a way to rebuild the cost, the in-place solver goes up to
#: :data:`KERNEL_MAX_RANGE` and certifies what underflowed (:data:`UNDERFLOW_TOL`)
KERNEL_MAX_RANGE_F32 = 80.0
#: a float32/bfloat16 kernel whose entries underflow (below float32's smallest normal) is accepted
#: when the plan mass those entries can carry, at the final scalings, is at most this fraction of a
#: row's or column's marginal (``tol`` relative, the stopping rule's own scale); else the log domain
UNDERFLOW_TOL = 1e-6
#: iterations between two evaluations of that bound while the kernel-domain iterations run (each
#: costs about two products): a kernel whose lost entries matter is then re-formed early
UNDERFLOW_PROBE = 100
#: times the in-place solver may re-form its kernel with the scalings absorbed before it gives up
#: on the kernel domain (see :func:`_sinkhorn_inplace`)
ABSORB_MAX = 3


class _Underflow(Exception):
    """Raised by :func:`_kernel_scalings`' probe: ``(u, v, iterations done)``."""

#: problems with more plan entries than this (n > 5,792) run in place (:func:`_sinkhorn_inplace`);
#: smaller ones through POT
INPLACE_MIN_ENTRIES = 2**25

#: rows per block in the in-place Sinkhorn, the certificate and dense plan application, at most,
#: and bytes per float64 block: the temporaries stay ~32 MB whatever ``n`` (292 rows at 14,336)
_BLOCK = 1024
_BLOCK_BYTES = 1 << 25


#: bytes per float64 buffer of :meth:`SqDistCost.exact` (below glibc's mmap threshold as streaming sets it)
_EXACT_BYTES = 1 << 19

#: features per chunk of the float32 cost product (:meth:`SqDistCost.matrix`): bounds the error
CHUNK_K = 512
#: units of ``b`` converted at a time by :meth:`SqDistCost.matrix` (4,096 x 4,096 float32 = 64 MB at 8B)
COST_COLS = 4096
#: the compact cost (:meth:`SqDistCost.matrix` with ``compact=True``): units of ``b`` converted at a time
#: (2,048 x 4,096 float32 = 32 MB at 8B), and the float16 rounding bound used by the certificate:
#: ``|x - fl16(x)| <= COMPACT_REL * fl16(x) + COMPACT_ABS`` (half an ulp is ``2^-11`` relative for
#: normals and ``2^-25`` absolute for subnormals; a float64 -> float32 -> float16 double rounding
#: adds at most ``2^-24`` relative: the constants keep a factor ~2 of margin)
COMPACT_COLS = 2048
COMPACT_REL = 2.0**-10
COMPACT_ABS = 2.0**-24
#: largest stored compact entry (a power of two below float16's 65,504: no overflow, normals below)
COMPACT_MAX = 2.0**14


def _rows(n: int) -> int:
    """Rows per block for an ``[*, n]`` float64 temporary."""
    return max(1, min(_BLOCK, _BLOCK_BYTES // (8 * n)))

#: exact problems this large are solved on a sparse candidate graph and certified
#: (:func:`_assignment_certified`); smaller ones by the dense solver directly
SPARSE_MIN_N = 256
#: candidate edges: the ``SPARSE_K`` cheapest per row and per column (twice as many below
#: ``SPARSE_MANY`` units: fewer certification rounds, 2.8 -> 2.2 s for SmolLM2's 15 neuron problems)
SPARSE_K = 32
SPARSE_MANY = 4096
#: columns (rows) sampled to set the candidate threshold of each row (column), see :func:`_candidates`
SPARSE_SAMPLE = 256
#: candidates per row and column when the assignment is already known (dense solver): duals only
SPARSE_K_FIXED = 8
#: certification rounds (each adds the violated edges) before falling back to the dense solver
SPARSE_ROUNDS = 8
#: Bellman-Ford passes for the dual potentials before falling back (typically 100-250 at n = 14,336;
#: the cap bounds a pathological case at seconds, and the fallback is exact anyway)
SPARSE_MAX_PASSES = 2000


def work_dtype(*ts: Tensor) -> torch.dtype:
    """Where aligned and fused weights are computed: float32 (exact for bf16/fp16 inputs, the
    weights' own precision for fp32), float64 only when an input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


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
    #: exact plans: how optimality was established ("float64": solved on a float64 cost;
    #: "float32+certificate" / "float16+certificate": solved on that matrix (float16: the compact
    #: form of :meth:`SqDistCost.matrix`), certified on the true cost; "float64 fallback")
    certified: str = ""
    #: entries the certificate recomputed in float64 (see :func:`_certify_true`)
    band: int = 0
    #: ``[n]`` powers of two: ``dense`` holds ``P / dense_scale`` column by column (float16, each
    #: column's largest entry in ``(1/2, 1]``: the plan of a compact-cost Sinkhorn, see
    #: :func:`_sinkhorn_inplace`); None: ``dense`` is ``P``
    dense_scale: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.assignment) if self.assignment is not None else self.dense.shape[0]

    @property
    def is_permutation(self) -> bool:
        return self.assignment is not None

    @property
    def matrix(self) -> Tensor:
        """``[n, n]``, marginals ``1/n`` (exactly for the exact solver); the dtype of ``dense``, float64
        for an exact plan, float32 for a column-scaled float16 one."""
        if self.dense is not None:
            if self.dense_scale is not None:
                return self.dense.float() * self.dense_scale.float()
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

    def move(self, x: Tensor, dim: int = 0, units: slice | None = None) -> Tensor:
        """The barycentric map applied to ``x``, whose ``dim`` indexes the lower units: in
        :func:`work_dtype` (float32, float64 for float64 ``x``),
        the same shape, ``dim`` now indexing the upper units (``(n P)^T x`` for ``dim=0``).
        ``units``: only these upper units (``dim`` then has their count), so that a caller can fuse
        a large role a block of units at a time (:func:`hf_deepen.fuse._fuse_roles`).

        An exact plan is an index gather (exact, free). A dense plan is a matmul: in float64, or,
        when ``x`` is 16-bit, in float32 over row blocks of the plan (the precision rule of
        :func:`pairwise_sq_dists`: a float32 sum of 14,336 products is accurate to ~1e-5
        relative, far below bf16's 4e-3; twice as fast, and no float64 copy of ``x``). A column-scaled
        float16 plan (:attr:`dense_scale`) is widened block by block and its scales applied after.
        """
        wd = work_dtype(x)
        cols = units if units is not None else slice(None)
        if self.assignment is not None:  # gather first, then widen: one copy, not two
            return x.detach().index_select(dim, self.assignment[cols].to(x.device)).to(wd)
        P = self.dense  # computed where the plan is (the GPU, if Sinkhorn ran there), returned to x's device
        n = self.n
        m = len(range(n)[cols])
        x = x.detach()
        last = dim in (-1, x.dim() - 1) and x.dim() > 1
        # units first (x2 [n, k]: out = P^T x2) or units last (x2 [k, n]: out = x2 P); either way the
        # result comes out contiguous in x's own layout, so no caller has to copy it again
        x2 = (x.reshape(-1, n) if last else x.movedim(dim, 0).reshape(n, -1)).to(P.device)
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else torch.float64
        acc = torch.zeros((x2.shape[0], m) if last else (m, x2.shape[1]), dtype=cdt, device=P.device)
        step = _rows(n)
        for i in range(0, n, step):  # over row blocks of the plan: no full-size converted copy
            Pb = P[i : i + step, cols].to(cdt)
            if last:
                acc.addmm_(x2[:, i : i + step].to(cdt), Pb)
            else:
                acc.addmm_(Pb.T, x2[i : i + step].to(cdt))
        if self.dense_scale is not None:  # column j of the stored plan is P[:, j] / scale[j] (powers of two)
            sc = self.dense_scale[cols].to(acc)
            acc.mul_(sc if last else sc[:, None])
        out = acc.to(x.device, wd)
        del acc
        out.mul_(n)
        if last:
            return out.reshape(*x.shape[:-1], m)
        moved = x.movedim(dim, 0).shape
        return out.reshape(m, *moved[1:]).movedim(0, dim)


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
    return _duals_of(n, sigma, r, c, C[r, c].to(torch.float64), C[torch.arange(n), sigma].to(torch.float64))


def _duals_of(n: int, sigma: Tensor, r: Tensor, c: Tensor, w: Tensor, base: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`_duals` from the edges' costs ``w`` (float64) and the costs ``base`` of the assignment's edges."""
    inv = torch.empty(n, dtype=torch.int64)
    inv[sigma] = torch.arange(n)
    d = _bellman_ford(n, r, inv[c], w - base[r])
    if d is None:
        return None  # a negative cycle (sigma can be improved on these edges), or the pass cap
    v = torch.empty(n, dtype=torch.float64)
    v[sigma] = d
    return base - v[sigma], v


def _matching(n: int, r: Tensor, c: Tensor, w: Tensor) -> Tensor | None:
    """SciPy's LAPJVsp on the edges ``(r, c)`` with weights ``w >= 1`` (it reads a zero weight as a
    missing edge): ``sigma`` (row ``i`` -> column ``sigma[i]``), or None without a full matching."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    graph = csr_array((w.numpy(), (r.numpy(), c.numpy())), shape=(n, n))
    try:
        _, col = min_weight_full_bipartite_matching(graph)
    except ValueError:
        return None
    return torch.from_numpy(col).to(torch.int64)


def _bellman_ford(n: int, src: Tensor, dst: Tensor, w: Tensor) -> Tensor | None:
    """Shortest distances ``d <= 0`` from a virtual source joined to all ``n`` nodes by 0-weight arcs,
    over the arcs ``src -> dst`` of weight ``w`` (all relaxed per pass, in preallocated buffers: no
    allocation per pass); None on a negative cycle or after :data:`SPARSE_MAX_PASSES` passes."""
    d = torch.zeros(n, dtype=torch.float64)
    nd = torch.empty_like(d)
    cand = torch.empty(len(src), dtype=torch.float64)
    for _ in range(min(n + 1, SPARSE_MAX_PASSES)):
        torch.index_select(d, 0, src, out=cand).add_(w)
        nd.copy_(d).scatter_reduce_(0, dst, cand, reduce="amin")
        if torch.equal(nd, d):
            return d
        d, nd = nd, d
    return None


def _candidates(C: Tensor, k: int) -> Tensor:
    """Keys ``i * n + j`` of about the ``k`` cheapest entries of every row and every column, ranked on
    *reduced* costs.

    A row's entries are ranked on ``C_ij - v_j`` and a column's on ``C_ij - u_i``, with ``u`` the row
    minima and ``v`` the column minima of ``C - u`` (the classical row-then-column reduction: feasible
    duals). Row and column constants do not change the assignment, but they decide a raw ranking.
    Squared distances ``|a_i|^2 + |b_j|^2 - 2 a_i . b_j`` are the case: every row prefers the same
    few short columns, so the raw 32 cheapest per row and column of SmolLM2's neuron costs hold no
    full matching at all and 21-36% of the optimum's edges; reduced, 98-99% (and 91% where the raw
    ones hold 62%: unrelated units with spread norms; ``tests/test_align.py``).

    "About": each row's threshold is the ``k``-th smallest of its reduced entries in a sample of
    :data:`SPARSE_SAMPLE` columns scaled to ``n`` (likewise for columns), and every entry below it
    is taken: one comparison per entry instead of a top-k (5x cheaper at n = 1,536); the count per
    row varies around ``k``. Which entries are candidates never decides the answer, only how many
    certification rounds it takes (:func:`_assignment_certified`). Over row blocks: temporaries of
    one block.
    """
    n = C.shape[0]
    k = min(k, n)
    step = _rows(n)  # (float32 temporaries of ~16 MB: the cost matrix is alive, and streaming counts every MB)
    wdt = torch.float32 if C.dtype == torch.float16 else C.dtype  # (no float16 arithmetic: blocks are widened)
    # two rankings: mean-centred (best on real layers) and min-reduced (robust on unrelated units)
    # (over row blocks: a float64 sum of the whole matrix would first copy it to float64, 1.6 GB at 8B)
    mean_c = torch.zeros(n, dtype=torch.float64)
    mean_r = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, step):
        blk = C[i : i + step]
        mean_c += blk.sum(0, dtype=torch.float64)
        mean_r[i : i + step] = blk.sum(1, dtype=torch.float64)
    mean_c, mean_r = mean_c.div_(n).to(wdt), mean_r.div_(n).to(wdt)
    min_r = C.amin(1).to(wdt)
    min_c = torch.stack([(C[i : i + step].to(wdt) - min_r[i : i + step, None]).amin(0) for i in range(0, n, step)]).amin(0)
    pots = [(mean_c, mean_r), (min_c, min_r)]
    if n <= 2 * SPARSE_SAMPLE:
        cols_s = torch.arange(n)
        ks = k
    else:
        cols_s = torch.linspace(0, n - 1, SPARSE_SAMPLE).round().to(torch.int64)
        ks = max(1, round(k * SPARSE_SAMPLE / n))
    # per row (column) and ranking: the threshold is the ks-th smallest reduced entry among the sampled columns (rows)
    sample_r, sample_c = C[:, cols_s].to(wdt), C[cols_s].T.to(wdt)
    thr = [(torch.kthvalue(sample_r - cm[cols_s], ks, dim=1).values, torch.kthvalue(sample_c - rm[cols_s], ks, dim=1).values)
           for cm, rm in pots]
    del sample_r, sample_c
    keys = []
    for i in range(0, n, step):
        blk = C[i : i + step].to(wdt)
        m = torch.zeros(blk.shape, dtype=torch.bool)
        for (cm, rm), (tr, tc) in zip(pots, thr):
            m |= (blk - cm) <= tr[i : i + step, None]
            m |= (blk - rm[i : i + step, None]) <= tc
        hit = m.nonzero()
        keys.append((hit[:, 0] + i) * n + hit[:, 1])
    return torch.cat(keys)  # unique: one pass over each entry


def _tolerance(C: Tensor) -> float:
    """Rounding tolerance per entry of a certificate: ``2^-40 max |C|``."""
    return 2.0**-40 * max(abs(float(C.max())), abs(float(C.min())))  # (C.abs() would copy the matrix)


def _violations(C: Tensor, u: Tensor, v: Tensor, tol: float, bounds: tuple | None = None) -> list[Tensor]:
    """Keys of the entries with ``C_ij - u_i - v_j < -tol``, over row blocks (float64 arithmetic);
    with ``bounds`` (:func:`_stored_bounds`), of the entries whose *lower bound* ``C_ij - e_ij`` does so."""
    n, step = C.shape[0], _rows(C.shape[0])
    buf = torch.empty(step, n, dtype=torch.float64)
    bad = []
    for i in range(0, n, step):
        blk = C[i : i + step]
        red = torch.sub(blk, u[i : i + step, None], out=buf[: min(step, n - i)]).sub_(v)
        if bounds is not None:
            ea, eb, compact = bounds
            _less_error(red, blk, ea[i : i + step], eb, compact)
        if float(red.min()) < -tol:
            hit = (red < -tol).nonzero()
            bad.append((hit[:, 0] + i) * n + hit[:, 1])
    return bad


def _assignment_certified(C: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The optimal assignment of the dense cost ``C`` (float64 or float32, CPU), with its duals.

    1. Candidates: the :data:`SPARSE_K` cheapest edges of every row and of every column.
    2. Solve the assignment on them with SciPy's LAPJVsp (``min_weight_full_bipartite_matching``),
       or take ``sigma`` when it is given (an assignment known to be optimal, e.g. from the dense solver).
    3. Certify on the *full* matrix: dual potentials of the sparse optimum (:func:`_duals`) that are
       feasible for every entry, ``C_ij - u_i - v_j >= 0``, prove it optimal for the dense problem
       (LP duality), up to a rounding tolerance of ``2^-40 max |C|`` per entry. Violated entries join
       the candidates and the sparse problem is solved again.

    Returns ``(sigma, u, v)`` (``sigma[i]``: the column of row ``i``), or None when there is no full
    matching on the candidates or no certificate after :data:`SPARSE_ROUNDS` rounds (the caller
    then runs the dense solver). On Llama-8B-shaped random layers it is 3 rounds at n = 6,144 (61, 7,
    0 violated entries; 5 rounds with raw-cost candidates), ~5x faster than the dense solver at
    n = 8,192 (``benchmarks/README.md``, "Scale"); on SmolLM2's neurons 1-3 rounds.
    """
    n = C.shape[0]
    fixed = sigma is not None
    # a known optimum only needs duals: fewer candidates make the Bellman-Ford passes cheaper
    # (0.27 -> 0.13 s at n = 1,536; the violated entries are added anyway)
    key = _candidates(C, SPARSE_K_FIXED if fixed else SPARSE_K if n >= SPARSE_MANY else 2 * SPARSE_K)
    if fixed:
        key = torch.unique(torch.cat([key, torch.arange(n) * n + sigma]))
    shift = float(C.min()) - 1.0  # LAPJVsp reads a zero weight as a missing edge: every weight >= 1
    tol = _tolerance(C)
    for _ in range(SPARSE_ROUNDS):
        r, c = key // n, key % n
        if not fixed:
            sigma = _matching(n, r, c, C[r, c].to(torch.float64) - shift)
            if sigma is None:  # no full matching on the candidates
                return None
        uv = _duals(C, sigma, r, c)
        if uv is None:
            return None
        bad = _violations(C, *uv, tol)
        if not bad:
            return sigma, uv[0], uv[1]
        key = torch.unique(torch.cat([key, *bad]))
    return None


def _stored_bounds(C: Tensor, oracle: "SqDistCost") -> tuple[Tensor, Tensor, tuple[Tensor, float] | None]:
    """``ea, eb, compact``: the error bound of ``C`` against the true cost in ``C``'s own units (a compact
    float16 ``C`` stands for ``(T - offset_i) / scale``, :attr:`SqDistCost.compact`; else ``compact`` is None)."""
    ea, eb = oracle.error_bounds()
    compact = oracle.compact if C.dtype == torch.float16 else None
    if compact is not None:
        ea, eb = ea / compact[1], eb / compact[1]
    return ea, eb, compact


def _less_error(red: Tensor, blk: Tensor, ea: Tensor, eb: Tensor, compact: object) -> Tensor:
    """``red - e`` in place for a block of rows: ``e_ij = ea_i + eb_j``, plus float16's rounding of the
    stored entry ``blk`` when compact (``COMPACT_REL * blk_ij + COMPACT_ABS``)."""
    red.sub_(ea[:, None]).sub_(eb)
    if compact is not None:
        red.add_(blk, alpha=-COMPACT_REL).sub_(COMPACT_ABS)
    return red


def _certify_true(C: Tensor, sigma: Tensor, u: Tensor, v: Tensor, oracle: "SqDistCost") -> bool:
    """Prove ``sigma`` optimal for the *true* cost ``T``, given duals ``u, v`` that prove it optimal
    for the computed ``C`` (float32 arithmetic, stored as float32 or in the compact float16 form).

    ``C`` is within ``e_ij = ea_i + eb_j`` of ``T`` (:meth:`SqDistCost.error_bounds`, a rigorous
    bound); a compact ``C`` stands for ``(T - offset_i) / scale`` (:attr:`SqDistCost.compact`: row
    offsets and a power-of-two scale change no assignment), and its float16 rounding adds
    ``COMPACT_REL * C_ij + COMPACT_ABS`` to ``e_ij``. With ``u'_i = T_i,sigma(i) - v_sigma(i)`` (the
    true cost on the assignment, float64), ``r'_ij = T_ij - u'_i - v_j >= red_ij - e_ij -
    red_i,sigma(i) - e_i,sigma(i)`` where ``red = C - u - v``. Entries where that lower bound is below
    a margin ``m`` (the largest ``e`` of a row plus that of a column, on the assignment for the
    float16 term; the *band*: a few per row) get their true cost in float64; the duals are then
    repaired on them: shortest distances ``d <= 0`` (Bellman-Ford) over the band arcs with weights
    ``r'`` give duals feasible on every band entry, and they move any other entry's reduced cost by
    at most ``max |d|``. If ``max |d| < m`` every entry is dual feasible for ``T`` (up to the rounding
    tolerance), which proves ``sigma`` optimal (LP duality). Else (or on a negative cycle) False: the
    caller re-solves on the true costs found here (:func:`_resolve_true`, from :attr:`SqDistCost.known`).
    """
    n, step = C.shape[0], _rows(C.shape[0])
    ar = torch.arange(n)
    ea, eb, compact = _stored_bounds(C, oracle)  # everything in the stored units
    t_sig_true = oracle.exact(ar, sigma)
    oracle.sigma_cost = (sigma, t_sig_true)
    t_sig = oracle.stored(ar, t_sig_true) if compact is not None else t_sig_true
    c_sig = C[ar, sigma].to(torch.float64)
    red_sig = c_sig - u - v[sigma]
    e_sig = ea + eb[sigma]
    if compact is not None:
        e_sig = e_sig + c_sig * COMPACT_REL + COMPACT_ABS
    u2 = t_sig - v[sigma]
    tol = _tolerance(C)
    margin = float(ea.max() + eb.max()) + (float((c_sig * COMPACT_REL).max()) + COMPACT_ABS if compact is not None else 0.0)
    slack = red_sig + e_sig + margin  # per row: red below this needs the true cost
    buf = torch.empty(step, n, dtype=torch.float64)
    br, bc = [], []
    for i in range(0, n, step):
        blk = C[i : i + step]
        red = torch.sub(blk, u[i : i + step, None], out=buf[: min(step, n - i)]).sub_(v)
        _less_error(red, blk, ea[i : i + step], eb, compact).sub_(slack[i : i + step, None])
        hit = (red < 0).nonzero()
        br.append(hit[:, 0] + i)
        bc.append(hit[:, 1])
    ri, cj = torch.cat(br), torch.cat(bc)
    oracle.band = len(ri)
    t = oracle.exact_stored(ri, cj) if compact is not None else oracle.exact_pairs(ri, cj)
    # what _resolve_true starts from if this certificate fails: the true costs known so far
    oracle.known = (torch.cat([ri * n + cj, ar * n + sigma]), torch.cat([t, t_sig]))
    w = t - u2[ri] - v[cj]  # r' on the band
    inv = torch.empty(n, dtype=torch.int64)
    inv[sigma] = ar
    dst = inv[cj]
    d = _bellman_ford(n, ri, dst, w)
    if d is None:
        return False  # a negative cycle: sigma is not optimal for T (or the pass cap)
    shift = float(-d.min())
    oracle.repair = shift
    return shift + tol < margin and bool(((w + d[ri] - d[dst]) >= -tol).all())


def _resolve_true(C: Tensor, oracle: "SqDistCost") -> Tensor | None:
    """The assignment optimal for the *true* cost, when the computed matrix's own optimum could not
    be certified (:func:`_certify_true` returned False): near-ties closer than the matrix's error.

    Solved on a sparse set ``K`` of entries whose true cost is known (float64, at first the band and
    the old assignment, :attr:`SqDistCost.known`), with SciPy's LAPJVsp, and certified on the rest by
    the computed matrix's *lower bounds* ``C_ij - e_ij <= T_ij`` (the error bound of
    :func:`_certify_true`): duals of the sparse optimum with ``T_ij - u_i - v_j >= 0`` on ``K`` and
    ``C_ij - e_ij - u_i - v_j >= 0`` elsewhere are feasible for all of ``T``, which proves the
    assignment optimal (LP duality). Entries that violate the lower-bound test get their true cost and
    join ``K``; after :data:`SPARSE_ROUNDS` rounds, or without duals, None (the caller solves the float64
    problem). Everything in the matrix's units (compact: ``(T - offset_i) / scale``)."""
    if oracle.known is None:
        return None
    n = C.shape[0]
    ar = torch.arange(n)
    bounds = _stored_bounds(C, oracle)
    key, wt = oracle.known
    key, first = torch.unique(key, return_inverse=True)
    wt = torch.empty(len(key), dtype=torch.float64).scatter_(0, first, wt)
    tol = _tolerance(C)
    for _ in range(SPARSE_ROUNDS):
        r, c = key // n, key % n
        sigma = _matching(n, r, c, wt - (float(wt.min()) - 1.0))
        if sigma is None:
            return None
        uv = _duals_of(n, sigma, r, c, wt, wt[torch.searchsorted(key, ar * n + sigma)])  # (sigma uses only K)
        if uv is None:
            return None
        new = torch.cat(_violations(C, *uv, tol, bounds) or [key[:0]])  # lower bounds outside K
        new = new[~torch.isin(new, key)]
        if not len(new):
            return sigma
        rn, cn = new // n, new % n
        tn = oracle.exact_stored(rn, cn) if bounds[2] is not None else oracle.exact_pairs(rn, cn)
        oracle.band += len(new)
        key, order = torch.sort(torch.cat([key, new]))
        wt = torch.cat([wt, tn])[order]
    return None


def solve_exact(M: Tensor, oracle: "SqDistCost | None" = None) -> Plan:
    """Exact OT between uniform clouds: the optimal assignment (entries 0 or 1/n), stored as indices.

    ``M`` may be float32 (computed fast, :meth:`SqDistCost.matrix`), or its compact float16 form
    (``matrix(compact=True)``: half the memory), with ``oracle`` the exact cost it approximates: the
    assignment optimal for ``M`` is then *certified* optimal for the true cost
    (:func:`_certify_true`), float64 only on the few entries the certificate needs; if it cannot be,
    the whole problem is solved again on the float64 cost. Without ``oracle``, ``M`` is the cost.

    Below :data:`SPARSE_MIN_N` units the dense solver (SciPy's LAPJV, float64) runs on ``M`` with its
    column minima subtracted (the same optimum; LAPJV is several times faster on reduced costs:
    3.7 -> 0.5 s at n = 1,536 on SmolLM2); from it, on a sparse candidate graph certified on the whole
    matrix (:func:`_assignment_certified`), with the dense solver as the fallback. The sparse route
    is 2-3x faster than the dense one at SmolLM2's 1,536 neurons (its 15 problems: 8.8 -> 3.4 s CPU
    with the certificate, the same plans) and far more at 8B's 14,336.
    """
    n = M.shape[0]
    Mc = M.detach().to("cpu")
    compact = Mc.dtype == torch.float16 and oracle is not None and oracle.compact is not None
    if Mc.dtype not in (torch.float32, torch.float64) and not compact:
        Mc = Mc.to(torch.float64)
    cert = _assignment_certified(Mc) if n >= SPARSE_MIN_N else None
    if cert is not None:
        sigma = cert[0]
    else:
        R = Mc.to(torch.float64, copy=True)
        R -= R.min(dim=0, keepdim=True).values  # column reduction: the same optimal assignments
        rows, cols = linear_sum_assignment(R.numpy())
        del R
        sigma = torch.empty(n, dtype=torch.int64)
        sigma[torch.from_numpy(rows)] = torch.from_numpy(cols).to(torch.int64)
    certified = "float64"
    if oracle is not None and Mc.dtype != torch.float64:
        if cert is None:
            cert = _assignment_certified(Mc, sigma)
        how = f"{str(Mc.dtype).removeprefix('torch.')}+certificate"
        oracle.known = None
        if cert is not None and _certify_true(Mc, *cert, oracle):
            certified = how
        elif (resolved := _resolve_true(Mc, oracle)) is not None:  # near-ties: re-solved on true costs
            sigma, certified = resolved, how + ", re-solved"
        else:  # rare: no certificate either way
            # (float64 arithmetic, one block at a time: the float32 matrix's own optimum is not the answer)
            return _with_cert(solve_exact(oracle.matrix(torch.float64, compute=torch.float64)), "float64 fallback", oracle)
    rows_t, cols_t = torch.arange(n), sigma
    assignment = torch.empty(n, dtype=torch.int64)
    assignment[cols_t] = rows_t
    if oracle is not None:
        known = oracle.sigma_cost
        t_sig = known[1] if known is not None and torch.equal(known[0], cols_t) else oracle.exact(rows_t, cols_t)
        cost = float(t_sig.sum()) / n
        ident = float(oracle.exact(rows_t, rows_t).mean())
    else:
        cost = float(Mc[rows_t, cols_t].to(torch.float64).sum()) / n
        ident = float(torch.diagonal(Mc).to(torch.float64).mean())
    plan = Plan(cost=cost, identity_cost=ident, marginal_error=0.0, sharpness=1.0, solver="exact", assignment=assignment)
    return _with_cert(plan, certified, oracle)


def _with_cert(plan: Plan, how: str, oracle: "SqDistCost | None") -> Plan:
    plan.certified = how
    plan.band = getattr(oracle, "band", 0) if oracle is not None else 0
    return plan


def _kernel_scalings(K: Tensor, max_iter: int, stop: float, wide: bool = False,
                     probe: Callable[[Tensor, Tensor], bool] | None = None) -> tuple[Tensor, Tensor]:
    """Kernel-domain Sinkhorn scalings ``u, v`` for ``K`` ``[..., n, n]`` and uniform marginals ``1/n``,
    in POT's order (``v`` then ``u``), stopping when every problem's column-marginal error (checked
    every 10 iterations) is below ``stop``: the plan is ``u[..., :, None] * K * v[..., None, :]``.
    ``wide``: one ``[n, n]`` kernel of any float dtype, float64 scalings and products over row
    blocks (:func:`_mv64`; the in-place solver's float32 kernel). ``probe(u, v)``, every
    :data:`UNDERFLOW_PROBE` iterations: when true, :class:`_Underflow` is raised with the scalings."""
    a = 1.0 / K.shape[-1]
    if wide:
        # one float64 block reused for every product: a fresh block per product costs 7-14x the
        # conversion itself on this CPU (page faults of a new 32 MB allocation each time)
        buf = torch.empty(_rows(K.shape[1]), K.shape[1], dtype=torch.float64, device=K.device) \
            if K.dtype != torch.float64 else None

        def mv(x: Tensor, transpose: bool) -> Tensor:
            return _mv64(K, x, transpose, buf)
    else:
        def mv(x: Tensor, transpose: bool) -> Tensor:
            return torch.einsum("...ij,...i->...j" if transpose else "...ij,...j->...i", K, x)
    u = torch.full(K.shape[:-1], a, dtype=torch.float64 if wide else K.dtype, device=K.device)
    v = u.clone()
    ktu = mv(u, True)
    for it in range(max_iter):
        v = a / ktu
        u = a / mv(v, False)
        ktu = mv(u, True)  # the check's product is the next iteration's: two products per iteration
        if it % 10 == 0 and float((ktu * v - a).norm(dim=-1).max()) < stop:
            break
        if probe is not None and it % UNDERFLOW_PROBE == UNDERFLOW_PROBE - 1 and probe(u, v):
            raise _Underflow(u, v, it + 1)
    return u, v


def _lost_bound(K: Tensor, u: Tensor, v: Tensor) -> float:
    """The most plan mass, relative to a marginal ``1/n``, that the entries of a float32 or bfloat16
    kernel ``K`` stored below float32's smallest normal ``t`` can carry at scalings ``u, v`` (each
    differs from its true value by less than ``t``): ``max(u_i t sum_j v_j, v_j t sum_i u_i)`` over
    those entries of row ``i`` / column ``j``; ``inf`` for non-finite scalings."""
    if not bool(torch.isfinite(u).all() and torch.isfinite(v).all()):
        return math.inf
    n, step, t = K.shape[0], _rows(K.shape[1]), torch.finfo(torch.float32).tiny
    rows = torch.zeros(n, dtype=torch.float64, device=K.device)
    cols = torch.zeros(n, dtype=torch.float64, device=K.device)
    for i in range(0, n, step):
        low = K[i : i + step] < t
        if bool(low.any()):
            low = low.double()
            rows[i : i + step] = low @ v
            cols.add_(low.T @ u[i : i + step])
        del low
    return float(torch.maximum((rows * u).max(), (cols * v).max())) * t * n


def _col_lse(rows: Callable[[int, int], Tensor], n: int, f: Tensor) -> Tensor:
    """``logsumexp_i (logK[i, j] + f[i])`` for every ``j``, over row blocks (running max);
    ``rows(i, step)`` returns rows ``i : i + step`` of ``logK`` (``[n, n]``)."""
    step = _rows(n)
    m = torch.full((n,), -math.inf, dtype=f.dtype, device=f.device)
    acc = torch.zeros_like(m)
    for i in range(0, n, step):
        t = rows(i, step) + f[i : i + step, None]
        m_new = torch.maximum(m, t.amax(dim=0))
        acc.mul_(torch.exp(m - m_new)).add_(torch.exp(t.sub_(m_new)).sum(dim=0))
        m = m_new
    return m + torch.log(acc)


def _row_lse(rows: Callable[[int, int], Tensor], n: int, g: Tensor) -> Tensor:
    """``logsumexp_j (logK[i, j] + g[j])`` for every ``i``, over row blocks."""
    step = _rows(n)
    return torch.cat([torch.logsumexp(rows(i, step) + g[None, :], dim=1) for i in range(0, n, step)])


def _mv64(K: Tensor, x: Tensor, transpose: bool, buf: Tensor | None = None) -> Tensor:
    """``K^T x`` (``transpose``) or ``K x`` in float64 for ``K`` ``[n, n]`` of any float dtype, over
    row blocks: a float32 kernel's sums accumulate in float64 (a float32 sum of 14,336 terms errs by
    ~1e-6, above the stopping threshold ``tol / n``), with no float64 copy of the kernel. ``buf``: a
    float64 ``[_rows(n), n]`` block to convert into (else a new one per block)."""
    n, step = K.shape[0], _rows(K.shape[1])
    if K.dtype == torch.float64:
        return K.T @ x if transpose else K @ x

    def block(i: int) -> Tensor:
        blk = K[i : i + step]
        return blk.double() if buf is None else buf[: blk.shape[0]].copy_(blk)

    if transpose:
        out = torch.zeros(K.shape[1], dtype=torch.float64, device=K.device)
        for i in range(0, n, step):
            out.addmv_(block(i).T, x[i : i + step])
        return out
    return torch.cat([block(i) @ x for i in range(0, n, step)])


def _sinkhorn_inplace(M: Tensor, reg: float, max_iter: int, tol: float,
                      compact: tuple[Tensor, float] | None = None,
                      rebuild: Callable[[Tensor], object] | None = None, log: bool = False,
                      absorb: tuple[Tensor, Tensor, int] | None = None, done: int = 0) -> Plan:
    """:func:`solve_sinkhorn` for large problems, overwriting ``M`` (``[n, n]``, float32 or float64, or
    the float16 compact cost with its ``compact = (offset, scale)``, see below).

    The same two algorithms as POT's (its iteration order and stopping rule), written so that the
    only ``n x n`` buffer is ``M`` itself: it becomes the kernel ``exp(-R / reg)`` (or ``-R / reg``
    for the log domain) in place and then, for a float32 ``M``, the plan, block by block; every
    other temporary is a vector or a block of rows, and the scalings, sums and diagnostics are
    float64. A float64 ``M`` keeps a separate float32 plan. At Llama-3.1-8B's 14,336 neurons that
    is 0.8 GB for a float32 cost, where POT's ``sinkhorn`` holds about five 1.6 GB matrices
    (``benchmarks/README.md``, "Scale").

    ``R`` is the normalised cost ``M / mean(M)`` reduced by its row minima and then its column
    minima, ``R_ij = M_ij / mean - alpha_i - beta_j >= 0`` with a zero in every row and column: the
    plan is unchanged (a row or column offset is absorbed by the scalings) and the range that
    decides the domain is usually much smaller than the shifted cost's. The kernel domain is used
    below :data:`KERNEL_MAX_RANGE` (float64) or :data:`KERNEL_MAX_RANGE_F32` (float32 and bfloat16).

    ``rebuild(M)`` (what :func:`solve_sinkhorn` passes: a copy from the caller's cost, or the
    :class:`SqDistCost` computing it again) writes the original cost back into ``M``. With it, a
    float32 or bfloat16 kernel is used up to :data:`KERNEL_MAX_RANGE` too, although entries beyond
    ``exp(-87)`` underflow: real weights at the default ``reg`` land there (a reduced range of
    100-600), where the log domain costs ~25x the kernel domain's time (``benchmarks/README.md``,
    "Precision and memory"). Every entry stored below float32's smallest normal ``t`` differs from
    the true kernel by less than ``t``, so at the final scalings row ``i`` of the true plan differs
    from the stored one by at most ``u_i t sum_{j underflowed} v_j`` (columns alike,
    :func:`_lost_bound`): evaluated every :data:`UNDERFLOW_PROBE` iterations and after the last one.
    When it exceeds :data:`UNDERFLOW_TOL` of a marginal, the cost is rebuilt into ``M`` and the kernel
    re-formed with the current scalings absorbed (``absorb = (log u - log a, log v - log a,
    count)``: ``K~_ij = u_i K_ij v_j / a^2`` from the true cost, so that what underflows now is plan
    mass below ``t``), and the iterations go on from there (Schmitzer's stabilised Sinkhorn, one
    absorption per rebuild; ``done`` counts the iterations before it, and at least
    :data:`UNDERFLOW_PROBE` more run after one). On Gemma-3's real weights this is needed (the
    truncated kernel's scalings grow to 1e30; ``benchmarks/README.md``). After :data:`ABSORB_MAX`
    absorptions, or on non-finite scalings, the cost is rebuilt once more and solved in the log
    domain (``log=True``).

    ``compact``: ``M`` is :meth:`SqDistCost.matrix`'s float16 form (the cost is
    ``offset[i] + scale * M_ij``; what :func:`solve` passes for 16-bit weights), 0.4 GB at 8B. Its
    rows are already reduced; ``R`` is formed block by block in float32. The kernel (kernel domain)
    is written over it in **bfloat16** (same width, float32's range: the kernel of a cost perturbed
    by at most ``reg * 2^-9`` of the mean cost per entry; the stored float16 cost errs by ``2^-11`` of
    each reduced entry), and then the plan in **float16**, each column divided by a power of two
    (:attr:`Plan.dense_scale`; 11 bits): one 0.4 GB buffer in all (``benchmarks/README.md``,
    "Precision and memory", measures what that does to fused layers of real weights).
    """
    n = M.shape[0]
    step = _rows(n)
    # a float64 sum over blocks (M.sum(dtype=float64) would convert the whole matrix first)
    total = sum(float(M[i : i + step].sum(dtype=torch.float64)) for i in range(0, n, step))
    if compact is None:
        identity = float(torch.diagonal(M).double().mean())
        scale = total / (n * n)
        if scale > 0:
            M.div_(scale)
        alpha = M.amin(dim=1)
        M.sub_(alpha[:, None])
        beta = M.amin(dim=0)
        M.sub_(beta[None, :])
        alpha, beta = alpha.double(), beta.double()
        rmax = float(M.max())
    else:
        offset, unit = compact[0].to(M.device, torch.float64), float(compact[1])
        identity = float((offset + unit * torch.diagonal(M).double()).mean())
        scale = (float(offset.sum()) * n + unit * total) / (n * n)
        div = scale if scale > 0 else 1.0
        unit /= div
        cmin = M.amin(dim=0).float()  # (every row's minimum is already 0)
        alpha, beta = offset / div, cmin.double() * unit
        rmax = float((M.amax(dim=0).float() - cmin).max()) * unit

        def reduced(i: int, k: int) -> Tensor:  # a float32 block of R (a copy: M's rows may then be rewritten)
            return M[i : i + k].float().sub_(cmin).mul_(unit)
    a = 1.0 / n
    stop = tol / n
    # a float32 / bfloat16 kernel may underflow only where it can be certified and undone (rebuild)
    limit = KERNEL_MAX_RANGE if M.dtype == torch.float64 or rebuild is not None else KERNEL_MAX_RANGE_F32
    lost = 0.0  # (the underflow bound of an accepted float32 / bfloat16 kernel)
    if rmax / reg < limit and not log:
        name = "sinkhorn"
        if absorb is not None:  # K~ = u K v / a^2 for the scalings reached: exponents in float64
            lu, lv = absorb[0].to(M.device), absorb[1].to(M.device)
            K = M if compact is None else M.view(torch.bfloat16)
            for i in range(0, n, step):
                blk = M[i : i + step].double() if compact is None else reduced(i, step).double()
                K[i : i + step] = blk.mul_(-1.0 / reg).add_(lu[i : i + step, None]).add_(lv[None, :]).exp_()
                del blk
        elif compact is None:
            K = M.mul_(-1.0 / reg).exp_()  # M is now the kernel
        else:
            K = M.view(torch.bfloat16)
            for i in range(0, n, step):
                K[i : i + step] = reduced(i, step).mul_(-1.0 / reg).exp_()
        # a float32 / bfloat16 kernel with underflowed entries is checked (rebuild: see limit above)
        check = rebuild is not None and K.dtype != torch.float64 and \
            any(bool((K[i : i + step] < torch.finfo(torch.float32).tiny).any()) for i in range(0, n, step))
        count = absorb[2] if absorb is not None else 0

        def again(u: Tensor, v: Tensor, used: int) -> Plan:  # rebuild the cost; absorb u, v or go to the log domain
            rebuild(M)
            if count >= ABSORB_MAX or not bool(torch.isfinite(u).all() and torch.isfinite(v).all()):
                return _sinkhorn_inplace(M, reg, max_iter, tol, compact, log=True)
            la = math.log(a)
            lu, lv = (absorb[0], absorb[1]) if absorb is not None else (0.0, 0.0)
            return _sinkhorn_inplace(M, reg, max_iter, tol, compact, rebuild,
                                     absorb=(lu + u.log() - la, lv + v.log() - la, count + 1), done=done + used)

        try:
            # (after an absorption at least UNDERFLOW_PROBE more iterations, even past max_iter: the
            # scalings absorbed from a truncated kernel are not a plan of the true one yet)
            u, v = _kernel_scalings(K, max(max_iter - done, UNDERFLOW_PROBE if absorb is not None else 0), stop, wide=True,
                                    probe=(lambda u, v: _lost_bound(K, u, v) > UNDERFLOW_TOL) if check else None)
        except _Underflow as e:
            return again(*e.args)
        lost = _lost_bound(K, u, v) if check else 0.0  # (the final scalings: before K is overwritten)
        if lost > UNDERFLOW_TOL:
            return again(u, v, max_iter - done)
    else:
        name = "sinkhorn_log"
        if compact is None:
            M.mul_(-1.0 / reg)

            def log_kernel(i: int, k: int) -> Tensor:
                return M[i : i + k]
        else:
            def log_kernel(i: int, k: int) -> Tensor:
                return reduced(i, k).mul_(-1.0 / reg)
        la = math.log(a)
        f = torch.zeros(n, dtype=torch.float64, device=M.device)
        g = f.clone()
        for it in range(max_iter):
            g = la - _col_lse(log_kernel, n, f)
            f = la - _row_lse(log_kernel, n, g)
            if it % 10 == 0 and float((torch.exp(_col_lse(log_kernel, n, f) + g) - a).norm()) < stop:
                break
    def plan_rows(i: int, k: int) -> tuple[Tensor, float]:  # float64 rows of P, and their <P, R>
        if name == "sinkhorn":  # blk is K: P = u K v, and R = -reg log K
            blk = K[i : i + k].double()
            Pb = blk * u[i : i + k, None] * v[None, :]
            # (an underflowed entry is 0 in P: its log is never used)
            return Pb, float((Pb * torch.log(blk.clamp_min_(1e-300))).sum()) * -reg
        blk = log_kernel(i, k).double()  # -R / reg
        Pb = torch.exp(blk + f[i : i + k, None] + g[None, :])
        return Pb, float((Pb * blk).sum()) * -reg

    # the plan's diagnostics in float64, block by block; then the plan, over M (each block of rows is
    # read before the plan's rows overwrite it)
    rows = torch.empty(n, dtype=torch.float64, device=M.device)
    cols = torch.zeros(n, dtype=torch.float64, device=M.device)
    colmax = torch.zeros(n, dtype=torch.float64, device=M.device)
    cost = 0.0  # <P, R>
    col_scale = None
    # float32 over a float32 M; float16 over a compact M, column j divided by a power of two >= its
    # largest entry (known after a first pass); float64 M: a separate float32 plan
    P = M if M.dtype != torch.float64 else torch.empty(n, n, dtype=torch.float32, device=M.device)
    for i in range(0, n, step):
        Pb, c = plan_rows(i, step)
        cost += c
        rows[i : i + step] = Pb.sum(dim=1)
        cols += Pb.sum(dim=0)
        colmax = torch.maximum(colmax, Pb.amax(dim=0))
        if compact is None:
            P[i : i + step] = Pb  # (when P is M: these rows of the kernel are no longer needed)
        del Pb
    if name == "sinkhorn" and absorb is not None:  # -reg log K~ = R - reg (lu_i + lv_j)
        cost += reg * (float(rows @ absorb[0].to(rows)) + float(cols @ absorb[1].to(cols)))
    if compact is not None:
        col_scale = torch.exp2(torch.ceil(torch.log2(colmax.clamp_min(1e-300))))
        for i in range(0, n, step):
            P[i : i + step] = plan_rows(i, step)[0].div_(col_scale)
    cost += float(rows @ alpha) + float(cols @ beta)  # <P, M / mean> = <P, R> + <P 1, alpha> + <P^T 1, beta>
    return Plan(
        cost=cost * (scale if scale > 0 else 1.0),
        identity_cost=identity,
        marginal_error=max(float((rows * n - 1).abs().max()), float((cols * n - 1).abs().max())) + lost,
        sharpness=float(colmax.mean() * n),
        solver=name,
        dense=P,
        dense_scale=col_scale,
    )


def solve_sinkhorn(M: Tensor, reg: float = 0.01, max_iter: int = 3000, tol: float = 1e-4,
                   overwrite: bool = False, compact: tuple[Tensor, float] | None = None,
                   rebuild: Callable[[Tensor], object] | None = None) -> Plan:
    """Entropic OT (POT) on ``M / mean(M)`` with regularisation ``reg``, on the cost's device.

    The normalised cost is shifted by its minimum (which leaves the plan unchanged). When its range
    over ``reg`` is below :data:`KERNEL_MAX_RANGE`, the kernel-domain algorithm
    (``method="sinkhorn"``) runs in float64: ``exp(-M / reg)`` cannot underflow there, and it is an
    order of magnitude faster than the log domain (13x on SmolLM2's 1,536-neuron problems, same
    plan to 6e-6). Otherwise the problem goes to :func:`_sinkhorn_inplace` on a float64 copy: it
    reduces the cost by its row and column minima (the same plan), which usually brings the range
    back into the float64 kernel domain; where it does not, it runs the log domain in float64 (POT's
    log domain, which this replaced, was 5-25x slower on real weights: ``benchmarks/README.md``,
    "Precision and memory"). Stops when the relative marginal error is about
    ``tol`` or after ``max_iter`` iterations; the caller checks ``Plan.marginal_error``.

    Problems with more than :data:`INPLACE_MIN_ENTRIES` entries run in place
    (:func:`_sinkhorn_inplace`); ``overwrite=True`` lets them use ``M``'s memory (else a copy).
    ``compact = (offset, scale)``: ``M`` is the float16 compact cost of :meth:`SqDistCost.matrix`
    (the cost is ``offset[i] + scale * M_ij``); in place it becomes a bfloat16 kernel, then a
    column-scaled float16 plan. ``rebuild(out)``: writes ``M`` again into ``out`` (see
    :func:`_sinkhorn_inplace`; needed only when ``M`` itself is overwritten, a copy is rebuilt from
    ``M``): without it an overwritten float32 or bfloat16 kernel keeps to the range where nothing
    underflows.
    """
    n = M.shape[0]
    if compact is not None and n * n <= INPLACE_MIN_ENTRIES:  # small: the float64 cost, as usual
        M, compact = compact[0].to(M.device, torch.float64)[:, None] + float(compact[1]) * M.double(), None
    if n == 1:
        return _finish(torch.ones(1, 1, dtype=torch.float64), M.detach().cpu(), "sinkhorn")
    if n * n > INPLACE_MIN_ENTRIES:
        if compact is not None:
            if M.dtype != torch.float16:
                raise ValueError(f"a compact cost is float16, not {M.dtype}")
            own = overwrite and M.is_contiguous()
            work = M.detach() if own else M.detach().clone(memory_format=torch.contiguous_format)
        else:
            wide = M.dtype == torch.float64
            own = overwrite and M.dtype in (torch.float32, torch.float64) and M.is_contiguous()
            work = M.detach() if own else M.detach().to(torch.float64 if wide else torch.float32, copy=True)
        if not own:
            def rebuild(out: Tensor, _src: Tensor = M.detach()) -> None:
                out.copy_(_src)
        return _sinkhorn_inplace(work, reg, max_iter, tol, compact, rebuild)
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
        # out of the kernel's range as shifted: the in-place solver on a float64 copy. It reduces the
        # cost by its row and column minima first, which on real weights brings the range back under
        # KERNEL_MAX_RANGE (float64 kernel domain, the algorithm above); else it runs the log domain.
        # POT's log domain took 5-25x longer (benchmarks/README.md, "Precision and memory").
        del Mn
        plan = _sinkhorn_inplace(Md.clone(), reg, max_iter, tol)
        return replace(plan, dense=plan.dense.to(torch.float64))  # (small: float64 as above)
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


def solve(M: Tensor, solver: str = "exact", reg: float = 0.01, max_iter: int = 3000, overwrite: bool = False,
          oracle: "SqDistCost | None" = None, tol: float = 1e-4) -> Plan:
    """Dispatch on ``solver`` (``"exact"`` or ``"sinkhorn"``); ``overwrite``: ``M`` may be used as
    scratch memory (see :func:`solve_sinkhorn`); ``oracle``: the :class:`SqDistCost` that made ``M``
    (exact: the true cost it approximates, see :func:`solve_exact`; Sinkhorn: ``M``'s compact form);
    ``tol``: Sinkhorn's stopping rule (:func:`solve_sinkhorn`)."""
    if solver == "exact":
        return solve_exact(M, oracle)
    if solver == "sinkhorn":
        compact = oracle.compact if oracle is not None else None
        rebuild = None
        if oracle is not None:
            def rebuild(out: Tensor) -> None:  # the same matrix again, into the solver's buffer
                oracle.matrix(out.dtype if compact is None else None, compact=compact is not None, out=out)
        return solve_sinkhorn(M, reg=reg, max_iter=max_iter, tol=tol, overwrite=overwrite, compact=compact, rebuild=rebuild)
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


def _add_chunked_products(ob: Tensor, a: Tensor, B: Tensor, tmp: Tensor) -> None:
    """``ob += a @ B.T``, summed over chunks of :data:`CHUNK_K` features, each product into the fresh
    buffer ``tmp`` then added: the summation :meth:`SqDistCost.error_bounds` bounds."""
    t = tmp.view(-1)[: a.shape[0] * B.shape[0]].view(a.shape[0], B.shape[0])  # contiguous, for out=
    for k in range(0, a.shape[1], CHUNK_K):
        torch.mm(a[:, k : k + CHUNK_K], B[:, k : k + CHUNK_K].T, out=t)
        ob.add_(t)


def _sq_dists_from(dots: Tensor, na: Tensor, nb: Tensor, s2: float) -> Tensor:
    """``(-2 a.b + |a|^2 + |b|^2) s^2``, clamped at 0, in float64, for a block of rows of dot products."""
    return dots.to(torch.float64).mul_(-2.0).add_(na[:, None]).add_(nb[None, :]).clamp_min_(0.0).mul_(s2)


def _sq_norms(X: Tensor) -> Tensor:
    """Squared row norms of ``X`` in float64, over row blocks (no full-size temporary)."""
    step = _rows(X.shape[1])
    return torch.cat([X[i : i + step].square().sum(1, dtype=torch.float64) for i in range(0, X.shape[0], step)])


class SqDistCost:
    r"""Squared distances between units from per-unit feature blocks: a fast matrix and exact entries.

    Unit *i*'s feature vector is the concatenation of ``parts_a[r][i]`` over ``r`` (never built).

    :meth:`matrix` computes all ``n_a x n_b`` distances in **float32** arithmetic when no input is
    float64 (bf16/fp16 weights are exact in float32; fp32 weights stay as they are), one role and
    one block of rows at a time, with only one role of ``b`` and one block of ``a`` converted:
    never a float64 copy of a layer. It is 2x faster than float64 on a CPU and halves the
    ``n x n`` buffer (0.8 GB at Llama-3.1-8B's 14,336 neurons). Inputs are first divided by a power
    of two ``s >= max |x|`` (exact), so float32 cannot overflow.

    :meth:`exact` gives the *true* costs (float64 arithmetic on the stored weights) of chosen
    entries, and :meth:`error_bounds` a rigorous bound ``ea_i + eb_j`` on ``|matrix - true|`` per
    entry: what :func:`solve_exact` needs to certify an assignment found on the float32 matrix.
    """

    def __init__(self, parts_a: list[Tensor], parts_b: list[Tensor], device: str | torch.device | None = None):
        self.parts_a = [p.detach().reshape(p.shape[0], -1) for p in parts_a]
        self.parts_b = [p.detach().reshape(p.shape[0], -1) for p in parts_b]
        self.device = torch.device(device) if device is not None else self.parts_a[0].device
        wide = any(p.dtype == torch.float64 for p in self.parts_a + self.parts_b)
        self.cdt = torch.float64 if wide else torch.float32
        self.s = _pow2_scale(self.parts_a + self.parts_b)
        self.features = sum(p.shape[1] for p in self.parts_a)
        self.band = 0
        self.repair = 0.0
        self._norms: tuple[Tensor, Tensor] | None = None
        self._terms = self.features + len(self.parts_a)
        #: ``(sigma, true costs of row i -> sigma[i])`` from the last certificate (reused for the plan cost)
        self.sigma_cost: tuple[Tensor, Tensor] | None = None
        #: after ``matrix(compact=True)``: ``(offset, scale)``, the stored entry ``(i, j)`` stands for
        #: ``(cost_ij - offset[i]) / scale`` (``offset``: float64 row minima on the CPU)
        self.compact: tuple[Tensor, float] | None = None
        #: ``(keys i * n + j, true costs)`` the last certificate computed (what :func:`_resolve_true` starts from)
        self.known: tuple[Tensor, Tensor] | None = None

    def _conv(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return t.to(self.device, dtype or self.cdt, copy=True).div_(self.s)

    def matrix(self, out_dtype: torch.dtype | None = None, block: int = 1024, compute: torch.dtype | None = None,
               compact: bool = False, out: Tensor | None = None) -> Tensor:
        """All distances, ``[n_a, n_b]`` in ``out_dtype`` (default: the compute dtype, float32 unless
        an input is float64), on ``device``. ``compute=torch.float64``: float64 arithmetic (the
        certificate's fallback), still one block converted at a time.

        ``compact=True`` (what the exact solver uses): the same arithmetic, stored in **float16**,
        half the float32 matrix (392 instead of 784 MiB at Llama-3.1-8B's 14,336 neurons). Each row
        is reduced by its minimum and all by one power-of-two scale (:attr:`compact` records both;
        neither changes an assignment), so an entry is at most :data:`COMPACT_MAX` and the entries
        an assignment can use, the small reduced ones, keep float16's 11 bits *relative to their
        own size*; :func:`_certify_true` adds that rounding to its error bound. Rows are finished
        one block at a time (all roles and columns of a block of ``block`` rows, accumulated in
        float32), so ``b`` is converted once per row block instead of once. ``out``: write into this
        contiguous ``[n_a, n_b]`` tensor of the result's dtype (what the in-place Sinkhorn rebuilds its
        cost into) instead of a new one."""
        prec = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # IEEE float32 (no TF32): error_bounds() relies on it
        cdt = self.cdt
        self.cdt = compute or cdt
        self.compact = None
        try:
            if out is not None:
                want = torch.float16 if compact else (out_dtype or self.cdt)
                if out.dtype != want or tuple(out.shape) != (self.parts_a[0].shape[0], self.parts_b[0].shape[0]) \
                        or not out.is_contiguous():
                    raise ValueError(f"out must be a contiguous {want} [n_a, n_b] tensor, not {out.dtype} {tuple(out.shape)}")
            return self._compact_matrix(block, out) if compact else self._matrix(out_dtype, block, out)
        finally:
            torch.set_float32_matmul_precision(prec)
            self.cdt = cdt

    def _matrix(self, out_dtype: torch.dtype | None, block: int, out: Tensor | None = None) -> Tensor:
        n_a, n_b = self.parts_a[0].shape[0], self.parts_b[0].shape[0]
        dev, cdt = self.device, self.cdt
        out = torch.zeros(n_a, n_b, dtype=out_dtype or cdt, device=dev) if out is None else out.zero_()
        na = torch.zeros(n_a, dtype=torch.float64, device=dev)
        nb = torch.zeros(n_b, dtype=torch.float64, device=dev)
        # the products over chunks of CHUNK_K features, each into a fresh buffer, then added: a dot
        # product of F terms then errs by at most gamma_(CHUNK_K + chunks) instead of gamma_F
        # (error_bounds), 23x tighter at F = 12,288, so the certificate's band of entries recomputed
        # exactly is ~20x smaller; 10-15% slower than one product per role (rows in blocks of 256,
        # so the buffer stays in cache)
        # b is converted in blocks of COST_COLS units too, not one whole role at a time: a converted
        # role of Llama-3.1-8B's MLP is 14,336 x 4,096 float32 = 235 MB on top of the n x n output
        # (the products are the same; only which output columns one product fills changes)
        rb = min(block, 256)
        cb = min(n_b, COST_COLS)
        tmp = torch.empty(rb, cb, dtype=cdt, device=dev)
        for pa, pb in zip(self.parts_a, self.parts_b):
            for j in range(0, n_b, cb):
                B = self._conv(pb[j : j + cb])
                nb[j : j + cb] += _sq_norms(B)
                nbj = B.shape[0]
                for i in range(0, n_a, rb):
                    A = self._conv(pa[i : i + rb])
                    if j == 0:
                        na[i : i + rb] += _sq_norms(A)
                    _add_chunked_products(out[i : i + rb, j : j + nbj], A, B, tmp)
                    del A
                del B
        del tmp
        self._terms = self._chunked_terms()
        s2 = self.s * self.s
        step = _rows(n_b)
        for i in range(0, n_a, step):  # -2 ab + |a|^2 + |b|^2, in float64 per block, then rounded once
            out[i : i + step] = _sq_dists_from(out[i : i + step], na[i : i + step], nb, s2)
        self._norms = (na * s2, nb * s2)
        return out

    def _compact_matrix(self, block: int, out: Tensor | None = None) -> Tensor:
        n_a, n_b = self.parts_a[0].shape[0], self.parts_b[0].shape[0]
        dev, cdt = self.device, self.cdt
        s2 = self.s * self.s
        # every |x / s| <= 1, so a squared distance is at most 2 (|a|^2 + |b|^2) <= 4 F s^2: one scale
        # for all rows, known before the first is stored (the small entries stay normal float16s)
        scale = 2.0 ** math.ceil(math.log2(4.0 * max(self.features, 1) * s2 / COMPACT_MAX)) if s2 > 0 else 1.0
        out = torch.empty(n_a, n_b, dtype=torch.float16, device=dev) if out is None else out
        offset = torch.empty(n_a, dtype=torch.float64, device=dev)
        na = torch.zeros(n_a, dtype=torch.float64, device=dev)
        nb = torch.zeros(n_b, dtype=torch.float64, device=dev)
        rb, cb = 256, min(n_b, COMPACT_COLS)
        ro = max(rb, min(block, n_a))
        acc = torch.empty(min(ro, n_a), n_b, dtype=cdt, device=dev)
        tmp = torch.empty(rb, cb, dtype=cdt, device=dev)
        step = _rows(n_b)
        for i0 in range(0, n_a, ro):
            rows = min(ro, n_a - i0)
            ac = acc[:rows].zero_()
            for pa, pb in zip(self.parts_a, self.parts_b):  # the same chunked float32 sums as _matrix
                A = self._conv(pa[i0 : i0 + rows])
                na[i0 : i0 + rows] += _sq_norms(A)
                for j in range(0, n_b, cb):
                    B = self._conv(pb[j : j + cb])
                    if i0 == 0:
                        nb[j : j + cb] += _sq_norms(B)
                    nbj = B.shape[0]
                    for i in range(0, rows, rb):
                        _add_chunked_products(ac[i : i + rb, j : j + nbj], A[i : i + rb], B, tmp)
                    del B
                del A
            for i in range(0, rows, step):  # -2 ab + |a|^2 + |b|^2 in float64, less the row minimum, scaled
                r = slice(i0 + i, i0 + min(i + step, rows))
                blk = _sq_dists_from(ac[i : i + step], na[r], nb, s2)
                lo = blk.amin(1)
                offset[r] = lo
                out[r] = blk.sub_(lo[:, None]).div_(scale)
                del blk
        del acc, tmp
        self._terms = self._chunked_terms()
        self._norms = (na * s2, nb * s2)
        self.compact = (offset.cpu(), scale)
        return out

    def _chunked_terms(self) -> int:
        """Terms of the error bound of :func:`_add_chunked_products` over all roles: ``K`` + chunks."""
        kc = CHUNK_K
        return min(kc, max(p.shape[1] for p in self.parts_a)) + sum(-(-p.shape[1] // kc) for p in self.parts_b)

    def error_bounds(self) -> tuple[Tensor, Tensor]:
        """``ea, eb`` (float64, CPU): ``|matrix()_ij - exact_ij| <= ea_i + eb_j`` for every entry.

        The dot product is summed in chunks of at most ``K =`` :data:`CHUNK_K` features, each chunk
        in any order into a fresh buffer, error at most ``gamma_K sum_chunk |a_k b_k|`` (Higham,
        Thm 3.5), then the ``R`` chunk results are added one by one, one rounding each, so the whole
        errs by at most ``gamma_{K+R} sum |a_k b_k| <= gamma (|a|^2 + |b|^2) / 2`` (``gamma_{12,288}``
        with one product per role; ``gamma_536`` in chunks, for Llama-3.1-8B's 12,288 features);
        the norms, the float64 combination and the final rounding add a few units ``u``. The bound used, ``2 (gamma + 8u) (|a|^2 + |b|^2)``, covers all with a margin."""
        if self._norms is None:
            raise RuntimeError("internal: error_bounds() before matrix()")
        u = 2.0**-24 if self.cdt == torch.float32 else 2.0**-53
        m = self._terms
        gamma = m * u / (1 - m * u)
        f = 2.0 * (gamma + 8 * u)
        na, nb = self._norms
        return (na * f).cpu(), (nb * f).cpu()

    def exact_pairs(self, r: Tensor, c: Tensor) -> Tensor:
        """:meth:`exact` over many pairs, 65,536 at a time (bounded temporaries)."""
        step = 1 << 16
        if not len(r):
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([self.exact(r[k : k + step], c[k : k + step]) for k in range(0, len(r), step)])

    def stored(self, r: Tensor, t: Tensor) -> Tensor:
        """True costs ``t`` of rows ``r`` in the compact matrix's units, ``(t - offset_r) / scale``."""
        offset, scale = self.compact
        return (t - offset[r]) / scale

    def exact_stored(self, r: Tensor, c: Tensor) -> Tensor:
        """:meth:`exact_pairs` in the compact matrix's units (:meth:`stored`)."""
        return self.stored(r, self.exact_pairs(r, c))

    def exact(self, r: Tensor, c: Tensor, chunk: int | None = None) -> Tensor:
        """True squared distances of the pairs ``(r[k], c[k])``, float64 on the CPU.

        On the CPU, in buffers of ~0.5 MB (no allocation above glibc's mmap threshold as streaming
        sets it, 1 MiB: there every larger temporary is a fresh mmap, 3.7x slower) and without a copy
        of any layer: a row-major block (``gate``, ``up``) is gathered by rows; a block that is a
        transposed view (``down.T``: a unit is a *column* of ``down``) is read row by row of
        ``down``, gathering the pairs' columns from each row, since gathering strided columns
        directly is 4x slower (1.0 -> 0.25 s for 6,000 pairs of 12,288 bf16 features)."""
        out = torch.zeros(len(r), dtype=torch.float64)
        if any(p.device.type != "cpu" for p in self.parts_a + self.parts_b):
            step = chunk or max(1, _BLOCK_BYTES // (16 * self.features or 1))
            for k in range(0, len(r), step):
                rr, cc = r[k : k + step], c[k : k + step]
                for pa, pb in zip(self.parts_a, self.parts_b):
                    d = pa[rr.to(pa.device)].to("cpu", torch.float64) - pb[cc.to(pb.device)].to("cpu", torch.float64)
                    out[k : k + step] += d.square_().sum(1)
            return out
        cols = [pa.stride(0) == 1 and pa.shape[1] > 1 and pb.stride(0) == 1 for pa, pb in zip(self.parts_a, self.parts_b)]
        width = max([p.shape[1] for p, t in zip(self.parts_a, cols) if not t] + [1])
        step = chunk or max(1, _EXACT_BYTES // (8 * width))
        for k in range(0, len(r), step):  # row-major blocks: pairs in chunks, one gather per chunk and block
            rr, cc = r[k : k + step], c[k : k + step]
            for pa, pb, t in zip(self.parts_a, self.parts_b, cols):
                if not t:
                    d = pa.index_select(0, rr).to(torch.float64).sub_(pb.index_select(0, cc).to(torch.float64))
                    out[k : k + step] += d.square_().sum(1)
        pstep = 1 << 16  # transposed blocks: pairs in chunks of 65,536, rows of the base matrix in blocks
        for pa, pb, t in zip(self.parts_a, self.parts_b, cols):
            if not t:
                continue
            ba, bb = pa.T, pb.T  # row-major [features, units]
            for k in range(0, len(r), pstep):
                rr, cc = r[k : k + pstep], c[k : k + pstep]
                kb = max(1, _EXACT_BYTES // (8 * len(rr)))
                acc = torch.zeros(len(rr), dtype=torch.float64)
                for f in range(0, ba.shape[0], kb):
                    d = ba[f : f + kb].index_select(1, rr).to(torch.float64).sub_(bb[f : f + kb].index_select(1, cc).to(torch.float64))
                    acc += d.square_().sum(0)
                out[k : k + pstep] += acc
        return out


def sq_dists(A: Tensor, B: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``A`` and ``B``, float64 (see
    :func:`pairwise_sq_dists` for the compute precision)."""
    return pairwise_sq_dists([A], [B])

"""OT alignment invariants: shuffled blocks are recovered, a block fused with itself is returned."""

import math

import pytest
import torch

from hf_deepen import UpscaleConfig
from hf_deepen.align import align_layers, solve_exact, solve_sinkhorn, sq_dists
from hf_deepen.arch import get_spec
from hf_deepen.fuse import make_layer

from conftest import tiny_model


def canon_of(model, i):
    spec = get_spec(model)
    canon, unknown = spec.to_canonical(model.model.layers[i].state_dict())
    assert unknown == []
    return spec, spec.head_shape(model.config), {k: v.detach().double() for k, v in canon.items()}


def shuffle(canon, shape, seed=0):
    """Permute KV groups, query heads inside each group, and MLP neurons, consistently."""
    g = torch.Generator().manual_seed(seed)
    hkv, G, hd = shape.num_kv_heads, shape.group_size, shape.head_dim
    pg = torch.randperm(hkv, generator=g)
    pq = torch.stack([torch.randperm(G, generator=g) for _ in range(hkv)])
    q_heads = torch.cat([pg[j] * G + pq[j] for j in range(hkv)])  # new head h <- old head q_heads[h]
    rows_q = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    rows_kv = (pg[:, None] * hd + torch.arange(hd)).reshape(-1)
    pn = torch.randperm(canon["up"].shape[0], generator=g)
    out = dict(canon)
    out["q"] = canon["q"][rows_q]
    if "q_bias" in canon:
        out["q_bias"] = canon["q_bias"][rows_q]
    for r in ("k", "v", "k_bias", "v_bias"):
        if r in canon:
            out[r] = canon[r][rows_kv]
    out["o"] = canon["o"][:, rows_q]
    for r in ("gate", "up"):
        out[r] = canon[r][pn]
    out["down"] = canon["down"][:, pn]
    assert not torch.equal(out["up"], canon["up"]) and not torch.equal(out["q"], canon["q"])
    return out


@pytest.mark.parametrize("kind", ["mha", "gqa", "qwen2"])
def test_exact_recovers_shuffled_block(kind):
    model = tiny_model(kind)
    spec, shape, a = canon_of(model, 2)
    b = shuffle(a, shape)
    al = align_layers(a, b, shape, "exact")
    aligned = al.apply(a)
    for k in b:
        assert torch.equal(aligned[k], b[k]), k
    assert al.neurons.cost == pytest.approx(0.0, abs=1e-9)
    assert al.neurons.identity_cost > 0.1


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_sinkhorn_recovers_shuffled_block_at_small_reg(kind):
    model = tiny_model(kind)
    spec, shape, a = canon_of(model, 3)
    b = shuffle(a, shape, seed=5)
    al = align_layers(a, b, shape, "sinkhorn", reg=1e-3, max_iter=3000)
    aligned = al.apply(a)
    for k in b:
        torch.testing.assert_close(aligned[k], b[k], atol=1e-4, rtol=0), k
    assert al.neurons.marginal_error < 1e-3
    assert al.neurons.sharpness > 0.999


def test_sinkhorn_is_stable_on_raw_cost_scale():
    # a cost of magnitude 1e4 would underflow a plain-domain Sinkhorn at reg 0.06 (the reference script)
    torch.manual_seed(0)
    X = torch.randn(64, 32) * 30
    perm = torch.randperm(64)
    M = sq_dists(X, X[perm])
    plan = solve_sinkhorn(M, reg=0.01)
    assert plan.marginal_error < 1e-3
    assert abs(plan.matrix.sum().item() - 1.0) < 1e-3
    assert torch.equal(plan.permutation, solve_exact(M).permutation)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_fusing_a_block_with_itself_returns_it(kind, solver):
    model = tiny_model(kind)
    _, shape, a = canon_of(model, 1)
    cfg = UpscaleConfig(method="opt", solver=solver, sinkhorn_reg=1e-3, zero_init=False)
    res = make_layer("opt", [a, a], shape, cfg)
    for k in a:
        if solver == "exact":
            assert torch.equal(res.canon[k], a[k]), k
        else:
            torch.testing.assert_close(res.canon[k], a[k], atol=1e-4, rtol=0)
    assert res.diagnostics["retained_norm"] == pytest.approx(1.0, abs=1e-4)


def test_alignment_reduces_cost_and_keeps_more_norm_than_average():
    model = tiny_model("gqa")
    _, shape, a = canon_of(model, 1)
    b = shuffle(canon_of(model, 2)[2], shape)  # a different layer, shuffled: the average is poor
    res = make_layer("opt", [a, b], shape, UpscaleConfig(zero_init=False))
    d = res.diagnostics
    assert d["neurons_cost_ratio"] < 1.0
    assert d["heads_cost_ratio"] <= 1.0
    assert d["retained_norm"] >= d["retained_norm_avg"]


def test_zero_init_zeroes_exactly_the_outputs():
    model = tiny_model("qwen2")
    _, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    res = make_layer("avg", [a, b], shape, UpscaleConfig(method="avg"))
    for r in ("o", "down"):
        assert torch.count_nonzero(res.canon[r]) == 0
    for r in ("q", "k", "v", "q_bias", "gate", "up"):
        assert torch.count_nonzero(res.canon[r]) > 0
    torch.testing.assert_close(res.canon["q"], 0.5 * (a["q"] + b["q"]))


def test_restore_norm_restores_row_norms():
    model = tiny_model("gqa")
    _, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    res = make_layer("avg", [a, b], shape, UpscaleConfig(method="avg", restore_norm=True, zero_init=False))
    want = 0.5 * (a["up"].norm(dim=1) + b["up"].norm(dim=1))
    torch.testing.assert_close(res.canon["up"].norm(dim=1), want)


# ---- scale: Sinkhorn domains, cost precision, device ---------------------------------------------
def test_sinkhorn_kernel_and_log_domains_agree():
    from hf_deepen.align import solvers

    torch.manual_seed(0)
    X = torch.randn(48, 16)
    M = sq_dists(X, X[torch.randperm(48)] + 0.3 * torch.randn(48, 16)).double()
    pot = solve_sinkhorn(M, reg=0.05, tol=1e-7)
    assert pot.solver == "sinkhorn"  # the range of M / mean(M) over reg is far below the limit
    old = solvers.KERNEL_MAX_RANGE, solvers.INPLACE_MIN_ENTRIES
    try:
        # out of range (forced): the small route goes to the in-place solver, which runs the log
        # domain; its kernel domain (forced in place) runs the same iterations on the same reduced cost
        solvers.KERNEL_MAX_RANGE = 0.0
        log = solve_sinkhorn(M, reg=0.05, tol=1e-7)
        solvers.KERNEL_MAX_RANGE, solvers.INPLACE_MIN_ENTRIES = old[0], 0
        kernel = solve_sinkhorn(M, reg=0.05, tol=1e-7)
    finally:
        solvers.KERNEL_MAX_RANGE, solvers.INPLACE_MIN_ENTRIES = old
    assert log.solver == "sinkhorn_log" and kernel.solver == "sinkhorn"
    assert log.matrix.dtype == torch.float64  # (a small problem's plan, as POT's)
    assert kernel.marginal_error < 1e-3 and log.marginal_error < 1e-3
    torch.testing.assert_close(kernel.matrix.double(), log.matrix, atol=1e-9, rtol=1e-6)
    # neither has converged at 3,000 iterations here (marginal error ~2e-4), and the reduced cost
    # starts the iterations elsewhere than POT's shifted one: the plans agree to the iterations' gap
    torch.testing.assert_close(log.matrix, pot.matrix, atol=2e-6, rtol=0)


def test_sinkhorn_falls_back_to_log_domain_on_a_large_range():
    # one far outlier: (max - min) / mean / reg >> 600, exp(-M / reg) would underflow to 0
    torch.manual_seed(0)
    M = torch.rand(32, 32, dtype=torch.float64)
    M[0, 0] = 1e4
    plan = solve_sinkhorn(M, reg=0.01)
    assert plan.solver == "sinkhorn_log"
    assert plan.marginal_error < 1e-3
    assert torch.isfinite(plan.matrix).all()


def test_exact_plan_is_an_assignment_not_a_dense_matrix():
    torch.manual_seed(0)
    M = torch.rand(50, 50, dtype=torch.float64)
    plan = solve_exact(M)
    assert plan.dense is None and plan.is_permutation
    P = plan.matrix
    assert torch.equal(P.argmax(0), plan.permutation)
    assert plan.cost == pytest.approx(float((P * M).sum()), rel=1e-12)
    assert plan.marginal_error == 0.0 and plan.sharpness == 1.0


def test_bf16_costs_use_scaled_float32_and_cannot_overflow():
    from hf_deepen.align.solvers import pairwise_sq_dists

    torch.manual_seed(0)
    A, B = torch.randn(40, 300), torch.randn(50, 300)
    ref = sq_dists(A.double(), B.double())
    # 16-bit inputs: float32 products, float64 result, close to the float64 reference of the same values
    got = pairwise_sq_dists([A.bfloat16()], [B.bfloat16()])
    ref16 = sq_dists(A.bfloat16().double(), B.bfloat16().double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref16, rtol=1e-5, atol=1e-4)
    assert (got - ref).abs().max() < 0.1 * ref.mean()  # bf16 rounding of the inputs, not of the products
    # bf16 reaches 3e38: squares overflow float32 without the power-of-two scaling
    Ab, Bb = A.bfloat16() * 1e30, B.bfloat16() * 1e30
    assert torch.isinf((Ab.float() * Ab.float()).sum(1)).all()  # the naive float32 product overflows
    huge = pairwise_sq_dists([Ab], [Bb])
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, sq_dists(Ab.double(), Bb.double()), rtol=1e-5, atol=0)
    # split features (the neuron view: gate row, up row, down column) equal the concatenation
    parts = pairwise_sq_dists([A[:, :100], A[:, 100:]], [B[:, :100], B[:, 100:]])
    torch.testing.assert_close(parts, ref.to(parts.dtype), rtol=1e-12, atol=1e-9)


def test_device_option(monkeypatch):
    from hf_deepen import ConfigError
    from hf_deepen.config import resolve_device

    assert UpscaleConfig().device == "auto"
    with pytest.raises(ConfigError, match="device"):
        UpscaleConfig(device="tpu")
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no such CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError):
        resolve_device("cuda:1")


def test_explicit_cpu_device_gives_the_same_layer():
    model = tiny_model("gqa")
    _, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    r1 = make_layer("opt", [a, b], shape, UpscaleConfig(zero_init=False, device="cpu"))
    r2 = make_layer("opt", [a, b], shape, UpscaleConfig(zero_init=False))
    for k in r1.canon:
        assert torch.equal(r1.canon[k], r2.canon[k]), k


def test_sinkhorn_tol_follows_the_new_layers_dtype():
    """The default stopping rule is the output dtype's epsilon (at least 1e-4); a given tol wins."""
    cfg = UpscaleConfig()
    assert cfg.sinkhorn_tol_for(torch.float32) == cfg.sinkhorn_tol_for(torch.float64) == 1e-4
    assert cfg.sinkhorn_tol_for(torch.bfloat16) == 2.0 ** -7 and cfg.sinkhorn_tol_for(torch.float16) == 2.0 ** -10
    assert UpscaleConfig(sinkhorn_tol=1e-6).sinkhorn_tol_for(torch.bfloat16) == 1e-6


def test_sinkhorn_stops_at_its_tol_and_bf16_layers_stop_earlier():
    """A looser tol stops earlier (larger marginal error, still within it), and a bfloat16 layer's
    plans are solved to bfloat16's rule: its fused tensors are those of ``sinkhorn_tol=2**-7``."""
    torch.manual_seed(0)
    M = torch.rand(48, 48, dtype=torch.float64)
    tight, loose = solve_sinkhorn(M, reg=0.01, tol=1e-6), solve_sinkhorn(M, reg=0.01, tol=1e-2)
    assert tight.marginal_error < 1e-6 < loose.marginal_error < 1e-2
    model = tiny_model("gqa")
    _, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    a, b = ({k: v.bfloat16() for k, v in c.items()} for c in (a, b))
    cfg = UpscaleConfig(solver="sinkhorn", sinkhorn_reg=0.01, zero_init=False)
    runs = {tol: make_layer("opt", [dict(a), dict(b)], shape, UpscaleConfig(**{**cfg.to_dict(), "sinkhorn_tol": tol}),
                            dtype=torch.float32) for tol in (1e-6, 2.0 ** -7)}
    auto = make_layer("opt", [dict(a), dict(b)], shape, cfg, dtype=torch.bfloat16)
    assert auto.diagnostics["sinkhorn_tol"] == 2.0 ** -7
    assert runs[2.0 ** -7].diagnostics["neurons_marginal_error"] > runs[1e-6].diagnostics["neurons_marginal_error"]
    for k in auto.canon:
        assert torch.equal(auto.canon[k], runs[2.0 ** -7].canon[k].bfloat16()), k
    assert any(not torch.equal(auto.canon[k], runs[1e-6].canon[k].bfloat16()) for k in ("gate", "up", "down"))


def test_batched_sinkhorn_matches_one_by_one(monkeypatch):
    from hf_deepen.align import solvers
    from hf_deepen.align.solvers import solve_sinkhorn_batch

    torch.manual_seed(0)
    X = torch.randn(6, 5, 8, dtype=torch.float64)
    Ms = torch.stack([sq_dists(x, x[torch.randperm(5)] + 0.2 * torch.randn(5, 8, dtype=torch.float64)) for x in X])
    batch = solve_sinkhorn_batch(Ms, reg=0.05, tol=1e-8)
    for M, p in zip(Ms, batch):
        one = solve_sinkhorn(M, reg=0.05, tol=1e-8)
        assert p.solver == one.solver == "sinkhorn"
        torch.testing.assert_close(p.matrix, one.matrix, atol=1e-6, rtol=1e-4)
        assert p.marginal_error < 1e-4
    # the log domain (taken when any problem is out of range; forced here) gives the same plans
    monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE", 0.0)
    log = solve_sinkhorn_batch(Ms, reg=0.05, tol=1e-8)
    for p, q in zip(log, batch):
        assert p.solver == "sinkhorn_log"
        torch.testing.assert_close(p.matrix, q.matrix, atol=1e-6, rtol=1e-4)


# ---- large problems: Sinkhorn in place, dense plans applied in blocks -------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_inplace_sinkhorn_matches_pot(monkeypatch, domain, dtype):
    """The in-place solver (taken above INPLACE_MIN_ENTRIES, forced here at n=64) converges to
    POT's plan, with the same diagnostics and domain, on a float64 or a float32 cost; it overwrites
    only a cost it may own, and a float32 cost's memory becomes the plan. (Its row and column
    reduction changes the iterates, not the fixed point: both run to convergence here.)"""
    from hf_deepen.align import solvers

    torch.manual_seed(0)
    X = torch.randn(64, 16, dtype=torch.float64)
    M64 = sq_dists(X, X[torch.randperm(64)] + 0.3 * torch.randn(64, 16, dtype=torch.float64))
    M = M64.to(dtype)
    if domain == "log":
        monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE", 0.0)
        monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE_F32", 0.0)
    pot = solve_sinkhorn(M.double(), reg=0.2, tol=1e-9)
    # converged (POT's log domain runs in float32): the comparison below is of fixed points
    assert pot.marginal_error < (1e-8 if domain == "kernel" else 1e-5)
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    monkeypatch.setattr(solvers, "_BLOCK", 10)  # several blocks, a ragged last one
    kept = M.clone()
    mine = solve_sinkhorn(M, reg=0.2, tol=1e-9)
    assert torch.equal(M, kept)  # not asked to overwrite: the caller's cost is untouched
    assert mine.solver == pot.solver == ("sinkhorn" if domain == "kernel" else "sinkhorn_log")
    # (the in-place plan is stored in float32; POT's log domain runs in float32 here)
    assert mine.dense.dtype == torch.float32
    tol = (1e-6 if domain == "kernel" else 2e-3) if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mine.matrix.double(), pot.matrix, atol=tol / 64, rtol=tol)
    for k in ("cost", "identity_cost", "sharpness"):
        assert getattr(mine, k) == pytest.approx(getattr(pot, k), rel=max(tol, 1e-7)), k
    assert mine.marginal_error < 1e-6
    scratch = M.clone()
    again = solve_sinkhorn(scratch, reg=0.2, tol=1e-9, overwrite=True)
    assert not torch.equal(scratch, M)  # its memory was the kernel's
    assert torch.equal(again.dense, mine.dense)
    if dtype == torch.float32:  # ... and then the plan's: one n x n buffer in all
        assert again.dense.data_ptr() == scratch.data_ptr()


def test_inplace_sinkhorn_reduction_keeps_the_kernel_domain(monkeypatch):
    """Row and column offsets (a cost ``c_i + d_j + small``) leave the plan unchanged; the in-place
    solver removes them before choosing the domain, so it stays in the fast kernel domain where
    the min-shifted cost is far out of range (POT's path: log domain), and finds the same plan. The
    small route (below INPLACE_MIN_ENTRIES) hands such problems to it too, on a float64 copy."""
    import ot

    from hf_deepen.align import solvers

    g = torch.Generator().manual_seed(1)
    small = torch.rand(48, 48, generator=g, dtype=torch.float64)  # the structure the plan sees
    M = small + 100.0 * torch.rand(48, 1, generator=g, dtype=torch.float64) + 100.0 * torch.rand(1, 48, generator=g, dtype=torch.float64)
    Mn = M / M.mean()
    Mn -= Mn.min()
    assert float(Mn.max()) / 0.002 > solvers.KERNEL_MAX_RANGE  # POT's kernel would underflow: its log domain
    a = torch.full((48,), 1.0 / 48, dtype=torch.float64)
    pot = ot.sinkhorn(a.float(), a.float(), Mn.float(), 0.002, method="sinkhorn_log", numItermax=20000,
                      stopThr=1e-9 / 48, warn=False).double()  # (what the small route ran before)
    small = solve_sinkhorn(M, reg=0.002, tol=1e-9, max_iter=20000)  # the small route reduces too
    assert small.solver == "sinkhorn" and small.matrix.dtype == torch.float64
    torch.testing.assert_close(small.matrix, pot, atol=1e-5 / 48, rtol=2e-3)
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    for dtype in (torch.float64, torch.float32):
        mine = solve_sinkhorn(M.to(dtype), reg=0.002, tol=1e-9, max_iter=20000)
        assert mine.solver == "sinkhorn", dtype
        assert mine.sharpness > 2.0 / 48  # not the uniform plan: the comparison means something
        torch.testing.assert_close(mine.matrix.double(), pot, atol=1e-5 / 48, rtol=2e-3)
        # <P, M>, with the offsets the reduction took out added back (POT's float32 log domain is
        # the less precise side here, so the cost is checked against the plan itself)
        want = float((mine.matrix.double() * M).sum())
        assert mine.cost == pytest.approx(want, rel=1e-7 if dtype == torch.float64 else 1e-6)  # (P is stored in float32)


def test_plan_move_is_the_barycentric_map(monkeypatch):
    from hf_deepen.align import solvers

    torch.manual_seed(0)
    X = torch.randn(40, 8, dtype=torch.float64)
    M = sq_dists(X, X + 0.5 * torch.randn(40, 8, dtype=torch.float64))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-12)):  # float32 products
        x = torch.randn(40, 3, 5, dtype=dtype)
        for plan in (solve_exact(M), solve_sinkhorn(M, reg=0.05)):
            want = torch.einsum("ij,iab->jab", plan.barycentric, x.double())
            atol = 0 if plan.is_permutation else tol
            got = plan.move(x, dim=0)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # work_dtype
            torch.testing.assert_close(got.double(), want, rtol=atol, atol=atol)
            y = x.permute(1, 2, 0)  # units last
            torch.testing.assert_close(plan.move(y, dim=2).double(), want.permute(1, 2, 0), rtol=atol, atol=atol)
    # a float32 plan (large problems, solved in place; forced here, with ragged blocks)
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    monkeypatch.setattr(solvers, "_BLOCK", 16)
    p32 = solve_sinkhorn(M, reg=0.05)
    assert p32.dense.dtype == torch.float32
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 40, dtype=dtype)
        want = x.double() @ p32.barycentric.double()
        torch.testing.assert_close(p32.move(x, dim=1).double(), want, rtol=1e-5, atol=1e-6)
        assert p32.move(x, dim=1).is_contiguous()


# ---- large exact problems: sparse candidates, certified by LP duality --------------------------------
def _gauss_cost(n, seed=0, noise=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 16, generator=g, dtype=torch.float64)
    B = torch.randn(n, 16, generator=g, dtype=torch.float64)
    if noise is not None:  # B is a noisy shuffle of A
        B = A[torch.randperm(n, generator=g)] + noise * B
    return sq_dists(A, B)


@pytest.mark.parametrize("noise", [None, 0.3])
def test_certified_sparse_assignment_is_the_dense_optimum(monkeypatch, noise):
    from hf_deepen.align import solvers

    M = _gauss_cost(300, noise=noise)
    dense = solve_exact(M)
    monkeypatch.setattr(solvers, "SPARSE_MIN_N", 0)
    monkeypatch.setattr(solvers, "SPARSE_K", 3)  # few candidates: several certification rounds
    calls = []
    real = solvers._assignment_certified
    monkeypatch.setattr(solvers, "_assignment_certified", lambda C: calls.append(real(C)) or calls[-1])
    sparse = solve_exact(M)
    assert calls and calls[0] is not None  # certified, not the dense fallback
    assert sparse.cost == pytest.approx(dense.cost, rel=1e-12)
    assert torch.equal(sparse.assignment, dense.assignment)  # continuous random costs: a unique optimum


def test_certificate_rejects_a_suboptimal_assignment_and_falls_back(monkeypatch):
    from hf_deepen.align import solvers

    C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    r, c = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert solvers._duals(C, torch.tensor([1, 0]), r, c) is None  # swapping back saves 2: a negative cycle
    u, v = solvers._duals(C, torch.tensor([0, 1]), r, c)
    assert bool((C - u[:, None] - v[None, :] >= 0).all())
    monkeypatch.setattr(solvers, "SPARSE_MAX_PASSES", 0)  # out of passes: no certificate, never a wrong one
    assert solvers._duals(C, torch.tensor([0, 1]), r, c) is None
    monkeypatch.undo()
    # no full matching among the candidates (here: every candidate in column 0)
    n = 6
    C = torch.arange(n, dtype=torch.float64)[:, None] + torch.arange(n, dtype=torch.float64)[None, :] ** 1.5
    monkeypatch.setattr(solvers, "_candidates", lambda C, k: torch.arange(n) * n)
    assert solvers._assignment_certified(C) is None
    monkeypatch.setattr(solvers, "SPARSE_MIN_N", 0)
    assert solve_exact(C).cost == pytest.approx(float(C.diagonal().mean()))  # (any assignment is optimal here)


def test_float32_cost_assignment_is_certified_on_the_true_cost(monkeypatch):
    """A float32 cost matrix gives the float64 optimum, certified (the band entries recomputed in
    float64); a matrix as wrong as the error bound allows still gives the true optimum (certified, or
    re-solved on true costs when its own optimum is not the true one, or, without that, the float64
    problem solved instead)."""
    from hf_deepen.align import solvers

    torch.manual_seed(0)
    A = torch.randn(300, 64).bfloat16()
    B = (A.float()[torch.randperm(300)] + 0.7 * torch.randn(300, 64)).bfloat16()
    ref = solvers.solve_exact(solvers.sq_dists(A.double(), B.double()))
    for n_min in (10**9, 16):  # the dense solver, then the sparse candidate graph
        monkeypatch.setattr(solvers, "SPARSE_MIN_N", n_min)
        o = solvers.SqDistCost([A], [B])
        M = o.matrix()
        assert M.dtype == torch.float32
        p = solvers.solve_exact(M, o)
        assert p.certified == "float32+certificate" and p.band > 0
        assert torch.equal(p.assignment, ref.assignment) and p.cost == pytest.approx(ref.cost, rel=1e-12)
        ea, eb = o.error_bounds()
        assert float(((M.double() - solvers.sq_dists(A.double(), B.double())).abs() - ea[:, None] - eb).max()) <= 0
        # a matrix off by up to 0.9x a (looser, still valid) bound, so that its optimum often differs:
        # the certificate must notice
        ea, eb = ea * 3e5, eb * 3e5
        monkeypatch.setattr(o, "error_bounds", lambda: (ea, eb))
        ways = set()
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            noise = (torch.rand(300, 300, generator=g, dtype=torch.float64) * 2 - 1) * 0.9 * (ea[:, None] + eb)
            bad = (solvers.sq_dists(A.double(), B.double()) + noise).float()
            q = solvers.solve_exact(bad, o)
            assert torch.equal(q.assignment, ref.assignment)
            ways.add(q.certified)
        assert "float32+certificate, re-solved" in ways
        monkeypatch.setattr(solvers, "_resolve_true", lambda C, oracle: None)
        q = solvers.solve_exact(bad, o)
        assert torch.equal(q.assignment, ref.assignment)
        ways.add(q.certified)
        assert "float64 fallback" in ways
        monkeypatch.undo()


# ---- the float32 + certificate route at the default sizes (issue 13) --------------------------------
def _units(n, f, seed, dtype=torch.float32, spread=True):
    """``n`` units of ``f`` features with very different norms when ``spread`` (the hub case: raw
    squared distances rank the same short units first in every row)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, f, generator=g)
    if spread:
        X *= torch.exp(torch.randn(n, 1, generator=g))
    return X.to(dtype)


def _ref_assignment(A, B):
    """The float64 plan (upper unit j <- lower unit assignment[j]) of the true costs."""
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(sq_dists(A.double(), B.double()).numpy())
    out = torch.empty(len(c), dtype=torch.int64)
    out[torch.from_numpy(c)] = torch.from_numpy(r)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shuffled_units_are_recovered_by_the_certified_sparse_route(monkeypatch, dtype):
    """A noisy shuffle of units with widely spread norms: the sparse route (centred candidates) finds
    the shuffle, certified on the true cost, without the dense fallback."""
    from hf_deepen.align import solvers

    n = 600
    assert n >= solvers.SPARSE_MIN_N
    A = _units(n, 40, 0, dtype)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    B = (A.float()[perm] + 1e-3 * torch.randn(n, 40)).to(dtype)
    calls = []
    real = solvers._assignment_certified
    monkeypatch.setattr(solvers, "_assignment_certified", lambda C, s=None: calls.append(real(C, s)) or calls[-1])
    o = solvers.SqDistCost([A], [B])
    p = solvers.solve_exact(o.matrix(), o)
    assert calls[0] is not None and p.certified == "float32+certificate"
    assert torch.equal(p.assignment, perm)  # upper unit j is lower unit perm[j]


def test_reduced_candidates_hold_the_optimum_where_raw_ones_do_not():
    """Squared distances of units with spread norms: the raw 8 cheapest per row and column sit on the
    shortest units and miss ~40% of the optimum's edges; ranked on reduced costs they hold most, and
    the certified sparse route returns the float64 optimum."""
    from hf_deepen.align import solvers

    n, k = 400, 8
    g = torch.Generator().manual_seed(0)

    def coverage(A, B):
        C = sq_dists(A, B)
        opt = set((_ref_assignment(A, B) * n + torch.arange(n)).tolist())
        rows = torch.topk(C, k, dim=1, largest=False).indices
        cols = torch.topk(C, k, dim=0, largest=False).indices
        r = torch.cat([torch.arange(n).repeat_interleave(k), cols.reshape(-1)])
        c = torch.cat([rows.reshape(-1), torch.arange(n).repeat(k)])
        key = solvers._candidates(C, k)
        assert len(torch.unique(key)) == len(key) and len(key) <= 5 * k * n
        return len(opt & set((r * n + c).tolist())) / n, len(opt & set(key.tolist())) / n

    spread = lambda: torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64))  # noqa: E731
    A = torch.randn(n, 32, generator=g, dtype=torch.float64) * spread()
    B = torch.randn(n, 32, generator=g, dtype=torch.float64) * spread()
    raw, reduced = coverage(A, B)  # unrelated units
    assert raw < 0.7 and reduced > 0.85
    cert = solvers._assignment_certified(sq_dists(A, B))
    assert cert is not None and torch.equal(torch.argsort(cert[0]), _ref_assignment(A, B))
    A = torch.randn(n, 32, generator=g, dtype=torch.float64)  # related units: a shuffle, noise of spread norms
    B = A[torch.randperm(n, generator=g)] + spread() * torch.randn(n, 32, generator=g, dtype=torch.float64)
    assert coverage(A, B)[1] > 0.9


def test_chunked_product_bound_is_tighter_and_holds(monkeypatch):
    """The float32 matrix summed in feature chunks: its error bound uses K + chunks terms, not F, and
    still bounds the true error entry by entry."""
    from hf_deepen.align import solvers

    monkeypatch.setattr(solvers, "CHUNK_K", 64)
    A, B = [_units(200, 700, 4), _units(200, 3, 5)], [_units(200, 700, 6), _units(200, 3, 7)]
    o = solvers.SqDistCost(A, B)
    M = o.matrix().double()
    assert o._terms == 64 + 11 + 1  # 11 chunks of the first role, 1 of the second
    ea, eb = o.error_bounds()
    T = solvers.sq_dists(torch.cat(A, 1).double(), torch.cat(B, 1).double())
    assert float(((M - T).abs() - ea[:, None] - eb[None, :]).max()) <= 0
    full = solvers.SqDistCost(A, B)
    full._norms = o._norms  # the unchunked bound, for comparison
    assert float(full.error_bounds()[0].max()) > 8 * float(ea.max())


# ---- the compact float16 cost of the exact solver (issue 13: memory) ---------------------------------
def test_compact_cost_is_half_the_memory_and_within_its_bound(monkeypatch):
    """``matrix(compact=True)``: float16 entries, each row reduced by its minimum and all scaled by one
    power of two; every entry is within the float32 bound plus float16's rounding of the true cost in
    those units, and the float16 term is needed (without it the bound fails somewhere)."""
    from hf_deepen.align import solvers

    monkeypatch.setattr(solvers, "CHUNK_K", 64)  # several chunks and row/column blocks on a small problem
    monkeypatch.setattr(solvers, "COMPACT_COLS", 96)
    A = [_units(300, 200, 1, torch.bfloat16), _units(300, 7, 2, torch.bfloat16)]
    B = [_units(300, 200, 3, torch.bfloat16), _units(300, 7, 4, torch.bfloat16)]
    o = solvers.SqDistCost(A, B)
    M = o.matrix(compact=True, block=128)
    assert M.dtype == torch.float16 and M.element_size() == 2
    offset, scale = o.compact
    assert math.log2(scale) == int(math.log2(scale)) and float(M.max()) <= solvers.COMPACT_MAX
    assert float(M.min()) == 0.0 and torch.equal(M.amin(1), torch.zeros(300, dtype=torch.float16))
    T = solvers.sq_dists(torch.cat([a.double() for a in A], 1), torch.cat([b.double() for b in B], 1))
    ref = (T - offset[:, None]) / scale
    ea, eb = o.error_bounds()
    err = (M.double() - ref).abs() - (ea[:, None] + eb) / scale
    assert float((err - solvers.COMPACT_REL * M.double() - solvers.COMPACT_ABS).max()) <= 0
    assert float(err.max()) > 0  # float16's rounding is in the bound for a reason
    # the same products as the float32 matrix: the same entries up to float16's rounding
    F = solvers.SqDistCost(A, B).matrix().double()
    assert torch.allclose(M.double() * scale + offset[:, None], F, rtol=2**-10, atol=float(F.max()) * 2**-20)


@pytest.mark.parametrize("compact", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("case", ["near-ties", "ties", "random", "float16 near-ties"])
def test_certified_plan_is_the_float64_plan(monkeypatch, case, compact):
    """Computed costs (float32, or the exact solver's compact float16) + certificate == the float64
    plan, through both the dense and the sparse route: on random units, on near-ties (pairs of lower
    units closer than float32, or float16, can tell apart, so only the float64 entries decide: the
    stored optimum is then often wrong and re-solved on true costs, with no float64 fallback), and on
    exact ties (duplicated units: any optimum will do, so the cost must be the optimal cost)."""
    from hf_deepen.align import solvers

    n, f = 320, 24
    g = torch.Generator().manual_seed(7)
    A = torch.randn(n, f, generator=g, dtype=torch.float64)
    if case == "near-ties":
        A[1::2] = A[0::2] * (1 + 1e-6 * torch.randn(n // 2, f, generator=g, dtype=torch.float64))
    elif case == "float16 near-ties":
        A[1::2] = A[0::2] * (1 + 1e-3 * torch.randn(n // 2, f, generator=g, dtype=torch.float64))
    elif case == "ties":
        A[1::2] = A[0::2]
    B = A[torch.randperm(n, generator=g)] + 0.3 * torch.randn(n, f, generator=g, dtype=torch.float64)
    A, B = A.float(), B.float()
    ref = _ref_assignment(A, B)
    ref_cost = float(sq_dists(A.double(), B.double()).gather(0, ref[None]).mean())
    ways = set()
    for n_min in (10**9, 0):
        monkeypatch.setattr(solvers, "SPARSE_MIN_N", n_min)
        o = solvers.SqDistCost([A], [B])
        p = solvers.solve_exact(o.matrix(compact=compact), o)
        ways.add(p.certified)
        assert p.cost == pytest.approx(ref_cost, rel=1e-12)
        if case != "ties":
            assert torch.equal(p.assignment, ref)
        assert torch.equal(torch.sort(p.assignment).values, torch.arange(n))
    assert "float64 fallback" not in ways
    if compact and case == "float16 near-ties":
        assert ways == {"float16+certificate, re-solved"}


# ---- large Sinkhorn problems on 16-bit weights: the compact cost, a bf16 kernel, a float16 plan -----
def _bf16_parts(n, seed=0, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    A = [(torch.randn(n, 24, generator=g) * 0.02).bfloat16(), (torch.randn(n, 12, generator=g) * 0.02).bfloat16()]
    perm = torch.randperm(n, generator=g)
    B = [(a.float()[perm] + noise * torch.randn(a.shape, generator=g)).bfloat16() for a in A]
    return A, B


@pytest.mark.parametrize("domain", ["kernel", "log"])
def test_compact_sinkhorn_is_the_float64_plan_in_half_the_memory(monkeypatch, domain):
    """The in-place Sinkhorn on the float16 compact cost (forced here at n = 96, ragged blocks)
    converges to POT's float64 plan of the true cost, within 16-bit storage: the kernel (bf16) and
    the plan (float16, each column scaled by a power of two) live in the cost's own memory, and the
    plan moved onto weights agrees with the float64 plan's to well under the bf16 rounding that any
    fused tensor gets anyway."""
    from hf_deepen.align import solvers
    from hf_deepen.align.solvers import SqDistCost, solve

    A, B = _bf16_parts(96)
    oracle = SqDistCost(A, B)
    M64 = solvers.pairwise_sq_dists(A, B)
    if domain == "log":
        monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE", 0.0)
        monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE_F32", 0.0)
    want = solve_sinkhorn(M64, reg=0.2, tol=1e-10)
    assert 0.2 < want.sharpness < 0.99  # neither uniform nor a permutation: 16-bit storage is tested
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    monkeypatch.setattr(solvers, "_BLOCK", 10)
    C = oracle.matrix(compact=True)
    kept = C.clone()
    mine = solve_sinkhorn(C, reg=0.2, tol=1e-10, compact=oracle.compact)
    assert torch.equal(C, kept)  # not asked to overwrite: the caller's cost is untouched
    again = solve(C, "sinkhorn", reg=0.2, max_iter=3000, overwrite=True, oracle=oracle)
    assert again.dense.data_ptr() == C.data_ptr() and again.dense.dtype == torch.float16  # one n x n buffer
    assert mine.solver == want.solver == ("sinkhorn" if domain == "kernel" else "sinkhorn_log")
    s = mine.dense_scale
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two: applying them is exact
    assert float(mine.dense.float().amax(dim=0).max()) <= 1.0
    assert float(mine.dense.float().amax(dim=0).min()) >= 0.5
    torch.testing.assert_close(mine.matrix.double(), want.matrix, atol=2e-3 / 96, rtol=5e-3)
    for k in ("cost", "identity_cost", "sharpness"):
        assert getattr(mine, k) == pytest.approx(getattr(want, k), rel=2e-3), k
    assert mine.marginal_error < 1e-6
    # applied to weights: (n P)^T x, within a fraction of bf16's own rounding of the result
    x = torch.randn(96, 40, generator=torch.Generator().manual_seed(3)).bfloat16()
    ref = want.move(x, dim=0)
    err = float((mine.move(x, dim=0).double() - ref).norm() / ref.norm())
    rounding = float((ref.bfloat16().double() - ref).norm() / ref.norm())
    assert err < 0.5 * rounding, (err, rounding)
    y = x.T.contiguous()  # units last, and a block of units
    torch.testing.assert_close(mine.move(y, dim=1, units=slice(10, 50)), mine.move(y, dim=1)[:, 10:50], rtol=0, atol=0)


def _reduced_range(M):
    """``(max - min)`` of the normalised cost after row then column reduction (what decides the domain)."""
    R = M.double() / M.double().mean()
    R = R - R.amin(1, keepdim=True)
    R = R - R.amin(0, keepdim=True)
    return float(R.max()), R


def test_inplace_float32_kernel_may_underflow_where_certified(monkeypatch):
    """Real weights at the default reg have a reduced range of 100-600 reg: a float32 kernel
    underflows there. The in-place solver keeps the fast kernel domain when the mass the underflowed
    entries could carry is certified negligible (same plan as POT's float64 kernel), and only then;
    without a way to rebuild its cost it keeps to the range where nothing underflows."""
    from hf_deepen.align import solvers

    torch.manual_seed(0)
    X = torch.randn(64, 16, dtype=torch.float64)
    M64 = sq_dists(X, X[torch.randperm(64)] + 0.3 * torch.randn(64, 16, dtype=torch.float64))
    rmax, R = _reduced_range(M64)
    reg = rmax / 300
    assert bool((R / reg > 104).any())  # entries below float32's smallest subnormal: they do underflow
    pot = solve_sinkhorn(M64, reg=reg, tol=1e-9, max_iter=20000)
    assert pot.solver == "sinkhorn" and pot.marginal_error < 1e-7 and pot.sharpness > 0.5
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    M = M64.float()
    mine = solve_sinkhorn(M, reg=reg, tol=1e-9, max_iter=20000)
    assert mine.solver == "sinkhorn"
    torch.testing.assert_close(mine.matrix.double(), pot.matrix, atol=1e-5 / 64, rtol=1e-4)
    assert mine.cost == pytest.approx(pot.cost, rel=1e-6)
    assert mine.marginal_error < 1e-6  # (it includes the certified bound)
    # nothing to rebuild from: the log domain (decided before iterating; its plans are tested elsewhere)
    owned = solve_sinkhorn(M.clone(), reg=reg, tol=1e-9, max_iter=10, overwrite=True)
    assert owned.solver == "sinkhorn_log"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inplace_kernel_underflow_that_matters_is_undone(monkeypatch, dtype):
    """Rows 0-5 are cheap only in column 0, so the plan must use entries 218 reg above their row's
    and column's minima: a float32 (or bfloat16, compact cost) kernel loses them. The underflow
    bound catches it at the first probe, the cost is rebuilt and the kernel re-formed with the
    scalings absorbed, and the iterations end at POT's float64 plan; with absorption disallowed, the
    log domain does. (With the bound switched off, the truncated kernel's plan is far from POT's:
    the test can fail. Its finiteness check alone would catch it only once the scalings overflow.)"""
    from hf_deepen.align import solvers

    n = 12
    M64 = torch.full((n, n), 9.0, dtype=torch.float64)
    M64[6:] = 0.0
    M64[:, 0] = 0.0
    reg = 0.01
    assert 200 < _reduced_range(M64)[0] / reg < solvers.KERNEL_MAX_RANGE
    pot = solve_sinkhorn(M64, reg=reg, tol=1e-9, max_iter=20000)
    assert pot.solver == "sinkhorn" and pot.marginal_error < 1e-7
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    compact = (torch.zeros(n, dtype=torch.float64), 1.0) if dtype == torch.float16 else None
    M = M64.to(dtype)
    rebuilt = []

    def run(max_iter):
        rebuilt.clear()
        return solve_sinkhorn(M.clone(), reg=reg, tol=1e-9, max_iter=max_iter, compact=compact, overwrite=True,
                              rebuild=lambda out: (rebuilt.append(1), out.copy_(M)))

    for max_iter in (20000, 100):  # (100: the absorption comes at the last iteration; it still converges)
        mine = run(max_iter)
        assert mine.solver == "sinkhorn" and rebuilt == [1], max_iter
        torch.testing.assert_close(mine.matrix.double(), pot.matrix, atol=1e-3 / n, rtol=2e-3)
        assert mine.marginal_error < 1e-6
    monkeypatch.setattr(solvers, "ABSORB_MAX", 0)
    log = run(20000)
    assert log.solver == "sinkhorn_log" and rebuilt == [1]
    torch.testing.assert_close(log.matrix.double(), pot.matrix, atol=1e-3 / n, rtol=2e-3)
    monkeypatch.setattr(solvers, "UNDERFLOW_TOL", math.inf)
    blind = run(100)
    assert blind.solver == "sinkhorn" and rebuilt == []
    assert float((blind.matrix.double() - pot.matrix).abs().max()) > 0.5 / n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_alignment_rebuilds_its_overwritten_cost_to_absorb_and_for_the_log_domain(monkeypatch, dtype):
    """When the underflow bound fails on a cost the solver overwrote (the alignment's own), the
    :class:`SqDistCost` writes it again into the same buffer, once to re-form the kernel with the
    scalings absorbed and, when that fails too (forced here: a bound that always fails, one
    absorption allowed), once more for the log domain: the plan is then the log-domain plan of the
    original cost, in the same single n x n buffer."""
    from hf_deepen.align import solvers
    from hf_deepen.align.solvers import SqDistCost, solve

    A, B = _bf16_parts(96)
    A, B = [a.to(dtype) for a in A], [b.to(dtype) for b in B]
    oracle = SqDistCost(A, B)
    compact = dtype == torch.bfloat16
    reg = _reduced_range(solvers.pairwise_sq_dists(A, B))[0] / 300  # (some kernel entries underflow)
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    C = oracle.matrix(compact=compact)
    kept = C.clone()
    rebuilt = []
    matrix = oracle.matrix

    def spy(*args, **kw):
        rebuilt.append(kw.get("out") is not None and kw["out"].data_ptr() == C.data_ptr())
        return matrix(*args, **kw)

    monkeypatch.setattr(oracle, "matrix", spy)
    monkeypatch.setattr(solvers, "UNDERFLOW_TOL", -1.0)
    monkeypatch.setattr(solvers, "ABSORB_MAX", 1)
    got = solve(C, "sinkhorn", reg=reg, max_iter=3000, overwrite=True, oracle=oracle)
    assert rebuilt == [True, True]  # the kernel, the absorbed kernel, then the log domain, all in C
    assert got.solver == "sinkhorn_log" and got.dense.data_ptr() == C.data_ptr()  # still one n x n buffer
    monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE", 0.0)
    monkeypatch.setattr(solvers, "KERNEL_MAX_RANGE_F32", 0.0)
    want = solve(kept, "sinkhorn", reg=reg, max_iter=3000, overwrite=True, oracle=oracle)
    assert want.solver == "sinkhorn_log" and len(rebuilt) == 2
    assert torch.equal(got.dense, want.dense)
    with pytest.raises(ValueError, match="contiguous"):
        oracle.matrix(compact=compact, out=torch.empty(3, 3))


def test_alignment_takes_the_compact_sinkhorn_route_only_for_16bit_weights(monkeypatch):
    """Which neuron route a large Sinkhorn problem takes: 16-bit weights -> the compact cost and a
    column-scaled float16 plan; float32 weights -> the float32 matrix and plan (bf16 storage would
    round below their precision). Both are close to the float64 reference."""
    from hf_deepen.align import solvers

    model = tiny_model("gqa")
    _, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    cases = ((torch.bfloat16, torch.float16, True), (torch.float32, torch.float32, False))
    # the float64 references (small problems: POT, float64) of the same weights
    wants = [align_layers({k: v.to(dt).double() for k, v in a.items()}, {k: v.to(dt).double() for k, v in b.items()},
                          shape, "sinkhorn", reg=0.05) for dt, _, _ in cases]
    assert all(w.neurons.dense.dtype == torch.float64 for w in wants)
    monkeypatch.setattr(solvers, "INPLACE_MIN_ENTRIES", 0)
    for (dt, dense, scaled), want in zip(cases, wants):
        al = align_layers({k: v.to(dt) for k, v in a.items()}, {k: v.to(dt) for k, v in b.items()}, shape,
                          "sinkhorn", reg=0.05)
        assert al.neurons.dense.dtype == dense and (al.neurons.dense_scale is not None) == scaled, dt
        torch.testing.assert_close(al.neurons.matrix.double(), want.neurons.matrix, atol=1e-2 / al.neurons.n, rtol=1e-2)


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
@pytest.mark.parametrize("restore", [True, False])
def test_fusing_a_block_of_units_at_a_time_gives_the_same_layer(monkeypatch, solver, restore):
    """The MLP roles are fused a block of neurons at a time when a role is larger than
    ``_FUSE_BLOCK_BYTES`` (forced here: blocks of 5 neurons, a ragged last one): every step is per
    neuron, so the layer is the same tensor for tensor, in bf16 and in float32 (a dense plan's
    float32 products up to their summation order), and a self-fusion still returns the layer exactly."""
    from hf_deepen import fuse

    model = tiny_model("gqa")
    spec, shape, a = canon_of(model, 1)
    _, _, b = canon_of(model, 2)
    cfg = UpscaleConfig(method="opt", solver=solver, sinkhorn_reg=0.05, zero_init=False, restore_norm=restore)
    n = a["up"].shape[0]
    assert n % 5 and n > 10
    for dt in (torch.bfloat16, torch.float32):
        src = [{k: v.to(dt) for k, v in x.items()} for x in (a, b)]
        whole = make_layer("opt", [dict(x) for x in src], shape, cfg, dtype=dt)
        monkeypatch.setattr(fuse, "_FUSE_BLOCK_BYTES", 4 * 5 * a["up"].shape[1])
        assert len(fuse._unit_blocks(src[1]["up"], 0)) == -(-n // 5)
        blocks = make_layer("opt", [dict(x) for x in src], shape, cfg, dtype=dt)
        for k in whole.canon:
            if solver == "exact" or k not in ("gate", "up", "down"):
                assert torch.equal(blocks.canon[k], whole.canon[k]), (dt, k)
            else:  # a dense plan's float32 products may sum in another order for another block shape
                # (so a bf16 result may round to the neighbouring value)
                rtol = 1e-6 if dt == torch.float32 else 2.0**-7
                torch.testing.assert_close(blocks.canon[k].float(), whole.canon[k].float(), rtol=rtol, atol=1e-7)
        assert blocks.diagnostics["retained_norm"] == pytest.approx(whole.diagnostics["retained_norm"], rel=1e-6)  # (float32 norms, summed per block)
        if solver == "exact":
            same = make_layer("opt", [dict(src[0]), dict(src[0])], shape, cfg, dtype=dt)
            for k in src[0]:
                assert torch.equal(same.canon[k], src[0][k]), (dt, k)
        monkeypatch.undo()

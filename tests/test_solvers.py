"""Solvers against closed forms: affine contractions, scale invariance, bounded memory, low precision."""

import math

import pytest
import torch
from problems import affine

import fixedpoint as fp

SOLVERS = [fp.Iteration(), fp.Iteration(damping=0.7), fp.Anderson(), fp.Anderson(memory=1), fp.Anderson(memory=20),
           fp.Broyden(), fp.Broyden(memory=3), fp.Broyden(memory=3, when_full="reduce")]


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("rho", [0.3, 0.9, 0.99])
def test_affine_contraction_matches_closed_form(solver, rho):
    prob = affine(rho, batch=3, dim=24, symmetric_spectrum=not isinstance(solver, fp.Iteration))
    sol = fp.solve(prob.f, torch.zeros_like(prob.x), solver=solver, rtol=1e-10, atol=0, max_steps=5000)
    assert sol.converged.all()
    assert (sol.status == fp.Status.CONVERGED).all()
    # ||z - z*|| <= rho/(1-rho) * residual for the returned image; the residual met rtol * ||f(z)||.
    err = (sol.z - prob.solution).norm(dim=1) / prob.solution.norm(dim=1)
    assert (err <= 1e-10 * (1 + rho / (1 - rho)) * 1.01).all(), err
    residual = (prob.f(sol.z) - sol.z).norm(dim=1)
    assert (residual <= rho * sol.residual + 1e-12).all()  # the image of z_k is a better point than z_k


@pytest.mark.parametrize("rho", [0.9, 0.99])
def test_accelerated_solvers_beat_iteration(rho):
    prob = affine(rho, batch=4, dim=64)
    steps = {}
    for name in ("iteration", "anderson", "broyden"):
        sol = fp.solve(prob.f, torch.zeros_like(prob.x), solver=name, rtol=1e-6, atol=0, max_steps=5000)
        assert sol.converged.all()
        steps[name] = sol.num_steps
    assert steps["anderson"] < steps["iteration"] / 2
    assert steps["broyden"] < steps["iteration"] / 2


@pytest.mark.parametrize("solver", ["anderson", "broyden", "iteration"])
def test_step_count_invariant_to_input_scale(solver):
    """Scaling the problem by 1e-3 must not change the steps (torchdeq's absolute ridge fails this, 113 -> 288)."""
    prob = affine(0.9, batch=4, dim=64)
    counts = []
    for scale in (1.0, 1e-3, 1e3):
        p = prob.scaled(scale)
        sol = fp.solve(p.f, torch.zeros_like(p.x), solver=solver, rtol=1e-6, atol=0, max_steps=1000)
        assert sol.converged.all()
        counts.append(sol.num_steps)
    assert counts[0] == counts[1] == counts[2], counts


def test_anderson_mixes_from_first_step():
    prob = affine(0.5, batch=2, dim=8)
    z0 = torch.zeros_like(prob.x)
    for max_steps in (1, 2, 8):
        sol = fp.solve(prob.f, z0, solver="anderson", rtol=0, atol=0, max_steps=max_steps)
        ref = fp.solve(prob.f, z0, solver="iteration", rtol=0, atol=0, max_steps=max_steps)
        assert not torch.equal(sol.z, z0)
        if max_steps <= 2:  # the first mix is a plain step: two applications agree with iteration
            torch.testing.assert_close(sol.z, ref.z)
    assert (sol.z - prob.solution).norm() < 0.1 * (ref.z - prob.solution).norm()


@pytest.mark.parametrize("solver", [fp.Anderson(memory=5), fp.Broyden(memory=5)], ids=repr)
def test_singular_history_does_not_crash(solver):
    """A constant map converges in one step, after which every residual is exactly zero."""
    c = torch.randn(3, 7, dtype=torch.float64)
    sol = fp.solve(lambda z: c.clone(), torch.zeros_like(c), solver=solver, rtol=0, atol=0, max_steps=12)
    assert torch.isfinite(sol.z).all()
    torch.testing.assert_close(sol.z, c)
    # duplicated history columns: a map that stalls, then moves again
    prob = affine(0.8, batch=2, dim=6)
    calls = [0]

    def stalling(z):
        calls[0] += 1
        return z.clone() if 3 <= calls[0] <= 6 else prob.f(z)

    sol = fp.solve(stalling, torch.zeros_like(prob.x), solver=solver, rtol=1e-9, atol=0, max_steps=500)
    assert torch.isfinite(sol.z).all()


@pytest.mark.parametrize("when_full", ["restart", "reduce"])
@pytest.mark.parametrize("memory", [2, 5])
def test_broyden_bounded_memory_converges_on_linear_contractions(memory, when_full):
    prob = affine(0.95, batch=4, dim=48)
    solver = fp.Broyden(memory=memory, when_full=when_full)
    sol = fp.solve(prob.f, torch.zeros_like(prob.x), solver=solver, rtol=1e-9, atol=0, max_steps=3000)
    assert sol.converged.all()
    state = solver.init(torch.zeros(4, 48))
    assert state.u.shape == state.v.shape == (4, memory, 48)  # O(memory), not O(max_steps)


def test_broyden_rank_reduction_is_the_best_lower_rank_approximation():
    from fixedpoint.solvers.broyden import _drop_weakest

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 5, 20, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 5, 20, generator=gen, dtype=torch.float64)
    u_new, v_new = _drop_weakest(u, v)
    assert u_new.shape == v_new.shape == (3, 4, 20)
    dense = u.transpose(1, 2) @ v  # (3, 20, 20), rank 5
    p, sv, yh = torch.linalg.svd(dense)
    best = p[:, :, :4] @ torch.diag_embed(sv[:, :4]) @ yh[:, :4]  # Eckart-Young
    torch.testing.assert_close(u_new.transpose(1, 2) @ v_new, best)


def test_broyden_rank_reduction_beats_restart_at_tight_tolerance():
    steps = {}
    for when_full in ("restart", "reduce"):
        prob = affine(0.99, batch=4, dim=96)
        sol = fp.solve(prob.f, torch.zeros_like(prob.x), solver=fp.Broyden(memory=30, when_full=when_full),
                       rtol=1e-10, atol=0, max_steps=3000)
        assert sol.converged.all()
        steps[when_full] = sol.num_steps
    full = fp.solve(prob.f, torch.zeros_like(prob.x), solver=fp.Broyden(memory=3000), rtol=1e-10, atol=0,
                    max_steps=3000).num_steps
    assert full <= steps["reduce"] < steps["restart"], (full, steps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
def test_low_precision_states(solver, dtype):
    prob = affine(0.7, batch=4, dim=32, dtype=torch.float32)
    x = prob.x.to(dtype)
    w = prob.w.to(dtype)
    sol = fp.solve(lambda z: z @ w.T + x, torch.zeros_like(x), solver=solver, rtol=2e-2, atol=0, max_steps=200)
    assert sol.z.dtype == dtype
    assert sol.residual.dtype == torch.float32
    assert sol.converged.all()
    err = (sol.z.float() - prob.solution).norm(dim=1) / prob.solution.norm(dim=1)
    assert (err < 0.1).all(), err


@pytest.mark.parametrize("bad", [
    lambda: fp.Iteration(damping=0.0), lambda: fp.Iteration(damping=1.5), lambda: fp.Anderson(memory=0),
    lambda: fp.Anderson(memory=2.5), lambda: fp.Anderson(regularization=-1.0), lambda: fp.Anderson(damping=2),
    lambda: fp.Broyden(memory=0), lambda: fp.Broyden(memory=True), lambda: fp.Broyden(when_full="oldest"),
    lambda: fp.Broyden(memory=1, when_full="reduce"),
])
def test_solver_options_are_checked(bad):
    with pytest.raises(ValueError, match="must be"):
        bad()


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Anderson: unknown option\(s\) \['mem'\]; valid options are "
                                         r"\['memory', 'damping', 'regularization'\]"):
        fp.Anderson(mem=3)
    with pytest.raises(TypeError, match="Broyden: unknown option"):  # also a TypeError, like any bad keyword
        fp.Broyden(m=3)
    with pytest.raises(ValueError, match=r"StochasticJFB: unknown option\(s\) \['n'\].*'min_with_grad'"):
        fp.StochasticJFB(max_no_grad=1, max_with_grad=1, n=2)


# ------------------------------------------------------------------------------------------------- fast paths
# The solvers' steps are written for as few torch calls per step as possible (cached views and constants, cheap
# finiteness tests, no zeroing of history that is never read). These references are the same algorithms written
# plainly, one formula per line; the fast steps must reproduce them bit for bit, fallbacks included.


def _reference_anderson_step(solver, state, z, fz, k):
    dtype = state["x"].dtype
    i, n = k % solver.memory, min(k + 1, solver.memory)
    z_a = z.to(dtype)
    g = fz.to(dtype) - z_a
    state["x"][:, i] = z_a
    state["g"][:, i] = g
    row = torch.bmm(state["g"][:, :n], g.unsqueeze(2)).squeeze(2)
    state["gram"][:, i, :n] = row
    state["gram"][:, :n, i] = row
    gram = state["gram"][:, :n, :n]
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1)
    safe = torch.where(scale > 0, scale, 1.0)
    system = gram / safe[:, None, None] + solver.regularization * torch.eye(n, dtype=dtype)
    w, info = torch.linalg.solve_ex(system, torch.ones(z.shape[0], n, 1, dtype=dtype))
    total = w.sum(1)
    alpha = w / total[:, :, None]
    ok = (info == 0) & (scale > 0) & (total[:, 0] != 0) & torch.isfinite(alpha).all(1)[:, 0]
    plain = torch.zeros_like(alpha)
    plain[:, i] = 1.0
    alpha = torch.where(ok[:, None, None], alpha, plain).transpose(1, 2)
    mixed = torch.bmm(alpha, state["x"][:, :n])
    return torch.baddbmm(mixed, alpha, state["g"][:, :n], alpha=solver.damping).squeeze(1).to(z.dtype)


def _reference_broyden_apply(u, v, x):
    return -x + torch.bmm(u.transpose(1, 2), torch.bmm(v, x.unsqueeze(2))).squeeze(2)


def _reference_broyden_step(solver, state, z, fz, k):
    from fixedpoint.solvers.broyden import _drop_weakest

    dtype = state["u"].dtype
    z_a = z.to(dtype)
    g = fz.to(dtype) - z_a
    if state["prev_z"] is not None:
        if state["count"] == solver.memory:
            if solver.when_full == "reduce":
                u_kept, v_kept = _drop_weakest(state["u"], state["v"])
                state["u"][:, : solver.memory - 1] = u_kept
                state["v"][:, : solver.memory - 1] = v_kept
                state["count"] = solver.memory - 1
            else:
                state["u"].zero_()
                state["v"].zero_()
                state["count"] = 0
        n = state["count"]
        u, v = state["u"][:, :n], state["v"][:, :n]
        dz, dg = z_a - state["prev_z"], g - state["prev_g"]
        h_dg, ht_dz = _reference_broyden_apply(u, v, dg), _reference_broyden_apply(v, u, dz)
        den = (dz * h_dg).sum(1, keepdim=True)
        u_new = (dz - h_dg) / den
        ok = torch.isfinite(u_new).all(1, keepdim=True) & (den.abs() > torch.finfo(dtype).tiny)
        state["u"][:, n] = torch.where(ok, u_new, 0.0)
        state["v"][:, n] = torch.where(ok, ht_dz, 0.0)
        state["count"] = n + 1
    state["prev_z"], state["prev_g"] = z_a, g
    n = state["count"]
    return (z_a - _reference_broyden_apply(state["u"][:, :n], state["v"][:, :n], g)).to(z.dtype)


def _reference_state(solver, z):
    b, d = z.shape
    like = {"dtype": torch.promote_types(z.dtype, torch.float32)}
    if isinstance(solver, fp.Anderson):
        m = solver.memory
        return {"x": torch.zeros(b, m, d, **like), "g": torch.zeros(b, m, d, **like),
                "gram": torch.zeros(b, m, m, **like)}
    return {"u": torch.zeros(b, solver.memory, d, **like), "v": torch.zeros(b, solver.memory, d, **like),
            "count": 0, "prev_z": None, "prev_g": None}


def _same_values(a, b):
    """Equal element for element, NaN where NaN (payloads and the sign of an exact zero aside)."""
    finite = {"nan": 0.0, "posinf": math.inf, "neginf": -math.inf}
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(**finite), b.nan_to_num(**finite))


def _broken_map(kind, x):
    """Maps whose histories exercise the fallbacks: a sample already at its fixed point (all-zero residuals), one
    that goes non-finite, a stall that repeats history columns."""
    calls = [0]

    def f(z):
        calls[0] += 1
        out = 0.8 * torch.tanh(z.float()) + x.float()
        if kind == "nonfinite" and calls[0] >= 4:
            out[0, 0] = float("nan")
            out[1, 1] = float("inf")
        if kind == "stall" and 3 <= calls[0] <= 6:
            out = z.float().clone()
        return out.to(x.dtype)

    z0 = torch.zeros_like(x)
    if kind == "at_fixed_point":  # sample 0 is the fixed point of a constant map's first coordinate block
        return (lambda z: torch.cat([x[:1], (0.5 * z[1:].float() + x[1:].float()).to(x.dtype)])), torch.cat(
            [x[:1], z0[1:]])
    return f, z0


@pytest.mark.parametrize("kind", ["plain", "at_fixed_point", "nonfinite", "stall"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("solver", [fp.Anderson(memory=4), fp.Anderson(memory=1), fp.Anderson(memory=3, damping=0.6),
                                    fp.Anderson(memory=3, regularization=0.0), fp.Broyden(memory=4),
                                    fp.Broyden(memory=3, when_full="reduce")], ids=repr)
def test_fast_steps_match_the_plain_formulation_bit_for_bit(solver, dtype, kind):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    (f, z), (ref_f, ref_z) = _broken_map(kind, x), _broken_map(kind, x)  # two instances: the maps count calls
    reference = _reference_anderson_step if isinstance(solver, fp.Anderson) else _reference_broyden_step
    state, ref_state = solver.init(z), _reference_state(solver, z)
    with torch.no_grad():
        for k in range(14):  # past two ring-buffer turns / restarts / reductions
            z = solver.step(state, z, f(z), k)
            ref_z = reference(solver, ref_state, ref_z, ref_f(ref_z), k)
            assert z.dtype == dtype and _same_values(z, ref_z), k


@pytest.mark.parametrize("solver", [fp.Anderson(memory=3), fp.Broyden(memory=3),
                                    fp.Broyden(memory=3, when_full="reduce")], ids=repr)
def test_history_is_written_before_it_is_read(solver):
    """Broyden's buffers are left uninitialised and not cleared on restart: no slot may be read before it is
    written. Poisoning every buffer with NaN at the start must change nothing."""
    prob = affine(0.9, batch=3, dim=16)
    z0 = torch.zeros_like(prob.x)
    clean, poisoned = solver.init(z0), solver.init(z0)
    for name in ("x", "g", "gram") if isinstance(solver, fp.Anderson) else ("u", "v"):  # the histories
        getattr(poisoned, name).fill_(float("nan"))
    z_clean = z_poisoned = z0
    with torch.no_grad():
        for k in range(11):  # several restarts / reductions / ring-buffer turns at memory 3
            z_clean = solver.step(clean, z_clean, prob.f(z_clean), k)
            z_poisoned = solver.step(poisoned, z_poisoned, prob.f(z_poisoned), k)
            assert torch.isfinite(z_poisoned).all() and torch.equal(z_clean, z_poisoned), k

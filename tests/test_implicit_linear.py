"""Implicit's adjoint solvers (GMRES, truncated Neumann, fixed-point) and AdjointState, against dense float64
linear algebra, explicit sums of Jacobian powers, JFB unrolls and gradcheck."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import dense_implicit_grad, tanh_layer, tanh_map
from test_solve import CountSyncs

import fixedpoint as fp

TIGHT = {"rtol": 1e-13, "atol": 0.0, "max_steps": 300}


def dense_system(batch, dim, *, radius, seed=0, dtype=torch.float64):
    """Per-sample non-symmetric ``J`` (B, D, D) of spectral radius ``radius``, and a right-hand side ``g`` (B, D)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64)
    m = radius * m / torch.linalg.eigvals(m).abs().amax(-1)[:, None, None]
    g = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return m.to(dtype), g.to(dtype)


class Counted:
    """``u -> u J`` for per-sample matrices ``J``, counting its calls."""

    def __init__(self, j):
        self.j, self.calls = j, 0

    def __call__(self, u):
        self.calls += 1
        return torch.einsum("bi,bij->bj", u, self.j)


def dense_adjoint(j, g):
    """``u`` with ``u (I - J) = g`` per sample, by LU: ``(I - J)^T u^T = g^T``."""
    eye = torch.eye(j.shape[-1], dtype=j.dtype)
    return torch.linalg.solve((eye - j).transpose(-1, -2), g)


def true_residual(j, g, u):
    return torch.linalg.vector_norm(g - u + torch.einsum("bi,bij->bj", u, j), dim=1)


def dense_jacobians(w, x, z_star):
    """``J_b = df/dz`` at ``z*_b`` for ``f(z) = tanh(z W^T + x)``, stacked (B, D, D) (rows: outputs)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda z, b=b: torch.tanh(z @ w.T + x[b]), z_star[b])
                        for b in range(z_star.shape[0])]).detach()


# --- GMRES on dense systems --------------------------------------------------------------------------------------

def test_gmres_solves_a_nonsymmetric_system_in_at_most_d_steps():
    """Spectral radius 1.5: the fixed-point iteration u <- u J + g diverges, GMRES does not care."""
    j, g = dense_system(3, 8, radius=1.5, seed=1)
    exact = dense_adjoint(j, g)
    apply_j = Counted(j)
    result = fp.GMRES().solve(apply_j, g, max_steps=100, rtol=1e-12, atol=0.0)
    assert result.converged.all() and result.num_iterations <= 8
    assert result.num_steps == apply_j.calls == result.num_iterations + 1  # one product for the true residual
    torch.testing.assert_close(result.u, exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(result.residual, true_residual(j, g, result.u), rtol=0, atol=1e-12)
    # Fixed steps: exactly D Arnoldi steps reach the solution of every sample.
    fixed = fp.GMRES(restart=8).solve(Counted(j), g, max_steps=8, rtol=0.0, atol=0.0)
    assert fixed.num_iterations == 8
    torch.testing.assert_close(fixed.u, exact, rtol=1e-9, atol=1e-10)


def test_gmres_restarted_and_float32():
    j, g = dense_system(4, 12, radius=0.9, seed=2)
    exact = dense_adjoint(j, g)
    result = fp.GMRES(restart=3).solve(Counted(j), g, max_steps=300, rtol=1e-11, atol=0.0)
    assert result.converged.all()
    assert result.num_iterations > 12  # restarts really happened
    torch.testing.assert_close(result.u, exact, rtol=1e-8, atol=1e-9)
    single = fp.GMRES().solve(Counted(j.float()), g.float(), max_steps=50, rtol=1e-5, atol=0.0)
    assert single.u.dtype == torch.float32 and single.residual.dtype == torch.float32 and single.converged.all()
    torch.testing.assert_close(single.u.double(), exact, rtol=1e-3, atol=1e-4)


def test_gmres_tolerance_is_per_sample():
    """Right-hand sides 1e-8, 1 and 1e8 in size: each sample meets rtol relative to its own ||g||."""
    j, g = dense_system(3, 10, radius=0.8, seed=3)
    g = g * torch.tensor([1e-8, 1.0, 1e8], dtype=g.dtype)[:, None]
    result = fp.GMRES().solve(Counted(j), g, max_steps=50, rtol=1e-9, atol=0.0)
    assert result.converged.all()
    relative = true_residual(j, g, result.u) / g.norm(dim=1)
    assert (relative <= 1e-9).all(), relative
    torch.testing.assert_close(result.u / g.norm(dim=1, keepdim=True),
                               dense_adjoint(j, g) / g.norm(dim=1, keepdim=True), rtol=1e-7, atol=1e-8)


def test_gmres_stopped_sample_is_not_changed_by_later_steps():
    """Sample 0 has J = 0: its Krylov space closes after one step. Sample 1 needs all D. Sample 0's answer must be
    what one step alone gives, untouched by the 7 later (zero) steps, and free of NaN from the zero vectors."""
    j, g = dense_system(2, 8, radius=0.9, seed=4)
    j[0] = 0.0
    both = fp.GMRES().solve(Counted(j), g, max_steps=8, rtol=0.0, atol=0.0)
    alone = fp.GMRES().solve(Counted(j[:1]), g[:1], max_steps=1, rtol=0.0, atol=0.0)
    assert torch.isfinite(both.u).all()
    torch.testing.assert_close(both.u[0], alone.u[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(both.u[0], g[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(both.u[1], dense_adjoint(j, g)[1], rtol=1e-9, atol=1e-10)
    # With a tolerance, sample 0 stops at once and sample 1 carries on; sample 0 is still one step's answer.
    tol = fp.GMRES().solve(Counted(j), g, max_steps=8, rtol=1e-12, atol=0.0)
    assert tol.converged.all()
    torch.testing.assert_close(tol.u[0], alone.u[0], rtol=1e-15, atol=0)


def test_gmres_singular_and_nan_samples_do_not_poison_the_others():
    j, g = dense_system(3, 6, radius=0.9, seed=5)
    # Sample 0: I - J singular (J has eigenvalue exactly 1 along a known direction) and g not in its range.
    gen = torch.Generator().manual_seed(6)
    p = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    j[0] = p @ torch.diag(torch.tensor([1.0, 0.5, 0.2, -0.3, 0.1, 0.0], dtype=torch.float64)) @ torch.linalg.inv(p)
    j[1, 2, 3] = math.nan  # sample 1: a NaN Jacobian entry
    for rtol in (1e-12, 0.0):
        result = fp.GMRES().solve(Counted(j), g, max_steps=30, rtol=rtol, atol=0.0)
        torch.testing.assert_close(result.u[2], dense_adjoint(j[2:], g[2:])[0], rtol=1e-9, atol=1e-10)
        assert result.converged.tolist() == [False, False, rtol > 0]  # rtol = 0 converges at a residual of 0 only
        assert result.status.tolist()[:2] == [fp.Status.MAX_STEPS, fp.Status.NONFINITE]
        # The singular sample keeps a finite u whose residual is no worse than zero's.
        assert torch.isfinite(result.u[0]).all() and result.residual[0] <= g[0].norm()


def test_gmres_warm_start_and_its_fallback():
    j, g = dense_system(3, 8, radius=0.9, seed=7)
    exact = dense_adjoint(j, g)
    cold = fp.GMRES().solve(Counted(j), g, max_steps=50, rtol=1e-10, atol=0.0)
    near = fp.GMRES().solve(Counted(j), g, exact + 1e-9, max_steps=50, rtol=1e-10, atol=0.0)
    assert near.num_iterations < cold.num_iterations
    # A start far worse than zero (and one with NaN) is dropped per sample: same iterations as cold.
    bad = exact * 1e6
    bad[1] = math.nan
    far = fp.GMRES().solve(Counted(j), g, bad, max_steps=50, rtol=1e-10, atol=0.0)
    assert far.converged.all() and far.num_iterations == cold.num_iterations
    torch.testing.assert_close(far.u, exact, rtol=1e-8, atol=1e-9)


def test_fixed_step_gmres_and_neumann_make_no_host_sync():
    j, g = dense_system(2, 6, radius=0.5, seed=8)
    with CountSyncs() as syncs:
        fp.GMRES(restart=4).solve(Counted(j), g, max_steps=10, rtol=0.0, atol=0.0)
        fp.Neumann(order=5).solve(Counted(j), g)
    assert syncs.count == 0
    counts = []
    for check_every in (1, 4):
        with CountSyncs() as syncs:
            fp.GMRES(restart=20).solve(Counted(j), g, max_steps=40, rtol=1e-30, atol=0.0, check_every=check_every)
        counts.append(syncs.count)
    assert counts[1] < counts[0]


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), dim=st.integers(1, 7), restart=st.integers(1, 8), seed=st.integers(0, 1000))
def test_gmres_meets_its_tolerance_or_reports_otherwise(batch, dim, restart, seed):
    j, g = dense_system(batch, dim, radius=0.7, seed=seed)
    result = fp.GMRES(restart=restart).solve(Counted(j), g, max_steps=60, rtol=1e-10, atol=0.0)
    residual = true_residual(j, g, result.u)
    torch.testing.assert_close(result.residual, residual, rtol=0, atol=1e-12)
    assert torch.equal(result.converged, residual <= 1e-10 * g.norm(dim=1))
    assert (residual <= g.norm(dim=1)).all()  # a cycle never ends worse than it began
    if restart >= dim:  # GMRES(m) with m < D can stagnate on a non-normal J; full GMRES cannot
        assert result.converged.all()


# --- Neumann ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1, 4])
def test_neumann_is_the_explicit_sum_of_jacobian_powers(order):
    j, g = dense_system(3, 5, radius=0.8, seed=9)
    apply_j = Counted(j)
    u = fp.Neumann(order=order).solve(apply_j, g)
    assert apply_j.calls == order
    power, expected = torch.eye(5, dtype=j.dtype).expand(3, 5, 5), torch.zeros_like(g)
    for _ in range(order + 1):
        expected = expected + torch.einsum("bi,bij->bj", g, power)
        power = power @ j
    torch.testing.assert_close(u, expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("order", [1, 3])
def test_implicit_neumann_is_jfb_with_order_plus_1_steps(order):
    w, x = tanh_layer()
    c = torch.randn_like(x)
    grads = {}
    for name, backward in (("neumann", fp.Implicit(solver=fp.Neumann(order=order))),
                           ("jfb", fp.JFB(steps=order + 1)),
                           ("iteration", fp.Implicit(solver="iteration", max_steps=order, rtol=0.0, atol=0.0))):
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=backward, **TIGHT)
        grads[name] = torch.autograd.grad((sol.z * c).sum(), (w, x))
    for name in ("jfb", "iteration"):
        for a, b in zip(grads["neumann"], grads[name]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- Implicit end to end ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [fp.GMRES(), fp.GMRES(restart=2), fp.Neumann(order=80), "iteration", "broyden"])
def test_each_adjoint_solver_gives_the_dense_implicit_gradient(solver):
    w, x = tanh_layer(batch=3, dim=6)
    c = torch.randn(3, 6, dtype=torch.float64)
    state = None if isinstance(solver, fp.Neumann) else fp.AdjointState()
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.Implicit(solver=solver, state=state), **TIGHT)
    gw, gx = torch.autograd.grad((sol.z * c).sum(), (w, x))
    gw_ref, gx_ref = dense_implicit_grad(w, x, sol.z, c)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-11)
    if state is not None:
        assert state.num_solves == 1 and state.converged.all()
        assert (state.status == fp.Status.CONVERGED).all()
        # u is the dense adjoint g (I - J)^{-1}
        torch.testing.assert_close(state.u, dense_adjoint(dense_jacobians(w, x, sol.z), c), rtol=1e-9, atol=1e-11)


def test_implicit_gmres_gradcheck_with_warm_start():
    """gradcheck calls backward many times with one state: each warm-started solve must still be exact."""
    w, x = tanh_layer(batch=2, dim=3)
    state = fp.AdjointState()
    backward = fp.Implicit(solver=fp.GMRES(restart=2), state=state)

    def layer(w, x):
        return fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=backward, **TIGHT).z

    assert torch.autograd.gradcheck(layer, (w, x), atol=1e-7)
    assert state.num_solves > 10


@pytest.mark.parametrize("solver", [fp.GMRES(), "anderson", "iteration"])
def test_warm_start_cuts_adjoint_steps_and_keeps_the_gradient(solver):
    w, x = tanh_layer(batch=3, dim=16, scale=0.9)
    c = torch.randn_like(x)
    state = fp.AdjointState()
    backward = fp.Implicit(solver=solver, rtol=1e-11, atol=0.0, state=state)
    steps, grads = [], []
    for _ in range(2):  # the same backward twice
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=backward, **TIGHT)
        grads.append(torch.autograd.grad((sol.z * c).sum(), (w, x)))
        steps.append(state.num_steps)
    assert steps[1] <= 2 < steps[0], steps
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # After a small parameter change: still fewer steps than a cold start, and the gradient of the new problem.
    w2 = (w + 1e-3).detach().requires_grad_()
    cold = fp.AdjointState(warm_start=False)
    for s in (state, cold):
        sol = fp.solve(tanh_map(w2, x), torch.zeros_like(x),
                       backward=fp.Implicit(solver=solver, rtol=1e-11, atol=0.0, state=s), **TIGHT)
        grads.append(torch.autograd.grad((sol.z * c).sum(), (w2, x)))
    assert state.num_steps < cold.num_steps, (state.num_steps, cold.num_steps)
    for a, b in zip(grads[2], grads[3]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_warm_start_needs_a_matching_shape_and_can_be_off():
    w, x = tanh_layer(batch=3, dim=6)
    state, off = fp.AdjointState(), fp.AdjointState(warm_start=False)
    steps = {}
    for name, s, batch in (("cold", state, 3), ("other shape", state, 2), ("off", off, 3), ("off again", off, 3)):
        sol = fp.solve(tanh_map(w, x[:batch]), torch.zeros_like(x[:batch]),
                       backward=fp.Implicit(solver="anderson", state=s), **TIGHT)
        sol.z.sum().backward()
        steps[name] = s.num_steps
    assert steps["other shape"] > 2 and steps["off"] == steps["off again"] == steps["cold"]
    state.clear()
    assert state.u is None and state.num_solves == 0 and state.start_for(x) is None


def test_state_reports_an_unconverged_adjoint():
    """Two iterations from g cannot meet rtol=1e-12; the record says so, with the residual ||g J^2|| of the
    iterate g (I + J) whose image was returned (checked against dense Jacobians)."""
    w, x = tanh_layer(batch=3, dim=6)
    c = torch.randn_like(x)
    state = fp.AdjointState()
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x),
                   backward=fp.Implicit(solver="iteration", max_steps=2, rtol=1e-12, atol=0.0, state=state), **TIGHT)
    torch.autograd.grad((sol.z * c).sum(), w)
    j = dense_jacobians(w, x, sol.z)
    g_j2 = torch.einsum("bi,bij,bjk->bk", c, j, j)
    assert state.num_steps == 2 and not state.converged.any()
    assert (state.status == fp.Status.MAX_STEPS).all()
    torch.testing.assert_close(state.residual, g_j2.norm(dim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state.u, c + torch.einsum("bi,bij->bj", c, j) + g_j2, rtol=1e-12, atol=1e-14)


def test_reentrant_same_layer_twice_with_one_state():
    """One layer, one state, applied twice in a graph: each backward starts from the other's adjoint, and the
    gradient still equals a long explicit unroll."""
    w, x = tanh_layer(batch=3, dim=5, scale=0.5)
    grads = {}
    state = fp.AdjointState()
    for name, backward in (("gmres", fp.Implicit(solver=fp.GMRES(), state=state)), ("unroll", fp.JFB(steps=80))):
        f = tanh_map(w, x)
        z = fp.solve(f, torch.zeros_like(x), backward=backward, **TIGHT).z
        f2 = tanh_map(w, z)
        z = fp.solve(f2, torch.zeros_like(x), backward=backward, **TIGHT).z
        grads[name] = torch.autograd.grad((z ** 2).sum(), (w, x))
    assert state.num_solves == 2 and state.converged.all()
    for a, b in zip(grads["gmres"], grads["unroll"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [fp.GMRES(), "anderson"])
def test_nan_sample_does_not_poison_the_others_end_to_end(solver):
    w, x = tanh_layer(batch=3, dim=6)
    x_bad = x.detach().clone()
    x_bad[1, 2] = math.nan
    x_bad.requires_grad_()
    c = torch.randn_like(x)
    state = fp.AdjointState()
    sol = fp.solve(tanh_map(w, x_bad), torch.zeros_like(x), backward=fp.Implicit(solver=solver, state=state),
                   **TIGHT)
    (gx,) = torch.autograd.grad((sol.z * c).sum(), x_bad)
    good = [0, 2]
    _, gx_ref = dense_implicit_grad(w, x[good], sol.z[good], c[good])
    torch.testing.assert_close(gx[good], gx_ref, rtol=1e-9, atol=1e-11)
    assert state.converged.tolist() == [True, False, True]
    assert state.status[1] == fp.Status.NONFINITE


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="GMRES: restart must be an int >= 1, got 0"):
        fp.GMRES(restart=0)
    with pytest.raises(ValueError, match="GMRES: restart"):
        fp.GMRES(restart=True)
    with pytest.raises(ValueError, match=r"GMRES: unknown option\(s\) \['max_iter'\]"):
        fp.GMRES(max_iter=5)
    with pytest.raises(ValueError, match="Neumann: order must be an int >= 0, got -1"):
        fp.Neumann(order=-1)
    with pytest.raises(ValueError, match="Neumann: order must be an int >= 0, got 2.0"):
        fp.Neumann(order=2.0)
    with pytest.raises(ValueError, match=r"Neumann: unknown option\(s\) \['terms'\]"):
        fp.Neumann(terms=2)
    for name, value in (("rtol", 1e-6), ("atol", 1e-6), ("max_steps", 5), ("state", fp.AdjointState())):
        with pytest.raises(ValueError, match=f"Implicit: {name} does not apply to solver=Neumann"):
            fp.Implicit(solver=fp.Neumann(order=2), **{name: value})
    with pytest.raises(TypeError, match="Implicit: solver must be None, a Solver, GMRES, Neumann or one of"):
        fp.Implicit(solver=3)
    with pytest.raises(ValueError, match=r"Implicit: solver must be .*GMRES\(\.\.\.\) or Neumann\(order=\.\.\.\) "
                                         r"instance.*got 'gmres'"):
        fp.Implicit(solver="gmres")  # strings name fixed-point solvers only; the message points to the instances
    with pytest.raises(TypeError, match="Implicit: state must be None or an AdjointState, got dict"):
        fp.Implicit(state={})
    with pytest.raises(TypeError, match="AdjointState: warm_start must be a bool, got int"):
        fp.AdjointState(warm_start=1)
    with pytest.raises(TypeError):
        fp.AdjointState(True)  # keyword only


def test_restarted_gmres_can_stall_beyond_spectral_radius_one_and_reports_it():
    """The documented limit: restart < D carries no guarantee when I - J is indefinite; the stall is reported."""
    gen = torch.Generator().manual_seed(0)
    batch, dim = 3, 60
    j = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(dim)
    g = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    assert (torch.linalg.eigvals(j).abs().amax(-1) > 1.4).all()  # precondition: plain iteration diverges
    exact = dense_adjoint(j, g)
    stalled = fp.GMRES(restart=20).solve(Counted(j), g, max_steps=1000, rtol=1e-6, atol=0.0)
    error = (stalled.u - exact).norm(dim=1) / exact.norm(dim=1)
    assert error[:2].min() > 0.5  # far from the solution after 1000 steps
    assert stalled.converged.tolist() == [False, False, True]
    assert stalled.status.tolist() == [fp.Status.MAX_STEPS, fp.Status.MAX_STEPS, fp.Status.CONVERGED]
    # the reported residual is the true one, so `converged` can be trusted
    torch.testing.assert_close(stalled.residual, true_residual(j, g, stalled.u), rtol=1e-9, atol=0.0)
    full = fp.GMRES(restart=dim).solve(Counted(j), g, max_steps=1000, rtol=1e-10, atol=0.0)
    assert full.converged.all() and full.num_iterations <= dim
    torch.testing.assert_close(full.u, exact, rtol=1e-7, atol=1e-8)
    # through Implicit the same stall shows in AdjointState.converged (f is linear, so J is the same at any z)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    state = fp.AdjointState()
    mode = fp.Implicit(solver=fp.GMRES(restart=20), max_steps=1000, rtol=1e-6, atol=0.0, state=state)
    sol = fp.solve(lambda z: torch.einsum("bij,bj->bi", j, z) + x, torch.zeros_like(x), backward=mode,
                   max_steps=5)
    (sol.z * g).sum().backward()
    assert state.converged.tolist() == [False, False, True]
    assert state.status.tolist() == [fp.Status.MAX_STEPS, fp.Status.MAX_STEPS, fp.Status.CONVERGED]
    assert (x.grad[2] - exact[2]).norm() < 1e-4 * exact[2].norm()  # dL/dx = u for f(z) = J z + x, to rtol's scale

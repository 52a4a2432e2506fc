"""Regression tests for defects found in review, each reproduced before its fix."""

import pytest
import torch
from problems import affine, tanh_layer, tanh_map

import fixedpoint as fp


def test_anderson_keeps_a_converged_sample_in_fixed_step_mode():
    """All-zero residuals once overflowed the small system's weights to inf and moved the sample to z = 0."""
    c = torch.tensor([[2.0, 4.0, 6.0], [1.0, 1.0, 1.0]])
    f = lambda z: 0.5 * z + 0.5 * c
    z0 = torch.stack([c[0], torch.zeros(3)])  # sample 0 starts exactly at its fixed point
    for dtype in (torch.float32, torch.float64):
        sol = fp.solve(lambda z: f(z.float()).to(dtype), z0.to(dtype), solver=fp.Anderson(memory=5), rtol=0,
                       atol=0, max_steps=9)
        torch.testing.assert_close(sol.z[0].float(), c[0])
        torch.testing.assert_close(sol.z[1].float(), c[1], rtol=1e-4, atol=1e-4)


def test_anderson_bf16_fixed_step_solve_is_accurate_for_every_sample():
    prob = affine(0.7, batch=6, dim=32, dtype=torch.float32, seed=3)
    x, w = prob.x.bfloat16(), prob.w.bfloat16()
    sol = fp.solve(lambda z: z @ w.T + x, torch.zeros_like(x), solver="anderson", rtol=0, atol=0, max_steps=40)
    err = (sol.z.float() - prob.solution).norm(dim=1) / prob.solution.norm(dim=1)
    assert (err < 0.02).all(), err


@pytest.mark.parametrize("scale", [1e-12, 1e-17])
def test_anderson_steps_unchanged_at_extreme_scales_in_float32(scale):
    prob = affine(0.9, batch=4, dim=64, dtype=torch.float32)
    base = fp.solve(prob.f, torch.zeros_like(prob.x), solver="anderson", rtol=1e-5, atol=0, max_steps=300)
    small = prob.scaled(scale)
    sol = fp.solve(small.f, torch.zeros_like(small.x), solver="anderson", rtol=1e-5, atol=0, max_steps=300)
    assert sol.converged.all() and base.converged.all()
    assert abs(sol.num_steps - base.num_steps) <= 1, (sol.num_steps, base.num_steps)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_solver_algebra_ignores_the_callers_autocast(solver):
    x = affine(0.9, batch=4, dim=64, dtype=torch.float32).x

    def elementwise(z):  # autocast leaves elementwise ops alone, so only the solver's bmm could change
        return torch.tanh(z) * 0.5 + x

    plain = fp.solve(elementwise, torch.zeros_like(x), solver=solver, rtol=1e-6, atol=0, max_steps=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fp.solve(elementwise, torch.zeros_like(x), solver=solver, rtol=1e-6, atol=0, max_steps=200)
    assert cast.converged.all() and cast.num_steps == plain.num_steps


def test_fp16_residual_does_not_overflow():
    c = torch.tensor([[40000.0], [-40000.0]], dtype=torch.float16)
    f = lambda z: 0.1 * z + 0.9 * c
    z0 = -c
    sol = fp.solve(f, z0, solver="iteration", rtol=1e-2, atol=0, max_steps=20, on_nonfinite="raise")
    assert sol.converged.all()
    assert torch.isfinite(sol.residual).all()


def test_sjfb_without_no_grad_steps_handles_1d_states_and_raise():
    class NoSolve(fp.StochasticJFB):
        def draw(self):
            return 0, 1

    w = torch.tensor(0.5, requires_grad=True)
    sol = fp.solve(lambda z: w * z + 1, torch.zeros(3), backward=NoSolve(max_no_grad=0, max_with_grad=1))
    assert sol.z.shape == (3,) and sol.num_steps == 1
    with pytest.raises(FloatingPointError, match="non-finite"):
        fp.solve(lambda z: z * float("nan"), torch.zeros(3, 2), backward=NoSolve(max_no_grad=0, max_with_grad=1),
                 on_nonfinite="raise")


def test_implicit_leaves_a_frozen_layer_frozen():
    w, x = tanh_layer()
    w.requires_grad_(False)
    x.requires_grad_(False)
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward="implicit")
    assert not sol.z.requires_grad
    head = torch.nn.Linear(x.shape[1], 1).double()
    head(sol.z).sum().backward()  # trains the head only, no adjoint solve
    assert head.weight.grad is not None


def test_implicit_when_f_ignores_z():
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    sol = fp.solve(lambda z: x @ w, torch.zeros(2, 3, dtype=torch.float64), backward="implicit")
    (g,) = torch.autograd.grad(sol.z.sum(), w)
    torch.testing.assert_close(g, x.T @ torch.ones(2, 3, dtype=torch.float64))  # J = 0: the explicit gradient


def test_deq_with_integer_input_and_no_z0_names_x():
    class F(torch.nn.Module):
        def forward(self, z, x):
            return z * 0.5 + x

    with pytest.raises(TypeError, match="x must be a floating-point tensor when z0 is None"):
        fp.DEQ(F())(torch.tensor([[1, 2, 3]]))


def test_solutions_compare_by_identity():
    sol = fp.solve(lambda z: 0.5 * z, torch.ones(2, 2))
    assert sol == sol and sol != fp.solve(lambda z: 0.5 * z, torch.ones(2, 2))


def test_loop_enters_no_autocast_context_when_autocast_is_off():
    """The solver algebra is kept out of the caller's autocast; when there is none, the loop must not pay for
    entering a disabling context on every step (about 3 us of Python each on the CPU)."""
    import contextlib
    import warnings

    from fixedpoint._loop import _autocast_enabled_before_2_4, _no_autocast

    cpu = torch.device("cpu")
    assert isinstance(_no_autocast(cpu), contextlib.nullcontext)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context = _no_autocast(cpu)
        assert isinstance(context, torch.autocast)
        with context:
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    with warnings.catch_warnings():  # the pre-2.4 spelling, deprecated since, must agree with the device query
        warnings.simplefilter("ignore")
        for enabled in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                assert _autocast_enabled_before_2_4("cpu") is torch.is_autocast_enabled("cpu") is enabled
        assert _autocast_enabled_before_2_4("cuda") is torch.is_autocast_enabled("cuda")


@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
def test_a_sample_non_finite_for_one_step_stays_flagged(solver):
    """Non-finite is "ever non-finite": a sample whose map returns NaN once no longer holds the solve up (it stops
    when the others converge) and is reported NONFINITE with its best finite iterate, even if later steps would
    have been finite again."""
    prob = affine(0.9, batch=3, dim=8)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = prob.f(z)
        if calls[0] == 3:
            out[1] = float("nan")
        return out

    sol = fp.solve(f, torch.zeros_like(prob.x), solver=solver, rtol=1e-8, atol=0, max_steps=400, trace=True)
    assert sol.statuses() == [fp.Status.CONVERGED, fp.Status.NONFINITE, fp.Status.CONVERGED]
    assert sol.num_steps < 400 and torch.isfinite(sol.z).all()
    assert sol.trace[2, 1].isnan() and sol.residual[1] == sol.trace[:2, 1].min()

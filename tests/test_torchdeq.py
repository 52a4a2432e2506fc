"""Cross-checks against torchdeq 0.1.0 on the same problems: solutions, step counts and gradients.

torchdeq is only a reference where it is correct. Its known defects are not tested as expectations here:
its Anderson ridge ``lam`` is absolute (so it is set tiny, or compared as the defect it is), it crashes on bf16
(everything here is float64), and ``max_iter <= 2`` returns ``x0`` (every ``max_iter`` here is far larger).

Conventions, read from torchdeq's source:
  * ``get_solver(key)(func, x0, max_iter=, tol=, stop_mode=, ...)`` returns ``(z, trajectory, info)``; the state
    is flattened to ``(B, -1)`` internally and ``info`` holds ``abs_lowest``/``rel_lowest`` of shape ``(B,)``.
  * Its stopping test is ``max_b residual_b < tol`` on the current iterate, with ``abs`` = ``||f(z) - z||`` and
    ``rel`` = ``abs / (||f(z)|| + 1e-9)``; ours (``rtol=0``) is ``residual_b <= atol`` for every sample.
  * ``fixed_point_iter`` and ``anderson`` return the image ``f(z)`` of the best iterate, as we do; ``broyden``
    returns the best iterate itself.
  * Its ``anderson`` spends two applications before its first mixing step; every count below is of actual calls
    of ``f``, taken with a counting wrapper, and ``Solution.num_steps`` counts ours the same way.

torchdeq emits no warning on import or in any call made here, so no warning filter is needed (the project's
``filterwarnings = error`` stays in force).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

torchdeq = pytest.importorskip("torchdeq")

from torchdeq.solver import get_solver

import fixedpoint as fp

DTYPE = torch.float64
BATCH, DIM = 8, 48
RHOS = (0.5, 0.9, 0.95)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny and torchdeq runs hundreds of small ops per solve: with intra-op threads on a
    loaded 2-core machine the file took ~45 s instead of a few. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ------------------------------------------------------------------------------------------------- problems


class Affine:
    """``f(z) = z W^T + x``, ``W = Q diag(linspace(-rho, rho)) Q^T``: Lipschitz constant exactly ``rho``."""

    def __init__(self, rho: float, *, seed: int = 0, batch: int = BATCH, dim: int = DIM) -> None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DTYPE))
        self.rho = rho
        self.w = q @ torch.diag(torch.linspace(-rho, rho, dim, dtype=DTYPE)) @ q.T
        self.x = torch.randn(batch, dim, generator=gen, dtype=DTYPE)

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w.T + self.x

    def solution(self) -> torch.Tensor:
        eye = torch.eye(self.w.shape[0], dtype=DTYPE)
        return torch.linalg.solve(eye - self.w, self.x.T).T


def tanh_problem(*, seed: int = 0, batch: int = 8, dim: int = 32, scale: float = 0.8,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` with spectral norm ``scale`` and input ``x`` for ``f(z) = tanh(z W^T + x)`` (Lipschitz <= scale)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    w = scale * w / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(batch, dim, generator=gen, dtype=DTYPE)
    return w, x


def tanh_map(w: torch.Tensor, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: torch.tanh(z @ w.T + x)


def tanh_fixed_point(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fixed point to machine precision by dense Newton steps (Jacobian ``diag(1 - f^2) W``)."""
    w, x = w.detach(), x.detach()
    z = torch.zeros_like(x)
    eye = torch.eye(w.shape[0], dtype=DTYPE)
    for _ in range(30):
        fz = torch.tanh(z @ w.T + x)
        jac = (1 - fz**2)[:, :, None] * w  # (B, D, D)
        z = z + torch.linalg.solve(eye - jac, (fz - z)[:, :, None])[:, :, 0]
    assert float((torch.tanh(z @ w.T + x) - z).norm(dim=1).max()) < 1e-14
    return z


def tanh_exact_grads(w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *, implicit: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dW, dL/dx)`` of ``L = <g, z*>`` in closed form: implicit (``u = (I - J)^{-T} g``) or JFB (``u = g``)."""
    z = tanh_fixed_point(w, x)
    s = 1 - z**2  # tanh' at the fixed point, since tanh(z W^T + x) = z
    u = g
    if implicit:
        eye = torch.eye(w.shape[0], dtype=DTYPE)
        jac = s[:, :, None] * w.detach()
        u = torch.linalg.solve((eye - jac).transpose(1, 2), g[:, :, None])[:, :, 0]
    v = u * s  # gradient w.r.t. the pre-activation
    return v.T @ z, v


def counted(f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    calls = [0]

    def wrapped(z: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f(z)

    return wrapped, calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-sample relative error ``||a - b|| / ||b||`` of ``(B, D)`` states."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def grad_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a whole gradient tensor."""
    return float((a - b).norm() / b.norm())


# Our solver and torchdeq's corresponding one. torchdeq's Anderson ridge is absolute: at a residual of 1e-9
# the Gram entries are ~1e-18, so any lam above ~1e-20 dominates them near convergence; lam=1e-30 is "none".
OURS = {"iteration": fp.Iteration(), "anderson": fp.Anderson(), "broyden": fp.Broyden()}
THEIRS = {"iteration": ("fixed_point_iter", {}), "anderson": ("anderson", {"lam": 1e-30}), "broyden": ("broyden", {})}

# ------------------------------------------------------------------------------------------------- solutions

RTOL = 1e-10


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("name", list(OURS))
def test_affine_solution_matches_closed_form_and_torchdeq(name: str, rho: float) -> None:
    prob = Affine(rho)
    z0 = torch.zeros_like(prob.x)
    z_star = prob.solution()

    sol = fp.solve(prob.f, z0, solver=OURS[name], rtol=RTOL, atol=0.0, max_steps=1000)
    assert bool(sol.converged.all())
    assert bool((sol.residual <= RTOL * sol.z.norm(dim=1) * (1 + 1e-9) + 1e-15).all())

    key, kwargs = THEIRS[name]
    z_td, _, info = get_solver(key)(prob.f, z0, max_iter=1000, tol=RTOL, stop_mode="rel", **kwargs)
    assert float(info["rel_lowest"].max()) < RTOL

    # Our contract: the returned z = f(z_k) is within rho/(1 - rho) * residual of the fixed point.
    bound = rho / (1 - rho) * sol.residual
    assert bool(((sol.z - z_star).norm(dim=1) <= bound * (1 + 1e-6) + 1e-13 * z_star.norm(dim=1)).all())
    # ... which at rtol 1e-10 and rho <= 0.95 is 2e-9 relative; torchdeq's is as close.
    assert rel_err(sol.z, z_star) < 1e-7
    assert rel_err(z_td, z_star) < 1e-7
    assert rel_err(sol.z, z_td) < 1e-7


@pytest.mark.parametrize("name", list(OURS))
def test_image_shaped_state_flattened_like_torchdeq(name: str) -> None:
    # A (B, C, H, W) state: both libraries treat all non-batch elements of a sample as one vector.
    prob = Affine(0.9)
    shape = (BATCH, 4, 3, DIM // 12)

    def f(z: torch.Tensor) -> torch.Tensor:
        return prob.f(z.reshape(BATCH, -1)).reshape(shape)

    z0 = torch.zeros(shape, dtype=DTYPE)
    sol = fp.solve(f, z0, solver=OURS[name], rtol=RTOL, atol=0.0, max_steps=1000)
    key, kwargs = THEIRS[name]
    z_td, _, info = get_solver(key)(f, z0, max_iter=1000, tol=RTOL, stop_mode="rel", **kwargs)
    assert sol.z.shape == z_td.shape == shape
    assert bool(sol.converged.all())
    assert float(info["rel_lowest"].max()) < RTOL
    z_star = prob.solution()
    assert rel_err(sol.z.reshape(BATCH, -1), z_star) < 1e-7
    assert rel_err(sol.z.reshape(BATCH, -1), z_td.reshape(BATCH, -1)) < 1e-7


@pytest.mark.parametrize("name", list(OURS))
def test_tanh_solution_matches_torchdeq(name: str) -> None:
    w, x = tanh_problem()
    f = tanh_map(w, x)
    z0 = torch.zeros_like(x)
    z_star = tanh_fixed_point(w, x)

    sol = fp.solve(f, z0, solver=OURS[name], rtol=RTOL, atol=0.0, max_steps=500)
    key, kwargs = THEIRS[name]
    z_td, _, info = get_solver(key)(f, z0, max_iter=500, tol=RTOL, stop_mode="rel", **kwargs)

    assert bool(sol.converged.all())
    assert float(info["rel_lowest"].max()) < RTOL
    lip = 0.8  # ||diag(tanh') W|| <= ||W||
    assert bool(((sol.z - z_star).norm(dim=1) <= lip / (1 - lip) * sol.residual * (1 + 1e-6) + 1e-14).all())
    assert rel_err(sol.z, z_star) < 1e-7
    assert rel_err(z_td, z_star) < 1e-7
    assert rel_err(sol.z, z_td) < 1e-7


# ------------------------------------------------------------------------------------------------- step counts
#
# Same stopping rule on both sides: absolute residual ATOL (ours rtol=0), from z0 = 0. Each test asserts that
# ours needs no more applications of f than torchdeq's corresponding solver and that ours converged.

ATOL = 1e-8
MAX_STEPS = 500


def _compare_steps(prob: Affine, ours: fp.Solver, key: str, **td_kwargs: object) -> tuple[int, int, float]:
    z0 = torch.zeros_like(prob.x)
    sol = fp.solve(prob.f, z0, solver=ours, rtol=0.0, atol=ATOL, max_steps=MAX_STEPS)
    assert bool(sol.converged.all()), f"ours did not converge in {MAX_STEPS} steps: {sol.residual.max():.2e}"
    assert rel_err(sol.z, prob.solution()) < 1e-6
    f_td, calls = counted(prob.f)
    _, _, info = get_solver(key)(f_td, z0, max_iter=MAX_STEPS, tol=ATOL, stop_mode="abs", **td_kwargs)
    return sol.num_steps, calls[0], float(info["abs_lowest"].max())


@pytest.mark.parametrize("rho", RHOS)
def test_steps_iteration_vs_fixed_point_iter(rho: float) -> None:
    ours, theirs, td_res = _compare_steps(Affine(rho), fp.Iteration(), "fixed_point_iter")
    assert td_res < ATOL  # the same algorithm: both converge, and ours takes no more steps (in fact the same)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("lam", [1e-4, 1e-10, 1e-30], ids=["lam=1e-4(default)", "lam=1e-10", "lam=1e-30"])
def test_steps_anderson_vs_torchdeq_anderson(rho: float, lam: float) -> None:
    # Same memory (torchdeq's default m=6), our default relative ridge. With lam=1e-30 (no ridge) the two are
    # the same algorithm and take the same steps; with an absolute ridge torchdeq degrades near convergence
    # (or does not converge within MAX_STEPS, whereupon it has spent all MAX_STEPS).
    ours, theirs, _ = _compare_steps(Affine(rho), fp.Anderson(memory=6), "anderson", m=6, lam=lam)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("rho", RHOS)
def test_steps_broyden_vs_torchdeq_broyden_unbounded_memory(rho: float) -> None:
    # torchdeq keeps every update (LBFGS_thres=None means max_iter of them); ours with memory >= max_steps never
    # restarts: the same method.
    ours, theirs, td_res = _compare_steps(Affine(rho), fp.Broyden(memory=MAX_STEPS), "broyden")
    assert td_res < ATOL
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("rho", RHOS)
def test_steps_broyden_vs_torchdeq_broyden_same_bounded_memory(rho: float) -> None:
    # 30 updates each: we restart from -I, torchdeq overwrites the oldest update.
    ours, theirs, _ = _compare_steps(Affine(rho), fp.Broyden(memory=30), "broyden", LBFGS_thres=30)
    assert ours <= theirs, (ours, theirs)


def test_broyden_same_method_as_torchdeq_before_rounding_takes_over() -> None:
    # Without restarts both are good Broyden from H = -I: the residual traces must agree step for step while the
    # rounding differences are still small (they are amplified later, as Broyden's secant updates lose accuracy).
    prob = Affine(0.9)
    z0 = torch.zeros_like(prob.x)
    sol = fp.solve(prob.f, z0, solver=fp.Broyden(memory=MAX_STEPS), rtol=0.0, atol=ATOL, max_steps=MAX_STEPS,
                   trace=True)
    _, _, info = get_solver("broyden")(prob.f, z0, max_iter=MAX_STEPS, tol=ATOL, stop_mode="abs")
    ours = sol.trace[1:16].T  # residuals of z_1..z_15, (B, 15)
    theirs = info["abs_trace"][:, 1:16]  # column 0 is torchdeq's 1e8 placeholder; column k is x_k's residual
    assert float(((ours - theirs).abs() / theirs).max()) < 1e-8


_BROYDEN_DEFAULTS_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="with defaults ours (memory=30, restart from -I after 30 updates) needs more steps than torchdeq's "
           "default broyden (which keeps max_iter updates, i.e. never restarts here): at atol=1e-8 from z0=0, "
           "rho=0.9: 49 vs 43 applications; rho=0.95: 60 vs 50 (rho=0.5 converges before any restart: 18 vs 18)",
)


@pytest.mark.parametrize("rho", [0.5, pytest.param(0.9, marks=_BROYDEN_DEFAULTS_XFAIL),
                                 pytest.param(0.95, marks=_BROYDEN_DEFAULTS_XFAIL)])
def test_steps_broyden_defaults_vs_torchdeq_defaults(rho: float) -> None:
    ours, theirs, td_res = _compare_steps(Affine(rho), fp.Broyden(), "broyden")
    assert td_res < ATOL
    assert ours <= theirs, (ours, theirs)


# ------------------------------------------------------------------------------------------------- gradients

GRAD_TOL = 1e-11


def _td_grads(w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, **deq_kwargs: object,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    w, x = w.clone().requires_grad_(), x.clone().requires_grad_()
    deq = torchdeq.get_deq(**deq_kwargs)  # a module, in training mode: the gradient functions are applied
    z_out, _ = deq(tanh_map(w, x), torch.zeros_like(x))
    return torch.autograd.grad((z_out[-1] * g).sum(), (w, x))


def _our_grads(w: torch.Tensor, x: torch.Tensor, g: torch.Tensor, solver: fp.Solver, backward: fp.Backward,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    w, x = w.clone().requires_grad_(), x.clone().requires_grad_()
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), solver=solver, backward=backward, rtol=0.0,
                   atol=GRAD_TOL, max_steps=300)
    assert bool(sol.converged.all())
    return torch.autograd.grad((sol.z * g).sum(), (w, x))


def _loss_weights(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


@pytest.mark.parametrize("name", list(OURS))
def test_implicit_gradient_matches_torchdeq_ift(name: str) -> None:
    w, x = tanh_problem()
    g = _loss_weights(x)
    exact = tanh_exact_grads(w, x, g, implicit=True)
    ours = _our_grads(w, x, g, OURS[name], fp.Implicit())
    # torchdeq's Broyden on both sides (its Anderson would bring its absolute ridge into the adjoint solve).
    theirs = _td_grads(w, x, g, ift=True, f_solver="broyden", f_max_iter=300, f_tol=GRAD_TOL,
                       b_solver="broyden", b_max_iter=300, b_tol=GRAD_TOL)
    for a, b, e in zip(ours, theirs, exact):
        assert grad_err(a, e) < 1e-10
        assert grad_err(b, e) < 1e-10
        assert grad_err(a, b) < 1e-10


@pytest.mark.parametrize("name", list(OURS))
def test_jfb_gradient_matches_torchdeq_phantom_grad(name: str) -> None:
    w, x = tanh_problem()
    g = _loss_weights(x)
    exact = tanh_exact_grads(w, x, g, implicit=False)
    ours = _our_grads(w, x, g, OURS[name], fp.JFB(steps=1))
    theirs = _td_grads(w, x, g, ift=False, grad=1, tau=1.0, f_solver="broyden", f_max_iter=300, f_tol=GRAD_TOL)
    for a, b, e in zip(ours, theirs, exact):
        assert grad_err(a, e) < 1e-10
        assert grad_err(b, e) < 1e-10
        assert grad_err(a, b) < 1e-10
    # The check discriminates: one-step JFB is a different gradient from the implicit one on this problem.
    implicit = tanh_exact_grads(w, x, g, implicit=True)
    assert all(grad_err(a, i) > 1e-2 for a, i in zip(ours, implicit))

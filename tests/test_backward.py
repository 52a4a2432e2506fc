"""Backward modes against independent routes: gradcheck, dense IFT, explicit unrolls, saved-tensor memory."""

import copy

import pytest
import torch
from problems import dense_implicit_grad, tanh_layer, tanh_map

import fixedpoint as fp

TIGHT = {"rtol": 1e-13, "atol": 0.0, "max_steps": 300}


def saved_bytes(fn):
    """Bytes of distinct storages saved for backward while ``fn`` runs, and its result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# --- Implicit -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
def test_implicit_matches_dense_implicit_gradient(solver):
    w, x = tanh_layer(batch=3, dim=6)
    c = torch.randn(3, 6, dtype=torch.float64)
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), solver=solver, backward="implicit", **TIGHT)
    assert sol.converged.all()
    gw, gx = torch.autograd.grad((sol.z * c).sum(), (w, x))
    gw_ref, gx_ref = dense_implicit_grad(w, x, sol.z, c)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-11)


def test_implicit_gradcheck():
    w, x = tanh_layer(batch=2, dim=4)

    def layer(w, x):
        return fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.Implicit(solver="anderson"), **TIGHT).z

    assert torch.autograd.gradcheck(layer, (w, x), atol=1e-7)


def test_implicit_value_is_the_forward_solution():
    w, x = tanh_layer()
    plain = fp.solve(tanh_map(w, x), torch.zeros_like(x), rtol=1e-10)
    implicit = fp.solve(tanh_map(w, x), torch.zeros_like(x), rtol=1e-10, backward="implicit")
    torch.testing.assert_close(implicit.z, plain.z, rtol=0, atol=0)
    assert implicit.num_steps == plain.num_steps + 1  # the one recorded application
    with torch.no_grad():
        assert fp.solve(tanh_map(w, x), torch.zeros_like(x), rtol=1e-10, backward="implicit").num_steps == \
            plain.num_steps


def test_implicit_is_reentrant_same_layer_twice_in_one_graph():
    """The same DEQ applied twice; gradients must equal a long explicit unroll (an independent route)."""
    torch.manual_seed(0)
    cell = torch.nn.Linear(5, 5).double()
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, ord=2))

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z, x):
            return torch.tanh(self.cell(z) + x)

    x = torch.randn(3, 5, dtype=torch.float64)
    grads = {}
    for name, backward in (("implicit", "implicit"), ("unroll", fp.JFB(steps=80))):
        deq = fp.DEQ(F(), backward=backward, rtol=1e-13, atol=0, max_steps=200)
        cell.zero_grad()
        z = deq(deq(x).z).z
        (z ** 2).sum().backward()
        grads[name] = cell.weight.grad.clone()
    torch.testing.assert_close(grads["implicit"], grads["unroll"], rtol=1e-10, atol=1e-12)


def test_implicit_options_default_to_forward_and_can_be_set():
    from fixedpoint._forward import forward_options

    options = forward_options(solver="broyden", max_steps=17, rtol=1e-3, atol=1e-5, check_every=2, trace=False,
                              on_nonfinite="report")
    inherited = fp.Implicit().adjoint_options(options)
    assert (inherited.solver, inherited.max_steps, inherited.rtol, inherited.atol) == \
        (options.solver, 17, 1e-3, 1e-5)
    custom = fp.Implicit(solver=fp.Anderson(memory=3), max_steps=9, rtol=0.0, atol=1e-8).adjoint_options(options)
    assert (custom.solver, custom.max_steps, custom.rtol, custom.atol) == (fp.Anderson(memory=3), 9, 0.0, 1e-8)
    with pytest.raises(ValueError, match="Implicit: solver must be"):
        fp.Implicit(solver="gmres")
    with pytest.raises(ValueError, match="Implicit: max_steps"):
        fp.Implicit(max_steps=0)


@pytest.mark.parametrize("k", [1, 3])
def test_implicit_with_k_adjoint_iterations_is_jfb_with_k_plus_1_steps(k):
    """The adjoint options are really used. Started at g, k iterations of u <- u J + g give the Neumann sum
    g (I + J + ... + J^k): exactly the gradient of JFB(steps=k+1) taken at the same fixed point."""
    w, x = tanh_layer()
    c = torch.randn_like(x)
    short = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.Implicit(solver="iteration", max_steps=k),
                     **TIGHT)
    g_short = torch.autograd.grad((short.z * c).sum(), w)[0]
    jfb = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.JFB(steps=k + 1), **TIGHT)
    g_jfb = torch.autograd.grad((jfb.z * c).sum(), w)[0]
    torch.testing.assert_close(g_short, g_jfb, rtol=1e-9, atol=1e-12)


def test_implicit_double_backward_raises():
    w, x = tanh_layer()
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward="implicit", **TIGHT)
    with pytest.raises(RuntimeError, match="Implicit: backward with create_graph=True"):
        torch.autograd.grad(sol.z.sum(), w, create_graph=True)


# --- JFB ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 5])
def test_jfb_equals_autograd_through_explicit_steps_from_the_solution(steps):
    w, x = tanh_layer()
    c = torch.randn_like(x)
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.JFB(steps=steps), **TIGHT)
    g = torch.autograd.grad((sol.z * c).sum(), (w, x))
    z = fp.solve(tanh_map(w, x), torch.zeros_like(x), **TIGHT).z.detach()
    for _ in range(steps):
        z = torch.tanh(z @ w.T + x)
    g_ref = torch.autograd.grad((z * c).sum(), (w, x))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert sol.num_steps == fp.solve(tanh_map(w, x), torch.zeros_like(x), **TIGHT).num_steps + steps


def test_multistep_jfb_approaches_the_implicit_gradient():
    w, x = tanh_layer(scale=0.8)
    c = torch.randn_like(x)
    exact = dense_implicit_grad(w, x, fp.solve(tanh_map(w, x), torch.zeros_like(x), **TIGHT).z, c)[0]
    errors = []
    for steps in (1, 3, 10, 40):
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.JFB(steps=steps), **TIGHT)
        g = torch.autograd.grad((sol.z * c).sum(), w)[0]
        errors.append(((g - exact).norm() / exact.norm()).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-3 < errors[0]


def test_jfb_saves_k_times_one_step_and_nothing_for_the_solve():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(512, 8)
    f = lambda z: torch.tanh(mlp(z) + x)

    def jfb_bytes(k, max_steps=30):
        return saved_bytes(lambda: fp.solve(f, torch.zeros_like(x), backward=fp.JFB(steps=k), max_steps=max_steps,
                                            rtol=0, atol=0))[0]

    one, two = jfb_bytes(1), jfb_bytes(2)
    per_step = two - one
    assert per_step > 0.8 * one  # only the input of the first step is shared between steps
    for k in (3, 4, 8):
        # linear in k (up to a weight that is saved once from the second step on, when z requires grad)
        assert abs(jfb_bytes(k) - (one + (k - 1) * per_step)) <= 0.02 * jfb_bytes(k)
        assert 0.8 * k <= jfb_bytes(k) / one <= 1.1 * k
    assert jfb_bytes(1, max_steps=1) == one  # the 30 forward steps saved nothing


def test_jfb_runs_its_steps_in_eval_too():
    w, x = tanh_layer()
    train = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.JFB(steps=2), rtol=1e-6)
    with torch.no_grad():
        evaluated = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=fp.JFB(steps=2), rtol=1e-6)
    torch.testing.assert_close(train.z.detach(), evaluated.z, rtol=0, atol=0)
    assert train.num_steps == evaluated.num_steps


# --- Stochastic JFB -------------------------------------------------------------------------------------------

def test_sjfb_draw_ranges_and_seeding():
    mode = fp.StochasticJFB(max_no_grad=4, max_with_grad=3, min_with_grad=2, generator=torch.Generator().manual_seed(1))
    draws = [mode.draw() for _ in range(400)]
    assert {n for n, _ in draws} == set(range(5))
    assert {m for _, m in draws} == {2, 3}
    again = fp.StochasticJFB(max_no_grad=4, max_with_grad=3, min_with_grad=2,
                             generator=torch.Generator().manual_seed(1))
    assert [again.draw() for _ in range(400)] == draws
    other = fp.StochasticJFB(max_no_grad=4, max_with_grad=3, min_with_grad=2,
                             generator=torch.Generator().manual_seed(2))
    assert [other.draw() for _ in range(400)] != draws
    low = fp.StochasticJFB(min_no_grad=2, max_no_grad=3, max_with_grad=1, generator=torch.Generator().manual_seed(0))
    assert {low.draw()[0] for _ in range(100)} == {2, 3}
    # the global generator is used when none is given, and is seedable the usual way
    torch.manual_seed(5)
    a = [fp.StochasticJFB(max_no_grad=9, max_with_grad=9).draw() for _ in range(20)]
    torch.manual_seed(5)
    assert [fp.StochasticJFB(max_no_grad=9, max_with_grad=9).draw() for _ in range(20)] == a


def test_sjfb_runs_n_no_grad_then_m_with_grad_steps():
    w, x = tanh_layer()
    c = torch.randn_like(x)
    mode = fp.StochasticJFB(max_no_grad=5, max_with_grad=4, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(mode)  # an identical generator, to know the draws in advance
    for _ in range(12):
        n, m = twin.draw()
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), solver="iteration", backward=mode, max_steps=50)
        assert sol.num_steps == n + m
        g = torch.autograd.grad((sol.z * c).sum(), (w, x))
        z = prev = torch.zeros_like(x)
        with torch.no_grad():
            for _ in range(n):
                prev, z = z, torch.tanh(z @ w.T + x)
            # the residual of the last iterate evaluated: z_{n-1} (whose image is z_n), or z_0 when n = 0
            residual = (torch.tanh(prev @ w.T + x) - prev).norm(dim=1)
        for _ in range(m):
            z = torch.tanh(z @ w.T + x)
        torch.testing.assert_close(sol.z, z, rtol=0, atol=0)
        torch.testing.assert_close(sol.residual, residual)
        g_ref = torch.autograd.grad((z * c).sum(), (w, x))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sjfb_no_grad_steps_save_nothing():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(256, 8)
    f = lambda z: torch.tanh(lin(z) + x)
    class Pinned(fp.StochasticJFB):
        def draw(self):
            return self.max_no_grad, self.max_with_grad

    per_m = {}
    for n in (0, 3, 10):
        mode = Pinned(max_no_grad=n, max_with_grad=2, min_with_grad=2)
        per_m[n], sol = saved_bytes(lambda: fp.solve(f, torch.zeros_like(x), solver="iteration", backward=mode))
        assert sol.num_steps == n + 2
    assert per_m[0] == per_m[3] == per_m[10] > 0


def test_sjfb_solves_normally_when_autograd_is_off():
    w, x = tanh_layer()
    mode = fp.StochasticJFB(max_no_grad=2, max_with_grad=1)
    with torch.no_grad():
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=mode, rtol=1e-10, max_steps=100)
    plain = fp.solve(tanh_map(w, x), torch.zeros_like(x), rtol=1e-10, max_steps=100)
    assert sol.converged.all()
    torch.testing.assert_close(sol.z, plain.z, rtol=0, atol=0)
    assert sol.num_steps == plain.num_steps


@pytest.mark.parametrize("kwargs, error", [
    ({"max_no_grad": -1, "max_with_grad": 2}, ValueError),
    ({"max_no_grad": 2, "max_with_grad": 0}, ValueError),
    ({"max_no_grad": 2, "max_with_grad": 3, "min_with_grad": 0}, ValueError),
    ({"max_no_grad": 2, "max_with_grad": 3, "min_with_grad": 4}, ValueError),
    ({"max_no_grad": 2, "max_with_grad": 3, "generator": 7}, TypeError),
    ({"max_no_grad": 2, "max_with_grad": 3, "min_no_grad": 3}, ValueError),
])
def test_sjfb_bad_arguments(kwargs, error):
    with pytest.raises(error, match="StochasticJFB"):
        fp.StochasticJFB(**kwargs)


def test_backward_mode_objects_deepcopy_and_compare():
    mode = fp.StochasticJFB(max_no_grad=3, max_with_grad=2, generator=torch.Generator().manual_seed(3))
    clone = copy.deepcopy(mode)
    assert [clone.draw() for _ in range(5)] == [mode.draw() for _ in range(5)]
    assert fp.JFB(steps=2) == fp.JFB(steps=2) != fp.JFB(steps=3)
    with pytest.raises(ValueError, match="JFB: steps"):
        fp.JFB(steps=0)

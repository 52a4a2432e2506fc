"""Trajectory supervision (``keep``): kept images against an explicit loop of the solver's step interface, their
gradients against explicit one-step graphs, the length when the solve stops early, no syncs, memory, compile."""

import pytest
import torch
from problems import dense_implicit_grad, tanh_layer, tanh_map, two_leaf
from test_backward import saved_bytes
from test_solve import CountSyncs

import fixedpoint as fp

SOLVERS = {"iteration": fp.Iteration(), "damped": fp.Iteration(damping=0.7), "anderson": fp.Anderson(),
           "broyden": fp.Broyden()}


def explicit_loop(f, z0, solver, steps):
    """Inputs ``z_{k-1}`` and images ``f(z_{k-1})`` of steps ``k = 1..steps``, through the solver's public step
    interface, without autograd."""
    inputs, images = [], []
    with torch.no_grad():
        z = z0
        state = solver.init(z)
        for k in range(steps):
            fz = f(z)
            inputs.append(z)
            images.append(fz)
            z = solver.step(state, z, fz, k)
    return inputs, images


@pytest.mark.parametrize("tolerance", [False, True], ids=["fixed", "early_stop"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_kept_are_the_solver_loop_images_in_the_order_asked(name, tolerance):
    w, x = tanh_layer(batch=3, dim=6, scale=0.9)
    f = tanh_map(w, x)
    options = {"rtol": 1e-10, "atol": 0.0} if tolerance else {"rtol": 0.0, "atol": 0.0}
    keep = [7, 1, 4, 12]
    sol = fp.solve(f, torch.zeros_like(x), solver=SOLVERS[name], max_steps=12, keep=keep, **options)
    assert sol.num_steps == 12  # the problem needs more than 12 steps to converge
    _, images = explicit_loop(f, torch.zeros_like(x), SOLVERS[name], 12)
    assert len(sol.kept) == len(keep)
    for step, kept in zip(keep, sol.kept):
        assert torch.equal(kept.detach(), images[step - 1]), (name, step)
    # recording changes nothing else
    plain = fp.solve(f, torch.zeros_like(x), solver=SOLVERS[name], max_steps=12, **options)
    assert plain.kept is None
    assert torch.equal(plain.z, sol.z) and torch.equal(plain.residual, sol.residual)


def test_iteration_kept_are_powers_of_f():
    w, x = tanh_layer()
    f = tanh_map(w, x)
    sol = fp.solve(f, torch.zeros_like(x), solver="iteration", rtol=0, atol=0, max_steps=6, keep=range(1, 7))
    z = torch.zeros_like(x)
    for kept in sol.kept:
        z = f(z).detach()
        assert torch.equal(kept.detach(), z)
    assert torch.equal(sol.kept[-1].detach(), sol.z)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_kept_gradients_equal_one_step_graphs_from_the_loop_iterates(name):
    w, x = tanh_layer(batch=3, dim=5, scale=0.9)
    f = tanh_map(w, x)
    keep = [5, 2, 9]
    weights = [torch.randn_like(x) for _ in keep]
    sol = fp.solve(f, torch.zeros_like(x), solver=SOLVERS[name], backward="jfb", rtol=0, atol=0, max_steps=10,
                   keep=keep)
    grads = torch.autograd.grad(sum((k * c).sum() for k, c in zip(sol.kept, weights)), (w, x))

    inputs, _ = explicit_loop(f, torch.zeros_like(x), SOLVERS[name], 10)
    loss = sum((f(inputs[step - 1]) * c).sum() for step, c in zip(keep, weights))
    for g, g_ref in zip(grads, torch.autograd.grad(loss, (w, x))):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backward", ["jfb", "implicit"])
def test_loss_on_kept_and_final_adds_the_backward_modes_gradient(backward):
    w, x = tanh_layer()
    f = tanh_map(w, x)
    a, b = torch.randn_like(x), torch.randn_like(x)
    sol = fp.solve(f, torch.zeros_like(x), solver="anderson", backward=backward, rtol=1e-12, atol=0,
                   max_steps=100, keep=[3])
    grads = torch.autograd.grad((sol.kept[0] * a).sum() + (sol.z * b).sum(), (w, x))

    inputs, _ = explicit_loop(f, torch.zeros_like(x), fp.Anderson(), 3)
    kept_part = torch.autograd.grad((f(inputs[2]) * a).sum(), (w, x))
    solved = fp.solve(f, torch.zeros_like(x), solver="anderson", rtol=1e-12, atol=0, max_steps=100).z
    if backward == "jfb":  # one with-grad step from the no-grad solve's result
        final_part = torch.autograd.grad((f(solved) * b).sum(), (w, x))
    else:
        final_part = dense_implicit_grad(w, x, solved, b)
    for g, k, z in zip(grads, kept_part, final_part):
        torch.testing.assert_close(g, k + z, rtol=1e-8, atol=1e-10)


def test_steps_not_reached_get_the_final_solution():
    prob = two_leaf()  # converges in about 35 plain iterations at rtol 1e-12
    w, x = tanh_layer(scale=0.3)
    for backward in (None, "jfb", "implicit"):
        sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), solver="anderson", backward=backward, rtol=1e-8,
                       atol=0, max_steps=50, keep=[50, 2, 30])
        assert sol.converged.all() and sol.num_steps < 29
        assert len(sol.kept) == 3
        assert sol.kept[0] is sol.z and sol.kept[2] is sol.z and sol.kept[1] is not sol.z
    # structured states too: the final state itself
    sol = fp.solve(prob.f, prob.zeros(), solver="iteration", backward="jfb", rtol=1e-12, atol=0, max_steps=100,
                   keep=[100, 1])
    assert sol.num_steps < 100 and sol.kept[0] is sol.z and isinstance(sol.kept[1], tuple)


def test_stochastic_jfb_keeps_its_no_grad_steps_then_the_final_solution():
    class Pinned(fp.StochasticJFB):
        def draw(self):
            return self.max_no_grad, self.max_with_grad

    w, x = tanh_layer()
    f = tanh_map(w, x)
    sol = fp.solve(f, torch.zeros_like(x), solver="iteration", max_steps=10, keep=[4, 1, 2, 3],
                   backward=Pinned(max_no_grad=2, max_with_grad=2, min_with_grad=2))
    _, images = explicit_loop(f, torch.zeros_like(x), fp.Iteration(), 2)
    assert torch.equal(sol.kept[1].detach(), images[0]) and torch.equal(sol.kept[2].detach(), images[1])
    assert sol.kept[0] is sol.z and sol.kept[3] is sol.z and sol.kept[1].requires_grad
    none = fp.solve(f, torch.zeros_like(x), max_steps=10, keep=[4, 1],
                    backward=Pinned(max_no_grad=0, max_with_grad=1))  # no solver step at all
    assert none.kept == (none.z, none.z)


def test_kept_carry_gradients_only_with_a_backward_mode_and_autograd_on():
    w, x = tanh_layer()
    f = tanh_map(w, x)
    assert not any(k.requires_grad for k in fp.solve(f, torch.zeros_like(x), keep=[1, 2]).kept)
    with torch.no_grad():
        sol = fp.solve(f, torch.zeros_like(x), backward="jfb", keep=[1, 2])
    assert not any(k.requires_grad for k in sol.kept)
    assert all(k.requires_grad for k in fp.solve(f, torch.zeros_like(x), backward="jfb", keep=[1, 2]).kept)


def test_fixed_step_keep_adds_no_sync_and_no_application():
    w, x = tanh_layer()
    calls = [0]

    def f(z):
        calls[0] += 1
        return torch.tanh(z @ w.T + x)

    for solver in ("iteration", "anderson", "broyden"):
        calls[0] = 0
        with CountSyncs() as syncs:
            sol = fp.solve(f, torch.zeros_like(x), solver=solver, backward="jfb", rtol=0, atol=0, max_steps=7,
                           keep=[7, 3, 1])
        assert syncs.count == 0, solver
        assert calls[0] == sol.num_steps == 8  # 7 solver steps and JFB's one


def test_each_kept_state_saves_one_activation_and_nothing_else():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(256, 8)
    f = lambda z: torch.tanh(mlp(z) + x)

    def saved(keep):
        return saved_bytes(lambda: fp.solve(f, torch.zeros_like(x), solver="iteration", backward="jfb",
                                            rtol=0, atol=0, max_steps=20, keep=keep))[0]

    base, one, three = saved(None), saved([5]), saved([2, 9, 17])
    per_kept = one - base
    assert per_kept > 0.8 * base  # about one step's activations (JFB's own step is one too)
    assert abs(three - (base + 3 * per_kept)) <= 0.02 * three


@pytest.mark.parametrize("keep, error, match", [
    ([0], ValueError, r"keep must be .*1\.\.max_steps=10.*bad entry 0"),
    ([11], ValueError, "bad entry 11"),
    ([2, True], ValueError, "bad entry True"),
    ([2.0], ValueError, "bad entry 2.0"),
    ([3, 1, 3], ValueError, "repeated entries"),
    ({1, 2}, TypeError, "keep must be None or a list/tuple/range.*got set"),
    (3, TypeError, "got int"),
])
def test_bad_keep_raises_naming_the_argument(keep, error, match):
    calls = []
    with pytest.raises(error, match=match):
        fp.solve(lambda z: calls.append(z) or z, torch.zeros(2, 3), max_steps=10, keep=keep)
    with pytest.raises(error, match=match):
        fp.DEQ(torch.nn.Linear(3, 3), max_steps=10, keep=keep)
    assert not calls


def test_empty_keep_gives_an_empty_tuple():
    assert fp.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3), keep=[]).kept == ()


def test_deq_keep_with_a_dict_state():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, state, x):
            return {"a": torch.tanh(0.3 * self.lin(state["b"]) + x), "b": 0.5 * state["a"].flip(1)}

    layer = fp.DEQ(Cell(), backward="jfb", rtol=0, atol=0, max_steps=6, keep=[2, 5])
    assert "keep=[2, 5]" in repr(layer)
    x = torch.randn(3, 4)
    sol = layer(x, z0={"a": torch.zeros(3, 4), "b": torch.zeros(3, 4)})
    assert len(sol.kept) == 2 and all(list(k) == ["a", "b"] for k in sol.kept)
    sum(k["a"].sum() for k in sol.kept).backward()
    assert layer.f.lin.weight.grad.abs().sum() > 0


def test_adjoint_and_other_derived_solves_do_not_keep():
    from fixedpoint._forward import forward_options

    options = forward_options(solver="anderson", max_steps=9, rtol=1e-4, atol=0, check_every=1, trace=False,
                              on_nonfinite="report", keep=[1, 3])
    assert options.keep == (1, 3)
    assert fp.Implicit().adjoint_options(options).keep is None
    assert options.with_(keep=(2,)).keep == (2,)


@pytest.mark.slow  # about 3 s a solver on 2 CPU cores
@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
def test_fixed_step_solve_with_keep_compiles_fullgraph(solver):
    torch._dynamo.reset()
    lin = torch.nn.Linear(6, 6)
    x = torch.randn(4, 6)

    def run(x):
        sol = fp.solve(lambda z: torch.tanh(lin(z) + x), torch.zeros_like(x), solver=solver, rtol=0, atol=0,
                       max_steps=5, backward="jfb", keep=[4, 2])
        return sol.z, sol.kept

    compiled = torch.compile(run, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    (z, kept), (z_ref, kept_ref) = compiled(x), run(x)
    torch.testing.assert_close(z, z_ref)
    for k, k_ref in zip(kept, kept_ref):
        torch.testing.assert_close(k, k_ref)
    g = torch.autograd.grad(sum(k.sum() for k in kept), lin.weight)[0]
    g_ref = torch.autograd.grad(sum(k.sum() for k in kept_ref), lin.weight)[0]
    torch.testing.assert_close(g, g_ref)


def test_kept_of_a_multi_dimensional_tensor_state_keep_its_shape_and_graph():
    w = torch.randn(3, 3, requires_grad=True)
    f = lambda z: torch.tanh(0.3 * z @ w + 1.0)  # z: (B, 2, 3)
    sol = fp.solve(f, torch.zeros(4, 2, 3), solver="iteration", backward="jfb", rtol=0, atol=0, max_steps=3,
                   keep=[2])
    assert sol.kept[0].shape == (4, 2, 3)
    (g,) = torch.autograd.grad(sol.kept[0].sum(), w)
    (g_ref,) = torch.autograd.grad(f(f(torch.zeros(4, 2, 3)).detach()).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.slow  # about 3 s on 2 CPU cores
def test_fixed_step_solve_with_a_tuple_state_and_keep_compiles_fullgraph():
    torch._dynamo.reset()
    prob = two_leaf()

    def run():
        sol = fp.solve(prob.f, prob.zeros(), solver="anderson", rtol=0, atol=0, max_steps=5, backward="jfb",
                       keep=[2, 4])
        return sol.z, sol.kept

    (z, kept), (z_ref, kept_ref) = torch.compile(run, fullgraph=True, backend="eager")(), run()
    for leaf, leaf_ref in zip((*z, *kept[0], *kept[1]), (*z_ref, *kept_ref[0], *kept_ref[1])):
        torch.testing.assert_close(leaf, leaf_ref, rtol=0, atol=0)

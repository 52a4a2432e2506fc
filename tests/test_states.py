"""Tuple and dict states: the same solve as on the concatenated tensor, structure and dtypes kept, gradients to
every leaf's inputs against a dense implicit gradient, errors that name what differs, ``DEQ`` with such states."""

import collections
import copy

import pytest
import torch
from problems import two_leaf
from torch import nn

import fixedpoint as fp

SOLVER_NAMES = ["iteration", "anderson", "broyden"]
EXACT = {"rtol": 0.0, "atol": 1e-12}


def _backwards():
    """Every backward mode; a fresh seeded StochasticJFB per call, so two routes draw the same (n, m)."""
    return {
        "none": lambda: None,
        "jfb": lambda: fp.JFB(),
        "jfb3": lambda: fp.JFB(steps=3),
        "sjfb": lambda: fp.StochasticJFB(max_no_grad=6, max_with_grad=3, generator=torch.Generator().manual_seed(3)),
        "implicit": lambda: fp.Implicit(rtol=1e-12, atol=0.0),
    }


@pytest.mark.parametrize("backward", list(_backwards()))
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_tuple_state_equals_the_problem_on_the_concatenated_tensor(solver, backward):
    prob = two_leaf()
    make = _backwards()[backward]
    weights = torch.randn(3, 7, dtype=torch.float64)
    options = {"solver": solver, "rtol": 1e-9, "atol": 0.0, "max_steps": 100, "trace": True}

    sol = fp.solve(prob.f, prob.zeros(), backward=make(), **options)
    ref = fp.solve(prob.f_cat, torch.zeros(3, 7, dtype=torch.float64), backward=make(), **options)

    h, c = sol.z
    assert isinstance(sol.z, tuple) and h.shape == (3, 3) and c.shape == (3, 2, 2)
    torch.testing.assert_close(h, ref.z[:, :3], **EXACT)
    torch.testing.assert_close(c, ref.z[:, 3:].reshape(3, 2, 2), **EXACT)
    assert sol.num_steps == ref.num_steps
    torch.testing.assert_close(sol.residual, ref.residual, **EXACT)
    torch.testing.assert_close(sol.trace, ref.trace, **EXACT)
    assert torch.equal(sol.status, ref.status)
    if backward == "none":
        assert not h.requires_grad and not c.requires_grad
        return
    loss = (h * weights[:, :3]).sum() + (c.reshape(3, 4) * weights[:, 3:]).sum()
    grads = torch.autograd.grad(loss, prob.params)
    grads_ref = torch.autograd.grad((ref.z * weights).sum(), prob.params)
    for name, g, g_ref in zip("acex", grads, grads_ref):
        assert g.abs().sum() > 0, name  # each leaf's parameters and input get a gradient
        torch.testing.assert_close(g, g_ref, rtol=0.0, atol=1e-11, msg=name)


def test_fixed_step_tuple_state_is_bit_for_bit():
    prob = two_leaf()
    for solver in SOLVER_NAMES:
        sol = fp.solve(prob.f, prob.zeros(), solver=solver, rtol=0, atol=0, max_steps=9)
        ref = fp.solve(prob.f_cat, torch.zeros(3, 7, dtype=torch.float64), solver=solver, rtol=0, atol=0,
                       max_steps=9)
        assert torch.equal(torch.cat([sol.z[0], sol.z[1].reshape(3, 4)], 1), ref.z), solver


def test_dict_state_keeps_keys_order_shapes_and_dtypes():
    prob = two_leaf()
    h0, c0 = prob.zeros()

    def f(state):  # returns the keys in another order: allowed, matched by key
        h, c = prob.f((state["h"], state["c"]))
        assert list(state) == ["h", "c"] and state["h"].is_contiguous() and state["c"].is_contiguous()
        return {"c": c, "h": h}

    sol = fp.solve(f, {"h": h0, "c": c0}, rtol=1e-10, atol=0, backward="jfb")
    ref = fp.solve(prob.f, (h0, c0), rtol=1e-10, atol=0, backward="jfb")
    assert type(sol.z) is dict and list(sol.z) == ["h", "c"]
    assert sol.z["h"].shape == (3, 3) and sol.z["c"].shape == (3, 2, 2)
    assert sol.z["h"].dtype == sol.z["c"].dtype == torch.float64
    assert torch.equal(sol.z["h"], ref.z[0]) and torch.equal(sol.z["c"], ref.z[1])
    assert sol.z["h"].requires_grad


def test_namedtuple_state_comes_back_as_the_namedtuple():
    Pair = collections.namedtuple("Pair", ["h", "c"])
    prob = two_leaf()
    seen = []

    def f(state):
        seen.append(type(state))
        return Pair(*prob.f(state))

    sol = fp.solve(f, Pair(*prob.zeros()), rtol=1e-8)
    assert type(sol.z) is Pair and set(seen) == {Pair}
    assert sol.z.c.shape == (3, 2, 2)


def test_mixed_dtypes_promote_for_the_solver_and_cast_back_per_leaf():
    """Rule: the flat state has the promoted dtype (here float32); f sees, and z returns, each leaf in its own."""
    gen = torch.Generator().manual_seed(0)
    w = 0.5 * torch.randn(4, 4, generator=gen) / 4
    x = torch.randn(2, 4, generator=gen)

    def f(state):
        h, c = state
        assert h.dtype == torch.bfloat16 and c.dtype == torch.float32
        h_new = torch.tanh(c @ w.T + x).to(torch.bfloat16)  # a bf16 leaf returned in bf16
        c_new = 0.5 * torch.tanh(h.float() + c)
        return h_new, c_new

    def f_cat(z):  # the same map on a float32 (B, 8) tensor, rounding the first leaf as the rule says
        h_new, c_new = f((z[:, :4].to(torch.bfloat16), z[:, 4:]))
        return torch.cat([h_new.float(), c_new], dim=1)

    for solver in ("iteration", "anderson"):
        z0 = (torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4))
        sol = fp.solve(f, z0, solver=solver, rtol=1e-5, atol=0, max_steps=60)
        ref = fp.solve(f_cat, torch.zeros(2, 8), solver=solver, rtol=1e-5, atol=0, max_steps=60)
        assert sol.z[0].dtype == torch.bfloat16 and sol.z[1].dtype == torch.float32
        assert sol.residual.dtype == torch.float32 and sol.num_steps == ref.num_steps
        assert torch.equal(sol.z[0], ref.z[:, :4].to(torch.bfloat16)) and torch.equal(sol.z[1], ref.z[:, 4:])
        assert sol.converged.all(), solver


# --- Gradients of a 2-leaf LSTM-like cell against the dense implicit gradient ---------------------------------

def _lstm_params(hidden=3, inputs=2, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4 * hidden, hidden, generator=gen, dtype=torch.float64)
    w = 0.5 * w / torch.linalg.matrix_norm(w, ord=2)
    u = 0.5 * torch.randn(4 * hidden, inputs, generator=gen, dtype=torch.float64)
    b = torch.zeros(4 * hidden, dtype=torch.float64)
    b[hidden:2 * hidden] = -1.0  # forget gate about 0.27: the cell state contracts
    x = torch.randn(batch, inputs, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (w, u, b, x)]


def _lstm(h, c, w, u, b, x):
    """One LSTM-like update at the fixed point's input ``x``, ``(h, c) -> (h', c')``."""
    i, forget, g, o = (h @ w.T + x @ u.T + b).chunk(4, dim=-1)
    c_new = torch.sigmoid(forget) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


@pytest.mark.parametrize("backward", ["implicit", "jfb_many"])
def test_lstm_cell_gradient_matches_dense_float64_implicit_gradient(backward):
    w, u, b, x = _lstm_params()
    hidden = w.shape[1]
    zeros = torch.zeros(2, hidden, dtype=torch.float64)
    mode = fp.Implicit() if backward == "implicit" else fp.JFB(steps=120)  # Neumann series to 120 terms
    sol = fp.solve(lambda s: _lstm(*s, w, u, b, x), (zeros, zeros.clone()), backward=mode, rtol=1e-13, atol=0,
                   max_steps=300)
    assert sol.converged.all()
    h, c = sol.z
    a, d = torch.randn(2, hidden, dtype=torch.float64), torch.randn(2, hidden, dtype=torch.float64)
    grads = torch.autograd.grad((h * a).sum() + (c * d).sum(), (w, u, b, x))

    # Dense: per sample, u = g (I - J)^{-1} on the concatenated state s = (h, c), then u dF/dtheta.
    expected = [torch.zeros_like(t) for t in (w, u, b, x)]
    for k in range(2):
        s_star = torch.cat([h[k], c[k]]).detach()

        def step(s, k=k):
            return torch.cat(_lstm(s[:hidden], s[hidden:], w, u, b, x[k]))

        jac = torch.autograd.functional.jacobian(step, s_star)
        eye = torch.eye(2 * hidden, dtype=torch.float64)
        adj = torch.linalg.solve((eye - jac).T, torch.cat([a[k], d[k]]))
        for acc, g in zip(expected, torch.autograd.grad(step(s_star), (w, u, b, x), adj)):
            acc += g
    for name, g, g_ref in zip(["w", "u", "b", "x"], grads, expected):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)


# --- Errors ----------------------------------------------------------------------------------------------------

def _z(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize("z0, error, match", [
    ((_z(3, 2), _z(4, 2)), ValueError, r"z0\[1\] has batch size 4 but z0\[0\] has 3"),
    ({"h": _z(3, 2), "c": _z(2, 2)}, ValueError, r"z0\['c'\] has batch size 2 but z0\['h'\] has 3"),
    ((_z(3, 2), 1.0), TypeError, r"z0\[1\] must be a torch.Tensor, got float"),
    ((_z(3, 2), torch.zeros(3, 2, dtype=torch.int64)), TypeError, r"z0\[1\] must have a floating-point dtype"),
    ((_z(3, 2), torch.tensor(1.0)), ValueError, r"z0\[1\] must have a non-empty leading batch dimension"),
    ((), ValueError, "at least one tensor"),
    ({}, ValueError, "at least one tensor"),
    ([_z(3, 2), _z(3, 2)], TypeError, "z0 must be a torch.Tensor, a tuple of tensors or a dict of tensors, got list"),
    ((_z(3, 2), torch.zeros(3, 2, device="meta")), ValueError, r"z0\[1\] is on meta but z0\[0\] is on cpu"),
    (((_z(3, 2),), _z(3, 2)), TypeError, r"z0\[0\] must be a torch.Tensor, got tuple"),  # nesting is not supported
])
def test_bad_structured_z0_raises_before_calling_f(z0, error, match):
    calls = []
    with pytest.raises(error, match=match):
        fp.solve(lambda z: calls.append(z) or z, z0)
    assert not calls


@pytest.mark.parametrize("output, error, match", [
    (lambda h, c: h, TypeError, r"f\(z\) must be a tuple of 2 tensors like z0, got Tensor"),
    (lambda h, c: (h,), ValueError, r"f\(z\) must be a tuple of 2 tensors like z0, got 1"),
    (lambda h, c: (h, c[:, :1]), ValueError, r"f\(z\)\[1\] must have the shape of z0\[1\] \(3, 2\), got \(3, 1\)"),
    (lambda h, c: (h, c.long()), TypeError, r"f\(z\)\[1\] must be floating point"),
    (lambda h, c: (h, "c"), TypeError, r"f\(z\)\[1\] must be a tensor, got str"),
    (lambda h, c: {"h": h, "c": c}, TypeError, r"f\(z\) must be a tuple of 2"),
])
def test_tuple_map_output_mismatch_names_what_differs(output, error, match):
    with pytest.raises(error, match=match):
        fp.solve(lambda s: output(*s), (_z(3, 4), _z(3, 2)))


@pytest.mark.parametrize("output, error, match", [
    (lambda s: {"h": s["h"]}, ValueError, r"must have z0's keys \['h', 'c'\], got \['h'\]; missing \['c'\]"),
    (lambda s: {**s, "extra": s["h"]}, ValueError, r"unexpected \['extra'\]"),
    (lambda s: (s["h"], s["c"]), TypeError, r"f\(z\) must be a dict with z0's keys"),
    (lambda s: {"h": s["h"], "c": s["c"][:1]}, ValueError, r"f\(z\)\['c'\] must have the shape of z0\['c'\]"),
])
def test_dict_map_output_mismatch_names_what_differs(output, error, match):
    with pytest.raises(error, match=match):
        fp.solve(output, {"h": _z(3, 4), "c": _z(3, 2)})


def test_tensor_state_with_a_structured_map_says_so():
    with pytest.raises(TypeError, match="a tuple/dict state needs z0 of that structure"):
        fp.solve(lambda z: (z, z), torch.zeros(2, 3))


# --- DEQ -------------------------------------------------------------------------------------------------------

class LSTMLike(nn.Module):
    """``(h, c), x -> (h', c')``, contracting (small recurrent weight, forget gate biased low)."""

    def __init__(self, hidden: int, inputs: int):
        super().__init__()
        self.w = nn.Linear(hidden, 4 * hidden, bias=False)
        self.u = nn.Linear(inputs, 4 * hidden)
        with torch.no_grad():
            self.w.weight.mul_(0.5 / torch.linalg.matrix_norm(self.w.weight, ord=2))
            self.u.bias[hidden:2 * hidden] = -1.0

    def forward(self, state, x):
        i, forget, g, o = (self.w(state["h"]) + self.u(x)).chunk(4, dim=-1)
        c = torch.sigmoid(forget) * state["c"] + torch.sigmoid(i) * torch.tanh(g)
        return {"h": torch.sigmoid(o) * torch.tanh(c), "c": c}


def test_deq_with_a_dict_state_solves_warm_starts_and_trains_every_parameter():
    cell = LSTMLike(4, 3)
    x = torch.randn(5, 3)
    layer = fp.DEQ(cell, rtol=1e-6, atol=0, max_steps=100)
    z0 = {"h": torch.zeros(5, 4, requires_grad=True), "c": torch.zeros(5, 4)}
    sol = layer(x, z0=z0)
    assert sol.converged.all() and list(sol.z) == ["h", "c"]
    after = cell(sol.z, x)
    for key in ("h", "c"):
        torch.testing.assert_close(after[key], sol.z[key], rtol=1e-4, atol=1e-5)
    (sol.z["h"].sum() + sol.z["c"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    assert z0["h"].grad is None  # the initial state is detached
    again = layer(x, z0=sol)  # warm start from the previous Solution
    assert again.converged.all() and again.num_steps < sol.num_steps and again.num_steps <= 3


class TupleCell(nn.Module):
    def forward(self, state, x):
        h, c = state  # a (2, 4) tensor state also unpacks, into its two rows: only the returned tuple tells
        return torch.tanh(0.5 * c + x), 0.5 * h


def test_deq_structured_state_needs_z0():
    layer = fp.DEQ(TupleCell())
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="a tuple/dict state needs z0 of that structure"):
        layer(x)
    sol = copy.deepcopy(layer)(x, z0=(torch.zeros(2, 4), torch.zeros(2, 4)))
    assert isinstance(sol.z, tuple) and sol.converged.all()

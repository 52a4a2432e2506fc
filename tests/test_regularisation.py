"""Stabilisers wired into ``solve`` and ``DEQ``: the Jacobian penalty option and one forward pass per DEQ call."""

import math

import pytest
import torch
from problems import affine
from torch import nn

import fixedpoint as fp


def test_penalty_option_equals_the_estimator_at_the_returned_point():
    problem = affine(0.5, batch=3, dim=6)
    torch.manual_seed(1)
    sol = fp.solve(problem.f, torch.zeros(3, 6, dtype=torch.float64), backward="jfb", num_jacobian_projections=4)
    torch.manual_seed(1)
    fp.solve(problem.f, torch.zeros(3, 6, dtype=torch.float64), backward="jfb")  # the same draws before the penalty
    direct = fp.jacobian_penalty(problem.f, sol.z.detach(), num_projections=4)
    assert sol.jacobian_penalty.shape == (3,) and sol.jacobian_penalty.dtype == torch.float64
    torch.testing.assert_close(sol.jacobian_penalty, direct, rtol=0, atol=0)
    assert fp.solve(problem.f, torch.zeros(3, 6, dtype=torch.float64)).jacobian_penalty is None
    with torch.no_grad():  # a training-time quantity: evaluation pays nothing for it
        assert fp.solve(problem.f, torch.zeros(3, 6, dtype=torch.float64), num_jacobian_projections=4
                        ).jacobian_penalty is None


def test_penalty_mean_is_the_frobenius_norm_of_an_affine_maps_jacobian_and_trains_the_weight():
    """f(z) = z W^T + x has J = W at every z: the estimate's mean is ||W||_F^2, its gradient's mean is 2 W."""
    problem = affine(0.6, batch=2, dim=5)
    w = problem.w.clone().requires_grad_()
    n = 4000
    sol = fp.solve(lambda z: z @ w.T + problem.x, torch.zeros(2, 5, dtype=torch.float64), backward="implicit",
                   num_jacobian_projections=n)
    exact = torch.linalg.matrix_norm(problem.w) ** 2
    # Rademacher projections: Var(v^T A v) = 2 (||A||_F^2 - sum_i A_ii^2) <= 2 ||A||_F^2 with A = W^T W
    std = math.sqrt(2 * float(torch.linalg.matrix_norm(problem.w.T @ problem.w) ** 2) / n)
    assert (sol.jacobian_penalty - exact).abs().max() < 5 * std
    sol.jacobian_penalty.mean().backward()
    torch.testing.assert_close(w.grad, 2 * problem.w, rtol=0.15, atol=0.05)


def test_penalty_on_a_tuple_state_covers_both_leaves():
    """Two uncoupled leaves scaled by a and b: ||J||_F^2 = d_1 a^2 + d_2 b^2, and Rademacher projections of a
    diagonal Jacobian have no variance, so the estimate is exact."""
    a, b = torch.tensor(0.3, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    z0 = (torch.zeros(2, 3), torch.zeros(2, 4, 2))
    sol = fp.solve(lambda z: (a * z[0] + 1, b * z[1] - 1), z0, backward="jfb", num_jacobian_projections=1)
    expected = 3 * a.detach() ** 2 + 8 * b.detach() ** 2
    torch.testing.assert_close(sol.jacobian_penalty, expected.expand(2), rtol=1e-6, atol=0)
    sol.jacobian_penalty.sum().backward()
    torch.testing.assert_close(a.grad, 2 * 2 * 3 * a.detach())
    torch.testing.assert_close(b.grad, 2 * 2 * 8 * b.detach())


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_projection_counts_are_refused_by_name(value):
    with pytest.raises(ValueError, match="num_jacobian_projections"):
        fp.solve(lambda z: z / 2, torch.zeros(2, 3), num_jacobian_projections=value)
    with pytest.raises(ValueError, match="num_jacobian_projections"):
        fp.DEQ(nn.Linear(3, 3), num_jacobian_projections=value)


@pytest.mark.slow
def test_fixed_step_solve_with_the_penalty_compiles_fullgraph():
    w = 0.3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    w.requires_grad_()
    x = torch.randn(4, 6)

    def run(x):
        sol = fp.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), solver="anderson", backward="jfb",
                       rtol=0, atol=0, max_steps=6, num_jacobian_projections=2)
        return sol.z, sol.jacobian_penalty

    torch.manual_seed(3)
    z, penalty = torch.compile(run, fullgraph=True, backend="aot_eager")(x)  # fullgraph: a graph break raises
    torch.manual_seed(3)
    z_ref, penalty_ref = run(x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(penalty, penalty_ref)
    penalty.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


class DroppedCell(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.lin = fp.spectral_norm(nn.Linear(dim, dim), bound=0.8)
        self.drop = fp.VariationalDropout(0.3)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.lin(z)) + x)


def test_a_deq_call_is_one_forward_pass_for_dropout_and_spectral_norm():
    """With one mask per call the map stays a contraction and the solve converges; a mask per iteration would
    make the iterates wander at the dropout's scale."""
    torch.manual_seed(0)
    layer = fp.DEQ(DroppedCell(), solver="iteration", backward="implicit", max_steps=100, rtol=1e-6, atol=0).train()
    x = torch.randn(5, 8)
    power = layer.f.lin.parametrizations.weight[0]
    u_before = power._u.clone()
    sol = layer(x)
    assert bool(sol.converged.all()) and sol.num_steps < 100
    sol.z.square().sum().backward()
    assert layer.f.lin.parametrizations.weight.original.grad is not None
    # One power step for the whole call, not one per iteration (>= 10 of them): u moved by exactly one step.
    w = layer.f.lin.parametrizations.weight.original.detach()
    v = torch.nn.functional.normalize(w.T @ u_before, dim=0)
    torch.testing.assert_close(power._u, torch.nn.functional.normalize(w @ v, dim=0))
    # Outside a DEQ call (and any pass_scope) training-mode dropout refuses to pick a mask silently.
    with pytest.raises(RuntimeError):
        layer.f(torch.zeros(5, 8), x)
    # A caller's scope with a seeded generator decides the masks: two calls under the same seed agree.
    outs = []
    for _ in range(2):
        with fp.pass_scope(layer.f, generator=torch.Generator().manual_seed(7)):
            outs.append(layer(x).z.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_a_deq_without_stabilisers_still_compiles_fullgraph():
    """The pass scope is entered only when f holds a stabiliser: Dynamo cannot trace its ContextVar."""
    torch.manual_seed(0)
    layer = fp.DEQ(nn.Linear(6, 6), solver="iteration", backward="jfb", rtol=0, atol=0, max_steps=5)
    layer.f.weight.data.mul_(0.3)

    class Cell(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    layer.f = Cell(layer.f)
    x = torch.randn(3, 6)
    compiled = torch.compile(lambda x: layer(x).z, fullgraph=True, backend="eager")  # a graph break raises
    torch.testing.assert_close(compiled(x), layer(x).z)


def test_fpdm_forward_is_one_pass_for_a_spectral_norm_in_its_fixed_point_block(monkeypatch):
    import fixedpoint_diffusion as fd
    from fixedpoint.norm import _SpectralNorm

    torch.manual_seed(0)
    model = fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=8, hidden_size=32, num_heads=2,
                            max_steps=6)
    fp.spectral_norm(model.block_fixed_point_projection_fc2, bound=1.0)
    calls = []
    real = _SpectralNorm._power
    monkeypatch.setattr(_SpectralNorm, "_power", lambda self, *a: (calls.append(1), real(self, *a))[1])
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    model.train()
    out = model(x, t, y, num_iterations=6)  # six applications of the fixed-point map
    assert out.solution.num_steps == 6 and len(calls) == 1
    calls.clear()
    model(x, t, y).out.square().mean().backward()  # training call: stochastic JFB, several with-grad steps
    assert len(calls) == 1


def test_penalty_through_attention_with_the_math_kernel_equals_explicit_attention():
    """The fused SDPA kernel has no forward-mode derivative in torch 2.13; its math kernel has, and gives the
    penalty of the same map written out as softmax(q k^T / sqrt(d)) v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    w = (0.5 * torch.randn(8, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    z = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)

    def fused(z):
        h = z @ w
        return torch.nn.functional.scaled_dot_product_attention(h, h, h)

    def explicit(z):
        h = z @ w
        return torch.softmax(h @ h.transpose(-1, -2) / math.sqrt(8), dim=-1) @ h

    torch.manual_seed(5)
    with sdpa_kernel(SDPBackend.MATH):
        penalty = fp.jacobian_penalty(fused, z, num_projections=3)
    torch.manual_seed(5)
    reference = fp.jacobian_penalty(explicit, z, num_projections=3)
    torch.testing.assert_close(penalty, reference)
    (grad,) = torch.autograd.grad(penalty.sum(), w)
    (grad_ref,) = torch.autograd.grad(reference.sum(), w)
    torch.testing.assert_close(grad, grad_ref)

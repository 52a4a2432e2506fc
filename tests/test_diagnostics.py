"""Diagnostics against dense float64 Jacobians, closed-form variances and independently computed gradients."""

import copy
import math

import pytest
import torch
from problems import affine, dense_implicit_grad, tanh_layer, tanh_map

import fixedpoint as fp
from fixedpoint._penalty import _rademacher


def dense_jacobians(f, z):
    """Per-sample Jacobians ``(B, n, n)`` of a map that does not mix samples, by ``jacrev`` in float64."""
    batch = z.shape[0]
    jac = torch.func.jacrev(f)(z).reshape(batch, -1, batch, z[0].numel())
    return torch.stack([jac[b, :, b] for b in range(batch)])


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- jacobian_penalty ------------------------------------------------------------------------------------------

def replicated_tanh(dim=6, copies=20000, seed=0):
    """``copies`` identical samples of one tanh layer: each row of the penalty is an independent draw."""
    w, x = tanh_layer(batch=1, dim=dim, scale=1.5, seed=seed)
    z = torch.randn(1, dim, generator=gen(seed + 1), dtype=torch.float64)
    f = tanh_map(w, x)  # x (1, d) broadcasts over the copies
    return w, x, f, z, z.expand(copies, dim)


def test_penalty_mean_and_variance_match_hutchinson_with_rademacher_vectors():
    _, _, f, z, zs = replicated_tanh()
    jac = dense_jacobians(f, z)[0].detach()
    a = jac.T @ jac
    exact = torch.trace(a).item()  # ||J||_F^2
    var_rademacher = 2 * (a.square().sum() - a.diagonal().square().sum()).item()
    var_gaussian = 2 * a.square().sum().item()
    assert var_gaussian > 1.3 * var_rademacher  # precondition: the two choices are distinguishable here
    draws = fp.jacobian_penalty(f, zs, generator=gen(2)).detach()
    n = draws.numel()
    # CLT: the mean of n draws is within 5 standard errors of the trace
    assert abs(draws.mean().item() - exact) <= 5 * math.sqrt(var_rademacher / n)
    assert 5 * math.sqrt(var_rademacher / n) < 0.03 * exact  # ... a bound tight enough to catch a scale error
    # the sample variance is Rademacher's, not Gaussian's (its own standard error here is about 2%)
    assert draws.var().item() == pytest.approx(var_rademacher, rel=0.08)


def test_penalty_with_fixed_projections_matches_dense_values_and_gradients():
    w, x = tanh_layer(batch=3, dim=5, scale=1.2)
    f = tanh_map(w, x)
    z = torch.randn(3, 5, generator=gen(1), dtype=torch.float64)
    penalty = fp.jacobian_penalty(f, z, num_projections=4, generator=gen(7))
    v = _rademacher((4, 3, 5), z, gen(7))  # the same draws
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    # independent route: dense per-sample Jacobians with create_graph, then ||J v||^2 averaged over v
    ref = []
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda zb, xb=x[b]: torch.tanh(zb @ w.T + xb), z[b],
                                                 create_graph=True)
        ref.append(torch.stack([(jac @ v[p, b]).square().sum() for p in range(4)]).mean())
    ref = torch.stack(ref)
    torch.testing.assert_close(penalty, ref, rtol=1e-12, atol=0)
    weights = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    grads = torch.autograd.grad((penalty * weights).sum(), (w, x))
    grads_ref = torch.autograd.grad((ref * weights).sum(), (w, x))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_penalty_gradient_is_unbiased_for_the_exact_frobenius_gradient():
    w, _, f, z, _ = replicated_tanh(dim=4, copies=4000, seed=3)
    exact = dense_jacobians(f, z)[0].square().sum()  # differentiable in w, x through jacrev
    gw_exact = torch.autograd.grad(exact, w)[0]
    groups = 20  # independent group means give an empirical standard error
    zs = z.expand(4000 // groups, 4)
    g = gen(5)
    group_grads = torch.stack([torch.autograd.grad(fp.jacobian_penalty(f, zs, generator=g).mean(), w)[0]
                               for _ in range(groups)])
    mean, stderr = group_grads.mean(0), group_grads.std(0) / math.sqrt(groups)
    assert ((mean - gw_exact).abs() <= 6 * stderr).all()
    assert (stderr < 0.05 * gw_exact.abs().max()).all()  # the bound is informative


def test_penalty_differentiates_z_only_when_it_requires_grad():
    w, x = tanh_layer(batch=2, dim=4)
    f = tanh_map(w, x)
    z = torch.randn(2, 4, generator=gen(1), dtype=torch.float64)
    fp.jacobian_penalty(f, z, generator=gen(0)).sum().backward()
    assert not z.requires_grad and z.grad is None  # never marked as requiring grad
    zg = z.clone().requires_grad_()
    penalty = fp.jacobian_penalty(f, zg, num_projections=2, generator=gen(3))
    (gz,) = torch.autograd.grad(penalty.sum(), zg)
    v = _rademacher((2, 2, 4), z, gen(3))

    def dense(zz):  # the same v, through dense Jacobians: d/dz of mean_p ||J(z) v_p||^2
        jac = dense_jacobians(f, zz)
        return torch.einsum("bij,pbj->pbi", jac, v).square().sum(-1).mean(0)

    torch.testing.assert_close(gz, torch.func.grad(lambda zz: dense(zz).sum())(z), rtol=1e-11, atol=1e-13)


def test_penalty_on_image_shaped_states_and_output_dtypes():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64)
    z = torch.randn(1, 2, 3, 3, generator=gen(0), dtype=torch.float64)
    f = lambda z: torch.tanh(conv(z))
    jac = dense_jacobians(f, z)[0].detach()
    a = jac.T @ jac
    exact = torch.trace(a).item()
    var = 2 * (a.square().sum() - a.diagonal().square().sum()).item()
    copies = 4000  # identical samples: independent draws in one call
    draws = fp.jacobian_penalty(f, z.expand(copies, 2, 3, 3), generator=gen(1)).detach()
    assert abs(draws.mean().item() - exact) <= 5 * math.sqrt(var / copies)
    assert draws.dtype == torch.float64
    assert fp.jacobian_penalty(lambda z: 2 * z, z.float()).dtype == torch.float32
    bf = fp.jacobian_penalty(lambda z: 2 * z, z.expand(2, 2, 3, 3).bfloat16())
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, torch.full((2,), 4.0 * 18))  # ||2 I||_F^2 = 4 n, exactly for any v = +-1


@pytest.mark.parametrize("bad, error", [
    ({"num_projections": 0}, ValueError), ({"num_projections": 1.5}, ValueError),
    ({"num_projections": True}, ValueError), ({"generator": 3}, TypeError),
])
def test_penalty_rejects_bad_arguments(bad, error):
    with pytest.raises(error, match=next(iter(bad))):
        fp.jacobian_penalty(lambda z: z, torch.zeros(2, 3), **bad)


def test_penalty_rejects_bad_inputs_before_compute():
    calls = []
    f = lambda z: calls.append(1) or z
    with pytest.raises(ValueError, match="generator must be on the state's device meta"):
        fp.jacobian_penalty(f, torch.zeros(2, 3, device="meta"), generator=gen(0))
    with pytest.raises(TypeError, match="z must have a floating-point dtype"):
        fp.jacobian_penalty(f, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="f must be callable"):
        fp.jacobian_penalty(3, torch.zeros(2, 3))
    assert not calls
    with pytest.raises(ValueError, match="batch dimension"):
        fp.jacobian_penalty(lambda z: z.sum(0), torch.zeros(2, 3))


@pytest.mark.slow
def test_penalty_compiles_fullgraph_and_matches_eager():
    # aot_eager: the full Dynamo capture and AOTAutograd (forward and backward graphs) without Inductor's
    # codegen (tens of seconds on two cores), whose random numbers would also differ from eager ones.
    w, x = tanh_layer(batch=3, dim=5)
    z = torch.randn(3, 5, generator=gen(0), dtype=torch.float64)

    def penalty(z):
        return fp.jacobian_penalty(tanh_map(w, x), z, num_projections=2)

    torch._dynamo.reset()
    compiled = torch.compile(penalty, fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    eager = penalty(z)
    eager_grads = torch.autograd.grad(eager.sum(), (w, x))
    torch.manual_seed(11)
    out = compiled(z)
    grads = torch.autograd.grad(out.sum(), (w, x))
    torch.testing.assert_close(out, eager, rtol=1e-14, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


# --- spectral_radius --------------------------------------------------------------------------------------------

def linear_map(matrices):
    """``f(z)_b = A_b z_b`` for a batch of matrices ``(B, n, n)``."""
    return lambda z: torch.einsum("bij,bj->bi", matrices, z)


def iterations_for(eigenvalues, accuracy=1e-12):
    """Power steps for the 2-dimensional Ritz estimate to reach ``accuracy``: its error falls like
    ``|lambda_3 / lambda_1|^k``."""
    moduli = eigenvalues.abs().sort(descending=True).values
    return math.ceil(math.log(accuracy) / math.log((moduli[2] / moduli[0]).item()))


def check_radius(matrices, rel=1e-8):
    eigenvalues = torch.linalg.eigvals(matrices)
    steps = max(iterations_for(e) for e in eigenvalues)
    assert steps < 400  # precondition: the test problem converges in a reasonable number of steps
    z = torch.zeros(matrices.shape[:2], dtype=torch.float64)
    estimate = fp.spectral_radius(linear_map(matrices), z, num_iterations=steps, generator=gen(0))
    torch.testing.assert_close(estimate, eigenvalues.abs().amax(-1), rtol=rel, atol=0)


def rotation_block_matrix(n=10, radius=0.9, angle=1.0, seed=0):
    """Non-symmetric, similar to blockdiag(radius * rotation(angle), diag(spread over [-0.5, 0.5])): the dominant
    eigenvalues are the complex pair ``radius * exp(+-i angle)``."""
    g = gen(seed)
    block = torch.zeros(n, n, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    block[:2, :2] = radius * torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    block[2:, 2:] = torch.diag(torch.linspace(-0.5, 0.5, n - 2, dtype=torch.float64))
    basis = torch.randn(n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64)
    return basis @ block @ torch.linalg.inv(basis)


def test_spectral_radius_symmetric_with_negative_dominant_eigenvalue():
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen(0), dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-0.9, 0.5, 10, dtype=torch.float64)) @ q.T
    check_radius(a[None])


def test_spectral_radius_plus_minus_pair_and_complex_pair():
    pm = affine(0.9, dim=10).w  # spectrum linspace(-0.9, 0.9): the dominant pair is +-0.9
    check_radius(torch.stack([pm, rotation_block_matrix()]))


def test_rayleigh_quotient_alone_would_fail_on_a_complex_pair():
    # Why the Ritz step exists: the Rayleigh quotient of the power iterate keeps changing from step to step
    # and is nowhere near |lambda| = 0.9 (here, for a non-normal matrix, not even below it).
    a = rotation_block_matrix()
    v = torch.randn(10, generator=gen(0), dtype=torch.float64)
    quotients = []
    for _ in range(200):
        v = a.T @ v
        v = v / v.norm()
        quotients.append(abs(v @ a.T @ v).item())
    assert max(abs(q - 0.9) for q in quotients[-10:]) > 0.5 and max(quotients[-10:]) - min(quotients[-10:]) > 0.5
    check_radius(a[None])


def test_spectral_radius_non_normal_triangular():
    a = torch.triu(2 * torch.randn(8, 8, generator=gen(2), dtype=torch.float64), 1) + torch.diag(
        torch.tensor([0.6, -0.3, 0.25, 0.2, 0.15, -0.1, 0.05, 0.0], dtype=torch.float64))
    check_radius(a[None], rel=1e-7)


def test_spectral_radius_of_a_tanh_layer_at_a_point():
    w, x = tanh_layer(batch=4, dim=6, scale=1.3, seed=4)
    f = tanh_map(w, x)
    z = torch.randn(4, 6, generator=gen(1), dtype=torch.float64)
    jac = dense_jacobians(f, z).detach()
    eigenvalues = torch.linalg.eigvals(jac)
    steps = max(iterations_for(e) for e in eigenvalues)
    assert steps < 400
    # Past the predicted count the estimate stays right. Sample 3 (real dominant eigenvalue, complex pair next)
    # between 145 and 165 steps is where taking the largest Ritz value regardless of its residual was off by 12%.
    for k in (steps, 150, 160, steps + 40):
        estimate = fp.spectral_radius(f, z, num_iterations=k, generator=gen(2))
        torch.testing.assert_close(estimate, eigenvalues.abs().amax(-1), rtol=1e-8, atol=0)
    assert not estimate.requires_grad and w.grad is None and x.grad is None
    with torch.no_grad():  # works without autograd recording too
        torch.testing.assert_close(fp.spectral_radius(f, z, num_iterations=k, generator=gen(2)), estimate)


def test_spectral_radius_degenerate_maps_and_shapes():
    z = torch.randn(3, 2, 2, 2, generator=gen(0))
    radius = fp.spectral_radius(lambda z: -0.7 * z, z)  # J = -0.7 I: every vector is an eigenvector
    assert radius.dtype == torch.float32
    torch.testing.assert_close(radius, torch.full((3,), 0.7))
    torch.testing.assert_close(fp.spectral_radius(lambda z: torch.ones_like(z), z), torch.zeros(3))  # J = 0
    nilpotent = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(fp.spectral_radius(lambda z: z @ nilpotent.T, torch.ones(2, 2, dtype=torch.float64)),
                               torch.zeros(2, dtype=torch.float64))
    scalar = fp.spectral_radius(lambda z: torch.sin(z), torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    torch.testing.assert_close(scalar, torch.tensor([1.0, math.cos(1.0)], dtype=torch.float64))


def test_spectral_radius_rejects_bad_arguments():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_iterations"):
        fp.spectral_radius(lambda z: z, z, num_iterations=0)
    with pytest.raises(TypeError, match="generator"):
        fp.spectral_radius(lambda z: z, z, generator="seed")
    with pytest.raises(ValueError, match="shaped like z"):
        fp.spectral_radius(lambda z: z[:, :2], z)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fp.spectral_radius(lambda z: z, z)


# --- check_gradients -------------------------------------------------------------------------------------------

TIGHT = {"rtol": 1e-12, "atol": 0.0, "max_steps": 300}


def exact_and_jfb_gradients(w, x, probe, steps=1):
    """Independent gradients of <probe, z*>: exact (dense IFT) and k-step JFB (truncated Neumann series
    ``u = sum_{j<k} (J^T)^j g`` at the exact z*, then ``u^T df/dtheta``)."""
    f = tanh_map(w, x)
    with torch.no_grad():
        z_star = fp.solve(f, torch.zeros_like(x), **TIGHT).z
    exact = dense_implicit_grad(w, x, z_star, probe)
    jac = dense_jacobians(f, z_star).detach()
    u, term = probe.clone(), probe.clone()
    for _ in range(steps - 1):
        term = torch.einsum("bji,bj->bi", jac, term)
        u = u + term
    z_in = z_star.detach()
    jfb = torch.autograd.grad(f(z_in), (w, x), u)
    return exact, jfb


def cosine(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return (a @ b / (a.norm() * b.norm())).item(), ((a - b).norm() / b.norm()).item()


def test_implicit_agrees_with_the_exact_gradient():
    w, x = tanh_layer(batch=3, dim=5, scale=0.9)
    check = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x],
                               backward=fp.Implicit(rtol=1e-12, atol=0.0), generator=gen(0), **TIGHT)
    assert check.converged and check.reference_converged
    assert check.cosine > 1 - 1e-12 and check.relative_error < 1e-9
    assert [p.name for p in check.per_parameter] == ["params[0]", "params[1]"]
    assert all(p.reached and p.relative_error < 1e-9 for p in check.per_parameter)
    # with the default tolerances the error follows them: small, but visible
    loose = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward="implicit")
    assert 1e-9 < loose.relative_error < 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_jfb_is_clearly_worse_and_matches_an_independent_jfb_gradient(steps):
    w, x = tanh_layer(batch=3, dim=5, scale=0.9)
    check = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward=fp.JFB(steps=steps),
                               generator=gen(3), **TIGHT)
    probe = torch.randn(x.shape, generator=gen(3), dtype=x.dtype)  # the documented probe draw
    exact, jfb = exact_and_jfb_gradients(w, x, probe, steps=steps)
    cos, rel = cosine(jfb, exact)
    assert check.cosine == pytest.approx(cos, abs=1e-10)
    assert check.relative_error == pytest.approx(rel, rel=1e-8)
    for p, got, want in zip(check.per_parameter, jfb, exact):
        assert p.cosine == pytest.approx(cosine([got], [want])[0], abs=1e-10)
    if steps == 1:
        assert check.cosine < 0.99 and check.relative_error > 0.1  # clearly worse than Implicit


def test_dense_and_implicit_references_agree_and_stochastic_jfb_runs():
    w, x = tanh_layer(batch=2, dim=4, scale=0.8)
    runs = {}
    for reference in ("dense", "implicit"):  # fresh generators: the same probe and the same S-JFB draws
        mode = fp.StochasticJFB(max_no_grad=3, max_with_grad=2, generator=gen(9))
        runs[reference] = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward=mode,
                                             reference=reference, generator=gen(1), **TIGHT)
    dense, implicit = runs["dense"], runs["implicit"]
    assert dense.reference.startswith("exact gradient, dense") and "Implicit" in implicit.reference
    assert dense.cosine == pytest.approx(implicit.cosine, abs=1e-10)
    assert dense.relative_error == pytest.approx(implicit.relative_error, rel=1e-8)
    assert not dense.converged  # at most 3 solver steps: S-JFB's forward stops early by design


class Cell(torch.nn.Module):
    def __init__(self, dim, scale):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_layer_form_uses_a_float64_copy_and_matches_the_map_form():
    torch.manual_seed(0)
    cell = Cell(5, 0.9)
    layer = fp.DEQ(cell, backward=fp.JFB(), **TIGHT)
    x = torch.randn(3, 5).requires_grad_()
    before = [p.detach().clone() for p in cell.parameters()]
    check = fp.check_gradients(layer, x=x, params=[cell.lin.weight, x], generator=gen(4))
    assert "float64 copy of the layer" in check.reference
    assert [p.name for p in check.per_parameter] == ["lin.weight", "x"]
    assert all(p.grad is None for p in cell.parameters()) and x.grad is None  # nothing accumulated
    assert all(torch.equal(a, b) for a, b in zip(before, cell.parameters()))  # the layer is untouched
    # the same problem as a float64 map (tested in float64 too, so only the float32 forward differs)
    w64, b64 = cell.lin.weight.detach().double().requires_grad_(), cell.lin.bias.detach().double()
    x64 = x.detach().double().requires_grad_()
    as_map = fp.check_gradients(lambda z: torch.tanh(z @ w64.T + b64 + x64), torch.zeros_like(x64),
                                params=[w64, x64], backward=fp.JFB(), generator=gen(4), **TIGHT)
    assert check.cosine == pytest.approx(as_map.cosine, abs=1e-5)
    assert check.relative_error == pytest.approx(as_map.relative_error, rel=1e-4)
    # default: the layer's own parameters and mode
    default = fp.check_gradients(layer, x=x)
    assert [p.name for p in default.per_parameter] == ["lin.weight", "lin.bias"]
    assert default.backward == fp.JFB()


def test_unreached_parameter_is_reported_and_str_is_readable():
    w, x = tanh_layer(batch=2, dim=3)
    unused = torch.zeros(2, requires_grad=True, dtype=torch.float64)
    check = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, unused], backward="jfb")
    row = check.per_parameter[1]
    assert not row.reached and math.isnan(row.cosine) and row.relative_error == 0.0
    text = str(check)
    assert "JFB(steps=1)" in text and "params[1]" in text and "no gradient reached it" in text
    assert f"{check.cosine:.6f}" in text


def test_check_gradients_rejects_bad_arguments():
    w, x = tanh_layer(batch=2, dim=3)
    f, z0 = tanh_map(w, x), torch.zeros(2, 3, dtype=torch.float64)
    layer = fp.DEQ(Cell(3, 0.5))
    cases = [
        (lambda: fp.check_gradients(f, z0, backward="jfb"), ValueError, "params is required"),
        (lambda: fp.check_gradients(f, z0, params=[w]), ValueError, "backward is required"),
        (lambda: fp.check_gradients(f, params=[w], backward="jfb"), ValueError, "z0 is required"),
        (lambda: fp.check_gradients(f, z0, x=x, params=[w], backward="jfb"), ValueError, "x is only for"),
        (lambda: fp.check_gradients(f, z0, params=w, backward="jfb"), TypeError, "params must be an iterable"),
        (lambda: fp.check_gradients(f, z0, params=[w.detach()], backward="jfb"), ValueError, "require grad"),
        (lambda: fp.check_gradients(f, z0, params=[w], backward="exact"), ValueError, "backward must be"),
        (lambda: fp.check_gradients(f, z0, params=[w], backward="jfb", reference="lu"), ValueError, "reference"),
        (lambda: fp.check_gradients(f, z0, params=[w], backward="jfb", max_steps=0), ValueError, "max_steps"),
        (lambda: fp.check_gradients(f, z0, params=[w], backward="jfb", generator=1), TypeError, "generator"),
        (lambda: fp.check_gradients(layer), ValueError, "x is required"),
        (lambda: fp.check_gradients(layer, x=torch.zeros(2, 3), params=[w]), ValueError, "neither a parameter"),
        (lambda: fp.check_gradients(fp.DEQ(Cell(3, 0.5), backward=None), x=torch.zeros(2, 3)), ValueError,
         "backward=None"),
        (lambda: fp.check_gradients("f", z0, params=[w], backward="jfb"), TypeError, "f must be callable"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# --- check_gradients: one pass, no side effects --------------------------------------------------------------

class DropCell(torch.nn.Module):
    """``tanh(W (m * z) + b + x)``: a shared-mask dropout on the state, then a Linear."""

    def __init__(self, dim, scale, p=0.3):
        super().__init__()
        self.drop = fp.VariationalDropout(p)
        self.lin = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.mul_(scale / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(self.drop(z)) + x)


def spectral_layer(backward):
    torch.manual_seed(0)
    cell = Cell(6, 1.0)
    # close top singular values: the power iteration converges slowly, so every step moves sigma visibly
    u, _, vh = torch.linalg.svd(torch.randn(6, 6, generator=gen(6)))
    with torch.no_grad():
        cell.lin.weight.copy_(u @ torch.diag(torch.tensor([2.0, 1.97, 1.94, 1.0, 0.5, 0.2])) @ vh)
    fp.spectral_norm(cell.lin, bound=0.9, generator=gen(5))
    return fp.DEQ(cell, backward=backward, rtol=1e-6, atol=0.0, max_steps=200), torch.randn(3, 6)


def test_training_mode_spectral_norm_takes_one_step_and_the_buffers_are_restored():
    layer, x = spectral_layer(fp.Implicit(rtol=1e-7, atol=0.0, max_steps=300))
    norm = layer.f.lin.parametrizations.weight[0]
    before = (norm._u.clone(), norm._v.clone())
    check = fp.check_gradients(layer, x=x, generator=gen(2))
    # one power step for the whole check: the map holds still, both solves converge, Implicit is exact
    assert check.converged and check.reference_converged
    assert check.cosine > 1 - 1e-8 and check.relative_error < 1e-4
    assert torch.equal(norm._u, before[0]) and torch.equal(norm._v, before[1])  # the layer is untouched
    # independent route: a copy that took that one step in a pass of its own, then checked in eval mode
    stepped = copy.deepcopy(layer)
    with fp.pass_scope(stepped.f):
        stepped.f(torch.zeros_like(x), x)
    stepped.eval()
    assert not torch.equal(stepped.f.lin.parametrizations.weight[0]._u, before[0])  # a step was taken
    for mode in (fp.JFB(), fp.JFB(steps=3)):
        train = fp.check_gradients(layer, x=x, backward=mode, generator=gen(2))
        evaluated = fp.check_gradients(stepped, x=x, backward=mode, generator=gen(2))
        assert train.cosine == pytest.approx(evaluated.cosine, abs=1e-6)
        assert train.relative_error == pytest.approx(evaluated.relative_error, rel=1e-5)
    assert torch.equal(norm._u, before[0]) and torch.equal(norm._v, before[1])


def test_a_module_map_gets_one_pass_for_both_solves():
    layer, x = spectral_layer(None)
    cell = layer.f
    norm = cell.lin.parametrizations.weight[0]
    before = norm._u.clone()

    class Map(torch.nn.Module):  # f(z) as a module: the check can scope it
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, z):
            return self.cell(z, x)

    check = fp.check_gradients(Map(), torch.zeros_like(x), params=[cell.lin.parametrizations.weight.original],
                               backward=fp.Implicit(rtol=1e-7, atol=0.0, max_steps=300), rtol=1e-6, atol=0.0,
                               max_steps=200, generator=gen(2))
    assert check.converged and check.reference_converged and check.relative_error < 1e-4
    assert torch.equal(norm._u, before)


def test_training_mode_dropout_gets_one_mask_shared_by_the_tested_and_the_reference_solve():
    torch.manual_seed(0)
    cell = DropCell(5, 0.6)
    x = torch.randn(3, 5).requires_grad_()
    layer = fp.DEQ(cell, backward=fp.Implicit(rtol=1e-7, atol=0.0, max_steps=300), rtol=1e-6, atol=0.0)
    check = fp.check_gradients(layer, x=x, params=[cell.lin.weight, x], generator=gen(1))
    # a different mask in the reference would leave an O(1) error
    assert check.converged and check.reference_converged and check.relative_error < 1e-4
    again = fp.check_gradients(layer, x=x, params=[cell.lin.weight, x], generator=gen(1))
    assert again.cosine == check.cosine and again.relative_error == check.relative_error  # seeded masks
    # inside the caller's scope, that scope's mask is used: compare with the same map written out in float64
    with fp.pass_scope(cell, generator=gen(8)) as scope:
        layer(x)
        mask = scope.mask(cell.drop)
        jfb = fp.check_gradients(layer, x=x, params=[cell.lin.weight, x], backward=fp.JFB(), generator=gen(4))
    assert mask is not None and (mask == 0).any()
    w64, b64 = cell.lin.weight.detach().double().requires_grad_(), cell.lin.bias.detach().double()
    x64, m64 = x.detach().double().requires_grad_(), mask.double()
    as_map = fp.check_gradients(lambda z: torch.tanh((z * m64) @ w64.T + b64 + x64), torch.zeros_like(x64),
                                params=[w64, x64], backward=fp.JFB(), generator=gen(4), **TIGHT)
    assert jfb.cosine == pytest.approx(as_map.cosine, abs=1e-5)
    assert jfb.relative_error == pytest.approx(as_map.relative_error, rel=1e-4)


def test_a_callers_adjoint_state_is_neither_read_nor_written():
    w, x = tanh_layer(batch=2, dim=4, scale=0.8)
    state = fp.AdjointState()
    mode = fp.Implicit(rtol=1e-12, atol=0.0, state=state)
    check = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward=mode, **TIGHT)
    assert check.relative_error < 1e-9 and check.backward is mode
    assert state.num_solves == 0 and state.u is None
    # a recorded (wrong) warm start is not used either: the check's result is the cold one
    sol = fp.solve(tanh_map(w, x), torch.zeros_like(x), backward=mode, **TIGHT)
    (sol.z * 1e6).sum().backward()
    recorded = state.u.clone()
    warm = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward=mode,
                              generator=gen(0), **TIGHT)
    cold = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x],
                              backward=fp.Implicit(rtol=1e-12, atol=0.0), generator=gen(0), **TIGHT)
    assert warm.relative_error == cold.relative_error
    assert state.num_solves == 1 and torch.equal(state.u, recorded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_maps_get_a_float64_dense_reference(dtype):
    w, x = tanh_layer(batch=3, dim=5, scale=0.6, dtype=dtype)
    check = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward="implicit",
                               generator=gen(0))
    assert check.cosine > 0.999 and check.relative_error < 0.05  # bf16 keeps 8 bits: 2-3 digits
    # the exact gradient of the float64 problem, up to that precision
    w64, x64 = w.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    probe = torch.randn(x.shape, generator=gen(0), dtype=dtype).double()
    with torch.no_grad():
        z_star = fp.solve(tanh_map(w64, x64), torch.zeros_like(x64), **TIGHT).z
    exact = dense_implicit_grad(w64, x64, z_star, probe)
    jfb = fp.check_gradients(tanh_map(w, x), torch.zeros_like(x), params=[w, x], backward="jfb", generator=gen(0))
    _, jfb64 = exact_and_jfb_gradients(w64, x64, probe)
    assert jfb.cosine == pytest.approx(cosine(jfb64, exact)[0], abs=0.02)

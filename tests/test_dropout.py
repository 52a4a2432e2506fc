"""Variational dropout and pass_scope: one mask per pass (checked through the zero pattern and through DEQ fixed
points and gradients against explicit float64 loops), device/dtype, seeding, statistics, nesting, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import fixedpoint
from fixedpoint.dropout import VariationalDropout, pass_scope

F64 = torch.float64


def test_one_mask_for_every_call_in_a_scope_and_a_new_one_in_the_next():
    drop = VariationalDropout(0.5)
    x = torch.randn(4, 32, dtype=F64) + 3  # no zeros of its own
    with pass_scope(drop) as scope:
        ys = [drop(x * k) for k in range(1, 6)]
        mask = scope.mask(drop)
    assert all(torch.equal(y == 0, ys[0] == 0) for y in ys)
    assert torch.equal(ys[2], x * 3 * mask)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert scope.mask(drop) is None  # dropped at exit
    with pass_scope(drop):
        assert not torch.equal(drop(x) == 0, ys[0] == 0)


def test_outside_a_scope_training_raises_and_eval_is_the_identity():
    drop = VariationalDropout(0.3)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="outside a pass_scope covering it"):
        drop(x)
    with pytest.raises(RuntimeError, match="outside a pass_scope"):
        with pass_scope(nn.Linear(2, 2)):  # a scope that does not cover it
            drop(x)
    with pytest.raises(RuntimeError, match="outside a pass_scope"):
        VariationalDropout(0.0)(x)  # a p=0 baseline fails the same way
    drop.eval()
    assert drop(x) is x
    drop.train()
    no_drop = VariationalDropout(0.0)
    with pass_scope(no_drop):
        assert no_drop(x) is x
    with pass_scope([drop, VariationalDropout(0.0)]):  # an iterable of modules
        assert drop(x).shape == x.shape


def test_masks_are_drawn_on_the_input_device_without_a_cpu_tensor():
    created: list[torch.device] = []

    class Devices(TorchFunctionMode):  # sees every tensor the Python code creates (rand, >=, to, mul_, ...)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            created.extend(t.device for t in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(t, torch.Tensor))
            return out

    drop = VariationalDropout(0.25, shared_dims=(1,))
    x = torch.empty(2, 5, 3, device="meta")
    with pass_scope(drop) as scope, Devices():
        y = drop(x)
        y = drop(y)
    assert y.device.type == "meta" and scope is not None
    assert created and all(d.type == "meta" for d in created)
    with pass_scope(drop, generator=torch.Generator()):  # a CPU generator cannot draw on another device
        with pytest.raises(ValueError, match="generator is on cpu but VariationalDropout's input is on meta"):
            drop(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, F64])
def test_masks_follow_the_input_dtype(dtype):
    drop = VariationalDropout(0.5)
    x = torch.ones(1000, dtype=dtype)
    with pass_scope(drop) as scope:
        y = drop(x)
        mask = scope.mask(drop)
    assert y.dtype == dtype and mask.dtype == dtype
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert 0.4 < (y == 0).double().mean().item() < 0.6  # 6 sigma


def test_masks_are_reproducible_from_a_seeded_generator():
    drop = VariationalDropout(0.5)
    x = torch.ones(64)

    def mask(seed: int) -> torch.Tensor:
        with pass_scope(drop, generator=torch.Generator().manual_seed(seed)):
            return drop(x)

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))
    torch.manual_seed(5)
    with pass_scope(drop):
        a = drop(x)
    torch.manual_seed(5)
    with pass_scope(drop):
        assert torch.equal(drop(x), a)  # without a generator, the device's global one


def test_expectation_is_preserved():
    p, n = 0.3, 200_000
    drop = VariationalDropout(p)
    with pass_scope(drop):
        y = drop(torch.ones(n, dtype=F64))
    sigma = (p / (1 - p) / n) ** 0.5  # std of the mean of n masks, each mean 1 and variance p/(1-p)
    assert abs(y.mean().item() - 1) < 5 * sigma
    assert abs((y == 0).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5

    x = torch.randn(16, dtype=F64)  # per element, over independent passes
    gen = torch.Generator().manual_seed(0)
    draws = 2000
    total = torch.zeros_like(x)
    for _ in range(draws):
        with pass_scope(drop, generator=gen):
            total += drop(x)
    bound = 5 * x.abs() * (p / (1 - p) / draws) ** 0.5
    assert ((total / draws - x).abs() <= bound).all()


@pytest.mark.parametrize("shared_dims", [(1,), (-2,)])
def test_shared_dims_share_the_mask(shared_dims):
    drop = VariationalDropout(0.5, shared_dims=shared_dims)
    h = torch.rand(3, 7, 10) + 1  # (B, T, D): the same channels dropped in every token of a sample
    with pass_scope(drop) as scope:
        y = drop(h)
        assert scope.mask(drop).shape == (3, 1, 10)
    zeros = y == 0
    assert torch.equal(zeros, zeros[:, :1].expand_as(zeros))
    assert not torch.equal(zeros[0], zeros[1])  # per sample


def test_nested_scopes_keep_the_outermost_mask():
    inner_only = VariationalDropout(0.5)
    drop = VariationalDropout(0.5)
    x = torch.ones(50)
    with pass_scope(drop) as outer:
        a = drop(x)
        with pass_scope([drop, inner_only], generator=torch.Generator().manual_seed(9)) as inner:
            assert torch.equal(drop(x), a)  # the enclosing scope decides
            b = inner_only(x)
            assert inner.mask(drop) is None and torch.equal(inner.mask(inner_only), b)
        assert torch.equal(drop(x), a) and torch.equal(outer.mask(drop), a)
        with pass_scope(inner_only, generator=torch.Generator().manual_seed(10)):
            assert not torch.equal(inner_only(x), b)  # the inner scope's masks went with it
        with pass_scope(drop):  # re-entered for the same module
            assert torch.equal(drop(x), a)


class _Cell(nn.Module):
    """``f(z, x) = tanh(drop(z) W^T + x)`` with ``||W||_2 = 0.5``: a contraction for every mask with p <= 0.2."""

    def __init__(self, dim: int = 6, p: float = 0.2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(dim, dim, generator=gen, dtype=F64)
        self.w = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
        self.drop = VariationalDropout(p)

    def forward(self, z, x):
        return torch.tanh(self.drop(z) @ self.w.T + x)


def _masked(w: torch.Tensor, mask: torch.Tensor):
    return lambda z, x: torch.tanh((z * mask) @ w.T + x)


@pytest.mark.parametrize("backward", ["implicit", "jfb"])
def test_deq_with_dropout_two_calls_in_one_graph(backward):
    """Two DEQ calls, each in its own pass: two masks, each the one the solver's fixed point and the gradient
    belong to, compared with explicit float64 loops on the masked maps."""
    cell = _Cell()
    deq = fixedpoint.DEQ(cell, solver="iteration", backward=backward, max_steps=300, rtol=1e-13, atol=1e-15)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 6, dtype=F64, generator=gen).requires_grad_()
    x2 = torch.randn(3, 6, dtype=F64, generator=gen).requires_grad_()
    c1, c2 = torch.randn(3, 6, dtype=F64, generator=gen), torch.randn(3, 6, dtype=F64, generator=gen)
    masks, sols = [], []
    for x in (x1, x2):
        with pass_scope(deq) as scope:
            sols.append(deq(x))
            masks.append(scope.mask(cell.drop))
    assert not torch.equal(masks[0], masks[1])
    ((sols[0].z * c1).sum() + (sols[1].z * c2).sum()).backward()

    w = cell.w.detach().clone().requires_grad_()
    ref_x = [x1.detach().clone().requires_grad_(), x2.detach().clone().requires_grad_()]
    loss = 0
    for x, mask, c, sol in zip(ref_x, masks, (c1, c2), sols):
        f = _masked(w, mask)
        with torch.no_grad():
            z = torch.zeros_like(x)
            for _ in range(300):
                z = f(z, x)
        assert torch.allclose(sol.z, z, atol=1e-12)  # the solve's fixed point is the masked map's
        if backward == "implicit":  # exact gradient: backprop through enough iterations of the contraction
            z = torch.zeros_like(x)
            for _ in range(120):
                z = f(z, x)
        else:  # JFB: one recorded step from the fixed point
            z = f(z, x)
        loss = loss + (z * c).sum()
    loss.backward()
    tol = {"rtol": 1e-9, "atol": 1e-11}
    assert torch.allclose(x1.grad, ref_x[0].grad, **tol) and torch.allclose(x2.grad, ref_x[1].grad, **tol)
    assert torch.allclose(cell.w.grad, w.grad, **tol)


def test_a_hand_written_loop_in_a_scope_backpropagates_through_one_mask():
    cell = _Cell()
    x = torch.randn(2, 6, dtype=F64)
    with pass_scope(cell, generator=torch.Generator().manual_seed(3)) as scope:
        z = torch.zeros_like(x)
        for _ in range(5):
            z = cell(z, x)
        mask = scope.mask(cell.drop)
    z.sum().backward()
    w = cell.w.detach().clone().requires_grad_()
    ref = torch.zeros_like(x)
    for _ in range(5):
        ref = _masked(w, mask)(ref, x)
    ref.sum().backward()
    assert torch.allclose(z, ref, rtol=1e-14) and torch.allclose(cell.w.grad, w.grad, rtol=1e-12)


def test_deepcopy_and_state_dict():
    drop = VariationalDropout(0.4, shared_dims=(0, -1))
    clone = copy.deepcopy(drop)
    assert (clone.p, clone.shared_dims) == (0.4, (0, -1)) and drop.state_dict() == {}
    clone.load_state_dict(drop.state_dict())
    x = torch.ones(2, 3, 4)
    with pass_scope(drop):
        drop(x)
        with pytest.raises(RuntimeError, match="outside a pass_scope"):
            clone(x)  # the copy shares no state with the original
    net = nn.Sequential(nn.Linear(4, 4), VariationalDropout(0.5))
    copied = copy.deepcopy(net)
    with pass_scope(copied):
        assert copied(torch.ones(2, 4)).shape == (2, 4)
    assert "p=0.4, shared_dims=(0, -1)" in repr(drop)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1"):
        VariationalDropout(1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got -0.1"):
        VariationalDropout(-0.1)
    with pytest.raises(TypeError, match="p must be a number"):
        VariationalDropout("0.5")
    with pytest.raises(TypeError, match="shared_dims must be a tuple of ints"):
        VariationalDropout(0.5, shared_dims=1)
    with pytest.raises(ValueError, match="shared_dims must not repeat"):
        VariationalDropout(0.5, shared_dims=(1, 1))
    with pytest.raises(TypeError, match="modules must be an nn.Module or an iterable"), pass_scope("f"):
        pass
    with pytest.raises(TypeError, match="got an element of type int"), pass_scope([nn.ReLU(), 3]):
        pass
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        with pass_scope(nn.ReLU(), generator=0):
            pass
    drop = VariationalDropout(0.5, shared_dims=(2,))
    with pass_scope(drop):
        with pytest.raises(ValueError, match=r"shared_dims \(2,\) out of range for an input with 2 dimensions"):
            drop(torch.ones(3, 4))
        with pytest.raises(TypeError, match="floating-point"):
            drop(torch.ones(3, 4, 5, dtype=torch.long))
        drop(torch.ones(3, 4, 5))
        with pytest.raises(ValueError, match=r"input of shape \(2, 4, 5\).*mask for shape \(3, 4, 1\)"):
            drop(torch.ones(2, 4, 5))

"""``DEQ``: the module drop-in."""

import copy

import pytest
import torch
from torch import nn

import fixedpoint as fp


class Cell(nn.Module):
    """``z -> tanh(W z + U x)`` with ``||W||_2 <= 0.7``, so the map is a contraction."""

    def __init__(self, dim: int, in_dim: int | None = None):
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)
        self.u = nn.Linear(in_dim or dim, dim)
        with torch.no_grad():
            self.w.weight.mul_(0.7 / torch.linalg.matrix_norm(self.w.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.w(z) + self.u(x))


def test_parameters_are_fs_and_output_is_a_solution():
    cell = Cell(6)
    deq = fp.DEQ(cell)
    assert [p for p in deq.parameters()] == [p for p in cell.parameters()]
    sol = deq(torch.randn(4, 6))
    assert isinstance(sol, fp.Solution) and sol.z.shape == (4, 6) and sol.converged.all()
    assert sol.z.requires_grad  # implicit backward by default
    assert "anderson" in repr(deq).lower() or "Anderson" in repr(deq)


def test_fixed_point_and_implicit_gradient_of_the_layer():
    torch.manual_seed(1)
    cell = Cell(5).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    deq = fp.DEQ(cell, rtol=1e-12, atol=0, max_steps=200)
    sol = deq(x)
    torch.testing.assert_close(cell(sol.z, x), sol.z, rtol=1e-10, atol=1e-10)
    sol.z.sum().backward()
    g_implicit = cell.w.weight.grad.clone()
    cell.zero_grad()
    fp.DEQ(cell, backward=fp.JFB(steps=150), rtol=1e-12, atol=0, max_steps=200)(x).z.sum().backward()
    torch.testing.assert_close(g_implicit, cell.w.weight.grad, rtol=1e-10, atol=1e-12)


def test_state_shape_may_differ_from_input():
    deq = fp.DEQ(Cell(6, in_dim=3))
    x = torch.randn(2, 3)
    sol = deq(x, z0=torch.zeros(2, 6))
    assert sol.z.shape == (2, 6)


def test_warm_start_from_previous_solution():
    torch.manual_seed(2)
    deq = fp.DEQ(Cell(8), solver="iteration", rtol=1e-5, atol=0, max_steps=500, backward=None)
    x = torch.randn(3, 8)
    cold = deq(x)
    warm = deq(x + 1e-3 * torch.randn_like(x), z0=cold)
    assert warm.num_steps < cold.num_steps / 2
    warm_tensor = deq(x + 1e-3 * torch.randn_like(x), z0=cold.z)
    assert warm_tensor.num_steps < cold.num_steps / 2


def test_no_hidden_state_between_calls():
    deq = fp.DEQ(Cell(4), backward=None)
    x = torch.randn(2, 4)
    first, second = deq(x), deq(x)
    torch.testing.assert_close(first.z, second.z, rtol=0, atol=0)
    assert first.num_steps == second.num_steps


def test_deepcopy_and_state_dict_round_trip():
    deq = fp.DEQ(Cell(4), solver=fp.Broyden(memory=4), backward=fp.JFB(steps=2))
    x = torch.randn(2, 4)
    twin = copy.deepcopy(deq)  # the EMA pattern
    torch.testing.assert_close(twin(x).z, deq(x).z)
    other = fp.DEQ(Cell(4), solver=fp.Broyden(memory=4), backward=fp.JFB(steps=2))
    other.load_state_dict(deq.state_dict())
    torch.testing.assert_close(other(x).z, deq(x).z)


@pytest.mark.parametrize("backward", ["implicit", "jfb", fp.StochasticJFB(max_no_grad=4, max_with_grad=3)])
def test_training_reduces_the_loss(backward):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    target = torch.sin(x.sum(1, keepdim=True))
    model = nn.ModuleDict({"deq": fp.DEQ(Cell(16, in_dim=4), backward=backward, max_steps=30),
                           "head": nn.Linear(16, 1)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        z = model["deq"](x, z0=torch.zeros(64, 16)).z
        return ((model["head"](z) - target) ** 2).mean()

    start = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.5 * start


def test_bad_options_raise_at_construction():
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        fp.DEQ(lambda z, x: z)
    with pytest.raises(ValueError, match="max_steps"):
        fp.DEQ(Cell(3), max_steps=-1)
    with pytest.raises(ValueError, match="solver must be"):
        fp.DEQ(Cell(3), solver="newton")
    with pytest.raises(TypeError, match="rtl"):
        fp.DEQ(Cell(3), rtl=1e-3)
    with pytest.raises(TypeError, match="z0 must have a floating-point dtype"):
        fp.DEQ(Cell(3))(torch.randn(2, 3), z0=torch.zeros(2, 3, dtype=torch.long))

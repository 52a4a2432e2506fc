"""The Jacobian penalty: a Hutchinson estimate of ``||J||_F^2``, the regulariser that ``solve`` attaches with
``num_jacobian_projections``.

``J = df/dz`` is the per-sample Jacobian of a map ``f: (B, ...) -> (B, ...)`` at a point ``z``; ``f`` must not mix
samples (no batch statistics), so that sample ``b``'s output depends on sample ``b``'s input only.

**Jacobian penalty** (Bai, Koltun & Kolter, 2021, "Stabilizing Equilibrium Models by Jacobian Regularization").
Penalising ``||J||_F^2`` at the equilibrium keeps ``f`` well conditioned, so the forward and adjoint solves stay
short. ``||J||_F^2 = tr(J^T J)`` is estimated with Hutchinson's (1989) trace estimator: for a random ``v`` with
``E[v v^T] = I``::

    E[ ||J v||^2 ] = E[ v^T (J^T J) v ] = tr(J^T J) = ||J||_F^2.

Writing ``A = J^T J``, one draw has variance ``2 ||A||_F^2`` for Gaussian ``v`` and
``2 (||A||_F^2 - sum_i A_ii^2)`` for Rademacher ``v`` (entries +-1), since the variance is
``(E[v_i^4] - 3) sum_i A_ii^2 + 2 ||A||_F^2`` and ``E[v_i^4]`` is 3 for a Gaussian, 1 for +-1. Hutchinson showed
the Rademacher choice is the minimum-variance one among i.i.d. zero-mean unit-variance entries; it is used here.
``J v`` is one forward-mode product (``torch.func.jvp``), which composes with ordinary backward and compiles
with ``torch.compile(fullgraph=True)``; the vector-Jacobian route ``v^T J`` would need a double backward
(``autograd.grad(create_graph=True)``), which torch 2.13's compiler refuses.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable

import torch

from ._inputs import check_generator, check_map, check_output, check_tensor
from ._options import check_int
from .solvers._base import algebra_dtype

__all__ = ["jacobian_penalty"]

Map = Callable[[torch.Tensor], torch.Tensor]


def _rademacher(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Entries +-1 with probability 1/2 each, on ``like``'s device and in its dtype."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=like.dtype)
    return 2 * bits - 1


def _load_jvp_decompositions() -> None:
    """Load torch's forward-AD decompositions with its deprecation warning silenced.

    torch (2.13) registers them on the first forward-mode product by calling ``torch.jit.script``, which warns
    that it is deprecated; under warnings-as-errors (pytest with ``filterwarnings = error``) that first product
    would fail. Importing the module once, here, is what torch would do anyway. Under ``torch.compile`` the
    eager call that precedes tracing has loaded them already.
    """
    if torch.compiler.is_compiling() or "torch._decomp.decompositions_for_jvp" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def jacobian_penalty(f: Map, z: torch.Tensor, *, num_projections: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased Hutchinson estimate of ``||J_f(z)||_F^2`` per sample (Bai et al., 2021).

    Averages ``||J v||^2`` over ``num_projections`` Rademacher vectors ``v`` (lower variance than Gaussian ones;
    see the module docstring), each one forward-mode product through ``f`` (``num_projections`` evaluations of
    ``f``). Bai et al. divide by the state size ``d``; this returns the plain Frobenius norm, so divide by
    ``z[0].numel()`` to use their loss weights.

    Gradients: the result is differentiable with respect to ``f``'s parameters and the inputs ``f`` closes
    over, so it can be added to a loss. It is differentiated with respect to ``z`` exactly when ``z`` requires
    grad (``z`` is used as it is, never marked as requiring grad here): passing the differentiable
    ``Solution.z`` also carries the penalty's gradient through the solve's backward mode, while ``z.detach()``
    treats the equilibrium as a constant, as Bai et al. do (and costs no extra backward through the solve).

    Under ``torch.compile(fullgraph=True)`` pass ``generator=None``: torch 2.13's compiler cannot trace a
    ``torch.Generator`` argument. The global generator then supplies the draws (seed it with
    ``torch.manual_seed``); compiled random numbers may differ from eager ones.

    Every operation in ``f`` needs a forward-mode derivative. In torch 2.13 some have none and raise
    ``NotImplementedError``: ``scaled_dot_product_attention``'s fused kernel on CPU, so FPDM's attention block
    (CUDA unchecked; select the math kernel around the call, ``with torch.nn.attention.sdpa_kernel(
    torch.nn.attention.SDPBackend.MATH):``, which has forward-mode derivatives: checked on CPU), and ``out=`` ops
    such as a nested early-stopping :func:`fixedpoint.solve` inside ``f`` (use a fixed-step inner solve).

    Args:
        f: the map ``(B, ...) -> (B, ...)``; its output may have another shape, but must keep the batch.
        z: the point ``(B, ...)``, floating point, usually the equilibrium.
        num_projections: random vectors per sample, at least 1 (the variance falls as ``1/num_projections``).
        generator: source of the projections, on ``z``'s device; ``None`` uses that device's global generator.

    Returns:
        ``(B,)`` float32 (float64 for float64 ``z``), ``||J v||^2`` averaged over the projections.

    Raises:
        TypeError: ``f`` is not callable or returns a non-tensor, ``z`` is not a floating-point tensor,
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``num_projections`` is not an int >= 1, ``generator`` is on another device, ``f(z)``
            lost the batch dimension.
    """
    check_map(f)
    z = check_tensor(z, "z")
    check_int(num_projections, "num_projections", 1)
    check_generator(generator, z.device)
    batch = z.shape[0]
    dtype = algebra_dtype(z.dtype)
    _load_jvp_decompositions()
    v = _rademacher((num_projections, *z.shape), z, generator)
    # forward AD refuses primals whose elements share memory (e.g. from expand); a copy only when needed
    z = z.contiguous()
    total = torch.zeros(batch, dtype=dtype, device=z.device)
    for p in range(num_projections):  # one JVP each; a Python loop unrolls under torch.compile
        _, jv = torch.func.jvp(f, (z,), (v[p],))
        jv = check_output(jv, batch)
        total = total + jv.reshape(batch, -1).to(dtype).square().sum(dim=1)
    return total / num_projections

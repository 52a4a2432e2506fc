"""Variational (shared-mask) dropout, and ``pass_scope``: what "one forward pass" means for a fixed-point map.

A fixed-point solve calls the same map ``f`` tens of times in one forward pass of a layer. Anything random or
adaptive inside ``f`` must stay the same for all those calls, or ``f`` is a different map at every iteration:
the solver chases a moving target and the gradient belongs to no single map. Two things in this package need
it: the dropout mask of :class:`VariationalDropout` and the power-iteration step of
:func:`fixedpoint.spectral_norm`. Both keep their per-pass state in a ``pass_scope`` context, entered where a
pass begins and left where it ends, instead of on the module (torchdeq keeps masks on the module and needs a
manual ``reset_dropout`` every step; forgetting it silently reuses the old mask).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ._options import is_int, is_number

__all__ = ["PassScope", "VariationalDropout", "pass_scope"]


class PassLocal(nn.Module):
    """Base of the modules whose per-pass state is held by the enclosing :func:`pass_scope` (internal)."""


class PassScope:
    """One outer forward pass, as entered by :func:`pass_scope`; holds the per-pass state of the modules it covers.

    The state (dropout masks, which spectral norms have taken their power step) lives here, not on the modules,
    and is dropped when the scope exits. Tensors already used in a recorded graph stay alive through that graph.
    """

    __slots__ = ("_members", "_roots", "_state", "generator")

    def __init__(self, roots: Sequence[nn.Module], generator: torch.Generator | None) -> None:
        self._roots = roots
        self._members: dict[int, nn.Module] | None = None  # found on the first question, see covers()
        self._state: dict[int, object] = {}
        self.generator = generator

    def covers(self, module: nn.Module) -> bool:
        """Whether ``module`` is inside the modules this scope was entered with."""
        if self._members is None:
            # Walked once per scope, and only when a stabiliser asks: a scope around a map without any (the usual
            # DEQ) costs nothing, and the tree cannot change in the middle of a pass.
            # id -> module: holding the module keeps its id from being reused while the scope lives.
            self._members = {id(m): m for root in self._roots for m in root.modules() if isinstance(m, PassLocal)}
        return id(module) in self._members

    def mask(self, module: VariationalDropout) -> torch.Tensor | None:
        """The mask ``module`` drew in this scope (``None`` before its first training-mode call or after exit).

        Shape: the input's with the module's ``shared_dims`` set to 1; dtype and device: the input's. Values
        are 0 or ``1 / (1 - p)``.
        """
        state = self._state.get(id(module))
        return state if isinstance(state, torch.Tensor) else None

    def set_mask(self, module: VariationalDropout, mask: torch.Tensor) -> None:
        """Record ``mask`` as the one ``module`` drew in this scope, so that its later calls here reuse it: what
        ``module`` does on its first training-mode call, and how a gradient check replays a pass on a copy.

        Raises:
            TypeError: ``mask`` is not a tensor.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"PassScope.set_mask: mask must be a torch.Tensor, got {type(mask).__name__}")
        self._state[id(module)] = mask

    def claim(self, module: nn.Module) -> bool:
        """True the first time ``module`` asks in this scope, False after: "do the once-per-pass work now"."""
        key = id(module)
        if key in self._state:
            return False
        self._state[key] = True
        return True


_SCOPES: ContextVar[tuple[PassScope, ...]] = ContextVar("fixedpoint_pass_scopes", default=())


def active_scope(module: nn.Module) -> PassScope | None:
    """The outermost active scope covering ``module``, or ``None`` (internal; used by the stabilisers)."""
    for scope in _SCOPES.get():
        if scope.covers(module):
            return scope
    return None


@contextmanager
def pass_scope(modules: nn.Module | Iterable[nn.Module], *,
               generator: torch.Generator | None = None) -> Iterator[PassScope]:
    """Mark one outer forward pass of the fixed-point map(s) in ``modules``.

    Inside the scope every :class:`VariationalDropout` in ``modules`` draws its mask on its first training-mode
    call and reuses it on every later call, and every :func:`~fixedpoint.spectral_norm` in ``modules`` takes its
    power-iteration step on its first training-mode call only, so all iterations of a solve see one and the same
    map. On exit the masks are dropped; the next scope draws new ones. A :class:`fixedpoint.DEQ` enters this
    scope around its solve; enter it yourself around a hand-written loop::

        with fixedpoint.pass_scope(f, generator=gen):
            for _ in range(30):
                z = f(z, x)

    Nesting: a module already covered by an enclosing scope keeps the enclosing scope's state; the outermost
    scope decides. So a DEQ inside another DEQ's map sees one mask per *outer* forward pass (its map stays a
    fixed map), and wrapping two calls in one scope makes them share masks. Scopes are per thread and per
    asyncio task (a ``contextvars.ContextVar``); ``nn.DataParallel`` replicas run in other threads and are not
    covered (use DDP).

    Args:
        modules: a module, or an iterable of modules; every ``VariationalDropout`` and spectral norm inside
            (found by ``.modules()``, once per scope, when the first of them is called) is covered.
        generator: source of this scope's dropout masks; it must be on the inputs' device. ``None`` uses the
            global generator of that device.

    Yields:
        The :class:`PassScope`, whose ``mask(module)`` returns the mask a dropout module drew.

    Raises:
        TypeError: ``modules`` is not a module or an iterable of modules, or ``generator`` is not a
            ``torch.Generator``.
    """
    roots: Sequence[object] = [modules] if isinstance(modules, nn.Module) else _as_list(modules)
    for root in roots:
        if not isinstance(root, nn.Module):
            raise TypeError(f"pass_scope: modules must be an nn.Module or an iterable of nn.Modules, "
                            f"got an element of type {type(root).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"pass_scope: generator must be a torch.Generator or None, got {type(generator).__name__}")
    scope = PassScope(roots, generator)  # type: ignore[arg-type]
    token = _SCOPES.set(_SCOPES.get() + (scope,))
    try:
        yield scope
    finally:
        _SCOPES.reset(token)
        scope._state.clear()


def one_pass(module: nn.Module) -> contextlib.AbstractContextManager:
    """``pass_scope(module)`` when ``module`` holds a stabiliser (a :class:`VariationalDropout` or a spectral
    norm), else a no-op context (internal; used by ``DEQ`` and FPDM around their solves).

    Skipping the scope for a map without stabilisers keeps such a map compilable with ``fullgraph=True``:
    Dynamo cannot trace the ``ContextVar`` a scope sets."""
    if any(isinstance(m, PassLocal) for m in module.modules()):
        return pass_scope(module)
    return contextlib.nullcontext()


def _as_list(modules: object) -> list[object]:
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Iterable):
        raise TypeError(f"pass_scope: modules must be an nn.Module or an iterable of nn.Modules, "
                        f"got {type(modules).__name__}")
    return list(modules)


class VariationalDropout(PassLocal):
    """Dropout whose mask is drawn once per forward pass and reused by every fixed-point iteration.

    ``y = x * m``, ``m = keep / (1 - p)``, ``keep ~ Bernoulli(1 - p)`` elementwise, so ``E[y] = x`` (inverted
    dropout; Gal & Ghahramani, 2016, for the shared mask; Bai et al., 2019, for its use in DEQs). The mask has the
    input's shape with ``shared_dims`` set to 1, so it is shared along those dimensions: for tokens ``h`` of
    shape (B, T, D), ``shared_dims=(1,)`` drops the same channels of every token of a sample.

    The mask is drawn directly on the input's device and in its dtype, from the enclosing :func:`pass_scope`'s
    generator.
    In eval mode the module is the identity. In training mode it must be called inside a :func:`pass_scope`
    covering it; a call outside one raises ``RuntimeError``: a fresh mask per call would make the fixed-point
    map random (the solver would chase a moving target), and a mask kept on the module would leak into the
    next pass. This also holds for ``p = 0``, so a baseline run fails the same way a real one would.
    Activation checkpointing that recomputes this module in the backward pass is not supported (the
    recomputation runs outside the scope and raises).

    Args:
        p: probability of dropping an element, ``0 <= p < 1``.
        shared_dims: input dimensions (negative counts from the end) along which the mask is shared.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``, repeated ``shared_dims``; at call time, ``shared_dims`` out of range
            for the input, or an input whose shape differs from the one the mask was drawn for in this scope.
        TypeError: ``p`` not a number, ``shared_dims`` not a tuple/list of ints; at call time, a non-floating
            input.
        RuntimeError: a training-mode call outside any covering :func:`pass_scope`.
    """

    def __init__(self, p: float, *, shared_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if not is_number(p):
            raise TypeError(f"VariationalDropout: p must be a number in [0, 1), got {type(p).__name__}")
        if not (math.isfinite(p) and 0 <= p < 1):
            raise ValueError(f"VariationalDropout: p must be in [0, 1), got {p!r}")
        if not isinstance(shared_dims, (tuple, list)) or not all(
                is_int(d) for d in shared_dims):
            raise TypeError(f"VariationalDropout: shared_dims must be a tuple of ints, got {shared_dims!r}")
        if len(set(shared_dims)) != len(shared_dims):
            raise ValueError(f"VariationalDropout: shared_dims must not repeat a dimension, got {shared_dims!r}")
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)

    def mask_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """The mask's shape for an input of ``shape``: ``shape`` with ``shared_dims`` set to 1."""
        ndim = len(shape)
        shared = set()
        for d in self.shared_dims:
            if not -ndim <= d < ndim:
                raise ValueError(f"VariationalDropout: shared_dims {self.shared_dims} out of range for an input "
                                 f"with {ndim} dimensions (shape {tuple(shape)})")
            shared.add(d % ndim)
        return tuple(1 if i in shared else s for i, s in enumerate(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this pass's mask.

        Args:
            x: a floating-point tensor of any shape (at least ``max(shared_dims) + 1`` dimensions).

        Returns:
            ``x * mask`` in training mode, ``x`` itself in eval mode; same shape, dtype and device as ``x``.
        """
        if not self.training:
            return x
        scope = active_scope(self)
        if scope is None:
            raise RuntimeError("VariationalDropout: called in training mode outside a pass_scope covering it, so "
                               "no mask is shared across fixed-point iterations; call it through fixedpoint.DEQ or "
                               "wrap your loop in `with fixedpoint.pass_scope(f): ...` (or call .eval())")
        if not x.is_floating_point():
            raise TypeError(f"VariationalDropout: x must be a floating-point tensor, got {x.dtype}")
        if self.p == 0:
            return x
        mask = scope.mask(self)
        if mask is None:
            mask = self._draw(x, scope.generator)
            scope.set_mask(self, mask)
        else:
            if mask.shape != self.mask_shape(x.shape) or mask.device != x.device:
                raise ValueError(f"VariationalDropout: called with an input of shape {tuple(x.shape)} on "
                                 f"{x.device} inside one pass_scope after drawing its mask for shape "
                                 f"{tuple(mask.shape)} on {mask.device}; one mask serves one state shape per pass")
            # Same zeros, so a dtype change (e.g. under autocast) does not break the shared pattern.
            mask = mask.to(x.dtype)
        return x * mask

    def _draw(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"pass_scope: generator is on {generator.device} but VariationalDropout's input is on "
                             f"{x.device}; pass a torch.Generator(device={str(x.device)!r})")
        # bernoulli_ compares against the probability in at least float32 whatever the output dtype, so p is
        # honoured for bf16 masks too.
        keep = torch.empty(self.mask_shape(x.shape), dtype=x.dtype, device=x.device)
        return keep.bernoulli_(1.0 - self.p, generator=generator).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

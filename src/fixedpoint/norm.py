"""Weight and spectral normalisation that keep a fixed-point map's layers Lipschitz-bounded.

Both are ``torch.nn.utils.parametrize`` parametrizations of a layer's ``weight``, so the module stays an ordinary
module: ``copy.deepcopy`` works (the EMA pattern), the optimizer trains the stored tensors directly with no reset
call between steps, and ``state_dict`` uses torch's own parametrization layout (``parametrizations.weight.original*``
plus the spectral norm's ``parametrizations.weight.0._u`` / ``_v``), the same keys as
``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``. A checkpoint of the plain layer (key ``weight``)
also loads into a normalised one (see :func:`weight_norm`), and :func:`remove_norm` bakes the weight back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._options import check_int, check_positive
from .dropout import PassLocal, active_scope

__all__ = ["remove_norm", "spectral_norm", "weight_norm"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: The layer types the norms apply to (subclasses included).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)
_INIT_STEPS = 15  # power steps at registration, and when a new weight is assigned or loaded (torch's number)
_EPS = 1e-12


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Norms and power iterations of bf16/fp16 weights lose two or three digits; do them in float32 at least.
    return torch.promote_types(dtype, torch.float32)


class _WeightNorm(nn.Module):
    """``w = g * v / ||v||`` per slice along ``dim`` (the output channel), ``g`` optionally clamped."""

    def __init__(self, dim: int, max_scale: float | None) -> None:
        super().__init__()
        self.dim = dim
        self.max_scale = max_scale

    def _norm(self, v: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(v.ndim) if d != self.dim]
        return torch.linalg.vector_norm(v.to(_compute_dtype(v.dtype)), dim=dims, keepdim=True)

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cd = _compute_dtype(v.dtype)
        scale = g if self.max_scale is None else g.clamp(-self.max_scale, self.max_scale)
        # tiny floor: an all-zero slice gives a zero slice rather than 0/0
        return (scale.to(cd) * (v.to(cd) / self._norm(v).clamp_min(torch.finfo(cd).tiny))).to(v.dtype)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._norm(w)
        if self.max_scale is not None:
            g = g.clamp(max=self.max_scale)  # a row above the bound is projected onto it
        return g.to(w.dtype), w

    def plain_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """State-dict entries (relative to ``parametrizations.weight.``) that represent the plain weight ``w``."""
        g, v = self.right_inverse(w)
        return {"original0": g, "original1": v}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_scale={self.max_scale}"


def _power_iterate(wm: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    for _ in range(steps):
        u = F.normalize(wm @ v, dim=0, eps=_EPS)
        v = F.normalize(wm.mH @ u, dim=0, eps=_EPS)
    return u, v


class _SpectralNorm(PassLocal):
    """``w = c * W / sigma(W)``, ``sigma`` by power iteration on ``W`` flattened to ``(W.shape[0], -1)``."""

    def __init__(self, weight: torch.Tensor, *, bound: float, learn_scale: bool, num_power_steps: int,
                 generator: torch.Generator | None) -> None:
        super().__init__()
        self.bound = bound
        self.learn_scale = learn_scale
        self.num_power_steps = num_power_steps
        cd = _compute_dtype(weight.dtype)
        rows, cols = weight.shape[0], weight[0].numel()
        draw_device = weight.device if generator is None else generator.device
        u = torch.randn(rows, generator=generator, device=draw_device, dtype=cd).to(weight.device)
        v = torch.randn(cols, generator=generator, device=draw_device, dtype=cd).to(weight.device)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=_EPS))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=_EPS))
        self._power(weight.detach(), _INIT_STEPS)

    @staticmethod
    def _matrix(w: torch.Tensor) -> torch.Tensor:
        return w.to(_compute_dtype(w.dtype)).flatten(1)

    @torch.no_grad()
    def _power(self, w: torch.Tensor, steps: int) -> None:
        wm = self._matrix(w)
        u, v = _power_iterate(wm, self._u.to(wm.dtype), self._v.to(wm.dtype), steps)
        # In place: DDP and state_dict hold these very tensors.
        self._u.copy_(u)
        self._v.copy_(v)

    def _sigma(self, wm: torch.Tensor) -> torch.Tensor:
        # Copies: the graph saves u, and a later power step writes the buffers in place.
        u = self._u.to(wm.dtype, copy=True)
        v = self._v.to(wm.dtype, copy=True)
        return torch.vdot(u, wm @ v).clamp_min(_EPS)

    def forward(self, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            scope = active_scope(self)
            if scope is None or scope.claim(self):
                self._power(w.detach(), self.num_power_steps)
        wm = self._matrix(w)
        factor = self.bound if scale is None else scale.to(wm.dtype).clamp(-self.bound, self.bound)
        return (w.to(wm.dtype) * (factor / self._sigma(wm))).to(w.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # A new weight (assignment, registration): refresh the estimate for it.
        self._power(w.detach(), _INIT_STEPS)
        if not self.learn_scale:
            return w
        sigma = self._sigma(self._matrix(w.detach()))
        return w, sigma.clamp(max=self.bound).to(w.dtype)

    def plain_state(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """State-dict entries (relative to ``parametrizations.weight.``) that represent the plain weight ``w``;
        leaves this module's buffers alone."""
        wm = self._matrix(w.detach())
        u, v = _power_iterate(wm, self._u.to(wm.device, wm.dtype), self._v.to(wm.device, wm.dtype), _INIT_STEPS)
        state = {"0._u": u, "0._v": v}
        if not self.learn_scale:
            return {"original": w, **state}
        sigma = torch.vdot(u, wm @ v).clamp(_EPS, self.bound)
        return {"original0": w, "original1": sigma.to(w.dtype), **state}

    def extra_repr(self) -> str:
        return f"bound={self.bound}, learn_scale={self.learn_scale}, num_power_steps={self.num_power_steps}"


_NORMS = (_WeightNorm, _SpectralNorm)


def _load_plain_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: a plain ``weight`` entry for a normalised weight becomes the parametrization's entries."""
    if not parametrize.is_parametrized(module):
        return
    for name, chain in module.parametrizations.items():  # type: ignore[union-attr]
        norm = chain[0]
        inner = f"{prefix}parametrizations.{name}."
        if (not isinstance(norm, _NORMS) or prefix + name not in state_dict
                or inner + "original" in state_dict or inner + "original0" in state_dict):
            continue
        with torch.no_grad():
            entries = norm.plain_state(state_dict.pop(prefix + name))
        state_dict.update({inner + key: value for key, value in entries.items()})


def _targets(module: nn.Module, exclude: Iterable[str], what: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what}: module must be an nn.Module, got {type(module).__name__}")
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError(f"{what}: exclude must be a collection of submodule names (as in named_modules()), "
                        f"got {exclude!r}")
    skip = set(exclude)
    named = dict(module.named_modules())
    unknown = sorted(str(name) for name in skip if name not in named or name == "")
    if unknown:
        raise ValueError(f"{what}: exclude names no submodule of {type(module).__name__}: {unknown} "
                         f"(names are as in module.named_modules(), e.g. {[n for n in named if n][:5]})")
    return [(name, layer) for name, layer in named.items()
            if not any(name == s or name.startswith(s + ".") for s in skip)]


def _layers(module: nn.Module, exclude: Iterable[str], what: str) -> list[tuple[str, nn.Module]]:
    layers = [(name, layer) for name, layer in _targets(module, exclude, what) if isinstance(layer, LAYERS)]
    if not layers:
        raise ValueError(f"{what}: found no layer to normalise in {type(module).__name__} (looked for "
                         f"{', '.join(t.__name__ for t in LAYERS)}, outside exclude)")
    for name, layer in layers:
        where = f"layer {name!r}" if name else type(layer).__name__
        if parametrize.is_parametrized(layer, "weight"):
            kinds = [type(p).__name__ for p in layer.parametrizations["weight"]]  # type: ignore[index,union-attr]
            raise ValueError(f"{what}: {where} already has a parametrization of its weight ({kinds}); a fixedpoint "
                             f"norm must be the only one (remove_norm first, or exclude it)")
        if isinstance(layer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{what}: {where} is a lazy module whose weight is not initialised yet; run one "
                             f"forward pass first")
    return layers


def _register(layer: nn.Module, norm: nn.Module) -> None:
    parametrize.register_parametrization(layer, "weight", norm)
    hooks = layer._load_state_dict_pre_hooks.values()
    if not any(getattr(hook, "hook", None) is _load_plain_weight for hook in hooks):
        layer.register_load_state_dict_pre_hook(_load_plain_weight)


def weight_norm(module: nn.Module, *, max_scale: float | None = None, exclude: Iterable[str] = ()) -> nn.Module:
    """Weight normalisation (Salimans & Kingma, 2016), in place, on ``module`` if it is a layer, else on every
    Linear / Conv1d-3d / ConvTranspose1d-3d inside it.

    ``weight = g * v / ||v||`` per output channel: ``||.||`` is the 2-norm over all dimensions but the output one
    (dimension 0, or 1 for ConvTranspose, whose weight is ``(in, out/groups, *kernel)``). ``g`` and ``v`` are the
    stored parameters ``parametrizations.weight.original0`` (shaped like the norm, size 1 except the output
    dimension) and ``original1`` (shaped like the weight), the layout of
    ``torch.nn.utils.parametrizations.weight_norm``, so checkpoints are interchangeable with it. Applying the
    norm does not change the layer (``g = ||weight||`` per channel) unless ``max_scale`` clips it.

    The point for a fixed-point map is ``max_scale``: the effective scale is ``g`` clamped to
    ``[-max_scale, max_scale]``, which bounds the layer's Lipschitz constant (2-norm), since
    ``||W||_2 <= ||W||_F = ||g||_2``:

    * Linear: ``Lip <= ||clamp(g)||_2 <= sqrt(out_features) * max_scale``;
    * Conv / ConvTranspose: an extra factor ``sqrt(prod(kernel_size))`` (each input element enters at most that
      many output positions).

    The clamp's gradient is the true one: a channel whose stored ``g`` an optimizer step has carried past the
    bound gets no gradient through ``g`` (its direction ``v`` still trains) until weight decay or a reload brings
    it back; it starts inside (``g`` is clipped when the norm is applied or a weight is loaded), and an
    optimizer step overshoots by about the learning rate. (A gate that let only inward gradients through would
    not be a gradient: it would differ between a full batch and the average of its DDP or accumulation shards.)

    The stored tensors are new ``Parameter`` objects: build the optimizer after applying the norm. A plain
    checkpoint (key ``weight``) loads into the normalised layer exactly; :func:`remove_norm` bakes the weight back.

    Args:
        module: a layer, or a module containing layers; modified in place.
        max_scale: bound on ``|g|`` per output channel; ``None`` leaves ``g`` free.
        exclude: names of submodules (as in ``module.named_modules()``) to leave alone, with everything inside.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; ``exclude`` is a string or not iterable.
        ValueError: ``max_scale`` not a finite number > 0; an ``exclude`` name that names no submodule; no layer
            found; a layer whose weight is already parametrized, or lazy and uninitialised. Nothing is modified
            when it raises.
    """
    if max_scale is not None:
        max_scale = check_positive(max_scale, "weight_norm: max_scale")
    for _, layer in _layers(module, exclude, "weight_norm"):
        _register(layer, _WeightNorm(1 if isinstance(layer, _TRANSPOSED) else 0, max_scale))
    return module


def spectral_norm(module: nn.Module, *, bound: float = 1.0, learn_scale: bool = False, num_power_steps: int = 1,
                  exclude: Iterable[str] = (), generator: torch.Generator | None = None) -> nn.Module:
    """Spectral normalisation (Miyato et al., 2018), in place, on ``module`` if it is a layer, else on every
    Linear / Conv1d-3d / ConvTranspose1d-3d inside it.

    ``weight = c * W / sigma``, where ``W`` is the stored parameter (``parametrizations.weight.original``),
    ``sigma`` the power-iteration estimate ``u^T W_mat v`` of the largest singular value of ``W_mat =
    W.flatten(1)`` (dimension 0 first for every layer, ConvTranspose included, unlike torch's ``dim=1`` there:
    ConvTranspose is the adjoint of the Conv with the same weight, so this is the matrix that bounds its
    Lipschitz constant), and ``c = bound``, or with ``learn_scale`` a learnable scalar
    (``parametrizations.weight.original1``, then ``W`` is ``original0``) clamped to ``[-bound, bound]`` and
    initialised to ``min(sigma, bound)``, so that a layer already within the bound is unchanged by the norm
    (beyond the bound the clamp passes no gradient to it, as described for :func:`weight_norm`'s ``max_scale``).
    The Lipschitz constant (2-norm) is then at most ``bound`` for Linear, ``bound * sqrt(prod(kernel_size))`` for
    Conv / ConvTranspose, up to the estimate's error: ``u^T W_mat v <= sigma_max`` always, so the true norm of the
    effective weight approaches ``bound`` from above, with a relative excess that shrinks geometrically with
    the number of power steps.

    When ``u, v`` (buffers ``parametrizations.weight.0._u`` / ``_v``) take a power step: only in training
    mode, and, inside a :func:`fixedpoint.pass_scope` covering the layer (a ``fixedpoint.DEQ`` enters one around
    its solve), on the first call only, so every iteration of a solve sees the same ``sigma`` and the solve
    costs one power step however many iterations it takes. Outside a scope every training-mode call takes a
    step, as torch's ``spectral_norm`` does (right for a layer called once per forward pass). Eval mode never
    changes them. This is keyed on passes rather than on the weight's version counter because fused optimizers
    (``Adam(fused=True)``) and writes through ``.data`` update a weight without bumping that counter, and not on
    ``parametrize.cached()`` because that caches the first evaluation, which in a solve runs under
    ``no_grad``: the weight would silently get no gradient. Every DDP rank takes the same steps on the same
    weights, so ``u, v`` stay identical on all ranks without broadcasting buffers.

    Reading ``layer.weight`` in training mode outside a scope also takes a step (as in torch); read it in eval
    mode to inspect. The stored tensors are used as they are, with no reset call, by any optimizer; with
    ``learn_scale`` they are new ``Parameter`` objects (build the optimizer after applying the norm). A plain
    checkpoint (key ``weight``) loads into the layer as ``W`` (with ``u, v`` re-estimated): exact up to the
    estimate's error when ``learn_scale`` and its spectral norm is ``<= bound``, else projected onto the bound.

    Args:
        module: a layer, or a module containing layers; modified in place.
        bound: the spectral norm of the effective weight (or its upper limit, with ``learn_scale``), > 0.
        learn_scale: learn the scale ``c`` within ``[-bound, bound]`` instead of fixing it at ``bound``.
        num_power_steps: power steps per update, >= 1. (15 are taken at registration.)
        exclude: names of submodules (as in ``module.named_modules()``) to leave alone, with everything inside.
        generator: source of the random starting vectors ``u, v``; ``None`` uses the weight device's global one.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; ``exclude`` is a string or not iterable; ``learn_scale``
            is not a bool; ``generator`` is not a ``torch.Generator``.
        ValueError: ``bound`` not a finite number > 0; ``num_power_steps`` not an int >= 1; an ``exclude`` name
            that names no submodule; no layer found; a layer whose weight is already parametrized, or lazy and
            uninitialised. Nothing is modified when it raises.
    """
    bound = check_positive(bound, "spectral_norm: bound")
    if not isinstance(learn_scale, bool):
        raise TypeError(f"spectral_norm: learn_scale must be a bool, got {type(learn_scale).__name__}")
    check_int(num_power_steps, "spectral_norm: num_power_steps", 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"spectral_norm: generator must be a torch.Generator or None, got {type(generator).__name__}")
    for _, layer in _layers(module, exclude, "spectral_norm"):
        _register(layer, _SpectralNorm(layer.weight, bound=bound, learn_scale=learn_scale,
                                       num_power_steps=num_power_steps, generator=generator))
    return module


def remove_norm(module: nn.Module, *, exclude: Iterable[str] = ()) -> nn.Module:
    """Bake the current effective weight of every :func:`weight_norm` / :func:`spectral_norm` in ``module`` back
    into a plain ``weight`` parameter, in place (no power step is taken while baking).

    The state-dict keys return to the plain layout. For a spectral norm without ``learn_scale`` the parameter
    keeps its identity (an optimizer built on it still holds it); otherwise ``weight`` is a new ``Parameter``.

    Args:
        module: a normalised layer, or a module containing some.
        exclude: names of submodules to leave normalised, as in :func:`weight_norm`.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; ``exclude`` is a string or not iterable.
        ValueError: an ``exclude`` name that names no submodule; no fixedpoint norm found outside ``exclude``.
    """
    normed = [layer for _, layer in _targets(module, exclude, "remove_norm")
              if parametrize.is_parametrized(layer, "weight")
              and isinstance(layer.parametrizations["weight"][0], _NORMS)]  # type: ignore[index,union-attr]
    if not normed:
        raise ValueError(f"remove_norm: found no weight_norm or spectral_norm in {type(module).__name__} "
                         f"outside exclude")
    for layer in normed:
        layer.parametrizations["weight"][0].eval()  # type: ignore[index,union-attr]
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return module

"""DiT (the explicit baseline) and FPDM (Bai & Melas-Kyriazi, 2024, Fig. 2 and Eq. 1-4), presets and
``create_model``."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks its loadable bases up in this module
from diffusers.configuration_utils import register_to_config
from torch import nn

import fixedpoint as fp
from fixedpoint.checks import check_int, check_tol

from .backbone import Cost, ModelOutput, TransformerBase
from .blocks import DiTBlock, block_macs
from .errors import InvalidTypeError, InvalidValueError

__all__ = ["FPDM", "PRESETS", "Cost", "DiT", "ModelOutput", "convert_legacy_fpdm_config", "create_model"]

# name -> (depth, hidden_size, num_heads), as in the DiT paper; the patch size comes from the name's suffix.
PRESETS: dict[str, tuple[int, int, int]] = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
                                            "XL": (28, 1152, 16)}


class DiT(TransformerBase):
    """Diffusion transformer (Peebles & Xie, 2023): ``depth`` adaLN-Zero blocks conditioned on timestep + class.

    Args:
        input_size: latent (or image) side length.
        patch_size: patch side length.
        in_channels: channels of ``x_t``.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, depth, heads and MLP expansion.
        num_classes: number of classes; index ``num_classes`` is the null class for guidance.
        learn_sigma: also predict the variance interpolation (output channels doubled).
    """

    #: The sampler's switch (see :class:`fixedpoint_diffusion.sampling.Denoiser`): no fixed point, no
    #: ``num_iterations``.
    is_fixed_point = False

    @register_to_config
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = True) -> None:
        super().__init__()
        check_int(depth, "depth", 1, error=InvalidValueError)
        self._build_shared(input_size, patch_size, in_channels, hidden_size, num_classes, learn_sigma, num_heads,
                           mlp_ratio)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self._init_weights(list(self.blocks))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                drop_labels: torch.Tensor | None = None) -> ModelOutput:
        """Predict from ``x_t`` (B, C, H, W) at integer timesteps ``t`` (B,) for classes ``y`` (B,).

        ``drop_labels`` (B,) bool replaces those labels by the null class (classifier-free guidance training).
        """
        self._check_inputs(x_t, t, y)
        h, t_emb, y_emb = self._embed(x_t, t, y, drop_labels)
        c = t_emb + y_emb  # (B, D)
        for block in self.blocks:
            h = self._run_block(block, h, c)  # (B, T, D)
        out = self._unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)
        cfg = self.config
        macs = self._shared_macs(x_t.shape[0]) + x_t.shape[0] * cfg.depth * block_macs(
            self.num_tokens, cfg.hidden_size, cfg.mlp_ratio)
        return ModelOutput(out=out, cost=Cost(block_passes=cfg.depth, macs=macs))

    @property
    def explicit_passes(self) -> int:
        """Block passes of one forward: ``depth``."""
        return self.config.depth

    def training_macs(self, batch: int) -> float:
        """Multiply-accumulates of one training step on ``batch`` samples, counted as 3x the forward (the
        backward costs about two forwards): the unit in which :mod:`fixedpoint_diffusion.experiment` gives FPDM
        and DiT equal training compute."""
        cfg = self.config
        forward = self._shared_macs(batch) + batch * cfg.depth * block_macs(self.num_tokens, cfg.hidden_size,
                                                                             cfg.mlp_ratio)
        return 3.0 * forward


# --- fixedpoint options as JSON-able dicts -------------------------------------------------------------------
# FPDM stores its solver and backward mode as fixedpoint's own config dicts (fp.to_config / fp.from_config), so
# fixedpoint validates them and a new option or mode needs no change here.

# FPDM's "stochastic_jfb" without ranges: the official code's 0-10 no-grad and 1-12 with-grad steps.
_STOCHASTIC_JFB_DEFAULTS = {"max_no_grad": 10, "max_with_grad": 12}


def _option_to_config(option: fp.Solver | fp.Backward, what: str) -> dict[str, Any]:
    """``fp.to_config`` of a solver or backward object, fields left at ``None`` (a stochastic JFB's generator,
    say) omitted, with FPDM's hint for what cannot be stored."""
    try:
        return {k: v for k, v in fp.to_config(option).items() if v is not None}
    except TypeError as err:
        hint = " (pass a generator to forward instead)" if getattr(option, "generator", None) is not None else ""
        raise InvalidValueError(f"{what}: {err}{hint}") from None


def _option_from_config(spec: Any, what: str) -> Any:
    """A solver/backward object from a name, a ``{"name": ..., **options}`` dict or the object itself, validated
    by fixedpoint's constructors (unknown options raise)."""
    base, table = (fp.Solver, fp.SOLVERS) if what == "solver" else (fp.Backward, fp.BACKWARDS)
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise InvalidTypeError(f"{what} must be one of {sorted(table)} (a name, a dict with 'name', or that "
                               f"object), got {type(spec).__name__}")
    if spec.get("name") not in table:
        raise InvalidValueError(f"{what} must be one of {sorted(table)}, got {spec.get('name')!r}")
    if spec["name"] == "stochastic_jfb":
        spec = {**_STOCHASTIC_JFB_DEFAULTS, **spec}
    try:  # fixedpoint's own refusals, as this package's input errors
        return fp.from_config(spec)
    except ValueError as err:
        raise InvalidValueError(f"{what}: {err}") from None
    except TypeError as err:
        raise InvalidTypeError(f"{what}: {err}") from None


# Flat keys of FPDM configs written before the solver/backward options became dicts.
_LEGACY_SJFB_KEYS = ("min_no_grad", "max_no_grad", "min_with_grad", "max_with_grad")
_LEGACY_KEYS = (*_LEGACY_SJFB_KEYS, "jfb_steps")


def convert_legacy_fpdm_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """An FPDM config (``config.json``, a checkpoint's model signature, a ``[model]`` section) in today's form:
    the flat torchdeq-style keys of older versions (``backward="stochastic_jfb", min_no_grad=...,
    jfb_steps=...``) folded into the ``backward`` dict, and ``solver``/``backward`` given by name written out
    as the dicts :class:`FPDM` stores. Other keys are kept as they are (in a new dict).

    Raises:
        ValueError, TypeError: flat keys next to a ``backward`` that is already a dict or an object, or an
            invalid solver/backward.
    """
    out = dict(config)
    legacy = {key: out.pop(key) for key in _LEGACY_KEYS if key in out}
    backward = out.get("backward", "stochastic_jfb")
    if not legacy:
        pass
    elif backward == "stochastic_jfb":
        out["backward"] = {"name": backward, **{k: legacy[k] for k in _LEGACY_SJFB_KEYS if k in legacy}}
    elif backward == "jfb":
        out["backward"] = {"name": backward, "steps": legacy.get("jfb_steps", 1)}
    elif isinstance(backward, str):
        out["backward"] = {"name": backward}  # the old ranges and steps did not apply to it
    else:
        raise InvalidValueError(f"{sorted(legacy)} are the old flat backward options; give them inside backward "
                                f"(e.g. backward={{'name': 'stochastic_jfb', 'max_no_grad': 10, ...}}), not next to "
                                f"backward={backward!r}")
    for key in ("solver", "backward"):
        if key in out:
            out[key] = _option_to_config(_option_from_config(out[key], key), key)
    return out


class FPDM(TransformerBase):
    """Fixed Point Diffusion Model (paper Fig. 2, Eq. 1-4).

    ``pre_depth`` explicit blocks map the embedded input to ``h_pre``; its projection ``x_inj`` is the input
    injection; one weight-tied block defines the map ``z -> block(MLP([z, x_inj]), c)`` (MLP: 2D -> 2D -> D with
    tanh-GELU), whose fixed point is solved with :func:`fixedpoint.solve` from ``h_pre`` (or a given state);
    ``post_depth`` explicit blocks and the final layer follow. The fixed-point block is conditioned on timestep
    + class; the explicit layers on the class only unless ``timestep_conditioned_explicit`` (the paper's
    "timestep-independent" layers). The ``x_inj`` half of the MLP's first layer is computed once per forward.

    Training uses the configured backward mode (by default the paper's stochastic JFB, Algorithm 1, with the
    official code's ranges: 0-10 no-grad and 1-12 with-grad steps); pass a seeded CPU generator to
    :meth:`forward` so that all DDP ranks draw alike.

    Args:
        input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, num_classes, learn_sigma: as in
            :class:`DiT`.
        pre_depth, post_depth: explicit blocks before and after the fixed point.
        timestep_conditioned_explicit: condition the explicit layers on the timestep too.
        solver: the forward solver: a name (``"iteration"``, ``"anderson"``, ``"broyden"``), a dict with its
            options (``{"name": "anderson", "memory": 3}``) or a :class:`fixedpoint.Solver`.
        backward: the training backward mode: a name (``"stochastic_jfb"``, ``"jfb"``, ``"implicit"``), a dict
            (``{"name": "stochastic_jfb", "max_no_grad": 10, "max_with_grad": 12}``; a ``"stochastic_jfb"``
            without ranges gets the official code's 0-10 and 1-12) or a :class:`fixedpoint.Backward` without a
            generator. Both are validated by fixedpoint here and stored in :attr:`config` as dicts, so
            ``save_pretrained``/``from_pretrained`` round-trip them.
        max_steps, rtol, atol: forward solve options (as in :func:`fixedpoint.solve`) when ``num_iterations``
            is not given per call.

    Raises:
        ValueError, TypeError: on an invalid argument, naming it.
    """

    #: The sampler's switch (see :class:`fixedpoint_diffusion.sampling.Denoiser`): forward takes
    #: ``num_iterations``/``z0``/``rtol``/``atol``/``max_steps`` and returns ``z`` and ``residual``.
    is_fixed_point = True

    @register_to_config
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = True,
                 pre_depth: int = 1, post_depth: int = 1, timestep_conditioned_explicit: bool = False,
                 solver: str | Mapping[str, Any] | fp.Solver = "iteration",
                 backward: str | Mapping[str, Any] | fp.Backward = "stochastic_jfb", max_steps: int = 12,
                 rtol: float = 0.0, atol: float = 0.0) -> None:
        super().__init__()
        for name, value in (("pre_depth", pre_depth), ("post_depth", post_depth)):
            check_int(value, name, 0, error=InvalidValueError)
        check_int(max_steps, "max_steps", 1, error=InvalidValueError)  # fixedpoint.solve's own rules
        for name, value in (("rtol", rtol), ("atol", atol)):
            check_tol(value, name, error=InvalidValueError)
        # Resolved and validated once by fixedpoint; the config keeps the JSON-able dicts.
        self.solver: fp.Solver = _option_from_config(solver, "solver")
        self.backward_mode: fp.Backward = _option_from_config(backward, "backward")
        self.register_to_config(solver=_option_to_config(self.solver, "solver"),
                                backward=_option_to_config(self.backward_mode, "backward"))
        self._build_shared(input_size, patch_size, in_channels, hidden_size, num_classes, learn_sigma, num_heads,
                           mlp_ratio)
        self.blocks_pre = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(pre_depth))
        self.block_pre_projection = nn.Linear(hidden_size, hidden_size)
        self.block_fixed_point_projection_fc1 = nn.Linear(2 * hidden_size, 2 * hidden_size)
        self.block_fixed_point_projection_fc2 = nn.Linear(2 * hidden_size, hidden_size)
        self.block_fixed_point = DiTBlock(hidden_size, num_heads, mlp_ratio)
        self.blocks_post = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(post_depth))
        self._init_weights([*self.blocks_pre, self.block_fixed_point, *self.blocks_post])

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """diffusers' loader hook (``from_config``/``from_pretrained``): configs saved by older versions, with
        flat backward keys, are converted first (:func:`convert_legacy_fpdm_config`)."""
        return super().extract_init_dict(convert_legacy_fpdm_config(config_dict), **kwargs)

    def fixed_point_map(self, x_inj: torch.Tensor, c: torch.Tensor):
        """The map ``z -> block(MLP([z, x_inj]), c)`` for one forward, with the ``x_inj`` half of the MLP's first
        layer computed here, once."""
        dim = self.config.hidden_size
        fc1, fc2 = self.block_fixed_point_projection_fc1, self.block_fixed_point_projection_fc2
        inj = F.linear(x_inj, fc1.weight[:, dim:], fc1.bias)  # (B, T, 2D), loop-invariant

        def f(z: torch.Tensor) -> torch.Tensor:
            hidden = F.gelu(F.linear(z, fc1.weight[:, :dim]) + inj, approximate="tanh")  # (B, T, 2D)
            return self._run_block(self.block_fixed_point, fc2(hidden), c)  # (B, T, D)

        return f

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, num_iterations: int | None = None,
                z0: torch.Tensor | None = None, trace: bool = False, drop_labels: torch.Tensor | None = None,
                solver: fp.Solver | str | None = None, backward: fp.Backward | str | Mapping[str, Any] | None = None,
                rtol: float | None = None, atol: float | None = None, max_steps: int | None = None,
                generator: torch.Generator | None = None) -> ModelOutput:
        """Predict from ``x_t`` (B, C, H, W) at integer timesteps ``t`` (B,) for classes ``y`` (B,).

        Args:
            num_iterations: exactly this many applications of the fixed-point map, no convergence checks and no
                gradient through the solve (the sampling mode). ``None`` uses the configured solve while
                training (the backward mode decides the steps) and ``max_steps``/``rtol``/``atol`` otherwise.
            z0: initial fixed-point state (B, T, D), e.g. the previous timestep's ``ModelOutput.z``; default
                ``h_pre``, the pre-blocks' output.
            trace: also return the per-step residuals.
            drop_labels: (B,) bool, labels replaced by the null class.
            solver, backward, rtol, atol, max_steps: per-call overrides of the configured options (e.g. an
                adaptive sampler stops each solve at ``rtol`` within a per-timestep ``max_steps``).
            generator: a CPU generator for this call's stochastic-JFB draws (used when the backward mode has
                none); seed it alike on every DDP rank so that all ranks draw the same step counts.
        """
        self._check_inputs(x_t, t, y)
        cfg = self.config
        batch = x_t.shape[0]
        h, t_emb, y_emb = self._embed(x_t, t, y, drop_labels)
        c = t_emb + y_emb  # (B, D): the fixed-point block always sees the timestep
        c_explicit = c if cfg.timestep_conditioned_explicit else y_emb  # (B, D)
        for block in self.blocks_pre:
            h = self._run_block(block, h, c_explicit)  # (B, T, D)
        x_inj = self.block_pre_projection(h)  # (B, T, D)
        f = self.fixed_point_map(x_inj, c)
        if z0 is None:
            z0 = h
        elif z0.shape != h.shape:
            raise InvalidValueError(f"z0 must have shape {tuple(h.shape)} (B, tokens, hidden), got {tuple(z0.shape)}")
        solver = self.solver if solver is None else solver
        if num_iterations is not None:
            check_int(num_iterations, "num_iterations", 1, error=InvalidValueError)
        mode = self.backward_mode if backward is None else _option_from_config(backward, "backward")
        if isinstance(mode, fp.StochasticJFB) and generator is not None and mode.generator is None:
            mode = dataclasses.replace(mode, generator=generator)
        # One forward pass: a spectral norm or variational dropout a user puts in the fixed-point block draws its
        # power step / mask once, and every iteration sees the same map (as in fixedpoint.DEQ).
        with fp.pass_scope(self):
            if num_iterations is not None:
                sol = fp.solve(f, z0.detach(), solver=solver, max_steps=num_iterations, rtol=0.0, atol=0.0,
                               trace=trace)
            else:
                sol = fp.solve(f, z0.detach(), solver=solver, backward=mode if torch.is_grad_enabled() else None,
                               max_steps=cfg.max_steps if max_steps is None else max_steps,
                               rtol=cfg.rtol if rtol is None else rtol,
                               atol=cfg.atol if atol is None else atol, trace=trace)
        h = sol.z
        for block in self.blocks_post:
            h = self._run_block(block, h, c_explicit)  # (B, T, D)
        out = self._unpatchify(self.final_layer(h, c_explicit))  # (B, C_out, H, W)
        return ModelOutput(out=out, cost=self._cost(batch, sol.num_steps), z=sol.z, residual=sol.residual,
                           trace=sol.trace, solution=sol)

    @property
    def explicit_passes(self) -> int:
        """Block passes of one forward outside the fixed point: ``pre_depth + post_depth``."""
        return self.config.pre_depth + self.config.post_depth

    def training_macs(self, batch: int) -> float:
        """Expected multiply-accumulates of one training step on ``batch`` samples.

        Everything autograd records counts 3x its forward (the backward costs about two forwards); with
        stochastic JFB the no-grad steps count once and both step counts take their expected values (the draws
        are uniform), so the figure is the mean over steps, the same for every seed. JFB counts its with-grad
        steps after ``max_steps`` no-grad ones; implicit differentiation counts ``max_steps`` forward steps and
        as many vector-Jacobian products in backward (two forwards each; an estimate, the adjoint solve may
        stop earlier or later).
        """
        cfg = self.config
        per_step = self._cost(batch, 1).macs - self._cost(batch, 0).macs  # one application of the map
        explicit = self._cost(batch, 0).macs  # embedders, pre/post blocks, projections, final layer
        mode = self.backward_mode
        if isinstance(mode, fp.StochasticJFB):
            no_grad = (mode.min_no_grad + mode.max_no_grad) / 2
            with_grad = (mode.min_with_grad + mode.max_with_grad) / 2
        elif isinstance(mode, fp.JFB):
            no_grad, with_grad = cfg.max_steps, mode.steps
        else:
            no_grad, with_grad = 0, cfg.max_steps
        return 3.0 * explicit + per_step * (no_grad + 3.0 * with_grad)

    def _cost(self, batch: int, num_iterations: int) -> Cost:
        cfg = self.config
        tokens, dim = self.num_tokens, cfg.hidden_size
        block = block_macs(tokens, dim, cfg.mlp_ratio)
        once = tokens * dim * dim + tokens * dim * 2 * dim  # pre-projection, hoisted x_inj half of fc1
        per_step = block + tokens * dim * 2 * dim + tokens * 2 * dim * dim  # block, z half of fc1, fc2
        explicit = (cfg.pre_depth + cfg.post_depth) * block
        macs = self._shared_macs(batch) + batch * (explicit + once + num_iterations * per_step)
        return Cost(block_passes=cfg.pre_depth + num_iterations + cfg.post_depth, macs=macs)


def create_model(name: str, **overrides: Any) -> DiT | FPDM:
    """Build a preset: ``"DiT-S/2"`` ... ``"DiT-XL/8"`` or ``"FPDM-S/2"`` ... ``"FPDM-XL/8"``.

    ``overrides`` are constructor arguments (``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma``,
    ``pre_depth``, ``post_depth``, ...). Defaults: ``input_size=32`` (256px images through the SD VAE),
    ``in_channels=4``, ``learn_sigma=True``, 1000 classes; FPDM with 1 pre and 1 post block.

    Raises:
        ValueError: on an unknown name or an override the model does not take.
    """
    valid = [f"{kind}-{size}/{p}" for kind in ("DiT", "FPDM") for size in PRESETS for p in (2, 4, 8)]
    if name not in valid:
        raise InvalidValueError(f"name must be one of {valid}, got {name!r}")
    kind, rest = name.split("-", 1)
    size, patch = rest.split("/")
    depth, hidden, heads = PRESETS[size]
    cls = DiT if kind == "DiT" else FPDM
    kwargs: dict[str, Any] = {"patch_size": int(patch), "hidden_size": hidden, "num_heads": heads}
    if cls is DiT:
        kwargs["depth"] = depth
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise InvalidValueError(f"{name}: unknown override(s) {unknown}; valid ones are {sorted(allowed)}")
    kwargs.update(overrides)
    return cls(**kwargs)

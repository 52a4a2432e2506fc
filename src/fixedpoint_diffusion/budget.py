"""Compute budgets (paper Sec. 3.3): which timesteps a sampler visits and how many fixed-point iterations each
gets, as pure functions of the budget and the model's per-timestep cost.

The budget is counted in transformer-block forward passes per image, the paper's unit (footnote 4): a timestep of
FPDM costs ``pre_depth + iterations + post_depth`` passes, one of DiT ``depth``. :func:`plan` turns a budget into a
:class:`Schedule` without touching the model's weights; :func:`fixedpoint_diffusion.sample` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fixedpoint.checks import check_int

from .errors import InvalidValueError

__all__ = ["ALLOCATIONS", "DEFAULT_ITERATIONS_PER_TIMESTEP", "DEFAULT_NUM_TIMESTEPS", "Schedule",
           "fill_schedule_defaults", "plan", "spaced_timesteps"]

ALLOCATIONS = ("constant", "increasing", "decreasing", "adaptive")


@dataclass(frozen=True)
class Schedule:
    """Which timesteps a sampler visits and how many fixed-point iterations each gets.

    Attributes:
        timesteps: training-timestep indices, from noisiest to cleanest.
        iterations: fixed-point iterations per timestep (``None`` for explicit models such as DiT); for
            ``"adaptive"`` the per-timestep allowance before unused iterations are carried forward.
        explicit_passes: block passes per timestep outside the fixed point (``pre + post``, or DiT's depth).
        budget: the budget asked for (``None`` if none was given).
        allocation: how iterations were spread (``"constant"``, ``"increasing"``, ``"decreasing"``,
            ``"custom"``, ``"adaptive"``).
        tol: adaptive only: the relative residual at which a timestep's solve stops.
    """

    timesteps: tuple[int, ...]
    iterations: tuple[int, ...] | None
    explicit_passes: int
    budget: int | None
    allocation: str
    tol: float | None = None

    @property
    def num_timesteps(self) -> int:
        return len(self.timesteps)

    @property
    def block_passes(self) -> int:
        """Block passes per image if every timestep spends its allowance (the most an adaptive run spends)."""
        return self.num_timesteps * self.explicit_passes + (sum(self.iterations) if self.iterations else 0)

    def describe(self) -> str:
        """A readable table of the schedule and its cost."""
        lines = [f"{self.num_timesteps} timesteps, {self.block_passes} block passes per image"
                 + (f" (budget {self.budget})" if self.budget is not None else "")
                 + f", allocation {self.allocation}" + (f", tol {self.tol:g}" if self.tol is not None else "")]
        lines.append("step  timestep  iterations  block passes")
        for i, t in enumerate(self.timesteps):
            it = self.iterations[i] if self.iterations else 0
            lines.append(f"{i:4d}  {t:8d}  {it if self.iterations else '-':>10}  {self.explicit_passes + it:12d}")
        return "\n".join(lines)


def is_fixed_point_model(model: Any) -> bool:
    """The model's declared :attr:`~fixedpoint_diffusion.sampling.Denoiser.is_fixed_point` (``False`` if it
    declares nothing)."""
    return bool(getattr(model, "is_fixed_point", False))


#: What a caller that gives neither a budget nor a number of timesteps gets: 50 timesteps (diffusers' default),
#: and for a fixed-point model 2 iterations at each.
DEFAULT_NUM_TIMESTEPS = 50
DEFAULT_ITERATIONS_PER_TIMESTEP = 2


def fill_schedule_defaults(model: Any, budget: int | None, iterations_per_timestep: int | None,
                           num_timesteps: int | None,
                           allocation: str | Sequence[int] = "constant") -> tuple[int | None, int | None, int | None]:
    """``(budget, iterations_per_timestep, num_timesteps)`` completed with the defaults where a user gave too little for
    :func:`plan`: no budget and no timesteps -> :data:`DEFAULT_NUM_TIMESTEPS` timesteps; a fixed-point model still
    short of a second quantity (and not given per-timestep iterations) -> :data:`DEFAULT_ITERATIONS_PER_TIMESTEP`. What
    was given is kept, so inconsistent input still reaches :func:`plan` and its errors."""
    if budget is None and num_timesteps is None:
        num_timesteps = DEFAULT_NUM_TIMESTEPS
    if (is_fixed_point_model(model) and iterations_per_timestep is None and isinstance(allocation, str)
            and (budget is None or num_timesteps is None)):
        iterations_per_timestep = DEFAULT_ITERATIONS_PER_TIMESTEP
    return budget, iterations_per_timestep, num_timesteps


def _explicit_passes(model: Any) -> int | None:
    """The model's declared block passes per timestep outside any fixed point (``None``: unknown)."""
    passes = getattr(model, "explicit_passes", None)
    return None if passes is None else int(passes)


def spaced_timesteps(num_train_timesteps: int, num_timesteps: int) -> tuple[int, ...]:
    """``num_timesteps`` evenly spaced training timesteps from ``T - 1`` down to 0 (ADM's respacing, diffusers'
    ``"linspace"``); a single step is taken at ``T - 1``."""
    if num_timesteps == 1:
        return (num_train_timesteps - 1,)
    return tuple(int(t) for t in np.linspace(0, num_train_timesteps - 1, num_timesteps).round()[::-1])


def _distribute(total: int, weights: Sequence[float], prefer_late: bool = True) -> list[int]:
    """Split ``total`` iterations over the steps: one each, the rest in proportion to ``weights`` (largest
    remainders; ties to the larger weight, then to the later step if ``prefer_late`` else the earlier), so
    non-decreasing weights with ``prefer_late`` (non-increasing without) give monotone counts summing to
    ``total``."""
    n = len(weights)
    extra = total - n
    w = np.asarray(weights, dtype=np.float64)
    quota = extra * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    left = extra - int(counts.sum())
    # Remainders are compared to 1e-9: a reversed ramp's quotas differ in the last bits, which would otherwise
    # decide ties and make "decreasing" other than the mirror of "increasing".
    remainder = np.round(quota - counts, 9)
    order = sorted(range(n), key=lambda i: (-remainder[i], -w[i], -i if prefer_late else i))
    for i in order[:left]:
        counts[i] += 1
    return [1 + int(c) for c in counts]


def plan(model: Any = None, *, budget: int | None = None, iterations_per_timestep: int | None = None,
         num_timesteps: int | None = None, allocation: str | Sequence[int] = "constant", ratio: float = 3.0,
         tol: float = 1e-3, num_train_timesteps: int = 1000, explicit_passes: int | None = None) -> Schedule:
    """A sampling schedule from a compute budget.

    For a fixed-point model (``model.is_fixed_point``, such as FPDM), give two of:

    * ``budget`` and ``iterations_per_timestep``: the number of timesteps follows, ``budget // (explicit + k)``
      ("timestep smoothing": fewer iterations, more timesteps);
    * ``budget`` and ``num_timesteps``: the iterations follow, ``budget - num_timesteps * explicit`` spread over them;
    * ``num_timesteps`` and ``iterations_per_timestep``: ``k`` iterations at each of ``num_timesteps`` timesteps.

    ``allocation`` spreads the iterations: ``"constant"`` (``k`` each when ``iterations_per_timestep`` is given,
    otherwise
    as even as possible), ``"increasing"``/``"decreasing"`` (linear weights from 1 to ``ratio`` towards the clean /
    the noisy end, paper Sec. 3.3), a list of per-timestep counts (``"custom"``), or ``"adaptive"``: each timestep
    may spend its even share plus whatever earlier timesteps left unused, and stops as soon as the relative
    residual falls below ``tol``. The total never exceeds the budget and every timestep gets at least one iteration.

    For an explicit model (DiT) the budget buys ``budget // depth`` timesteps.

    Args:
        model: the model (only its declared ``is_fixed_point`` and ``explicit_passes`` are read, see
            :class:`~fixedpoint_diffusion.sampling.Denoiser`); or give ``explicit_passes`` and no model for a
            fixed-point schedule.

    Raises:
        ValueError: a budget too small for one timestep (with at least one iteration),
            ``iterations_per_timestep < 1``, an unknown allocation, or an inconsistent combination.
    """
    fixed_point = explicit_passes is not None if model is None else is_fixed_point_model(model)
    explicit = explicit_passes if model is None else _explicit_passes(model)
    for name, value in (("budget", budget), ("iterations_per_timestep", iterations_per_timestep),
                        ("num_timesteps", num_timesteps)):
        if value is not None:
            check_int(value, name, 1, error=InvalidValueError)
    custom = None
    if not isinstance(allocation, str):
        custom = list(allocation) if isinstance(allocation, (list, tuple)) else None
        if not custom or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in custom):
            raise InvalidValueError(f"allocation must be a name or a non-empty list of ints >= 1 (iterations per "
                                    f"timestep), got {allocation!r}")
        if iterations_per_timestep is not None:
            raise InvalidValueError(f"a custom allocation sets every timestep's iterations; iterations_per_timestep="
                                    f"{iterations_per_timestep} would be ignored: give one of them")
        allocation_name = "custom"
    elif allocation in ALLOCATIONS:
        allocation_name = allocation
    else:
        raise InvalidValueError(f"allocation must be one of {list(ALLOCATIONS)} or a list of per-timestep iterations, "
                                f"got {allocation!r}")
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio >= 1):
        raise InvalidValueError(f"ratio must be a finite number >= 1, got {ratio!r}")

    if not fixed_point:
        if explicit is None:
            if budget is not None:
                raise InvalidValueError("budget needs a model whose per-timestep cost is known (explicit_passes); give "
                                        "num_timesteps instead")
            explicit = 0
        if iterations_per_timestep is not None or custom is not None or allocation_name != "constant":
            raise InvalidValueError("iterations_per_timestep and allocations apply to fixed-point models only (this "
                                    "model does not declare is_fixed_point)")
        if budget is not None:
            steps = budget // explicit
            if steps < 1:
                raise InvalidValueError(f"budget {budget} is too small for one timestep ({explicit} block passes each)")
            if num_timesteps is not None and num_timesteps != steps:
                raise InvalidValueError(f"budget {budget} buys {steps} timesteps of {explicit} block passes, not "
                                        f"num_timesteps={num_timesteps}; give one of them")
        elif num_timesteps is None:
            raise InvalidValueError("give budget or num_timesteps")
        else:
            steps = num_timesteps
        _check_num_timesteps(steps, num_train_timesteps)
        return Schedule(spaced_timesteps(num_train_timesteps, steps), None, explicit, budget, "constant")

    if custom is not None:
        steps = len(custom)
        if num_timesteps is not None and num_timesteps != steps:
            raise InvalidValueError(f"the custom allocation has {steps} entries but num_timesteps={num_timesteps}")
        if budget is not None and steps * explicit + sum(custom) > budget:
            raise InvalidValueError(f"the custom allocation costs {steps * explicit + sum(custom)} block passes, over "
                                    f"the budget of {budget}")
        _check_num_timesteps(steps, num_train_timesteps)
        return Schedule(spaced_timesteps(num_train_timesteps, steps), tuple(custom), explicit, budget, "custom")

    given = sum(v is not None for v in (budget, iterations_per_timestep, num_timesteps))
    if given != 2:
        raise InvalidValueError("give exactly two of budget, iterations_per_timestep and num_timesteps (got "
                                f"budget={budget}, iterations_per_timestep={iterations_per_timestep}, "
                                f"num_timesteps={num_timesteps})")
    if budget is None:
        steps, total = num_timesteps, num_timesteps * iterations_per_timestep
    elif num_timesteps is None:
        steps = budget // (explicit + iterations_per_timestep)
        if steps < 1:
            raise InvalidValueError(f"budget {budget} is too small for one timestep of {explicit} explicit block "
                                    f"passes + {iterations_per_timestep} iterations")
        total = steps * iterations_per_timestep if allocation_name == "constant" else budget - steps * explicit
    else:
        steps = num_timesteps
        total = budget - steps * explicit
        if total < steps:
            raise InvalidValueError(f"budget {budget} is too small for {steps} timesteps: each needs {explicit} "
                                    f"explicit block passes + at least 1 iteration ({steps * (explicit + 1)} in all)")
    _check_num_timesteps(steps, num_train_timesteps)
    if allocation_name in ("constant", "adaptive"):
        weights = [1.0] * steps
    else:
        ramp = np.linspace(1.0, ratio, steps) if steps > 1 else np.ones(1)
        weights = list(ramp if allocation_name == "increasing" else ramp[::-1])
    iterations = _distribute(total, weights, prefer_late=allocation_name != "decreasing")
    if allocation_name == "adaptive" and not tol > 0:
        raise InvalidValueError(f"tol must be > 0 for the adaptive allocation, got {tol!r}")
    return Schedule(spaced_timesteps(num_train_timesteps, steps), tuple(iterations), explicit, budget,
                    allocation_name, tol if allocation_name == "adaptive" else None)


def _check_num_timesteps(steps: int, num_train_timesteps: int) -> None:
    if steps > num_train_timesteps:
        raise InvalidValueError(f"{steps} timesteps exceed the {num_train_timesteps} training timesteps")

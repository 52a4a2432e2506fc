"""Counter-based Gaussian noise: sample ``i``'s noise is a pure function of ``(seed, i, step)``, drawn for a whole
batch in one call on the batch's device.

The generator is Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3",
SC 2011; the counter-based generator of Random123, cuRAND and JAX). Philox is a keyed bijection of a 128-bit counter:
every output block is computed from its own counter, so no state is carried from one draw to the next and any
element of any sample can be drawn without drawing the others. That is what makes the noise independent of the batch
a sample is in, of its position in it, and of the number of processes a run is sharded over, without a
``torch.Generator`` per sample.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .errors import InvalidValueError

__all__ = ["counter_normal"]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, table 2 / Random123's philox.h).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
# The fourth counter word: a fixed tag ("FPDN"), so that another use of Philox keyed by the same seed can take
# another tag and never meet these streams.
_STREAM = 0x4650444E
_LIMIT32 = 1 << 32


def _mix64(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection on 64-bit ints in which every input bit
    affects every output bit. Philox takes any key, but nearby seeds (0, 1, 2, ...) would otherwise be keys that
    differ in one or two low bits of one word; mixing spreads them over both key words."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key_from_seed(seed: int) -> tuple[int, int]:
    """The Philox key (two 32-bit words) of a seed: the seed reduced mod 2**64, mixed, split low word first."""
    k = _mix64(seed & _MASK64)
    return k & _MASK32, k >> 32


def _philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | int, c3: torch.Tensor | int, k0: int,
                   k1: int) -> torch.Tensor:
    """Philox4x32-10 of counters ``(c0, c1, c2, c3)`` (int64 tensors of uint32 values, broadcastable to one shape
    S, all on ``c0``'s device; ``c2`` and ``c3`` may be Python ints, filled in without a host-to-device copy)
    under the key ``(k0, k1)``; returns the four output words as one (4, *S) int64 tensor of uint32 values. The
    inputs are not modified.

    Each round (Salmon et al. 2011, sec. 3.3): ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2``,
    ``c <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the key is bumped by the Weyl constants between rounds.
    The key is a Python int here (one per call), so its schedule costs no tensor operations.

    Torch has no unsigned 32-bit arithmetic on every device, so each 32x32-bit product is formed in int64. It can
    exceed 2**63 and wrap to a negative number, but two's complement keeps the bits mod 2**64 exact, so the high
    word is ``(prod >> 32) & 0xFFFFFFFF`` (the arithmetic shift drags in sign bits; the mask removes them). The low
    words are kept unmasked (the whole product) until the end: they are only XORed into a word that is masked anyway.
    Words that get multiplied (``c0``, ``c2``) are always clean 32-bit values.

    Every step writes into buffers allocated once: on a CPU a fresh tensor of this size costs several times the
    arithmetic on it (measured: out-of-place int64 ops 40-60 us, in-place 8 us, on 65536 elements).
    """
    shape = torch.broadcast_shapes(*(c.shape for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)))
    state = torch.empty((4, *shape), dtype=torch.int64, device=c0.device)
    for word, c in zip(state, (c0, c1, c2, c3)):
        if isinstance(c, torch.Tensor):
            word.copy_(c)
        else:
            word.fill_(c)
    x0, x1, x2, x3 = state
    lo0, lo1 = torch.empty((2, *shape), dtype=torch.int64, device=c0.device)
    for r in range(_ROUNDS):
        torch.mul(x0, _M0, out=lo0)
        torch.mul(x2, _M1, out=lo1)
        torch.bitwise_right_shift(lo1, 32, out=x0)
        x0 ^= x1
        x0 ^= k0
        x0 &= _MASK32
        torch.bitwise_right_shift(lo0, 32, out=x2)
        x2 ^= x3
        x2 ^= k1
        x2 &= _MASK32
        x1, lo1 = lo1, x1  # the products become words 1 and 3; the old words' buffers take the next products
        x3, lo0 = lo0, x3
        if r < _ROUNDS - 1:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    assert _ROUNDS % 2 == 0  # an even number of swaps has put words 1 and 3 back into `state`
    x1 &= _MASK32
    x3 &= _MASK32
    return state


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Uniforms in the open interval (0, 1) from uint32 words (int64 ``x``, overwritten): the top 23 bits at the
    centre of their cell, ``((x >> 9) + 0.5) * 2**-23``. A cell centre needs one bit more than the index, and
    float32 holds 24, so every value is exact (with 24 bits the top cell's centre rounds up to 1.0). Never 0, so
    ``log`` in Box-Muller is finite, and never 1. The smallest value, 2**-24, caps ``|z|`` at
    ``sqrt(48 ln 2)`` = 5.77, which a standard normal exceeds with probability 8e-9."""
    x >>= 9  # in place: a fresh int64 tensor costs more than the shift
    return x.to(torch.float32).add_(0.5).mul_(2.0**-23)


def _as_int(value: object, what: str) -> int:
    """``value`` as a Python int (numpy and torch integer scalars too); ``bool`` refused."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def _check(seed: object, indices: object, step: object, shape: object, dtype: object) -> tuple[int, int, tuple]:
    seed = _as_int(seed, "seed")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a 1-D integer torch.Tensor of sample indices, got {type(indices).__name__}")
    if indices.dtype == torch.bool or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() != 1:
        raise InvalidValueError(f"indices must be 1-D (one index per sample), got shape {tuple(indices.shape)}")
    # One host read of two numbers; on a GPU it waits for the indices (pass CPU indices to avoid that wait).
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= _LIMIT32):
        raise InvalidValueError(f"indices must lie in [0, 2**32), got values in [{int(indices.min())}, "
                                f"{int(indices.max())}]")
    step = _as_int(step, "step")
    if not 0 <= step < _LIMIT32:
        raise InvalidValueError(f"step must lie in [0, 2**32), got {step}")
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a tuple of ints (the per-sample shape), got {type(shape).__name__}")
    dims = []
    for d in shape:
        if isinstance(d, bool):
            raise TypeError(f"shape must hold ints, got {shape!r}")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(f"shape must hold ints, got {shape!r}") from None
        if d < 0:
            raise InvalidValueError(f"shape must hold non-negative sizes, got {tuple(shape)!r}")
        dims.append(d)
    if math.prod(dims) > 4 * _LIMIT32:
        raise InvalidValueError(f"shape {tuple(dims)} has {math.prod(dims)} elements per sample; at most 2**34 fit "
                                f"the 32-bit block counter")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return seed, step, tuple(dims)


def counter_normal(seed: int, indices: torch.Tensor, step: int, shape: Sequence[int], *,
                   device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise for the samples ``indices`` at ``step``, each a pure function of ``(seed, index,
    step)``: the same whatever batch, order or process the sample is drawn in.

    Element ``e`` (row-major, within one sample) of sample ``i`` takes word ``e % 4`` of the Philox4x32-10 block
    with counter ``(e // 4, i, step, stream tag)`` and key derived from ``seed`` (module docstring). The block's
    four words become four uniforms in (0, 1) and those two Box-Muller pairs (Box & Muller 1958; both outputs
    used): ``z = sqrt(-2 ln u1) * (cos(2 pi u2), sin(2 pi u2))``. The arithmetic is float32 on ``device`` whatever
    ``dtype`` is, then cast, so the bits do not depend on the output dtype. An element's value does not depend on
    ``shape`` either, only on its flat position. CPU and CUDA give identical integers; the normals agree to float32
    rounding of ``log``/``cos``/``sin`` (a few ulp).

    Args:
        seed: any int; reduced mod 2**64 (so ``-1`` and ``2**64 - 1`` are the same seed).
        indices: (B,) integer tensor of sample indices in [0, 2**32), on any device.
        step: the timestep (or any other per-draw counter) in [0, 2**32).
        shape: the per-sample shape, non-negative ints, at most 2**34 elements.
        device: where the noise is computed and returned.
        dtype: a floating dtype of the result.

    Returns:
        (B, *shape) tensor of ``dtype`` on ``device``.

    Raises:
        TypeError: an argument of the wrong type (the message names it).
        InvalidValueError (a ``ValueError``): an index or step outside [0, 2**32), a negative size, too many
            elements, or ``indices`` not 1-D.
    """
    seed, step, shape = _check(seed, indices, step, shape, dtype)
    device = torch.device(device)
    numel = math.prod(shape)
    batch = indices.shape[0]
    if batch == 0 or numel == 0:
        return torch.empty((batch, *shape), device=device, dtype=dtype)
    k0, k1 = _key_from_seed(seed)
    num_blocks = -(-numel // 4)
    c0 = torch.arange(num_blocks, device=device, dtype=torch.int64)  # (N/4,)
    c1 = indices.to(device=device, dtype=torch.int64)[:, None]  # (B, 1)
    words = _philox4x32_10(c0, c1, step, _STREAM, k0, k1)  # (4, B, N/4)
    u = _uniform(words)  # (4, B, N/4)
    radius = torch.log(u[0::2]).mul_(-2.0).sqrt_()  # (2, B, N/4): Box-Muller pairs (x0, x1) and (x2, x3)
    angle = u[1::2].mul_(2.0 * math.pi)  # (2, B, N/4)
    # cos and sin into contiguous halves (writing them straight into the interleaved layout is strided and ~10x
    # slower on a CPU), then one copy interleaves them
    z = torch.empty((2, 2, batch, num_blocks), device=device, dtype=torch.float32)  # (cos/sin, pair, B, N/4)
    torch.cos(angle, out=z[0])
    torch.sin(angle, out=z[1])
    z *= radius
    z = z.permute(2, 3, 1, 0)  # (B, N/4, 2, 2): element 4j + 2p + s is pair p's cos (s = 0) or sin (s = 1)
    return z.reshape(batch, 4 * num_blocks)[:, :numel].reshape(batch, *shape).to(dtype)

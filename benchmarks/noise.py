"""Time per call of per-sample DDPM noise: the sampler's current way (one CPU ``torch.Generator`` per sample, a
``randn`` each, stacked and copied to the device) against ``counter_normal`` (Philox4x32-10 for the whole batch in
one call on the device), side by side in rounds (so a busy spell slows both alike). Reported as milliseconds per
call (median over rounds) and as the ratio generators / counter (above 1: ``counter_normal`` is faster).

Both draw noise whose sample ``i`` depends on ``(seed, i)`` only; the numbers differ (different generators), so this
compares cost, not values. Defaults: batch 64 and the FPDM-XL/2 latent shape (4, 32, 32), on the GPU when there is
one. ``counter_normal`` gets its indices as a CPU tensor, the cheap way (its index check reads them on the host).

    python benchmarks/noise.py                  # batch 64, (4, 32, 32), 7 rounds
    python benchmarks/noise.py --device cpu
    python benchmarks/noise.py --tiny           # smoke test, well under a second

Timings are informative only: nothing asserts on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import _common
from fixedpoint_diffusion._runtime import seed_from
from fixedpoint_diffusion.noise import counter_normal


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, inner: int) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32], help="per-sample shape")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=20, help="calls per method per round")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="batch 4, shape (4, 8, 8), 2 rounds of 2 calls")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/noise.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.shape, args.rounds, args.inner = 4, [4, 8, 8], 2, 2
    for name in ("batch", "rounds", "inner"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(d < 1 for d in args.shape):
        p.error(f"--shape sizes must be >= 1, got {args.shape}")
    device = _common.default_device(args.device)
    shape, seed = tuple(args.shape), 0
    indices = torch.arange(args.batch)
    # As in the sampler: the generators are made once per batch, then drawn from at every timestep.
    gens = [torch.Generator().manual_seed(seed_from(seed, 3, int(i))) for i in indices]
    step = iter(range(2**31))

    methods = {
        "per-sample generators": lambda: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device),
        "counter_normal": lambda: counter_normal(seed, indices, next(step), shape, device=device),
    }
    for fn in methods.values():  # warm-up: lazy CUDA init, allocator, first-call dispatch
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(_time(fn, device, args.inner))

    record = _common.environment("benchmarks/noise.py", argv, device)
    record.update(batch=args.batch, shape=list(shape), rounds=args.rounds, inner=args.inner)
    medians = {name: statistics.median(t) for name, t in times.items()}
    record["rows"] = [{"method": name, "median_ms": 1e3 * medians[name], "ms": [1e3 * s for s in t]}
                      for name, t in times.items()]
    record["ratio_generators_over_counter"] = medians["per-sample generators"] / medians["counter_normal"]
    print(f"batch {args.batch}, shape {shape}, {record['device_name']}")
    print("| method | median ms per call |")
    print("|---|---:|")
    for row in record["rows"]:
        print(f"| {row['method']} | {row['median_ms']:.3f} |")
    print(f"generators / counter_normal: {record['ratio_generators_over_counter']:.2f}x")
    _common.write(record, args.out)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

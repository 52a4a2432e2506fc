"""Sampling throughput of FPDM against DiT at equal block budgets, and how much of the device's matrix-multiply peak
it reaches.

For each model and budget (transformer-block passes per image, the paper's unit), ``fixedpoint_diffusion.sample``
runs the whole sampling loop (DDIM, fixed-step fixed-point solves with solution reuse, no guidance) on a batch of
class labels, after a warm-up call. Reported per row:

* ``images_per_s`` and its ratio to DiT's at the same budget;
* ``tflops``: achieved model FLOP/s, 2 x the multiply-accumulates the model reports for the call (attention
  included) over the wall time;
* ``utilisation``: that over the device's measured peak, the best of several large square matrix multiplies in
  the same dtype, timed in the same run (not the datasheet figure);
* ``denoiser_fraction``: the time of the same model forwards called back to back without the sampler (the
  scheduler arithmetic, per-sample noise generators, reuse bookkeeping) over the sampling time. 1.0 means the
  sampler adds nothing.

Defaults on CUDA: FPDM-XL/2 (8 fixed-point iterations per timestep) and DiT-XL/2 at 256 px (32x32x4 latents),
budgets 140/280/560, batch 256, bf16 autocast. On CPU (or with ``--tiny``): the S/2 models on 8x8x4 latents at
batch 8 and budgets 24/48.

    python benchmarks/sampling.py                   # CUDA: the paper's setting
    python benchmarks/sampling.py --compile         # blocks compiled with torch.compile
    python benchmarks/sampling.py --tiny            # CPU smoke test, seconds

Timings are informative only: nothing asserts on them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

import _common
import fixedpoint_diffusion as fd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of ``size x size`` matrix multiplies in ``dtype`` (2 size^3 FLOPs each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: ``--samplers`` variants: (sampler, noise). DDPM draws fresh noise at every timestep, from per-sample CPU generators
#: (the default) or from ``counter_normal`` on the device.
SAMPLERS = {"ddim": ("ddim", "generators"), "ddpm": ("ddpm", "generators"), "ddpm-counter": ("ddpm", "counter")}


def bench(name: str, model: torch.nn.Module, budget: int, args, device: torch.device, dtype: torch.dtype,
          variant: str = "ddim") -> dict:
    fpdm = isinstance(model, fd.FPDM)
    schedule = fd.plan(model, budget=budget, iterations_per_timestep=args.iters if fpdm else None)
    labels = torch.arange(args.batch) % model.config.num_classes
    diffusion = fd.Diffusion(learn_sigma=model.config.learn_sigma)
    sampler, noise = SAMPLERS[variant]

    def run():
        with _autocast(device, dtype):
            return fd.sample(model, labels, diffusion=diffusion, schedule=schedule, sampler=sampler, noise=noise,
                             reuse=True, device=device, compile=args.compile)  # eager unless --compile

    run()  # warm-up (and compilation)
    times, out = [], None
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        out = run()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = min(times)

    # The same model calls without the sampler: one forward per timestep at the schedule's iteration counts.
    x = torch.randn(args.batch, model.config.in_channels, model.config.input_size, model.config.input_size,
                    device=device)
    y = labels.to(device)
    t = torch.full((args.batch,), 500, device=device, dtype=torch.long)

    def forwards():
        with torch.no_grad(), _autocast(device, dtype):
            for k in (schedule.iterations or [None] * schedule.num_timesteps):
                model(x, t, y, num_iterations=k) if fpdm else model(x, t, y)

    forwards()
    bare = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        forwards()
        _sync(device)
        bare.append(time.perf_counter() - start)
    flops = 2 * out.macs
    return {"model": name, "sampler": variant, "budget": budget, "num_steps": schedule.num_timesteps,
            "iters_per_step": args.iters if fpdm else None, "block_passes": out.block_passes,
            "batch": args.batch, "seconds": seconds, "images_per_s": args.batch / seconds,
            "gflop_per_image": flops / args.batch / 1e9, "tflops": flops / seconds / 1e12,
            "denoiser_fraction": min(bare) / seconds}


def plot(record: dict, out: Path) -> Path:
    plt = _common.pyplot()
    rows = record["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    budgets = sorted({r["budget"] for r in rows})
    several = len({r.get("sampler", "ddim") for r in rows}) > 1
    def label(r: dict) -> str:
        return f"{r['model']} {r.get('sampler', 'ddim')}" if several else r["model"]

    models = list(dict.fromkeys(label(r) for r in rows))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        by_budget = {r["budget"]: r for r in rows if label(r) == model}
        xs = [j + i * width for j in range(len(budgets))]
        axes[0].bar(xs, [by_budget[b]["images_per_s"] for b in budgets], width, label=model)
        axes[1].bar(xs, [100 * by_budget[b]["utilisation"] for b in budgets], width, label=model)
    for ax, label in ((axes[0], "images / s"), (axes[1], "% of measured matmul peak")):
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(budgets))], [str(b) for b in budgets])
        ax.set(xlabel="budget (block passes per image)", ylabel=label)
        ax.legend(fontsize=8)
    axes[0].set_title(f"Sampling throughput, batch {rows[0]['batch']}")
    axes[1].set_title(f"FLOP utilisation (peak {record['peak_tflops']:.1f} TFLOP/s)")
    return _common.save_figure(fig, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="default FPDM-XL/2 DiT-XL/2 (CPU: the S/2 models)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="default 140 280 560 (CPU: 24 48)")
    p.add_argument("--iters", type=int, default=8, help="FPDM fixed-point iterations per timestep")
    p.add_argument("--batch", type=int, default=None, help="default 256 (CPU: 8)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32 = 256 px; CPU: 8)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=["ddim"],
                   help="sampler variants timed side by side (ddpm-counter: DDPM with counter_normal noise)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = p.parse_args(argv)
    for name in ("iters", "batch", "latent", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.tiny or device.type != "cuda"
    args.models = args.models or (["FPDM-S/2", "DiT-S/2"] if small else ["FPDM-XL/2", "DiT-XL/2"])
    args.budgets = args.budgets or ([24, 48] if small else [140, 280, 560])
    args.batch = args.batch or (8 if small else 256)
    args.latent = args.latent or (8 if small else 32)
    args.repeats = 1 if args.tiny else args.repeats
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, dtype, 256 if args.tiny else (8192 if device.type == "cuda" else 1024))
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = fd.create_model(name, input_size=args.latent).to(device).eval()
        if args.compile:
            model.compile_blocks()
        for budget in args.budgets:
            for variant in args.samplers:
                row = bench(name, model, budget, args, device, dtype, variant)
                row["utilisation"] = row["tflops"] * 1e12 / peak
                rows.append(row)
        del model
    for row in rows:
        base = next((r for r in rows if r["model"].startswith("DiT") and r["budget"] == row["budget"]
                     and r["sampler"] == row["sampler"]), None)
        row["throughput_vs_dit"] = row["images_per_s"] / base["images_per_s"] if base else None
        ddim = next((r for r in rows if r["model"] == row["model"] and r["budget"] == row["budget"]
                     and r["sampler"] == "ddim"), None)
        row["throughput_vs_ddim"] = row["images_per_s"] / ddim["images_per_s"] if ddim else None
    record = _common.environment("benchmarks/sampling.py", argv, device)
    record.update(dtype=str(dtype).replace("torch.", ""), peak_tflops=peak / 1e12,
                  settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, rows=rows)
    print(f"{record['device_name']}; {record['dtype']}; measured matmul peak {peak / 1e12:.2f} TFLOP/s; "
          f"{record['date']}")
    print("| model | sampler | budget | steps | k | images/s | x DiT | x DDIM | GFLOP/image | TFLOP/s | % of peak | "
          "denoiser share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        vs, vd = (f"{r[key]:.2f}" if r[key] is not None else "-" for key in ("throughput_vs_dit", "throughput_vs_ddim"))
        print(f"| {r['model']} | {r['sampler']} | {r['budget']} | {r['num_steps']} | {r['iters_per_step'] or '-'} | "
              f"{r['images_per_s']:.2f} | {vs} | {vd} | {r['gflop_per_image']:.1f} | {r['tflops']:.3f} | "
              f"{100 * r['utilisation']:.1f} | {r['denoiser_fraction']:.2f} |")
    _common.write(record, args.out)
    figure = plot(record, args.out)
    print(f"wrote {args.out} and {figure}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

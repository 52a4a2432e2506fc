"""Training cost of FPDM against DiT, side by side in one run: parameters, peak memory, step time, forward MACs.

Each model runs the real training step of ``fixedpoint_diffusion.train`` (the loss module the trainer wraps in
DDP, AdamW, the EMA update) on random latents, with the same seeded draws for every model (timesteps, noise,
label dropout and FPDM's stochastic-JFB step counts). Reported per model:

* ``params``: parameter count;
* ``peak_mib``: peak CUDA memory allocated during the timed steps (CUDA only) and ``saved_mib``: activation bytes
  autograd saves for backward in one training forward (once per storage, parameters excluded, mean over the timed
  steps' draws; any device), the part of training memory the backward mode decides;
* ``step_ms``: mean wall time of a full optimizer step over the timed steps (after warm-up), and its ratio to
  DiT's;
* ``fwd_gmacs``: forward multiply-accumulates per step (the model's own count; FPDM's varies with the draws, the
  mean is given).

Defaults (CUDA): FPDM-XL/2 and DiT-XL/2, batch 64, 256px images -> 32x32x4 latents, bf16 autocast, the paper's
M = N = 12 stochastic JFB. ``--tiny`` (and any CPU run) uses S-size models on 8x8x4 latents at batch 8. The paper
reports 10.2 GB vs 25.2 GB training memory at batch 64 (FPDM at 40% of DiT).

    python benchmarks/training.py                 # CUDA: XL/2 at batch 64
    python benchmarks/training.py --tiny          # CPU smoke test, a few seconds
    python benchmarks/training.py --models FPDM-B/2 DiT-B/2 --batch 32 --steps 20

Timings are informative only: nothing asserts on them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import fixedpoint_diffusion as fd
from fixedpoint_diffusion.train import Objective


def _saved_bytes(objective, batch) -> int:
    """Bytes of activations autograd saves in one training forward (parameter storages excluded)."""
    params = {p.untyped_storage().data_ptr() for p in objective.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective(*batch)[0]
    del loss
    return sum(seen.values())


def bench_model(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    overrides = {"input_size": args.latent, "in_channels": 4, "num_classes": 1000}
    if name.startswith("FPDM"):
        overrides["backward"] = {"name": "stochastic_jfb", "max_no_grad": args.max_no_grad,
                                 "max_with_grad": args.max_with_grad}
    model = fd.create_model(name, **overrides).to(device)
    ema = fd.create_model(name, **overrides).to(device).requires_grad_(False)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    if args.compile:
        for module in model.modules():
            if type(module).__name__ == "DiTBlock":
                module.compile()
    autocast = torch.bfloat16 if args.bf16 else None
    diffusion = fd.Diffusion().to(device)
    objective = Objective(model, diffusion, autocast, device.type)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    B = args.batch

    def batch(step):
        g = torch.Generator().manual_seed(1000 + step)
        x0 = torch.randn(B, 4, args.latent, args.latent, generator=g).to(device)
        y = torch.randint(0, 1000, (B,), generator=g).to(device)
        t = torch.randint(0, 1000, (B,), generator=g).to(device)
        eps = torch.randn(B, 4, args.latent, args.latent, generator=g).to(device)
        drop = (torch.rand(B, generator=g) < 0.1).to(device)
        generator = torch.Generator().manual_seed(2000 + step) if isinstance(model, fd.FPDM) else None
        return x0, y, t, eps, drop, generator

    def step(i):
        loss = objective(*batch(i))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    macs = []  # the training-mode forward (grad enabled: the backward mode decides the step counts)
    for i in range(args.warmup, args.warmup + args.steps):
        x0, y, t, eps, _, generator = batch(i)
        kwargs = {} if generator is None else {"generator": generator}  # the step's stochastic-JFB draws
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            macs.append(model(diffusion.q_sample(x0, t, eps), t, y, **kwargs).cost.macs)
    saved = sum(_saved_bytes(objective, batch(i)) for i in range(args.warmup, args.warmup + args.steps)) / args.steps
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * step_s,
            "peak_mib": peak / 2**20 if peak is not None else None, "saved_mib": saved / 2**20,
            "fwd_gmacs": sum(macs) / len(macs) / 1e9}


def plot(result: dict, out: Path) -> Path:
    """Each model's step time, activation memory, peak memory and parameters as ratios to DiT's."""
    from _common import pyplot, save_figure

    plt = pyplot()
    rows = result["rows"]
    base = next((r for r in rows if r["model"].startswith("DiT")), rows[0])
    keys = [("step_ms", "step time"), ("saved_mib", "activations saved"), ("peak_mib", "peak memory"),
            ("params", "parameters")]
    keys = [(k, label) for k, label in keys if base[k]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(keys))], [r[k] / base[k] for k, _ in keys], width, label=r["model"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], [label for _, label in keys])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(ylabel=f"ratio to {base['model']}", title=f"Training step, batch {result['settings']['batch']}")
    ax.legend()
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--latent", type=int, default=None, help="latent side (32 for 256px images)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--max-no-grad", type=int, default=12)
    parser.add_argument("--max-with-grad", type=int, default=12)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="benchmarks/results/training.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.tiny or device.type != "cuda"
    args.models = args.models or (["FPDM-S/2", "DiT-S/2"] if small else ["FPDM-XL/2", "DiT-XL/2"])
    args.batch = args.batch or (8 if small else 64)
    args.latent = args.latent or (8 if small else 32)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.bf16 = (device.type == "cuda") if args.bf16 is None else args.bf16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = [bench_model(name, args, device) for name in args.models]
    base = next((r for r in rows if r["model"].startswith("DiT")), None)
    print("| model | params | step ms | x DiT | peak MiB | x DiT | saved-for-backward MiB | x DiT | fwd GMACs |")
    print("|---|---|---|---|---|---|---|---|---|")
    def ratio(r, key):
        return f"{r[key] / base[key]:.2f}" if base and r[key] is not None and base[key] else "-"

    for r in rows:

        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {r['model']} | {r['params']:,} | {r['step_ms']:.1f} | {ratio(r, 'step_ms')} | {peak} | "
              f"{ratio(r, 'peak_mib')} | {r['saved_mib']:.1f} | {ratio(r, 'saved_mib')} | {r['fwd_gmacs']:.2f} |")
    result = {"benchmark": "training", "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/training.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "torch": torch.__version__,
              "fixedpoint": importlib.metadata.version("fixedpoint"), "threads": torch.get_num_threads(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} and {plot(result, out)}")
    return result


if __name__ == "__main__":
    main()

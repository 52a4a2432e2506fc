"""Training cost of FPDM against DiT, side by side in one run: parameters, peak memory, step time, forward MACs.

Each model runs the real training step of ``fixedpoint_diffusion.training`` (the loss module the trainer wraps in
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
import tempfile
import time
from pathlib import Path

import torch

import _common
import fixedpoint_diffusion as fd
from fixedpoint_diffusion.training import fetch_batch


class RandomLatents(torch.utils.data.Dataset):
    """``size`` seeded random latents (C, H, W) with labels in [0, 1000): the shape of ImageNet-256 latents."""

    num_classes = 1000

    def __init__(self, size: int, latent: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, latent, latent, generator=g)
        self.y = torch.randint(0, self.num_classes, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

    def __getitems__(self, indices):
        return self.x[indices], self.y[indices]


def _config(name: str, args, out_dir: str) -> fd.Config:
    model = {"name": name, "input_size": args.latent, "in_channels": 4, "num_classes": 1000}
    if name.startswith("FPDM"):
        model["backward"] = {"name": "stochastic_jfb", "max_no_grad": args.max_no_grad,
                             "max_with_grad": args.max_with_grad}
    return fd.load_config({
        "model": model, "data": {"kind": "shapes", "hflip": False},
        "train": {"global_batch_size": args.batch, "max_steps": args.warmup + args.steps, "lr": 1e-4,
                  "mixed_precision": "bf16" if args.bf16 else "no", "compile": args.compile,
                  "gradient_checkpointing": args.checkpointing, "out_dir": out_dir, "tracker": "none"}})


def bench_model(name: str, args, device: torch.device) -> dict:
    """The trainer's own step (:meth:`fixedpoint_diffusion.Trainer.train_step`: objective, backward, AdamW, EMA)
    on random latents; the same seeded draws for every model."""
    data = RandomLatents(args.batch * (args.warmup + args.steps), args.latent)
    with tempfile.TemporaryDirectory() as out_dir:  # nothing is written: no checkpoint is saved
        trainer = fd.Trainer(_config(name, args, out_dir), device=device, progress=False, dataset=data)
        trainer.setup()
        model = trainer.model

        def batch(i):
            return fetch_batch(data, range(i * args.batch, (i + 1) * args.batch))

        for i in range(args.warmup):
            trainer.train_step(*batch(i), i)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            trainer.train_step(*batch(i), i)
        sync()
        step_s = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        # Activations saved for backward, measured inside real steps (same memory as a timed step), then the
        # forward MACs of each step's draws from the model's own count.
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved, macs = [], []
        for i in range(args.warmup, args.warmup + args.steps):
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            costs = []
            handle = model.register_forward_hook(lambda m, inp, out, costs=costs: costs.append(out.cost.macs))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer.train_step(*batch(i), i)
            handle.remove()
            saved.append(sum(seen.values()))
            macs.append(costs[0])
        del trainer
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "step_ms": 1e3 * step_s,
            "peak_mib": peak / 2**20 if peak is not None else None, "saved_mib": sum(saved) / len(saved) / 2**20,
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
    result = _common.environment("benchmarks/training.py", argv, device)
    result.update(benchmark="training", threads=torch.get_num_threads(),
                  settings={k: v for k, v in vars(args).items() if k not in ("out",)}, rows=rows)
    out = _common.write(result, args.out)
    print(f"wrote {out} and {plot(result, out)}")
    return result


if __name__ == "__main__":
    main()

"""The shape of the paper's quality results at small scale: FPDM vs DiT across sampling budgets (Table 1), timestep
smoothing (Fig. 4), solution reuse (Fig. 6a) and the training backward mode (Table 5).

Protocol:

1. Train, on the embedded Shapes dataset (16x16 RGB, 8 classes), for the same training compute each
   (``fixedpoint_diffusion.experiment.train_equal_compute``: steps = multiply-accumulates allowed / the model's
   training MACs per step, so the same seed trains the same steps on any machine):

   * ``FPDM S-JFB``: the ``shapes-fpdm`` config of the shipped pair (FPDM-S/2 at width 96: 1 pre block, the
     fixed-point block, 1 post block; stochastic JFB with n ~ U[0, 2] no-grad and m ~ U[1, 2] with-grad steps);
   * ``DiT``: the ``shapes-dit`` config (6 blocks of the same width);
   * ``FPDM JFB``: the same FPDM trained with 2 no-grad steps and a 1-step gradient;
   * ``FPDM multi-step JFB``: 2 no-grad steps and a 2-step gradient.

2. Score each model's EMA weights with the scoring protocol of ``fpdm demo``
   (``fixedpoint_diffusion.experiment.score_settings``): the shipped Shapes classifier's Fréchet distance (FD) and
   KID against 2000 held-out real images, and its accuracy on the class-conditional samples, each with a 95%
   bootstrap interval. Every configuration samples the same classes from the same seeds (DDIM, eta = 0, no
   guidance).

Experiments (compute counted in transformer-block passes per image, the paper's footnote 4):

* ``budget``: FD against the budget for DiT and for FPDM at several fixed-point iterations per timestep k;
* ``smoothing``: at one budget, FPDM across k (the number of timesteps is budget // (2 + k));
* ``reuse``: the same with each timestep's solve started from the pre-blocks' output instead of the previous
  solution;
* ``backward``: the three FPDM training backward modes at that budget.

    python benchmarks/quality.py                  # the documented run: 2.5e13 training MACs per model
    python benchmarks/quality.py --tiny           # smoke test at a toy size (about half a minute)

Training runs are kept under ``--work`` (default ``benchmarks/results/quality-runs``) and resumed by a rerun, so
an interrupted run continues. The JSON goes to ``--out`` and the four-panel figure next to it.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

import _common
import fixedpoint_diffusion as fd
from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.experiment import MICRO_MODEL, Scorer, Setting, score_settings, train_equal_compute


def make_configs(args) -> dict[str, fd.Config]:
    """The four training runs (see the module docstring)."""
    work = Path(args.work)
    if args.tiny:  # a toy size: 8x8 images, width 32 (the test suite's micro config)
        base_model = MICRO_MODEL
        fpdm_raw = {"model": {"name": "FPDM-S/2", **base_model,
                              "backward": {"name": "stochastic_jfb", "max_no_grad": 2, "max_with_grad": 2}},
                    "data": {"kind": "shapes", "image_size": 8, "num_samples": 256},
                    "train": {"global_batch_size": 16, "lr": 1e-3, "log_every": 10}}
        dit_raw = copy.deepcopy(fpdm_raw)
        dit_raw["model"] = {"name": "DiT-S/2", **base_model, "depth": 4}
        n = 2
    else:
        fpdm_raw, dit_raw, n = "shapes-fpdm", "shapes-dit", 2  # the shipped pair's configs and recipe
    seed = [f"train.seed={args.seed}"]
    configs = {
        "FPDM S-JFB": fd.load_config(fpdm_raw, seed + [f"train.out_dir={work / 'fpdm-sjfb'}"]),
        "DiT": fd.load_config(dit_raw, seed + [f"train.out_dir={work / 'dit'}"]),
        "FPDM JFB": fd.load_config(fpdm_raw, seed + [f"train.out_dir={work / 'fpdm-jfb'}", 'model.backward="jfb"',
                                                     "model.backward.steps=1", f"model.max_steps={n}"]),
        "FPDM multi-step JFB": fd.load_config(fpdm_raw, seed + [
            f"train.out_dir={work / 'fpdm-msjfb'}", 'model.backward="jfb"', f"model.backward.steps={n}",
            f"model.max_steps={n}"]),
    }
    return configs


def run(args) -> dict:
    configs = make_configs(args)
    summaries = train_equal_compute(configs, args.macs, device=args.device, progress=not args.quiet)
    image_size = next(iter(configs.values())).data.image_size
    if image_size == 16:  # the shipped classifier, as fpdm demo scores
        scorer = Scorer.from_classifier(pretrained.classifier(args.device), num_reference=args.reference,
                                        seed=args.seed)
    else:
        scorer = Scorer.build(image_size, args.work, num_reference=args.reference, seed=args.seed,
                              device=args.device, classifier_steps=20)
    models = {name: fd.load_model(cfg.train.out_dir, device=args.device) for name, cfg in configs.items()}
    plan: list[tuple[str, Setting]] = []
    for budget in args.budgets:
        plan.append(("budget", Setting("DiT", budget)))
        plan += [("budget", Setting("FPDM S-JFB", budget, k)) for k in args.budget_iters if budget // (2 + k) >= 1]
    fixed = args.budget_at
    for k in args.smoothing_iters:
        if fixed // (2 + k) >= 1:
            plan.append(("smoothing", Setting("FPDM S-JFB", fixed, k)))
            if k in args.reuse_iters:
                plan.append(("reuse", Setting("FPDM S-JFB", fixed, k, reuse=False)))
    plan += [("backward", Setting(model, fixed, k)) for model in ("FPDM JFB", "FPDM multi-step JFB")
             for k in args.backward_iters]
    unique = list({setting.key: setting for _, setting in plan}.values())  # sampled once, even if in two experiments

    def report(setting: Setting, row: dict) -> None:
        k_text = f"k={setting.iters_per_step:<2}" if setting.iters_per_step is not None else "    "
        print(f"  {setting.model:20} budget {setting.budget:4} {k_text} steps {row['num_steps']:3} "
              f"reuse {'on ' if setting.reuse else 'off'}  FD {row['fd']:8.3f} [{row['fd_ci'][0]:.2f}, "
              f"{row['fd_ci'][1]:.2f}]  acc {row['accuracy']:.3f}  ({row['seconds']:.1f} s)", flush=True)

    scored = score_settings(models, unique, scorer, num_samples=args.samples, seed=args.seed, device=args.device,
                            folder=args.work, on_result=report)
    rows = [{"experiment": experiment, "model": setting.model, "budget": setting.budget,
             "iters_per_step": setting.iters_per_step, "reuse": setting.reuse,
             **{k: v for k, v in scored[setting.key].items() if k not in ("features", "correct", "fd_resampled",
                                                                         "model", "budget", "iters_per_step",
                                                                         "reuse")}}
            for experiment, setting in plan]
    return {"training": {name: {"steps": s.step, "train_seconds": s.train_seconds, "macs": args.macs,
                                "final_loss": (s.last_metrics or {}).get("loss"),
                                "parameters": s.parameters} for name, s in summaries.items()},
            "classifier_accuracy": scorer.classifier.info.get("accuracy"), "rows": rows}


def plot(record: dict, out: Path) -> Path:
    plt = _common.pyplot()
    rows = record["rows"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    ax = axes[0]
    budget = [r for r in rows if r["experiment"] == "budget"]
    dit = sorted((r["budget"], r["fd"]) for r in budget if r["model"] == "DiT")
    ax.plot(*zip(*dit), "k--o", label="DiT")
    for k in sorted({r["iters_per_step"] for r in budget if r["iters_per_step"] is not None}):
        pts = sorted((r["budget"], r["fd"]) for r in budget if r["iters_per_step"] == k)
        ax.plot(*zip(*pts), "-o", label=f"FPDM, k={k}")
    ax.set(xscale="log", xlabel="block passes per image", ylabel="FD (small classifier)",
           title="Quality vs budget (Table 1)")
    ax.set_xticks(sorted({r["budget"] for r in budget}))
    ax.legend(fontsize=8)
    for ax, reuse, title in [(axes[1], True, "Timestep smoothing (Fig. 4)"), (axes[2], None, "Reuse (Fig. 6a)")]:
        on = sorted((r["iters_per_step"], r["fd"]) for r in rows if r["experiment"] == "smoothing")
        if on:
            ax.plot(*zip(*on), "-o", label="FPDM, reuse" if reuse is None else "FPDM")
        if reuse is None:
            off = sorted((r["iters_per_step"], r["fd"]) for r in rows if r["experiment"] == "reuse")
            if off:
                ax.plot(*zip(*off), "-s", label="FPDM, no reuse")
        dit_at = [r["fd"] for r in budget if r["model"] == "DiT" and on
                  and r["budget"] == next(x["budget"] for x in rows if x["experiment"] == "smoothing")]
        if dit_at:
            ax.axhline(dit_at[0], color="k", ls="--", label="DiT (same budget)")
        ax.set(xscale="log", xlabel="fixed-point iterations per timestep k", ylabel="FD", title=title)
        ax.set_xticks([k for k, _ in on])
        ax.legend(fontsize=8)
    ax = axes[3]
    at = record["settings"]["budget_at"]
    groups = {"FPDM S-JFB": [r for r in rows if r["model"] == "FPDM S-JFB" and r["budget"] == at and r["reuse"]]}
    for model in ("FPDM JFB", "FPDM multi-step JFB"):
        groups[model] = [r for r in rows if r["experiment"] == "backward" and r["model"] == model]
    ks = record["settings"]["backward_iters"]
    width = 0.8 / len(groups)
    for i, (model, group) in enumerate(groups.items()):
        values = [next((r["fd"] for r in group if r["iters_per_step"] == k), math.nan) for k in ks]
        ax.bar([j + i * width for j in range(len(ks))], values, width, label=model)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(ks))], [f"k={k}" for k in ks])
    ax.set(ylabel="FD", title=f"Training backward mode (Table 5), budget {at}")
    ax.legend(fontsize=8)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
    return _common.save_figure(fig, out)


def markdown(record: dict) -> str:
    lines = ["| experiment | model | budget | k | steps | reuse | FD [95% CI] | KID (x1e3) | accuracy [95% CI] |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['experiment']} | {r['model']} | {r['budget']} | {r['iters_per_step'] or '-'} | "
                     f"{r['num_steps']} | {'on' if r['reuse'] else 'off'} | {r['fd']:.3f} [{r['fd_ci'][0]:.2f}, "
                     f"{r['fd_ci'][1]:.2f}] | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['accuracy']:.3f} "
                     f"[{r['accuracy_ci'][0]:.2f}, {r['accuracy_ci'][1]:.2f}] |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--macs", type=float, default=None,
                   help="training multiply-accumulates per model (default 2.5e13, about 10 CPU minutes for the "
                        "DiT; tiny 2e9)")
    p.add_argument("--samples", type=int, default=None, help="samples per configuration (default 500; tiny 32)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--reference", type=int, default=2000, help="real images for the reference features")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="default 24 48 96 192")
    p.add_argument("--budget-iters", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--budget-at", type=int, default=None, help="the budget of the other experiments (default 96)")
    p.add_argument("--smoothing-iters", type=int, nargs="+", default=[1, 2, 3, 4, 6, 10, 14, 22])
    p.add_argument("--reuse-iters", type=int, nargs="+", default=[1, 2, 4, 10])
    p.add_argument("--backward-iters", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--work", default="benchmarks/results/quality-runs", help="training runs (resumed if present)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke test")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.tiny:
        args.macs = args.macs or 2e9
        args.samples = args.samples or 32
        args.budgets = args.budgets or [12, 24]
        args.budget_at = args.budget_at or 12
        args.reference = min(args.reference, 200)
        args.budget_iters, args.smoothing_iters, args.reuse_iters, args.backward_iters = [2], [1, 4], [1], [2]
    args.macs = args.macs or 2.5e13
    args.samples = args.samples or 500
    args.budgets = args.budgets or [24, 48, 96, 192]
    args.budget_at = args.budget_at or 96
    for name in ("macs", "samples", "batch_size", "reference", "budget_at"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.samples < 2:
        p.error("--samples must be at least 2 (KID needs 2 samples)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = _common.default_device(args.device)
    args.device = device
    record = _common.environment("benchmarks/quality.py", argv, device)
    result = run(args)
    record.update(settings={k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
                  **result)
    print(f"\n{record['device_name']}; {record['date']}; classifier test accuracy "
          f"{record['classifier_accuracy']:.3f}")
    print("training (equal compute): " + ", ".join(
        f"{name} {t['steps']} steps" for name, t in record["training"].items()))
    print(markdown(record))
    _common.write(record, args.out)
    figure = plot(record, args.out)
    print(f"wrote {args.out} and {figure}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

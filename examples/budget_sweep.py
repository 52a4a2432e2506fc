"""Sample one trained FPDM across compute budgets and allocation schedules, and see what each setting buys.

FPDM can spend a sampling budget (transformer-block passes per image, the paper's unit) in ways an explicit model
cannot (paper Sec. 3.3): fewer fixed-point iterations per timestep buy more timesteps (*timestep smoothing*), and
the iterations can be spread unevenly over the timesteps (*reallocation*). For every budget B, iterations per
timestep k and allocation, this script asks ``fixedpoint_diffusion.plan`` for the schedule
(``B // (pre + k + post)`` timesteps; ``constant`` gives each timestep k iterations, ``increasing``/``decreasing``
spread the whole remaining budget with linear weights towards the clean/noisy end, ``adaptive`` stops each
timestep once its relative residual is below ``--tol`` and carries what it did not use to the next one), samples
it with ``fixedpoint_diffusion.sample`` (with solution reuse, DDIM by default) and reports:

* the schedule: timesteps x iterations, and the block passes per image it allows and actually spent;
* the measured sampling time;
* the fixed-point residual Delta_t of every timestep (the last iteration's change relative to the state's norm,
  mean over the samples);
* with ``--score``: quality on the embedded Shapes data by the scoring protocol of ``fpdm demo``
  (``fixedpoint_diffusion.experiment``: the shipped classifier that stands in for Inception, the held-out real
  images): Fréchet distance (FD), KID and class accuracy, each with a 95% bootstrap interval.

The model is ``--model``, an EMA folder written by ``fpdm train`` (e.g. ``runs/tiny/ema``); without it, the
FPDM shipped with the package (``fixedpoint_diffusion.pretrained``, ``shapes-fpdm``); ``--tiny`` trains a micro
model into ``--work`` instead (``--train-steps`` steps, resumed if the folder already holds that run).
Results go to a JSON file (``--out``), a figure beside it (residual and quality against the budget, one
line per allocation and k) and a markdown table on stdout.

Measured (2026-12-01, before the shipped pair existed: the ``tiny`` config trained 600 steps, 128 samples per
setting, DDIM, seed 0; on 2 CPU cores shared with other jobs, torch on 1 thread):

* **Smoothing trades residual for timesteps.** At 96 passes (constant), k = 2, 4, 8 give 24, 16, 9 timesteps and
  a mean Delta_t of 0.071, 0.020 and 0.0017.
* **Reallocation moves the residual.** ``increasing`` ends with the smallest last-timestep Delta_t (1.2e-4 against
  2.7e-3 for ``constant`` at 96 passes, k = 8), ``decreasing`` with the largest (0.030). Of the three fixed
  allocations, ``constant`` has the lowest mean Delta_t for 8 of the 9 (budget, k) pairs (not at 96 passes,
  k = 2: 0.067 for ``decreasing`` against 0.071).
* **Adaptive** (``--tol 1e-2``) stopped early only where k = 8 let the residual reach the tolerance: 22 of 24,
  38 of 48 and 72 of 96 passes spent; at k = 2 and 4 it spent the whole budget.
* **Quality does not follow the budget on this small, briefly trained model.** Its samples are poor (class
  accuracy 0.21-0.24, chance 0.125). FD is best with the fewest timesteps (44.8 at 24 passes, k = 8, 2 timesteps)
  and worst with the most (63.0 at 96 passes, k = 2, 24 timesteps); the allocation moves FD by less than 0.5. The
  paper's quality claims are about a fully trained FPDM-XL/2; docs/benchmarks.md reports the same non-reproduction
  at small scale.
* **Time follows the block passes:** 1.7-3 s per setting at 24 passes, 7-12 s at 96 (128 images).

    python examples/budget_sweep.py --score                        # the shipped FPDM
    python examples/budget_sweep.py --model runs/tiny/ema --budgets 48 96 --iters 2 4 --score
    python examples/budget_sweep.py --tiny --score                 # a micro model, seconds (the test suite's run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fixedpoint_diffusion as fd
from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.evaluation import classifier_features, evaluate_samples, train_classifier
from fixedpoint_diffusion.experiment import HELD_OUT_SEED, MICRO_MODEL, Scorer, bootstrap
from fixedpoint_diffusion.pipeline import to_uint8
from fixedpoint_diffusion.runs import load_model
from fixedpoint_diffusion.sampling import ALLOCATIONS

# The micro model of --tiny: 8x8 images, width 32, the test suite's size (tests/micro.py).
MICRO_CONFIG: dict[str, Any] = {
    "model": {"name": "FPDM-S/2", **MICRO_MODEL,
              "backward": {"name": "stochastic_jfb", "max_no_grad": 2, "max_with_grad": 2}},
    "data": {"kind": "shapes", "image_size": 8, "num_samples": 256},
    "train": {"global_batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 10},
}


# ------------------------------------------------------------------------------------------------------ model ---

def trained_model(args: argparse.Namespace, device: torch.device) -> tuple[fd.FPDM, fd.Diffusion, dict | None]:
    """The model to sweep: ``--model``, the shipped ``shapes-fpdm``, or (``--tiny``) the micro config trained
    into ``--work``.

    Returns:
        ``(model in eval mode, its diffusion schedule, a training record or None)``.

    Raises:
        KeyboardInterrupt: training was stopped by Ctrl-C/SIGTERM (after writing a checkpoint; rerun to resume).
    """
    if args.model is not None:
        model, diffusion = load_model(args.model, device=device)
        return model, diffusion, None
    if not args.tiny:
        model, diffusion = pretrained.load("shapes-fpdm", device=device)
        return model, diffusion, {"shipped": "shapes-fpdm", **{k: pretrained.provenance("shapes-fpdm").get(k)
                                                              for k in ("steps", "training_macs", "command")}}
    run_dir = Path(args.work) / "micro"
    overrides = [f"train.max_steps={args.train_steps}", f"train.seed={args.seed}", f"train.out_dir={run_dir}",
                 f"train.checkpoint_every={args.train_steps}"]
    config = fd.load_config(MICRO_CONFIG, overrides)
    resume = fd.latest_checkpoint(run_dir) is not None  # a finished run resumes to no steps at all
    print(f"training the micro model for {args.train_steps} steps into {run_dir}{' (resumed)' if resume else ''}",
          flush=True)
    summary = fd.train(config, resume=resume, device=device, progress=False)
    if summary.interrupted:
        raise KeyboardInterrupt(f"training was interrupted at step {summary.step}; run again to resume")
    training = {"run_dir": str(run_dir), "steps": summary.step, "train_seconds": summary.train_seconds,
                "final_loss": (summary.last_metrics or {}).get("loss")}
    model, diffusion = load_model(run_dir, device=device)
    return model, diffusion, training


def build_scorer(args: argparse.Namespace, image_size: int, device: torch.device) -> Scorer:
    """The scoring protocol of ``fpdm demo``: the shipped classifier and 2000 held-out real images at 16 px; at
    ``--tiny`` (8 px) a few classifier steps on a small training set, enough to exercise the metrics."""
    if image_size == 16:
        return Scorer.from_classifier(pretrained.classifier(device), seed=args.seed)
    if not args.tiny:
        return Scorer.build(image_size, args.work, seed=args.seed, device=device)
    classifier, _ = train_classifier(image_size, steps=10, batch_size=64, num_train=640, num_test=128,
                                     seed=args.seed, device=device)
    real = fd.Shapes(128, image_size, seed=HELD_OUT_SEED + args.seed)  # neither training nor classifier data
    reference, _ = classifier_features(classifier, to_uint8(real.images))
    return Scorer(classifier, reference)


# ------------------------------------------------------------------------------------------------------ sweep ---

def run_setting(model: fd.FPDM, diffusion: fd.Diffusion, args: argparse.Namespace, device: torch.device,
                scorer: Scorer | None, budget: int, k: int, allocation: str) -> dict[str, Any]:
    """Sample ``--num-samples`` images (classes balanced) under one (budget, k, allocation) and measure them.

    Returns:
        One row of the JSON: the schedule, ``block_passes`` actually spent per image (the most any batch spent),
        ``seconds``, ``residuals`` (one mean Delta_t per timestep) and, when scored, ``fd``/``kid``/``accuracy``;
        or ``status="skipped"`` with the reason when the budget cannot buy one timestep of ``k`` iterations.
    """
    row: dict[str, Any] = {"budget": budget, "iters_per_step": k, "allocation": allocation}
    try:
        schedule = fd.plan(model, budget=budget, iterations_per_timestep=k, allocation=allocation, ratio=args.ratio,
                           tol=args.tol, num_train_timesteps=diffusion.num_timesteps)
    except ValueError as err:  # e.g. a budget too small for one timestep of this k: reported, not fatal
        return {**row, "status": "skipped", "reason": str(err)}
    labels = torch.arange(args.num_samples) % model.config.num_classes
    images, residuals, spent_passes, spent_iterations = [], [], [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for idx in fd.batches_for_rank(args.num_samples, args.batch_size):
        out = fd.sample(model, labels[idx.start:idx.stop], diffusion=diffusion, schedule=schedule,
                        sampler=args.sampler, reuse=args.reuse, seed=args.seed, indices=idx, device=device,
                        compile=False)  # timed per setting: a compilation would land in the first one
        images.append(out.samples)
        residuals.append(out.residuals)  # (timesteps, batch)
        spent_passes.append(out.block_passes)
        spent_iterations.append(out.iterations)
    sync()
    seconds = time.perf_counter() - start
    residual = torch.cat(residuals, 1).double().mean(1)  # (timesteps,): mean over all samples
    row.update(status="ok", num_steps=schedule.num_timesteps, timesteps=list(schedule.timesteps),
               iterations=list(schedule.iterations), explicit_passes=schedule.explicit_passes,
               planned_block_passes=schedule.block_passes, block_passes=max(spent_passes),
               mean_block_passes=float(np.mean(spent_passes)),
               # per timestep, the most any batch spent (adaptive batches may stop at different iterations)
               iterations_spent=[max(col) for col in zip(*spent_iterations)],
               seconds=seconds, images_per_s=args.num_samples / seconds, residuals=residual.tolist(),
               residual_mean=float(residual.mean()), residual_last=float(residual[-1]))
    if scorer is not None:
        uint8 = to_uint8(torch.cat(images))
        scores = evaluate_samples(uint8, labels.numpy(), scorer.classifier, scorer.reference, keep_features=True,
                                  kid_subsets=scorer.kid_subsets, kid_subset_size=min(1000, args.num_samples),
                                  seed=args.seed)
        intervals = bootstrap(scores["features"], scores["correct"], scorer.reference, seed=args.seed)
        row.update(fd=scores["fd"], kid=scores["kid"], kid_std=scores["kid_std"], accuracy=scores["accuracy"],
                   fd_ci=intervals["fd"], accuracy_ci=intervals["accuracy"])
    return row


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every (budget, k, allocation) of the arguments, in that order; see the module docstring."""
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available()
                                                                        else "cpu")
    model, diffusion, training = trained_model(args, device)
    diffusion.to(device)
    scorer = build_scorer(args, model.config.input_size, device) if args.score else None
    cfg = model.config
    record: dict[str, Any] = {
        "command": shlex.join(["python", "examples/budget_sweep.py", *args.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "model": {"class": type(model).__name__, "pre_depth": cfg.pre_depth, "post_depth": cfg.post_depth,
                  "hidden_size": cfg.hidden_size, "input_size": cfg.input_size,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "training": training,
        "classifier_accuracy": (getattr(scorer.classifier, "info", None) or {}).get("accuracy") if scorer else None,
        "rows": [],
    }
    for budget in args.budgets:
        for k in args.iters:
            for allocation in args.allocations:
                row = run_setting(model, diffusion, args, device, scorer, budget, k, allocation)
                record["rows"].append(row)
                print("  " + summary_line(row), flush=True)
    return record


# ---------------------------------------------------------------------------------------------------- reports ---

def _iterations_text(iterations: list[int]) -> str:
    if len(set(iterations)) == 1:
        return f"{len(iterations)} x {iterations[0]}"
    shown = iterations if len(iterations) <= 6 else [*iterations[:3], "...", *iterations[-3:]]
    return ",".join(str(i) for i in shown)


def summary_line(row: dict[str, Any]) -> str:
    head = f"budget {row['budget']:4} k={row['iters_per_step']:<2} {row['allocation']:10}"
    if row["status"] != "ok":
        return f"{head} skipped: {row['reason']}"
    text = (f"{head} {row['num_steps']:3} timesteps, {row['block_passes']:4} passes, {row['seconds']:6.2f} s, "
            f"mean Delta_t {row['residual_mean']:.3g}")
    if "fd" in row:
        text += f", FD {row['fd']:.3f}, KID {1e3 * row['kid']:.2f}e-3, acc {row['accuracy']:.3f}"
    return text


def markdown(record: dict[str, Any]) -> str:
    scored = any("fd" in r for r in record["rows"])
    head = "| budget | k | allocation | timesteps | iterations per timestep | passes spent / allowed | seconds | " \
           "mean Δ_t | last Δ_t |"
    rule = "|---:|---:|---|---:|---|---:|---:|---:|---:|"
    if scored:
        head += " FD | KID (x1e3) | accuracy |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in record["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['budget']} | {r['iters_per_step']} | {r['allocation']} | skipped: {r['reason']} |")
            continue
        line = (f"| {r['budget']} | {r['iters_per_step']} | {r['allocation']} | {r['num_steps']} | "
                f"{_iterations_text(r['iterations_spent'])} | {r['block_passes']} / {r['planned_block_passes']} | "
                f"{r['seconds']:.2f} | {r['residual_mean']:.3g} | {r['residual_last']:.3g} |")
        if scored:
            line += f" {r['fd']:.3f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f} | {r['accuracy']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> Path:
    """Mean Delta_t and (when scored) FD against the budget, and Delta_t per timestep at the largest budget; the
    colour is the allocation, the line style k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in record["rows"] if r["status"] == "ok"]
    scored = any("fd" in r for r in rows)
    panels = 3 if scored else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4))
    colours = dict(zip(ALLOCATIONS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    ks = sorted({r["iters_per_step"] for r in rows})
    styles = dict(zip(ks, ("-o", "--s", ":^", "-.v", "-D", "--x", ":P", "-.*")))
    budgets = sorted({r["budget"] for r in rows})
    metrics = [("residual_mean", r"mean $\Delta_t$ (relative)")] + ([("fd", "FD (small classifier)")] if scored
                                                                     else [])
    for ax, (key, label) in zip(axes, metrics):
        for allocation in record["settings"]["allocations"]:
            for k in ks:
                pts = sorted((r["budget"], r[key]) for r in rows if r["allocation"] == allocation
                             and r["iters_per_step"] == k)
                if pts:
                    ax.plot(*zip(*pts), styles.get(k, "-o"), color=colours[allocation], markersize=4)
        ax.set(xlabel="budget (block passes per image)", ylabel=label, xscale="log",
               yscale="log" if key == "residual_mean" else "linear")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
    ax = axes[-1]
    if rows:
        for r in (r for r in rows if r["budget"] == budgets[-1]):
            ax.plot(r["timesteps"], r["residuals"], styles.get(r["iters_per_step"], "-o"),
                    color=colours[r["allocation"]], markersize=3)
        ax.set(xlabel="timestep t", ylabel=r"$\Delta_t$", yscale="log", title=f"per timestep, budget {budgets[-1]}")
        ax.invert_xaxis()
    # One legend for the colours and one for the line styles, instead of one entry per (allocation, k) line.
    handles = [Line2D([], [], color=colours[a], lw=2, label=a) for a in record["settings"]["allocations"]]
    handles += [Line2D([], [], color="grey", linestyle=styles[k][:-1], marker=styles[k][-1], label=f"k={k}")
                for k in ks]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- main ---

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="an FPDM EMA folder written by fpdm train (default: the shipped "
                                                 "shapes-fpdm)")
    p.add_argument("--work", default="runs/budget-sweep", help="where the training run and classifier live")
    p.add_argument("--train-steps", type=int, default=None, help="--tiny: training steps of the micro model (8)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="block passes per image (24 48 96)")
    p.add_argument("--iters", type=int, nargs="+", default=None, help="iterations per timestep k (2 4 8)")
    p.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS))
    p.add_argument("--ratio", type=float, default=3.0, help="last/first weight of increasing/decreasing")
    p.add_argument("--tol", type=float, default=1e-2, help="adaptive: relative residual at which a timestep stops")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="start each timestep's solve from the previous solution")
    p.add_argument("--num-samples", type=int, default=None, help="samples per setting (128; tiny 8)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--score", action="store_true", help="FD, KID and accuracy with the small Shapes classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("runs/budget-sweep/budget_sweep.json"),
                   help="the JSON; the figure goes beside it (.png)")
    p.add_argument("--tiny", action="store_true", help="a micro model and few settings, for a smoke test")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.train_steps = args.train_steps or (8 if tiny else 600)
    args.budgets = args.budgets or ([8, 16] if tiny else [24, 48, 96])
    args.iters = args.iters or ([1, 2] if tiny else [2, 4, 8])
    args.num_samples = args.num_samples or (8 if tiny else 128)
    # Validated here, before any training or sampling.
    for name in ("train_steps", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("budgets", "iters"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            p.error(f"--{name} must be >= 1, got {bad}")
    if args.score and args.num_samples < 2:
        p.error(f"--num-samples must be >= 2 with --score (KID needs two samples), got {args.num_samples}")
    if not args.tol > 0:
        p.error(f"--tol must be > 0, got {args.tol}")
    if not args.ratio >= 1:
        p.error(f"--ratio must be >= 1, got {args.ratio}")
    if args.model is not None:
        config_file = Path(args.model) / "config.json"
        if not config_file.is_file():
            p.error(f"--model {args.model!r}: no config.json there (give a run's ema/ folder)")
        kind = json.loads(config_file.read_text()).get("_class_name")
        if kind != "FPDM":
            p.error(f"--model {args.model!r} holds a {kind}, not an FPDM (allocations need fixed-point iterations)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record = sweep(args)
    print()
    print(markdown(record))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    figure = plot(record, out.with_suffix(".png"))
    print(f"\nwrote {out} and {figure}")
    return record


if __name__ == "__main__":
    main()

"""``fpdm demo``: FPDM against a DiT baseline, end to end, on the embedded Shapes dataset.

The job a newcomer runs first. It

1. trains a small FPDM (the ``tiny`` config: 1 pre block, the fixed-point block, 1 post block; stochastic JFB)
   and a DiT of the same width (``tiny-dit``: 6 explicit blocks) for the same measured wall time each
   (:func:`~fixedpoint_diffusion.experiment.train_for`);
2. trains the small Shapes classifier that stands in for Inception
   (:class:`~fixedpoint_diffusion.experiment.Scorer`);
3. samples both models at several compute budgets (block passes per image, the paper's footnote 4): DiT with
   ``budget // depth`` timesteps, FPDM with timestep smoothing (``k`` fixed-point iterations per timestep, so
   ``budget // (2 + k)`` timesteps), with and without solution reuse, and scores every setting (Fréchet distance,
   KID and class accuracy of the small classifier's features);
4. writes a results folder: image grids per model and budget, quality against budget (the shape of the paper's
   Fig. 4), per-timestep fixed-point residuals with and without reuse (Fig. 6b), ``report.md`` and
   ``report.html`` tying them together, and ``results.json`` with every number.

Everything finished is kept in the folder: a rerun (after Ctrl-C, say) resumes training from the checkpoints
and skips the settings already scored. At this size a few CPU minutes leave both models undertrained, and the
report says so; it shows the machinery and the shape of the comparison, not the paper's numbers.
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._runtime import default_device
from .config import Config, load_config

__all__ = ["DemoSettings", "Setting", "run_demo"]

_FULL_MODEL = "tiny"
_FULL_DIT = "tiny-dit"
# The --quick models: 8x8 images, width 32 (the size of the test suite's micro config).
_QUICK_MODEL = {"input_size": 8, "in_channels": 3, "num_classes": 8, "hidden_size": 32, "num_heads": 2}


@dataclass(frozen=True)
class Setting:
    """One sampling configuration: a model at a budget, with ``k`` iterations per timestep (FPDM) and reuse."""

    model: str  # "FPDM" or "DiT"
    budget: int
    iters_per_step: int | None = None
    reuse: bool = True

    @property
    def key(self) -> str:
        if self.model == "DiT":
            return f"DiT-b{self.budget}"
        return f"FPDM-b{self.budget}-k{self.iters_per_step}-{'reuse' if self.reuse else 'noreuse'}"

    @property
    def label(self) -> str:
        if self.model == "DiT":
            return "DiT"
        return f"FPDM k={self.iters_per_step}" + ("" if self.reuse else ", no reuse")


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run does; stored in the results folder, and a rerun must ask for the same.

    Attributes:
        minutes: measured training wall time per model.
        budgets: block passes per image to sample at.
        iters: FPDM fixed-point iterations per timestep ``k`` to try at every budget (timestep smoothing).
        no_reuse_iters: the ``k`` also sampled without solution reuse.
        num_samples: images per setting (classes balanced).
        seed: seed of training, classifier and sampling.
        quick: the smoke-test size (8x8 images, width 32).
    """

    minutes: float
    budgets: tuple[int, ...]
    iters: tuple[int, ...]
    no_reuse_iters: tuple[int, ...]
    num_samples: int
    seed: int
    quick: bool
    classifier_steps: int
    num_reference: int

    @classmethod
    def default(cls, *, quick: bool = False, seed: int = 0, minutes: float | None = None,
                num_samples: int | None = None) -> DemoSettings:
        if quick:
            settings = cls(minutes=0.1, budgets=(12, 24), iters=(1, 2), no_reuse_iters=(1,), num_samples=64,
                           seed=seed, quick=True, classifier_steps=60, num_reference=256)
        else:
            settings = cls(minutes=2.5, budgets=(24, 48, 96), iters=(1, 2, 4), no_reuse_iters=(1, 2),
                           num_samples=400, seed=seed, quick=False, classifier_steps=400, num_reference=2000)
        changes = {k: v for k, v in (("minutes", minutes), ("num_samples", num_samples)) if v is not None}
        settings = settings.replace(**changes)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> DemoSettings:
        return DemoSettings(**{**asdict(self), **changes})

    def validate(self) -> None:
        if not (isinstance(self.minutes, (int, float)) and not isinstance(self.minutes, bool)
                and math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"minutes must be a finite number > 0, got {self.minutes!r}")
        if not (isinstance(self.num_samples, int) and self.num_samples >= 8):
            raise ValueError(f"num_samples must be an int >= 8 (one per class at least), got {self.num_samples!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name, minimum in (("budgets", 1), ("iters", 1), ("no_reuse_iters", 1)):
            values = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values) or (
                    name != "no_reuse_iters" and not values):
                raise ValueError(f"{name} must be a non-empty tuple of ints >= {minimum}, got {values!r}"
                                 if name != "no_reuse_iters" else f"{name} must hold ints >= 1, got {values!r}")
        for name in ("classifier_steps", "num_reference"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 2):
                raise ValueError(f"{name} must be an int >= 2, got {getattr(self, name)!r}")

    def settings(self) -> list[Setting]:
        """Every sampling setting, in the order they run (cheapest budget first)."""
        out = []
        for budget in self.budgets:
            out.append(Setting("DiT", budget))
            for k in self.iters:
                out.append(Setting("FPDM", budget, k, True))
            for k in self.no_reuse_iters:
                out.append(Setting("FPDM", budget, k, False))
        return out


def make_configs(settings: DemoSettings, work: Path) -> dict[str, Config]:
    """The FPDM and DiT training configs of a demo run, training into ``work/fpdm`` and ``work/dit``."""
    # A few CPU minutes are a few hundred steps. At the configs' lr 3e-4 both models still sampled pure noise after
    # ~400 steps; at 1e-3 the same steps give class-coloured shapes (measured on the tiny FPDM: classifier
    # accuracy of its samples 0.27 against 0.20). An EMA over ~100 steps, since the default 0.999 would still
    # carry most of the initial weights.
    common = [f"train.seed={settings.seed}", "train.lr=1e-3", "train.ema_decay=0.99", "train.log_every=25"]
    if settings.quick:
        fpdm_raw: Any = {"model": {"name": "FPDM-S/2", **_QUICK_MODEL, "max_no_grad": 2, "max_with_grad": 2},
                         "data": {"kind": "shapes", "image_size": 8, "num_samples": 512},
                         "train": {"global_batch_size": 32}}
        dit_raw: Any = copy.deepcopy(fpdm_raw)
        dit_raw["model"] = {"name": "DiT-S/2", **_QUICK_MODEL, "depth": 4}
    else:
        fpdm_raw, dit_raw = _FULL_MODEL, _FULL_DIT
    return {"FPDM": load_config(fpdm_raw, common + [f"train.out_dir={json.dumps(str(work / 'fpdm'))}"]),
            "DiT": load_config(dit_raw, common + [f"train.out_dir={json.dumps(str(work / 'dit'))}"])}


class _Clock:
    """Elapsed time and an estimate of what is left, printed between stages."""

    def __init__(self, quiet: bool) -> None:
        self.start = time.perf_counter()
        self.quiet = quiet

    @staticmethod
    def fmt(seconds: float) -> str:
        seconds = max(0, round(seconds))
        return f"{seconds // 60:d}:{seconds % 60:02d}"

    def say(self, message: str, remaining: float | None = None) -> None:
        if self.quiet:
            return
        left = "" if remaining is None else f", about {self.fmt(remaining)} left"
        print(f"[{self.fmt(time.perf_counter() - self.start)} elapsed{left}] {message}", flush=True)


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)


def run_demo(out: str | os.PathLike = "demo-results", *, settings: DemoSettings | None = None,
             device: torch.device | str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo into ``out`` and return the record also written to ``out/results.json``.

    Args:
        out: the results folder; created if missing. A folder holding a run with other settings is refused.
        settings: what to run (default: :meth:`DemoSettings.default`).
        device: where to train and sample (default: CUDA if available, else CPU).
        progress: progress bars and the elapsed/remaining-time lines.

    Raises:
        FileExistsError: ``out`` holds a demo run with different settings, or is a file.
        ValueError: bad settings.
        KeyboardInterrupt: training was stopped (Ctrl-C/SIGTERM) after writing its checkpoint; rerun to resume.
    """
    settings = settings or DemoSettings.default()
    settings.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "demo.json"
    stored = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    wanted = json.loads(json.dumps(asdict(settings)))
    if stored is not None and stored != wanted:
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise FileExistsError(
            f"out {str(out)!r} holds a demo run with other settings ({', '.join(f'{k}={stored.get(k)!r}' for k in differ)}"
            f"; asked for {', '.join(f'{k}={wanted.get(k)!r}' for k in differ)}); use another --out or the same "
            "options")
    _write_json_atomic(wanted, settings_file)
    device = default_device(device)
    threads = torch.get_num_threads()
    if settings.quick and device.type == "cpu":
        # The --quick models are so small that a second intra-op thread only adds synchronisation: one thread
        # ran their training steps 3-4x faster on a 2-core machine with other work on it.
        torch.set_num_threads(1)
    try:
        return _run(out, settings, wanted, device, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, settings: DemoSettings, wanted: dict[str, Any], device: torch.device,
         progress: bool) -> dict[str, Any]:
    from .experiment import Scorer, train_for
    from .pipeline import image_grid
    from .sample_cli import load_model

    clock = _Clock(quiet=not progress)
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    results_file = out / "results.json"
    results: dict[str, dict[str, Any]] = json.loads(results_file.read_text())["settings"] \
        if results_file.is_file() else {}

    # 1. Training, the same measured wall time for both models.
    configs = make_configs(settings, out / "runs")
    train_seconds = settings.minutes * 60 * len(configs)
    clock.say(f"training FPDM and DiT for {settings.minutes:g} measured minute(s) each on {device}",
              train_seconds + _sampling_guess(settings))
    plan, summaries = train_for(configs, settings.minutes, device=device, plan_file=out / "runs" / "plan.json",
                                progress=progress)

    # 2. The classifier standing in for Inception, and the real images' features.
    image_size = configs["FPDM"].data.image_size
    clock.say("classifier and reference features", _sampling_guess(settings))
    scorer = Scorer.build(image_size, out / "classifier", num_reference=settings.num_reference,
                          seed=settings.seed, classifier_steps=settings.classifier_steps, device=device,
                          progress=progress)
    models = {name: load_model(Path(cfg.train.out_dir) / "ema", device=device) for name, cfg in configs.items()}
    _save_png(image_grid(_real_by_class(image_size, settings.seed), columns=8, scale=_scale(image_size)),
              grids / "real.png")

    # 3. Sampling and scoring every setting not already done.
    todo = [s for s in settings.settings() if s.key not in results]
    per_pass = None  # seconds per block pass per image, measured on the first setting
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="sampling", disable=not progress, leave=False)
    for i, setting in enumerate(bar):
        remaining = (sum(s.budget for s in todo[i:]) * settings.num_samples * per_pass) if per_pass else None
        clock.say(f"sampling {setting.label} at budget {setting.budget}", remaining)
        bar.set_postfix_str(setting.key)
        net, diffusion = models[setting.model]
        score = scorer.score(net, diffusion, num_samples=settings.num_samples, batch_size=min(256,
                             settings.num_samples), seed=settings.seed, device=device, keep=64,
                             budget=setting.budget, iters_per_step=setting.iters_per_step, sampler="ddim",
                             reuse=setting.reuse)
        images = score.pop("images")
        _save_png(image_grid(images, columns=8, scale=_scale(image_size)), grids / f"{setting.key}.png")
        per_pass = score["seconds"] / (score["block_passes"] * settings.num_samples)
        results[setting.key] = {**asdict(setting), **score, "timesteps": _timesteps(net, setting)}
        _write_json_atomic({"settings": results}, results_file)  # a rerun skips what is here
    bar.close()

    record = {
        "settings": results,
        "demo": wanted,
        "device": str(device),
        "training": {name: {"steps": s.step, "train_seconds": s.train_seconds, "parameters": s.parameters,
                            "final_loss": (s.last_metrics or {}).get("loss"),
                            "seconds_per_step": plan.seconds_per_step[name]} for name, s in summaries.items()},
        "classifier_accuracy": scorer.classifier.info.get("accuracy"),
    }
    _write_json_atomic(record, results_file)

    # 4. Figures and the report.
    clock.say("figures and report")
    plot_quality(record, out / "quality_vs_budget.png")
    plot_reuse_residuals(record, out / "residuals_reuse.png")
    (out / "report.md").write_text(markdown_report(record))
    (out / "report.html").write_text(html_report(record))
    clock.say("done")
    return record


def _real_by_class(image_size: int, seed: int) -> np.ndarray:
    """64 held-out real images laid out like the sample grids: image ``i`` of class ``i % 8``."""
    from .data import Shapes
    from .pipeline import to_uint8

    real = Shapes(512, image_size, seed=3_000_017 + seed)
    order = torch.cat([torch.nonzero(real.labels == c).flatten()[:8] for c in range(8)])  # 8 of each class
    order = order.view(8, 8).T.reshape(-1)  # row r: the r-th image of classes 0..7
    return to_uint8(real.images[order])


def _scale(image_size: int) -> int:
    return max(1, 64 // image_size)  # grids stay readable: each tile at least 64 px


def _timesteps(model: Any, setting: Setting) -> list[int]:
    from .sampling import plan

    return list(plan(model, budget=setting.budget, iters_per_step=setting.iters_per_step).timesteps)


def _sampling_guess(settings: DemoSettings) -> float:
    """A rough upfront guess of the time after training: the classifier and the sampling, from the measured
    2-core run in docs/demo.md (41 s for the classifier and its features, 4e-4 s per block pass per image with
    scoring); refined once the first setting has been sampled."""
    classifier, per_pass = (5.0, 5e-5) if settings.quick else (41.0, 4e-4)
    return classifier + sum(s.budget for s in settings.settings()) * settings.num_samples * per_pass


# ----- figures -------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(record: dict[str, Any]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Rows grouped by label (DiT, FPDM k=.., FPDM k=.. no reuse), each sorted by budget."""
    curves: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for row in record["settings"].values():
        curves.setdefault(Setting(row["model"], row["budget"], row["iters_per_step"], row["reuse"]).label,
                          []).append((row["budget"], row))
    return {label: sorted(rows, key=lambda r: r[0]) for label, rows in sorted(curves.items())}


def plot_quality(record: dict[str, Any], path: Path) -> None:
    """FD and class accuracy against the budget for every model/setting (the shape of the paper's Fig. 4)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in _curves(record).items():
        style = "k--o" if label == "DiT" else ("-o" if "no reuse" not in label else ":s")
        budgets = [b for b, _ in rows]
        axes[0].plot(budgets, [r["fd"] for _, r in rows], style, label=label)
        axes[1].plot(budgets, [r["accuracy"] for _, r in rows], style, label=label)
    budgets = sorted({r["budget"] for r in record["settings"].values()})
    axes[0].set(xlabel="block passes per image (budget)", ylabel="FD, small classifier (lower is better)",
                title="Quality against compute")
    axes[1].set(xlabel="block passes per image (budget)", ylabel="class accuracy of samples (higher is better)",
                title="Samples classified as their class")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reuse_residuals(record: dict[str, Any], path: Path) -> None:
    """Per-timestep fixed-point residual with and without reuse (paper Fig. 6b), one panel per budget."""
    plt = _pyplot()
    pairs = _reuse_pairs(record)
    budgets = sorted({b for b, _ in pairs})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(4.2 * max(1, len(budgets)), 3.6), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for (b, k), (on, off) in sorted(pairs.items()):
            if b != budget:
                continue
            line, = ax.plot(on["timesteps"], on["residual"], "-o", ms=3, label=f"k={k}, reuse")
            ax.plot(off["timesteps"], off["residual"], ":s", ms=3, color=line.get_color(), label=f"k={k}, no reuse")
        ax.set(xlabel="timestep t", ylabel=r"last-step residual $\Delta_t$", yscale="log",
               title=f"budget {budget}")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _reuse_pairs(record: dict[str, Any]) -> dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]]:
    rows = record["settings"]
    pairs = {}
    for row in rows.values():
        if row["model"] == "FPDM" and not row["reuse"]:
            on = rows.get(Setting("FPDM", row["budget"], row["iters_per_step"], True).key)
            if on is not None:
                pairs[(row["budget"], row["iters_per_step"])] = (on, row)
    return pairs


# ----- report --------------------------------------------------------------------------------------------------


def _table_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in sorted(record["settings"].values(),
                      key=lambda r: (r["budget"], r["model"] != "DiT", r["iters_per_step"] or 0, not r["reuse"])):
        residual = row.get("residual")
        rows.append([str(row["budget"]), "DiT" if row["model"] == "DiT" else "FPDM",
                     "-" if row["iters_per_step"] is None else str(row["iters_per_step"]),
                     "-" if row["model"] == "DiT" else ("on" if row["reuse"] else "off"),
                     str(row["num_steps"]), str(row["block_passes"]), f"{row['fd']:.2f}",
                     f"{1e3 * row['kid']:.1f}", f"{row['accuracy']:.2f}",
                     "-" if not residual else f"{residual[-1]:.2e}", f"{row['seconds']:.1f}"])
    return rows


_HEADER = ["budget", "model", "k", "reuse", "timesteps", "block passes", "FD", "KID x1e3", "accuracy",
           "last residual", "seconds"]


def summary_table(record: dict[str, Any]) -> str:
    """The results as a markdown table (also printed at the end of a run)."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---:|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(record)]
    return "\n".join(lines)


def _findings(record: dict[str, Any]) -> list[str]:
    """Plain statements read off the numbers (no claim is written that the numbers do not support)."""
    rows = record["settings"]
    out = []
    for budget in sorted({r["budget"] for r in rows.values()}):
        dit = rows.get(Setting("DiT", budget).key)
        fpdm = [r for r in rows.values() if r["model"] == "FPDM" and r["budget"] == budget and r["reuse"]]
        if dit and fpdm:
            best = min(fpdm, key=lambda r: r["fd"])
            verdict = "lower (better)" if best["fd"] < dit["fd"] else "higher (worse)"
            out.append(f"Budget {budget}: the best FPDM setting (k={best['iters_per_step']}, {best['num_steps']} "
                       f"timesteps) has FD {best['fd']:.2f}, {verdict} than DiT's {dit['fd']:.2f} "
                       f"({dit['num_steps']} timesteps).")
    cuts = [off["residual"][-1] / on["residual"][-1] for on, off in _reuse_pairs(record).values()
            if on.get("residual") and off.get("residual") and on["residual"][-1] > 0]
    if cuts:
        out.append(f"Without reuse the last timestep's fixed-point residual is {min(cuts):.1f}x to {max(cuts):.1f}x "
                   "its value with reuse, across budgets and k (above 1: reuse brings the solve closer to the fixed "
                   "point).")
    accuracy = [r["accuracy"] for r in rows.values()]
    real = record.get("classifier_accuracy")
    if accuracy and real is not None:
        out.append(f"Samples are classified as their class {min(accuracy):.0%}-{max(accuracy):.0%} of the time, "
                   f"against {real:.0%} for real held-out images (chance: 12.5%).")
    return out


def _caveat(record: dict[str, Any]) -> str:
    steps = ", ".join(f"{name} {t['steps']} steps" for name, t in record["training"].items())
    return (f"Both models trained for the same measured time ({record['demo']['minutes']:g} minute(s) each on "
            f"{record['device']}: {steps}). At this size that leaves them undertrained, so the comparison measures "
            "early training as much as sampling efficiency; the paper's comparison is at ImageNet scale after "
            "days of GPU training (see examples/fpdm_imagenet.md). FD and KID use a small classifier trained on "
            "Shapes in place of Inception; compare numbers within one run only.")


def markdown_report(record: dict[str, Any]) -> str:
    """``report.md``: the plots, the grids, the table and what the numbers say."""
    budgets = sorted({r["budget"] for r in record["settings"].values()})
    lines = ["# FPDM demo", "", _caveat(record), "", "## Findings", ""]
    lines += [f"- {line}" for line in _findings(record)]
    lines += ["", "## Quality against compute", "", "![quality](quality_vs_budget.png)", "",
              "## Residuals with and without reuse", "", "![residuals](residuals_reuse.png)", "",
              "## All settings", "", summary_table(record), "", "## Samples", "",
              "Each column is one class; the same seeds in every grid. Real images: ![real](grids/real.png)", ""]
    k = _grid_k(record)
    for budget in budgets:
        lines.append(f"Budget {budget}: DiT ![DiT](grids/{Setting('DiT', budget).key}.png) "
                     f"FPDM k={k} ![FPDM](grids/{Setting('FPDM', budget, k, True).key}.png)")
        lines.append("")
    return "\n".join(lines)


def _grid_k(record: dict[str, Any]) -> int:
    ks = sorted(record["demo"]["iters"])
    return ks[len(ks) // 2]


def html_report(record: dict[str, Any]) -> str:
    """``report.html``: the same content as the markdown report, self-contained apart from the PNGs beside it."""
    e = html.escape
    budgets = sorted({r["budget"] for r in record["settings"].values()})
    k = _grid_k(record)
    head = "".join(f"<th>{e(h)}</th>" for h in _HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _table_rows(record))
    grids = "".join(
        f"<tr><td>{b}</td><td><img src='grids/{Setting('DiT', b).key}.png'></td>"
        f"<td><img src='grids/{Setting('FPDM', b, k, True).key}.png'></td></tr>" for b in budgets)
    findings = "".join(f"<li>{e(line)}</li>" for line in _findings(record))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>FPDM demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{image-rendering:pixelated}}</style></head>
<body><h1>FPDM demo</h1><p>{e(_caveat(record))}</p>
<h2>Findings</h2><ul>{findings}</ul>
<h2>Quality against compute</h2><img src="quality_vs_budget.png" alt="quality against budget">
<h2>Residuals with and without reuse</h2><img src="residuals_reuse.png" alt="residuals">
<h2>All settings</h2><table><tr>{head}</tr>{body}</table>
<h2>Samples</h2><p>Each column is one class; the same seeds in every grid. Real images:</p>
<img src="grids/real.png" alt="real images">
<table><tr><th>budget</th><th>DiT</th><th>FPDM k={k}</th></tr>{grids}</table>
</body></html>
"""


def add_parser(sub: Any) -> None:
    """Register ``fpdm demo`` on the ``fpdm`` subcommand parser."""
    p = sub.add_parser("demo", help="train FPDM and DiT on the embedded dataset, sample under budgets, report",
                       description="Train a small FPDM and a DiT baseline of the same width on the embedded Shapes "
                                   "dataset for the same measured time, sample both at several compute budgets "
                                   "(timestep smoothing, with and without solution reuse), score the samples and "
                                   "write grids, plots and a report. A rerun resumes.")
    p.add_argument("--out", default="demo-results", help="results folder")
    p.add_argument("--quick", action="store_true", help="a smoke test at toy size (under a minute)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training wall time per model (default 2.5; --quick 0.1)")
    p.add_argument("--samples", type=int, default=None, help="images per setting (default 400; --quick 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or time lines")
    p.set_defaults(func=_run_cli)


def _run_cli(args: Any) -> int:
    settings = DemoSettings.default(quick=args.quick, seed=args.seed, minutes=args.minutes,
                                    num_samples=args.samples)
    try:
        record = run_demo(args.out, settings=settings, device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt as err:
        print(f"fpdm demo: stopped ({err}); run the same command again to resume")
        return 130
    print(summary_table(record))
    print("\n".join(f"- {line}" for line in _findings(record)))
    out = Path(args.out)
    print(f"report: {out / 'report.html'} ({out / 'report.md'}); every number: {out / 'results.json'}")
    return 0

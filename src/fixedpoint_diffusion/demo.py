"""``fpdm demo``: FPDM against a DiT of the same width on the embedded Shapes dataset, end to end.

The job a newcomer runs first. It orchestrates :mod:`fixedpoint_diffusion.experiment` (training for equal
compute, the scoring protocol, bootstrap intervals) and :mod:`fixedpoint_diffusion.report` (figures, findings,
reports) in two parts:

1. **The shipped pair across budgets** (:mod:`fixedpoint_diffusion.pretrained`): the FPDM and the DiT trained for
   equal compute are sampled from the same seeds at budgets from very small to large (block passes per image):
   DiT with ``budget // depth`` timesteps; FPDM with timestep smoothing (``k`` iterations per timestep), with and
   without solution reuse, with iterations reallocated (increasing/decreasing), and with and without
   classifier-free guidance: the shapes of the paper's Table 1, Fig. 4, Fig. 6 and Table 3. Every number carries
   a 95% bootstrap interval, and FPDM and DiT are compared by a paired bootstrap.
2. **Training from scratch for equal compute**: both models (the shipped pair's configs) train for the same number
   of training multiply-accumulates, with loss curves and sample grids taken during training, then are scored.
   The same seed gives the same steps and the same numbers. On a GPU the default compute is the shipped pair's,
   so the models reach its quality.

Everything finished is kept in the results folder: a rerun (after Ctrl-C, say) resumes training from the
checkpoints and skips the settings already scored.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import pretrained
from ._files import write_atomic
from ._runtime import default_device
from .config import Config, load_config
from .data import Shapes
from .errors import InvalidValueError, OutputExistsError
from .evaluation import HELD_OUT_SEED
from .experiment import train_equal_compute, training_steps
from .pipeline import image_grid, to_uint8
from .report import html_report, markdown_report, plot_quality, plot_reuse_residuals, plot_training, write_record
from .runs import RunFolder, load_model
from .sampling import sample
from .scoring import Scorer, Setting, bootstrap, paired_difference, score_settings

__all__ = ["DemoSettings", "run_demo"]

# Part 2 at --quick: the shipped configs at width 32 (the grids are then still noise; it shows the machinery).
_QUICK_MODEL = {"hidden_size": 32, "num_heads": 2}
# The shipped pair's training compute (shapes-dit: 12000 steps of batch 64), the GPU default of part 2.
_SHIPPED_MACS = 12000 * 9_175_891_968
# CPU default of part 2: what a quiet 2-core machine trains in about 4 minutes (DiT 327 steps, FPDM 425).
_CPU_MACS = 3e12
_QUICK_MACS = 5e10


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run does; stored in the results folder, and a rerun must ask for the same.

    Attributes:
        budgets: part 1: block passes per image to sample at.
        iters: FPDM fixed-point iterations per timestep ``k`` at every budget (timestep smoothing).
        no_reuse_iters: the ``k`` also sampled without solution reuse.
        allocation_budgets: budgets at which ``k = 2`` is also reallocated (increasing and decreasing).
        guidance_scale, guidance_budgets: classifier-free guidance and the budgets it is tried at (DiT and FPDM
            ``k = 2``).
        num_samples: images per setting (classes balanced).
        train_macs: part 2: training multiply-accumulates per model (0: skip part 2).
        seed: seed of training and sampling.
        quick: the smoke-test size.
    """

    budgets: tuple[int, ...]
    iters: tuple[int, ...]
    no_reuse_iters: tuple[int, ...]
    allocation_budgets: tuple[int, ...]
    guidance_scale: float
    guidance_budgets: tuple[int, ...]
    num_samples: int
    train_macs: float
    seed: int
    quick: bool

    @classmethod
    def default(cls, *, quick: bool = False, seed: int = 0, num_samples: int | None = None,
                train_macs: float | None = None, device: torch.device | str | None = None) -> DemoSettings:
        """The documented run (``quick``: the smoke test). Part 2's compute defaults to the shipped pair's on a
        GPU and to about four CPU minutes otherwise."""
        if quick:
            settings = cls(budgets=(6, 24), iters=(1, 2), no_reuse_iters=(1,), allocation_budgets=(),
                           guidance_scale=3.0, guidance_budgets=(), num_samples=64, train_macs=_QUICK_MACS,
                           seed=seed, quick=True)
        else:
            gpu = default_device(device).type == "cuda"
            settings = cls(budgets=(6, 12, 24, 48, 96), iters=(1, 2, 4), no_reuse_iters=(1, 2),
                           allocation_budgets=(24, 48), guidance_scale=3.0, guidance_budgets=(12, 48),
                           num_samples=400, train_macs=_SHIPPED_MACS if gpu else _CPU_MACS, seed=seed, quick=False)
        changes = {k: v for k, v in (("num_samples", num_samples), ("train_macs", train_macs)) if v is not None}
        settings = settings.replace(**changes)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> DemoSettings:
        return DemoSettings(**{**asdict(self), **changes})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not (isinstance(self.num_samples, int) and not isinstance(self.num_samples, bool)
                and self.num_samples >= 16):
            raise InvalidValueError(f"num_samples must be an int >= 16 (two per class at least), got "
                                    f"{self.num_samples!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise InvalidValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not (isinstance(self.train_macs, (int, float)) and not isinstance(self.train_macs, bool)
                and math.isfinite(self.train_macs) and self.train_macs >= 0):
            raise InvalidValueError(f"train_macs must be a finite number >= 0 (0: no training part), got "
                                    f"{self.train_macs!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                and self.guidance_scale >= 1):
            raise InvalidValueError(f"guidance_scale must be a finite number >= 1, got {self.guidance_scale!r}")
        for name in ("budgets", "iters", "no_reuse_iters", "allocation_budgets", "guidance_budgets"):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                      for v in values)):
                raise InvalidValueError(f"{name} must be a tuple of ints >= 1, got {values!r}")
        if not self.budgets or not self.iters:
            raise InvalidValueError("budgets and iters must not be empty")
        if 2 not in self.iters and (self.allocation_budgets or self.guidance_budgets):
            raise InvalidValueError("allocation_budgets and guidance_budgets sample FPDM at k = 2, so iters must "
                                    "hold 2")

    def settings(self) -> list[Setting]:
        """Part 1's sampling settings, cheapest budget first; FPDM settings that would get no timestep (``k``
        larger than the budget allows) are left out."""
        out = []
        for budget in self.budgets:
            out.append(Setting("DiT", budget))
            for k in self.iters:
                if budget >= 3 + k:  # at least one timestep for the shipped FPDM (1 pre + k + 1 post)
                    out.append(Setting("FPDM", budget, k))
            out += [Setting("FPDM", budget, k, reuse=False) for k in self.no_reuse_iters if budget >= 3 + k]
            if budget in self.allocation_budgets:
                out += [Setting("FPDM", budget, 2, allocation=a) for a in ("increasing", "decreasing")]
            if budget in self.guidance_budgets:
                out += [Setting("DiT", budget, guidance_scale=self.guidance_scale),
                        Setting("FPDM", budget, 2, guidance_scale=self.guidance_scale)]
        return out

    def comparisons(self) -> list[tuple[str, str, str]]:
        """Part 1's paired comparisons ``(kind, a, b)`` (setting keys), each read as "a against b"."""
        keys = {s.key for s in self.settings()}
        out = []
        for budget in self.budgets:
            dit = Setting("DiT", budget).key
            for k in self.iters:
                out.append(("fpdm-vs-dit", Setting("FPDM", budget, k).key, dit))
            base = Setting("FPDM", budget, 2).key
            out += [("smoothing", Setting("FPDM", budget, k).key, base) for k in self.iters if k != 2]
            out += [("reuse", Setting("FPDM", budget, k).key, Setting("FPDM", budget, k, reuse=False).key)
                    for k in self.no_reuse_iters]
            out += [("reallocation", Setting("FPDM", budget, 2, allocation=a).key, base)
                    for a in ("increasing", "decreasing") if budget in self.allocation_budgets]
            if budget in self.guidance_budgets:
                out.append(("guidance", Setting("FPDM", budget, 2, guidance_scale=self.guidance_scale).key,
                            Setting("DiT", budget, guidance_scale=self.guidance_scale).key))
        return [c for c in out if c[1] in keys and c[2] in keys]


def training_configs(settings: DemoSettings, work: Path) -> dict[str, Config]:
    """Part 2's configs: the shipped pair's (``shapes-fpdm``, ``shapes-dit``; width 32 at ``quick``), training
    into ``work/fpdm`` and ``work/dit``; their ``max_steps`` is set by the compute."""
    configs = {}
    for name, source in (("FPDM", "shapes-fpdm"), ("DiT", "shapes-dit")):
        overrides = [f"train.seed={settings.seed}", f"train.out_dir={json.dumps(str(work / name.lower()))}",
                     "train.log_every=20"]
        if settings.quick:
            overrides += [f"model.{k}={v}" for k, v in _QUICK_MODEL.items()] + ["data.num_samples=2048",
                                                                               "train.warmup_steps=10"]
        configs[name] = load_config(source, overrides)
    return configs


class _Clock:
    """Elapsed time, printed between stages."""

    def __init__(self, quiet: bool) -> None:
        self.start = time.perf_counter()
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            seconds = round(time.perf_counter() - self.start)
            print(f"[{seconds // 60:d}:{seconds % 60:02d}] {message}", flush=True)


def _save_png(image: np.ndarray, path: Path) -> None:
    write_atomic(path, lambda fh: Image.fromarray(image).save(fh, format="PNG"))


def _grid(images: np.ndarray) -> np.ndarray:
    return image_grid(images, columns=8, scale=max(1, 96 // images.shape[1]))  # tiles of about 96 px


def _real_by_class(image_size: int, seed: int, rows: int = 8) -> np.ndarray:
    """Held-out real images laid out like the sample grids: image ``i`` of class ``i % 8``."""
    real = Shapes(64 * rows, image_size, seed=HELD_OUT_SEED + seed)
    order = torch.cat([torch.nonzero(real.labels == c).flatten()[:rows] for c in range(8)])
    return to_uint8(real.images[order.view(8, rows).T.reshape(-1)])


def run_demo(out: str | os.PathLike = "demo-results", *, settings: DemoSettings | None = None,
             device: torch.device | str | None = None, progress: bool = True,
             log_lines: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo into ``out`` and return the record also written to ``out/results.json``.

    Args:
        out: the results folder; created if missing. A folder holding a run with other settings is refused.
        settings: what to run (default: :meth:`DemoSettings.default` for ``device``).
        device: where to train and sample (default: CUDA if available, else CPU).
        progress: progress bars.
        log_lines: plain lines with the elapsed time between stages (what a log of a run without bars shows).

    Raises:
        FileExistsError: ``out`` holds a demo run with different settings, or is a file.
        ValueError: bad settings or device (before anything is created).
        KeyboardInterrupt: training was stopped (Ctrl-C/SIGTERM) after writing its checkpoint; rerun to resume.
    """
    device = default_device(device)
    settings = settings or DemoSettings.default(device=device)
    settings.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"out {str(out)!r} is a file, not a folder")
    wanted = json.loads(json.dumps(asdict(settings)))
    stored_file = out / "demo.json"
    stored = json.loads(stored_file.read_text()) if stored_file.is_file() else None
    if stored is not None and stored != wanted:
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise OutputExistsError(
            f"out {str(out)!r} holds a demo run with other settings ("
            + ", ".join(f"{k}={stored.get(k)!r}" for k in differ) + "; asked for "
            + ", ".join(f"{k}={wanted.get(k)!r}" for k in differ) + "); use another --out or the same options")
    (out / "grids").mkdir(parents=True, exist_ok=True)
    stored_file.write_text(json.dumps(wanted, indent=1))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # These models are small: one intra-op thread ran their steps up to 6x faster than two on a 2-core
        # machine with other work on it, and only about 1.4x slower on an idle one.
        torch.set_num_threads(1)
    try:
        return _run(out, settings, wanted, device, progress, log_lines)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, settings: DemoSettings, wanted: dict[str, Any], device: torch.device,
         progress: bool, log_lines: bool) -> dict[str, Any]:
    clock = _Clock(quiet=not log_lines)
    classifier = pretrained.classifier(device)
    scorer = Scorer.from_classifier(classifier, seed=settings.seed)
    baseline = scorer.real_baseline(settings.num_samples, seed=settings.seed)
    intervals = bootstrap(baseline["features"], baseline["correct"], scorer.reference, seed=settings.seed)
    real = {"fd": baseline["fd"], "accuracy": baseline["accuracy"], "num": baseline["num"],
            "fd_ci": intervals["fd"], "accuracy_ci": intervals["accuracy"]}
    _save_png(_grid(_real_by_class(16, settings.seed)), out / "grids" / "real.png")
    record: dict[str, Any] = {"settings": wanted, "device": str(device)}

    # Part 1: the shipped pair.
    models = {"FPDM": pretrained.load("shapes-fpdm", device=device),
              "DiT": pretrained.load("shapes-dit", device=device)}
    todo = settings.settings()
    clock.say(f"part 1: the shipped FPDM and DiT, {len(todo)} settings x {settings.num_samples} samples on {device}")
    rows = _score(models, todo, scorer, settings, device, out / "part1", out / "grids", progress, clock)
    comparisons = _compare(rows, settings.comparisons(), scorer, settings.seed)
    provenance = {name: pretrained.provenance(f"shapes-{name.lower()}") for name in models}
    record["pretrained"] = {"models": provenance, "rows": _json_rows(rows), "comparisons": comparisons,
                            "real": real, "bar": _quality_bar(rows, real, max(settings.budgets)),
                            "grids": [("real", "grids/real.png")] + [
                                (s.label + f", budget {s.budget}", f"grids/{s.key}.png") for s in todo
                                if s.allocation == "constant" and s.reuse and s.guidance_scale == 1.0
                                and s.iters_per_step in (None, 2)]}
    plot_quality(rows, out / "quality_vs_budget.png", real)
    plot_reuse_residuals(rows, out / "residuals_reuse.png")
    write_record(record, out / "results.json")

    # Part 2: training from scratch for equal compute.
    if settings.train_macs > 0:
        record["training"] = _train_part(out, settings, scorer, device, progress, clock)

    clock.say("report")
    write_record(record, out / "results.json")
    (out / "report.md").write_text(markdown_report(record))
    (out / "report.html").write_text(html_report(record))
    clock.say(f"done: {out / 'report.html'}")
    return json.loads(json.dumps(record, default=lambda o: None))


def _score(models, todo, scorer, settings, device, folder, grids, progress, clock):
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="sampling", disable=not progress, leave=False)

    def started(index: int, setting: Setting) -> None:
        bar.set_postfix_str(setting.key)

    def finished(setting: Setting, row: dict[str, Any]) -> None:
        images = row.pop("images", None)
        if images is not None:
            _save_png(_grid(images), grids / f"{setting.key}.png")
        bar.update(1)

    rows = score_settings(models, todo, scorer, num_samples=settings.num_samples, seed=settings.seed,
                          device=device, folder=folder, keep=64, on_start=started, on_result=finished)
    bar.close()
    return rows


def _compare(rows, pairs, scorer, seed) -> list[dict[str, Any]]:
    out = []
    for kind, a, b in pairs:
        diff = paired_difference(rows[a], rows[b], scorer.reference, seed=seed)
        out.append({"kind": kind, "a": a, "b": b, "fd": list(diff["fd"]), "accuracy": list(diff["accuracy"])})
    return out


def _json_rows(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: {k: v for k, v in row.items() if k not in ("features", "correct", "fd_resampled", "images")}
            for key, row in rows.items()}


def _quality_bar(rows, real, budget: int) -> str:
    """Whether each model meets the shipped pair's quality bar at the largest budget, unguided: accuracy >= 0.9
    and FD <= 3x the real images' FD at the same sample count."""
    parts = []
    for row in rows.values():
        if row["budget"] != budget or row["guidance_scale"] != 1.0 or row["allocation"] != "constant" \
                or not row["reuse"] or row["iters_per_step"] not in (None, 2):
            continue
        ok = row["accuracy"] >= 0.9 and row["fd"] <= 3 * real["fd"]
        parts.append(f"{row['label']}: accuracy {row['accuracy']:.2f}, FD {row['fd']:.2f} = "
                     f"{row['fd'] / real['fd']:.1f}x the real images' {real['fd']:.2f} "
                     f"({'meets' if ok else 'misses'} the bar)")
    return (f"Quality bar at the largest budget ({budget}), unguided: accuracy >= 0.90 and FD <= 3x real. "
            + "; ".join(parts) + ".")


def _train_part(out: Path, settings: DemoSettings, scorer, device, progress, clock) -> dict[str, Any]:
    configs = training_configs(settings, out / "part2" / "runs")
    steps = training_steps(configs, settings.train_macs)
    clock.say("part 2: training FPDM and DiT from scratch for equal compute ("
              + ", ".join(f"{name} {n} steps" for name, n in steps.items()) + f", {settings.train_macs:.3g} MACs "
              "each)")
    snapshot_budget = 24
    labels = torch.arange(16) % 8

    def snapshot(name: str):
        marks = {round(steps[name] * j / 4) for j in range(1, 5)}

        def hook(trainer, state) -> None:
            if state.step in marks:
                result = sample(trainer.ema, labels, diffusion=trainer.diffusion, budget=snapshot_budget,
                                iterations_per_timestep=2 if name == "FPDM" else None, sampler="ddim",
                                seed=settings.seed, device=trainer.device, compile=False)  # the EMA, mid-training
                _save_png(_grid(to_uint8(result.samples)), out / "grids" / f"train-{name}-{state.step:06d}.png")

        return hook

    summaries = train_equal_compute(configs, settings.train_macs, device=device, progress=progress,
                                    hooks={name: [snapshot(name)] for name in configs})
    models = {name: load_model(s.out_dir, device=device) for name, s in summaries.items()}
    todo = [Setting("DiT", snapshot_budget), Setting("FPDM", snapshot_budget, 2)]
    clock.say(f"part 2: scoring both at budget {snapshot_budget}")
    rows = score_settings(models, todo, scorer, num_samples=settings.num_samples, seed=settings.seed, device=device,
                          folder=out / "part2")
    runs = {}
    for name, summary in summaries.items():
        log = RunFolder(summary.out_dir).read_log()
        runs[name] = {"steps": summary.step, "train_seconds": summary.train_seconds,
                      "final_loss": (summary.last_metrics or {}).get("loss", log[-1]["loss"] if log else math.nan),
                      "macs_per_step": settings.train_macs / steps[name], "log": log}
    plot_training(runs, out / "training_loss.png")
    grids = sorted((out / "grids").glob("train-*.png"))
    return {"macs": settings.train_macs, "runs": runs, "rows": _json_rows(rows), "snapshot_budget": snapshot_budget,
            "comparisons": _compare(rows, [("fpdm-vs-dit", todo[1].key, todo[0].key)], scorer, settings.seed),
            "grids": [(f"{p.stem.split('-')[1]} step {int(p.stem.split('-')[2])}", f"grids/{p.name}") for p in grids]}

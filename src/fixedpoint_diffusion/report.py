"""Figures, findings and reports of a Shapes experiment record (``fpdm demo``; the same rows as
``benchmarks/quality.py``).

A *row* is one scored :class:`~fixedpoint_diffusion.scoring.Setting` (see
:func:`~fixedpoint_diffusion.scoring.score_settings`): ``fd``/``fd_ci``, ``accuracy``/``accuracy_ci``,
``budget``, ``model``, ``label``, ``num_steps``, ``residual``, ... A *comparison* is a paired bootstrap
difference between two rows (:func:`~fixedpoint_diffusion.scoring.paired_difference`). Findings are written
from comparisons only, and only where the 95% interval excludes zero; everything else is reported as within the
noise.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["comparison_sentence", "findings", "html_report", "markdown_report", "plot_quality",
           "plot_reuse_residuals", "plot_training", "summary_table"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ci(value: float, ci: Any, digits: int = 2) -> str:
    if not ci:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _curves(rows: Mapping[str, Mapping[str, Any]], *, guided: bool = False,
            ) -> dict[str, list[Mapping[str, Any]]]:
    """Constant-allocation rows grouped by label (DiT, FPDM k=.., FPDM k=.. no reuse), sorted by budget."""
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows.values():
        if row.get("allocation", "constant") != "constant" or (row.get("guidance_scale", 1.0) != 1.0) != guided:
            continue
        curves.setdefault(row["label"], []).append(row)
    return {label: sorted(r, key=lambda row: row["budget"]) for label, r in sorted(curves.items())}


def plot_quality(rows: Mapping[str, Mapping[str, Any]], path: str | Path,
                 real: Mapping[str, Any] | None = None) -> None:
    """FD and class accuracy against the budget, with 95% bootstrap bars, for every unguided curve (the shape of
    the paper's Table 1 / Fig. 4); the real images' score at the same sample count as a grey band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    budgets = sorted({r["budget"] for r in rows.values()})
    for label, curve in _curves(rows).items():
        style = dict(fmt="k--o") if label.startswith("DiT") else dict(fmt="-o" if "no reuse" not in label else ":s")
        x = [r["budget"] for r in curve]
        for ax, key in zip(axes, ("fd", "accuracy")):
            y = [r[key] for r in curve]
            # a basic-bootstrap FD interval can lie beside its estimate when the resampled FDs are very skewed
            # (tiny sample counts): the bar then starts at the point
            err = [[max(0.0, r[key] - r[f"{key}_ci"][0]) for r in curve],
                   [max(0.0, r[f"{key}_ci"][1] - r[key]) for r in curve]]
            ax.errorbar(x, y, yerr=err, capsize=3, ms=4, label=label, **style)
    if real is not None:
        for ax, key in zip(axes, ("fd", "accuracy")):
            lo, hi = real[f"{key}_ci"]
            ax.axhspan(lo, hi, color="0.85", zorder=0, label=f"real images ({real['num']})")
    axes[0].set(xlabel="block passes per image (budget)", ylabel="FD, small classifier (lower is better)",
                title="Quality against sampling compute", yscale="log")
    axes[1].set(xlabel="block passes per image (budget)", ylabel="class accuracy of samples (higher is better)",
                title="Samples classified as their class", ylim=(0, 1.02))
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reuse_pairs(rows: Mapping[str, Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(reuse on, reuse off) rows of the same model, budget and k."""
    pairs = []
    for off in rows.values():
        if off.get("iters_per_step") is None or off["reuse"] or off.get("allocation", "constant") != "constant" \
                or off.get("guidance_scale", 1.0) != 1.0:
            continue
        for on in rows.values():
            if (on["model"], on["budget"], on.get("iters_per_step"), on["reuse"], on.get("allocation", "constant"),
                    on.get("guidance_scale", 1.0)) == (off["model"], off["budget"], off["iters_per_step"], True,
                                                       "constant", 1.0):
                pairs.append((on, off))
    return sorted(pairs, key=lambda p: (p[0]["budget"], p[0]["iters_per_step"]))


def plot_reuse_residuals(rows: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Per-timestep fixed-point residual with and without solution reuse (paper Fig. 6b), one panel per budget."""
    plt = _pyplot()
    pairs = [p for p in _reuse_pairs(rows) if p[0].get("residual") and p[1].get("residual")]
    budgets = sorted({on["budget"] for on, _ in pairs})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(3.8 * max(1, len(budgets)), 3.4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for on, off in pairs:
            if on["budget"] != budget:
                continue
            line, = ax.plot(on["timesteps"], on["residual"], "-o", ms=3, label=f"k={on['iters_per_step']}, reuse")
            ax.plot(off["timesteps"], off["residual"], ":s", ms=3, color=line.get_color(),
                    label=f"k={off['iters_per_step']}, no reuse")
        ax.set(xlabel="timestep t", ylabel=r"last-step residual $\Delta_t$", yscale="log", title=f"budget {budget}")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(runs: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
    """Training loss against training compute (multiply-accumulates), one curve per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, run in runs.items():
        log = run.get("log") or []
        if log:
            ax.plot([entry["step"] * run["macs_per_step"] for entry in log], [entry["loss"] for entry in log],
                    "-" if name != "DiT" else "k--", label=f"{name} ({run['steps']} steps)")
    ax.set(xlabel="training multiply-accumulates", ylabel="training loss", yscale="log",
           title="Training, equal compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- findings -----------------------------------------------------------------------------------------------


def comparison_sentence(comparison: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One comparison in words: which side is better on FD and on accuracy, or that the difference is within
    the 95% interval of the paired bootstrap."""
    a, b = rows[comparison["a"]], rows[comparison["b"]]
    parts = []
    for key, name, better_low in (("fd", "FD", True), ("accuracy", "accuracy", False)):
        d, lo, hi = comparison[key]
        interval = f"{d:+.2f}, 95% CI [{lo:+.2f}, {hi:+.2f}]"
        if hi < 0 or lo > 0:
            a_better = (hi < 0) == better_low
            parts.append(f"{name} {'better' if a_better else 'worse'} ({interval})")
        else:
            parts.append(f"{name} within the noise ({interval})")
    return f"{a['label']} vs {b['label']} at budget {a['budget']}: {'; '.join(parts)}."


def _wins(comparison: Mapping[str, Any]) -> int:
    """+1: a is better on FD and not worse on accuracy beyond the noise; -1: the mirror; 0: otherwise."""
    _, fd_lo, fd_hi = comparison["fd"]
    _, acc_lo, acc_hi = comparison["accuracy"]
    if fd_hi < 0 and not acc_hi < 0:
        return 1
    if fd_lo > 0 and not acc_lo > 0:
        return -1
    return 0


def findings(rows: Mapping[str, Mapping[str, Any]], comparisons: list[Mapping[str, Any]],
             real: Mapping[str, Any] | None = None) -> list[str]:
    """Plain statements read off the comparisons; a difference is called one only outside its 95% interval."""
    out = []
    versus = [c for c in comparisons if c["kind"] == "fpdm-vs-dit"]
    budgets = sorted({rows[c["a"]]["budget"] for c in versus})
    wins, losses, ties = [], [], []
    for budget in budgets:
        here = [c for c in versus if rows[c["a"]]["budget"] == budget]
        verdicts = [_wins(c) for c in here]
        (wins if 1 in verdicts else losses if all(v == -1 for v in verdicts) else ties).append(budget)
    if versus:
        out.append(
            "Verdict, FPDM against the DiT of the same width (unguided, FD with accuracy not worse): "
            + "; ".join(text for text in (
                f"FPDM is better at budget(s) {', '.join(map(str, wins))}" if wins else "",
                f"DiT is better at budget(s) {', '.join(map(str, losses))} (every k)" if losses else "",
                f"neither is better beyond the noise at budget(s) {', '.join(map(str, ties))}" if ties else "")
                if text) + ".")
    for kind in ("fpdm-vs-dit", "smoothing", "reallocation", "reuse", "guidance"):
        out += [comparison_sentence(c, rows) for c in comparisons if c["kind"] == kind]
    if real is not None:
        out.append(f"Real held-out images at the same count ({real['num']}): FD {_ci(real['fd'], real['fd_ci'])}, "
                   f"accuracy {_ci(real['accuracy'], real['accuracy_ci'])} (the floor of FD at this count; chance "
                   "accuracy is 0.125).")
    return out


# ----- tables and reports -------------------------------------------------------------------------------------

_HEADER = ["budget", "setting", "timesteps", "block passes", "FD [95% CI]", "accuracy [95% CI]", "KID x1e3",
           "last residual", "seconds"]


def _table_rows(rows: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in sorted(rows.values(), key=lambda r: (r["budget"], r.get("guidance_scale", 1.0),
                                                    not r["model"].startswith("DiT"), r["key"])):
        residual = row.get("residual")
        out.append([str(row["budget"]), row["label"], str(row["num_steps"]), str(row["block_passes"]),
                    _ci(row["fd"], row.get("fd_ci")), _ci(row["accuracy"], row.get("accuracy_ci")),
                    f"{1e3 * row['kid']:.1f}", "-" if not residual else f"{residual[-1]:.2e}",
                    f"{row['seconds']:.1f}"])
    return out


def summary_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The rows as a markdown table (also printed at the end of ``fpdm demo``)."""
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "---:|" * len(_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _table_rows(rows)]
    return "\n".join(lines)


def _blocks(record: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The report as (kind, content) blocks, rendered to markdown and HTML alike."""
    part1, part2 = record.get("pretrained"), record.get("training")
    b: list[tuple[str, Any]] = [("h1", "FPDM demo")]
    b.append(("p", f"Device: {record['device']}. Seed {record['settings']['seed']}. Every number carries its 95% "
                   "bootstrap interval over the generated samples; a difference is called one only when its paired "
                   "bootstrap interval excludes zero (each comparison on its own, no correction for their number). "
                   "FD and accuracy use the shipped small Shapes classifier in place of Inception: compare numbers "
                   "within this report only."))
    if part1:
        b.append(("h2", "Part 1: the shipped FPDM and DiT across sampling budgets"))
        models = part1["models"]
        b.append(("p", "Trained for equal training compute on the embedded 16x16 Shapes data: " + "; ".join(
            f"{name}: {p.get('steps')} steps, {p.get('training_macs', 0):.3g} training MACs, "
            f"{p.get('parameters', 0):,} parameters" for name, p in models.items())
            + ". Budgets are transformer-block passes per image (the paper's footnote 4): DiT spends its "
              "depth per timestep, FPDM pre + k fixed-point iterations + post."))
        if part1.get("bar"):
            b.append(("p", part1["bar"]))
        b.append(("h3", "Findings"))
        b.append(("ul", findings(part1["rows"], part1["comparisons"], part1.get("real"))))
        b.append(("img", ("quality_vs_budget.png", "quality against budget")))
        b.append(("img", ("residuals_reuse.png", "fixed-point residual per timestep, with and without reuse")))
        b.append(("h3", "Every setting"))
        b.append(("table", (_HEADER, _table_rows(part1["rows"]))))
        b.append(("h3", "Samples"))
        b.append(("p", "Each column one class (disc, square, ring, cross; warm then cool), the same seeds in every "
                       "grid; real held-out images first."))
        b.append(("grids", part1["grids"]))
    if part2:
        b.append(("h2", "Part 2: training both from scratch for equal compute"))
        b.append(("p", "; ".join(f"{name}: {run['steps']} steps in {run['train_seconds']:.0f} s, final loss "
                                 f"{run['final_loss']:.4f}" for name, run in part2["runs"].items())
                  + f". Equal training compute: {part2['macs']:.3g} multiply-accumulates each (the steps follow "
                    "from each model's cost per step, so the same seed trains the same steps on any machine)."))
        b.append(("img", ("training_loss.png", "training loss against training compute")))
        b.append(("p", "Samples of the EMA weights during training (2 per class, budget "
                       f"{part2['snapshot_budget']}):"))
        b.append(("grids", part2["grids"]))
        if part2.get("rows"):
            b.append(("ul", findings(part2["rows"], part2["comparisons"], part2.get("real"))))
            b.append(("table", (_HEADER, _table_rows(part2["rows"]))))
    return b


def markdown_report(record: Mapping[str, Any]) -> str:
    """``report.md``: figures, findings, tables and grids."""
    lines: list[str] = []
    for kind, content in _blocks(record):
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", ""]
        elif kind == "table":
            header, body = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
        elif kind == "grids":
            lines += ["| " + " | ".join(title for title, _ in content) + " |", "|" + "---|" * len(content),
                      "| " + " | ".join(f"![{title}]({src})" for title, src in content) + " |", ""]
    return "\n".join(lines)


def html_report(record: Mapping[str, Any]) -> str:
    """``report.html``: the markdown report's content, self-contained apart from the PNGs beside it."""
    e = html.escape
    parts = []
    for kind, content in _blocks(record):
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(content)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(content)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in content) + "</ul>")
        elif kind == "img":
            parts.append(f"<img src='{e(content[0])}' alt='{e(content[1])}'>")
        elif kind == "table":
            header, body = content
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
        elif kind == "grids":
            parts.append("<div class='grids'>" + "".join(
                f"<figure><img class='grid' src='{e(src)}' alt='{e(title)}'><figcaption>{e(title)}</figcaption>"
                "</figure>" for title, src in content) + "</div>")
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img.grid{image-rendering:pixelated;"
             "width:320px}.grids{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>FPDM demo</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_record(record: Mapping[str, Any], path: str | Path) -> None:
    """``results.json``: every number of the record (arrays dropped)."""
    Path(path).write_text(json.dumps(record, indent=1, default=lambda o: None))

"""``fpdm demo``: the main job end to end at toy size, its resume, its report, and its refusals."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion import report as report_module
from fixedpoint_diffusion.cli import main as fpdm
from fixedpoint_diffusion.demo import DemoSettings, run_demo
from fixedpoint_diffusion.evaluation import evaluate_samples
from fixedpoint_diffusion.experiment import Scorer, Setting
from fixedpoint_diffusion.pipeline import to_uint8
from fixedpoint_diffusion.sampling import sample

# Smaller than --quick: 16 samples per setting, two budgets, a few training steps.
TOY = DemoSettings.default(quick=True).replace(num_samples=16, budgets=(6, 24), iters=(1, 2), no_reuse_iters=(1,),
                                               allocation_budgets=(24,), guidance_budgets=(24,), train_macs=2e10)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, settings=TOY, device="cpu", progress=False)


def test_every_setting_is_scored_within_its_budget(toy_run):
    out, record = toy_run
    rows = record["pretrained"]["rows"]
    assert set(rows) == {s.key for s in TOY.settings()} == {
        "DiT-b6", "FPDM-b6-k1-reuse", "FPDM-b6-k2-reuse", "FPDM-b6-k1-noreuse", "DiT-b24", "FPDM-b24-k1-reuse", "FPDM-b24-k2-reuse",
        "FPDM-b24-k1-noreuse", "FPDM-b24-k2-reuse-increasing", "FPDM-b24-k2-reuse-decreasing", "DiT-b24-cfg3",
        "FPDM-b24-k2-reuse-cfg3"}
    for key, row in rows.items():
        assert row["block_passes"] <= row["budget"], key
        assert np.isfinite(row["fd"]) and 0 <= row["accuracy"] <= 1 and row["num"] == TOY.num_samples
        assert row["fd_ci"][0] <= row["fd_ci"][1] and row["accuracy_ci"][0] <= row["accuracy_ci"][1]
        assert len(row["timesteps"]) == row["num_steps"]
        if row["model"] == "FPDM":
            if row["allocation"] == "constant":
                assert row["num_steps"] == row["budget"] // (2 + row["iters_per_step"])  # timestep smoothing
            assert len(row["residual"]) == row["num_steps"]
        else:
            assert row["num_steps"] == row["budget"] // 6 and row["residual"] is None  # the shipped DiT: depth 6
    assert json.loads((out / "results.json").read_text()) == record


def test_results_folder_has_grids_plots_and_a_report_that_links_only_existing_files(toy_run):
    out, record = toy_run
    for name in ["quality_vs_budget.png", "residuals_reuse.png", "training_loss.png", "grids/real.png",
                 *(f"grids/{key}.png" for key in record["pretrained"]["rows"])]:
        with Image.open(out / name) as image:
            assert image.size[0] > 100, name
    with Image.open(out / "grids" / "DiT-b24.png") as image:  # 16 samples, 8 per row, 16-px tiles upscaled 6x
        assert image.size == (8 * 96, 2 * 96)
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    linked = set(re.findall(r"src=['\"]([^'\"]+)['\"]", html)) | set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert {"quality_vs_budget.png", "residuals_reuse.png", "grids/DiT-b24.png", "grids/real.png",
            "training_loss.png"} <= linked
    assert all((out / path).is_file() for path in linked)
    assert len([p for p in linked if "grids/train-" in p]) == 8  # 4 snapshots of each model during training
    table = report_module.summary_table(record["pretrained"]["rows"])
    assert table in md and len(table.splitlines()) == 2 + len(record["pretrained"]["rows"])
    assert "Verdict" in md and "95%" in md


def test_a_setting_equals_sampling_and_scoring_it_by_hand(toy_run):
    """The demo's number for one setting, recomputed from the shipped model with the library calls."""
    out, record = toy_run
    row = record["pretrained"]["rows"]["FPDM-b24-k2-reuse"]
    model, diffusion = pretrained.load("shapes-fpdm")
    classifier = pretrained.classifier()
    reference = Scorer.from_classifier(classifier, seed=TOY.seed).reference
    labels = torch.arange(TOY.num_samples) % 8
    result = sample(model, labels, diffusion=diffusion, budget=24, iterations_per_timestep=2, sampler="ddim",
                    reuse=True, seed=TOY.seed)
    by_hand = evaluate_samples(to_uint8(result.samples), labels.numpy(), classifier, reference, kid_subsets=20,
                               kid_subset_size=TOY.num_samples, seed=TOY.seed)
    assert by_hand["fd"] == pytest.approx(row["fd"], rel=1e-6)
    assert by_hand["accuracy"] == row["accuracy"]
    assert result.residuals.mean(1).tolist() == pytest.approx(row["residual"], rel=1e-6)


def test_part2_trains_equal_compute_and_the_same_seed_gives_the_same_numbers(toy_run, tmp_path):
    out, record = toy_run
    runs = record["training"]["runs"]
    macs = {name: run["steps"] * run["macs_per_step"] for name, run in runs.items()}
    for name in runs:  # each within half a step of the budget
        assert abs(macs[name] - TOY.train_macs) <= 0.5 * runs[name]["macs_per_step"]
    assert runs["FPDM"]["steps"] > runs["DiT"]["steps"]  # an FPDM step is cheaper than the 6-block DiT's
    again = run_demo(tmp_path, settings=TOY.replace(budgets=(6,), allocation_budgets=(), guidance_budgets=()),
                     device="cpu", progress=False)["training"]
    assert {n: r["steps"] for n, r in again["runs"].items()} == {n: r["steps"] for n, r in runs.items()}
    for key, row in record["training"]["rows"].items():  # same steps, same weights, same samples, same scores
        assert again["rows"][key]["fd"] == row["fd"] and again["rows"][key]["accuracy"] == row["accuracy"]


def test_a_rerun_resumes_without_training_or_sampling_again(toy_run, monkeypatch):
    out, record = toy_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished setting was sampled again")

    monkeypatch.setattr(Scorer, "score", refuse)
    again = run_demo(out, settings=TOY, device="cpu", progress=False)
    assert again["pretrained"]["rows"] == record["pretrained"]["rows"]
    assert again["training"]["runs"] == record["training"]["runs"]


def test_an_interrupted_sampling_stage_keeps_what_was_scored(toy_run, tmp_path, monkeypatch):
    out, record = toy_run
    settings = TOY.replace(train_macs=0)
    real_score = Scorer.score
    calls = []

    def score_then_stop(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(kwargs["budget"])
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", score_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, settings=settings, device="cpu", progress=False)
    assert [p.name for p in (tmp_path / "part1" / "scores").glob("*.json")] == ["DiT-b6.json"]
    monkeypatch.setattr(Scorer, "score", real_score)
    resumed = run_demo(tmp_path, settings=settings, device="cpu", progress=False)
    untimed = [{key: {k: v for k, v in row.items() if k != "seconds"} for key, row in rows.items()}
               for rows in (resumed["pretrained"]["rows"], record["pretrained"]["rows"])]
    assert untimed[0] == untimed[1]  # the same numbers as the uninterrupted run
    assert "training" not in resumed


def test_other_settings_in_the_same_folder_are_refused_by_name(toy_run, capsys):
    out, _ = toy_run
    with pytest.raises(FileExistsError, match=r"seed=0.*seed=1"):
        run_demo(out, settings=TOY.replace(seed=1), progress=False)
    assert fpdm(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2  # --quick's own settings differ
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("changes, match", [({"train_macs": -1.0}, "train_macs"),
                                            ({"train_macs": float("nan")}, "train_macs"),
                                            ({"num_samples": 4}, "num_samples"), ({"seed": -1}, "seed"),
                                            ({"budgets": ()}, "budgets"), ({"iters": (0,)}, "iters"),
                                            ({"guidance_scale": 0.5}, "guidance_scale"),
                                            ({"iters": (1,)}, "iters must hold 2")])
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path / "never", settings=TOY.replace(**changes), progress=False)
    assert not (tmp_path / "never").exists()


def test_cli_bad_option_exits_2_without_creating_the_folder(tmp_path, capsys):
    assert fpdm(["demo", "--train-macs", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "train_macs" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_setting_keys_and_labels_are_distinct():
    settings = DemoSettings.default(device="cpu").settings()
    assert len({s.key for s in settings}) == len(settings)
    assert Setting("FPDM", 24, 2, False).label == "FPDM k=2, no reuse"
    assert Setting("FPDM", 24, 2, allocation="increasing", guidance_scale=3).key == "FPDM-b24-k2-reuse-increasing-cfg3"
    comparisons = DemoSettings.default(device="cpu").comparisons()
    keys = {s.key for s in settings}
    assert all(a in keys and b in keys for _, a, b in comparisons)
    assert {kind for kind, _, _ in comparisons} == {"fpdm-vs-dit", "smoothing", "reuse", "reallocation", "guidance"}


def test_cli_prints_the_summary_table_and_where_the_report_is(toy_run, tmp_path, capsys, monkeypatch):
    """A finished folder: the CLI resumes (nothing to do) and prints the table even with --no-progress."""
    out, record = toy_run
    shutil.copytree(out, tmp_path / "copy")
    # the CLI builds its settings from its options: hand it the toy ones
    monkeypatch.setattr(DemoSettings, "default", classmethod(lambda cls, **kwargs: TOY))
    assert fpdm(["demo", "--out", str(tmp_path / "copy"), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[0:0")  # plain time lines, for logs, even without bars
    assert report_module.summary_table(record["pretrained"]["rows"]).splitlines()[0] in printed
    assert "Verdict" in printed and str(tmp_path / "copy" / "report.html") in printed


def test_quality_plot_accepts_an_interval_beside_its_estimate(tmp_path):
    """A basic-bootstrap FD interval can exclude its estimate at tiny sample counts; the plot must still draw."""
    row = {"budget": 6, "label": "DiT", "model": "DiT", "allocation": "constant", "guidance_scale": 1.0,
           "fd": 10.0, "fd_ci": (11.0, 12.0), "accuracy": 0.5, "accuracy_ci": (0.4, 0.6)}
    report_module.plot_quality({"DiT-b6": row}, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0

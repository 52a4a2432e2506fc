"""``fpdm demo``: the main job end to end at toy size, its resume, its report, and its refusals."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fixedpoint_diffusion import demo as demo_module
from fixedpoint_diffusion.cli import main as fpdm
from fixedpoint_diffusion.demo import DemoSettings, Setting, run_demo
from fixedpoint_diffusion.evaluation import ShapesClassifier, classifier_features, evaluate_samples
from fixedpoint_diffusion.experiment import Scorer
from fixedpoint_diffusion.pipeline import to_uint8
from fixedpoint_diffusion.sample_cli import load_model
from fixedpoint_diffusion.sampling import sample

# Smaller than --quick: a few training steps, 16 samples per setting, one budget.
TOY = DemoSettings.default(quick=True).replace(minutes=0.003, num_samples=16, budgets=(12,), iters=(1, 2),
                                               no_reuse_iters=(1,), classifier_steps=20, num_reference=64)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, settings=TOY, device="cpu", progress=False)


def test_every_setting_is_scored_within_its_budget(toy_run):
    out, record = toy_run
    expected = {s.key for s in TOY.settings()}
    assert set(record["settings"]) == expected == {"DiT-b12", "FPDM-b12-k1-reuse", "FPDM-b12-k2-reuse",
                                                   "FPDM-b12-k1-noreuse"}
    for key, row in record["settings"].items():
        assert row["block_passes"] <= row["budget"], key
        assert np.isfinite(row["fd"]) and 0 <= row["accuracy"] <= 1 and row["num"] == TOY.num_samples
        assert len(row["timesteps"]) == row["num_steps"]
        if row["model"] == "FPDM":
            assert row["num_steps"] == row["budget"] // (2 + row["iters_per_step"])  # timestep smoothing
            assert len(row["residual"]) == row["num_steps"]
        else:
            assert row["num_steps"] == row["budget"] // 4 and row["residual"] is None  # the toy DiT: depth 4
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(record))


def test_results_folder_has_grids_plots_and_a_report_that_links_only_existing_files(toy_run):
    out, record = toy_run
    for name in ["quality_vs_budget.png", "residuals_reuse.png", "grids/real.png",
                 *(f"grids/{key}.png" for key in record["settings"])]:
        with Image.open(out / name) as image:
            assert image.size[0] > 100, name
    with Image.open(out / "grids" / "DiT-b12.png") as image:  # 16 samples, 8 per row, tiles upscaled to 64 px
        assert image.size == (8 * 64, 2 * 64)
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    linked = set(re.findall(r"src=['\"]([^'\"]+)['\"]", html)) | set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert {"quality_vs_budget.png", "residuals_reuse.png", "grids/DiT-b12.png"} <= linked
    assert all((out / path).is_file() for path in linked)
    table = demo_module.summary_table(record)
    assert table in md and len(table.splitlines()) == 2 + len(record["settings"])
    assert "undertrained" in md


def test_a_setting_equals_sampling_and_scoring_it_by_hand(toy_run):
    """The demo's number for one setting, recomputed from the saved EMA model with the library calls."""
    out, record = toy_run
    row = record["settings"]["FPDM-b12-k2-reuse"]
    model, diffusion = load_model(out / "runs" / "fpdm" / "ema")
    classifier = ShapesClassifier.load(out / "classifier" / "classifier.pt")
    reference = Scorer.build(8, out / "classifier", num_reference=TOY.num_reference, seed=TOY.seed).reference
    labels = torch.arange(TOY.num_samples) % 8
    result = sample(model, labels, diffusion=diffusion, budget=12, iters_per_step=2, sampler="ddim", reuse=True,
                    seed=TOY.seed)
    images = to_uint8(result.samples)
    by_hand = evaluate_samples(images, labels.numpy(), classifier, reference, kid_subsets=20,
                               kid_subset_size=TOY.num_samples, seed=TOY.seed)
    assert by_hand["fd"] == pytest.approx(row["fd"], rel=1e-6)
    assert by_hand["accuracy"] == row["accuracy"]
    assert result.residuals.mean(1).tolist() == pytest.approx(row["residual"], rel=1e-6)
    feats, _ = classifier_features(classifier, images)
    assert feats.shape == (TOY.num_samples, reference.shape[1])


def test_a_rerun_resumes_without_training_or_sampling_again(toy_run, monkeypatch):
    out, record = toy_run
    steps = {name: t["steps"] for name, t in record["training"].items()}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished setting was sampled again")

    monkeypatch.setattr(Scorer, "score", refuse)
    again = run_demo(out, settings=TOY, device="cpu", progress=False)
    assert again["settings"] == json.loads(json.dumps(record["settings"]))
    assert {name: t["steps"] for name, t in again["training"].items()} == steps


def test_an_interrupted_sampling_stage_keeps_what_was_scored(toy_run, tmp_path, monkeypatch):
    out, record = toy_run
    for part in ("runs", "classifier"):  # the trained models and classifier: this test reruns sampling only
        shutil.copytree(out / part, tmp_path / part)
    shutil.copy(out / "demo.json", tmp_path / "demo.json")
    real_score = Scorer.score
    calls = []

    def score_then_stop(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(kwargs["budget"])
        return real_score(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", score_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, settings=TOY, device="cpu", progress=False)
    assert set(json.loads((tmp_path / "results.json").read_text())["settings"]) == {"DiT-b12"}
    monkeypatch.setattr(Scorer, "score", real_score)
    resumed = run_demo(tmp_path, settings=TOY, device="cpu", progress=False)
    # The same numbers as the uninterrupted run (only the wall time differs); the moved runs kept their plan.
    untimed = [{key: {k: v for k, v in row.items() if k != "seconds"} for key, row in r["settings"].items()}
               for r in (resumed, json.loads(json.dumps(record)))]
    assert untimed[0] == untimed[1]
    assert {name: t["steps"] for name, t in resumed["training"].items()} == \
        {name: t["steps"] for name, t in record["training"].items()}


def test_other_settings_in_the_same_folder_are_refused_by_name(toy_run, capsys):
    out, _ = toy_run
    with pytest.raises(FileExistsError, match=r"seed=0.*seed=1"):
        run_demo(out, settings=TOY.replace(seed=1), progress=False)
    assert fpdm(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2  # --quick's own settings differ
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("changes, match", [({"minutes": 0}, "minutes"), ({"minutes": float("nan")}, "minutes"),
                                            ({"num_samples": 4}, "num_samples"), ({"seed": -1}, "seed"),
                                            ({"budgets": ()}, "budgets"), ({"iters": (0,)}, "iters")])
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        run_demo(tmp_path / "never", settings=TOY.replace(**changes), progress=False)
    assert not (tmp_path / "never").exists()


def test_cli_bad_option_exits_2_without_creating_the_folder(tmp_path, capsys):
    assert fpdm(["demo", "--minutes", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "minutes" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_setting_keys_and_labels_are_distinct():
    settings = DemoSettings.default().settings()
    assert len({s.key for s in settings}) == len(settings)
    assert Setting("FPDM", 24, 2, False).label == "FPDM k=2, no reuse"


def test_cli_prints_the_summary_table_and_where_the_report_is(toy_run, tmp_path, capsys, monkeypatch):
    """A finished folder: the CLI resumes (nothing to do) and prints the table even with --no-progress."""
    out, record = toy_run
    for part in ("runs", "classifier", "grids"):
        shutil.copytree(out / part, tmp_path / part)
    for name in ("demo.json", "results.json"):
        shutil.copy(out / name, tmp_path / name)
    # the CLI builds its settings from its options: hand it the toy ones
    monkeypatch.setattr(DemoSettings, "default", classmethod(lambda cls, **kwargs: TOY))
    assert fpdm(["demo", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert demo_module.summary_table(record).splitlines()[0] in printed
    assert "FPDM" in printed and str(tmp_path / "report.html") in printed

"""Each benchmark script runs end to end at its smallest size and writes its JSON. Nothing here times anything."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def _load(name):
    """Import ``benchmarks/<name>.py`` as a module (the scripts import their shared ``_common`` module)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gradients_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "gradients.json"
    _load("gradients").main(["--tiny", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "Implicit()" in printed and "JFB(steps=1)" in printed
    rows = [row for problem in result["problems"] for row in problem["rows"]] if "problems" in result else None
    assert rows, sorted(result)
    implicit = [r for r in rows if r["mode"] == "Implicit()"]
    jfb1 = [r for r in rows if r["mode"] == "JFB(steps=1)"]
    assert implicit and jfb1
    # the implicit gradient is far closer to the exact one than 1-step JFB on every problem
    for a, b in zip(implicit, jfb1):
        assert a["rel_error"] < 1e-3 < b["rel_error"]


@pytest.mark.slow
def test_training_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "training.json"
    _load("training").main(["--tiny", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"FPDM-S/2", "DiT-S/2"} and "| FPDM-S/2 |" in capsys.readouterr().out
    # Parameter counts are exact, not timings: FPDM-S/2 = 3 blocks + injection MLP vs DiT-S/2's 12 blocks.
    import fixedpoint_diffusion as fd

    for name, row in rows.items():
        model = fd.create_model(name, input_size=8, num_classes=1000)
        assert row["params"] == sum(p.numel() for p in model.parameters())
    assert all(row["step_ms"] > 0 and row["saved_mib"] > 0 and row["peak_mib"] is None for row in rows.values())


@pytest.mark.slow
def test_sampling_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    result = _load("sampling").main(["--tiny", "--device", "cpu", "--budgets", "24", "--samplers", "ddim",
                                     "ddpm-counter", "--out", str(out)])
    assert {r["sampler"] for r in result["rows"]} == {"ddim", "ddpm-counter"}
    assert all(r["throughput_vs_ddim"] == 1.0 for r in result["rows"] if r["sampler"] == "ddim")
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert out.with_suffix(".png").is_file() and "| FPDM-S/2 |" in capsys.readouterr().out
    import fixedpoint_diffusion as fd

    for row in result["rows"]:
        assert row["block_passes"] <= row["budget"] and row["utilisation"] > 0
        # FLOPs per image = 2 x the model's own MAC count for one forward x the number of timesteps.
        model = fd.create_model(row["model"], input_size=8)
        x, t, y = torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        kw = {"num_iterations": row["iters_per_step"]} if row["iters_per_step"] else {}
        with torch.no_grad():
            macs = model(x, t, y, **kw).cost.macs
        assert row["gflop_per_image"] * 1e9 == pytest.approx(2 * macs * row["num_steps"], rel=1e-9)


@pytest.mark.slow
def test_quality_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "quality.json"
    result = _load("quality").main(["--tiny", "--quiet", "--work", str(tmp_path / "runs"), "--out", str(out)])
    stored = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and "| budget | DiT |" in capsys.readouterr().out
    experiments = {(r["experiment"], r["model"]) for r in stored["rows"]}
    assert experiments == {("budget", "DiT"), ("budget", "FPDM S-JFB"), ("smoothing", "FPDM S-JFB"),
                           ("reuse", "FPDM S-JFB"), ("backward", "FPDM JFB"), ("backward", "FPDM multi-step JFB")}
    from fixedpoint_diffusion.experiment import training_steps

    quality = _load("quality")
    configs = quality.make_configs(quality.parse_args(["--tiny", "--work", str(tmp_path / "runs")]))
    assert training_steps(configs, 2e9) == {name: t["steps"] for name, t in stored["training"].items()}
    assert all(r["fd_ci"][0] <= r["fd_ci"][1] and r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]
               for r in stored["rows"])
    for row in result["rows"]:
        assert row["block_passes"] <= row["budget"] and np.isfinite(row["fd"]) and row["num"] == 32
        if row["iters_per_step"]:
            assert row["num_steps"] == row["budget"] // (2 + row["iters_per_step"])


def test_startup_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "startup.json"
    record = _load("startup").main(["--rounds", "1", "--out", str(out)])
    assert {r["command"] for r in record["rows"]} == {"python", "import torch", "fpdm --help",
                                                      "fpdm sample (argument error)"}
    assert all(r["median_s"] > 0 for r in record["rows"]) and json.loads(out.read_text())["rows"]


def test_noise_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "noise.json"
    record = _load("noise").main(["--tiny", "--device", "cpu", "--out", str(out)])
    assert {r["method"] for r in record["rows"]} == {"per-sample generators", "counter_normal"}
    assert all(r["median_ms"] > 0 for r in record["rows"]) and record["ratio_generators_over_counter"] > 0
    assert json.loads(out.read_text())["shape"] == [4, 8, 8] and "counter_normal" in capsys.readouterr().out

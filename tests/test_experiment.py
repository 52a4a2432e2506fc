"""Equal-time training and the small-scale scorer behind ``fpdm demo`` and ``benchmarks/quality.py``."""

import json

import numpy as np
import pytest
import torch
from micro import micro_raw

import fixedpoint_diffusion as fd
from fixedpoint_diffusion import evaluation as ev
from fixedpoint_diffusion.experiment import Scorer, calibrate, train_for
from fixedpoint_diffusion.pipeline import to_uint8
from fixedpoint_diffusion.sample_cli import load_model


def _configs(root):
    return {"fpdm": fd.load_config(micro_raw(root / "fpdm")),
            "dit": fd.load_config(micro_raw(root / "dit", model="DiT-S/2"))}


def test_calibrate_writes_nothing_and_measures_every_config(tmp_path):
    configs = _configs(tmp_path)
    seconds = calibrate(configs, steps=2, rounds=1)
    assert set(seconds) == {"fpdm", "dit"} and all(0 < s < 10 for s in seconds.values())
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="empty"):
        calibrate({})


def test_train_for_converts_time_to_steps_and_a_rerun_resumes(tmp_path):
    configs = _configs(tmp_path)
    plan, summaries = train_for(configs, 0.005, plan_file=tmp_path / "plan.json", progress=False)
    for name, s in summaries.items():
        assert plan.steps[name] == max(1, round(0.005 * 60 / plan.seconds_per_step[name]))
        assert s.step == plan.steps[name] and (tmp_path / name / "ema").is_dir()
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["steps"] == plan.steps
    # A rerun reads the stored plan (no new measurement) and finds every run complete.
    again, resumed = train_for(configs, 0.005, plan_file=tmp_path / "plan.json", progress=False)
    assert again.steps == plan.steps and again.seconds_per_step == plan.seconds_per_step
    assert all(r.start_step == r.step == plan.steps[n] for n, r in resumed.items())
    with pytest.raises(ValueError, match="minutes"):
        train_for(configs, 0)


def test_scorer_equals_sampling_and_scoring_by_hand(tmp_path):
    configs = _configs(tmp_path)
    configs = {"fpdm": configs["fpdm"]}
    train_for(configs, 0.002, progress=False)
    model, diffusion = load_model(tmp_path / "fpdm" / "ema")
    scorer = Scorer.build(8, tmp_path, classifier_steps=3, num_reference=50)
    assert (tmp_path / "classifier.pt").is_file()
    result = scorer.score(model, diffusion, num_samples=20, batch_size=7, seed=3, budget=12, iters_per_step=2,
                          sampler="ddim", keep=5)
    # The same samples in one batch (each sample has its own seeded generator), scored directly.
    labels = torch.arange(20) % 8
    out = fd.sample(model, labels, diffusion=diffusion, seed=3, budget=12, iters_per_step=2, sampler="ddim")
    images = to_uint8(out.samples)
    direct = ev.evaluate_samples(images, labels.numpy(), scorer.classifier, scorer.reference, kid_subsets=20,
                                 kid_subset_size=20, seed=3)
    assert result["fd"] == pytest.approx(direct["fd"], rel=1e-4) and result["accuracy"] == direct["accuracy"]
    assert np.abs(result["images"].astype(int) - images[:5].astype(int)).max() <= 1
    assert result["block_passes"] == out.block_passes <= 12 and result["num_steps"] == 3
    assert len(result["residual"]) == 3 and result["iterations"] == [2, 2, 2]
    # A second build reads the stored classifier instead of training one.
    again = Scorer.build(8, tmp_path, classifier_steps=3, num_reference=50)
    assert np.allclose(again.reference, scorer.reference)


def test_an_interrupted_run_stops_the_whole_job(tmp_path, monkeypatch):
    import os
    import signal

    from fixedpoint_diffusion.train import Trainer

    configs = _configs(tmp_path)
    plan_steps = {}
    original = Trainer._train_step

    def step(self, x, y, k):
        plan_steps.setdefault(self.out_dir.name, k)
        if self.out_dir.name == "fpdm" and k == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # as if the job were killed during its first step
        return original(self, x, y, k)

    from fixedpoint_diffusion import experiment

    monkeypatch.setattr(experiment, "calibrate", lambda configs, device=None: {name: 0.1 for name in configs})
    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(KeyboardInterrupt, match="'fpdm' was interrupted at step 1"):
        train_for(configs, 0.01, progress=False)
    assert list(plan_steps) == ["fpdm"] and (tmp_path / "fpdm" / "checkpoints" / "step-00000001.pt").is_file()

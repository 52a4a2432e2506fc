"""Equal-time training and the small-scale scorer behind ``fpdm demo`` and ``benchmarks/quality.py``."""

import json

import numpy as np
import pytest
import torch
from micro import micro_raw

import fixedpoint as fp
import fixedpoint_diffusion as fd
from fixedpoint_diffusion import evaluation as ev
from fixedpoint_diffusion.experiment import Scorer, calibrate, train_for
from fixedpoint_diffusion.pipeline import to_uint8
from fixedpoint_diffusion.runs import load_model


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
    result = scorer.score(model, diffusion, num_samples=20, batch_size=7, seed=3, budget=12, iterations_per_timestep=2,
                          sampler="ddim", keep=5)
    # The same samples in one batch (each sample has its own seeded generator), scored directly.
    labels = torch.arange(20) % 8
    out = fd.sample(model, labels, diffusion=diffusion, seed=3, budget=12, iterations_per_timestep=2, sampler="ddim")
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

    from fixedpoint_diffusion.training import Trainer

    configs = _configs(tmp_path)
    plan_steps = {}
    original = Trainer.train_step

    def step(self, x, y, k):
        plan_steps.setdefault(self.out_dir.name, k)
        if self.out_dir.name == "fpdm" and k == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # as if the job were killed during its first step
        return original(self, x, y, k)

    from fixedpoint_diffusion import experiment

    monkeypatch.setattr(experiment, "calibrate", lambda configs, device=None: {name: 0.1 for name in configs})
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt, match="'fpdm' was interrupted at step 1"):
        train_for(configs, 0.01, progress=False)
    assert list(plan_steps) == ["fpdm"] and (tmp_path / "fpdm" / "checkpoints" / "step-00000001.pt").is_file()


# ----- equal training compute ------------------------------------------------------------------------------------


def _counted_training_macs(model, batch: int) -> float:
    """Multiply-accumulates of one real training step (forward + backward), counted by torch's FlopCounterMode
    (matrix products and attention; 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, cfg.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).out.square().mean().backward()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("kind, extra", [("DiT", {"depth": 3}),
                                         ("FPDM", {"backward": {"name": "stochastic_jfb", "min_no_grad": 2,
                                                                "max_no_grad": 2, "min_with_grad": 3,
                                                                "max_with_grad": 3}}),
                                         ("FPDM", {"backward": {"name": "jfb", "steps": 2}, "max_steps": 4})])
def test_training_macs_agree_with_torchs_flop_counter(kind, extra):
    """The analytic cost per step against an independent count of a real step; 3x-forward is the convention,
    the counter sees the true backward (no input gradient for the first layer, so slightly less)."""
    model = fd.create_model(f"{kind}-S/2", input_size=8, in_channels=3, num_classes=8, hidden_size=64, num_heads=2,
                            **extra).train()
    expected = model.training_macs(4)
    counted = _counted_training_macs(model, 4)
    assert counted == pytest.approx(expected, rel=0.06)


def test_stochastic_jfb_training_macs_are_the_mean_over_its_draws():
    model = fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=8, hidden_size=32, num_heads=2,
                            backward=fp.StochasticJFB(min_no_grad=0, max_no_grad=2, min_with_grad=1,
                                                      max_with_grad=3))
    fixed = [fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=8, hidden_size=32, num_heads=2,
                             backward=fp.StochasticJFB(min_no_grad=n, max_no_grad=n, min_with_grad=m,
                                                       max_with_grad=m)).training_macs(8)
             for n in range(3) for m in range(1, 4)]
    assert model.training_macs(8) == pytest.approx(sum(fixed) / len(fixed), rel=1e-12)


def test_training_steps_give_every_config_the_same_compute(tmp_path):
    from fixedpoint_diffusion.experiment import training_steps

    configs = {"FPDM": fd.load_config("shapes-fpdm"), "DiT": fd.load_config("shapes-dit")}
    macs = {"FPDM": 7.051542528e9, "DiT": 9.175891968e9}  # per step at batch 64, from the formulas by hand
    steps = training_steps(configs, 12000 * 9_175_891_968)
    for name in configs:
        assert abs(steps[name] * macs[name] - 12000 * 9_175_891_968) <= macs[name] / 2
    assert steps == {"FPDM": 15615, "DiT": 12000}  # the shipped pair's configs
    for bad in (0, -1.0, float("inf"), True, "1e12"):
        with pytest.raises(ValueError, match="macs"):
            training_steps(configs, bad)


def test_train_equal_compute_is_reproducible_and_resumes(tmp_path):
    from fixedpoint_diffusion.experiment import train_equal_compute, training_steps

    runs = []
    for name in ("a", "b"):
        configs = _configs(tmp_path / name)
        summaries = train_equal_compute(configs, 3e8, progress=False)
        runs.append({k: load_model(s.out_dir / "ema")[0].state_dict() for k, s in summaries.items()})
        assert {k: s.step for k, s in summaries.items()} == training_steps(configs, 3e8)
    for key in runs[0]:
        for p, q in zip(runs[0][key].values(), runs[1][key].values()):
            assert torch.equal(p, q)
    again = train_equal_compute(_configs(tmp_path / "a"), 3e8, progress=False)  # finished: nothing to train
    assert all(s.start_step == s.step for s in again.values())


# ----- bootstrap intervals -----------------------------------------------------------------------------------------


def test_batched_bootstrap_fd_equals_frechet_distance():
    from fixedpoint_diffusion.scoring import _resample_indices, _resampled_fd

    rng = np.random.default_rng(0)
    features, reference = rng.normal(size=(60, 12)), rng.normal(size=(300, 12)) + 0.3
    idx = _resample_indices(60, 12, seed=1)
    expected = [ev.frechet_distance(features[i], reference) for i in idx]
    assert _resampled_fd(features, idx, reference) == pytest.approx(expected, rel=1e-9)


def test_accuracy_interval_matches_the_binomial_standard_error():
    from fixedpoint_diffusion.experiment import bootstrap

    rng = np.random.default_rng(0)
    n, p = 400, 0.7
    correct = rng.random(n) < p
    features = rng.normal(size=(n, 4))
    ci = bootstrap(features, correct, rng.normal(size=(500, 4)), resamples=2000)["accuracy"]
    acc = correct.mean()
    half = 1.96 * np.sqrt(acc * (1 - acc) / n)
    assert ci[0] == pytest.approx(acc - half, abs=0.012) and ci[1] == pytest.approx(acc + half, abs=0.012)


def test_fd_interval_covers_the_fd_of_fresh_samples():
    """Independent route: the spread of FD over fresh sample sets from the same distribution; the basic bootstrap
    interval of one set must contain most of them (the percentile interval, shifted up by the duplicates, would
    not contain the estimate itself)."""
    from fixedpoint_diffusion.experiment import bootstrap

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(2000, 8))
    draw = lambda: rng.normal(size=(400, 8)) * 1.1 + 0.1  # noqa: E731
    fresh = [ev.frechet_distance(draw(), reference) for _ in range(40)]
    ci = bootstrap(draw(), np.ones(400, bool), reference, resamples=400)["fd"]
    inside = np.mean([(ci[0] <= v <= ci[1]) for v in fresh])
    assert inside >= 0.75


def test_paired_difference_of_a_setting_with_itself_is_exactly_zero_and_pairs_cancel_shared_noise():
    from fixedpoint_diffusion.experiment import paired_difference

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(500, 6))
    base = rng.normal(size=(200, 6))
    a = {"features": base, "correct": rng.random(200) < 0.5}
    a.update(fd=ev.frechet_distance(base, reference), accuracy=a["correct"].mean())
    same = paired_difference(a, a, reference)
    assert same["fd"] == (0.0, 0.0, 0.0) and same["accuracy"] == (0.0, 0.0, 0.0)
    shifted = {"features": base + 0.2, "correct": a["correct"]}
    shifted.update(fd=ev.frechet_distance(shifted["features"], reference), accuracy=a["accuracy"])
    diff = paired_difference(shifted, a, reference)
    assert diff["fd"][1] > 0  # a small shift of the same samples is a clear, significant difference
    with pytest.raises(ValueError, match="same number"):
        paired_difference(a, {**a, "features": base[:10]}, reference)

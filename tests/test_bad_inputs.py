"""Bad input to the Python API is refused before any compute, with a ValueError naming the argument."""

import pytest
import torch

import fixedpoint_diffusion as fd

MICRO = {"input_size": 8, "in_channels": 3, "num_classes": 8, "hidden_size": 32, "num_heads": 2}


@pytest.mark.parametrize("name, overrides, match", [
    ("DiT-S/2", {"depth": -1}, "depth"),
    ("DiT-S/2", {"depth": True}, "depth"),
    ("DiT-S/2", {"num_classes": -1}, "num_classes"),
    ("DiT-S/2", {"input_size": 0}, "input_size"),
    ("DiT-S/2", {"hidden_size": -32}, "hidden_size"),
    ("DiT-S/2", {"hidden_size": 30, "num_heads": 4}, "num_heads"),
    ("DiT-S/2", {"in_channels": 2.5}, "in_channels"),
    ("DiT-S/2", {"mlp_ratio": float("nan")}, "mlp_ratio"),
    ("DiT-S/2", {"learn_sigma": "yes"}, "learn_sigma"),
    ("FPDM-S/2", {"rtol": float("inf")}, "rtol"),
    ("FPDM-S/2", {"atol": -1.0}, "atol"),
    ("FPDM-S/2", {"max_steps": True}, "max_steps"),
    ("FPDM-S/2", {"pre_depth": True}, "pre_depth"),
    ("FPDM-S/2", {"post_depth": -1}, "post_depth"),
])
def test_create_model_refuses(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        fd.create_model(name, **{**MICRO, **overrides})


@pytest.fixture(scope="module")
def fpdm():
    return fd.create_model("FPDM-S/2", **MICRO).eval()


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 24, "allocation": [1.5, 2.7]}, "allocation"),
    ({"budget": 24, "allocation": ["a", "b"]}, "allocation"),
    ({"budget": 24, "allocation": [2, True]}, "allocation"),
    ({"budget": 24, "allocation": [4, 1], "iterations_per_timestep": 3}, "iterations_per_timestep"),
    ({"budget": 24, "iterations_per_timestep": 2, "allocation": "increasing", "ratio": float("inf")}, "ratio"),
    ({"budget": 24, "iterations_per_timestep": 2, "allocation": "sideways"}, "allocation"),
])
def test_plan_refuses(fpdm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.plan(fpdm, **kwargs)


@pytest.mark.parametrize("labels, kwargs, match", [
    ([0.6, 1.7], {}, "class_labels"),
    ([True, False], {}, "class_labels"),
    ([0, 1], {"guidance_scale": float("nan")}, "guidance_scale"),
    ([0, 1], {"guidance_scale": float("inf")}, "guidance_scale"),
    ([0, 1], {"eta": -0.5}, "eta"),
    ([0, 1], {"seed": -1}, "seed"),
    ([0, 1], {"seed": 1.5}, "seed"),
    ([0, 1], {"device": "meta"}, "device"),
    pytest.param([0, 1], {"device": "cuda"}, "device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_sample_refuses(fpdm, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fd.sample(fpdm, labels, budget=6, iterations_per_timestep=1, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "", "budget": 6}, "model"),
    ({"model": "FPDM", "budget": 0}, "budget"),
    ({"model": "FPDM", "budget": 6, "iters_per_step": 1.5}, "iters_per_step"),
    ({"model": "FPDM", "budget": 6, "iters_per_step": 2, "allocation": "adaptive"}, "allocation"),
    ({"model": "FPDM", "budget": 6, "guidance_scale": float("nan")}, "guidance_scale"),
])
def test_experiment_setting_refuses(kwargs, match):
    from fixedpoint_diffusion.experiment import Setting

    with pytest.raises(ValueError, match=match):
        Setting(**kwargs)


@pytest.mark.parametrize("kwargs, match", [({"level": 95}, "level"), ({"level": 1.0}, "level"),
                                           ({"resamples": 3}, "resamples"), ({"short": True}, "correct")])
def test_bootstrap_refuses(kwargs, match):
    import numpy as np

    from fixedpoint_diffusion.experiment import bootstrap

    rng = np.random.default_rng(0)
    features, reference = rng.normal(size=(20, 3)), rng.normal(size=(50, 3))
    correct = np.ones(10 if kwargs.pop("short", False) else 20, bool)
    with pytest.raises(ValueError, match=match):
        bootstrap(features, correct, reference, **kwargs)


def test_train_equal_compute_refuses_a_bad_checkpoint_count(tmp_path):
    from fixedpoint_diffusion.experiment import train_equal_compute

    with pytest.raises(ValueError, match="checkpoints"):
        train_equal_compute({"a": fd.load_config("tiny")}, 1e9, checkpoints=0)
    assert not (tmp_path / "runs").exists()


def test_pipeline_refuses_a_generator_that_is_not_one(fpdm):
    pipe = fd.FPDMPipeline(transformer=fpdm, scheduler=fd.scheduler_from_diffusion(fd.Diffusion()))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        pipe([0], num_inference_steps=2, generator=123)

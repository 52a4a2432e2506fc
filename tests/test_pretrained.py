"""The shipped models: what they are, where they came from, and a quality regression test.

The regression test samples a fixed set from the shipped FPDM and DiT and asserts that the shipped classifier
recognises their classes; any change that breaks the models, the samplers, the checkpoint loading or the
classifier makes it fail.
"""

import json

import numpy as np
import pytest
import torch

import fixedpoint_diffusion as fd
from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.data import Shapes
from fixedpoint_diffusion.evaluation import classifier_features
from fixedpoint_diffusion.experiment import HELD_OUT_SEED
from fixedpoint_diffusion.pipeline import to_uint8

# Bars about 0.13 (3 binomial standard deviations at 128 samples) under the shipped models' accuracy on this exact
# set (128 samples, seed 12345, budget 48, DDIM, unguided; measured 2026-12-04 on the 2-core VM, torch 2.13.0+cpu):
# FPDM 0.633, DiT 0.789. A broken sampler, model, checkpoint or classifier gives about chance (0.125).
BARS = {"shapes-fpdm": 0.50, "shapes-dit": 0.65}
SAMPLING = {"shapes-fpdm": {"budget": 48, "iterations_per_timestep": 2}, "shapes-dit": {"budget": 48}}


@pytest.mark.parametrize("name", pretrained.MODELS)
def test_shipped_models_sample_recognisable_shapes(name):
    model, diffusion = pretrained.load(name)
    labels = torch.arange(128) % 8
    out = fd.sample(model, labels, diffusion=diffusion, sampler="ddim", seed=12345, **SAMPLING[name])
    _, predicted = classifier_features(pretrained.classifier(), to_uint8(out.samples))
    accuracy = float((predicted == labels.numpy()).mean())
    assert accuracy >= BARS[name], f"{name}: accuracy {accuracy:.3f} of its samples, bar {BARS[name]}"


def test_shipped_classifier_recognises_held_out_real_images():
    real = Shapes(512, 16, seed=HELD_OUT_SEED + 99)
    _, predicted = classifier_features(pretrained.classifier(), to_uint8(real.images))
    assert (predicted == real.labels.numpy()).mean() >= 0.98


@pytest.mark.parametrize("name", pretrained.MODELS)
def test_shipped_models_match_their_configs_and_carry_provenance(name):
    model, diffusion = pretrained.load(name)
    info = pretrained.provenance(name)
    for key in ("command", "seed", "steps", "training_macs", "device", "wall_seconds", "date", "torch"):
        assert info.get(key) is not None, key
    shipped = fd.load_config(name)  # the config that trained it
    expected = dict(shipped.model)
    expected.pop("name")
    assert {k: model.config[k] for k in expected} == expected
    assert info["steps"] == shipped.train.max_steps
    assert info["training_macs"] == pytest.approx(info["steps"] * model.training_macs(shipped.train.global_batch_size))
    assert diffusion.prediction == shipped.diffusion.prediction
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_the_pair_was_trained_for_equal_compute_and_fits_in_10_mb():
    macs = [pretrained.provenance(name)["training_macs"] for name in pretrained.MODELS]
    per_step = [pretrained.provenance(name)["training_macs_per_step"] for name in pretrained.MODELS]
    assert abs(macs[0] - macs[1]) <= max(per_step) / 2  # equal to within one step
    size = sum(f.stat().st_size for name in pretrained.MODELS for f in pretrained.path(name).iterdir())
    assert size <= 10 * 2**20


def test_classifier_provenance_and_bad_names():
    info = json.loads((pretrained.path("shapes-classifier") / "provenance.json").read_text())
    assert info["held_out_accuracy"] >= 0.98 and info["steps"] == 400
    with pytest.raises(ValueError, match="name must be one of"):
        pretrained.load("shapes-classifier")
    with pytest.raises(ValueError, match="name must be one of"):
        pretrained.path("imagenet")
    assert np.isfinite(pretrained.classifier().head.weight.numpy()).all()


def test_sample_then_eval_against_the_embedded_reference_with_the_shipped_classifier(tmp_path, capsys):
    """The documented path from a model to a score, with no file but the samples: `fpdm eval X shapes
    --classifier shapes`; its accuracy equals the shipped classifier's on the same images."""
    from fixedpoint_diffusion.cli import main as fpdm
    from fixedpoint_diffusion.evaluation import evaluate

    out = tmp_path / "s"
    assert fpdm(["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "24", "--sampler", "ddim",
                 "--num-samples", "16", "--classes", "0,1,2,3,4,5,6,7", "--out", str(out), "--no-progress"]) == 0
    assert fpdm(["eval", str(out / "samples.npz"), "shapes", "--classifier", "shapes"]) == 0
    printed = capsys.readouterr().out
    assert "vs 2000 images" in printed and "class accuracy" in printed
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    _, predicted = classifier_features(pretrained.classifier(), images)
    result = evaluate(str(out / "samples.npz"), "shapes", classifier="shapes", kid_subset_size=16)
    assert result["accuracy"] == float((predicted == labels).mean()) and result["num_second"] == 2000


def test_from_pretrained_is_quiet_without_accelerate(capfd):
    import importlib.util

    fd.FPDM.from_pretrained(pretrained.path("shapes-fpdm"))
    captured = capfd.readouterr()
    if importlib.util.find_spec("accelerate") is None:
        assert "accelerate" not in captured.err + captured.out


def test_sample_grid_tiles_are_at_least_64_px(tmp_path):
    from PIL import Image

    from fixedpoint_diffusion.cli import main as fpdm

    assert fpdm(["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "6", "--sampler", "ddim",
                 "--num-samples", "4", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    with Image.open(tmp_path / "o" / "grid.png") as grid:
        assert grid.size == (2 * 64, 2 * 64)  # 4 samples of 16 px, 2 per row, 4x

import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from oracle import GaussianOracle

import fixedpoint_diffusion as fd
from fixedpoint_diffusion import cli
from fixedpoint_diffusion.budget import _distribute, spaced_timesteps

# --- the samplers against the exact denoiser of Gaussian data ----------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction, zero_snr", [("v", True), ("v", False), ("epsilon", False)])
def test_samplers_reach_the_data_distribution(sampler, prediction, zero_snr):
    diffusion = fd.Diffusion(prediction=prediction, zero_terminal_snr=zero_snr)
    means, std = torch.tensor([1.0, -0.5]), 0.5
    oracle = GaussianOracle(diffusion, means, std)
    labels = torch.arange(800) % 2
    errors = []
    for steps in (10, 50, 250):
        x = fd.sample(oracle, labels, diffusion=diffusion, num_timesteps=steps, sampler=sampler, seed=1).samples
        for c in (0, 1):
            assert abs(x[labels == c].mean().item() - means[c].item()) < 0.02
        errors.append(abs(x.std(dim=(1, 2, 3)).mean().item() - std) + abs(x[labels == 0].std().item() - std))
    # The spread is too small with few steps and converges as the steps grow.
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors
    assert oracle.calls == 10 + 50 + 250


def test_ddim_handles_step_counts_that_do_not_divide_the_training_steps():
    diffusion = fd.Diffusion()
    oracle = GaussianOracle(diffusion, torch.tensor([0.7]), 0.3, learn_sigma=False)
    for steps in (7, 33, 999, 1000):
        ts = spaced_timesteps(1000, steps)
        assert ts[0] == 999 and ts[-1] == 0 and len(set(ts)) == steps
        x = fd.sample(oracle, torch.zeros(400, dtype=torch.long), diffusion=diffusion, num_timesteps=steps,
                      sampler="ddim").samples
        assert abs(x.mean().item() - 0.7) < 0.02 and torch.isfinite(x).all()


# --- budgets -------------------------------------------------------------------------------------------------------

explicit_st = st.integers(0, 4)


@settings(max_examples=200, deadline=None)
@given(explicit=explicit_st, budget=st.integers(1, 2000), k=st.integers(1, 30),
       allocation=st.sampled_from(["constant", "increasing", "decreasing", "adaptive"]),
       ratio=st.floats(1.0, 10.0))
def test_budget_from_iterations_per_step(explicit, budget, k, allocation, ratio):
    try:
        s = fd.plan(explicit_passes=explicit, budget=budget, iterations_per_timestep=k, allocation=allocation,
                    ratio=ratio)
    except ValueError as err:  # only "too small for one timestep" or "more timesteps than training has"
        assert budget < explicit + k or budget // (explicit + k) > 1000, err
        return
    assert s.num_timesteps == budget // (explicit + k)
    assert s.block_passes <= budget and min(s.iterations) >= 1
    if allocation == "constant":
        assert set(s.iterations) == {k}
    _check_shape(s)


@settings(max_examples=200, deadline=None)
@given(explicit=explicit_st, budget=st.integers(1, 3000), steps=st.integers(1, 200),
       allocation=st.sampled_from(["constant", "increasing", "decreasing", "adaptive"]), ratio=st.floats(1.0, 10.0))
@example(explicit=0, budget=3, steps=2, allocation="increasing", ratio=1.0)  # equal weights: ties go late
def test_budget_from_number_of_timesteps(explicit, budget, steps, allocation, ratio):
    try:
        s = fd.plan(explicit_passes=explicit, budget=budget, num_timesteps=steps, allocation=allocation, ratio=ratio)
    except ValueError as err:
        assert budget < steps * (explicit + 1), err
        return
    assert s.num_timesteps == steps and s.block_passes == budget and min(s.iterations) >= 1  # all of it, no more
    if allocation == "constant":
        assert max(s.iterations) - min(s.iterations) <= 1
    _check_shape(s)


@settings(max_examples=200, deadline=None)
@given(explicit=explicit_st, budget=st.integers(1, 3000), steps=st.integers(1, 200), ratio=st.floats(1.0, 10.0))
@example(explicit=2, budget=48, steps=12, ratio=3.0)  # rounding noise once made "decreasing" all 2s here
def test_decreasing_is_the_mirror_of_increasing(explicit, budget, steps, ratio):
    try:
        up, down = (fd.plan(explicit_passes=explicit, budget=budget, num_timesteps=steps, allocation=a, ratio=ratio)
                    for a in ("increasing", "decreasing"))
    except ValueError:
        return
    assert down.iterations == up.iterations[::-1]


def _check_shape(s):
    it = np.array(s.iterations)
    if s.allocation == "increasing":
        assert (np.diff(it) >= 0).all()
    if s.allocation == "decreasing":
        assert (np.diff(it) <= 0).all()
    assert list(s.timesteps) == sorted(s.timesteps, reverse=True) and len(set(s.timesteps)) == s.num_timesteps


@given(total=st.integers(1, 500), weights=st.lists(st.floats(0.1, 10.0), min_size=1, max_size=50))
def test_distribute_is_exact(total, weights):
    if total < len(weights):
        return
    counts = _distribute(total, weights)
    assert sum(counts) == total and min(counts) >= 1
    up = _distribute(total, sorted(weights))
    down = _distribute(total, sorted(weights, reverse=True), prefer_late=False)
    assert (np.diff(up) >= 0).all() and (np.diff(down) <= 0).all()


def test_plan_errors_and_dit_budgets():
    with pytest.raises(ValueError, match="too small for one timestep"):
        fd.plan(explicit_passes=2, budget=2, iterations_per_timestep=1)
    with pytest.raises(ValueError, match="iterations_per_timestep must be an int >= 1"):
        fd.plan(explicit_passes=2, budget=100, iterations_per_timestep=0)
    with pytest.raises(ValueError, match="allocation must be one of"):
        fd.plan(explicit_passes=2, budget=100, iterations_per_timestep=2, allocation="random")
    with pytest.raises(ValueError, match="over the budget"):
        fd.plan(explicit_passes=2, budget=9, allocation=[3, 3])  # costs 2 * 2 + 6 = 10
    assert fd.plan(explicit_passes=2, allocation=[3, 1, 2]).iterations == (3, 1, 2)
    dit = fd.create_model("DiT-S/2", input_size=8, depth=4)
    s = fd.plan(dit, budget=30)
    assert s.num_timesteps == 7 and s.iterations is None and s.block_passes == 28
    with pytest.raises(ValueError, match="fixed-point models only"):
        fd.plan(dit, budget=30, iterations_per_timestep=2)
    # Paper footnote 4: 280 blocks = 1 pre + 26 iterations + 1 post over 10 timesteps.
    fpdm = fd.create_model("FPDM-S/2", input_size=8)
    assert fd.plan(fpdm, budget=280, iterations_per_timestep=26).num_timesteps == 10
    assert fd.plan(fpdm, budget=280, iterations_per_timestep=8).num_timesteps == 28


# --- the sampler with real models -------------------------------------------------------------------------------


def _tiny_fpdm(**kw):
    torch.manual_seed(0)
    model = fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                            **kw)
    for name, p in model.named_parameters():  # leave the zero init so that blocks and solves do something
        if "adaLN" in name or "final_layer" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_block_passes_counted_by_hooks_equal_the_report():
    model = _tiny_fpdm()
    calls = []
    for module in model.modules():
        if type(module).__name__ == "DiTBlock":
            module.register_forward_hook(lambda *a: calls.append(1))
    for kwargs in ({"budget": 40, "iterations_per_timestep": 3},
                   {"budget": 40, "num_timesteps": 5, "allocation": "increasing"},
                   {"budget": 40, "num_timesteps": 5, "allocation": "adaptive", "tol": 0.3}):
        for guidance in (1.0, 3.0):
            calls.clear()
            out = fd.sample(model, [0, 1, 3], guidance_scale=guidance, **kwargs)
            assert len(calls) == out.block_passes <= 40
            assert sum(out.iterations) + 2 * out.schedule.num_timesteps == out.block_passes
            assert out.residuals.shape == (out.schedule.num_timesteps, 3)
            batch = 6 if guidance != 1.0 else 3
            macs = model._cost(batch, 0).macs * out.schedule.num_timesteps + (
                model._cost(batch, 1).macs - model._cost(batch, 0).macs) * sum(out.iterations)
            assert out.macs == macs


def test_adaptive_carries_unused_iterations_forward():
    model = _tiny_fpdm()
    loose = fd.sample(model, [0, 1], budget=60, num_timesteps=6, allocation="adaptive", tol=0.5)
    tight = fd.sample(model, [0, 1], budget=60, num_timesteps=6, allocation="adaptive", tol=1e-9)
    assert tight.iterations[:-1] == list(tight.schedule.iterations[:-1])  # never converges: uses its allowance
    assert sum(loose.iterations) < sum(tight.iterations) <= 60 - 12
    # Whatever a timestep leaves is available to the next one: its allowance grows.
    allowance, carry = [], 0
    for planned, spent in zip(loose.schedule.iterations, loose.iterations):
        allowance.append(planned + carry)
        assert 1 <= spent <= planned + carry
        carry = planned + carry - spent


def test_reuse_starts_each_solve_from_the_previous_solution(monkeypatch):
    from fixedpoint_diffusion import models

    model = _tiny_fpdm()
    seen, real_solve = [], models.fp.solve
    pre_out = []
    model.blocks_pre[-1].register_forward_hook(lambda m, i, o: pre_out.append(o))

    def spy(f, z0, **kw):
        sol = real_solve(f, z0, **kw)
        seen.append((z0, sol.z))
        return sol

    monkeypatch.setattr(models.fp, "solve", spy)
    for guidance in (1.0, 2.0):
        seen.clear()
        pre_out.clear()
        fd.sample(model, [0, 2], num_timesteps=4, iterations_per_timestep=2, reuse=True, guidance_scale=guidance)
        assert torch.equal(seen[0][0], pre_out[0])
        for (z0_next, _), (_, z_prev) in zip(seen[1:], seen[:-1]):
            assert torch.equal(z0_next, z_prev)  # per sample, both guidance branches
        seen.clear()
        pre_out.clear()
        fd.sample(model, [0, 2], num_timesteps=4, iterations_per_timestep=2, reuse=False, guidance_scale=guidance)
        assert all(torch.equal(z0, h) for (z0, _), h in zip(seen, pre_out))


def test_determinism_sharding_and_guidance_scale_one():
    model = _tiny_fpdm()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    kw = {"budget": 30, "iterations_per_timestep": 2, "seed": 5}
    a = fd.sample(model, labels, **kw).samples
    assert torch.equal(a, fd.sample(model, labels, **kw).samples)
    assert not torch.equal(a, fd.sample(model, labels, **{**kw, "seed": 6}).samples)
    for world in (2, 3):
        shards = torch.cat([torch.cat([fd.sample(model, labels[b.start:b.stop], indices=list(b), **kw).samples
                                       for b in fd.batches_for_rank(7, 3, rank, world)]) for rank in range(world)])
        order = [i for rank in range(world) for b in fd.batches_for_rank(7, 3, rank, world) for i in b]
        one = torch.cat([fd.sample(model, labels[b.start:b.stop], indices=list(b), **kw).samples
                         for b in fd.batches_for_rank(7, 3)])
        assert torch.equal(shards[torch.argsort(torch.tensor(order))], one)
    # A sample does not depend on the other samples' noise: one sample alone gives the same image up to rounding.
    alone = fd.sample(model, labels[3:4], indices=[3], **kw).samples
    assert torch.allclose(alone[0], a[3], atol=1e-5)
    # Guidance at scale 1 through the guided path (cond/uncond batch) equals the unguided model.
    near_one = fd.sample(model, labels, guidance_scale=1.0 + 1e-7, **kw).samples
    assert torch.allclose(near_one, a, atol=1e-4)
    assert not torch.allclose(fd.sample(model, labels, guidance_scale=4.0, **kw).samples, a, atol=1e-3)


def test_guidance_modes():
    diffusion = fd.Diffusion()
    oracle = GaussianOracle(diffusion, torch.tensor([1.0, -1.0]), 0.2, channels=4)
    labels = torch.zeros(200, dtype=torch.long)
    plain = fd.sample(oracle, labels, num_timesteps=20, sampler="ddim").samples
    full = fd.sample(oracle, labels, num_timesteps=20, sampler="ddim", guidance_scale=2.0).samples
    three = fd.sample(oracle, labels, num_timesteps=20, sampler="ddim", guidance_scale=2.0,
                      guidance_channels="official_3").samples
    # Guidance pushes away from the null class (mean 0): class 0's mean moves beyond 1 on the guided channels.
    assert full.mean().item() > plain.mean().item() + 0.3
    assert torch.allclose(three[:, 3], plain[:, 3]) and torch.allclose(three[:, :3], full[:, :3])


def test_sample_errors_before_compute():
    model = _tiny_fpdm()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\)"):
        fd.sample(model, [0, 4], budget=30, iterations_per_timestep=2)
    with pytest.raises(ValueError, match="too small for one timestep"):
        fd.sample(model, [0], budget=3, iterations_per_timestep=2)
    with pytest.raises(ValueError, match="iterations_per_timestep must be an int >= 1"):
        fd.sample(model, [0], budget=30, iterations_per_timestep=0)
    one_class = fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=1, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        fd.sample(one_class, [0], budget=30, iterations_per_timestep=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="sampler must be"):
        fd.sample(model, [0], budget=30, iterations_per_timestep=2, sampler="euler")
    assert not calls
    out = fd.sample(one_class, None, num_samples=2, budget=12, iterations_per_timestep=2)  # unconditional: null class
    assert out.samples.shape == (2, 3, 8, 8) and out.labels.tolist() == [1, 1]


# --- pipeline and command line -----------------------------------------------------------------------------------


def test_pipeline_round_trip(tmp_path):
    model = _tiny_fpdm()
    pipe = fd.FPDMPipeline(transformer=model, scheduler=fd.scheduler_from_diffusion(fd.Diffusion()))
    out = pipe([0, 1], budget=20, iterations_per_timestep=2, output_type="np", seed=3)
    assert out.images.shape == (2, 8, 8, 3) and out.images.dtype == np.uint8 and out.result.block_passes <= 20
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = fd.FPDMPipeline.from_pretrained(tmp_path / "pipe")
    again = loaded([0, 1], budget=20, iterations_per_timestep=2, output_type="np", seed=3)
    assert np.array_equal(out.images, again.images)
    assert fd.diffusion_from_scheduler(loaded.scheduler).zero_terminal_snr is True
    pil = loaded([2], budget=20, iterations_per_timestep=2, seed=3).images
    assert pil[0].size == (8, 8)


def test_fpdm_sample_command(tmp_path, capsys):
    model = _tiny_fpdm()
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "diffusion.json").write_text(json.dumps({"prediction": "v", "zero_terminal_snr": True}))
    assert cli.main(["sample", "--model", str(tmp_path / "model"), "--budget", "40", "--iters", "3",
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "8 timesteps, 40 block passes per image (budget 40)" in printed and "999" in printed
    out = tmp_path / "out"
    args = ["sample", "--model", str(tmp_path / "model"), "--budget", "20", "--iters", "3", "--num-samples", "5",
            "--batch-size", "2", "--out", str(out), "--cfg-scale", "2", "--no-progress"]
    capsys.readouterr()
    assert cli.main(args) == 0
    log = capsys.readouterr().out.splitlines()  # --no-progress: plain lines a log can follow, then the summary
    assert "sampled 2/5 images" in log[0] and "images/s" in log[0] and "sampled 5/5 images" in log[-2]
    with np.load(out / "samples.npz") as data:
        first, labels = data["arr_0"], data["arr_1"]
    assert first.shape == (5, 8, 8, 3) and first.dtype == np.uint8 and len(labels) == 5
    assert len(list((out / "samples").glob("*.png"))) == 5 and (out / "grid.png").is_file()
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["schedule"]["block_passes_per_image"] == 20 and len(diag["batches"]) == 3
    # Same seed, same images; the per-sample seeds make the batch size irrelevant up to rounding.
    assert cli.main(args[:-1] + ["--out", str(tmp_path / "again"), "--no-progress"]) == 0
    with np.load(tmp_path / "again" / "samples.npz") as again:
        assert np.array_equal(again["arr_0"], first)
    for bad, message in ((["--budget", "3", "--iters", "3"], "too small"), (["--classes", "0,9"], "--classes"),
                         (["--budget", "20", "--iters", "0"], "--iters must be")):
        code = cli.main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x"),
                         "--num-samples", "1", *bad] + ([] if "--budget" in bad else ["--budget", "20", "--iters",
                                                                                       "2"]))
        assert code == 2 and message in capsys.readouterr().err


def test_the_sampling_docs_python_examples_run(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "sampling.md").read_text()
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
        exec(compile(block, "docs/sampling.md", "exec"), namespace)
    assert capsys.readouterr().out.split("\n")[:2] == ["28", "(6, 7, 8) (16, 17, 18) 280"]
    assert namespace["out"].block_passes <= 60 and len(namespace["images"]) == 2


@pytest.mark.slow
def test_fpdm_sample_under_torchrun_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from test_train import _env, _free_port

    model = _tiny_fpdm()
    model.save_pretrained(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--budget", "20", "--iters", "2", "--num-samples", "7",
              "--batch-size", "2", "--no-progress", "--device", "cpu"]
    assert cli.main(["sample", *common, "--out", str(tmp_path / "one")]) == 0
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "fixedpoint_diffusion", "sample", *common, "--out",
           str(tmp_path / "two")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with np.load(tmp_path / "one" / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_pipeline_takes_diffusers_arguments_with_defaults():
    from fixedpoint_diffusion import pretrained

    model, diffusion = pretrained.load("shapes-fpdm")
    pipe = fd.FPDMPipeline(transformer=model, scheduler=fd.scheduler_from_diffusion(diffusion),
                           id2label=dict(enumerate(fd.Shapes.classes)))
    labels = pipe.get_label_ids(["disc-warm", "cross-cool"])
    assert labels == [0, 7]
    out = pipe(labels, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and out.result.schedule.num_timesteps == 5
    assert out.result.schedule.iterations == (2,) * 5  # the FPDM default: 2 iterations per timestep
    again = pipe(labels, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="np",
                 return_dict=False)
    assert isinstance(again, tuple) and np.array_equal(again[0], out.images)  # the generator seeds the noise
    assert pipe(labels, output_type="np").result.schedule.num_timesteps == 50  # no budget, no steps: 50 timesteps
    by_budget = pipe(labels, budget=24, iterations_per_timestep=2, output_type="np", guidance_scale=2.0)
    assert by_budget.result.block_passes <= 24
    with pytest.raises(TypeError, match="FPDMPipeline got unexpected argument"):
        pipe(labels, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="FPDMPipeline.get_label_ids: unknown label"):
        pipe.get_label_ids("tabby")


def test_residual_plot_has_an_iterations_panel_only_when_iterations_vary(tmp_path):
    from PIL import Image

    model = _tiny_fpdm()
    constant = fd.sample(model, [0, 1], budget=20, iterations_per_timestep=2, sampler="ddim")
    adaptive = fd.sample(model, [0, 1], budget=20, iterations_per_timestep=2, allocation="increasing",
                         sampler="ddim")
    assert len(set(constant.iterations)) == 1 and len(set(adaptive.iterations)) > 1
    fd.plot_residuals({"constant": constant}, str(tmp_path / "one.png"))
    fd.plot_residuals({"constant": constant, "increasing": adaptive}, str(tmp_path / "two.png"))
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert one.width < 0.6 * two.width  # one panel (the count in its title) against two


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*", "ignore::FutureWarning:torch.*")  # torch internals
def test_compiled_blocks_sample_like_eager_with_the_same_accounting():
    """compile=True (the CUDA default) compiles the blocks in place, once; samples, iterations and block passes
    equal the eager ones (to float tolerance: compiled kernels sum in another order)."""
    import copy

    eager_model = _tiny_fpdm()
    compiled_model = copy.deepcopy(eager_model)
    kwargs = {"budget": 20, "iterations_per_timestep": 2, "sampler": "ddim", "seed": 5}
    eager = fd.sample(eager_model, [0, 1, 2], **kwargs)  # CPU: compile=None leaves the model eager
    assert not eager_model.blocks_compiled
    compiled = fd.sample(compiled_model, [0, 1, 2], compile=True, **kwargs)
    assert compiled_model.blocks_compiled
    torch.testing.assert_close(compiled.samples, eager.samples, rtol=1e-4, atol=1e-5)
    assert (compiled.block_passes, compiled.iterations) == (eager.block_passes, eager.iterations)
    assert compiled_model.state_dict().keys() == eager_model.state_dict().keys()
    again = fd.sample(compiled_model, [0, 1, 2], compile=True, **kwargs)  # compiled once, not again
    torch.testing.assert_close(again.samples, compiled.samples, rtol=0, atol=0)
    with pytest.raises(TypeError, match="compile must be a bool or None"):
        fd.sample(eager_model, [0], compile="yes", **kwargs)


@pytest.mark.parametrize("learn_sigma, prediction", [(True, "v"), (False, "v"), (True, "epsilon")])
def test_ddpm_step_with_given_noise_equals_diffusers_step(learn_sigma, prediction):
    """The step the counter noise uses is diffusers' DDPMScheduler.step: the same prev sample for the same noise
    (diffusers draws it from the per-sample generators; here the same generators are replayed)."""
    from fixedpoint_diffusion.sampling import _ddpm_step

    diffusion = fd.Diffusion(zero_terminal_snr=prediction == "v", prediction=prediction, learn_sigma=learn_sigma)
    ddpm = fd.scheduler_from_diffusion(diffusion, learn_sigma)
    ddpm.set_timesteps(timesteps=[999, 666, 333, 0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    pred = torch.randn(3, 8 if learn_sigma else 4, 8, 8, generator=g).clamp(-1, 1)
    for t in (999, 666, 333, 0):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        replay = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        noise = torch.stack([torch.randn(4, 8, 8, generator=r) for r in replay])
        expected = ddpm.step(pred, t, x, generator=gens).prev_sample
        torch.testing.assert_close(_ddpm_step(ddpm, ddpm.alphas_cumprod, pred, x, t, noise), expected, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_counter_noise_keeps_the_sharding_guarantee(sampler):
    """noise="counter": sample i's image depends on (seed, i) only (batch split and order do not matter), it
    differs from the generator noise, and the step accounting is the same."""
    model = _tiny_fpdm()
    kwargs = {"budget": 12, "iterations_per_timestep": 2, "sampler": sampler, "eta": 1.0, "seed": 3,
              "noise": "counter"}
    whole = fd.sample(model, [0, 1, 2, 3], indices=[0, 1, 2, 3], **kwargs)
    part = fd.sample(model, [3, 1], indices=[3, 1], **kwargs)
    torch.testing.assert_close(part.samples, whole.samples[[3, 1]], rtol=1e-5, atol=1e-6)
    generators = fd.sample(model, [0, 1, 2, 3], **{**kwargs, "noise": "generators"})
    assert not torch.allclose(generators.samples, whole.samples)
    assert (generators.block_passes, generators.iterations) == (whole.block_passes, whole.iterations)
    with pytest.raises(ValueError, match="noise must be 'generators' or 'counter'"):
        fd.sample(model, [0], **{**kwargs, "noise": "philox"})


def test_fpdm_sample_noise_counter_is_batch_independent(tmp_path):
    model = _tiny_fpdm()
    model.save_pretrained(tmp_path / "model")
    base = ["sample", "--model", str(tmp_path / "model"), "--budget", "20", "--iters", "3", "--num-samples", "5",
            "--noise", "counter", "--no-progress"]
    assert cli.main([*base, "--batch-size", "2", "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*base, "--batch-size", "5", "--out", str(tmp_path / "b")]) == 0
    assert cli.main([*base[:-3], "--no-progress", "--batch-size", "5", "--out", str(tmp_path / "c")]) == 0
    arrays = []
    for name in "abc":
        with np.load(tmp_path / name / "samples.npz") as data:
            arrays.append(data["arr_0"])
    assert np.abs(arrays[0].astype(int) - arrays[1]).max() <= 1  # uint8: rounding at most
    assert not np.array_equal(arrays[1], arrays[2])  # the default generator noise gives other images
    diag = json.loads((tmp_path / "a" / "diagnostics.json").read_text())
    assert diag["settings"]["noise"] == "counter"


def test_sample_to_folder_refuses_bad_options_before_clearing_earlier_results(tmp_path):
    model = _tiny_fpdm()
    schedule = fd.plan(model, budget=8, iterations_per_timestep=2)
    fd.sample_to_folder(model, fd.Diffusion(), schedule, tmp_path, num_samples=2, progress=False)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for bad in ({"classes": [9]}, {"eta": -1.0, "sampler": "ddim"}, {"noise": "philox"}):
        with pytest.raises(ValueError, match="classes|eta|noise"):
            fd.sample_to_folder(model, fd.Diffusion(), schedule, tmp_path, num_samples=2, overwrite=True,
                                progress=False, **bad)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before

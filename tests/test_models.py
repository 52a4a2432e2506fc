"""DiT and FPDM: presets, parameter counts, initialisation, the fixed-point map, training, save/load, inputs."""

import pytest
import torch
import torch.nn.functional as F

import fixedpoint as fp
import fixedpoint_diffusion as fd
from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.models import convert_legacy_fpdm_config


def tiny(name="FPDM-S/8", **kw):
    kw = {"input_size": 16, "num_classes": 10, "hidden_size": 64, "num_heads": 4, **kw}
    return fd.create_model(name, **kw)


def batch(n=2, size=16, channels=4, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
            torch.randint(0, classes, (n,), generator=gen))


def randomise(model, seed=0):
    """Perturb every parameter: at initialisation adaLN-Zero makes every block the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("name, count", [("DiT-XL/2", 674_834_720), ("FPDM-XL/2", 86_500_256)])
def test_parameter_counts_match_the_official_code(name, count):
    with torch.device("meta"):
        model = fd.create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count


def test_fpdm_parameter_count_grows_by_one_block_per_extra_pre_post_layer():
    with torch.device("meta"):
        counts = [sum(p.numel() for p in fd.create_model("FPDM-XL/2", pre_depth=d, post_depth=d).parameters())
                  for d in (1, 2, 4)]
    assert counts == [86_500_256, 134_310_560, 229_931_168]  # the official code's, per the research notes


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "FPDM-S/4", "FPDM-L/8"])
def test_presets_and_initial_output_is_zero(name):
    kw = {"input_size": 16, "num_classes": 10}
    model = fd.create_model(name, **kw)
    size = name.split("-")[1].split("/")[0]
    assert model.config.hidden_size == fd.PRESETS[size][1]
    x_t, t, y = batch()
    with torch.no_grad():
        out = model(x_t, t, y).out
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the final layer starts at zero


def _naive_fpdm(model, x_t, t, y, k, z0=None):
    """FPDM written out: pre blocks, injection, k steps of block(MLP(cat[z, x_inj])), post blocks, final layer."""
    h = model.x_embedder(x_t) + model.pos_embed
    t_emb, y_emb = model.t_embedder(t), model.y_embedder(y)
    c = t_emb + y_emb
    c_exp = c if model.config.timestep_conditioned_explicit else y_emb
    for block in model.blocks_pre:
        h = block(h, c_exp)
    x_inj = model.block_pre_projection(h)
    z = h if z0 is None else z0
    for _ in range(k):
        mixed = torch.cat([z, x_inj], dim=-1)
        mixed = model.block_fixed_point_projection_fc2(F.gelu(model.block_fixed_point_projection_fc1(mixed),
                                                              approximate="tanh"))
        z = model.block_fixed_point(mixed, c)
    for block in model.blocks_post:
        h_post = block(z, c_exp)
        z = h_post
    p, g = model.config.patch_size, model.x_embedder.grid
    out = model.final_layer(z, c_exp).reshape(x_t.shape[0], g, g, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(x_t.shape[0], -1, g * p, g * p)


@pytest.mark.parametrize("timestep_conditioned_explicit", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_fpdm_k_steps_equals_an_explicit_unrolled_loop(k, timestep_conditioned_explicit):
    model = randomise(tiny(pre_depth=1, post_depth=2, timestep_conditioned_explicit=timestep_conditioned_explicit))
    x_t, t, y = batch()
    with torch.no_grad():
        ours = model(x_t, t, y, num_iterations=k)
        naive = _naive_fpdm(model, x_t, t, y, k)
        torch.testing.assert_close(ours.out, naive, rtol=1e-5, atol=1e-5)
        # warm start from a given state
        z0 = torch.randn_like(ours.z)
        torch.testing.assert_close(model(x_t, t, y, num_iterations=k, z0=z0).out, _naive_fpdm(model, x_t, t, y, k, z0),
                                   rtol=1e-5, atol=1e-5)
    assert ours.cost.block_passes == 1 + k + 2


def test_hoisted_injection_equals_the_naive_mlp():
    model = randomise(tiny())
    x_inj, z = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    c = torch.randn(2, 64)
    fc1, fc2 = model.block_fixed_point_projection_fc1, model.block_fixed_point_projection_fc2
    naive = model.block_fixed_point(fc2(F.gelu(fc1(torch.cat([z, x_inj], -1)), approximate="tanh")), c)
    torch.testing.assert_close(model.fixed_point_map(x_inj, c)(z), naive, rtol=1e-5, atol=1e-6)


def test_residual_and_trace_are_reported():
    model = randomise(tiny())
    x_t, t, y = batch()
    with torch.no_grad():
        out = model(x_t, t, y, num_iterations=5, trace=True)
    assert out.trace.shape == (5, 2)
    torch.testing.assert_close(out.residual, out.trace[-1])
    assert out.solution.num_steps == 5


@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
@pytest.mark.parametrize("backward", ["stochastic_jfb", "jfb", "implicit"])
def test_every_solver_and_backward_mode_trains_a_step(solver, backward):
    torch.manual_seed(0)
    ranges = {"max_no_grad": 3, "max_with_grad": 2} if backward == "stochastic_jfb" else {}
    model = randomise(tiny(solver=solver, backward={"name": backward, **ranges}, max_steps=6))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x_t, t, y = batch()
    out = model(x_t, t, y)
    loss = out.out.square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


def test_stochastic_jfb_gradients_reach_every_parameter():
    model = randomise(tiny(backward={"name": "stochastic_jfb", "max_no_grad": 2, "max_with_grad": 3}))
    x_t, t, y = batch()
    model(x_t, t, y, generator=torch.Generator().manual_seed(0)).out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [], missing


def test_generator_makes_draws_reproducible():
    model = randomise(tiny(backward={"name": "stochastic_jfb", "max_no_grad": 5, "max_with_grad": 4}))
    x_t, t, y = batch()
    steps = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        steps.append([model(x_t, t, y, generator=generator).cost.block_passes for _ in range(6)])
    assert steps[0] == steps[1] and len(set(steps[0])) > 1


def test_cost_counts_macs_of_every_linear_map():
    model = randomise(tiny(pre_depth=1, post_depth=1))
    x_t, t, y = batch(n=3)
    counted = []

    def hook(module, args, output):
        inp = args[0]
        if isinstance(module, torch.nn.Linear):
            counted.append(inp.numel() // inp.shape[-1] * module.in_features * module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            counted.append(output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        out = model(x_t, t, y, num_iterations=4)
    for h in handles:
        h.remove()
    tokens, dim = model.num_tokens, model.config.hidden_size
    attention = 3 * (1 + 4 + 1) * 2 * tokens * tokens * dim  # QK^T and AV, per block pass, batch of 3
    # fc1 runs through F.linear (not a hooked module call): its two halves, 1 x_inj + 4 z
    fc1 = 3 * (1 + 4) * tokens * dim * 2 * dim
    assert out.cost.macs == sum(counted) + attention + fc1
    dit = fd.create_model("DiT-S/8", input_size=16, num_classes=10)
    assert dit(x_t, t, y).cost.block_passes == 12


def test_save_and_load_pretrained(tmp_path):
    model = randomise(tiny(pre_depth=2, timestep_conditioned_explicit=True))
    model.save_pretrained(tmp_path / "fpdm")
    assert (tmp_path / "fpdm" / "config.json").exists()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "fpdm").iterdir())
    loaded = fd.FPDM.from_pretrained(tmp_path / "fpdm")
    assert loaded.config.pre_depth == 2 and loaded.config.timestep_conditioned_explicit
    x_t, t, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, y, num_iterations=3).out, model(x_t, t, y, num_iterations=3).out)
    dit = randomise(fd.create_model("DiT-S/8", input_size=16, num_classes=10, hidden_size=64, num_heads=4,
                                    depth=2))
    dit.save_pretrained(tmp_path / "dit")
    with torch.no_grad():
        torch.testing.assert_close(fd.DiT.from_pretrained(tmp_path / "dit")(x_t, t, y).out, dit(x_t, t, y).out)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])), "x_t must have shape"),
    ((torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])), "x_t must have shape"),
    ((torch.randn(2, 4, 16, 16), torch.tensor([1.5, 2.0]), torch.tensor([0, 1])), "t must hold integer"),
    ((torch.randn(2, 4, 16, 16), torch.tensor([1]), torch.tensor([0, 1])), "t must be a tensor of shape"),
    ((torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 11])), r"y in \[0, 10\]"),
    ((torch.randn(2, 4, 16, 16), torch.tensor([-1, 2]), torch.tensor([0, 1])), "t must be >= 0"),
    ((torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([0.0, 1.0])), "y must hold integer"),
])
def test_bad_inputs_raise_naming_the_argument(args, match):
    model = tiny()
    with pytest.raises(ValueError, match=match):
        model(*args)


def test_bad_construction_and_call_options():
    with pytest.raises(ValueError, match="name must be one of"):
        fd.create_model("FPDM-XXL/2")
    with pytest.raises(ValueError, match="unknown override"):
        fd.create_model("DiT-S/2", pre_depth=2)  # DiT has no pre blocks
    with pytest.raises(ValueError, match="backward must be one of"):
        tiny(backward="sjfb")
    with pytest.raises(ValueError, match="solver must be"):
        tiny(solver="newton")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny(input_size=12)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        tiny(max_steps=0)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        tiny(rtol=-1.0)
    model = tiny()
    x_t, t, y = batch()
    with pytest.raises(ValueError, match="num_iterations must be an int >= 1"):
        model(x_t, t, y, num_iterations=0)
    with pytest.raises(ValueError, match="z0 must have shape"):
        model(x_t, t, y, num_iterations=2, z0=torch.zeros(2, 3, 64))


OLD_FPDM_CONFIG = {"_class_name": "FPDM", "_diffusers_version": "0.32.0", "input_size": 16, "patch_size": 8,
                   "in_channels": 4, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 4.0, "num_classes": 10,
                   "learn_sigma": True, "pre_depth": 1, "post_depth": 1, "timestep_conditioned_explicit": False,
                   "solver": "iteration", "backward": "stochastic_jfb", "min_no_grad": 0, "max_no_grad": 3,
                   "min_with_grad": 1, "max_with_grad": 2, "jfb_steps": 1, "max_steps": 12, "rtol": 0.0, "atol": 0.0}


def test_solver_and_backward_are_fixedpoint_objects_stored_as_dicts(tmp_path):
    model = tiny(solver={"name": "anderson", "memory": 3}, backward=fp.JFB(steps=2))
    assert model.solver == fp.Anderson(memory=3) and model.backward_mode == fp.JFB(steps=2)
    assert model.config.solver == {"name": "anderson", "memory": 3, "damping": 1.0, "regularization": 1e-8}
    assert model.config.backward == {"name": "jfb", "steps": 2}
    default = tiny()  # the official code's ranges
    assert default.backward_mode == fp.StochasticJFB(min_no_grad=0, max_no_grad=10, min_with_grad=1, max_with_grad=12)
    assert default.config.solver == {"name": "iteration", "damping": 1.0}
    model.save_pretrained(tmp_path / "m")
    loaded = fd.FPDM.from_pretrained(tmp_path / "m")
    assert (loaded.solver, loaded.backward_mode) == (model.solver, model.backward_mode)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)


def test_bad_solver_and_backward_options_are_refused_by_fixedpoint():
    with pytest.raises(ValueError, match="unknown option"):
        tiny(solver={"name": "anderson", "memry": 3})
    with pytest.raises(ValueError, match="max_no_grad"):
        tiny(backward={"name": "stochastic_jfb", "max_no_grad": -1})
    with pytest.raises(ValueError, match="generator"):  # hidden state: pass it to forward instead
        tiny(backward=fp.StochasticJFB(max_no_grad=2, max_with_grad=2, generator=torch.Generator()))
    with pytest.raises(TypeError, match="backward must be one of"):
        tiny(backward=3)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        tiny(max_steps=True)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        tiny(rtol=float("inf"))
    with pytest.raises(ValueError, match="unknown override"):
        tiny(max_no_grad=3)  # the old flat keys are converted only on load


def test_configs_with_the_old_flat_backward_keys_load(tmp_path):
    model = fd.FPDM.from_config(OLD_FPDM_CONFIG)
    assert model.backward_mode == fp.StochasticJFB(min_no_grad=0, max_no_grad=3, min_with_grad=1, max_with_grad=2)
    assert model.config.backward == {"name": "stochastic_jfb", "max_no_grad": 3, "max_with_grad": 2,
                                     "min_with_grad": 1, "min_no_grad": 0}
    assert "max_no_grad" not in model.config and "jfb_steps" not in model.config
    jfb = fd.FPDM.from_config({**OLD_FPDM_CONFIG, "backward": "jfb", "jfb_steps": 4})
    assert jfb.backward_mode == fp.JFB(steps=4)
    assert fd.FPDM.from_config({**OLD_FPDM_CONFIG, "backward": "implicit"}).backward_mode == fp.Implicit()
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(__import__("json").dumps(OLD_FPDM_CONFIG))
    fd.FPDM.from_config(OLD_FPDM_CONFIG).save_pretrained(tmp_path / "weights")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "weights" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert fd.FPDM.from_pretrained(folder).config.backward["max_no_grad"] == 3
    # The shipped model folders were written with the flat keys (0-2 no-grad, 1-2 with-grad steps).
    shipped = __import__("json").loads((pretrained.path("shapes-fpdm") / "config.json").read_text())
    assert shipped["max_no_grad"] == 2 and shipped["backward"] == "stochastic_jfb"
    loaded = fd.FPDM.from_pretrained(pretrained.path("shapes-fpdm"))
    assert loaded.backward_mode == fp.StochasticJFB(max_no_grad=2, max_with_grad=2)
    assert convert_legacy_fpdm_config(dict(loaded.config)) == dict(loaded.config)
    with pytest.raises(ValueError, match="old flat backward options"):
        convert_legacy_fpdm_config({**OLD_FPDM_CONFIG, "backward": {"name": "jfb"}})


def test_models_declare_the_sampler_contract():
    from oracle import GaussianOracle

    fpdm, dit = tiny(pre_depth=2, post_depth=1), tiny("DiT-S/8", depth=3)
    assert (fpdm.is_fixed_point, fpdm.explicit_passes) == (True, 3)
    assert (dit.is_fixed_point, dit.explicit_passes) == (False, 3)
    oracle = GaussianOracle(fd.Diffusion(), torch.zeros(2), 1.0)
    assert all(isinstance(m, fd.Denoiser) for m in (fpdm, dit, oracle))

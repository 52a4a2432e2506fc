"""The objective: schedule tables against diffusers, targets and loss against hand computations, the VB term
against torch.distributions."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

import fixedpoint_diffusion as fd
from fixedpoint_diffusion.diffusion import Diffusion
from fixedpoint_diffusion.models import Cost, ModelOutput


class Fixed:
    """A stand-in model returning a given output and recording its inputs."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x_t, t, y, drop_labels=None):
        self.calls.append((x_t, t, y, drop_labels))
        return ModelOutput(out=self.out, cost=Cost(block_passes=0, macs=0))


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_tables_match_diffusers(zero_terminal_snr):
    ours = Diffusion(zero_terminal_snr=zero_terminal_snr)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        rescale_betas_zero_snr=zero_terminal_snr, prediction_type="v_prediction")
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=0, atol=1e-5)
    if zero_terminal_snr:
        assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1
    x0 = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ours.target(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_predict_x0_inverts_the_targets():
    for prediction, zero in (("v", True), ("epsilon", False)):
        d = Diffusion(prediction=prediction, zero_terminal_snr=zero)
        x0, eps = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
        t = torch.tensor([0, 10, 700, 998 if prediction == "epsilon" else 999])
        x_t = d.q_sample(x0, t, eps)
        torch.testing.assert_close(d.predict_x0(x_t, t, d.target(x0, eps, t)), x0)


def test_mse_loss_by_hand():
    d = Diffusion(learn_sigma=False)
    x0 = torch.tensor([[[[1.0, -1.0]]]])  # (1, 1, 1, 2)
    eps = torch.tensor([[[[0.5, 2.0]]]])
    t = torch.tensor([250])
    pred = torch.tensor([[[[0.0, 1.0]]]])
    a = float(d.alphas_cumprod[250])
    v = [math.sqrt(a) * 0.5 - math.sqrt(1 - a) * 1.0, math.sqrt(a) * 2.0 + math.sqrt(1 - a) * 1.0]
    expected = ((0.0 - v[0]) ** 2 + (1.0 - v[1]) ** 2) / 2
    model = Fixed(pred)
    out = d.loss(model, x0, torch.tensor([3]), t=t, eps=eps, class_dropout=0.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.vb.item() == 0
    x_t, t_seen, y_seen, drop = model.calls[0]
    torch.testing.assert_close(x_t, torch.tensor([[[[math.sqrt(a) + math.sqrt(1 - a) * 0.5,
                                                      -math.sqrt(a) + math.sqrt(1 - a) * 2.0]]]]))
    assert drop is None and t_seen.tolist() == [250]


def test_vb_term_against_torch_distributions():
    d = Diffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    pred = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    var_values = torch.rand(3, 2, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 400, 999])
    x_t = d.q_sample(x0, t, eps)
    vb = d.vb_terms(x0, x_t, t, pred, var_values)
    for i, ti in enumerate(t.tolist()):
        a, a_prev, beta = (float(d.alphas_cumprod[ti]), float(d.alphas_cumprod_prev[ti]), float(d.betas[ti]))
        alpha = 1 - beta
        post_var = beta * (1 - a_prev) / (1 - a)
        post_var_clipped = post_var if ti > 0 else float(d.posterior_variance[1])

        def post_mean(x0_):
            return (beta * math.sqrt(a_prev) / (1 - a)) * x0_ + ((1 - a_prev) * math.sqrt(alpha) / (1 - a)) * x_t[i]

        x0_pred = math.sqrt(a) * x_t[i] - math.sqrt(1 - a) * pred[i]
        frac = (var_values[i] + 1) / 2
        model_var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var_clipped))
        model = torch.distributions.Normal(post_mean(x0_pred), model_var.sqrt())
        if ti == 0:
            cdf = lambda v: model.cdf(v)
            upper = torch.where(x0[i] > 0.999, torch.ones_like(x0[i]), cdf(x0[i] + 1 / 255))
            lower = torch.where(x0[i] < -0.999, torch.zeros_like(x0[i]), cdf(x0[i] - 1 / 255))
            expected = -torch.log(upper - lower).mean() / math.log(2)
        else:
            true = torch.distributions.Normal(post_mean(x0[i]), torch.full_like(x0[i], math.sqrt(post_var_clipped)))
            expected = torch.distributions.kl_divergence(true, model).mean() / math.log(2)
        assert vb[i].item() == pytest.approx(expected.item(), rel=1e-6)


def test_hybrid_loss_trains_the_variance_only_through_vb():
    d = Diffusion()
    out = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = d.loss(Fixed(out), torch.randn(2, 2, 4, 4), torch.tensor([0, 1]), t=torch.tensor([5, 900]),
                  class_dropout=0.0)
    (g_vb,) = torch.autograd.grad(loss.vb.sum(), out, retain_graph=True)
    assert torch.count_nonzero(g_vb[:, :2]) == 0  # the mean is frozen in the VB term
    assert torch.count_nonzero(g_vb[:, 2:]) > 0
    (g_mse,) = torch.autograd.grad(loss.mse.sum(), out)
    assert torch.count_nonzero(g_mse[:, 2:]) == 0


def test_official_weighting_gives_the_last_timestep_nothing():
    official = Diffusion(learn_sigma=False, mean_loss="official_x0_snr")
    standard = Diffusion(learn_sigma=False)
    x0 = torch.randn(2, 2, 4, 4)
    pred = torch.randn_like(x0)
    t = torch.tensor([999, 100])
    a = official.loss(Fixed(pred), x0, torch.tensor([0, 0]), t=t, eps=torch.randn_like(x0), class_dropout=0.0)
    b = standard.loss(Fixed(pred), x0, torch.tensor([0, 0]), t=t, eps=torch.randn_like(x0), class_dropout=0.0)
    assert a.mse[0] == 0 and a.mse[1] > 0 and b.mse[0] > 0


def test_class_dropout_is_seeded_and_about_the_right_rate():
    d = Diffusion(learn_sigma=False)
    model = Fixed(torch.zeros(4000, 1, 1, 1))
    x0, y = torch.zeros(4000, 1, 1, 1), torch.zeros(4000, dtype=torch.long)
    d.loss(model, x0, y, generator=torch.Generator().manual_seed(0))
    d.loss(model, x0, y, generator=torch.Generator().manual_seed(0))
    first, second = model.calls[0][3], model.calls[1][3]
    assert torch.equal(first, second)
    assert 0.08 < first.float().mean().item() < 0.12
    assert set(model.calls[0][1].tolist()) <= set(range(1000)) and len(set(model.calls[0][1].tolist())) > 900


def test_loss_trains_a_real_fpdm():
    model = fd.create_model("FPDM-S/8", input_size=16, num_classes=10, hidden_size=64, num_heads=4,
                            backward={"name": "stochastic_jfb", "max_no_grad": 2, "max_with_grad": 2})
    d = Diffusion()
    x0, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 2])
    out = d.loss(model, x0, y, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.output.cost.block_passes >= 3
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"zero_terminal_snr": True, "prediction": "epsilon"}, "needs prediction='v'"),
    ({"prediction": "x0"}, "prediction must be one of"),
    ({"mean_loss": "p2"}, "mean_loss must be one of"),
    ({"num_timesteps": 1}, "num_timesteps"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Diffusion(**kwargs)


def test_bad_loss_inputs():
    d = Diffusion()
    with pytest.raises(ValueError, match="class_dropout"):
        d.loss(Fixed(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long),
               class_dropout=1.5)
    with pytest.raises(ValueError, match="learn_sigma needs a model with 4 output channels"):
        d.loss(Fixed(torch.zeros(1, 2, 2, 2)), torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long))


def test_diffusion_settings_save_and_load_the_diffusers_way(tmp_path):
    from fixedpoint_diffusion.pipeline import diffusion_from_scheduler, scheduler_from_diffusion
    from fixedpoint_diffusion.runs import load_model

    d = fd.Diffusion(500, 2e-4, 0.03, zero_terminal_snr=False, prediction="epsilon", learn_sigma=False,
                     mean_loss="official_x0_snr")
    d.save_config(tmp_path)
    again = fd.Diffusion.from_config(fd.Diffusion.load_config(tmp_path))
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(d.config)
    torch.testing.assert_close(again.alphas_cumprod, d.alphas_cumprod, rtol=0, atol=0)
    back = diffusion_from_scheduler(scheduler_from_diffusion(d, learn_sigma=False))
    assert public(back.config) == {**public(d.config), "mean_loss": "mse"}
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['predict_v'\]"):
        fd.Diffusion.from_config({"predict_v": True})
    with pytest.raises(ValueError, match="prediction must be one of"):
        fd.Diffusion.from_config({"prediction": "x0"})
    # a run's ema/diffusion.json (the [diffusion] section, written before Diffusion had a config) loads as is
    from fixedpoint_diffusion import pretrained

    shipped = pretrained.path("shapes-fpdm")
    model, loaded = load_model(shipped, weights=False)
    assert loaded.learn_sigma == model.config.learn_sigma
    assert public(loaded.config) == {**public(fd.Diffusion.load_config(shipped)), "learn_sigma": True}
    assert fd.load_config("tiny").diffusion.build(learn_sigma=False).learn_sigma is False

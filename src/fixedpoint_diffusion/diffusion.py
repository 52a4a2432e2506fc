"""The diffusion process of FPDM's Sec. 4.1: schedule tables, targets and the training loss.

Linear betas (1e-4 to 0.02 over 1000 steps, as in DDPM/ADM/DiT), optionally rescaled to zero terminal SNR (Lin et
al., 2024, Algorithm 1); v-prediction (Salimans & Ho, 2022) or epsilon-prediction; learned variance with the
hybrid loss of ADM (Nichol & Dhariwal, 2021): MSE on the mean target plus the variational-bound term computed on a
frozen (detached) mean. Tables are float64 on the CPU and gathered per timestep.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ConfigMixin
from diffusers.configuration_utils import register_to_config

from .errors import InvalidValueError
from .models import ModelOutput

__all__ = ["Diffusion", "Loss", "discretized_gaussian_log_likelihood", "normal_kl"]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-likelihood of data in [-1, 1] quantised to 256 bins under ``N(mean, exp(log_scale)^2)`` (the
    ADM decoder term at ``t = 0``), in nats. The edge bins extend to infinity. Uses the exact normal CDF."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255.0))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=tiny))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=tiny))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


@dataclass(frozen=True)
class Loss:
    """A training loss and its parts: ``loss`` (scalar, the mean over the batch of ``mse + vb``), per-sample ``mse``
    and ``vb`` (B,) (``vb`` is zero without learned variance), the timesteps ``t`` used and the model output."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor
    t: torch.Tensor
    output: ModelOutput


def gather_at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[t]`` broadcast to ``like``'s shape, on its device, in float32 (float64 for float64 data)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    values = table.to(device=t.device)[t].to(dtype)
    return values.view(-1, *([1] * (like.dim() - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class Diffusion(ConfigMixin):
    """Schedule tables and the training loss of a Gaussian diffusion.

    The arguments are its diffusers config (:attr:`config`): ``save_config(folder)`` writes ``diffusion.json``
    and ``Diffusion.from_config(Diffusion.load_config(folder))`` reads it back (a run's ``ema/diffusion.json``
    included); a key it does not take raises ``ValueError`` instead of being dropped.

    Args:
        num_timesteps: training timesteps ``T``.
        beta_start, beta_end: ends of the linear beta schedule.
        zero_terminal_snr: rescale the schedule so that ``alpha_bar[T-1] = 0`` (requires v-prediction).
        prediction: ``"v"`` (``v = sqrt(a) eps - sqrt(1 - a) x0``) or ``"epsilon"``.
        learn_sigma: the model's output has twice the input channels; the second half interpolates the log
            variance between the posterior variance and beta (ADM "learned range"), trained by the VB term.
        mean_loss: ``"mse"`` (the standard MSE on the prediction target) or ``"official_x0_snr"``, the official
            FPDM code's x0-MSE weighted by ``snr * sqrt(1 - a)``, which gives the noisiest timesteps almost no
            signal (0 at the last one under zero terminal SNR); offered only to reproduce that code.

    Raises:
        ValueError: on an invalid argument or combination.
    """

    config_name = "diffusion.json"

    @register_to_config
    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
                 zero_terminal_snr: bool = True, prediction: Literal["v", "epsilon"] = "v", learn_sigma: bool = True,
                 mean_loss: Literal["mse", "official_x0_snr"] = "mse") -> None:
        if not (isinstance(num_timesteps, int) and num_timesteps >= 2):
            raise InvalidValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
        if not (0 < beta_start < beta_end < 1):
            raise InvalidValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, "
                                    f"beta_end={beta_end}")
        if prediction not in ("v", "epsilon"):
            raise InvalidValueError(f"prediction must be one of ['epsilon', 'v'], got {prediction!r}")
        if mean_loss not in ("mse", "official_x0_snr"):
            raise InvalidValueError(f"mean_loss must be one of ['mse', 'official_x0_snr'], got {mean_loss!r}")
        if zero_terminal_snr and prediction == "epsilon":
            raise InvalidValueError("zero_terminal_snr=True needs prediction='v': at zero SNR, x_t carries no signal "
                                    "and an epsilon prediction cannot recover x0")
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end, self.zero_terminal_snr = beta_start, beta_end, zero_terminal_snr
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.mean_loss = mean_loss
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        if zero_terminal_snr:
            betas = self._rescale_zero_terminal_snr(betas)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance) (DDPM Eq. 6-7).
        self.posterior_variance = betas * (1.0 - a_prev) / (1.0 - a)
        # The variance is 0 at t = 0; as in ADM, its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(a_prev) / (1.0 - a)
        self.posterior_mean_coef2 = (1.0 - a_prev) * torch.sqrt(alphas) / (1.0 - a)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """diffusers' loader hook, stricter: a key that is not an argument (``_``-prefixed metadata aside) is an
        error, not a logged warning, so that a setting is never silently dropped."""
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(k for k in {**config_dict, **kwargs} if not k.startswith("_") and k not in allowed)
        if unknown:
            raise InvalidValueError(f"Diffusion: unknown setting(s) {unknown}; valid ones are {sorted(allowed)}")
        return super().extract_init_dict(config_dict, **kwargs)

    def to(self, device: torch.device | str) -> Diffusion:
        """Move the schedule tables to ``device`` (in place; returns ``self``), so that training steps on a GPU
        do not copy them from the host on every call."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @staticmethod
    def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
        """Lin et al. (2024), Algorithm 1: shift and scale ``sqrt(alpha_bar)`` so that it ends at 0 and keeps its
        first value, then recover the betas."""
        root = torch.sqrt(torch.cumprod(1.0 - betas, 0))
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        a = root**2
        alphas = torch.cat([a[:1], a[1:] / a[:-1]])
        return 1.0 - alphas

    # --- forward process and targets -------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``."""
        a = gather_at(self.alphas_cumprod, t, x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction target: ``eps``, or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``."""
        if self.prediction == "epsilon":
            return eps
        a = gather_at(self.alphas_cumprod, t, x0)
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x0.dtype)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``x0`` implied by a prediction: ``sqrt(a) x_t - sqrt(1 - a) v``, or ``(x_t - sqrt(1 - a) eps) / sqrt(a)``."""
        a = gather_at(self.alphas_cumprod, t, x_t)
        if self.prediction == "v":
            return a.sqrt() * x_t - (1 - a).sqrt() * pred
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of ``q(x_{t-1} | x_t, x0)``."""
        mean = gather_at(self.posterior_mean_coef1, t, x_t) * x0 + gather_at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, gather_at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def model_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ADM's learned range: ``frac * log(beta_t) + (1 - frac) * log(posterior variance)``, ``frac = (v+1)/2``."""
        min_log = gather_at(self.posterior_log_variance_clipped, t, var_values)
        max_log = gather_at(torch.log(self.betas), t, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
                 var_values: torch.Tensor) -> torch.Tensor:
        """Per-sample variational-bound term in bits per dimension: ``KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))``,
        or the decoder's negative log-likelihood of ``x0`` at ``t = 0``. ``pred`` should be detached to train
        only the variance with it (the hybrid loss)."""
        x0_pred = self.predict_x0(x_t, t, pred)
        model_mean, _ = self.posterior(x0_pred, x_t, t)
        model_logvar = self.model_log_variance(var_values, t)
        true_mean, true_logvar = self.posterior(x0, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # --- the loss --------------------------------------------------------------------------------------------

    def loss(self, model: Callable[..., ModelOutput], x0: torch.Tensor, y: torch.Tensor, *,
             t: torch.Tensor | None = None, eps: torch.Tensor | None = None, class_dropout: float = 0.1,
             drop_labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
             **model_kwargs: object) -> Loss:
        """The training loss of one batch.

        Draws ``t ~ U{0..T-1}``, ``eps ~ N(0, I)`` and the labels to drop (probability ``class_dropout``, for
        classifier-free guidance) from ``generator`` unless ``t``/``eps``/``drop_labels`` are given, then evaluates
        ``model(x_t, t, y, drop_labels=..., **model_kwargs)``.

        Args:
            model: a DiT/FPDM (or any callable with that signature returning a :class:`ModelOutput`).
            x0: clean data (B, C, H, W).
            y: class labels (B,).

        Raises:
            ValueError: on a bad ``class_dropout`` or a ``t``/``eps`` of the wrong shape.
        """
        if not 0.0 <= class_dropout < 1.0:
            raise InvalidValueError(f"class_dropout must be in [0, 1), got {class_dropout!r}")
        batch, device = x0.shape[0], x0.device
        draw_device = generator.device if generator is not None else device
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_device).to(device)
        elif t.shape != (batch,):
            raise InvalidValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(device)
        elif eps.shape != x0.shape:
            raise InvalidValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
        drop = drop_labels
        if drop is not None:
            if drop.shape != (batch,) or drop.dtype != torch.bool:
                raise InvalidValueError(f"drop_labels must be a bool tensor of shape ({batch},), got "
                                        f"{drop.dtype} {tuple(drop.shape)}")
        elif class_dropout > 0:
            drop = (torch.rand(batch, generator=generator, device=draw_device) < class_dropout).to(device)
        x_t = self.q_sample(x0, t, eps)
        output = model(x_t, t, y, drop_labels=drop, **model_kwargs)
        channels = x0.shape[1]
        if self.learn_sigma:
            if output.out.shape[1] != 2 * channels:
                raise InvalidValueError(f"learn_sigma needs a model with {2 * channels} output channels, got "
                                        f"{output.out.shape[1]}")
            pred, var_values = output.out[:, :channels], output.out[:, channels:]
        else:
            pred, var_values = output.out, None
        target = self.target(x0, eps, t)
        if self.mean_loss == "mse":
            mse = _mean_flat((pred.float() - target.float()) ** 2)
        else:  # official FPDM code: x0 error weighted by snr * sqrt(1 - a)
            a = gather_at(self.alphas_cumprod, t, x0)
            weight = a / (1 - a) * (1 - a).sqrt()
            mse = _mean_flat(weight * (self.predict_x0(x_t, t, pred) - x0) ** 2)
        if var_values is not None:
            vb = self.vb_terms(x0.float(), x_t.float(), t, pred.detach().float(), var_values.float())
        else:
            vb = torch.zeros_like(mse)
        return Loss(loss=(mse + vb).mean(), mse=mse, vb=vb, t=t, output=output)

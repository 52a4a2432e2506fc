"""The exact denoiser of Gaussian data, as a model with our forward signature (no training needed)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fixedpoint_diffusion import Cost, Diffusion, ModelOutput


class GaussianOracle(torch.nn.Module):
    """Data ``x0 ~ N(mu_y, s^2 I)`` with ``mu_y = class_means[y]`` (the null class ``num_classes`` has mean 0).
    ``E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu)``; the output is the matching v or
    epsilon prediction, with constant learned-range variance values when ``learn_sigma``."""

    def __init__(self, diffusion: Diffusion, class_means: torch.Tensor, std: float, *, channels: int = 2,
                 size: int = 4, learn_sigma: bool = True, var_value: float = 0.0):
        super().__init__()
        self.diffusion, self.std, self.var_value = diffusion, std, var_value
        self.means = torch.cat([class_means.double(), torch.zeros(1)])
        self.config = SimpleNamespace(in_channels=channels, input_size=size, learn_sigma=learn_sigma,
                                      num_classes=len(class_means), depth=1)
        self.calls = 0

    #: The sampler's contract (:class:`fixedpoint_diffusion.sampling.Denoiser`): an explicit model of one block
    #: pass per timestep.
    is_fixed_point = False
    explicit_passes = 1

    def forward(self, x_t, t, y, **kwargs):
        self.calls += 1
        a = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        x = x_t.double()
        mu = self.means[y].view(-1, 1, 1, 1)
        s2 = self.std**2
        x0 = mu + a.sqrt() * s2 / (a * s2 + 1 - a) * (x - a.sqrt() * mu)
        if self.diffusion.prediction == "v":
            # v = sqrt(a) eps - sqrt(1 - a) x0 with eps = (x_t - sqrt(a) x0) / sqrt(1 - a), which simplifies to
            # (sqrt(a) x_t - x0) / sqrt(1 - a); 1 - a >= beta_0 > 0, so this is finite at every t.
            pred = (a.sqrt() * x - x0) / (1 - a).sqrt()
        else:
            pred = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = pred.to(x_t.dtype)
        if self.config.learn_sigma:
            out = torch.cat([out, torch.full_like(out, self.var_value)], dim=1)
        return ModelOutput(out=out, cost=Cost(block_passes=1, macs=0))

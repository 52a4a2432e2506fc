"""DiT building blocks: patch embedding, sine-cosine positions, timestep/class embedders, the adaLN-Zero block and
the final layer (Peebles & Xie, 2023). Parameter names follow the official DiT/FPDM layout so that released
weights load by name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import InvalidValueError

__all__ = [
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "TimestepEmbedder",
    "block_macs",
    "modulate",
    "sincos_pos_embed_2d",
]


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens ``h`` (B, T, D) by per-sample ``shift``/``scale`` (B, D)."""
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine positions (MAE/DiT convention), ``(grid * grid, dim)`` float32.

    Half of the channels encode the row and half the column; within each half the first quarter is ``sin`` and
    the second ``cos`` of ``pos / 10000^(2i/(dim/2))``. Tokens are ordered row-major.
    """
    if dim % 4:
        raise InvalidValueError(f"hidden size must be divisible by 4 for 2D sine-cosine positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token (r, c) at index r * grid + c

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (T, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (T, D/2)

    # The official grid puts the column coordinate first ("w goes first").
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` patches of a (B, C, H, W) image to tokens (B, T, D), row-major."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d gh gw -> b (gh gw) d")


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of (possibly fractional) timesteps (B,) -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim/2))``, (B, dim) float32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D), with an extra "null" class ``num_classes`` for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``drop``: optional (B,) bool, labels to replace by the null class."""
        if drop is not None:
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (layout ``[q | k | v]``, heads contiguous)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise InvalidValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b t (three n d) -> three b n t d", three=3, n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(rearrange(out, "b n t d -> b t (n d)"))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the conditioning ``c`` (B, D) sets per-sample shift, scale
    and a residual gate for the attention and MLP branches; the gates start at zero, so a new block is the
    identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        h = h + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift1, scale1))  # (B, T, D)
        h = h + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift2, scale2))  # (B, T, D)
        return h


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patch pixels, (B, T, D) -> (B, T, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


def block_macs(tokens: int, dim: int, mlp_ratio: float) -> int:
    """MACs of one DiT block for one sample: qkv, QK^T, AV, proj, MLP, and the adaLN projection of ``c``."""
    hidden = int(dim * mlp_ratio)
    return 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * hidden + 6 * dim * dim

"""What DiT and FPDM share: the record of what a forward spent (:class:`Cost`), its output (:class:`ModelOutput`),
and :class:`TransformerBase` (embedders, fixed positions, final layer, input checks, initialisation, block
compilation and gradient checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from einops import rearrange
from torch import nn

import fixedpoint as fp
from fixedpoint.checks import check_int, check_positive

from .blocks import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from .errors import InvalidValueError

__all__ = ["Cost", "ModelOutput", "TransformerBase"]


@dataclass(frozen=True)
class Cost:
    """What one forward spent.

    Attributes:
        block_passes: transformer-block forward passes, the paper's unit (footnote 4: ``n_pre + n_iters + n_post``
            for FPDM, ``depth`` for DiT).
        macs: multiply-accumulates of the whole forward, batch included, counting every linear map and the
            attention products (FPDM's injection MLP is *not* negligible: about a third of a block per iteration).
    """

    block_passes: int
    macs: int


@dataclass(frozen=True)
class ModelOutput:
    """Result of a DiT/FPDM forward.

    Attributes:
        out: (B, C_out, H, W) prediction (``C_out = 2 * in_channels`` with ``learn_sigma``: the target, then the
            variance interpolation values).
        cost: the forward's :class:`Cost`.
        z: FPDM only: the fixed-point state (B, T, D), to initialise the next timestep (solution reuse).
        residual: FPDM only: per-sample residual of the fixed-point solve (see :class:`fixedpoint.Solution`).
        trace: FPDM only, on request: (steps, B) residual per fixed-point step.
        solution: FPDM only: the full :class:`fixedpoint.Solution`.
    """

    out: torch.Tensor
    cost: Cost
    z: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    solution: fp.Solution | None = None


class TransformerBase(ModelMixin, ConfigMixin):
    """What DiT and FPDM share: embedders, fixed positions, final layer, input checks, initialisation.

    ``enable_gradient_checkpointing()`` (from diffusers' ``ModelMixin``) recomputes each block's activations in
    backward instead of storing them (non-reentrant, so it is safe under DDP); for FPDM this covers the explicit
    blocks and every with-gradient fixed-point step. It only acts while gradients are enabled.
    """

    _supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """diffusers' ``from_pretrained``; without ``accelerate`` installed it loads the ordinary way
        (``low_cpu_mem_usage=False``) instead of printing diffusers' five-line notice and then doing the same."""
        if "low_cpu_mem_usage" not in kwargs:
            import importlib.util

            kwargs["low_cpu_mem_usage"] = importlib.util.find_spec("accelerate") is not None
        return super().from_pretrained(*args, **kwargs)

    gradient_checkpointing = False

    @property
    def blocks_compiled(self) -> bool:
        """Whether :meth:`compile_blocks` has run on this model."""
        return bool(getattr(self, "_blocks_compiled", False))

    def compile_blocks(self, **options: Any) -> TransformerBase:
        """``torch.compile`` every transformer block in place (``nn.Module.compile``, so parameter names and
        state dicts stay as they are) and return the model; once per model, later calls do nothing. The
        fixed-point loop around the FPDM block stays eager, so the number of iterations per call can vary without
        recompiling. ``options`` go to ``torch.compile``. The first forward of each new input shape pays the
        compilation."""
        if not self.blocks_compiled:
            for module in self.modules():
                if isinstance(module, DiTBlock):
                    module.compile(**options)
            self._blocks_compiled = True
        return self

    def _run_block(self, block: DiTBlock, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, c)
        return block(h, c)

    def _build_shared(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, num_classes: int,
                      learn_sigma: bool, num_heads: int, mlp_ratio: float) -> None:
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                            ("hidden_size", hidden_size), ("num_classes", num_classes), ("num_heads", num_heads)):
            check_int(value, name, 1, error=InvalidValueError)
        if not isinstance(learn_sigma, bool):
            raise InvalidValueError(f"learn_sigma must be a bool, got {learn_sigma!r}")
        check_positive(mlp_ratio, "mlp_ratio", error=InvalidValueError)
        if hidden_size % num_heads:
            raise InvalidValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise InvalidValueError(f"hidden_size must be a multiple of 4 (the 2-D sin-cos position embedding), got "
                                    f"{hidden_size}")
        if input_size % patch_size:
            raise InvalidValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.x_embedder.grid)[None],
                             persistent=True)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def _init_weights(self, blocks: list[DiTBlock]) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias, patch embedding like a linear map, N(0,
        0.02) label and timestep embeddings, and zero adaLN modulations and output layer (so the model starts by
        predicting zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 4 or tuple(x_t.shape[1:]) != expected:
            got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise InvalidValueError(f"x_t must have shape (B, {', '.join(map(str, expected))}), got {got}")
        if not x_t.is_floating_point():
            raise InvalidValueError(f"x_t must be floating point, got {x_t.dtype}")
        batch = x_t.shape[0]
        for name, value, kind in (("t", t, "integer timesteps"), ("y", y, "integer class indices")):
            if not isinstance(value, torch.Tensor) or value.shape != (batch,):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InvalidValueError(f"{name} must be a tensor of shape ({batch},), got {got}")
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise InvalidValueError(f"{name} must hold {kind}, got dtype {value.dtype}")
        # One host sync per forward: an out-of-range index would otherwise be a device-side assert on CUDA.
        bad = (t < 0).any() | (y < 0).any() | (y > cfg.num_classes).any()
        if bool(bad):
            raise InvalidValueError(f"t must be >= 0 and y in [0, {cfg.num_classes}] ({cfg.num_classes} is the null "
                                    f"class for guidance); got t in [{int(t.min())}, {int(t.max())}], y in "
                                    f"[{int(y.min())}, {int(y.max())}]")

    def _embed(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_labels: torch.Tensor | None):
        h = self.x_embedder(x_t) + self.pos_embed.to(x_t.dtype)  # (B, T, D)
        return h, self.t_embedder(t), self.y_embedder(y, drop_labels)  # (B, T, D), (B, D), (B, D)

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, g = self.config.patch_size, self.x_embedder.grid
        return rearrange(h, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=g, gw=g, p=p, q=p)  # (B, C_out, H, W)

    def _shared_macs(self, batch: int) -> int:
        cfg = self.config
        tokens, dim, p = self.x_embedder.num_patches, cfg.hidden_size, cfg.patch_size
        embed = tokens * p * p * cfg.in_channels * dim + self.t_embedder.frequency_size * dim + dim * dim
        final = 2 * dim * dim + tokens * dim * p * p * self.out_channels
        return batch * (embed + final)

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

"""Official-checkpoint import: checkpoints in the official key layout (written out here, nothing imported from the
official code) load into our models, whose outputs must match an independent functional forward on the raw
tensors."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import fixedpoint_diffusion as fd

D, HEADS, P, C, CLASSES, SIZE = 32, 4, 4, 4, 5, 16  # latent 16 -> 4x4 = 16 tokens
TOKENS = (SIZE // P) ** 2


def _block_keys(prefix):
    return {f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.qkv.bias": (3 * D,),
            f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
            f"{prefix}.mlp.fc1.weight": (4 * D, D), f"{prefix}.mlp.fc1.bias": (4 * D,),
            f"{prefix}.mlp.fc2.weight": (D, 4 * D), f"{prefix}.mlp.fc2.bias": (D,),
            f"{prefix}.adaLN_modulation.1.weight": (6 * D, D), f"{prefix}.adaLN_modulation.1.bias": (6 * D,)}


def official_layout(fixed_point, pre=1, post=1, depth=3):
    """Key -> shape of the official DiT/FPDM state dict (timm attention/MLP naming, pos_embed buffer)."""
    keys = {"pos_embed": (1, TOKENS, D), "x_embedder.proj.weight": (D, C, P, P), "x_embedder.proj.bias": (D,),
            "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
            "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
            "y_embedder.embedding_table.weight": (CLASSES + 1, D),
            "final_layer.linear.weight": (P * P * 2 * C, D), "final_layer.linear.bias": (P * P * 2 * C,),
            "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    if fixed_point:
        for i in range(pre):
            keys |= _block_keys(f"blocks_pre.{i}")
        keys |= {"block_pre_projection.weight": (D, D), "block_pre_projection.bias": (D,),
                 "block_fixed_point_projection_fc1.weight": (2 * D, 2 * D),
                 "block_fixed_point_projection_fc1.bias": (2 * D,),
                 "block_fixed_point_projection_fc2.weight": (D, 2 * D),
                 "block_fixed_point_projection_fc2.bias": (D,)}
        keys |= _block_keys("block_fixed_point")
        for i in range(post):
            keys |= _block_keys(f"blocks_post.{i}")
    else:
        for i in range(depth):
            keys |= _block_keys(f"blocks.{i}")
    return keys


def random_state(layout, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(shape, generator=gen) for k, shape in layout.items()}


def reference_forward(sd, x, t, y, *, fixed_point, steps=0, time_cond_explicit=False, pre=1, post=1, depth=3):
    """The DiT/FPDM forward written directly on the state dict."""
    b = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb

    def lin(v, name):
        return F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def block(v, cond, p):
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(cond), f"{p}.adaLN_modulation.1").chunk(6, dim=1)
        a = F.layer_norm(v, (D,), eps=1e-6) * (1 + sc1[:, None]) + s1[:, None]
        qkv = lin(a, f"{p}.attn.qkv").reshape(b, TOKENS, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q, k, val = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // HEADS), dim=-1) @ val
        v = v + g1[:, None] * lin(att.transpose(1, 2).reshape(b, TOKENS, D), f"{p}.attn.proj")
        m = F.layer_norm(v, (D,), eps=1e-6) * (1 + sc2[:, None]) + s2[:, None]
        m = lin(F.gelu(lin(m, f"{p}.mlp.fc1"), approximate="tanh"), f"{p}.mlp.fc2")
        return v + g2[:, None] * m

    if fixed_point:
        c_exp = c if time_cond_explicit else y_emb
        for i in range(pre):
            h = block(h, c_exp, f"blocks_pre.{i}")
        inj = lin(h, "block_pre_projection")
        z = h
        for _ in range(steps):
            mixed = lin(F.gelu(lin(torch.cat([z, inj], -1), "block_fixed_point_projection_fc1"), approximate="tanh"),
                        "block_fixed_point_projection_fc2")
            z = block(mixed, c, "block_fixed_point")
        h = z
        for i in range(post):
            h = block(h, c_exp, f"blocks_post.{i}")
    else:
        c_exp = c
        for i in range(depth):
            h = block(h, c, f"blocks.{i}")
    s, sc = lin(F.silu(c_exp), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(F.layer_norm(h, (D,), eps=1e-6) * (1 + sc[:, None]) + s[:, None], "final_layer.linear")
    g = SIZE // P
    out = out.reshape(b, g, g, P, P, 2 * C)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, 2 * C, SIZE, SIZE)


def inputs():
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, C, SIZE, SIZE, generator=gen), torch.tensor([7, 940]), torch.tensor([1, CLASSES]))


def training_args(**kw):
    args = {"model": "DiT-S/4", "num_classes": CLASSES, "image_size": 8 * SIZE, "predict_v": True,
            "use_zero_terminal_snr": True, "fixed_point": True, "fixed_point_pre_depth": 1,
            "fixed_point_post_depth": 2, "fixed_point_no_grad_min_iters": 0, "fixed_point_no_grad_max_iters": 10,
            "fixed_point_with_grad_min_iters": 1, "fixed_point_with_grad_max_iters": 12,
            "fixed_point_pre_post_timestep_conditioning": False, "global_batch_size": 512, "resume": None}
    args.update(kw)
    return args


@pytest.mark.parametrize("time_cond", [False, True])
@pytest.mark.parametrize("use_ema", [True, False])
def test_fpdm_training_checkpoint_round_trip(tmp_path, time_cond, use_ema):
    layout = official_layout(True, pre=1, post=2)
    weights = {"model": random_state(layout, 0), "ema": random_state(layout, 1)}
    path = tmp_path / "0100000.pt"
    torch.save({**weights, "opt": {"state": {}, "param_groups": []},
                "args": training_args(fixed_point_pre_post_timestep_conditioning=time_cond),
                "train_steps": 100_000}, path)
    # the official sizes are DiT-S's; shrink the width for a fast test, as a user override would
    model = fd.load_official_checkpoint(path, use_ema=use_ema, hidden_size=D, num_heads=HEADS)
    assert isinstance(model, fd.FPDM) and not model.training
    cfg = model.config
    assert (cfg.pre_depth, cfg.post_depth, cfg.timestep_conditioned_explicit) == (1, 2, time_cond)
    assert (cfg.input_size, cfg.num_classes, cfg.backward["max_no_grad"], cfg.backward["max_with_grad"]) == \
        (SIZE, CLASSES, 10, 12)
    x, t, y = inputs()
    sd = weights["ema" if use_ema else "model"]
    with torch.no_grad():
        for steps in (1, 3):
            ref = reference_forward(sd, x, t, y, fixed_point=True, steps=steps, time_cond_explicit=time_cond,
                                    pre=1, post=2)
            torch.testing.assert_close(model(x, t, y, num_iterations=steps).out, ref, rtol=1e-5, atol=1e-5)


def test_dit_bare_state_dict_round_trip(tmp_path):
    sd = random_state(official_layout(False, depth=3), 2)
    path = tmp_path / "DiT-S-4.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)  # a DDP-wrapped save
    model = fd.load_official_checkpoint(path, "DiT-S/4", input_size=SIZE, num_classes=CLASSES, hidden_size=D,
                                        num_heads=HEADS, depth=3)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).out, reference_forward(sd, x, t, y, fixed_point=False),
                                   rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        fd.load_official_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}, "args": argparse.Namespace(model="DiT-S/4")}, tmp_path / "pickle.pt")  # not weights
    with pytest.raises(ValueError, match="weights_only=True"):
        fd.load_official_checkpoint(tmp_path / "pickle.pt")
    sd = random_state(official_layout(False, depth=3), 2)
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="name: a bare state dict"):
        fd.load_official_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="do not fit DiT-S/4"):  # 12 blocks expected, 3 present
        fd.load_official_checkpoint(tmp_path / "bare.pt", "DiT-S/4", input_size=SIZE, num_classes=CLASSES,
                                    hidden_size=D, num_heads=HEADS)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        fd.load_official_checkpoint(tmp_path / "list.pt")
    torch.save({"model": sd, "args": training_args(dino_supervised=True)}, tmp_path / "dino.pt")
    with pytest.raises(ValueError, match="dino_supervised"):
        fd.load_official_checkpoint(tmp_path / "dino.pt")
    torch.save({"model": sd, "args": training_args()}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no 'ema' weights"):
        fd.load_official_checkpoint(tmp_path / "no_ema.pt")

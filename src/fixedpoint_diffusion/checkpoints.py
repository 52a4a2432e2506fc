"""Import of checkpoints written by the official FPDM training script and of the released DiT weights."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

from .errors import InvalidValueError, MissingInputError
from .models import FPDM, DiT, create_model

__all__ = ["load_official_checkpoint"]

# Official training-script argument -> our FPDM constructor argument.
_FPDM_ARGS = {
    "fixed_point_pre_depth": "pre_depth",
    "fixed_point_post_depth": "post_depth",
    "fixed_point_pre_post_timestep_conditioning": "timestep_conditioned_explicit",
}
# Official training-script argument -> option of our stochastic-JFB backward (``FPDM(backward={...})``).
_STOCHASTIC_JFB_ARGS = {
    "fixed_point_no_grad_min_iters": "min_no_grad",
    "fixed_point_no_grad_max_iters": "max_no_grad",
    "fixed_point_with_grad_min_iters": "min_with_grad",
    "fixed_point_with_grad_max_iters": "max_with_grad",
}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes that wrapped models add."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _config_from_args(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Our preset name and constructor overrides from the official script's saved ``args``."""
    model = args.get("model")
    if not isinstance(model, str) or not model.startswith("DiT-"):
        raise InvalidValueError(f"checkpoint args: 'model' must name a DiT preset such as 'DiT-XL/2', got {model!r}")
    for unsupported in ("unsupervised", "dino_supervised", "flow"):
        if args.get(unsupported):
            raise InvalidValueError(f"checkpoint args: {unsupported}=True models are not supported")
    image_size = args.get("image_size", 256)
    if not isinstance(image_size, int) or image_size % 8:
        raise InvalidValueError(f"checkpoint args: image_size must be an int divisible by 8 (the VAE), got "
                                f"{image_size!r}")
    overrides: dict[str, Any] = {"input_size": image_size // 8, "num_classes": args.get("num_classes", 1000),
                                 "learn_sigma": True}
    if args.get("fixed_point"):
        name = "FPDM-" + model[len("DiT-"):]
        overrides.update({ours: args[theirs] for theirs, ours in _FPDM_ARGS.items() if theirs in args})
        overrides["backward"] = {"name": "stochastic_jfb",
                                 **{ours: args[theirs] for theirs, ours in _STOCHASTIC_JFB_ARGS.items()
                                    if theirs in args}}
    else:
        name = model
    return name, overrides


def load_official_checkpoint(path: str | os.PathLike, name: str | None = None, *, use_ema: bool = True,
                             **overrides: Any) -> DiT | FPDM:
    """Load official FPDM training checkpoints or released DiT weights into our models.

    Two formats are read, always with ``torch.load(..., weights_only=True)``:

    * a checkpoint of the official FPDM training script, a dict with ``model``, ``ema`` and ``args``: the
      configuration (preset, depths, timestep-conditioning switch, stochastic-JFB ranges, image size -> latent
      size, classes) comes from ``args``; the EMA weights are loaded unless ``use_ema=False``;
    * a bare state dict (the released DiT weights): ``name`` says which preset, e.g. ``"DiT-XL/2"``.

    The diffusion settings of a training run (``predict_v``, ``use_zero_terminal_snr``) are not part of the model;
    build the matching :class:`~fixedpoint_diffusion.Diffusion` yourself.

    Args:
        path: the ``.pt`` file.
        name: the preset of a bare state dict (ignored for training checkpoints unless given to override).
        use_ema: load the EMA weights of a training checkpoint (what sampling uses).
        overrides: constructor arguments that replace the ones derived from the checkpoint (e.g. ``solver``).

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a tensor checkpoint of a known layout, ``name`` is missing for a bare
            state dict, or the weights do not fit the model.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"path: no checkpoint file at {os.fspath(path)!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise InvalidValueError(f"path: {os.fspath(path)!r} is not a checkpoint of tensors and plain values that "
                                f"torch.load(weights_only=True) accepts ({str(err).splitlines()[0]})") from None
    config: dict[str, Any] = {}
    if isinstance(obj, dict) and "args" in obj and ("model" in obj or "ema" in obj):
        args = obj["args"]
        if not isinstance(args, dict):
            raise InvalidValueError(f"path: the checkpoint's 'args' must be a dict, got {type(args).__name__}")
        derived, config = _config_from_args(args)
        name = name or derived
        key = "ema" if use_ema else "model"
        if key not in obj:
            raise InvalidValueError(f"path: the checkpoint has no {key!r} weights (use_ema={use_ema})")
        state = obj[key]
    elif _is_state_dict(obj):
        if name is None:
            raise InvalidValueError("name: a bare state dict does not say which model it is; pass name='DiT-XL/2' "
                                    "(etc.)")
        state = obj
    else:
        raise InvalidValueError(f"path: {os.fspath(path)!r} holds neither a training checkpoint (a dict with 'model', "
                                f"'ema' and 'args') nor a state dict of tensors")
    if not _is_state_dict(state):
        raise InvalidValueError("path: the checkpoint's weights are not a dict of tensors")
    model = create_model(name, **{**config, **overrides})
    state = _strip_prefixes(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise InvalidValueError(f"path: the weights do not fit {name} with {config or overrides}: "
                                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                                f"wrong shape {wrong[:5]}{'...' if len(wrong) > 5 else ''}")
    model.load_state_dict(state)
    return model.eval()

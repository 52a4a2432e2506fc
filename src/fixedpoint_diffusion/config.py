"""Training configuration: TOML files with four sections (``model``, ``diffusion``, ``data``, ``train``), named
configs shipped with the package, and ``section.key=value`` overrides from the command line.

Every key is checked against the known ones before anything is built, so a typo stops the run with the list of
valid keys instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .diffusion import Diffusion
from .errors import InvalidValueError, MissingInputError
from .models import FPDM, DiT, convert_legacy_fpdm_config

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "TrainConfig", "list_configs", "load_config"]


class ConfigError(InvalidValueError):
    """A configuration file or override that cannot be used (unknown key, wrong type, bad value)."""


@dataclass
class DiffusionConfig:
    """The ``[diffusion]`` section: arguments of :class:`fixedpoint_diffusion.Diffusion` (``learn_sigma``
    follows the model), which validates them (:meth:`build`)."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = True
    prediction: str = "v"
    mean_loss: str = "mse"

    def build(self, learn_sigma: bool = True) -> Diffusion:
        """The :class:`~fixedpoint_diffusion.Diffusion` of these settings (``Diffusion.from_config``)."""
        return Diffusion.from_config(dataclasses.asdict(self), learn_sigma=learn_sigma)


@dataclass
class DataConfig:
    """Where the training data comes from.

    Attributes:
        kind: ``"shapes"`` (the embedded, generated dataset: no files at all), ``"images"`` (a folder of images,
            one sub-folder per class, trained in pixel space) or ``"latents"`` (the output of
            ``fpdm extract-latents``).
        path: the folder for ``"images"``/``"latents"``.
        image_size: ``"shapes"``/``"images"``: side of the (square) training images.
        num_samples: ``"shapes"``: how many images to generate.
        hflip: ``"shapes"``/``"images"``: random horizontal flips (drawn from the step's seeded generator).
        num_workers: DataLoader worker processes (``"images"`` benefits; in-memory data needs none).
    """

    kind: str = "shapes"
    path: str = ""
    image_size: int = 16
    num_samples: int = 8192
    hflip: bool = True
    num_workers: int = 0


@dataclass
class TrainConfig:
    """The optimisation recipe (defaults: the paper's Sec. 4.1).

    Attributes:
        global_batch_size: summed over all processes; must divide by the number of processes.
        max_steps: optimizer steps of the whole run (a resumed run continues up to it).
        max_minutes: stop once the training loop has run this many minutes in all, counted across resumed runs
            (0: no limit). The run stops at a step boundary (under DDP: the next log step) and writes a
            checkpoint; a run stopped this way is complete, not interrupted.
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear learning-rate warm-up from 0 over this many steps (0: none).
        lr_schedule: ``"constant"`` (the paper's) or ``"cosine"`` (after the warm-up, decay to
            ``min_lr_ratio * lr`` at ``max_steps``; a run stopped by ``max_minutes`` decays on the ``max_steps``
            horizon).
        min_lr_ratio: the cosine schedule's final learning rate as a fraction of ``lr``.
        grad_clip: clip the global gradient norm to this value (0: off).
        ema_decay: constant EMA decay (DiT: 0.9999); the EMA starts as a copy of the model.
        class_dropout: probability of replacing a label by the null class (for classifier-free guidance).
        seed: seeds the model initialisation and every random draw of the run (data order, timesteps, noise,
            label dropout, flips and stochastic-JFB step counts, each derived from ``(seed, step)``).
        mixed_precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` or ``"no"``; master
            weights, the loss and the diffusion tables stay in fp32/fp64.
        compile: ``torch.compile`` each transformer block (not the fixed-point loop).
        gradient_checkpointing: recompute block activations in backward (non-reentrant).
        tf32: allow TF32 matrix multiplies on Ampere+ GPUs (ignored on CPU).
        cpu_threads: intra-op threads of a CPU run (ignored on GPUs). 0 chooses: ``OMP_NUM_THREADS`` when set,
            else half the cores this process may use, divided among the processes of a ``torchrun`` job on this
            machine, at least 1 (on a busy 2-core machine one thread trained ``tiny`` 6x faster than two; on an
            idle one two were 1.4x faster).
        log_every: steps between log lines (each costs one host sync).
        tracker: where the log's metrics also go: ``"auto"`` (TensorBoard when installed, else nowhere),
            ``"none"``, ``"tensorboard"`` (``pip install "fixedpoint[tensorboard]"``) or ``"wandb"`` (Weights &
            Biases, ``pip install "fixedpoint[wandb]"``; its own ``WANDB_MODE``/``WANDB_PROJECT`` settings apply,
            ``WANDB_MODE=offline`` needs no network). Rank 0 only.
        checkpoint_every: steps between checkpoints (a final one is always written).
        keep_checkpoints: how many step checkpoints to keep (older ones are deleted).
        out_dir: run folder (checkpoints, ``log.jsonl``, the EMA model in ``ema/``).
    """

    global_batch_size: int = 512
    max_steps: int = 400_000
    max_minutes: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    class_dropout: float = 0.1
    seed: int = 0
    mixed_precision: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    tf32: bool = True
    cpu_threads: int = 0
    log_every: int = 100
    tracker: str = "auto"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    out_dir: str = "runs/fpdm"


@dataclass
class Config:
    """A whole training run. ``model`` holds the preset ``name`` (e.g. ``"FPDM-XL/2"``) and any constructor
    arguments of :func:`fixedpoint_diffusion.create_model`."""

    model: dict[str, Any] = field(default_factory=lambda: {"name": "FPDM-S/2"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "diffusion": dataclasses.asdict(self.diffusion),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        unknown = sorted(set(raw) - {"model", "diffusion", "data", "train"})
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid: ['data', 'diffusion', 'model', 'train']")
        model = dict(raw.get("model", {"name": "FPDM-S/2"}))
        if str(model.get("name", "")).startswith("FPDM-"):  # files written with the old flat backward keys
            try:
                model = convert_legacy_fpdm_config(model)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"model: {err}") from None
        sections = {}
        for name, section_cls in (("diffusion", DiffusionConfig), ("data", DataConfig), ("train", TrainConfig)):
            values = dict(raw.get(name, {}))
            sections[name] = section_cls(**_checked_section(name, section_cls, values))
        return cls(model=model, **sections)

    def validate(self) -> None:
        """Check values (not only keys): raises :class:`ConfigError` naming the offending key."""
        _check_model_section(self.model)
        data, tr = self.data, self.train
        try:  # Diffusion's own checks, the one place they live
            self.diffusion.build()
        except ValueError as err:
            raise ConfigError(f"diffusion: {err}") from None
        _require(data.kind in ("shapes", "images", "latents"), "data.kind", data.kind,
                 "'shapes', 'images' or 'latents'")
        if data.kind != "shapes":
            _require(bool(data.path), "data.path", data.path, f"a folder (data.kind = {data.kind!r})")
        _require(data.image_size >= 4, "data.image_size", data.image_size, ">= 4")
        _require(data.num_samples >= 1, "data.num_samples", data.num_samples, ">= 1")
        _require(data.num_workers >= 0, "data.num_workers", data.num_workers, ">= 0")
        _require(tr.global_batch_size >= 1, "train.global_batch_size", tr.global_batch_size, ">= 1")
        _require(tr.max_steps >= 1, "train.max_steps", tr.max_steps, ">= 1")
        _require(tr.max_minutes >= 0, "train.max_minutes", tr.max_minutes, ">= 0 (0: no limit)")
        _require(tr.lr > 0, "train.lr", tr.lr, "> 0")
        _require(tr.warmup_steps >= 0, "train.warmup_steps", tr.warmup_steps, ">= 0")
        _require(tr.lr_schedule in ("constant", "cosine"), "train.lr_schedule", tr.lr_schedule,
                 "'constant' or 'cosine'")
        _require(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", tr.min_lr_ratio, "in [0, 1]")
        _require(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, ">= 0")
        _require(len(tr.betas) == 2 and all(0 <= b < 1 for b in tr.betas), "train.betas", tr.betas,
                 "two numbers in [0, 1)")
        _require(tr.grad_clip >= 0, "train.grad_clip", tr.grad_clip, ">= 0 (0: off)")
        _require(0 <= tr.ema_decay < 1, "train.ema_decay", tr.ema_decay, "in [0, 1)")
        _require(0 <= tr.class_dropout < 1, "train.class_dropout", tr.class_dropout, "in [0, 1)")
        _require(tr.mixed_precision in ("auto", "bf16", "no"), "train.mixed_precision", tr.mixed_precision,
                 "'auto', 'bf16' or 'no'")
        _require(tr.log_every >= 1, "train.log_every", tr.log_every, ">= 1")
        _require(tr.cpu_threads >= 0, "train.cpu_threads", tr.cpu_threads, ">= 0 (0: chosen for the machine)")
        _require(tr.tracker in ("auto", "none", "tensorboard", "wandb"), "train.tracker", tr.tracker,
                 "'auto', 'none', 'tensorboard' or 'wandb'")
        _require(tr.checkpoint_every >= 1, "train.checkpoint_every", tr.checkpoint_every, ">= 1")
        _require(tr.keep_checkpoints >= 1, "train.keep_checkpoints", tr.keep_checkpoints, ">= 1")
        _require(bool(tr.out_dir), "train.out_dir", tr.out_dir, "a folder")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _model_class(name: Any) -> type:
    if not isinstance(name, str) or not name.startswith(("DiT-", "FPDM-")):
        raise ConfigError(f"model.name must be a preset such as 'FPDM-XL/2' or 'DiT-XL/2', got {name!r}")
    return DiT if name.startswith("DiT-") else FPDM


def _check_model_section(model: dict[str, Any]) -> None:
    if "name" not in model:
        raise ConfigError("the [model] section needs a 'name', e.g. name = \"FPDM-XL/2\"")
    cls = _model_class(model["name"])
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(model) - allowed - {"name"})
    if unknown:
        raise ConfigError(f"unknown model.{unknown[0]} for {model['name']}; valid keys: ['name', "
                          f"{', '.join(repr(k) for k in sorted(allowed))}]")
    if cls is FPDM:  # fixedpoint's own checks of solver/backward, before anything is built
        try:
            convert_legacy_fpdm_config(model)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None


def _checked_section(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; valid keys in [{section}]: {sorted(fields)}")
    defaults = cls()
    out = {}
    for key, value in values.items():
        default = getattr(defaults, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, list):
            ok = isinstance(value, list)
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = {"bool": "a bool", "int": "an int", "float": "a number", "list": "a list", "str": "a string"}
            raise ConfigError(f"{section}.{key} must be {kind[type(default).__name__]}, got {value!r}")
        out[key] = value
    return out


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-4``, ``true``, ``[0.9, 0.99]``, ``"x"``); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config dict (a copy is returned). A longer path such as
    ``model.backward.max_no_grad=10`` sets one option of a table (a table given by name, ``backward =
    "jfb"``, becomes ``{"name": "jfb", ...}``)."""
    out = {name: dict(section) for name, section in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.max_steps=1000")
        target = out.setdefault(section, {})
        *parents, leaf = name.split(".")
        for part in parents:
            inner = target.get(part, {})
            if isinstance(inner, str):
                inner = {"name": inner}
            if not isinstance(inner, dict):
                raise ConfigError(f"override {item!r}: {section}.{part} is {inner!r}, not a table")
            target[part] = dict(inner)
            target = target[part]
        target[leaf] = _parse_value(value.strip())
    return out


def list_configs() -> list[str]:
    """Names of the configs shipped with the package (``fpdm train --config NAME``)."""
    folder = resources.files("fixedpoint_diffusion") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A :class:`Config` from a shipped config's name (see :func:`list_configs`), a TOML file or a dict, with
    ``section.key=value`` overrides applied on top.

    Raises:
        ConfigError: unknown name/section/key, wrong value type or value.
        FileNotFoundError: a config path that does not exist.
    """
    if isinstance(source, dict):
        raw = source
    else:
        text = str(source)
        shipped = resources.files("fixedpoint_diffusion") / "configs" / f"{text}.toml"
        if not text.endswith(".toml") and shipped.is_file():
            raw = tomllib.loads(shipped.read_text())
        else:
            path = Path(text)
            if not path.is_file():
                raise MissingInputError(f"config {text!r} is neither a shipped config ({', '.join(list_configs())}) "
                                        f"nor a TOML file")
            try:
                raw = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"config file {path}: {err}") from None
    return Config.from_dict(apply_overrides(raw, list(overrides)))

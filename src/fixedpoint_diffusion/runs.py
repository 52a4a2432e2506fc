"""The run folder that ``fpdm train`` writes, and loading a trained model from it. This module is the only one that
knows the layout::

    <train.out_dir>/
        config.json                    the run's Config
        log.jsonl                      one JSON line per log step (step, loss, mse, vb, residual, speed, time)
        summary.json                   the last run's TrainSummary
        checkpoints/step-XXXXXXXX.pt   model, EMA, optimizer, RNG, config; the newest train.keep_checkpoints kept
        ema/                           the EMA model as a save_pretrained folder, plus
            diffusion.json             the diffusion settings it was trained with
            training_step.json         the step it was saved at
        tensorboard/, wandb/           the tracker's files, when one is on

Every file is written atomically (a temporary renamed into place; ``ema/`` is swapped in whole), and
:meth:`RunFolder.repair` undoes what a kill between two writes can leave behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import write_atomic, write_json_atomic, write_text_atomic
from .diffusion import Diffusion
from .errors import InvalidValueError, MissingInputError
from .models import FPDM, DiT, convert_legacy_fpdm_config, create_model

__all__ = ["RunFolder", "latest_checkpoint", "load_model"]

_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")
_CHECKPOINT_KEYS = {"step", "model", "ema", "optimizer"}


class RunFolder:
    """The files of one training run in ``path`` (nothing is created until something is written)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.ema = self.path / "ema"
        self.config_file = self.path / "config.json"
        self.log_file = self.path / "log.jsonl"
        self.summary_file = self.path / "summary.json"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``step-XXXXXXXX.pt`` (temporary files are ignored)."""
        found = self._checkpoint_files()
        return found[-1] if found else None

    def newest_readable_checkpoint(self, *, announce: bool = True) -> tuple[Path, dict[str, Any]]:
        """The newest checkpoint that loads. One that does not (truncated by a crash, empty, not a checkpoint) is
        renamed ``*.unreadable`` (kept for inspection, out of the way of resume and pruning) with a message naming
        it when ``announce`` (rank 0); raises naming every file if none loads."""
        failures = []
        for path in reversed(self._checkpoint_files()):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
                if not (isinstance(ckpt, dict) and _CHECKPOINT_KEYS <= set(ckpt)):
                    raise InvalidValueError("not a training checkpoint (missing step/model/ema/optimizer)")
            except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped the same way
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                failures.append(f"{path.name} ({reason})")
                if announce:
                    path.rename(path.with_name(path.name + ".unreadable"))
                    print(f"checkpoint {path} cannot be read ({reason}); renamed to {path.name}.unreadable, "
                          "resuming from the next newest", file=sys.stderr, flush=True)
                continue
            return path, ckpt
        raise InvalidValueError(f"no checkpoint in {self.checkpoints} can be read: {'; '.join(failures)}")

    def write_checkpoint(self, state: dict[str, Any], step: int, *, keep: int) -> Path:
        """Write ``checkpoints/step-XXXXXXXX.pt`` (synced to disk, then renamed into place) and delete all but the
        newest ``keep``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"step-{step:08d}.pt"
        write_atomic(path, lambda fh: torch.save(state, fh), sync=True)
        for stale in self._checkpoint_files()[:-keep]:
            stale.unlink()
        return path

    def write_ema(self, model: nn.Module, step: int, diffusion: Diffusion) -> None:
        """Save the EMA ``model`` as ``ema/`` (built in ``ema.tmp``, swapped in whole) with the ``diffusion`` it
        was trained with (``diffusion.json``, its diffusers config) and the ``step``."""
        final, tmp, old = self.ema, self.path / "ema.tmp", self.path / "ema.old"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        (tmp / "training_step.json").write_text(json.dumps({"step": step}))
        diffusion.save_config(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def ema_step(self) -> int | None:
        """The step ``ema/`` was saved at (``None`` if there is none)."""
        step_file = self.ema / "training_step.json"
        return json.loads(step_file.read_text()).get("step") if step_file.is_file() else None

    def read_log(self) -> list[dict[str, Any]]:
        """The entries of ``log.jsonl`` in order (a line cut short by a kill is skipped)."""
        if not self.log_file.is_file():
            return []
        entries = []
        for line in self.log_file.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_file, config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_file, summary)

    def repair(self, step: int | None) -> bool:
        """Undo what a kill can leave behind before a run continues from checkpoint ``step`` (``None``: a fresh
        run): temporaries of checkpoint and EMA writes, an ``ema.old`` a swap left, and log lines of the steps
        after that checkpoint (they are trained again). Returns whether ``ema/`` must be written again (older than
        the checkpoint, or missing after a kill between the two renames that swap it)."""
        if self.checkpoints.is_dir():
            for tmp in self.checkpoints.glob("step-*.pt.tmp*"):
                tmp.unlink()
        shutil.rmtree(self.path / "ema.tmp", ignore_errors=True)
        if step is None:
            return False
        shutil.rmtree(self.path / "ema.old", ignore_errors=True)
        stale_ema = self.ema_step() != step
        if self.log_file.is_file():
            lines = self.log_file.read_text().splitlines()
            kept = [line for line in lines if line.strip() and _log_step(line) <= step]
            if len(kept) != len(lines):
                write_text_atomic(self.log_file, "".join(line + "\n" for line in kept))
        return stale_ema

    def _checkpoint_files(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if _CHECKPOINT.match(p.name))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step-XXXXXXXX.pt`` in ``out_dir/checkpoints`` (temporary files are ignored)."""
    return RunFolder(out_dir).latest_checkpoint()


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The model's class and constructor settings, stored in each checkpoint so a resume can refuse another
    model."""
    return {"class": type(model).__name__, **{k: v for k, v in dict(model.config).items() if not k.startswith("_")}}


def _log_step(line: str) -> float:
    try:
        return json.loads(line).get("step", float("inf"))
    except json.JSONDecodeError:  # a line cut short by a kill
        return float("inf")


# --- loading a trained model -------------------------------------------------------------------------------------

def load_model(path: str | os.PathLike, *, weights: bool | str = True, device: str | torch.device = "cpu",
               what: str = "model") -> tuple[DiT | FPDM, Diffusion]:
    """A trained DiT/FPDM and the :class:`~fixedpoint_diffusion.Diffusion` it was trained with.

    Args:
        path: a run folder (its ``ema/`` model is loaded), a model folder (a run's ``ema/``, or any DiT/FPDM
            ``save_pretrained`` folder; its diffusion settings come from ``diffusion.json`` beside the weights, or
            the run folder's ``config.json``, the paper's defaults otherwise), or a training checkpoint file
            ``checkpoints/step-XXXXXXXX.pt``.
        weights: ``False`` builds the model on the meta device, for planning only. With a checkpoint file,
            ``"model"`` loads the raw training weights instead of the EMA ones.
        device: where the model goes.
        what: how errors name ``path`` (the ``fpdm`` command passes its flag).
    """
    path = Path(path)
    if path.is_file():
        return _load_checkpoint_file(path, weights, device, what)
    run = RunFolder(path)
    if run.ema.is_dir() and not (path / "diffusion_pytorch_model.safetensors").is_file():
        path = run.ema
    cls = _model_class(path, what)
    if weights:
        files = [f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                 if (path / f).is_file()]
        if not files:
            raise MissingInputError(f"{what} {str(path)!r}: no weights (diffusion_pytorch_model.safetensors)")
        try:
            model = cls.from_pretrained(path, low_cpu_mem_usage=False).to(device).eval()
        except (OSError, RuntimeError) as err:
            raise InvalidValueError(f"{what} {str(path)!r}: the weights in {files[0]} cannot be read "
                                    f"({str(err).splitlines()[0]})") from None
    else:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(path))
    settings: dict[str, Any] = {}
    if (path / "diffusion.json").is_file():
        settings = json.loads((path / "diffusion.json").read_text())
    elif (path.parent / "config.json").is_file():
        settings = json.loads((path.parent / "config.json").read_text()).get("diffusion", {})
    return model, _diffusion(settings, model)


def _model_class(folder: Path, what: str) -> type[DiT | FPDM]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingInputError(f"{what} {str(folder)!r}: no config.json (give a run's ema/ folder or a "
                                f"save_pretrained folder)")
    try:
        name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InvalidValueError(f"{what} {str(folder)!r}: {config_path.name} is not a JSON object ({err})") from None
    classes = {"FPDM": FPDM, "DiT": DiT}
    if name not in classes:
        raise InvalidValueError(f"{what} {str(folder)!r}: config.json names class {name!r}, expected FPDM or DiT")
    return classes[name]


def _diffusion(settings: dict[str, Any], model: DiT | FPDM) -> Diffusion:
    """The diffusion from saved settings (``Diffusion.from_config``: an unknown key is an error); ``learn_sigma``
    follows the model."""
    return Diffusion.from_config(settings, learn_sigma=model.config.learn_sigma)


def _load_checkpoint_file(path: Path, weights: bool | str, device: Any, what: str) -> tuple[DiT | FPDM, Diffusion]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise InvalidValueError(f"{what} {str(path)!r}: not a readable training checkpoint "
                                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not (isinstance(ckpt, dict) and {"model", "ema", "config"} <= set(ckpt)):
        raise InvalidValueError(f"{what} {str(path)!r}: not a training checkpoint written by fpdm train (give a "
                                "model folder, e.g. a run's ema/, or checkpoints/step-XXXXXXXX.pt)")
    model_args = dict(ckpt["config"]["model"])
    name = model_args.pop("name")
    if str(name).startswith("FPDM"):  # checkpoints written before FPDM took fixedpoint's option objects
        model_args = convert_legacy_fpdm_config(model_args)
    if weights is False:
        with torch.device("meta"):
            model = create_model(name, **model_args)
    else:
        model = create_model(name, **model_args)
        model.load_state_dict(ckpt["model"] if weights == "model" else ckpt["ema"])
        model = model.to(device).eval()
    return model, _diffusion(ckpt["config"].get("diffusion", {}), model)

"""Training of FPDM and DiT: one process, or one process per GPU under ``torchrun`` (plain DDP).

Reproducibility is by construction: every random draw of step ``s`` (timesteps, noise, label dropout, flips and
the stochastic-JFB step counts) comes from a generator seeded by ``(seed, s)`` and is drawn for the *global*
batch, of which each rank takes its slice; the data order of each epoch comes from ``(seed, epoch)``. So a run
gives the same parameters whatever the number of processes (up to floating-point summation order), and a run
resumed from a checkpoint continues bit for bit on CPU.

Python::

    from fixedpoint_diffusion import load_config, train
    summary = train(load_config("tiny", ["train.max_steps=200"]))

Command line: ``fpdm train --config tiny train.max_steps=200`` (see ``fpdm train --help``).

Longer than the project's ~400-line guide on purpose: the :class:`Trainer` is one class (its checks, the step and
the loop), kept whole so the training step reads in one place, as DiT's ``train.py`` does. What is not the trainer
lives elsewhere: the run folder in :mod:`~fixedpoint_diffusion.runs`, trackers in
:mod:`~fixedpoint_diffusion.trackers`, signals in ``_runtime``.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ._runtime import (
    StopFlag,
    check_writable_folder,
    cpu_threads,
    default_device,
    init_distributed,
    is_rank_zero,
    seed_from,
    world_size,
)
from .config import Config, ConfigError
from .data import ImageFolder, LatentDataset, Shapes
from .diffusion import Diffusion
from .errors import InvalidValueError, OutputExistsError
from .models import FPDM, DiT, convert_legacy_fpdm_config, create_model
from .runs import RunFolder, model_signature
from .trackers import Tracker, check_tracker

__all__ = ["Objective", "TrainState", "TrainSummary", "Trainer", "build_dataset", "fetch_batch", "train"]


@dataclass
class TrainState:
    """What a hook sees after each optimizer step: the step just completed and, on log steps, the averaged
    metrics of the last interval (``None`` otherwise)."""

    step: int
    metrics: dict[str, float] | None
    checkpoint: Path | None


@dataclass
class TrainSummary:
    """End-of-run figures (rank 0's view; metrics are averaged over ranks)."""

    start_step: int
    step: int
    interrupted: bool
    elapsed_s: float
    time_limit_reached: bool
    train_seconds: float
    steps_per_s: float
    last_metrics: dict[str, float] | None
    parameters: int
    peak_memory_bytes: int | None
    out_dir: Path
    checkpoint: Path | None
    ema_dir: Path | None

    def __str__(self) -> str:
        lines = [f"trained steps {self.start_step} -> {self.step}" + (" (interrupted)" if self.interrupted else "")
                 + (" (time limit reached)" if self.time_limit_reached else ""),
                 (f"  {self.elapsed_s:.1f} s ({self.train_seconds:.1f} s in all), {self.steps_per_s:.2f} steps/s, "
                  f"{self.parameters:,} parameters")]
        if self.peak_memory_bytes is not None:
            lines.append(f"  peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB")
        if self.last_metrics:
            lines.append("  last: " + ", ".join(f"{k} {v:.4g}" for k, v in self.last_metrics.items()))
        if self.checkpoint:
            lines.append(f"  checkpoint {self.checkpoint}")
        if self.ema_dir:
            lines.append(f"  EMA model (from_pretrained) {self.ema_dir}")
        return "\n".join(lines)


def build_dataset(config: Config, seed: int | None = None):
    """The dataset a config names (errors on a missing/empty folder or a bad latent folder come from here)."""
    data = config.data
    if data.kind == "shapes":
        return Shapes(data.num_samples, data.image_size, seed=config.train.seed if seed is None else seed)
    if data.kind == "images":
        return ImageFolder(data.path, data.image_size)
    return LatentDataset(data.path)


class _StepBatches:
    """Per-rank index lists for steps ``start .. stop-1``: epoch ``e`` is a permutation seeded by ``(seed, e)``
    cut into global batches (the last partial one dropped); rank ``r`` takes the ``r``-th slice of each."""

    def __init__(self, size: int, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.seed, self.start, self.stop = seed, start, stop
        self.per_epoch = size // global_batch
        self.local = global_batch // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for step in range(self.start, self.stop):
            e, pos = divmod(step, self.per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed_from(self.seed, 1, e)))
            first = pos * self.global_batch + self.rank * self.local
            yield perm[first:first + self.local].tolist()


def _as_batch(batch):
    """The loader's batch as ``(x, y)``: whole batches from ``__getitems__`` pass through, lists of items are
    stacked."""
    if isinstance(batch, list):
        xs, ys = zip(*batch)
        return torch.stack(xs), torch.as_tensor(ys)
    return batch


def fetch_batch(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``dataset`` at ``indices`` (taken modulo its length), as the trainer's loader builds it."""
    indices = [i % len(dataset) for i in indices]
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return _as_batch([dataset[i] for i in indices])


class Objective(nn.Module):
    """Model + loss in one module, so that DDP wraps a forward that returns plain tensors; only the model runs
    under autocast, the loss and the diffusion tables stay in fp32/fp64."""

    def __init__(self, model: nn.Module, diffusion: Diffusion, autocast: torch.dtype | None, device_type: str):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.autocast, self.device_type = autocast, device_type

    def forward(self, x0, y, t, eps, drop, generator=None):
        """``generator``: the FPDM's stochastic-JFB draws for this step (passed to its forward)."""
        def run(*args, **kwargs):
            if generator is not None:
                kwargs["generator"] = generator
            with torch.autocast(self.device_type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                return self.model(*args, **kwargs)

        loss = self.diffusion.loss(run, x0, y, t=t, eps=eps, drop_labels=drop, class_dropout=0.0)
        out = loss.output
        if out.residual is not None and out.z is not None:  # relative: ||f(z) - z|| / ||f(z)||, batch mean
            z_norm = out.z.detach().float().flatten(1).norm(dim=1).clamp_min(1e-12)
            residual = (out.residual.detach().float() / z_norm).mean()
        else:
            residual = loss.mse.new_zeros(())
        return loss.loss, loss.mse.detach().mean(), loss.vb.detach().mean(), residual


class Trainer:
    """One training run. Everything that can be wrong with the inputs (config values, data folder, data
    shapes and classes against the model, batch size against the number of processes and the dataset, an output
    folder holding another run, a checkpoint of another model) is checked in the constructor, before any
    training compute.

    Args:
        config: the run's :class:`~fixedpoint_diffusion.config.Config`.
        resume: continue from the newest checkpoint in ``train.out_dir`` (start from scratch if there is none).
            Without it, an ``out_dir`` that already holds checkpoints is an error, so nothing is overwritten.
        device: default: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
        hooks: callables run on rank 0 after each optimizer step with a :class:`TrainState`.
        progress: show a tqdm bar on rank 0.
        log_lines: without a bar, print plain lines a log can follow on rank 0: the loss at every log step and
            the first step, progress with speed and time left at least every 30 s, and when compilation starts
            and ends (``fpdm train --no-progress``).
        dataset: your own data instead of the one the config's ``data`` section names: a map-style dataset whose
            items are ``(x, y)`` (``x`` a (C, H, W) float tensor in the model's input range, ``y`` an int class) and
            with a ``num_classes`` attribute; ``__getitems__(indices) -> (x, y)`` batches are used when present.
            The run folder records the config only, so resuming needs the same dataset again.
    """

    def __init__(self, config: Config, *, resume: bool = False, device: str | torch.device | None = None,
                 hooks: Sequence[Callable[[TrainState], None]] = (), progress: bool = True,
                 log_lines: bool = False, dataset: Dataset | None = None) -> None:
        config.validate()
        check_tracker(config)
        self.config, self.hooks, self.progress = config, list(hooks), progress
        self.log_lines = log_lines and not progress
        tr = config.train
        self.world = world_size()
        self.device = default_device(device)
        if tr.global_batch_size % self.world:
            raise ConfigError(f"train.global_batch_size={tr.global_batch_size} must be divisible by the number of "
                              f"processes ({self.world})")
        self.out_dir = Path(tr.out_dir)
        check_writable_folder(self.out_dir, "train.out_dir")
        self.run_folder = RunFolder(self.out_dir)

        # Data (checks the folder, emptiness and latent shapes) and its fit with the model.
        self.dataset = build_dataset(config) if dataset is None else dataset
        if not isinstance(getattr(self.dataset, "num_classes", None), int):
            raise InvalidValueError("dataset must have an int num_classes attribute")
        if len(self.dataset) < tr.global_batch_size:
            raise InvalidValueError(f"the dataset has {len(self.dataset)} samples, fewer than one global batch "
                                    f"(train.global_batch_size={tr.global_batch_size})")
        x, _ = self.dataset[0]
        m = config.model
        self.model = self._build_model()
        mc = self.model.config
        expected = (mc.in_channels, mc.input_size, mc.input_size)
        if tuple(x.shape) != expected:
            hint = ("set model.in_channels/model.input_size to match the data" if config.data.kind != "latents" else
                    f"these latents come from {getattr(self.dataset, 'meta', {}).get('image_size')}px images; set "
                    f"model.input_size={x.shape[-1]} and model.in_channels={x.shape[0]}")
            raise InvalidValueError(f"data samples have shape {tuple(x.shape)} but {m['name']} expects {expected}: "
                                    f"{hint}")
        if self.dataset.num_classes > mc.num_classes:
            raise InvalidValueError(f"the dataset has {self.dataset.num_classes} classes but model.num_classes="
                                    f"{mc.num_classes}")

        # An existing run is only continued on request, and only with the same model.
        self.checkpoint_path = self.run_folder.latest_checkpoint()
        if self.checkpoint_path is not None and not resume:
            raise OutputExistsError(f"{self.out_dir} already holds checkpoints (newest: {self.checkpoint_path.name}); "
                                    f"pass --resume (resume=True) to continue that run, or choose another "
                                    f"train.out_dir")
        self.checkpoint = None
        if self.checkpoint_path is not None:
            self.checkpoint_path, self.checkpoint = self.run_folder.newest_readable_checkpoint(
                announce=is_rank_zero())
            self._check_checkpoint(self.checkpoint)
        self._setup_done = False

    # --- construction ------------------------------------------------------------------------------------------

    def _build_model(self) -> DiT | FPDM:
        m = dict(self.config.model)
        name = m.pop("name")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)  # the same initialisation on every rank
            return create_model(name, **m)

    def _check_checkpoint(self, ckpt: dict[str, Any]) -> None:
        ours, theirs = model_signature(self.model), ckpt.get("model_signature", {})
        if theirs.get("class") == "FPDM":  # checkpoints written with the old flat backward keys
            theirs = convert_legacy_fpdm_config(theirs)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, config {ours.get(k)!r}" for k in diff[:6])
            raise InvalidValueError(f"checkpoint {self.checkpoint_path} was written for another model ({shown})")
        saved_diffusion = ckpt.get("config", {}).get("diffusion")
        if saved_diffusion is not None and saved_diffusion != self.config.to_dict()["diffusion"]:
            raise InvalidValueError(f"checkpoint {self.checkpoint_path} was trained with diffusion settings "
                                    f"{saved_diffusion}, the config says {self.config.to_dict()['diffusion']}")

    def setup(self) -> None:
        """Move the model to the device, build the EMA, the diffusion, the objective (DDP-wrapped under torchrun)
        and the optimizer, and load the checkpoint being resumed; :meth:`run` calls it when needed."""
        cfg, tr = self.config, self.config.train
        self.rank = init_distributed(self.device)
        if dist.is_initialized() and dist.get_world_size() != self.world:
            raise RuntimeError(f"WORLD_SIZE={self.world} but the process group has {dist.get_world_size()} ranks")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tr.tf32
            torch.backends.cudnn.allow_tf32 = tr.tf32
        else:
            threads = cpu_threads(tr.cpu_threads)
            self._threads_before = torch.get_num_threads()  # restored when run() ends
            torch.set_num_threads(threads)
            self._say(f"CPU run: {threads} intra-op thread(s) (train.cpu_threads={tr.cpu_threads}; 0 chooses)")
        autocast = None
        if tr.mixed_precision == "bf16" or (tr.mixed_precision == "auto" and self.device.type == "cuda"):
            autocast = torch.bfloat16
        self.autocast = autocast
        model = self.model.to(self.device)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        if tr.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if tr.compile:
            self._say("compiling the transformer blocks (torch.compile): the first step includes the compilation")
            model.compile_blocks()
        self.diffusion = cfg.diffusion.build(learn_sigma=model.config.learn_sigma).to(self.device)
        objective = Objective(model, self.diffusion, autocast, self.device.type)
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            objective = DistributedDataParallel(objective, device_ids=ids)
        self.objective = objective
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay,
                                           betas=tuple(tr.betas))
        self._params, self._ema_params = list(model.parameters()), list(self.ema.parameters())
        self.step = 0
        self.train_seconds = 0.0  # training-loop wall time of this run and the runs it resumes
        if self.checkpoint is not None:
            ckpt = self.checkpoint
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step = int(ckpt["step"])
            self.train_seconds = float(ckpt.get("train_seconds", 0.0))
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and ckpt["rng"].get("cuda"):
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            self.checkpoint = None  # free the host copy
        self._setup_done = True

    # --- one step ---------------------------------------------------------------------------------------------

    def _draws(self, step: int, shape: tuple[int, ...]):
        """The step's random draws for the global batch, sliced to this rank (CPU generator: the same on every
        rank and every device)."""
        tr, G = self.config.train, self.config.train.global_batch_size
        g = torch.Generator().manual_seed(seed_from(tr.seed, 2, step))
        t = torch.randint(0, self.diffusion.num_timesteps, (G,), generator=g)
        eps = torch.randn((G, *shape), generator=g)
        drop = torch.rand(G, generator=g) < tr.class_dropout
        flip = torch.rand(G, generator=g) < 0.5
        sjfb_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        local = slice(self.rank * (G // self.world), (self.rank + 1) * (G // self.world))
        move = {"device": self.device, "non_blocking": True}
        return (t[local].to(**move), eps[local].to(**move), drop[local].to(**move), flip[local].to(**move),
                sjfb_seed)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One optimizer step on the batch ``(x, y)`` with step ``step``'s random draws: the objective, backward,
        clipping, the scheduled learning rate, the optimizer step and the EMA update. Returns the step's
        ``[loss, mse, vb, residual]`` on the device (no host sync)."""
        tr = self.config.train
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        t, eps, drop, flip, sjfb_seed = self._draws(step, tuple(x.shape[1:]))
        if self.config.data.hflip and self.config.data.kind != "latents":
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        # identical stochastic-JFB draws on every rank
        generator = torch.Generator().manual_seed(sjfb_seed) if isinstance(self.model, FPDM) else None
        loss, mse, vb, residual = self.objective(x, y, t, eps, drop, generator)
        loss.backward()
        if tr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_params, self._params, 1.0 - tr.ema_decay)
        return torch.stack([loss.detach(), mse, vb, residual])

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): ``train.lr`` after a linear warm-up, constant
        or cosine-decayed to ``min_lr_ratio * lr`` at ``max_steps``."""
        tr = self.config.train
        if step < tr.warmup_steps:
            return tr.lr * (step + 1) / tr.warmup_steps
        if tr.lr_schedule == "constant":
            return tr.lr
        span = max(1, tr.max_steps - tr.warmup_steps)
        progress = min(1.0, (step - tr.warmup_steps) / span)
        return tr.lr * (tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    # --- checkpoints ------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-XXXXXXXX.pt`` (atomically: a temporary file renamed into place) and the EMA
        model as a ``save_pretrained`` folder ``ema/`` (swapped in whole); keep the newest
        ``train.keep_checkpoints``. Rank 0 writes; all ranks wait for it."""
        path = None
        if self.rank == 0:
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            state = {"format": 1, "step": self.step, "model": self.model.state_dict(),
                     "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "config": self.config.to_dict(), "model_signature": model_signature(self.model), "rng": rng,
                     "world_size": self.world, "train_seconds": self.train_seconds}
            path = self.run_folder.write_checkpoint(state, self.step, keep=self.config.train.keep_checkpoints)
            self._save_ema()
        if dist.is_initialized():
            dist.barrier()
        return path

    def _say(self, message: str) -> None:
        if self.log_lines and is_rank_zero():
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def _progress_line(self, start: int, tr: Any, t0: float, last: float, first: bool) -> float:
        """Every 30 s (and after the first step): step, speed, time left; returns when it last printed."""
        now = time.perf_counter()
        if not first and now - last < 30:
            return last
        done = self.step - start
        rate = done / max(now - t0, 1e-9)
        left = (tr.max_steps - self.step) / rate if rate > 0 else float("inf")
        extra = " (compilation included)" if first and tr.compile else ""
        self._say(f"step {self.step}/{tr.max_steps}  {rate:.2f} steps/s{extra}  about "
                  f"{int(left // 60)} min {int(left % 60)} s left")
        return now

    def _non_finite(self, first_bad: torch.Tensor) -> None:
        step = int(first_bad)
        where = f"at step {step}" if step > 0 else f"by step {self.step} (the weights are no longer finite)"
        good = self.run_folder.latest_checkpoint()
        kept = f"the last good checkpoint ({good.name}) and ema/ were left as they were" if good else \
            "no checkpoint was written"
        raise FloatingPointError(f"the training loss became non-finite {where}; stopped, and {kept}. Lower "
                                 "train.lr, set train.grad_clip, or check the data")

    def _save_ema(self) -> None:
        self.run_folder.write_ema(self.ema, self.step, self.diffusion)

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> TrainSummary:
        """Train up to ``train.max_steps``; Ctrl-C (SIGINT) or SIGTERM stops at the next step boundary (on every
        rank at the same step) and writes a checkpoint first."""
        from tqdm.auto import tqdm

        if not self._setup_done:
            self.setup()
        tr = self.config.train
        start = self.step
        is_main = self.rank == 0
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.run_folder.write_config(self.config.to_dict())
            resumed = self.step if self.checkpoint_path is not None else None
            if self.run_folder.repair(resumed):
                self._save_ema()
        log = open(self.run_folder.log_file, "a") if is_main else None  # noqa: SIM115 - closed in finally
        board = Tracker.open(self.config, self.out_dir) if is_main else None
        sampler = _StepBatches(len(self.dataset), tr.global_batch_size, self.rank, self.world, tr.seed, start,
                               tr.max_steps)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_as_batch,
                            num_workers=self.config.data.num_workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        stop = StopFlag()
        bar = tqdm(total=tr.max_steps, initial=start, desc="train", disable=not (is_main and self.progress),
                   dynamic_ncols=True)
        parameters = sum(p.numel() for p in self.model.parameters())
        last_line = time.perf_counter()
        sums = torch.zeros(4, device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        count, interval_start, t0 = 0, time.perf_counter(), time.perf_counter()
        last_metrics, last_ckpt, interrupted, time_up = None, None, False, False
        limit_s, base_seconds = 60 * tr.max_minutes, self.train_seconds
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.objective.train()
        try:
            with stop:
                for x, y in loader:
                    if limit_s and base_seconds >= limit_s:  # a resumed run whose time was already spent
                        time_up = True
                        break
                    stats = self.train_step(x, y, self.step)
                    sums += stats
                    # The first non-finite step, recorded on the device (no host sync per step).
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(stats[0]), self.step + 1, first_bad)
                    self.step += 1
                    self.train_seconds = base_seconds + time.perf_counter() - t0
                    count += 1
                    bar.update(1)
                    if self.log_lines and is_main:
                        last_line = self._progress_line(start, tr, t0, last_line, first=self.step == start + 1)
                    metrics, ckpt = None, None
                    log_now = self.step % tr.log_every == 0 or self.step == tr.max_steps
                    over = bool(limit_s) and self.train_seconds >= limit_s
                    if log_now or ((stop.requested or over) and self.world == 1):
                        metrics = self._reduce(sums, count, time.perf_counter() - interval_start)
                        if not math.isfinite(metrics["loss"]):  # all-reduced: every rank stops here alike
                            self._non_finite(first_bad)
                        sums.zero_()
                        count, interval_start = 0, time.perf_counter()
                        last_metrics = metrics
                        if is_main:
                            bar.set_postfix(loss=f"{metrics['loss']:.4f}", residual=f"{metrics['residual']:.3g}")
                            if self.log_lines:
                                self._say(f"step {self.step}/{tr.max_steps}  loss {metrics['loss']:.4f}  residual "
                                          f"{metrics['residual']:.3g}  {metrics['steps_per_s']:.2f} steps/s")
                                last_line = time.perf_counter()
                            log.write(json.dumps({"step": self.step, **metrics, "time": time.time()}) + "\n")
                            log.flush()
                            if board is not None:
                                board.log(metrics, self.step)
                    # Every rank must agree on stopping: in a multi-process run the flag is all-reduced on log
                    # steps (which already synchronise), so a stop lands at the next log step.
                    if self.world == 1:
                        stopping, time_up = stop.requested or over, over
                    elif log_now:
                        flags = _any_rank([stop.requested, over], self.device)
                        stopping, time_up = any(flags), flags[1]
                    else:
                        stopping = False
                    if self.step % tr.checkpoint_every == 0 or self.step == tr.max_steps or stopping:
                        if not _all_finite(self._params):  # never overwrite a good checkpoint or ema/ with NaN
                            self._non_finite(first_bad)
                        ckpt = last_ckpt = self.save_checkpoint()
                    if is_main:
                        for hook in self.hooks:
                            hook(TrainState(step=self.step, metrics=metrics, checkpoint=ckpt))
                    if stopping:
                        interrupted = not time_up
                        break
        finally:
            bar.close()
            if getattr(self, "_threads_before", None):
                torch.set_num_threads(self._threads_before)
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        summary = TrainSummary(start_step=start, step=self.step, interrupted=interrupted, elapsed_s=elapsed,
                               time_limit_reached=time_up, train_seconds=self.train_seconds,
                               steps_per_s=(self.step - start) / elapsed if elapsed > 0 else 0.0,
                               last_metrics=last_metrics, parameters=parameters, peak_memory_bytes=peak,
                               out_dir=self.out_dir, checkpoint=last_ckpt,
                               ema_dir=self.run_folder.ema if last_ckpt is not None else None)
        if is_main:
            self.run_folder.write_summary({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(summary).items()})
        return summary

    def close(self) -> None:
        """Free the DDP wrapper while the process group still exists; call it before
        ``torch.distributed.destroy_process_group()`` when you drive a :class:`Trainer` yourself under ``torchrun``
        (:func:`train` does). In the other order the wrapper's reducer holds the group's last reference, and its
        destructor, joining gloo's threads while holding the GIL, deadlocked a 2-process CPU run at exit."""
        self.objective = None
        gc.collect()  # the wrapper sits in reference cycles: free it now, not at some later collection

    def _reduce(self, sums: torch.Tensor, count: int, seconds: float) -> dict[str, float]:
        values = sums / max(count, 1)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world
        loss, mse, vb, residual = values.tolist()
        return {"loss": loss, "mse": mse, "vb": vb, "residual": residual,
                "steps_per_s": count / seconds if seconds > 0 else 0.0}


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over all ranks (one all-reduce)."""
    value = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def train(config: Config, *, resume: bool = False, device: str | torch.device | None = None,
          hooks: Sequence[Callable[[TrainState], None]] = (), progress: bool = True,
          log_lines: bool = False, dataset: Dataset | None = None) -> TrainSummary:
    """Train a model as ``config`` says (see :class:`Trainer` for the arguments); returns the run's
    :class:`TrainSummary`. Under ``torchrun``, call it in every process."""
    trainer = Trainer(config, resume=resume, device=device, hooks=hooks, progress=progress, log_lines=log_lines,
                      dataset=dataset)
    try:
        return trainer.run()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


"""Copy a finished training run's EMA model into the package as a shipped model, with its provenance.

    python scripts/export_pretrained.py RUN_FOLDER NAME --command "the command that trained it" [--device TEXT]

``RUN_FOLDER`` is a ``fpdm train`` run folder whose last checkpoint is its final step; ``NAME`` is one of
``fixedpoint_diffusion.pretrained.MODELS``. Writes ``src/fixedpoint_diffusion/pretrained/NAME/`` (config.json,
diffusion_pytorch_model.safetensors, diffusion.json, provenance.json). Refuses a run that has not reached its
``max_steps`` or whose weights are not all finite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import torch

from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.config import Config
from fixedpoint_diffusion.runs import RunFolder, load_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name", choices=pretrained.MODELS)
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    parser.add_argument("--device", default="cpu (2-core VM, 1 intra-op thread)")
    args = parser.parse_args(argv)

    run = RunFolder(args.run)
    config = Config.from_dict(json.loads(run.config_file.read_text()))
    summary = json.loads(run.summary_file.read_text())
    ema, step = run.ema, run.ema_step()
    if step != config.train.max_steps:
        sys.exit(f"{ema} is at step {step}, the run's max_steps is {config.train.max_steps}: finish the run first")
    model, _ = load_model(ema)
    bad = [name for name, p in model.state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        sys.exit(f"{ema} holds non-finite weights ({', '.join(bad[:5])}): not exported")
    log = run.read_log()
    target = ROOT / "src" / "fixedpoint_diffusion" / "pretrained" / args.name
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion.json"):
        shutil.copy2(ema / file, tmp / file)
    macs_per_step = model.training_macs(config.train.global_batch_size)
    provenance = {
        "command": args.command,
        "config": config.to_dict(),
        "seed": config.train.seed,
        "steps": step,
        "training_macs": macs_per_step * step,
        "training_macs_per_step": macs_per_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "torch": torch.__version__,
        "wall_seconds": round(summary["train_seconds"], 1),
        "final_loss": log[-1]["loss"] if log else None,
        "date": datetime.date.fromtimestamp(log[-1]["time"]).isoformat() if log else None,
    }
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"{args.name}: {step} steps, {provenance['training_macs']:.4g} training MACs -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

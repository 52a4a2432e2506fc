"""Start-up time of the ``fpdm`` command: ``fpdm --help`` and an argument error, against a bare Python start and an
``import torch``, each a fresh process, side by side in rounds (so a busy spell slows all alike). Reported as
seconds (median over rounds) and as ratios to the bare Python start.

    python benchmarks/startup.py              # 7 rounds
    python benchmarks/startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import _common

COMMANDS = {
    "python": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "fpdm --help": [sys.executable, "-m", "fixedpoint_diffusion", "--help"],
    "fpdm sample (argument error)": [sys.executable, "-m", "fixedpoint_diffusion", "sample"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=False)
            times[name].append(time.perf_counter() - start)
    record = _common.environment("benchmarks/startup.py", argv, torch.device("cpu"))
    base = statistics.median(times["python"])
    record["rows"] = [{"command": name, "median_s": statistics.median(t), "x_python": statistics.median(t) / base,
                       "seconds": t} for name, t in times.items()]
    print("| command | median s | x bare python |")
    print("|---|---:|---:|")
    for row in record["rows"]:
        print(f"| {row['command']} | {row['median_s']:.3f} | {row['x_python']:.1f} |")
    _common.write(record, args.out)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

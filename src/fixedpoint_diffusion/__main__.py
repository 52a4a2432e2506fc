"""``python -m fixedpoint_diffusion ...`` is the ``fpdm`` command (works under ``torchrun -m`` too)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

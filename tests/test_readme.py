"""The README's example runs as written."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        if "layer" in namespace:  # the fixedpoint example
            grads = [p.grad for p in namespace["layer"].parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert namespace["out"].converged.all()
        if "diffusion" in namespace:  # the FPDM example
            assert namespace["out"].cost.block_passes == 1 + 3 + 1
    printed = capsys.readouterr().out.split()
    assert printed[0] == "True"  # the solve converged

"""Each example runs at its tiny size."""

import importlib.util
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_deq_classifier_trains_with_every_backward_mode(capsys):
    results = _load("deq_classifier").main(["--tiny"])
    assert set(results) == {"Implicit()", "JFB(steps=1)", "StochasticJFB(4, 4)"}
    assert all(0 <= r["test_accuracy"] <= 1 and r["seconds"] > 0 for r in results.values())
    # The modes really differ: the same initial weights and batches give different training trajectories.
    losses = [r["final_loss"] for r in results.values()]
    assert len(set(losses)) == 3
    assert "StochasticJFB(4, 4)" in capsys.readouterr().out

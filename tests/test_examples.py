"""Each example runs at its tiny size."""

import collections
import importlib.util
import itertools
import json
import math
import pathlib
import re
import shlex
import sys

import pytest
import torch

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


# --------------------------------------------------------------------------------------- examples/budget_sweep.py ---

@pytest.mark.slow
def test_budget_sweep_tiny_end_to_end(tmp_path, capsys):
    """The sweep at --tiny (micro model trained into tmp, small classifier), checked against schedules worked out by
    hand: T = budget // (2 + k) timesteps for the micro FPDM's 1 pre + 1 post block."""
    out = tmp_path / "sweep.json"
    # budget 3 fits one timestep of k=1 (3 passes) but none of k=2 (4): that setting must be reported as skipped.
    # --tol 10: every adaptive solve meets the tolerance after its first iteration, so adaptive must spend exactly
    # one iteration per timestep, well under the budget.
    argv = ["--tiny", "--score", "--budgets", "3", "8", "16", "--tol", "10", "--work", str(tmp_path / "work"),
            "--out", str(out)]
    record = _load("budget_sweep").main(argv)
    stored = json.loads(out.read_text())
    assert stored["rows"] == json.loads(json.dumps(record["rows"]))
    assert out.with_suffix(".png").is_file()
    assert record["training"]["steps"] == 8
    rows = {(r["budget"], r["iters_per_step"], r["allocation"]): r for r in stored["rows"]}
    allocations = ["constant", "increasing", "decreasing", "adaptive"]
    assert set(rows) == {(b, k, a) for b in (3, 8, 16) for k in (1, 2) for a in allocations}  # every setting
    for (budget, k, allocation), r in rows.items():
        steps = budget // (2 + k)
        if steps == 0:
            assert r["status"] == "skipped" and "too small" in r["reason"]
            continue
        assert r["status"] == "ok"
        assert r["num_steps"] == steps == len(r["timesteps"]) == len(r["residuals"]) == len(r["iterations_spent"])
        assert r["timesteps"][0] == 999 and r["timesteps"][-1] == (0 if steps > 1 else 999)
        assert all(math.isfinite(d) and d > 0 for d in r["residuals"])
        # What was spent, summed from the per-timestep record, is what the model's cost reported.
        assert r["block_passes"] == 2 * steps + sum(r["iterations_spent"]) <= budget
        assert r["planned_block_passes"] <= budget
        if allocation == "constant":
            assert r["iterations_spent"] == [k] * steps and r["block_passes"] == steps * (2 + k)
        elif allocation == "adaptive":
            assert r["iterations_spent"] == [1] * steps
            assert r["planned_block_passes"] == budget  # the allowance is the whole budget ...
            assert r["block_passes"] == 3 * steps  # ... of which the tolerance left all but 1 iteration a step
        else:  # increasing/decreasing spread the whole budget, monotonically
            assert r["iterations_spent"] == r["iterations"] and r["block_passes"] == budget
            pairs = list(zip(r["iterations"], r["iterations"][1:]))
            assert all(a <= b if allocation == "increasing" else a >= b for a, b in pairs)
        assert 0 <= r["accuracy"] <= 1 and r["fd"] >= 0 and math.isfinite(r["kid"])
        assert r["seconds"] > 0
    assert rows[(16, 2, "adaptive")]["block_passes"] == 12 < rows[(16, 2, "constant")]["block_passes"] == 16
    # Same budget, k and seeds: constant and increasing differ only in the iterations, so their samples differ.
    assert rows[(16, 2, "constant")]["residuals"] != rows[(16, 2, "increasing")]["residuals"]
    printed = capsys.readouterr().out
    assert "| budget | k | allocation |" in printed and "skipped" in printed


def test_budget_sweep_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    sweep = _load("budget_sweep")
    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "config.json").write_text(json.dumps({"_class_name": "DiT"}))
    for argv, message in [(["--budgets", "0"], "--budgets must be >= 1"),
                          (["--iters", "2", "-1"], "--iters must be >= 1"),
                          (["--allocations", "linear"], "invalid choice"),
                          (["--score", "--num-samples", "1"], "KID needs two"),
                          (["--tol", "0"], "--tol must be > 0"),
                          (["--model", str(tmp_path)], "no config.json"),
                          (["--model", str(dit)], "holds a DiT, not an FPDM")]:
        with pytest.raises(SystemExit):
            sweep.main(argv + ["--work", str(tmp_path / "never"), "--out", str(tmp_path / "never.json")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------ examples/fpdm_imagenet.md ---

RECIPE = EXAMPLES / "fpdm_imagenet.md"


def _recipe_commands() -> list[list[str]]:
    """Every fpdm command in the recipe's bash blocks, as argv after ``fpdm`` (or ``-m fixedpoint_diffusion``), with
    line continuations joined and ``for`` loops expanded over their values. An undefined variable fails."""
    blocks = re.findall(r"```bash\n(.*?)```", RECIPE.read_text(), flags=re.DOTALL)
    commands = []
    for block in blocks:
        loops: list[tuple[str, list[str]]] = []
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if m := re.fullmatch(r"for (\w+) in (.+); do", line):
                loops.append((m.group(1), m.group(2).split()))
                continue
            if line == "done":
                loops.pop()
                continue
            words = shlex.split(line) if line else []
            if "fixedpoint_diffusion" in words and words[words.index("fixedpoint_diffusion") - 1] == "-m":
                words = words[words.index("fixedpoint_diffusion") + 1:]
            elif words[:1] == ["fpdm"]:
                words = words[1:]
            else:
                continue
            for values in itertools.product(*(vals for _, vals in loops)):
                env = {name: v for (name, _), v in zip(loops, values)}

                def expand(word, env=env):
                    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], word)

                commands.append([expand(w) for w in words])
        assert not loops, "unclosed for loop in the recipe"
    return commands


def _model_folder(root, run: str):
    """A run folder for ``runs/<config>/ema`` holding only what ``fpdm sample --dry-run`` reads: the model's
    config.json (from the shipped config, built on the meta device) and the run's config.json (the diffusion)."""
    import fixedpoint_diffusion as fd

    name = re.fullmatch(r"runs/([\w-]+)/ema", run)
    assert name, f"--model {run!r} is not a run folder of the recipe"
    assert name.group(1) in fd.list_configs(), f"--model {run!r}: sample a run of a shipped config"
    config = fd.load_config(name.group(1))
    folder = root / name.group(1) / "ema"
    if not folder.is_dir():
        m = dict(config.model)
        with torch.device("meta"):
            model = fd.create_model(m.pop("name"), **m)
        model.save_config(folder)
        (folder.parent / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def test_imagenet_recipe_commands_are_accepted_by_the_cli(tmp_path, capsys):
    import fixedpoint_diffusion as fd
    from fixedpoint_diffusion.cli import build_parser, main

    commands = _recipe_commands()
    seen = collections.Counter(argv[0] for argv in commands)
    assert seen["extract-latents"] >= 1 and seen["train"] >= 4 and seen["eval"] >= 2 and seen["configs"] == 1
    assert seen["sample"] >= 2 * 3 * 2 + 2 + 13  # the Table 1 grid, k=4 at 280, the Fig. 4 sweep
    parser = build_parser()
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the CLI rejects the recipe's command: fpdm {shlex.join(argv)}\n{capsys.readouterr().err}")
        if args.command == "train":  # the named config and every override load and validate
            config = fd.load_config(args.config, args.overrides)
            assert config.data.kind == "latents" and config.data.path == "/data/imagenet256-latents"
            assert config.model["name"] in ("FPDM-XL/2", "DiT-XL/2")
        elif args.command == "sample":  # planned for the real XL/2 config, without weights
            i = argv.index("--model")
            dry = argv[:i + 1] + [str(_model_folder(tmp_path, argv[i + 1]))] + argv[i + 2:]
            capsys.readouterr()
            assert main(dry if "--dry-run" in dry else dry + ["--dry-run"]) == 0, capsys.readouterr().err
            head = capsys.readouterr().out.splitlines()[0]
            passes = int(re.search(r"(\d+) block passes per image", head).group(1))
            assert passes <= args.budget, head
        elif args.command == "configs":
            assert main(argv) == 0
            assert {"fpdm-xl2-imagenet256", "dit-xl2-imagenet256"} <= set(capsys.readouterr().out.split())


def test_imagenet_recipe_schedule_table_matches_the_planner():
    """The recipe's budget table is what ``plan`` gives for FPDM-XL/2 (1 + k + 1 passes a timestep) and DiT-XL/2
    (28), and its rows are the paper's: 93 timesteps at k=1, 4 at k=68 (Fig. 4), 20 DiT timesteps at 560 (Fig. 1)."""
    import fixedpoint_diffusion as fd

    rows = re.findall(r"^\| (FPDM-XL/2|DiT-XL/2) \| (\d+) \| (\d+|–) \| (\d+) \| (\d+) \|$", RECIPE.read_text(),
                      flags=re.MULTILINE)
    assert len(rows) == 7
    for model, budget, k, steps, passes in rows:
        if model == "FPDM-XL/2":
            schedule = fd.plan(budget=int(budget), iterations_per_timestep=int(k), explicit_passes=2)
        else:
            with torch.device("meta"):
                schedule = fd.plan(fd.create_model("DiT-XL/2"), budget=int(budget))
        assert (schedule.num_timesteps, schedule.block_passes) == (int(steps), int(passes)), (model, budget, k)
    assert fd.plan(budget=280, iterations_per_timestep=1, explicit_passes=2).num_timesteps == 93
    assert fd.plan(budget=280, iterations_per_timestep=68, explicit_passes=2).num_timesteps == 4

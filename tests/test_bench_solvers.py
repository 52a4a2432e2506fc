"""``benchmarks/solvers.py`` runs end to end at its smallest size; only facts that are not timings are checked."""

import json

import pytest

pytest.importorskip("torchdeq")
pytest.importorskip("matplotlib")

from test_benchmarks import _load

OURS = {"iteration", "anderson", "broyden"}
THEIRS = {"fixed_point_iter", "anderson", "anderson lam=1e-30", "broyden"}
PROBLEMS = ["affine rho=0.5", "affine rho=0.9", "affine rho=0.99", "tanh", "fpdm"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "solvers.json"
    returned = _load("solvers").main(["--tiny", "--device", "cpu", "--out", str(out)])
    return out, returned, json.loads(out.read_text())


@pytest.mark.slow
def test_every_problem_and_solver_is_recorded(tiny_run):
    out, returned, result = tiny_run
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["benchmark"] == "solvers" and result["device"] == "cpu" and "--tiny" in result["command"]
    assert [p["problem"] for p in result["problems"]] == PROBLEMS == [p["problem"] for p in returned["problems"]]
    for problem in result["problems"]:
        rows = problem["rows"]
        assert {r["solver"] for r in rows if r["library"] == "fixedpoint"} == OURS
        assert {r["solver"] for r in rows if r["library"] == "torchdeq"} == THEIRS
        assert len(rows) == len(OURS) + len(THEIRS)
        for row in rows:
            tol, fixed = row["tol"], row["fixed"]
            for measured in (tol, fixed):
                assert {"steps", "host_syncs", "seconds", "f_seconds", "overhead", "peak_mib"} <= set(measured)
                assert measured["peak_mib"] is None and measured["cuda_syncs"] is None  # CPU: no such statistic
            # Every solver converged within its budget, and fixed-step mode spent exactly its steps.
            assert tol["converged"], (problem["problem"], row["library"], row["solver"])
            assert tol["residual"] <= problem["tol"]
            assert 1 <= tol["steps"] <= problem["max_steps"]
            assert fixed["steps"] == problem["fixed_steps"]


@pytest.mark.slow
def test_our_host_syncs(tiny_run):
    _, _, result = tiny_run
    for problem in result["problems"]:
        for row in problem["rows"]:
            if row["library"] == "fixedpoint":
                # fixed-step mode never waits for the device; tolerance mode once per check (check_every=1)
                assert row["fixed"]["host_syncs"] == 0, (problem["problem"], row["solver"], row["fixed"])
                assert row["tol"]["host_syncs"] == row["tol"]["steps"], (problem["problem"], row["solver"])
                assert row["tol"]["sync_ops"] == {"__bool__": row["tol"]["steps"]}
            elif row["solver"].startswith("anderson"):
                # the counter sees what it is meant to: torchdeq's Anderson checks torch.linalg.solve every step
                assert row["fixed"]["sync_ops"].get("linalg_solve", 0) == row["fixed"]["steps"] - 2


@pytest.mark.slow
def test_steps_not_above_torchdeq_for_the_same_algorithm(tiny_run):
    # The claims of tests/test_torchdeq.py, in float64: Iteration is fixed_point_iter, Anderson with the same memory
    # is torchdeq's without a ridge, Broyden keeping every update is torchdeq's Broyden (its default memory).
    _, _, result = tiny_run
    pairs = result["targets"]["steps_not_above_torchdeq"]["pairs"]
    claimed = [p for p in pairs if p["same_algorithm"] and p["problem"] != "fpdm"]
    assert {p["torchdeq"] for p in claimed} == {"fixed_point_iter", "anderson lam=1e-30", "broyden"}
    assert len(claimed) == 3 * (len(PROBLEMS) - 1)
    for p in claimed:
        assert p["converged_ours"] and p["converged_torchdeq"], p
        assert p["steps_ours"] <= p["steps_torchdeq"], p
    # Broyden was compared while neither side had dropped an update (both keep the same number), i.e. as the same
    # method as torchdeq's default, which keeps all of them
    memory = result["settings"]["broyden_memory"]
    for problem in result["problems"]:
        for row in problem["rows"]:
            if row["solver"] == "broyden":
                assert row["tol"]["steps"] <= min(memory, problem["max_steps"]), (problem["problem"], row)


@pytest.mark.slow
def test_anderson_steps_unchanged_when_the_input_is_scaled(tiny_run):
    _, _, result = tiny_run
    rows = [dict(s, problem=p["problem"]) for p in result["problems"] for s in p["anderson_scale"]]
    ours = [r for r in rows if r["library"] == "fixedpoint" and r["problem"].startswith("affine")]
    assert len(ours) == 3
    for r in ours:
        assert r["converged_scaled"] and r["steps_scaled"] == r["steps"], r
    assert result["targets"]["anderson_scale_invariance"]["met_affine_ours"]

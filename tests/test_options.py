"""The option objects as values: one rule for numbers (``bool`` is never one), the name tables, the round trip
through ``to_config``/``from_config``, and the package's import structure that keeps those rules in one place."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import fixedpoint as fp

PACKAGE = Path(fp.__file__).parent


# --- bool is not a number --------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: fp.Iteration(damping=True), "Iteration: damping must be a number in \\(0, 1\\], got True"),
    (lambda: fp.Anderson(damping=True), "Anderson: damping"),
    (lambda: fp.Anderson(memory=True), "Anderson: memory"),
    (lambda: fp.Anderson(regularization=False), "Anderson: regularization"),
    (lambda: fp.Anderson(regularization=float("inf")), "Anderson: regularization must be a finite number >= 0"),
    (lambda: fp.Broyden(memory=True), "Broyden: memory"),
    (lambda: fp.JFB(steps=True), "JFB: steps"),
    (lambda: fp.StochasticJFB(max_no_grad=True, max_with_grad=1), "StochasticJFB: max_no_grad"),
    (lambda: fp.GMRES(restart=True), "GMRES: restart"),
    (lambda: fp.Neumann(order=False), "Neumann: order"),
    (lambda: fp.Implicit(max_steps=True), "Implicit: max_steps"),
    (lambda: fp.Implicit(rtol=True), "Implicit: rtol"),
    (lambda: fp.spectral_norm(torch.nn.Linear(2, 2), bound=True), "spectral_norm: bound"),
    (lambda: fp.spectral_norm(torch.nn.Linear(2, 2), num_power_steps=True), "spectral_norm: num_power_steps"),
    (lambda: fp.weight_norm(torch.nn.Linear(2, 2), max_scale=True), "weight_norm: max_scale"),
    (lambda: fp.DEQ(torch.nn.Identity(), check_every=True), "check_every"),
    (lambda: fp.DEQ(torch.nn.Identity(), num_jacobian_projections=True), "num_jacobian_projections"),
])
def test_bool_is_refused_wherever_a_number_is_expected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bool_is_refused_by_the_diagnostics_and_dropout():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_iterations"):
        fp.spectral_radius(lambda v: 0.5 * v, z, num_iterations=True)
    with pytest.raises(ValueError, match="max_steps"):
        fp.check_gradients(lambda v: 0.5 * v, z, params=[torch.ones(1, requires_grad=True)], backward="jfb",
                           max_steps=True)
    with pytest.raises(TypeError, match="p must be a number"):
        fp.VariationalDropout(True)


# --- name tables ---------------------------------------------------------------------------------------------

def test_name_tables_build_every_option_object_from_keyword_options():
    assert set(fp.SOLVERS) == {"iteration", "anderson", "broyden"}
    assert set(fp.BACKWARDS) == {"jfb", "implicit", "stochastic_jfb"}
    assert fp.SOLVERS["anderson"](memory=3) == fp.Anderson(memory=3)
    assert fp.BACKWARDS["stochastic_jfb"](max_no_grad=2, max_with_grad=1) == fp.StochasticJFB(2, 1)
    with pytest.raises(TypeError):
        fp.SOLVERS["extra"] = fp.Iteration  # read-only
    with pytest.raises(ValueError, match="unknown option"):
        fp.BACKWARDS["jfb"](step=2)


def test_a_name_without_default_options_asks_for_them():
    with pytest.raises(ValueError, match=r"StochasticJFB\(max_no_grad=\.\.\., max_with_grad=\.\.\.\)"):
        fp.DEQ(torch.nn.Identity(), backward="stochastic_jfb")


# --- to_config / from_config ---------------------------------------------------------------------------------

OBJECTS = [
    fp.Iteration(), fp.Iteration(damping=0.5), fp.Anderson(), fp.Anderson(memory=3, damping=0.7, regularization=0.0),
    fp.Broyden(), fp.Broyden(memory=4, when_full="reduce"),
    fp.JFB(), fp.JFB(steps=3), fp.StochasticJFB(max_no_grad=4, max_with_grad=2),
    fp.StochasticJFB(min_no_grad=1, max_no_grad=5, min_with_grad=2, max_with_grad=3),
    fp.Implicit(), fp.Implicit(solver="broyden", max_steps=20, rtol=1e-5, atol=0.0),
    fp.Implicit(solver=fp.Anderson(memory=2)), fp.Implicit(solver=fp.GMRES(restart=7), max_steps=30),
    fp.Implicit(solver=fp.Neumann(order=3)),
]


@pytest.mark.parametrize("obj", OBJECTS, ids=repr)
def test_config_round_trip_through_json(obj):
    config = fp.to_config(obj)
    assert config["name"] in {**fp.SOLVERS, **fp.BACKWARDS}
    assert isinstance(fp.SOLVERS.get(config["name"]) or fp.BACKWARDS[config["name"]], type)
    again = fp.from_config(json.loads(json.dumps(config)))
    assert type(again) is type(obj) and again == obj
    assert fp.to_config(again) == config


def test_config_lists_every_option_with_its_name():
    assert fp.to_config(fp.StochasticJFB(max_no_grad=4, max_with_grad=2)) == {
        "name": "stochastic_jfb", "max_no_grad": 4, "max_with_grad": 2, "min_with_grad": 1, "generator": None,
        "min_no_grad": 0}
    assert fp.to_config(fp.Implicit(solver=fp.GMRES())) == {
        "name": "implicit", "solver": {"name": "gmres", "restart": 20}, "max_steps": None, "rtol": None,
        "atol": None, "state": None}
    assert fp.from_config({"name": "anderson", "memory": 2}) == fp.Anderson(memory=2)  # the rest by default


@pytest.mark.parametrize("obj, match", [
    (fp.StochasticJFB(max_no_grad=2, max_with_grad=1, generator=torch.Generator()), "StochasticJFB.generator holds"),
    (fp.Implicit(state=fp.AdjointState()), "Implicit.state holds a AdjointState"),
    (fp.GMRES(), "must be a solver or backward mode named in SOLVERS or BACKWARDS"),
    ("anderson", "got str"),
])
def test_to_config_refuses_what_has_no_json_form(obj, match):
    with pytest.raises(TypeError, match=match):
        fp.to_config(obj)


def test_to_config_refuses_a_subclass():
    class Pinned(fp.JFB):
        pass

    with pytest.raises(TypeError, match="got Pinned"):
        fp.to_config(Pinned())


@pytest.mark.parametrize("config, error, match", [
    ({"name": "anderson", "memry": 3}, ValueError, r"unknown option\(s\) \['memry'\]"),
    ({"name": "anderson", "memory": 0}, ValueError, "Anderson: memory must be an int >= 1"),
    ({"name": "andersen"}, ValueError, r"config\['name'\] must be one of \['anderson', 'broyden', 'implicit'"),
    ({"memory": 3}, ValueError, "got None"),
    ({"name": "gmres"}, ValueError, "must be one of"),  # only nested, as Implicit's solver
    ({"name": "implicit", "solver": {"name": "nope"}}, ValueError, r"config\['solver'\]\['name'\]"),
    ([("name", "jfb")], TypeError, "must be a mapping"),
])
def test_from_config_refuses_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        fp.from_config(config)


def test_from_config_unknown_option_is_the_constructors_error():
    from fixedpoint._options import UnknownOptionError

    with pytest.raises(UnknownOptionError):
        fp.from_config({"name": "stochastic_jfb", "max_no_grad": 1, "max_with_grad": 1, "n": 2})


# --- import structure ----------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``import from`` loads (``from . import x`` may name a submodule)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] if target.split(".")[0] == "fixedpoint" else []


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, tree = _module_name(path), ast.parse(path.read_text())
        edges = graph.setdefault(module, set())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                for target in _imported(module, path.name == "__init__.py", node):
                    # importing a.b.c runs a.b's __init__ first, unless the importer is inside a.b (whose
                    # __init__ is then already running); the root package is always already importing
                    parts = target.split(".")
                    edges.update(prefix for prefix in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                                 if prefix == target or not (module + ".").startswith(prefix + "."))
        edges.discard(module)
    return graph


def test_no_import_inside_a_function_of_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fixedpoint")):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
                    if isinstance(node, ast.Import) and any(a.name.startswith("fixedpoint") for a in node.names):
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"in-function imports of the package's own modules: {found}"


def test_the_package_has_no_import_cycle():
    graph = _graph()
    graph.pop("fixedpoint")  # the root imports everything and is imported by nothing inside
    assert "fixedpoint._solve" in graph and "fixedpoint.backward.implicit" in graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + (module,))}")
        if module in done or module not in graph:
            return
        for target in graph[module]:
            visit(target, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
